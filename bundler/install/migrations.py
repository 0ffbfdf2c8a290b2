"""Database migrations for `bundle install`: alembic, raw SQL files with a ledger, or a command.

`run` applies a release's migrations in order and stops at the first failure with a
`MigrationError` naming the migration, the file (or revision) and the database's own error.
The installer backs the database up before (db.backup) and restores it on failure. What
differs per kind of database (the ledger, the lock, the file's owner) is the engine's
(bundler/install/db/); this module is the same for all of them.

- One run at a time per database: the engine's migration lock (PostgreSQL: a session advisory
  lock, which restores take too; MySQL: GET_LOCK; SQLite: a flock on the file) is held for the
  whole run, every kind of migration included, so two installers never migrate the same
  database concurrently (the second waits, up to LOCK_WAIT, then fails with LockedError).
- kind "sql": every `*.sql` in `path` (relative to the release's files dir), in lexical order
  of file name. A ledger table `bundler_migrations(migration, file, sha256, applied_at)`
  records what was applied (the engine's `Ledger`). Each file runs in ONE transaction together
  with its ledger row: a failing file leaves nothing of itself behind (MySQL: but the DDL it
  ran, see db.mysql), and files before it stay applied. An applied file whose sha256 no
  longer matches its ledger row (edited after it was applied) is refused before anything
  runs. A file must not hold BEGIN/COMMIT/ROLLBACK of its own (refused: it
  would commit half a file), nor statements that cannot run in a transaction block (CREATE
  INDEX CONCURRENTLY: the database says so, and the file is rolled back).
- kind "alembic": `<venv>/bin/alembic upgrade head` with cwd = `path` (the directory holding
  alembic.ini). The database URL is passed in the environment as DATABASE_URL, exactly as the
  profile gives it (the URL the application uses); the project's env.py must read it (e.g.
  `config.set_main_option("sqlalchemy.url", os.environ["DATABASE_URL"])`). Never as
  `-x url=...`: argv is visible to every user of the host. Newly applied revisions are read
  from alembic's "Running upgrade A -> B" log lines (alembic.ini's default logging config).
- kind "command": e.g. ("npx", "prisma", "migrate", "deploy"), run with cwd = `path` inside
  the files dir (default: the files dir) and DATABASE_URL set the same way. Prisma's
  "Applying migration `X`" lines are reported.
  With `service`, the command runs instead as a one-off container of that compose service
  (the NEW release's image and configuration: `compose run --rm --no-deps`), through the
  caller's `in_service`; its environment is the service's own (its DATABASE_URL is the one
  that works inside the compose network), plus the migration's env pairs. On a swarm it is
  a job of that service on the manager (`swarm_runtime.run_oneoff`).

For alembic and command, `<venv>/bin` (when a venv is given) is put first on PATH, and the
migration's own env pairs are applied last. Output quoted in errors has the password scrubbed.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bundler import proc
from bundler.errors import CommandError, MigrationError
from bundler.faults import fault_point
from bundler.install import db as engines
from bundler.install import fsowner, runas
from bundler.install.db import LEDGER, Database, Engine, Ledger, ServiceExec

__all__ = ["LEDGER", "Migration", "MigrationResult", "ServiceRun", "SqlFile", "pending", "run"]

# Seconds to wait for another installer's migration run before giving up.
LOCK_WAIT = 600
COMMAND_TIMEOUT = 3600.0

Log = Callable[[str], None]

_TXN_CONTROL = re.compile(
    r"^[ \t]*(BEGIN|START[ \t]+TRANSACTION|COMMIT|ROLLBACK|END[ \t]+TRANSACTION)"
    r"([ \t]+(WORK|TRANSACTION|ISOLATION[^;\n]*))?[ \t]*;",
    re.IGNORECASE | re.MULTILINE)
_ALEMBIC_STEP = re.compile(r"Running upgrade ([^\s,]*) -> ([^\s,]+)(?:, (.*))?")
_PRISMA_STEP = re.compile(r"Applying migration `([^`]+)`")
# Prisma 6's summary instead: "The following migration(s) have been applied:" and a tree
# whose directory lines ("  └─ 20240115000000_init/") name them
_PRISMA_APPLIED = "have been applied:"
_PRISMA_TREE = re.compile(r"^\s*└─ ([^/\s]+)/\s*$", re.M)
# which migration failed: the JS schema engine's trace, or the native engine's P3018 text
_PRISMA_FAILED = re.compile(r'with migration_name="([^"]+)"|^Migration name: (\S+)', re.M)
_ALEMBIC_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (upgrade|downgrade)')
_EXC_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Failure)\b.*)$")


@dataclass(frozen=True)
class Migration:
    name: str
    kind: str  # "alembic" | "sql" | "command"
    path: str | None = None
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    service: str | None = None
    user: str | None = None  # alembic / host command: run as this account (see runas)


class ServiceRun(Protocol):
    """Runs `argv` as a one-off container of compose `service` with `env` added; returns the
    finished command (a non-zero exit is returned, not raised)."""

    def __call__(self, service: str, argv: Sequence[str], env: Mapping[str, str],
                 timeout: float) -> proc.Result: ...


@dataclass(frozen=True)
class MigrationResult:
    name: str
    kind: str
    applied: tuple[str, ...]  # sql files / alembic revisions / prisma migrations newly applied
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "applied": list(self.applied),
                "detail": self.detail}


@dataclass(frozen=True)
class SqlFile:
    name: str
    path: Path
    sha256: str
    text: str


# --------------------------------------------------------------------------- entry points

def run(migrations: Sequence[Migration], db: Database, files_dir: Path, venv: Path | None,
        env: Mapping[str, str], log: Log,
        in_service: ServiceRun | None = None,
        db_exec: ServiceExec | None = None) -> list[MigrationResult]:
    """Apply `migrations` in order, holding the database's migration lock for the whole run.
    `in_service`: how to run a command migration that names a compose service; `db_exec`:
    how to run the database's client inside its own compose service (MySQL)."""
    if not migrations:
        return []
    names = [m.name for m in migrations]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MigrationError(f"two migrations are named {dup!r}",
                             hint="give every migration its own name: the ledger keys on it")
    sql_sets = {m.name: _sql_files(m, files_dir) for m in migrations if m.kind == "sql"}
    for m in migrations:
        _validate(m, files_dir, venv)
    engine = engines.engine(db)
    _let_accounts_write(migrations, engine, db)  # a file's directory, before the ledger

    def under_lock() -> list[MigrationResult]:
        with engine.migration_session(db, env, log, ledger=bool(sql_sets), lock_wait=LOCK_WAIT,
                                      run_in=db_exec) as ledger:
            _let_accounts_write(migrations, engine, db)  # and the file, now that it exists
            # Under the lock, before anything runs: no applied file may have been edited since.
            for m in migrations:
                if m.kind == "sql":
                    _refuse_edited(m, sql_sets[m.name], ledger.read(m.name))
            return _run_each(
                migrations, lambda m: _apply_sql(ledger, m, sql_sets[m.name], files_dir, log),
                db, files_dir, venv, env, log, in_service)

    # SQLite: with the file access of the account that can write its directory (fsowner).
    return fsowner.call(engine.file_owner(db), under_lock)


