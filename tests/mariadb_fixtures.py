"""A throwaway MariaDB server for the tests, reached through a unix socket only.

`start_server()`: `mariadb-install-db` into a fresh temp dir, then `mariadbd --no-defaults
--skip-networking` (with `port`: on 127.0.0.1:port instead) with its socket in that dir (as
root: `--user=root`; otherwise as the caller). Durability off (a test server).
`create_database()` makes a database and a user with a URL-hostile password that owns it. No
binaries, or a server that will not start: skip locally, FAIL under CI=true (Debian: `apt-get
install mariadb-server mariadb-client`, see scripts/ci-host-setup.sh). `dump()` is the full
contents to compare (`mariadb-dump` of the database, schema and rows, routines and triggers,
without its date line).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tests.helpers import unavailable

APP_PASSWORD = "my-S3cret:/@'x"  # URL-hostile on purpose: must be quoted, and never shown


@dataclass(frozen=True)
class MariaDb:
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.root / "sock"

    def url(self, dbname: str, user: str = "app", password: str | None = APP_PASSWORD) -> str:
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}" if password else user
        return f"mysql://{auth}@localhost/{dbname}?unix_socket={self.socket}"

    def sql(self, statements: str, dbname: str = "") -> str:
        done = subprocess.run(["mariadb", "--no-defaults", "-S", str(self.socket), "-uroot",
                               "-N", "-B", *([dbname] if dbname else []), "-e", statements],
                              capture_output=True, text=True, timeout=60, check=True)
        return done.stdout

    def create_database(self, user: str = "app") -> str:
        name = f"t_{uuid.uuid4().hex[:10]}"
        self.sql(f"CREATE DATABASE {name}; "
                 f"CREATE USER IF NOT EXISTS '{user}'@'localhost' IDENTIFIED BY "
                 f"'{APP_PASSWORD.replace(chr(39), chr(39) * 2)}'; "
                 f"GRANT ALL ON {name}.* TO '{user}'@'localhost';")
        return name

    def dump(self, dbname: str) -> str:
        done = subprocess.run(["mariadb-dump", "--no-defaults", "-S", str(self.socket), "-uroot",
                               "--skip-dump-date", "--routines", "--triggers", dbname],
                              capture_output=True, text=True, timeout=120, check=True)
        return done.stdout

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def start_server(port: int | None = None) -> MariaDb:
    installer, server = shutil.which("mariadb-install-db"), shutil.which("mariadbd")
    if not installer or not server or not shutil.which("mariadb-dump"):
        unavailable("MariaDB is not installed (Debian: apt-get install mariadb-server "
                    "mariadb-client)")
    root = Path(tempfile.mkdtemp(prefix="mdb-"))
    as_root = ["--user=root"] if os.geteuid() == 0 else []
    data = root / "data"
    done = subprocess.run([installer, "--no-defaults", f"--datadir={data}", *as_root,
                           "--auth-root-authentication-method=normal", "--skip-test-db"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"mariadb-install-db failed: {done.stderr.strip()[-500:]}")
    log = open(root / "server.log", "wb")  # noqa: SIM115 - the server's own log, kept open
    process = subprocess.Popen(
        [server, "--no-defaults", f"--datadir={data}", f"--socket={root / 'sock'}",
         *(["--bind-address=127.0.0.1", f"--port={port}"] if port else ["--skip-networking"]),
         f"--pid-file={root / 'pid'}", *as_root,
         "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0",
         "--skip-log-bin"], stdout=log, stderr=subprocess.STDOUT)
    db = MariaDb(root, process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if db.socket.exists():
            try:
                db.sql("SELECT 1")
                return db
            except subprocess.CalledProcessError:
                pass
        time.sleep(0.2)
    text = (root / "server.log").read_text(errors="replace")[-800:]
    db.stop()
    unavailable(f"the MariaDB test server did not start: {text}")
