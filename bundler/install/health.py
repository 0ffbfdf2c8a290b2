"""Health checks: http (status, a JSON field's value), tcp, postgres, mysql, redis, command.

Each result is kept (not just pass/fail) so reports can show it. Targets may use `${VAR}`
from the release environment; details are redacted before they are shown or stored.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bundler import proc, ui
from bundler.bundle.models import DbKind, HealthCheck
from bundler.errors import BundlerError, CommandError
from bundler.install import db, node_runtime, runas
from bundler.install.environ import ReleaseEnv

# No proxies, ever: the target is air-gapped, and a stray http_proxy would send a loopback
# health check off-host.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_NO_ENV = ReleaseEnv("production", (), frozenset())


# What the runtime says about the release between retries: one line per unit that will not
# come up (runtime.crashed); [] when nothing is decided yet.
Crashed = Callable[[], list[str]]
EVIDENCE_EVERY = 1.0  # seconds: how often a long wait between attempts asks the runtime


@dataclass(frozen=True)
class CheckResult:
    name: str
    kind: str
    ok: bool
    attempts: int
    detail: str
    seconds: float = 0.0
    # The runtime's evidence the check gave up on before its retries ran out (redacted).
    evidence: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name, "kind": self.kind, "ok": self.ok, "attempts": self.attempts,
            "detail": self.detail, "seconds": round(self.seconds, 3)}
        if self.evidence:
            out["evidence"] = list(self.evidence)
        return out


def _json_field(body: bytes, path: str) -> object:
    value: object = json.loads(body)
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def probe_http(check: HealthCheck, target: str) -> tuple[bool, str]:
    body = b""
    try:
        with _OPENER.open(target, timeout=check.timeout_ms / 1000) as resp:
            status = resp.status
            body = resp.read(1024 * 1024)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        return False, f"GET {target}: {getattr(exc, 'reason', exc)}"
    if status != check.expect_status:
        return False, f"GET {target}: status {status}, expected {check.expect_status}"
    if check.json_field is not None:
        try:
            value = _json_field(body, check.json_field)
        except (ValueError, KeyError):
            return False, f"GET {target}: {status}, but no JSON field {check.json_field!r}"
        text = json.dumps(value) if not isinstance(value, str) else value
        if text != check.json_equals:
            return False, (f"GET {target}: {check.json_field} is {text!r}, expected "
                           f"{check.json_equals!r}")
        return True, f"GET {target}: {status}, {check.json_field}={text}"
    return True, f"GET {target}: {status}"


def probe_tcp(check: HealthCheck, target: str) -> tuple[bool, str]:
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)),
                                      timeout=check.timeout_ms / 1000):
            return True, f"tcp {target}: open"
    except OSError as exc:
        return False, f"tcp {target}: {exc.strerror or exc}"


def probe_redis(check: HealthCheck, target: str) -> tuple[bool, str]:
    url = urllib.parse.urlsplit(target)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    try:
        with socket.create_connection((host, port), timeout=check.timeout_ms / 1000) as sock:
            if url.password:
                user = urllib.parse.unquote(url.username or "default")
                password = urllib.parse.unquote(url.password)
                sock.sendall(_resp("AUTH", user, password))
                if not sock.recv(64).startswith(b"+OK"):
                    return False, f"redis {host}:{port}: authentication failed"
            sock.sendall(_resp("PING"))
            reply = sock.recv(64)
    except OSError as exc:
        return False, f"redis {host}:{port}: {exc.strerror or exc}"
    ok = reply.startswith(b"+PONG")
    return ok, f"redis {host}:{port}: {reply.decode('utf-8', 'replace').strip() or 'no reply'}"


def _resp(*words: str) -> bytes:
    out = f"*{len(words)}\r\n".encode()
    for w in words:
        data = w.encode()
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    return out


def probe_database(check: HealthCheck, target: str) -> tuple[bool, str]:
    """postgres, mysql: the database's engine connects and runs SELECT 1 (PostgreSQL through
    the driver bundler carries; MySQL/MariaDB with the client a bare host has, Debian's
    mariadb-client)."""
    kind = DbKind(check.kind)
    why = db.ping(kind, target, {}, check.timeout_ms / 1000)
    return (False, f"{kind}: {why}") if why else (True, f"{kind}: SELECT 1 ok")


def probe_command(check: HealthCheck, argv: list[str], env: ReleaseEnv,
                  user: str | None = None) -> tuple[bool, str]:
    """Run the check's command (as the release's `user`, when it names one)."""
    try:
        account = runas.maybe(user)
        child = proc.clean_env(env.as_dict())
        release = dict(env.places).get("{release}")
        if release is not None:  # the release's carried Node.js, first on PATH
            child = node_runtime.on_path(child, Path(release))
        result = proc.run(argv, env=child, check=False,
                          timeout=check.timeout_ms / 1000, what=f"check {check.name}",
                          user=account, release_command=True)
    except CommandError as exc:
        return False, exc.message
    last = result.tail(1)
    return result.returncode == 0, f"exit {result.returncode}{': ' + last if last else ''}"


def probe(check: HealthCheck, env: ReleaseEnv = _NO_ENV,
          user: str | None = None) -> tuple[bool, str]:
    try:
        if check.kind == "command":
            return probe_command(check, [env.expand(a) for a in check.command], env, user)
        target = env.expand(check.target)
        probes: dict[str, Callable[[HealthCheck, str], tuple[bool, str]]] = {
            "http": probe_http, "tcp": probe_tcp, "redis": probe_redis,
            DbKind.POSTGRES: probe_database, DbKind.MYSQL: probe_database}
        return probes[check.kind](check, target)
    except BundlerError as exc:
        return False, exc.message


def run_check(check: HealthCheck, env: ReleaseEnv = _NO_ENV,
              retries: int | None = None, user: str | None = None,
              crashed: Crashed | None = None) -> CheckResult:
    """`user`: the release's account, which command checks run as (the other kinds are
    probes bundler makes itself). `crashed`: the runtime's evidence, asked after every failed
    attempt (and every EVIDENCE_EVERY seconds of a long interval): once it names a unit that
    will not come up, the check gives up at once with it instead of spending its retries."""
    attempts = retries or check.retries
    started = time.monotonic()
    detail = ""
    with ui.activity(f"health: {check.name} ({check.kind})") as spinner:
        for attempt in range(1, attempts + 1):
            ok, detail = probe(check, env, user)
            if ok:
                return CheckResult(check.name, check.kind, True, attempt, env.redact(detail),
                                   time.monotonic() - started)
            if attempt == attempts:
                break
            spinner.update(f"attempt {attempt + 1}/{attempts}; last: "
                           f"{env.redact(detail)[:100]}")
            evidence = [env.redact(e) for e in _wait(check.interval_ms / 1000, spinner, crashed)]
            if evidence:
                return CheckResult(
                    check.name, check.kind, False, attempt,
                    f"{'; '.join(evidence)} (gave up at attempt {attempt} of {attempts}; last "
                    f"probe: {env.redact(detail)})", time.monotonic() - started,
                    tuple(evidence))
    return CheckResult(check.name, check.kind, False, attempts, env.redact(detail),
                       time.monotonic() - started)


def _wait(seconds: float, spinner: ui.Activity, crashed: Crashed | None) -> list[str]:
    """Sleep until the next attempt, asking `crashed` first and then every EVIDENCE_EVERY
    seconds; its evidence as soon as there is some. A question the runtime cannot answer
    (an engine away) is no evidence."""
    deadline = time.monotonic() + seconds
    while True:
        if crashed is not None:
            try:
                evidence = crashed()
            except BundlerError:
                evidence = []
            if evidence:
                return evidence
        left = deadline - time.monotonic()
        if left <= 0:
            return []
        time.sleep(min(left, EVIDENCE_EVERY))
        spinner.tick()
        if time.monotonic() >= deadline:
            return []  # the next attempt's probe comes first


def run_all(checks: tuple[HealthCheck, ...], env: ReleaseEnv = _NO_ENV,
            retries: int | None = None, user: str | None = None,
            crashed: Crashed | None = None) -> list[CheckResult]:
    """Each check in turn; after one that gave up on the runtime's evidence (`crashed`, see
    run_check) the others are not run: the release is failing, and why is known."""
    out: list[CheckResult] = []
    for check in checks:
        out.append(run_check(check, env, retries, user, crashed))
        if out[-1].evidence:
            break
    return out