def _run_each(migrations: Sequence[Migration],
              apply_sql: Callable[[Migration], MigrationResult], db: Database,
              files_dir: Path, venv: Path | None, env: Mapping[str, str], log: Log,
              in_service: ServiceRun | None) -> list[MigrationResult]:
    """Run each migration in order, its SQL files through `apply_sql` (the engine's ledger)."""
    results: list[MigrationResult] = []
    for m in migrations:
        started = time.monotonic()
        if m.kind == "sql":
            result = apply_sql(m)
        elif m.kind == "alembic":
            result = _alembic(m, db, files_dir, venv, env, log)
        else:
            result = _command(m, db, files_dir, venv, env, log, in_service)
        log(f"migration {m.name} ({m.kind}): {result.detail} "
            f"[{time.monotonic() - started:.1f}s]")
        results.append(result)
    return results


def _apply_sql(ledger: Ledger, m: Migration, files: Sequence[SqlFile], files_dir: Path,
               log: Log) -> MigrationResult:
    """The files of `m` not in the ledger yet, in order, each with its ledger row."""
    applied = ledger.read(m.name)
    _refuse_edited(m, files, applied)
    todo = [f for f in files if f.name not in applied]
    last_applied = max(applied, default="")
    for f in todo:
        if f.name < last_applied:
            log(f"migration {m.name}: {f.name} sorts before the already applied "
                f"{last_applied}; applying it now")
        log(f"migration {m.name}: applying {f.name}")
        ledger.apply(m.name, f.name, f.sha256, f.text, files_dir)
        fault_point("migrate:applied")  # crash tests: a half-migrated database
    return _sql_result(m, files, tuple(f.name for f in todo))


