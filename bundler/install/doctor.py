"""`bundle doctor`: can this host take this bundle (or keep running what it has)? A table of
checks, each ok / warn / fail with a one-line detail; nothing is changed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bundler.bundle.manifest import Manifest
from bundler.bundle.models import DatabaseSpec
from bundler.errors import BundlerError
from bundler.fsutil import free_bytes, human_bytes
from bundler.install import policy, python_env, runas
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.release import Release
from bundler.progname import cmd


@dataclass(frozen=True)
class Row:
    check: str
    status: str  # ok | warn | fail | skip
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "detail": self.detail}


def _guard(name: str, fn: Callable[[], Row]) -> Row:
    try:
        return fn()
    except BundlerError as exc:
        return Row(name, "fail", exc.message.splitlines()[0])


def _pending(layout: Layout) -> list[Row]:
    """An interrupted install that recovery has not settled: the next install or rollback
    acts on it first (and may need --restore-db / --keep-db)."""
    from bundler.install.recovery import pending
    from bundler.install.state import State

    state = State.open_readonly(layout.db)
    if state is None:
        return []
    try:
        stuck = pending(state)
    finally:
        state.close()
    if stuck is None:
        return []
    return [Row("pending recovery", "warn" if stuck.backup is None else "fail",
                f"{stuck.describe()}; `{cmd('recover', '--root', layout.root)}` settles it")]


def run(layout: Layout, m: Manifest | None, environment: str = "production") -> list[Row]:
    rows: list[Row] = []
    current = layout.current_version()
    rows.append(Row("install root", "ok" if layout.root.exists() else "warn",
                    f"{layout.root}: current release {current}" if current
                    else f"{layout.root}: nothing installed yet"))
    rows += _pending(layout)
    target = m
    if target is None and current is not None:
        target = ReleaseDir(layout.release(current)).manifest()
    if target is None:
        return rows
    release = Release.of(layout, target, environment)
    env = release.env()
    if m is not None:
        from bundler.install.installer import space_needed

        need, free = space_needed(m, layout.root), free_bytes(layout.root)
        rows.append(Row("disk space", "ok" if free >= need else "fail",
                        f"{human_bytes(need)} needed, {human_bytes(free)} free"))

        def platform() -> Row:
            assert m is not None
            policy.check_target(m.target)
            return Row("platform", "ok", m.target.platform)
        rows.append(_guard("platform", platform))
    if target.python_lock:
        exe = python_env.find_python(target.target)
        rows.append(Row(f"python {target.target.python}", "ok" if exe else "fail",
                        str(exe) if exe else "not found on this host"))
    if target.runtimes is not None:
        rows.append(Row("node/npm", "ok", f"carried in the bundle: node "
                                          f"{target.runtimes.node.version}, npm "
                                          f"{target.runtimes.npm.version} (the host's are not "
                                          "used)"))
    elif target.npm:
        def node() -> Row:
            assert target is not None
            return Row("node/npm", "ok", policy.check_node(target))
        rows.append(_guard("node/npm", node))
    if target.images or release.runtime.containers:
        def engine() -> Row:
            from bundler.engine import engine_client
            from bundler.errors import InstallError

            version = engine_client(InstallError).version().get("Version", "?")
            return Row("docker engine", "ok", f"version {version}")
        rows.append(_guard("docker engine", engine))
    if release.runtime.containers:
        def compose() -> Row:
            from bundler.install.compose_runtime import detect

            tool = detect(target.runtime.compose.tool if target.runtime.compose else None)
            return Row("compose", "ok", f"{' '.join(tool.argv)} {tool.version}")
        rows.append(_guard("compose", compose))
    if runas.names(target):
        def users() -> Row:
            assert target is not None
            try:
                found = runas.preflight(target, layout, env)
            except BundlerError as exc:
                return Row("user", "fail", f"{exc.message} (hint: {exc.hint})")
            return Row("user", "ok", ", ".join(f"{u.name} (uid {u.uid}, group "
                                               f"{u.group_name()})" for u in found))
        rows.append(_guard("user", users))
    missing = [v for v in target.runtime.env.required if not env.as_dict().get(v)]
    rows.append(Row("environment", "fail" if missing else "ok",
                    f"not set: {', '.join(missing)}" if missing
                    else f"{len(target.runtime.env.required)} required variable(s) set "
                         f"({environment})"))
    for spec in target.runtime.all_databases() if not missing else ():
        def db(spec: DatabaseSpec = spec) -> Row:
            from bundler.install import db as engines

            label = f"database {spec.name}" if spec.name else "database"
            conn = engines.Database(env.expand(spec.url), spec.compose_service, spec.name,
                                     runas.db_owner(target))
            if spec.compose_service:
                if current is None:
                    return Row(label, "ok", f"compose service {spec.compose_service}: "
                                            "started from the bundle by the install")
                run_in = Release.require(layout, current).service_exec(conn)
                engines.check(conn, env.as_dict(), exec_in_service=run_in)
                return Row(label, "ok", f"reachable in compose service "
                                        f"{spec.compose_service}: {conn.display}")
            engines.check(conn, env.as_dict())
            return Row(label, "ok", f"reachable: {conn.display}")
        rows.append(_guard(f"database {spec.name}" if spec.name else "database", db))
    # The ports (on a swarm: across the swarm) and, on a swarm, every node.
    rows += [Row(c.check, c.status, c.detail) for c in release.runtime.host_checks(env)]
    return rows
