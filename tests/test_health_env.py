"""Health-check kinds against real servers, and the release environment rules."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.bundle.models import EnvSpec, HealthCheck
from bundler.errors import EnvError, ProfileError, UnhealthyError
from bundler.install.environ import ReleaseEnv, check_required, read_env_file, release_env
from bundler.install.health import run_check
from bundler.install.layout import Layout
from tests.helpers import bundle, free_port, unavailable


def check(kind: str, target: str = "", **kw: object) -> HealthCheck:
    fields: dict[str, object] = {"name": "c", "kind": kind, "target": target, "retries": 2,
                                 "interval_ms": 50, "timeout_ms": 1000, **kw}
    return HealthCheck(**fields)  # type: ignore[arg-type]


@pytest.fixture
def json_server() -> Iterator[str]:
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": "ok", "db": {"up": True}, "n": 3}).encode()
            self.send_response(200 if self.path != "/down" else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_status_and_json_field(json_server: str) -> None:
    assert run_check(check("http", json_server + "/", json_field="status",
                           json_equals="ok")).ok
    assert run_check(check("http", json_server + "/", json_field="db.up", json_equals="true")).ok
    bad = run_check(check("http", json_server + "/", json_field="status", json_equals="ready"))
    assert not bad.ok and "status is 'ok', expected 'ready'" in bad.detail
    down = run_check(check("http", json_server + "/down"))
    assert not down.ok and "status 503, expected 200" in down.detail and down.attempts == 2


def test_tcp_open_and_closed(json_server: str) -> None:
    assert run_check(check("tcp", json_server.removeprefix("http://"))).ok
    closed = run_check(check("tcp", f"127.0.0.1:{free_port()}"))
    assert not closed.ok and "refused" in closed.detail.lower()


def test_command_check() -> None:
    assert run_check(check("command", command=("sh", "-c", "exit 0"))).ok
    failed = run_check(check("command", command=("sh", "-c", "echo not ready; exit 3")))
    assert not failed.ok and failed.detail == "exit 3: not ready"


@pytest.fixture
def redis() -> Iterator[int]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--requirepass", "s3cr3t-pw"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if run_check(check("tcp", f"127.0.0.1:{port}")).ok:
            break
    yield port
    server.terminate()
    server.wait(10)


def test_redis_ping_with_auth_and_redaction(redis: int) -> None:
    env = ReleaseEnv("production", (("REDIS_URL", f"redis://default:s3cr3t-pw@127.0.0.1:{redis}"),),
                     frozenset({"REDIS_URL"}))
    ok = run_check(check("redis", "${REDIS_URL}"), env)
    assert ok.ok and "PONG" in ok.detail
    wrong = ReleaseEnv("production",
                       (("REDIS_URL", f"redis://default:wrong-pw@127.0.0.1:{redis}"),),
                       frozenset())
    bad = run_check(check("redis", "${REDIS_URL}"), wrong)
    assert not bad.ok and "authentication failed" in bad.detail and "wrong-pw" not in bad.detail


def test_env_file_parsing(tmp_path: Path) -> None:
    f = tmp_path / ".env"
    # (a line that is not an assignment is refused: tests/test_secrets_modes.py)
    f.write_text('# comment\nexport A=1\nB="two words"\nC=\'x # y\'\nD=plain # note\n\n')
    assert read_env_file(f) == {"A": "1", "B": "two words", "C": "x # y", "D": "plain"}


def test_precedence_required_and_redaction(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    spec = EnvSpec(required=("DATABASE_URL", "JWT_SECRET", "PORT"), secret=("JWT_SECRET",),
                   defaults=(("all", (("PORT", "5000"), ("TTL", "300"))),
                             ("production", (("TTL", "3600"),))))
    env = release_env(layout, spec, "production", {"PORT": "5001"})
    assert env.as_dict() == {"PORT": "5001", "TTL": "3600"}
    with pytest.raises(EnvError, match="not set for production: DATABASE_URL, JWT_SECRET"):
        check_required(env, spec, layout)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / ".env").write_text(
        "DATABASE_URL=postgresql://app:hunter22@db/app\nJWT_SECRET=very-secret-value\nTTL=1\n")
    env = release_env(layout, spec, "staging")
    check_required(env, spec, layout)
    assert env.as_dict()["TTL"] == "1"  # the operator's .env wins
    text = env.redact("url postgresql://app:hunter22@db/app token very-secret-value")
    assert "hunter22" not in text and "very-secret-value" not in text
    with pytest.raises(EnvError, match=r"\$\{NOPE\} is used but not set"):
        env.expand("${NOPE}")


def test_missing_required_variable_refuses_install_untouched(tmp_path: Path,
                                                             keys: tuple[Path, Path]) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a.ini").write_text("x\n")
    profile = tmp_path / "bundle.yaml"
    profile.write_text("schema: 1\nname: api\nversion: 1.0.0\nfiles:\n  - {src: conf, dest: c}\n"
                       "env:\n  required: [DATABASE_URL, JWT_SECRET]\n  secret: [JWT_SECRET]\n")
    built = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "out",
                   "--cache-dir", tmp_path / "cache", "--json")
    assert built.rc == 0, built.err
    root = tmp_path / "root"
    result = bundle("install", json.loads(built.out)["bundle"], "--trust", keys[1],
                    "--root", root)
    assert result.rc == EnvError.exit_code
    assert "required variable(s) not set for production: DATABASE_URL, JWT_SECRET" in result.err
    assert not root.exists()
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text("DATABASE_URL=sqlite:///x\nJWT_SECRET=abcdefgh\n")
    ok = bundle("install", json.loads(built.out)["bundle"], "--trust", keys[1], "--root", root)
    assert ok.rc == 0, ok.err
    assert "abcdefgh" not in ok.err + ok.out


def test_secret_default_in_profile_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "bundle.yaml"
    profile.write_text("schema: 1\nname: api\nversion: 1.0.0\nenv:\n  secret: [JWT_SECRET]\n"
                       "  defaults:\n    production: {JWT_SECRET: changeme}\n")
    result = bundle("validate", profile)
    assert result.rc == ProfileError.exit_code \
        and "secret JWT_SECRET has a default value" in result.err


def test_doctor_reports_each_check_and_fails_on_problems(tmp_path: Path,
                                                         keys: tuple[Path, Path]) -> None:
    import socket

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a.ini").write_text("x\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    profile = tmp_path / "bundle.yaml"
    profile.write_text("schema: 1\nname: api\nversion: 1.0.0\nfiles:\n  - {src: conf, dest: c}\n"
                       "env:\n  required: [API_TOKEN]\n  secret: [API_TOKEN]\n"
                       f"health:\n  - {{name: web, tcp: '127.0.0.1:{port}'}}\n")
    built = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "out",
                   "--cache-dir", tmp_path / "cache", "--json")
    assert built.rc == 0, built.err
    path = json.loads(built.out)["bundle"]
    root = tmp_path / "root"
    result = bundle("doctor", path, "--root", root, "--trust", keys[1], "--json")
    busy.close()
    # UnhealthyError: not ready (1 means a bug in bundler)
    assert result.rc == UnhealthyError.exit_code
    rows = {r["check"]: r for r in json.loads(result.out)["checks"]}
    assert rows["environment"]["status"] == "fail" and "API_TOKEN" in rows["environment"]["detail"]
    assert rows[f"port {port}"]["status"] == "fail"
    assert rows["disk space"]["status"] == "ok" and rows["platform"]["status"] == "ok"
    assert not root.exists()  # doctor changes nothing
    (root / "shared").mkdir(parents=True)
    (root / "shared" / ".env").write_text("API_TOKEN=abcdef123\n")
    ok = bundle("doctor", path, "--root", root, "--trust", keys[1])
    assert ok.rc == 0, ok.out + ok.err
    assert "ready" in ok.out and "abcdef123" not in ok.out
    rows_text = [line.split() for line in ok.out.splitlines()]
    assert ["status", "check", "detail"] in rows_text  # a table with a header
    assert ["OK", "environment", "1", "required", "variable(s)", "set", "(production)"] \
        in rows_text