def _sql_result(m: Migration, files: Sequence[SqlFile], applied: tuple[str, ...]
                ) -> MigrationResult:
    return MigrationResult(
        m.name, m.kind, applied,
        f"applied {len(applied)} file(s), {len(files) - len(applied)} already applied"
        if applied else f"up to date ({len(files)} file(s) applied before)")


def pending(migrations: Sequence[Migration], db: Database, files_dir: Path,
            venv: Path | None, env: Mapping[str, str]) -> list[MigrationResult]:
    """What `run` would apply, for reports; reads the database, changes nothing.

    sql: the files not in the ledger (an edited applied file raises MigrationError, as `run`
    would). alembic: `alembic current` vs `alembic heads`. command: unknown in advance.
    """
    out: list[MigrationResult] = []
    for m in migrations:
        _validate(m, files_dir, venv)
        if m.kind == "sql":
            files = _sql_files(m, files_dir)
            applied = engines.engine(db).read_ledger(db, env, m.name)
            _refuse_edited(m, files, applied)
            todo = tuple(f.name for f in files if f.name not in applied)
            out.append(MigrationResult(m.name, m.kind, todo, f"{len(todo)} file(s) pending"))
        elif m.kind == "alembic":
            current = _alembic_call(m, db, files_dir, venv, env, ["current"])
            heads = _alembic_call(m, db, files_dir, venv, env, ["heads"])
            cur = _revisions(current.output)
            head = _revisions(heads.output)
            todo = () if set(head) <= set(cur) else tuple(head)
            out.append(MigrationResult(m.name, m.kind, todo,
                                       f"current {', '.join(cur) or 'none'}, "
                                       f"head {', '.join(head) or 'none'}"))
        else:
            out.append(MigrationResult(m.name, m.kind, (),
                                       "runs on every install; the command decides"))
    return out


# --------------------------------------------------------------------------- checks

def _validate(m: Migration, files_dir: Path, venv: Path | None) -> None:
    if m.kind == "sql":
        return
    if m.kind == "alembic":
        ini = _within(files_dir, m, m.path or ".") / "alembic.ini"
        if not ini.is_file():
            raise MigrationError(f"migration {m.name}: no alembic.ini in {m.path or '.'}",
                                 hint="set the migration's path to the directory holding "
                                      "alembic.ini, relative to the release's files")
        return
    if m.kind == "command":
        if not m.command:
            raise MigrationError(f"migration {m.name}: no command given",
                                 hint="give the migration a command, e.g. "
                                      "[npx, prisma, migrate, deploy]")
        return
    raise MigrationError(f"migration {m.name}: unknown kind {m.kind!r}",
                         hint="use one of: alembic, sql, command")


def _within(files_dir: Path, m: Migration, rel: str) -> Path:
    base = files_dir.resolve()
    path = (base / rel).resolve()
    if path != base and base not in path.parents:
        raise MigrationError(f"migration {m.name}: path {rel!r} leaves the release's files",
                             hint="use a path relative to the release's files directory")
    return path


