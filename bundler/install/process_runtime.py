"""The process runtime: each service runs under its own detached supervisor."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler import proc
from bundler.bundle.models import EnvSpec, Service
from bundler.errors import InstallError
from bundler.fsutil import atomic_write_bytes
from bundler.install import node_runtime, runas, tails
from bundler.install.environ import release_env
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.supervise import start_time


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
        st = _read_state(rel, svc.name)
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


def _read_state(rel: ReleaseDir, name: str) -> dict[str, Any]:
    """The supervisor's state file ({} if absent or not the supervisor's: like the pidfile,
    only a file of ours, not a symlink, counts)."""
    try:
        fd = os.open(rel.run / f"{name}.state", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return {}
        data = json.loads(os.read(fd, 64 * 1024))
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else {}


def crashed(services: tuple[Service, ...], rel: ReleaseDir,
            since: float | None = None) -> list[str]:
    """Decisive evidence that services will not come up: one line per service that exited,
    or could not start, after `since` (wall clock; None: ever), or whose supervisor is gone,
    with the last lines it printed before that exit. Not redacted: see runtime.crashed.

    Any exit counts, a clean one too: a service is meant to run until stopped, and one that
    exits before its checks passed is restarted into the same fault (the 30 s a misspelt
    setting cost in a trial were the health retries waiting on a crash loop)."""
    out = []
    for svc in services:
        if _read_pid(rel, svc.name) is None:
            out.append(f"service {svc.name} is not running (its supervisor is gone; see "
                       f"{rel.logs / 'supervisor.log'})")
            continue
        st = _read_state(rel, svc.name)
        restarts = int(st.get("restarts") or 0)
        if not restarts:
            continue
        when = st.get("exited_at")
        if since is not None and (when is None or float(when) < since):
            continue  # before this start (or an older supervisor, which does not say)
        how = (f"could not start ({st['error']})" if st.get("error")
               else f"exited with {st.get('last_exit')}")
        said = last_output(rel, svc.name)
        out.append(f"service {svc.name} {how} before it was healthy "
                   f"({restarts} restart{'s' if restarts != 1 else ''})"
                   + (f": {said}" if said else f"; see {rel.logs / (svc.name + '.log')}"))
    return out


def last_output(rel: ReleaseDir, name: str) -> str:
    """The last lines service `name` printed before it last exited, on one line: its log up
    to the supervisor's latest line (the run that ended there), supervisor lines left out."""
    text = tails.read_log(rel.logs / f"{name}.log")
    lines = text.splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith("[supervisor] ")]
    if marks:
        lines = lines[:marks[-1]]
    return tails.condense("\n".join(x for x in lines if not x.startswith("[supervisor] ")))
