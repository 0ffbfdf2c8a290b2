"""What a target host must have before a bundle installs there, and what provides it: the one
home of these facts (shared by both sides: imports neither).

`bundle export` lists them in INSTALL.txt, before the install command; the installer's
preflight names the same account command and client packages in its hints when one is missing;
docs/target.md's "What the target needs, per kind of bundle" table says it for people (a test
keeps it naming the same packages).
"""

from __future__ import annotations

from dataclasses import dataclass

from bundler.bundle.manifest import Manifest
from bundler.bundle.models import DATABASE_KINDS, DatabaseSpec, DbKind

MARIADB_CLIENT = "mariadb-client"   # Debian's MySQL/MariaDB client tools (mariadb, mariadb-dump)
DOCKER_ENGINE = "docker.io"         # Debian's Docker engine
NODE_PACKAGES = "nodejs npm"        # Debian's Node.js and npm


def useradd(name: str) -> str:
    """The command that creates the account a release runs as."""
    return f"useradd --system {name}"


def postgres_client(major: int | None = None) -> str:
    """Debian's package of the PostgreSQL client tools for a server's major version."""
    return f"postgresql-client-{major if major is not None else '<server major version>'}"


def accounts(m: Manifest) -> list[str]:
    """Every account release `m` runs something as, in order of first use."""
    found = [m.runtime.user] + [s.user for s in m.runtime.services]
    return list(dict.fromkeys(n for n in found if n))


@dataclass(frozen=True)
class Need:
    what: str          # what the host must have, and what for
    command: str = ""  # the one command that provides it, when there is one


def _db_kind(m: Manifest, db: DatabaseSpec) -> DbKind | None:
    """Its kind, or None when only the target's environment will tell: the declared kind, else
    a literal URL's scheme, else a health check of that URL."""
    if db.kind:
        return DbKind(db.kind)
    kind = DbKind.of_url(db.url)
    if kind is not None:
        return kind
    checked = {DbKind(c.kind) for c in m.runtime.health if c.target == db.url
               and c.kind in DATABASE_KINDS}
    return checked.pop() if len(checked) == 1 else None


def client_tools(kind: DbKind) -> str | None:
    """The client tools a host needs to back up (and restore, migrate) a database of `kind`
    that does not run in a compose service (None: bundler carries what it needs)."""
    return {DbKind.POSTGRES: "the PostgreSQL client tools (pg_dump, pg_restore, psql) of the "
                             f"server's major version (Debian: {postgres_client()})",
            DbKind.MYSQL: f"the MariaDB/MySQL client tools (Debian: {MARIADB_CLIENT})",
            DbKind.SQLITE: None}[kind]


# Health check kinds whose probe runs the engine's client tools (the postgres check connects
# through the Python driver bundler carries).
_PROBE_NEEDS_TOOLS = (DbKind.MYSQL,)


def _database_needs(m: Manifest) -> list[Need]:
    out = []
    for db in m.runtime.all_databases():
        if db.compose_service:
            continue  # its tools run inside the service
        label = f"database {db.name} ({db.url})" if db.name else f"the database at {db.url}"
        kind = _db_kind(m, db)
        tools = client_tools(kind) if kind is not None else None
        if tools is not None:
            out.append(Need(f"{tools}, to back up {label}"))
        elif kind is None:
            out.append(Need(f"to back up {label}: " + "; ".join(
                f"if it is {k.product}, {t}" for k in DbKind if (t := client_tools(k)))))
    for kind in _PROBE_NEEDS_TOOLS:
        tools = client_tools(kind)
        if tools and not any(n.what.startswith(tools) for n in out) and any(
                c.kind == kind for c in m.runtime.health):
            out.append(Need(f"{tools}, for its {kind} health check"))
    return out


def host_needs(m: Manifest) -> tuple[Need, ...]:
    """What the host must have before `install` (the kit's python3 aside), in the order an
    operator sets them up."""
    out = [Need(f"the account {name}, which the release runs as", useradd(name))
           for name in accounts(m)]
    if m.python_lock:
        out.append(Need(f"CPython {m.target.python} (python{m.target.python} or python3 on "
                        "PATH), for the release's Python environment"))
    if m.images or m.runtime.compose is not None:
        has = " and ".join(w for w, on in (("images", bool(m.images)),
                                            ("compose project", m.runtime.compose is not None))
                           if on)
        out.append(Need(f"a running Docker engine (Debian: {DOCKER_ENGINE}), for its {has}"))
    if m.npm and m.runtimes is None:
        versions = ", ".join(v for v in (m.target.node and f"Node.js {m.target.node}",
                                        m.target.npm and f"npm {m.target.npm}") if v)
        out.append(Need(f"Node.js and npm on PATH ({versions or 'any version'}; Debian: "
                        f"{NODE_PACKAGES}), for its npm projects"))
    return tuple(out + _database_needs(m))
