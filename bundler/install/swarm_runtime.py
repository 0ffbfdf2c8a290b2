"""The swarm runtime: a release's compose file deployed as a Docker Swarm stack.

Selected by `swarm.yaml` in the install root (the bundle is the same file a one-host compose
install takes): it names every node of the swarm and the endpoint of its engine,

    nodes:
      node1: unix:///var/run/docker.sock
      node2: ssh://deploy@10.0.0.12

The install runs on a manager (DOCKER_HOST, default the local socket, must be a manager).

Images reach every node by being loaded into each node's engine from the bundle, checked
against the signed Image IDs on each one (`images.load`), before anything starts. Not a
registry inside the cluster (Zarf's way): every node's engine would have to trust it
(`insecure-registries` or a CA on each daemon, then a restart), the registry's own image and
storage would have to be carried and kept running, and a node could only start a task while
that registry runs; loading needs nothing but each engine's API, which the install already
needs to check the node. The cost: the archive is streamed once per node.

Deploy: `docker stack deploy --resolve-image never` (never asks a registry) with the release's
compose files and, last, bundler's defaults for what a file leaves out: each service's
`update_config` and `rollback_config` get `failure_action: rollback` (a task that fails or
turns unhealthy within `monitor` rolls the service back) and `order: start-first` where the
service allows it; `stop-first` for a service that publishes host-mode ports (the new task
could not bind them beside the old one) or mounts a named volume (two writers on one volume),
with a `delay` of the service's monitor period after each replaced task, so that a new task
that fails stops the update before the next node's old task is stopped.
Waiting reads each service's `.UpdateStatus.State` (`docker service update` and the stack
deploy succeed even when the swarm then rolled the update back) and its tasks: every replica
running (a task with a healthcheck only runs once healthy). A rollback of any service fails
the install, and the installer puts the whole stack back to the previous release.

Nodes: before anything changes, every node must be `ready` in the swarm and its engine must
answer; else `NodeDownError` (exit 22) names the nodes, or with `--allow-degraded` the
install goes on with the nodes that are up (recorded in history) and accepts services that
run fewer replicas than asked while their other tasks wait for a node.

Ports: host-mode ports are tested; ingress-mode ports (the routing mesh) are deployed the
same way but need IPVS in the nodes' kernels, which the test machine lacks.
"""

from __future__ import annotations

import calendar
import contextlib
import copy
import functools
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bundler import proc
from bundler.engine import docker_sdk, engine_client, first_line, transport_errors
from bundler.errors import CommandError, InstallError, NodeDownError
from bundler.install.layout import Layout
from bundler.redact import redact, release_secrets
from bundler.ui import Log

_NO_NODE = "node.labels.bundler-no-node == true"
# Task states in which a container may still run (and write).
_LIVE_STATES = ("assigned", "accepted", "preparing", "ready", "starting", "running")
POLL = 0.5
DEPLOY_TIMEOUT = 300.0
FAILED_TASKS = 3  # failed tasks of one service in one deploy before it counts as crash-looping
_STACK_LABEL = "com.docker.stack.namespace"
# Final states of a failed update; "rollback_started" is waited out (a deploy of the previous
# release in the middle of the swarm's own rollback would only start another update).
_BAD_UPDATE = ("rollback_paused", "rollback_completed", "paused")


@dataclass(frozen=True)
class Endpoint:
    node: str  # the node's hostname, as `docker node ls` shows it
    engine: str  # where its engine answers (unix://, tcp://, ssh://)


@dataclass(frozen=True)
class NodeState:
    name: str
    role: str
    state: str  # the swarm's view: ready, down, unknown
    engine: str
    reachable: bool
    detail: str

    @property
    def up(self) -> bool:
        return self.state == "ready" and self.reachable


@dataclass(frozen=True)
class Stack:
    name: str
    files: tuple[Path, ...]
    workdir: Path
    env: Mapping[str, str]  # interpolation: the shared env file's values and the release's env


@dataclass(frozen=True)
class Replica:
    service: str
    node: str
    state: str  # the task's: running, starting, pending, failed, ...
    health: str | None  # the container's healthcheck status on its node, if it has one
    error: str

    @property
    def ok(self) -> bool:
        return self.state == "running" and self.health in (None, "healthy")


def configured(layout: Layout) -> bool:
    """A compose release on this root runs as a swarm stack."""
    return layout.swarm_file.is_file()


