"""`bundle diff` says what changed in a service, not only its name (issue 17 §6): its command,
working directory, user and env KEYS (never values), the health checks' changed fields, the
ports the release serves, the release's user and environment keys. Two real signed bundles,
the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle.models import ComposeSpec, EnvSpec, HealthCheck, Runtime, Service
from tests.bundles import write_bundle
from tests.helpers import bundle

FILES = {"files/app.py": b"print('hi')\n", "files/compose.yaml": b"services: {}\n"}


def _pair(tmp_path: Path, key: Ed25519PrivateKey) -> tuple[Path, Path]:
    old = Runtime(
        services=(Service("api", ("python3", "app.py", "--port", "8000"), "app",
                          (("API_TOKEN", "old-secret-value"), ("LOG_LEVEL", "info"),
                           ("MODE", "a"))),
                  Service("worker", ("python3", "worker.py")),
                  Service("cron", ("python3", "cron.py"))),
        health=(HealthCheck("api", "http", "http://127.0.0.1:8000/health", retries=30),
                HealthCheck("db", "postgres", "postgresql://app:hunter2secret@db/app")),
        env=EnvSpec(required=("DATABASE_URL",),
                    defaults=(("production", (("WORKERS", "4"),)),)),
        compose=ComposeSpec(("compose.yaml",), ports=(9000,)))
    new = Runtime(
        services=(Service("api", ("python3", "app.py", "--port", "8001"), "app",
                          (("API_TOKEN", "new-secret-value"), ("MODE", "a"),
                           ("TIMEOUT", "30")), user="www"),
                  Service("worker", ("python3", "worker.py")),
                  Service("mailer", ("python3", "mail.py"))),
        health=(HealthCheck("api", "http", "http://127.0.0.1:8001/health", retries=40),
                HealthCheck("db", "postgres", "postgresql://app:hunter2secret@db2/app")),
        env=EnvSpec(required=("DATABASE_URL", "SMTP_HOST"),
                    defaults=(("production", (("WORKERS", "8"), ("CACHE", "on"))),)),
        compose=ComposeSpec(("compose.yaml",), ports=(9000, 9443)),
        user="app")
    a, b = tmp_path / "shop-1.0.0.bundle", tmp_path / "shop-1.1.0.bundle"
    write_bundle(a, key, FILES, runtime=old)
    write_bundle(b, key, FILES, runtime=new, version="1.1.0", sequence=11)
    return a, b


def test_diff_says_what_changed_in_each_service(tmp_path: Path, key: Ed25519PrivateKey,
                                                 pub: Path) -> None:
    a, b = _pair(tmp_path, key)
    done = bundle("diff", a, b, "--trust", pub, "--json")
    assert done.rc == 0, done.err
    d = json.loads(done.out)
    services = d["services"]
    assert services["added"] == ["mailer"] and services["removed"] == ["cron"]
    # worker: same command, but the release's user changed, so it runs as another account
    assert services["changed"] == [
        {"name": "api", "command": ["python3 app.py --port 8000", "python3 app.py --port 8001"],
         "user": [None, "www"],
         "env": {"added": ["TIMEOUT"], "removed": ["LOG_LEVEL"], "changed": ["API_TOKEN"]}},
        {"name": "worker", "user": [None, "app"]},
    ]
    health = {c["name"]: c for c in d["health"]["changed"]}
    assert health["api"]["target"] == ["http://127.0.0.1:8000/health",
                                       "http://127.0.0.1:8001/health"]
    assert health["api"]["retries"] == [30, 40]
    assert health["db"]["target"] == ["postgresql://app:****@db/app",
                                      "postgresql://app:****@db2/app"]
    assert d["ports"] == {"added": [{"port": 8001, "for": "health check api"},
                                    {"port": 9443, "for": "published by the compose files"}],
                          "removed": [{"port": 8000, "for": "health check api"}]}
    assert d["user"] == [None, "app"]
    assert d["env"] == {"required": {"added": ["SMTP_HOST"], "removed": []},
                        "defaults": {"production": {"added": ["CACHE"], "removed": [],
                                                    "changed": ["WORKERS"]}}}
    for value in ("old-secret-value", "new-secret-value", "hunter2secret", "info"):
        assert value not in done.out, value

    human = bundle("diff", a, b, "--trust", pub)
    assert human.rc == 0, human.err
    out = human.out
    for line in ("  + service mailer", "  - service cron", "  ~ service api:",
                 "      command: python3 app.py --port 8000 → python3 app.py --port 8001",
                 "      user: root → www",
                 "      env keys: + TIMEOUT, - LOG_LEVEL, ~ API_TOKEN (values not shown)",
                 "  ~ service worker:", "      user: root → app",
                 "  ~ health api:", "      retries: 30 → 40",
                 "  + port 8001 (health check api)", "  - port 8000 (health check api)",
                 "  + port 9443 (published by the compose files)",
                 "  ~ user: root → app", "  ~ env required: + SMTP_HOST",
                 "  ~ env defaults (production): + CACHE, ~ WORKERS (values not shown)"):
        assert line + "\n" in out, (line, out)
    for value in ("old-secret-value", "new-secret-value", "hunter2secret"):
        assert value not in out, value


def test_diff_of_the_same_runtime_says_no_service_changed(tmp_path: Path,
                                                           key: Ed25519PrivateKey,
                                                           pub: Path) -> None:
    a, _ = _pair(tmp_path, key)
    done = bundle("diff", a, a, "--trust", pub, "--json")
    assert done.rc == 0, done.err
    d = json.loads(done.out)
    assert d["services"] == {"added": [], "removed": [], "changed": []}
    assert d["health"] == {"added": [], "removed": [], "changed": []}
    assert d["ports"] == {"added": [], "removed": []} and d["user"] is None
    human = bundle("diff", a, a, "--trust", pub)
    assert "service" not in human.out and "no artifact changes" in human.out