def _sql_files(m: Migration, files_dir: Path) -> list[SqlFile]:
    directory = _within(files_dir, m, m.path or ".")
    if not directory.is_dir():
        raise MigrationError(f"migration {m.name}: {m.path!r} is not a directory of .sql files",
                             hint="set the migration's path to the directory holding the "
                                  "*.sql files, relative to the release's files")
    files = []
    for path in sorted(directory.glob("*.sql"), key=lambda p: p.name):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise MigrationError(f"migration {m.name}: {path.name} is not UTF-8 text",
                                 hint="save the file as UTF-8") from None
        control = _TXN_CONTROL.search(text)
        if control:
            line = text.count("\n", 0, control.start()) + 1
            raise MigrationError(
                f"migration {m.name}: {path.name} line {line}: "
                f"{control.group(0).strip()!r} controls the transaction itself",
                hint="remove BEGIN/COMMIT/ROLLBACK from the file: bundler runs each file in "
                     "one transaction together with its ledger row")
        files.append(SqlFile(path.name, path, hashlib.sha256(data).hexdigest(), text))
    return files


def _refuse_edited(m: Migration, files: Sequence[SqlFile], applied: Mapping[str, str]) -> None:
    for f in files:
        recorded = applied.get(f.name)
        if recorded is not None and recorded != f.sha256:
            raise MigrationError(
                f"migration {m.name}: {f.name} was changed after it was applied "
                f"(ledger sha256 {recorded[:12]}…, file {f.sha256[:12]}…); nothing was applied",
                hint="never edit an applied migration: restore the file as it was and put the "
                     "change in a new file that sorts after it")


# --------------------------------------------------------------------------- alembic, command

def _let_accounts_write(migrations: Sequence[Migration], engine: Engine,
                        db: Database) -> None:
    """A database that is a file (SQLite): writable by the accounts alembic and command
    migrations run as."""
    if engine.owned_file(db) is None:
        return
    for m in migrations:
        if m.kind != "sql" and not m.service and m.user:
            engine.let_write(db, _account(m))


def _account(m: Migration) -> proc.RunAs | None:
    """The account an alembic or host command migration runs as (None: as bundler)."""
    return runas.maybe(m.user, MigrationError)


def _prisma_tree(output: str) -> tuple[str, ...]:
    _, found, tree = output.partition(_PRISMA_APPLIED)
    return tuple(_PRISMA_TREE.findall(tree)) if found else ()


def _prisma_failure(output: str) -> str | None:
    """"Prisma migration X failed: <error>, <its detail>" when Prisma names the migration."""
    found = _PRISMA_FAILED.search(output)
    if found is None:
        return None
    lines = output.splitlines()
    error = next((i for i, ln in enumerate(lines) if ln.startswith("Error: ")), None)
    detail = ""
    if error is not None:
        detail = lines[error].removeprefix("Error: ").strip()
        after = lines[error + 1].strip().rstrip(":") if error + 1 < len(lines) else ""
        if after and not after[0].isdigit():
            detail += f": {after}"
    return f"Prisma migration {found[1] or found[2]} failed" + (f": {detail}" if detail else "")


def _child_env(m: Migration, db: Database, venv: Path | None,
               env: Mapping[str, str]) -> dict[str, str]:
    child = proc.clean_env(env)
    child["DATABASE_URL"] = db.url
    for name, value in engines.engine(db).client_env(db).items():
        child.setdefault(name, value)
    if venv is not None:
        child["PATH"] = f"{venv / 'bin'}{os.pathsep}{child.get('PATH', os.defpath)}"
        child["VIRTUAL_ENV"] = str(venv)
    child.update(dict(m.env))
    return child


def _scrub(db: Database, text: str) -> str:
    return engines.engine(db).scrub(db, text)


def _error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    for line in reversed(lines):
        match = _EXC_LINE.match(line)
        if match:
            return match.group(1).strip()
    for line in lines:
        if re.search(r"\berror\b", line, re.IGNORECASE):
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def _tail(db: Database, result: proc.Result) -> str:
    return _scrub(db, result.tail())