def endpoints(layout: Layout) -> tuple[Endpoint, ...]:
    path = layout.swarm_file
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InstallError(f"{path} cannot be read: {first_line(str(exc))}",
                           hint="it maps each node's hostname to its engine: "
                                "`nodes: {node1: unix:///var/run/docker.sock}`") from None
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, dict) or not nodes or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in nodes.items()):
        raise InstallError(f"{path}: `nodes:` must map each node's hostname to its engine "
                           "endpoint", hint="e.g. `nodes: {node1: unix:///var/run/docker.sock, "
                                            "node2: ssh://deploy@10.0.0.12}`")
    return tuple(Endpoint(k, v) for k, v in nodes.items())


def _manager() -> Any:
    """The manager's engine API (DOCKER_HOST, or the local socket)."""
    api = engine_client(InstallError).api
    info = api.info()
    if not (info.get("Swarm") or {}).get("ControlAvailable"):
        raise InstallError("this engine is not a swarm manager (swarm.yaml is in the install "
                           "root)", hint="run the install on a manager node, or point "
                                         "DOCKER_HOST at one (`docker node ls` works there)")
    return api


def _node_api(endpoint: str) -> Any:
    return engine_client(InstallError, endpoint).api


def nodes(layout: Layout) -> list[NodeState]:
    """Every node the swarm knows, with the endpoint swarm.yaml gives it and whether its
    engine answers there; a node only in swarm.yaml shows as unknown."""
    configured_nodes = {e.node: e.engine for e in endpoints(layout)}
    try:
        listed = _manager().nodes()
    except (docker_sdk().errors.DockerException, *transport_errors()) as exc:
        raise InstallError(f"cannot list the swarm's nodes: {first_line(str(exc))}",
                           hint="check `docker node ls` on this manager") from None
    out: list[NodeState] = []
    seen = set()
    for n in listed:
        name = str(n["Description"]["Hostname"])
        seen.add(name)
        state = str(n["Status"]["State"])
        role = str(n["Spec"]["Role"])
        engine = configured_nodes.get(name, "")
        if not engine:
            out.append(NodeState(name, role, state, "", False,
                                 f"no engine endpoint for {name} in swarm.yaml"))
            continue
        try:
            _node_api(engine).version()
        except InstallError as exc:
            out.append(NodeState(name, role, state, engine, False, exc.message))
            continue
        out.append(NodeState(name, role, state, engine, True,
                             f"{role}, {state}, engine answers at {engine}"))
    for name, engine in configured_nodes.items():
        if name not in seen:
            out.append(NodeState(name, "?", "unknown", engine, False,
                                 f"{name} is in swarm.yaml but not in the swarm"))
    return out


def preflight(layout: Layout, allow_degraded: bool) -> list[NodeState]:
    """Before anything changes: every node ready and its engine reachable, or (with
    `allow_degraded`) at least one. Returns the nodes that are down (empty when all are up)."""
    states = nodes(layout)
    down = [n for n in states if not n.up]
    if down and (not allow_degraded or len(down) == len(states)):
        raise NodeDownError("swarm node(s) down: " + "; ".join(
            f"{n.name} ({n.state}: {n.detail})" if n.detail else f"{n.name} ({n.state})"
            for n in down) + "; nothing was changed")
    return down


def load_images(layout: Layout, archive: Path, expected: Sequence[Any], log: Log) -> list[str]:
    """Load the bundle's images into every reachable node's engine, each checked against the
    signed Image IDs there. Returns the nodes loaded."""
    from bundler.install import images

    loaded = []
    for n in nodes(layout):
        if not n.up:
            log(f"{n.name}: skipped ({n.detail or n.state})")
            continue
        log(f"{n.name}: loading images into {n.engine}")
        images.load(archive, expected, log, client=engine_client(InstallError, n.engine))
        loaded.append(n.name)
    return loaded


def ensure_images(layout: Layout, archive: Path, expected: Sequence[Any], log: Log) -> None:
    """Before a (re)deploy: load the release's images into every reachable node whose engine
    lacks one of them (a node that was down at install time, or replaced since)."""
    from bundler.install import images

    errors = docker_sdk().errors
    for n in nodes(layout):
        if not n.up:
            continue
        api = _node_api(n.engine)
        missing = []
        for rec in expected:
            try:
                have = str(api.inspect_image(rec.ref)["Id"])
            except errors.ImageNotFound:
                have = ""
            if have != rec.image_id:
                missing.append(rec.ref)
        if missing:
            log(f"{n.name}: lacks {', '.join(missing)}; loading images into {n.engine}")
            images.load(archive, expected, log, client=engine_client(InstallError, n.engine))


