"""Secrets, modes and ownership on the target: one redaction for every output and the journal,
explicit file modes whatever the umask, StrictModes, no loader variables from the shared .env,
and the shared .env read exactly as docker compose reads it."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bundler.errors import EnvError, MigrationError, ProfileError, StateError
from bundler.install.environ import read_env_file
from bundler.redact import Secrets, has_plaintext_secret, redact
from tests.helpers import REPO, bundle, bundle_argv, unavailable

SECRET = "Sup3r-S3cret-Pw"  # in the shared .env, named like a password
SIGNING = "signing-value-42"  # named in the profile's env.secret only
URL_PW = "p@ss@word"  # an unencoded "@" inside a URL's password


# --- (1) one redaction function --------------------------------------------------------------

def test_redact_url_passwords_params_and_known_values() -> None:
    assert redact("postgresql://app:p@ss@db/app") == "postgresql://app:****@db/app"
    assert redact("postgresql://app:p@ss:wd@db:5432/app") == "postgresql://app:****@db:5432/app"
    assert redact("redis://:pw@cache:6379/0") == "redis://:****@cache:6379/0"
    assert redact("postgresql://app@db/app?password=x") == "postgresql://app@db/app?password=****"
    assert redact("https://h/api?a=1&token=abc.DEF-123&b=2") == (
        "https://h/api?a=1&token=****&b=2")
    assert redact("GET /x?api_key=K-1&client_secret=S2 ok") == (
        "GET /x?api_key=****&client_secret=**** ok")
    assert redact("host=db password=hunter22 dbname=app") == "host=db password=**** dbname=app"
    # no password: left alone
    for text in ("http://127.0.0.1:8080/health", "http://host:8080/path@x", "sqlite:///a.db",
                 "postgresql://app@db/app?sslmode=require"):
        assert redact(text) == text
    # known values, raw and percent-encoded
    assert redact(f"pw {URL_PW} or p%40ss%40word", [URL_PW]) == "pw **** or ****"
    known = Secrets()
    known.add_env({"DB_PASSWORD": "hunter2x", "PLAIN": "hello-world", "MY_VAR": "sign-it",
                   "URL": "postgresql://u:inurl-pw@h/d"}, secret_names=["MY_VAR"])
    assert set(known.values()) >= {"hunter2x", "sign-it", "inurl-pw"}
    assert "hello-world" not in known.values()
    assert has_plaintext_secret("postgresql://u@h/d?password=x")
    assert has_plaintext_secret("postgresql://u:x@h/d")
    assert not has_plaintext_secret("postgresql://u:${PW}@h/d")
    assert not has_plaintext_secret("${DATABASE_URL}")


def test_validate_refuses_a_password_in_a_url_query(tmp_path: Path) -> None:
    for url, where in (("postgresql://app@db/app?password=hunter2", "database.url"),
                       ("postgresql://app:hunter2@db/app", "database.url")):
        profile = tmp_path / "bundle.yaml"
        profile.write_text("schema: 1\nname: api\nversion: 1.0.0\n"
                           f"database: {{url: '{url}'}}\n")
        result = bundle("validate", profile)
        assert result.rc == ProfileError.exit_code and f"{where} holds a password" in result.err, \
            result.err
        assert "hunter2" not in result.err
    profile.write_text("schema: 1\nname: api\nversion: 1.0.0\nenv:\n  defaults:\n"
                       "    all: {REDIS_URL: 'redis://:hunter2@cache:6379'}\n")
    result = bundle("validate", profile)
    assert result.rc == ProfileError.exit_code and "REDIS_URL holds a password" in result.err, \
        result.err


# --- an installed root, under umask 000 -------------------------------------------------------

def _run(*args: str | os.PathLike[str], umask: str = "000") -> subprocess.CompletedProcess[str]:
    """The real CLI, started with `umask` (what a careless shell or unit file leaves)."""
    argv = " ".join(f"'{a}'" for a in bundle_argv(*args))
    return subprocess.run(["sh", "-c", f"umask {umask}; exec {argv}"], capture_output=True,
                          text=True, timeout=300, check=False, cwd=REPO)


def _profile(base: Path, version: str, migration: str) -> Path:
    (base / "conf").mkdir(exist_ok=True)
    (base / "conf" / "a.ini").write_text(f"v={version}\n")
    path = base / f"api-{version}.yaml"
    path.write_text(
        f"schema: 1\nname: api\nversion: {version}\nsequence: {version[0]}\n"
        "files:\n  - {src: conf, dest: c}\n"
        "env:\n  required: [DATABASE_URL]\n  secret: [SIGNING]\n"
        "database: {url: '${DATABASE_URL}'}\n"
        f"migrations:\n  - name: schema\n    command: [sh, -c, '{migration}']\n")
    return path


@pytest.fixture(scope="module")
def built(session_keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Path]:
    """1.0.0, and 2.0.0 whose migration echoes secrets and fails: built once for the module
    (every test installs them into a root of its own)."""
    base = tmp_path_factory.mktemp("secrets-modes")
    built = {}
    for version, migration in (
            ("1.0.0", "echo migrated"),
            ("2.0.0", 'echo "connecting with $DB_PASSWORD and $SIGNING"; '
                      'echo "url postgresql://app:$URL_PW@db/app?password=$DB_PASSWORD"; '
                      'echo "error: relation missing ($DB_PASSWORD)" >&2; exit 1')):
        result = bundle("build", _profile(base, version, migration), "--key", session_keys[0],
                        "--out", base / "out", "--cache-dir", base / "cache", "--json")
        assert result.rc == 0, result.err
        built[version] = Path(json.loads(result.out)["bundle"])
    return built


@pytest.fixture
def installed(tmp_path: Path, keys: tuple[Path, Path], built: dict[str, Path]
              ) -> tuple[Path, Path, Path]:
    """(root, the 2.0.0 bundle whose migration echoes secrets and fails, the trust key):
    1.0.0 installed under umask 000, its key added to the trust store under umask 000."""
    root = tmp_path / "root"
    added = _run("trust", "add", keys[1], "--root", root)
    assert added.returncode == 0, added.stderr
    (root / "shared").mkdir(mode=0o700)
    env = root / "shared" / ".env"
    env.write_text(f"DATABASE_URL=sqlite:///{root}/app.db\nDB_PASSWORD={SECRET}\n"
                   f"SIGNING={SIGNING}\nURL_PW='{URL_PW}'\n")
    env.chmod(0o600)
    first = _run("install", built["1.0.0"], "--root", root)
    assert first.returncode == 0, first.stderr
    return root, built["2.0.0"], keys[1]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_modes_are_explicit_whatever_the_umask(installed: tuple[Path, Path, Path]) -> None:
    root, _, _ = installed
    assert _mode(root / "state") == 0o700
    assert _mode(root / "state" / "state.db") == 0o600
    assert _mode(root / "state" / "trust") == 0o700
    keys = list((root / "state" / "trust").glob("*.pub"))
    assert keys and all(_mode(k) == 0o600 for k in keys)
    assert _mode(root / "backups") == 0o700
    backups = list((root / "backups").iterdir())
    assert backups and all(_mode(b) == 0o600 for b in backups)
    assert _mode(root) == 0o755 and _mode(root / "releases") == 0o755
    # the journal file SQLite makes while writing takes state.db's mode: never world-readable
    assert not (root / "state" / "state.db-journal").exists()


def test_a_migration_that_echoes_secrets_shows_them_nowhere(
        installed: tuple[Path, Path, Path]) -> None:
    root, bundle_v2, _ = installed
    failed = _run("install", bundle_v2, "--root", root)
    assert failed.returncode == MigrationError.exit_code, failed.stderr
    assert "migration schema" in failed.stderr and "****" in failed.stderr
    history = bundle("history", "--root", root, "--json")
    assert history.rc == 0, history.err
    failed_json = _run("install", bundle_v2, "--root", root, "--json")
    report = root / "releases" / "2.0.0" / "report.json"
    texts = {"stderr": failed.stderr + failed.stdout, "history": history.out,
             "json error": failed_json.stdout + failed_json.stderr,
             "report.json": report.read_text(),
             "REPORT.md": (root / "releases" / "2.0.0" / "REPORT.md").read_text()}
    assert "relation missing" in texts["stderr"]
    for name, text in texts.items():
        for secret in (SECRET, SIGNING, URL_PW, "ss@word"):
            assert secret not in text, f"{secret!r} in {name}: {text}"
    state = b"".join(p.read_bytes() for p in (root / "state").glob("state.db*"))
    assert b"relation missing" in state or b"failed" in state
    for secret in (SECRET, SIGNING, URL_PW, "ss@word"):
        assert secret.encode() not in state


# --- (3) StrictModes ---------------------------------------------------------------------------

def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            continue
        st = path.lstat()
        data = path.read_bytes() if path.is_file() else b""
        out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, data)
    return out


NOBODY = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else None


@pytest.mark.parametrize("where,change", [
    ("", "chmod"), ("state", "chmod"), ("state/trust", "chown"), ("shared", "chmod"),
    ("shared/.env", "chown"), ("state/state.db", "chmod")])
def test_strict_modes_refuse_what_another_user_could_write(
        installed: tuple[Path, Path, Path], where: str, change: str) -> None:
    if NOBODY is None:
        unavailable("needs root to chown")
    root, bundle_v2, pub = installed
    target = root / where if where else root
    if change == "chmod":
        target.chmod(0o777 if target.is_dir() else 0o666)
    else:
        os.chown(target, NOBODY, -1)
    before = _snapshot(root)
    for args in (("install", bundle_v2, "--root", root), ("rollback", "--root", root),
                 ("start", "--root", root), ("status", "--root", root),
                 ("trust", "add", pub, "--root", root),
                 ("doctor", bundle_v2, "--root", root)):
        result = bundle(*args)
        assert result.rc == StateError.exit_code, (args, result.rc, result.err)
        assert str(target) in result.err and "another user could make bundler run" in result.err
        assert "chmod go-w" in result.err and f"chown root: {target}" in result.err
    assert _snapshot(root) == before


# --- (4) loader variables -----------------------------------------------------------------------

@pytest.mark.parametrize("line", ["LD_PRELOAD=/tmp/evil.so", "PYTHONPATH=/tmp/evil",
                                  "export NODE_OPTIONS='--require /tmp/evil.js'",
                                  "BASH_ENV=/tmp/evil.sh", "PERL5LIB=/tmp", "GCONV_PATH=/tmp",
                                  "PYTHONSTARTUP=/tmp/x.py", "ENV=/tmp/x"])
def test_loader_variables_are_refused_from_the_shared_env(
        installed: tuple[Path, Path, Path], line: str) -> None:
    root, bundle_v2, _ = installed
    env = root / "shared" / ".env"
    env.write_text(env.read_text() + line + "\n")
    name = line.removeprefix("export ").split("=")[0]
    before = _snapshot(root)
    result = bundle("install", bundle_v2, "--root", root)
    assert result.rc == EnvError.exit_code, result.err
    assert f"{env}:5: {name} may not be set in the shared .env" in result.err
    assert _snapshot(root) == before
    assert read_env_file_ok("PYTHONUNBUFFERED=1\n", root.parent) == {"PYTHONUNBUFFERED": "1"}


def read_env_file_ok(text: str, where: Path) -> dict[str, str]:
    path = where / "probe.env"
    path.write_text(text)
    return read_env_file(path)


# --- (5) the shared .env, read as compose reads it ---------------------------------------------

# Each line is read the same by compose v2, compose v1 and bundler (measured with both).
AGREED = {
    "export A=1": "1", "  B = spaced": "spaced", "C=plain # note": "plain",
    "D=val#not-a-comment": "val#not-a-comment", "E=#x": "#x", "F= #y": "#y",
    "G=a #b #c": "a", 'H="two words" # c': "two words", "I='x # y'": "x # y",
    "J='a$b'": "a$b", 'K="x"#c': "x", "L=b\"c": "b\"c", "M=x y  ": "x y", "N=": "",
    'O=""': "", "P=a=b": "a=b", "Q=x\\ty": "x\\ty", "R=ä€": "ä€",
    "S=postgresql://u:p@ss@db/x?sslmode=require": "postgresql://u:p@ss@db/x?sslmode=require",
}

# Lines compose reads differently from a plain KEY=value reader (or differently in v1 and v2).
DIFFERING = {
    "A=${HOST}-x": "a $ in an unquoted value",
    "A=pa$word": "a $ in an unquoted value",
    'A="x${HOST}"': "a $ inside double quotes",
    'A="two\\"q"': "a backslash inside quotes",
    'A="line\\nbreak"': "a backslash inside quotes",
    "A='it\\'s'": "a backslash inside quotes",
    'A="unterminated': "the \" quote is not closed on this line",
    "A='x' trailing": "text after the closing quote",
    "A=x\t# tab comment": "a tab in an unquoted value",
    "bad line": "not a KEY=value line",
    "A.B=1": "not a KEY=value line",
    "A": "not a KEY=value line",
}


def test_env_file_syntax_compose_agrees_with(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("# comment\n\n" + "\n".join(AGREED) + "\r\n")
    expected = {line.split("=")[0].strip().removeprefix("export "): value
                for line, value in AGREED.items()}
    assert read_env_file(env) == expected


@pytest.mark.parametrize("line", list(DIFFERING))
def test_env_file_syntax_compose_reads_differently_is_refused(tmp_path: Path,
                                                              line: str) -> None:
    env = tmp_path / ".env"
    env.write_text(f"OK=1\n{line}\n")
    with pytest.raises(EnvError) as err:
        read_env_file(env)
    assert err.value.message.startswith(f"{env}:2: {DIFFERING[line]}"), err.value.message
    assert "docker compose would read this line differently" in err.value.message


def test_agreed_syntax_is_what_compose_reads(tmp_path: Path) -> None:
    """The accepted lines against the carried compose itself (`config` needs no engine)."""
    tool = Path(sys.executable).parent / "docker-compose"
    if not tool.exists() or shutil.which("docker") is None:
        unavailable("the carried compose binary or the docker CLI is not installed")
    env = tmp_path / ".env"
    env.write_text("\n".join(AGREED) + "\n")
    names = read_env_file(env)
    (tmp_path / "compose.yml").write_text(
        "services:\n  x:\n    image: busybox\n    environment:\n"
        + "".join(f"      {k}: \"${{{k}}}\"\n" for k in names))
    done = subprocess.run([str(tool), "--env-file", str(env), "-f",
                           str(tmp_path / "compose.yml"), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    seen = {k: v.replace("$$", "$")  # `config` prints a literal $ escaped
            for k, v in json.loads(done.stdout)["services"]["x"]["environment"].items()}
    assert {k: seen[k] for k in names} == names
