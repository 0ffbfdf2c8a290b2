"""The old import path of the database facade, kept while other branches still call it:
everything here is `bundler.install.db` (the facade and the model) or one of its engines.
New code imports `bundler.install.db`."""

from __future__ import annotations

from bundler.install.db import (
    Backup,
    Database,
    Log,
    ServiceExec,
    backup,
    check,
    check_url,
    fingerprint,
    first_line,
    restore,
    wait_ready,
)
from bundler.install.db.postgres import ADVISORY_LOCK_KEY, PgTarget, connect, pg_target
from bundler.install.db.sqlite import sqlite_path

__all__ = ["ADVISORY_LOCK_KEY", "Backup", "Database", "Log", "PgTarget", "ServiceExec", "backup",
           "check", "check_url", "connect", "fingerprint", "first_line", "pg_target", "restore",
           "sqlite_path", "wait_ready"]