# --- deploy ------------------------------------------------------------------------------------

def _read_files(stack: Stack) -> dict[str, Any]:
    """The services of the stack's files, merged shallowly per service (enough to see which
    keys a file sets)."""
    services: dict[str, Any] = {}
    for f in stack.files:
        try:
            data = yaml.safe_load(f.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InstallError(f"compose file {f.name} cannot be read: {first_line(str(exc))}",
                               hint="rebuild the bundle with a valid compose file") from None
        for name, spec in (data.get("services") or {}).items():
            merged = services.setdefault(name, {})
            for key, value in (spec or {}).items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
    return services


def _host_ports(spec: Mapping[str, Any]) -> bool:
    return any(isinstance(p, dict) and p.get("mode") == "host" for p in spec.get("ports") or ())


def _named_volume(spec: Mapping[str, Any]) -> bool:
    for v in spec.get("volumes") or ():
        if isinstance(v, dict):
            if v.get("type", "volume") == "volume" and v.get("source"):
                return True
        elif ":" in str(v) and not str(v).startswith(("/", ".", "~", "$")):
            return True
    return False


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MONITOR_DEFAULT = 5.0  # swarmkit's update monitor when a service sets none
MIN_DELAY = 1.0


def _seconds(value: object) -> float | None:
    """A compose duration ("2s", "1m30s", "500ms") in seconds; None if unreadable."""
    text = str(value).strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)


def _stop_first_delay(update: Mapping[str, Any]) -> str:
    """The pause after each replaced task of a stop-first update: the service's monitor
    period (at least 1 s). Without it the swarm may stop the next node's old task before it
    has counted the first new task's failure (its updater picks at random between the
    failure event and the next slot), leaving no replica serving until its rollback."""
    monitor = _seconds(update["monitor"]) if "monitor" in update else MONITOR_DEFAULT
    seconds = MONITOR_DEFAULT if monitor is None else max(monitor, MIN_DELAY)
    return f"{round(seconds * 1000)}ms"


def defaults(services: Mapping[str, Any]) -> dict[str, Any]:
    """The compose override bundler deploys last: update/rollback settings each service's
    files leave out (what they set wins)."""
    out: dict[str, Any] = {}
    for name, spec in services.items():
        deploy = spec.get("deploy") or {}
        order = "stop-first" if _host_ports(spec) or _named_volume(spec) else "start-first"
        update: dict[str, Any] = {"failure_action": "rollback", "order": order}
        own = deploy.get("update_config") or {}
        if own.get("order", order) == "stop-first":
            update["delay"] = _stop_first_delay(own)
        rollback = {"order": order}
        add: dict[str, Any] = {}
        missing = {k: v for k, v in update.items() if k not in (deploy.get("update_config") or {})}
        if missing:
            add["update_config"] = missing
        missing = {k: v for k, v in rollback.items()
                   if k not in (deploy.get("rollback_config") or {})}
        if missing:
            add["rollback_config"] = missing
        if add:
            out[name] = {"deploy": add}
    return {"version": "3.8", "services": out}


def process_env(values: Mapping[str, str]) -> dict[str, str]:
    """The environment `docker stack deploy` runs with (and interpolates the files with)."""
    passed = ("PATH", "HOME", "LANG", "LC_ALL", "DOCKER_HOST", "DOCKER_CONFIG",
              "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY", "DOCKER_CONTEXT")
    env = {k: v for k in passed if (v := os.environ.get(k)) is not None}
    env.update(values)
    env["PATH"] = proc.own_path()  # docker is bundler's tool: never a .env's PATH (proc)
    return env


def _env(stack: Stack) -> dict[str, str]:
    return process_env(stack.env)


def _redact(stack: Stack, text: str) -> str:
    return redact(text, release_secrets(dict(stack.env)))


def _docker(stack: Stack, *args: str, timeout: float = 300) -> proc.Result:
    result = proc.run(["docker", *args], cwd=stack.workdir, env=_env(stack), timeout=timeout,
                      check=False, what=f"docker {args[0]} {args[1]}")
    if result.returncode != 0:
        raise InstallError(f"docker {args[0]} {args[1]} of stack {stack.name} failed (exit "
                           f"{result.returncode}):\n" + _redact(stack, result.tail()),
                           hint="fix the compose file or the shared .env named above, then "
                                "install again")
    return result


