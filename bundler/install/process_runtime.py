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
from bundler.install.environ import release_env
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.supervise import start_time
from bundler.models import EnvSpec, Service


@dataclass(frozen=True)
class ServiceState:
    name: str
    running: bool
    pid: int | None


def expand(text: str, layout: Layout, rel: ReleaseDir) -> str:
    return (text.replace("{release}", str(rel.path)).replace("{files}", str(rel.files))
            .replace("{venv}", str(rel.venv)).replace("{root}", str(layout.root)))


def _pidfile(rel: ReleaseDir, name: str) -> Path:
    return rel.run / f"{name}.pid"


def _read_pid(rel: ReleaseDir, name: str) -> int | None:
    """The supervisor's pid, if the pidfile names a process that is still that supervisor."""
    try:
        pid_s, started = _pidfile(rel, name).read_text().split()
    except (OSError, ValueError):
        return None
    pid = int(pid_s)
    return pid if start_time(pid) == started else None


def start(services: tuple[Service, ...], layout: Layout, rel: ReleaseDir,
          spec: EnvSpec | None = None, environment: str = "production") -> None:
    rel.run.mkdir(parents=True, exist_ok=True)
    for svc in services:
        if _read_pid(rel, svc.name) is not None:
            continue
        cwd = rel.files / svc.cwd if svc.cwd != "." else rel.files
        if not cwd.is_dir():
            raise InstallError(f"service {svc.name}: working directory {cwd} does not exist",
                               hint="check `cwd` against the `files` dest in the profile")
        renv = release_env(layout, spec or EnvSpec(), environment,
                           {k: expand(v, layout, rel) for k, v in svc.env})
        env = proc.clean_env()
        if rel.venv.is_dir():
            env["VIRTUAL_ENV"] = str(rel.venv)
            env["PATH"] = f"{rel.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.update({k: renv.expand(v) for k, v in renv.values})
        run_spec = {
            "name": svc.name,
            "argv": [renv.expand(expand(a, layout, rel)) for a in svc.command],
            "cwd": str(cwd),
            "env": env,
            "log": str(rel.logs / f"{svc.name}.log"),
            "pidfile": str(_pidfile(rel, svc.name)),
        }
        spec_path = rel.run / f"{svc.name}.json"
        atomic_write_bytes(spec_path, json.dumps(run_spec, indent=1).encode(), mode=0o600)
        rel.logs.mkdir(parents=True, exist_ok=True)
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
    out = []
    for svc in services:
        pid = _read_pid(rel, svc.name)
        out.append(ServiceState(svc.name, pid is not None and not _zombie(pid), pid))
    return out
