"""The install's report, in the release directory: report.json for automation and REPORT.md,
a checklist like the ones operators used to tick by hand: every step and check of the
attempt with its result."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from bundler import ui
from bundler.fsutil import atomic_write_bytes
from bundler.install.journal import reason
from bundler.install.state import now
from bundler.install.steps import Attempt, backup_json


def write(a: Attempt, outcome: str) -> None:
    """Best effort: on a full disk the journal in state.db still holds every step."""
    try:
        _write(a, outcome)
    except (OSError, sqlite3.Error) as exc:
        ui.note(f"install report not written ({reason(exc)}); `bundle history` has every step")


def _steps(a: Attempt) -> list[dict[str, Any]]:
    rows = a.state.conn.execute(
        "SELECT ts, step, status, detail FROM events WHERE txn=? ORDER BY id",
        (a.journal.txn,)).fetchall()
    return [{"ts": ts, "step": step, "status": status, "detail": a.env.redact(detail)}
            for ts, step, status, detail in rows]


def _write(a: Attempt, outcome: str) -> None:
    m, env, rel = a.new.manifest, a.env, a.new.dir
    steps = _steps(a)
    report = {"product": m.name, "version": m.version, "sequence": m.sequence,
              "environment": env.environment, "outcome": outcome,
              "reason": env.redact(a.reason), "finished": now(), "steps": steps,
              "checks": [c.to_json() for c in a.checks],
              "backup": a.backup.to_json() if a.backup else None}
    if len(a.backups) > 1:  # only then: single-database reports keep their shape
        report["backups"] = [backup_json(d, b) for d, b in a.backups]
    if a.data:
        report["data_backups"] = [b.to_json() for b in a.data]
    atomic_write_bytes(rel.report_json, json.dumps(report, indent=2).encode())
    atomic_write_bytes(rel.report_md, ("\n".join(_markdown(a, outcome, steps)) + "\n").encode())


def _markdown(a: Attempt, outcome: str, steps: list[dict[str, Any]]) -> list[str]:
    m, env = a.new.manifest, a.env
    lines = [f"# {m.name} {m.version}: {outcome}", "",
             f"- environment: {env.environment}; sequence {m.sequence}; finished {now()}"]
    if a.reason:
        lines.append(f"- reason: {env.redact(a.reason)}")
    for db, made in a.backups:
        lines.append(f"- database backup{' of ' + db.name if db.name else ''}: {made.path}")
    lines += [f"- data directory backup of {b.name}: {b.path}" for b in a.data]
    lines += ["", "## Steps", ""]
    final: dict[str, tuple[str, str]] = {}
    for st in steps:
        final[st["step"]] = (st["status"], st["detail"])
    for step, (status, detail) in final.items():
        mark = "x" if status not in ("failed", "started") else " "
        lines.append(f"- [{mark}] {step}: {status}{' — ' + detail if detail else ''}")
    lines += ["", "## Post-deploy checks", ""]
    lines += [f"- [{'x' if c.ok else ' '}] {c.name} ({c.kind}): {c.detail}" for c in a.checks]
    if not a.checks:
        lines.append("- (no checks ran)")
    return lines