@functools.cache
def _detach() -> tuple[str, ...]:
    """CLI 26 and later wait for convergence unless told not to (we wait ourselves, reading
    update states); older CLIs know no --detach and never wait."""
    result = proc.run(["docker", "stack", "deploy", "--help"], timeout=30, check=False,
                      what="docker stack deploy --help")
    return ("--detach=true",) if "--detach" in result.output else ()


def _services(api: Any, stack: str) -> list[dict[str, Any]]:
    return list(api.services(filters={"label": f"{_STACK_LABEL}={stack}"}))


def deploy(stack: Stack, log: Log, allow_degraded: bool = False,
           timeout: float = DEPLOY_TIMEOUT, only: tuple[str, ...] | None = None) -> None:
    """Deploy (or update in place) the stack and wait until it converged: every service
    updated (not rolled back) and all its replicas running, healthy where checked. `only`:
    those services alone, the others at 0 replicas (a database before a first migration)."""
    api = _manager()
    services = _read_files(stack)
    extra = defaults(services)
    if only is not None:
        for name, spec in services.items():
            if name in only:
                continue
            deploy_ = extra["services"].setdefault(name, {}).setdefault("deploy", {})
            if (spec.get("deploy") or {}).get("mode") == "global":
                # a global service has no replica count: a constraint no node meets
                deploy_["placement"] = {"constraints": [_NO_NODE]}
            else:
                deploy_["replicas"] = 0
    with tempfile.TemporaryDirectory(prefix="bundler-swarm-") as tmp:
        override = Path(tmp) / "bundler-defaults.yml"
        override.write_text(yaml.safe_dump(extra, sort_keys=True))
        override.chmod(0o600)
        args = ["stack", "deploy", "--resolve-image", "never", "--prune", *_detach()]
        for f in (*stack.files, override):
            args += ["-c", str(f)]
        started = time.time()
        log(f"docker stack deploy {stack.name} ({len(services)} service(s))")
        _docker(stack, *args, stack.name)
    _wait(api, stack, started, log, allow_degraded, timeout)


def _stamp(text: object) -> float:
    """An engine timestamp (UTC, RFC 3339) in epoch seconds, whole seconds; 0 if unreadable."""
    with contextlib.suppress(ValueError):
        return float(calendar.timegm(time.strptime(str(text)[:19], "%Y-%m-%dT%H:%M:%S")))
    return 0.0


def _task_time(task: Mapping[str, Any]) -> float:
    return _stamp(task.get("CreatedAt", ""))


def _causes(failed: Sequence[Mapping[str, Any]], most: int = 3) -> str:
    """The distinct errors of failed tasks, newest first: one task's error alone can be a
    side effect (a network or node hiccup during the rollback) and hide the real cause."""
    seen: list[str] = []
    for task in failed:
        status = task.get("Status") or {}
        text = " ".join(str(status.get("Err") or status.get("Message", "")).split())[:200]
        if text and text not in seen:
            seen.append(text)
    return "; ".join(seen[:most]) + (f"; and {len(seen) - most} more" if len(seen) > most
                                     else "")


def _verdict(api: Any, svc: Mapping[str, Any], since: float, degraded: bool
             ) -> tuple[bool, str]:
    """(converged, why not) for one service; raises when it failed for good."""
    name = str(svc["Spec"]["Name"])
    update = svc.get("UpdateStatus") or {}
    # Only an update this deploy began counts: an earlier one's "rollback_completed" stays
    # on the service until the next update (a deploy that changes nothing starts none).
    state = str(update.get("State", "")) if _stamp(update.get("StartedAt")) >= since - 1 else ""
    tasks = api.tasks(filters={"service": str(svc["ID"])})
    failed = sorted((t for t in tasks if t["Status"]["State"] in ("failed", "rejected")
                     and _task_time(t) >= since - 1), key=_task_time, reverse=True)
    why = _causes(failed)
    if state in _BAD_UPDATE:
        verb = "rolled back" if state.startswith("rollback") else "paused"
        raise InstallError(f"swarm service {name}: the swarm {verb} its update"
                           + (f" (a new task failed: {why})" if why else
                              f" ({update.get('Message', '')})"),
                           hint=f"`docker service ps {name} --no-trunc` shows the failed tasks")
    if state in ("updating", "rollback_started"):
        return False, f"{name}: {state.replace('_', ' ')}"
    mode = svc["Spec"].get("Mode", {})
    if len(failed) >= FAILED_TASKS:
        raise InstallError(f"swarm service {name} keeps failing ({len(failed)} tasks): {why}",
                           hint=f"`docker service ps {name} --no-trunc` and `docker service "
                                f"logs {name}` show why")
    wanted = [t for t in tasks if t.get("DesiredState") == "running"]
    running = [t for t in wanted if t["Status"]["State"] == "running"]
    replicas = (int(mode["Replicated"].get("Replicas", 1)) if "Replicated" in mode
                else len(wanted))  # global: one per eligible node
    if len(running) >= replicas and len(running) == len(wanted):
        return True, ""
    if degraded and running and all(t["Status"]["State"] in ("running", "pending")
                                    for t in wanted):
        return True, ""
    return False, f"{name}: {len(running)}/{replicas} running"


