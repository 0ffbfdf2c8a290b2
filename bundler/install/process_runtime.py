"""The process runtime: each service runs under its own detached supervisor."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bundler import proc
from bundler.errors import InstallError
from bundler.fsutil import atomic_write_bytes
from bundler.install import node_runtime, runas
from bundler.install.environ import release_env
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.supervise import start_time
from bundler.models import EnvSpec, Service


@dataclass(frozen=True)
class ServiceState:
    name: str
    running: bool
    pid: int | None
    detail: str = ""


def _pidfile(rel: ReleaseDir, name: str) -> Path:
    return rel.run / f"{name}.pid"


def _read_pid(rel: ReleaseDir, name: str) -> int | None:
    """The supervisor's pid, if the pidfile names a process that is still that supervisor.
    Only a pidfile the supervisor wrote counts (ours, not a symlink): run/ may be writable by
    the release's `user`, who must not make bundler signal another process."""
    try:
        fd = os.open(_pidfile(rel, name), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return None
        pid_s, started = os.read(fd, 256).decode().split()
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    pid = int(pid_s)
    return pid if start_time(pid) == started else None


def start(services: tuple[Service, ...], layout: Layout, rel: ReleaseDir,
          spec: EnvSpec | None = None, environment: str = "production",
          user: str | None = None) -> None:
    """Start each service that is not running. `user`: the release's account, which services
    run as unless they name their own (see runas)."""
    release_user = runas.maybe(user)
    for name in {svc.user for svc in services if svc.user}:
        runas.account(name)  # refuse now, with the hint, not in the supervisor's log
    runas.release_dirs(rel, release_user)
    for svc in services:
        if _read_pid(rel, svc.name) is not None:
            continue
        cwd = rel.files / svc.cwd if svc.cwd != "." else rel.files
        if not cwd.is_dir():
            raise InstallError(f"service {svc.name}: working directory {cwd} does not exist",
                               hint="check `cwd` against the `files` dest in the profile")
        renv = release_env(layout, spec or EnvSpec(), environment, dict(svc.env),
                           version=rel.path.name)
        env = proc.clean_env()
        if rel.venv.is_dir():
            env["VIRTUAL_ENV"] = str(rel.venv)
            env["PATH"] = f"{rel.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env = node_runtime.on_path(env, rel.path)  # the carried Node.js, first
        env.update({k: renv.expand(v) for k, v in renv.values})
        run_spec: dict[str, object] = {
            "name": svc.name,
            "argv": [renv.expand(a) for a in svc.command],
            "cwd": str(cwd),
            "env": env,
            "log": str(rel.logs / f"{svc.name}.log"),
            "pidfile": str(_pidfile(rel, svc.name)),
            "secrets": renv.secrets(),  # masked in what the supervisor writes (0644 files)
        }
        if svc.user or user:
            run_spec["user"] = svc.user or user
        spec_path = rel.run / f"{svc.name}.json"
        atomic_write_bytes(spec_path, json.dumps(run_spec, indent=1).encode(), mode=0o600)
        proc.spawn([sys.executable, "-m", "bundler.install.supervise", str(spec_path)],
                   cwd=rel.path, env=proc.clean_env({"PYTHONPATH": _bundler_path()}),
                   log_path=rel.logs / "supervisor.log")
        _wait_for_pidfile(rel, svc.name)


def _bundler_path() -> str:
    import bundler

    return str(Path(bundler.__file__).resolve().parent.parent)


def _wait_for_pidfile(rel: ReleaseDir, name: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _read_pid(rel, name) is not None:
            return
        time.sleep(0.05)
    raise InstallError(f"service {name}: supervisor did not start",
                       hint=f"see {rel.logs / 'supervisor.log'}")


def stop(services: tuple[Service, ...], rel: ReleaseDir, timeout: float = 20) -> None:
    for svc in services:
        pid = _read_pid(rel, svc.name)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and start_time(pid) is not None:
            if _zombie(pid):
                break
            time.sleep(0.1)
        else:
            if start_time(pid) is not None:
                os.killpg(pid, signal.SIGKILL)
        _pidfile(rel, svc.name).unlink(missing_ok=True)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def states(services: tuple[Service, ...], rel: ReleaseDir) -> list[ServiceState]:
    """Running means the service itself is up, not just its supervisor: one that keeps
    exiting (or cannot start) is reported as failing, with why."""
    out = []
    for svc in services:
        pid = _read_pid(rel, svc.name)
        if pid is None or _zombie(pid):
            out.append(ServiceState(svc.name, False, None, "stopped"))
            continue
        try:
            st = json.loads((rel.run / f"{svc.name}.state").read_text())
        except (OSError, ValueError):
            st = {}
        child = st.get("child")
        restarts = int(st.get("restarts") or 0)
        if child is not None and start_time(int(child)) is not None:
            again = f", restarted {restarts} time(s)" if restarts else ""
            out.append(ServiceState(svc.name, True, pid, f"supervisor pid {pid}, "
                                                         f"pid {child}{again}"))
            continue
        why = (st.get("error") or (f"exited with {st.get('last_exit')}" if st else "starting"))
        out.append(ServiceState(svc.name, False, pid,
                                f"crash-looping: {why} ({restarts} restart(s); see "
                                f"{rel.logs / (svc.name + '.log')})" if st else why))
    return out


def failures(services: tuple[Service, ...], rel: ReleaseDir) -> list[str]:
    """One line per service that is not up, for an error line: the cause, not only the
    health check's symptom."""
    return [f"service {s.name} {s.detail}" for s in states(services, rel) if not s.running]
