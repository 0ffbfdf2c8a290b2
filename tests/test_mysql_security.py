"""MySQL/MariaDB engine against hostile input (issue 17): object names chosen by whoever holds
the application's database account must never make the client (run as root) execute a command,
and the parts of a database URL must never add options to the client's option file or argv.

The unmarked tests are fast (no server); the `mariadb` ones run a real throwaway MariaDB, the
application's own account creating the hostile objects."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from bundler.errors import InstallError, MigrationError
from bundler.install import db as engines
from bundler.install.db import Database, mysql
from tests.helpers import Project, bundle, bundle_argv, free_port, offline, tree_snapshot
from tests.mariadb_fixtures import APP_PASSWORD, MariaDb, start_server

ENV: dict[str, str] = {}
SECRET = "pw-Secr3t"


def q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


# --------------------------------------------------------------------------- URL parts (fast)

@pytest.mark.parametrize(("url", "part"), [
    (f"mysql://app%0Atee%3D%2Ftmp%2Fx:{SECRET}@localhost/db", "user"),
    (f"mysql://app%0D:{SECRET}@localhost/db", "user"),
    (f"mysql://app:{SECRET}%0Atee=%2Ftmp%2Fx@localhost/db", "password"),
    (f"mysql://app@localhost/db?password={SECRET}%7F", "password"),
    (f"mysql://app:{SECRET}@local\x01host/db", "host"),
    (f"mysql://app:{SECRET}@localhost/db?unix_socket=/run/s%0Ainit-command=x", "socket"),
    (f"mysql://app:{SECRET}@localhost/db?socket=/run/s%09", "socket"),
    (f"mysql://app:{SECRET}@localhost/d%0Ab", "database name"),
    (f"mysql://app:{SECRET}@localhost/db%00", "database name"),
])
def test_a_control_character_in_a_url_part_is_refused(url: str, part: str) -> None:
    with pytest.raises(InstallError) as err:
        mysql.target(Database(url), ENV)
    assert type(err.value) is InstallError and err.value.exit_code == InstallError.exit_code
    assert f"its {part} holds a control character" in err.value.message
    assert part in err.value.hint
    shown = err.value.message + err.value.hint
    assert SECRET not in shown and "\n" not in shown and "\x01" not in shown


@pytest.mark.parametrize("name", ["--foo", "-x", "--defaults-file=%2Fetc%2Fpasswd"])
def test_a_database_name_starting_with_a_dash_is_refused(name: str) -> None:
    with pytest.raises(InstallError) as err:
        mysql.target(Database(f"mysql://app:{SECRET}@localhost/{name}"), ENV)
    assert type(err.value) is InstallError and err.value.exit_code == InstallError.exit_code
    assert "database name starts with '-'" in err.value.message
    assert SECRET not in err.value.message + err.value.hint


@pytest.mark.parametrize(("url", "why"), [
    (f"mysql://app:{SECRET}#x@localhost/db", "holds an '@' after its host"),
    (f"mysql://app:{SECRET}?x@localhost/db", "holds an '@' after its host"),
    (f"mysql://app%0Atee=/tmp/x:{SECRET}@localhost/db", "holds an '@' after its host"),
    (f"mysql://app:{SECRET}@localhost:33o6/db", "its port is not a number"),
    (f"mysql://app:{SECRET}@localhost/db/x", "its path holds more than a database name"),
    (f"mysql://app:{SECRET}@localhost/", "names no database"),
])
def test_a_malformed_url_is_refused_in_one_line_without_its_password(url: str, why: str) -> None:
    with pytest.raises(InstallError) as err:
        mysql.target(Database(url), ENV)
    assert why in err.value.message and err.value.exit_code == InstallError.exit_code
    assert SECRET not in err.value.message + err.value.hint
    assert "\n" not in err.value.message + err.value.hint


def test_the_health_check_reports_a_refused_url_instead_of_raising() -> None:
    why = mysql.ping(f"mysql://app%0Atee=x:{SECRET}@localhost/db", ENV, 1.0)
    assert "its user holds a control character" in why and SECRET not in why


def test_option_file_values_are_quoted_and_the_database_is_in_the_client_group() -> None:
    t = mysql.MyTarget('u"s#r\\', 'p"w#\\x\' y', None, None, "/run/my sock#1", 'd b"#')
    with mysql._defaults(t) as opt:
        path = Path(opt.removeprefix("--defaults-file="))
        assert path.stat().st_mode & 0o777 == 0o600
        lines = path.read_text().splitlines()
    assert not path.exists()
    assert lines == ["[client]", 'user="u\\"s#r\\\\"', 'password="p\\"w#\\\\x\' y"',
                     'socket="/run/my sock#1"', "protocol=socket",
                     "[mysql]", f"connect-timeout={mysql.CONNECT_TIMEOUT}",
                     'database="d b\\"#"']


def test_names_come_back_from_hex_only() -> None:
    assert mysql.unhex("6109620A60", "x") == "a\tb\n`"
    for bad in ("61 62", "6", "zz", "a\tb", "61\n"):
        with pytest.raises(InstallError, match="not the hex column"):
            mysql.unhex(bad, "listing")
    assert mysql.quote_name("a`b\n\\! x") == "`a``b\n\\! x`"


def test_a_client_without_sandbox_gets_binary_mode_and_no_sandbox_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import bundler.proc as proc

    answers = {"with": "  --sandbox   Disallow commands that access the file system",
               "without": "  --binary-mode   By default, ASCII '\\0' is disallowed"}
    for kind, expected in (("with", (["--binary-mode", "--sandbox"], mysql.SANDBOX_LINE)),
                           ("without", (["--binary-mode"], ""))):
        def fake(db: Database, args: list[str], env: object, text: str = answers[kind],
                 **kw: object) -> proc.Result:
            assert args == ["--help"]
            return proc.Result(("mariadb", "--help"), 0, text)

        monkeypatch.setattr(mysql, "run_client", fake)
        assert mysql.script_flags(Database("mysql://u@h/db"), ENV, None) == expected


# --------------------------------------------------------------------------- hostile objects

class Attack:
    """Objects named to break out of a naive client script: each name, if ever fed to the
    client outside a quoted identifier (or split at its tab or newline), runs
    `touch /tmp/PWNED-<random>-N` through the client's shell escape."""

    def __init__(self) -> None:
        self.tag = f"/tmp/PWNED-{uuid.uuid4().hex[:8]}"
        cmd = [f"\\! touch {self.tag}-{n} #" for n in range(8)]
        # In a raw listing split on tabs, `tab_table`'s line loses its closing backtick: the
        # first backtick of any later line then closes the name and a command follows.
        self.tab_table = "tab\there"
        self.mixed_table = "m\tix\ned`"                # a tab, a newline and a backtick
        self.bq_table = f"bq`;{cmd[0]}"               # a backtick and a semicolon
        self.nl_table = f"x\n{cmd[1]}\ny"             # a command on a line of its own
        self.proc = cmd[2]                            # `\! touch ...` itself
        self.nl_proc = f"p\n{cmd[3]}"
        self.func = f"f`;\n{cmd[4]}"
        self.view = f"v\n{cmd[5]}"
        self.trigger = f"tr\n{cmd[6]}"
        self.sequence = f"s\n{cmd[7]}"

    def markers(self) -> list[Path]:
        return sorted(Path("/tmp").glob(Path(self.tag).name + "*"))

    def create_sql(self) -> str:
        return (f"CREATE TABLE {q(self.tab_table)} (id int PRIMARY KEY, body text);\n"
                f"INSERT INTO {q(self.tab_table)} VALUES (1, 'one\\ttab'), (2, 'two\\nnl');\n"
                f"CREATE TABLE {q(self.bq_table)} (id int PRIMARY KEY, "
                f"ref int, FOREIGN KEY (ref) REFERENCES {q(self.tab_table)} (id));\n"
                f"INSERT INTO {q(self.bq_table)} VALUES (10, 1);\n"
                f"CREATE TABLE {q(self.nl_table)} (v varchar(20));\n"
                f"CREATE TABLE {q(self.mixed_table)} (n int);\n"
                f"INSERT INTO {q(self.mixed_table)} VALUES (42);\n"
                f"INSERT INTO {q(self.nl_table)} VALUES ('a'), ('b');\n"
                f"CREATE PROCEDURE {q(self.proc)} () SELECT 1;\n"
                f"CREATE PROCEDURE {q(self.nl_proc)} () SELECT 2;\n"
                f"CREATE FUNCTION {q(self.func)} () RETURNS int DETERMINISTIC RETURN 7;\n"
                f"CREATE VIEW {q(self.view)} AS SELECT id FROM {q(self.tab_table)};\n"
                f"CREATE TRIGGER {q(self.trigger)} BEFORE INSERT ON {q(self.nl_table)} "
                "FOR EACH ROW SET NEW.v = UPPER(NEW.v);\n"
                f"CREATE SEQUENCE {q(self.sequence)};\n"
                f"SELECT NEXTVAL({q(self.sequence)});\n")

    def cleanup(self) -> None:
        for p in self.markers():
            p.unlink()