def _wait(api: Any, stack: Stack, since: float, log: Log, degraded: bool,
          timeout: float) -> None:
    began = time.monotonic()
    deadline = began + timeout
    pending = ["no service yet"]
    while time.monotonic() < deadline:
        services = _services(api, stack.name)
        pending = []
        for svc in services:
            done, why = _verdict(api, svc, since, degraded)
            if not done:
                pending.append(why)
        if services and not pending:
            log(f"stack {stack.name}: {len(services)} service(s) converged in "
                f"{time.monotonic() - began:.1f}s")
            return
        time.sleep(POLL)
    raise InstallError(f"stack {stack.name} did not converge in {timeout:.0f}s: "
                       + "; ".join(pending),
                       hint="`docker stack ps` on the manager shows where tasks wait")


def remove(stack: Stack, log: Log, timeout: float = 120) -> None:
    """`docker stack rm`, then wait until its services are gone (named volumes stay)."""
    api = _manager()
    _remove_oneoffs(api, stack.name)
    if not _services(api, stack.name):
        return
    log(f"docker stack rm {stack.name}")
    _docker(stack, "stack", "rm", stack.name)
    deadline = time.monotonic() + timeout
    while _services(api, stack.name) and time.monotonic() < deadline:
        time.sleep(POLL)


def scale_down(stack: Stack, log: Log, keep: Sequence[str] = ()) -> None:
    """Stop every service of the stack but `keep` (no writers during a database backup or
    restore): replicated ones scaled to 0, global ones constrained to no node; the next
    deploy of a release's files sets both back."""
    api = _manager()
    replicated: list[str] = []
    global_: list[str] = []
    for svc in _services(api, stack.name):
        name = str(svc["Spec"]["Name"])
        if name.removeprefix(stack.name + "_") in keep:
            continue
        (global_ if "Global" in svc["Spec"].get("Mode", {}) else replicated).append(name)
    if replicated:
        log(f"scaling to 0: {', '.join(replicated)}")
        _docker(stack, "service", "scale", "--detach", *[f"{n}=0" for n in replicated])
    for name in global_:
        log(f"stopping {name} (global: constrained to no node)")
        _docker(stack, "service", "update", "--detach", "--constraint-add",
                _NO_NODE.replace(" ", ""), name)
    _wait_stopped(api, stack, [*replicated, *global_])


def _wait_stopped(api: Any, stack: Stack, names: Sequence[str], timeout: float = 120) -> None:
    """Until no task of `names` runs on any node: the caller backs up or restores the database
    next, and a writer still running would write past the backup."""
    deadline = time.monotonic() + timeout
    while True:
        running = sorted({name for name in names for t in api.tasks(filters={"service": name})
                          if t.get("Status", {}).get("State") in _LIVE_STATES})
        if not running:
            return
        if time.monotonic() >= deadline:
            raise InstallError(f"stack {stack.name}: {', '.join(running)} still running "
                               f"{timeout:.0f}s after being stopped",
                               hint="check the nodes (docker node ps) and install again; "
                                    "nothing was backed up or restored")
        time.sleep(0.5)


# --- one-off containers (migrations with `service:`) ------------------------------------------

ONEOFF_LABEL = "bundler.oneoff"
_DONE_STATES = ("complete", "failed", "rejected", "shutdown", "orphaned", "remove")