def _alembic_call(m: Migration, db: Database, files_dir: Path, venv: Path | None,
                  env: Mapping[str, str], args: Sequence[str],
                  timeout: float = COMMAND_TIMEOUT) -> proc.Result:
    cwd = _within(files_dir, m, m.path or ".")
    exe = str(venv / "bin" / "alembic") if venv is not None else "alembic"
    try:
        return proc.run([exe, *args], cwd=cwd, env=_child_env(m, db, venv, env),
                        timeout=timeout, check=False, what=f"migration {m.name}",
                        user=_account(m), release_command=True)
    except CommandError as exc:
        raise MigrationError(f"migration {m.name}: {_scrub(db, exc.message)}",
                             hint="install alembic into the release's Python environment "
                                  "(list it in the profile's requirements)") from None


def _revisions(output: str) -> list[str]:
    found = []
    for line in output.splitlines():
        match = re.match(r"^([0-9A-Za-z_]+)(?: \(.*\))?\s*$", line.strip())
        if match and not line.startswith(("INFO", "WARN")):
            found.append(match.group(1))
    return found


def _alembic(m: Migration, db: Database, files_dir: Path, venv: Path | None,
             env: Mapping[str, str], log: Log) -> MigrationResult:
    log(f"migration {m.name}: alembic upgrade head in {m.path or '.'}")
    result = _alembic_call(m, db, files_dir, venv, env, ["upgrade", "head"])
    steps = _ALEMBIC_STEP.findall(result.output)
    applied = tuple(new for _, new, _ in steps)
    if result.returncode != 0:
        where = ""
        frames = _ALEMBIC_FRAME.findall(result.output)
        if steps:
            _, new, message = steps[-1]
            where = f" revision {new}" + (f" ({message})" if message else "")
        if frames:
            where += f" in {Path(frames[-1][0]).name} line {frames[-1][1]}"
        raise MigrationError(
            f"migration {m.name}: alembic upgrade failed{where}: "
            f"{_scrub(db, _error_line(result.output))}\n{_tail(db, result)}")
    if applied:
        detail = f"alembic applied {', '.join(applied)}"
    elif "Running upgrade" in result.output or "Context impl" in result.output:
        detail = "alembic: already at head"  # alembic logged, and had nothing to run
    else:
        # env.py did not configure logging (no fileConfig): say where it stands, not a guess
        now = _revisions(_alembic_call(m, db, files_dir, venv, env, ["current"]).output)
        detail = (f"alembic at {', '.join(now) or 'no revision'} (its env.py logs nothing: "
                  "which revisions this run applied is not known)")
    return MigrationResult(m.name, m.kind, applied, detail)


def _command(m: Migration, db: Database, files_dir: Path, venv: Path | None,
             env: Mapping[str, str], log: Log,
             in_service: ServiceRun | None = None) -> MigrationResult:
    where = f" in compose service {m.service}" if m.service else ""
    log(f"migration {m.name}: running {' '.join(m.command)}{where}")
    try:
        if m.service:
            if in_service is None:
                raise MigrationError(f"migration {m.name} names compose service {m.service} "
                                     "but the release has no compose project",
                                     hint="add compose: to the profile")
            result = in_service(m.service, m.command, dict(m.env), COMMAND_TIMEOUT)
        else:
            result = proc.run(list(m.command), cwd=_within(files_dir, m, m.path or "."),
                              env=_child_env(m, db, venv, env), timeout=COMMAND_TIMEOUT,
                              check=False, what=f"migration {m.name}", user=_account(m),
                              release_command=True)
    except CommandError as exc:
        raise MigrationError(f"migration {m.name}: {_scrub(db, exc.message)}",
                             hint=exc.hint) from None
    if result.returncode != 0:
        raise MigrationError(
            f"migration {m.name}: {m.command[0]}{where} failed (exit {result.returncode}): "
            f"{_scrub(db, _prisma_failure(result.output) or _error_line(result.output))}"
            f"\n{_tail(db, result)}")
    applied = tuple(_PRISMA_STEP.findall(result.output)) or _prisma_tree(result.output)
    last = engines.first_line("\n".join(reversed(result.output.strip().splitlines())))
    detail = (f"applied {', '.join(applied)}" if applied
              else f"{m.command[0]} ok" + (f": {_scrub(db, last)}" if last else ""))
    return MigrationResult(m.name, m.kind, applied, detail)
