"""Health checks. Each result is kept (not just pass/fail) so the report can show it."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from bundler.models import HealthCheck

# No proxies, ever: the target is air-gapped, and a stray http_proxy would send a loopback
# health check off-host.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    attempts: int
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "attempts": self.attempts,
                "detail": self.detail}


def probe_http(check: HealthCheck) -> tuple[bool, str]:
    try:
        with _OPENER.open(check.url, timeout=check.timeout_ms / 1000) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"GET {check.url}: {reason}"
    if status != check.expect_status:
        return False, f"GET {check.url}: status {status}, expected {check.expect_status}"
    return True, f"GET {check.url}: {status}"


def run_check(check: HealthCheck, retries: int | None = None) -> CheckResult:
    attempts = retries or check.retries
    detail = ""
    for attempt in range(1, attempts + 1):
        ok, detail = probe_http(check)
        if ok:
            return CheckResult(check.name, True, attempt, detail)
        if attempt < attempts:
            time.sleep(check.interval_ms / 1000)
    return CheckResult(check.name, False, attempts, detail)


def run_all(checks: tuple[HealthCheck, ...], retries: int | None = None) -> list[CheckResult]:
    return [run_check(c, retries) for c in checks]