def _remove_oneoffs(api: Any, stack: str) -> None:
    """One-off jobs of the stack an install killed mid-way left behind (not the stack's own
    services: `docker stack rm` and `--prune` do not see them)."""
    for old in api.services(filters={"label": f"{ONEOFF_LABEL}={stack}"}):
        with contextlib.suppress(docker_sdk().errors.NotFound):
            api.remove_service(old["ID"])


def _live(api: Any, stack: Stack) -> tuple[str, ...]:
    """The stack's services with a task meant to run now (short names)."""
    out = []
    for svc in _services(api, stack.name):
        name = str(svc["Spec"]["Name"])
        if any(t.get("DesiredState") == "running" for t in api.tasks(filters={"service": name})):
            out.append(name.removeprefix(stack.name + "_"))
    return tuple(out)


def job_spec(service_spec: Mapping[str, Any], argv: Sequence[str], env: Mapping[str, str],
             node_id: str) -> dict[str, Any]:
    """A swarm job running `argv` once as a task of the deployed service: its image,
    entrypoint, environment, mounts, secrets and networks (what `compose run` takes from the
    service), `argv` for its command, `env` added, on node `node_id`, never restarted, no
    healthcheck, no ports and no DNS alias of the service."""
    template = copy.deepcopy(dict(service_spec["TaskTemplate"]))
    container = template["ContainerSpec"]
    container["Args"] = list(argv)
    # replaced, not appended: with a name twice, glibc's getenv finds the first
    container["Env"] = [*(e for e in container.get("Env") or () if e.split("=")[0] not in env),
                        *(f"{k}={v}" for k, v in sorted(env.items()))]
    container["Healthcheck"] = {"Test": ["NONE"]}
    template["RestartPolicy"] = {"Condition": "none", "MaxAttempts": 0}
    placement = {k: v for k, v in (template.get("Placement") or {}).items()
                 if k != "MaxReplicas"}
    placement["Constraints"] = [f"node.id=={node_id}"]
    template["Placement"] = placement
    template["Networks"] = [{"Target": n["Target"]} for n in template.get("Networks") or ()]
    template.pop("ForceUpdate", None)
    return template


