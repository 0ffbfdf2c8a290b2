"""How long bundler waits, in seconds, for the kinds of work several modules start: one name
per kind, so equal waits stay equal and a call site says which kind it is. A wait that only
one module has is named in that module (e.g. engine.ENGINE_TIMEOUT, images.SKOPEO_TIMEOUT)."""

from __future__ import annotations

# A tool answering a question about itself (`--version`, `npm config get`): at once, unless
# the host is loaded or its disk cold.
PROBE = 60.0
# Resolving or installing a whole package tree (uv lock, pip install, npm ci): large trees on
# slow disks, sdists built from source.
PACKAGES = 1800.0
# How long SQLite waits for another connection's lock before it says "database is locked".
SQLITE_BUSY = 30.0
# A database dump or restore (pg_dump/pg_restore, mysqldump/mysql): a big database takes long;
# a hung one must still end.
DB_DUMP = 4 * 3600.0
# Connecting to a database server (libpq's connect_timeout, mysql's connect-timeout).
DB_CONNECT = 10
