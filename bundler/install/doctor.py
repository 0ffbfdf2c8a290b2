"""`bundle doctor`: can this host take this bundle (or keep running what it has)? A table of
checks, each ok / warn / fail with a one-line detail; nothing is changed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bundler.bundle.manifest import Manifest
from bundler.bundle.models import DatabaseSpec
from bundler.errors import BundlerError
from bundler.fsutil import free_bytes, human_bytes
from bundler.install import environ, policy, ports, python_env, runas, swarm_runtime
from bundler.install.layout import Layout, ReleaseDir
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


def _ports(layout: Layout, m: Manifest, env: environ.ReleaseEnv) -> list[Row]:
    """The local ports the release serves, and who holds each one now."""
    current = layout.current_version()
    rows = []
    for port, why in sorted(ports.release_ports(m, env).items()):
        held = ports.holders(port)
        if not held:
            rows.append(Row(f"port {port}", "ok", f"free ({why})"))
        elif all(ports.ours(h, layout, current) for h in held):
            rows.append(Row(f"port {port}", "ok", f"in use by the current release {current}, "
                                                  f"which an install replaces ({why})"))
        else:
            rows.append(Row(f"port {port}", "fail", f"held by {', '.join(map(str, held))}, "
                                                    f"not by this product ({why})"))
    return rows


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
    env = environ.release_env(layout, target.runtime.env, environment,
                              version=target.version)
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
    if target.images or target.runtime.compose:
        def engine() -> Row:
            from bundler.engine import engine_client
            from bundler.errors import InstallError

            version = engine_client(InstallError).version().get("Version", "?")
            return Row("docker engine", "ok", f"version {version}")
        rows.append(_guard("docker engine", engine))
    if target.runtime.compose:
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
            from bundler.install import database

            label = f"database {spec.name}" if spec.name else "database"
            conn = database.Database(env.expand(spec.url), spec.compose_service, spec.name,
                                     runas.db_owner(target))
            if spec.compose_service:
                if current is None:
                    return Row(label, "ok", f"compose service {spec.compose_service}: "
                                            "started from the bundle by the install")
                from bundler.install import runtime

                run_in = runtime.service_exec(layout, current, conn)
                database.check(conn, env.as_dict(), exec_in_service=run_in)
                return Row(label, "ok", f"reachable in compose service "
                                        f"{spec.compose_service}: {conn.display}")
            database.check(conn, env.as_dict())
            return Row(label, "ok", f"reachable: {conn.display}")
        rows.append(_guard(f"database {spec.name}" if spec.name else "database", db))
    if target.runtime.compose and swarm_runtime.configured(layout.root):
        rows += _swarm(layout, target, env)
        return rows
    # With a current release its own ports are expected to be busy (it serves them, and an
    # install replaces it); without one, a busy port belongs to someone else.
    rows += _ports(layout, target, env)
    return rows


def _swarm(layout: Layout, m: Manifest, env: environ.ReleaseEnv) -> list[Row]:
    """A swarm (swarm.yaml in the root): every node, and the ports across the swarm."""
    from bundler.bundle.imagearchive import ImageRecord
    from bundler.install.compose_runtime import project_name

    assert m.runtime.compose is not None
    try:
        checks = swarm_runtime.doctor(
            layout.root, m.runtime.compose.project or project_name(m.name, layout.root),
            sorted(ports.release_ports(m, env)),
            [ImageRecord(i.ref, i.image_id) for i in m.images],
            m.target.tag.arch if m.images else None,
            m.payload_size)
    except BundlerError as exc:
        return [Row("swarm", "fail", exc.message.splitlines()[0])]
    return [Row(c.name, c.status, c.detail) for c in checks]