def run_oneoff(stack: Stack, log: Log, service: str, argv: Sequence[str],
               env: Mapping[str, str], timeout: float) -> proc.Result:
    """`compose_runtime.run_oneoff` for a stack (a stack has no `run`): a swarm job of the
    service as THIS release defines it, on the manager, once. The release is deployed first
    with only what runs now (the databases) kept running and everything else at 0 replicas,
    so the service's definition is the new release's; the release's own deploy scales it up
    after the migrations. The job is removed afterwards, also on failure or Ctrl+C; one a
    killed install left behind is removed by the next one or by `remove`. A non-zero exit
    is returned, not raised; the output is redacted."""
    api = _manager()
    _remove_oneoffs(api, stack.name)
    if service not in _read_files(stack):
        raise InstallError(f"stack {stack.name} has no service {service}",
                           hint="a migration's `service` must name a service of the release's "
                                "compose files")
    deploy(stack, log, only=_live(api, stack))
    spec = api.inspect_service(f"{stack.name}_{service}")["Spec"]
    template = job_spec(spec, argv, env, str(api.info()["Swarm"]["NodeID"]))
    what = f"{argv[0]} in a one-off task of swarm service {service}"
    log(f"{what} (a swarm job on the manager)")
    job = api.create_service(template, name=f"{stack.name}_{service}-oneoff-{os.urandom(3).hex()}",
                             labels={ONEOFF_LABEL: stack.name},
                             mode={"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}})
    try:
        deadline = time.monotonic() + timeout
        while True:
            done = [t for t in api.tasks(filters={"service": job["ID"]})
                    if t["Status"]["State"] in _DONE_STATES]
            if done:
                break
            if time.monotonic() >= deadline:
                raise CommandError(f"{what}: timed out after {timeout:.0f}s (the job was "
                                   "stopped and removed)",
                                   hint="run the migration's command in a task of the service "
                                        "by hand (docker exec) to see where it hangs")
            time.sleep(POLL)
        status = done[0]["Status"]
        container = (status.get("ContainerStatus") or {}).get("ContainerID")
        if not container:  # never started: a mount, image or placement the node refused
            raise CommandError(f"{what}: the task was {status['State']}: "
                               + _redact(stack, str(status.get("Err") or status.get("Message"))),
                               hint="check the service's definition and `docker node ps`")
        try:
            output = api.logs(container, stdout=True, stderr=True).decode(errors="replace")
        except docker_sdk().errors.APIError as exc:
            output = f"(its output cannot be read: {first_line(str(exc))})"
        code = 0 if status["State"] == "complete" else int(
            (status.get("ContainerStatus") or {}).get("ExitCode") or 1)
        return proc.Result(tuple(argv), code, _redact(stack, output))
    finally:
        with contextlib.suppress(Exception):
            api.remove_service(job["ID"])


# --- what runs where ---------------------------------------------------------------------------

def replicas(layout: Layout, stack: str) -> list[Replica]:
    """Each service's tasks that should run, with the node they are on and, where the node's
    engine answers, the container's health."""
    api = _manager()
    hostnames = {str(n["ID"]): str(n["Description"]["Hostname"]) for n in api.nodes()}
    engines = {e.node: e.engine for e in endpoints(layout)}
    out = []
    for svc in _services(api, stack):
        name = str(svc["Spec"]["Name"]).removeprefix(stack + "_")
        for t in api.tasks(filters={"service": str(svc["ID"]), "desired-state": "running"}):
            node = hostnames.get(str(t.get("NodeID", "")), "-")
            health = None
            container = (t["Status"].get("ContainerStatus") or {}).get("ContainerID")
            if container and node in engines:
                with contextlib.suppress(InstallError, docker_sdk().errors.DockerException,
                                         *transport_errors()):
                    state = _node_api(engines[node]).inspect_container(container)["State"]
                    health = (state.get("Health") or {}).get("Status")
            out.append(Replica(name, node, str(t["Status"]["State"]), health,
                               str(t["Status"].get("Err", ""))))
    return sorted(out, key=lambda r: (r.service, r.node))


def crashed(stack: Stack, since: float | None = None) -> list[str]:
    """Decisive evidence that the stack will not come up: a service whose newest task failed
    (or was rejected), or with FAILED_TASKS failed tasks, after `since` (epoch seconds; None:
    ever), with their errors, redacted. One failure the swarm replaced with a running task is
    none: `deploy` tolerates it too. (`deploy` already waits out a failing update; this is for
    a task that fails later, while the release's own checks retry.) An engine that does not
    answer: InstallError."""
    api = _manager()
    out = []
    try:
        services = [(svc, api.tasks(filters={"service": str(svc["ID"])}))
                    for svc in _services(api, stack.name)]
    except (docker_sdk().errors.DockerException, *transport_errors()) as exc:
        raise InstallError(f"reading the tasks of stack {stack.name} failed: "
                           f"{first_line(str(exc))}") from None
    for svc, tasks in services:
        name = str(svc["Spec"]["Name"]).removeprefix(stack.name + "_")
        recent = sorted((t for t in tasks if since is None or _task_time(t) >= since - 1),
                        key=_task_time, reverse=True)
        failed = [t for t in recent if t["Status"]["State"] in ("failed", "rejected")]
        if failed and (len(failed) >= FAILED_TASKS or recent[0] is failed[0]):
            why = _causes(failed)
            out.append(_redact(stack, f"swarm service {name}: {len(failed)} task(s) failed"
                                      + (f": {why}" if why else "")))
    return out


def logs_tail(stack: Stack, lines: int) -> list[tuple[str, str]]:
    """Each service's last `lines` log lines, from all its tasks on every node (the manager
    gathers them, as `docker service logs` does), secrets redacted."""
    api = _manager()
    out = []
    for svc in sorted(_services(api, stack.name), key=lambda s: str(s["Spec"]["Name"])):
        name = str(svc["Spec"]["Name"]).removeprefix(stack.name + "_")
        try:
            raw = b"".join(api.service_logs(str(svc["ID"]), stdout=True, stderr=True,
                                            tail=lines, timestamps=False))
            text = raw.decode(errors="replace") or "(no output)"
        except (docker_sdk().errors.DockerException, *transport_errors()) as exc:
            text = f"(the swarm did not give this service's logs: {first_line(str(exc))})"
        out.append((name, _redact(stack, text)))
    return out


def service_container(layout: Layout, stack: str, service: str) -> tuple[str, str] | None:
    """(engine endpoint, container id) of one running task of `service`, or None."""
    api = _manager()
    hostnames = {str(n["ID"]): str(n["Description"]["Hostname"]) for n in api.nodes()}
    engines = {e.node: e.engine for e in endpoints(layout)}
    for svc in api.services(filters={"name": f"{stack}_{service}"}):
        if str(svc["Spec"]["Name"]) != f"{stack}_{service}":
            continue
        for t in api.tasks(filters={"service": str(svc["ID"]), "desired-state": "running"}):
            container = (t["Status"].get("ContainerStatus") or {}).get("ContainerID")
            node = hostnames.get(str(t.get("NodeID", "")), "")
            if t["Status"]["State"] == "running" and container and node in engines:
                return engines[node], str(container)
    return None


@dataclass(frozen=True)
class InTask:
    """`compose_runtime.InService` for a stack: commands inside a running task of `service`,
    through the engine of the node it runs on (the database's tools, run once from the
    manager)."""

    layout: Layout
    stack: Stack
    service: str

    def __call__(self, argv: Sequence[str], stdin_path: Path | None,
                 stdout_path: Path | None, *, env: Mapping[str, str],
                 timeout: float) -> proc.Result:
        from bundler.install import compose_runtime as cr

        stack, service = self.stack, self.service
        found = service_container(self.layout, stack.name, service)
        if found is None:
            raise InstallError(f"swarm service {service} of stack {stack.name} is not running",
                               hint=f"`docker service ps {stack.name}_{service}` shows why")
        engine, container = found
        return cr.exec_result(container, cr.Exec(argv, env, stdin_path, stdout_path, timeout),
                              what=f"{argv[0]} in swarm service {service}",
                              scrub=lambda text: _redact(stack, text),
                              hint="check that the node's engine answers and the task runs",
                              api=_node_api(engine))


# --- doctor ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def _node_checks(n: NodeState, images: Sequence[Any], arch: str | None,
                 need: int) -> list[Check]:
    from bundler.fsutil import free_bytes, human_bytes

    name = f"node {n.name}"
    if not n.up:
        return [Check(name, "fail", f"{n.state}: {n.detail}")]
    api = _node_api(n.engine)
    info = api.info()
    out = [Check(name, "ok", f"{n.role}, {n.state}, engine {info.get('ServerVersion', '?')} "
                             f"at {n.engine}")]
    have_arch = str(info.get("Architecture", "?"))
    present = 0
    for rec in images:
        with contextlib.suppress(docker_sdk().errors.ImageNotFound):
            present += str(api.inspect_image(rec.ref)["Id"]) == rec.image_id
    loadable = arch is None or have_arch == arch
    out.append(Check(f"{name} images", "ok" if loadable else "fail",
                     f"{present} of {len(images)} of the release's images present"
                     + ("" if present == len(images) else " (the install loads the others)")
                     + (f"; engine is {have_arch}" if loadable else
                        f"; engine is {have_arch}, the bundle is for {arch}")))
    data_root = Path(str(info.get("DockerRootDir", "")))
    if n.engine.startswith("unix://") and data_root.is_dir():
        free = free_bytes(data_root)
        out.append(Check(f"{name} disk", "ok" if free >= need else "fail",
                         f"{human_bytes(need)} needed, {human_bytes(free)} free in {data_root}"))
    else:
        out.append(Check(f"{name} disk", "warn", f"free space in {data_root} on {n.name} is "
                                                 "not visible from here (a remote engine): "
                                                 f"{human_bytes(need)} needed"))
    return out


def doctor(layout: Layout, stack: str, ports: Sequence[int], images: Sequence[Any],
           arch: str | None, need: int) -> list[Check]:
    """Every node: engine reachable, the release's images present or loadable (its CPU), the
    engine's free space; and the release's published ports not taken by another service."""
    out: list[Check] = []
    for n in nodes(layout):
        try:
            out += _node_checks(n, images, arch, need)
        except (InstallError, docker_sdk().errors.DockerException, *transport_errors()) as exc:
            out.append(Check(f"node {n.name}", "fail", first_line(str(exc))))
    taken: dict[int, str] = {}
    for svc in _manager().services():
        name = str(svc["Spec"]["Name"])
        if name.startswith(stack + "_"):
            continue
        for p in (svc.get("Endpoint") or {}).get("Ports") or ():
            if p.get("PublishedPort"):
                taken[int(p["PublishedPort"])] = name
    for port in sorted(ports):
        if port in taken:
            out.append(Check(f"port {port}", "fail", f"published by swarm service "
                                                     f"{taken[port]}, not by this product"))
        else:
            out.append(Check(f"port {port}", "ok", "not published by any other swarm service"))
    return out