def as_app(server: MariaDb, dbname: str, sql: str, user: str = "app",
           password: str = APP_PASSWORD) -> None:
    """`sql` run by the application's own account (not root), with the client in text mode:
    quoted names are quoted there."""
    done = subprocess.run(["mariadb", "--no-defaults", "-S", str(server.socket), f"-u{user}",
                           f"-p{password}", "--batch", dbname], input=sql, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def attack() -> Iterator[Attack]:
    a = Attack()
    yield a
    a.cleanup()


@pytest.fixture
def appdb(mariadb: MariaDb) -> str:
    return mariadb.create_database()


def log_to(lines: list[str]) -> mysql.Log:
    return lines.append


@pytest.mark.mariadb
def test_restore_of_hostile_names_runs_nothing_and_equals_the_dump(
        mariadb: MariaDb, appdb: str, attack: Attack, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    db = Database(mariadb.url(appdb))
    as_app(mariadb, appdb, attack.create_sql())
    names = mariadb.sql("SELECT HEX(table_name) FROM information_schema.tables WHERE "
                        f"table_schema = '{appdb}' ORDER BY 1").split()
    assert sorted(bytes.fromhex(n).decode() for n in names) == sorted(
        [attack.tab_table, attack.mixed_table, attack.bq_table, attack.nl_table, attack.view,
         attack.sequence])
    before = mariadb.dump(appdb)
    lines: list[str] = []
    saved = engines.backup(db, tmp_path / "backups", ENV, log_to(lines))
    # The app keeps writing, renames, drops and adds hostile objects of its own.
    added = "new`\t" + attack.proc
    as_app(mariadb, appdb, f"INSERT INTO {q(attack.tab_table)} VALUES (3, 'three');\n"
                           f"DROP VIEW {q(attack.view)};\n"
                           f"DROP PROCEDURE {q(attack.proc)};\n"
                           f"CREATE TABLE {q(added)} (x int);\n"
                           f"CREATE PROCEDURE {q(attack.view)} () SELECT 3;\n"
                           f"UPDATE {q(attack.nl_table)} SET v = 'changed';\n")
    assert mariadb.dump(appdb) != before

    # Every script the client reads starts with the sandbox line, under --sandbox.
    scripts: list[tuple[list[str], bytes]] = []
    real = mysql.run_client

    def spy(db: Database, args: list[str], env: object, **kw: object) -> object:
        stdin = kw.get("stdin")
        if isinstance(stdin, Path) and "--batch" not in args:
            scripts.append((list(args), stdin.read_bytes()))
        return real(db, args, env, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(mysql, "run_client", spy)
    engines.restore(db, saved, ENV, log_to(lines))
    assert attack.markers() == []
    assert mariadb.dump(appdb) == before  # every object dropped and recreated, rows equal
    assert len(scripts) == 1
    args, script = scripts[0]
    assert args == ["--binary-mode", "--sandbox"]
    assert script.startswith(mysql.SANDBOX_LINE.encode())
    # ... and a second restore over the restored database is as harmless.
    engines.restore(db, saved, ENV, log_to(lines))
    assert attack.markers() == [] and mariadb.dump(appdb) == before


@pytest.mark.mariadb
def test_a_dump_holding_client_commands_runs_none_of_them(
        mariadb: MariaDb, appdb: str, attack: Attack, tmp_path: Path) -> None:
    """Defence in depth: a dump that holds client commands (as an older dump tool could write
    for hostile names, CVE-2024-21096) is replayed sandboxed: the restore fails, runs none."""
    db = Database(mariadb.url(appdb))
    for n, line in enumerate((f"\\! touch {attack.tag}-d", f"system touch {attack.tag}-s",
                              f"\\T {attack.tag}-t")):
        dump = tmp_path / f"evil{n}.sql"
        dump.write_text(f"CREATE TABLE t{n} (x int);\n{line}\nSELECT 1;\n-- Dump completed\n")
        with pytest.raises(InstallError, match="restoring"):
            mysql.restore(db, dump, tmp_path, ENV, log_to([]))
    assert attack.markers() == []


@pytest.mark.mariadb
def test_the_old_raw_listing_would_have_run_the_command(
        mariadb: MariaDb, appdb: str, attack: Attack, tmp_path: Path) -> None:
    """The attack is real: the listing the restore used to feed back to the client, run the
    way it was, executes the procedure's name (so the test above can fail)."""
    as_app(mariadb, appdb, attack.create_sql())
    old = ("SELECT CONCAT('DROP TABLE IF EXISTS `', REPLACE(table_name, '`', '``'), '`;') "
           f"FROM information_schema.tables WHERE table_schema = '{appdb}' UNION ALL SELECT "
           "CONCAT('DROP ', routine_type, ' IF EXISTS `', REPLACE(routine_name, '`', '``'), "
           f"'`;') FROM information_schema.routines WHERE routine_schema = '{appdb}'")
    raw = subprocess.run(["mariadb", "--no-defaults", "-S", str(mariadb.socket), "-uroot",
                          "-N", "-B", "-r", "-e", old], capture_output=True, text=True,
                         check=True).stdout
    drops = "\n".join(ln.split("\t")[0] for ln in raw.splitlines() if ln)
    # (-f: go on after the SQL errors the broken lines also make)
    subprocess.run(["mariadb", "--no-defaults", "-S", str(mariadb.socket), "-uroot", "-f",
                    appdb], input=drops, text=True, capture_output=True, timeout=60)
    assert attack.markers() != []


@pytest.mark.mariadb
def test_fingerprint_of_hostile_names_is_stable_and_sees_every_change(
        mariadb: MariaDb, appdb: str, attack: Attack) -> None:
    db = Database(mariadb.url(appdb))
    as_app(mariadb, appdb, attack.create_sql())
    first = engines.fingerprint(db, ENV)
    assert engines.fingerprint(db, ENV) == first
    seen = {first}
    for change in (f"UPDATE {q(attack.tab_table)} SET body = 'x' WHERE id = 2",
                   f"INSERT INTO {q(attack.nl_table)} VALUES ('c')",
                   f"UPDATE {q(attack.bq_table)} SET ref = NULL",
                   f"CREATE TABLE {q(attack.proc + 'z')} (x int)",
                   f"DROP VIEW {q(attack.view)}"):
        as_app(mariadb, appdb, change + ";\n")
        value = engines.fingerprint(db, ENV)
        assert value not in seen, change
        assert engines.fingerprint(db, ENV) == value
        seen.add(value)
    assert attack.markers() == []


@pytest.mark.mariadb
def test_ledger_reads_hostile_file_names_and_refuses_client_commands(
        mariadb: MariaDb, appdb: str, attack: Attack, tmp_path: Path) -> None:
    db = Database(mariadb.url(appdb))
    ledger = mysql.Ledger(db, ENV, None)
    ledger.create()
    odd = "00\t1\n'`\\x;.sql"
    ledger.apply("m'\\", odd, "a" * 64, "CREATE TABLE t1 (x int);\r\nINSERT INTO t1 VALUES (1);",
                 tmp_path)
    ledger.apply("m'\\", "002.sql", "b" * 64, "INSERT INTO t1 VALUES (2);", tmp_path)
    assert ledger.read("m'\\") == {odd: "a" * 64, "002.sql": "b" * 64}
    assert ledger.read("m") == {}
    mode = mariadb.sql("SELECT @@GLOBAL.sql_mode").strip()
    mariadb.sql("SET GLOBAL sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
    try:
        assert mysql.Ledger(db, ENV, None).read("m'\\") == {odd: "a" * 64,
                                                              "002.sql": "b" * 64}
    finally:
        mariadb.sql(f"SET GLOBAL sql_mode = '{mode}'")
    # A migration file is fed to the client sandboxed: no shell escape, no `system`.
    for n, text in enumerate((f"\\! touch {attack.tag}-m\nSELECT 1;",
                              f"system touch {attack.tag}-s\nSELECT 1;")):
        with pytest.raises(MigrationError):
            ledger.apply("evil", f"{n}.sql", "c" * 64, text, tmp_path)
    assert attack.markers() == []
    assert mysql.Ledger(db, ENV, None).read("evil") == {}


@pytest.mark.mariadb
def test_odd_but_legal_user_password_and_database_names_work(
        mariadb: MariaDb, tmp_path: Path) -> None:
    dbname, user, password = 'odd`db "#\'x', 'us"er#\\', 'p"w#\\d \'x'
    lit = "'" + user.replace("\\", "\\\\").replace("'", "''") + "'"
    mariadb.sql(f"CREATE DATABASE {q(dbname)}; CREATE USER {lit}@'localhost' IDENTIFIED BY "
                f"'{password.replace(chr(92), chr(92) * 2).replace(chr(39), chr(39) * 2)}'; "
                f"GRANT ALL ON {q(dbname)}.* TO {lit}@'localhost'; "
                f"CREATE TABLE {q(dbname)}.t (x int); INSERT INTO {q(dbname)}.t VALUES (5)")
    db = Database(f"mysql://{quote(user, safe='')}:{quote(password, safe='')}@localhost/"
                  f"{quote(dbname, safe='')}?unix_socket={mariadb.socket}")
    engines.check(db, ENV)
    before = mariadb.dump(dbname)
    saved = engines.backup(db, tmp_path / "b", ENV, log_to([]))
    mariadb.sql("INSERT INTO t VALUES (6)", dbname)
    engines.restore(db, saved, ENV, log_to([]))
    assert mariadb.dump(dbname) == before
    assert mysql.query(db, "SELECT HEX(DATABASE())", ENV, what="x") == [
        [dbname.encode().hex().upper()]]


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[tuple[MariaDb, int]]:
    port = free_port()
    server = start_server(port=port)
    try:
        yield server, port
    finally:
        server.stop()


@pytest.mark.mariadb
def test_a_tcp_url_still_works(tcp_server: tuple[MariaDb, int], tmp_path: Path) -> None:
    server, port = tcp_server
    name = server.create_database()
    server.sql(f"CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY "
               f"'{APP_PASSWORD.replace(chr(39), chr(39) * 2)}'; "
               f"GRANT ALL ON {name}.* TO 'app'@'127.0.0.1'")
    db = Database(f"mysql://app:{quote(APP_PASSWORD, safe='')}@127.0.0.1:{port}/{name}")
    engines.check(db, ENV)
    assert mysql.ping(db.url, ENV, 5.0) == ""
    as_app(server, name, "CREATE TABLE t (x int); INSERT INTO t VALUES (1);")
    before = server.dump(name)
    saved = engines.backup(db, tmp_path / "b", ENV, log_to([]))
    server.sql("DROP TABLE t", name)
    engines.restore(db, saved, ENV, log_to([]))
    assert server.dump(name) == before


# --------------------------------------------------------------------------- the installer

PROFILE = """\
env:
  required: [CHAT_URL]
  secret: [CHAT_URL]
databases:
  - name: chat
    kind: mysql
    url: ${CHAT_URL}
migrations:
  - {name: history, sql: app/db/chat, database: chat}
"""


def build(project: Project, keys: tuple[Path, Path], cache: Path, version: str,
          seq: int) -> Path:
    profile = project.profile(version, sequence=seq, extra=PROFILE)
    result = bundle("build", profile, "--key", keys[0], "--out", project.dir / "dist",
                    "--cache-dir", cache, "--json")
    assert result.rc == 0, result.err
    return Path(json.loads(result.out)["bundle"])


@pytest.mark.mariadb
@pytest.mark.slow
def test_installer_refuses_hostile_urls_and_restores_hostile_names_safely(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        mariadb: MariaDb, appdb: str, attack: Attack, roots: list[Path]) -> None:
    chat = project.dir / "app" / "db" / "chat"
    chat.mkdir(parents=True)
    (chat / "001_msgs.sql").write_text("CREATE TABLE msgs (id int PRIMARY KEY, body text);\n"
                                       "INSERT INTO msgs VALUES (1, 'hello');\n")
    v1 = build(project, keys, cache_dir, "1.0.0", 1)
    (chat / "002_bad.sql").write_text("CREATE TABLE half (x int);\n"
                                      "INSERT INTO msgs VALUES (1, 'duplicate');\n")
    v2 = build(project, keys, cache_dir, "2.0.0", 2)

    root = tmp_path / "target"
    roots.append(root)
    (root / "shared").mkdir(parents=True)
    env_file = root / "shared" / ".env"
    trust = ["--trust", keys[1], "--root", root]
    tee = tmp_path / "tee.out"
    good = mariadb.url(appdb)
    for bad, why in ((good.replace("app:", f"app%0Atee={quote(str(tee), safe='')}:", 1),
                      "its user holds a control character"),
                     (good.replace(f"/{appdb}?", "/--foo?"), "database name starts with '-'")):
        env_file.write_text(f"CHAT_URL={bad}\n")
        before = tree_snapshot(root)
        (refused,) = offline(bundle_argv("install", v1, *trust))
        assert refused.rc == InstallError.exit_code, refused.err
        assert why in refused.err and "my-S3cret" not in refused.err + refused.out
        assert not (root / "releases").exists() and not tee.exists()
        assert {k: v for k, v in tree_snapshot(root).items() if not k.startswith("state")} \
            == before

    env_file.write_text(f"CHAT_URL={good}\n")
    (r1,) = offline(bundle_argv("install", v1, *trust))
    assert r1.rc == 0, r1.err
    as_app(mariadb, appdb, attack.create_sql())  # the application, with its own account
    before = mariadb.dump(appdb)
    (r2,) = offline(bundle_argv("install", v2, *trust))
    assert r2.rc == MigrationError.exit_code, r2.err
    assert "002_bad.sql" in r2.err and "rolled back to 1.0.0" in r2.err
    assert attack.markers() == []
    assert mariadb.dump(appdb) == before
