"""Test helpers: real tiny wheels, profiles, the CLI as a subprocess, and the air gap."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent
NETNS_DRIVER = Path(__file__).resolve().parent / "netns_driver.py"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    err: str
    seconds: float = 0.0  # wall time, where measured (offline: each command's own)


def bundle(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
           timeout: float = 300) -> Run:
    """Run the real `bundle` CLI in a subprocess (exit codes and output as a user sees them)."""
    done = subprocess.run([sys.executable, "-m", "bundler", *map(os.fspath, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)
    return Run(done.returncode, done.stdout, done.stderr)


def netns_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return done.returncode == 0


def unavailable(why: str) -> NoReturn:
    """A test's real dependency (engine, server, tool) is missing here. CI must run every test,
    so under CI=true this FAILS; on a developer's machine it skips, saying what is missing."""
    if IN_CI:
        pytest.fail(f"{why}, and CI must run this test (scripts/ci-host-setup.sh installs it)")
    pytest.skip(why)  # not under CI: the line above has failed the test there


def require_netns() -> None:
    if not netns_available():
        unavailable("unshare -n is not available (needs root or user namespaces)")


@dataclass(frozen=True)
class HostLink:
    """A named network namespace whose one link is a veth pair to this host: from inside,
    `host` (this host's end) is the only address besides loopback; no route leads further."""

    netns: str
    host: str


@contextlib.contextmanager
def host_link() -> Iterator[HostLink]:
    """For compose stacks health-checked over their published ports: the engine publishes
    them on `host` (PUBLISH_ADDR), which the install side reaches and nothing beyond it."""
    require_netns()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        unavailable("a veth link to a network namespace needs root and iproute2")
    n = os.getpid() % 60000 + 1 + secrets.randbelow(4000)
    name, veth = f"bundler-t{n}", f"bt{n}"
    host = f"10.{231 + n // 16384}.{n // 64 % 256}.{n % 64 * 4 + 1}"
    inside = host[:host.rindex(".") + 1] + str(int(host.rsplit(".", 1)[1]) + 1)
    steps = [["ip", "netns", "add", name],
             ["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "n"],
             ["ip", "link", "set", veth + "n", "netns", name],
             ["ip", "addr", "add", f"{host}/30", "dev", veth],
             ["ip", "link", "set", veth, "up"],
             ["ip", "-n", name, "addr", "add", f"{inside}/30", "dev", veth + "n"],
             ["ip", "-n", name, "link", "set", veth + "n", "up"]]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        yield HostLink(name, host)
    finally:
        subprocess.run(["ip", "link", "del", veth], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def offline(*commands: list[str], timeout: float = 600, link: HostLink | None = None,
            ) -> list[Run]:
    """Run commands one after another inside ONE new network namespace with no network at
    all (only loopback, brought up first). Services they start stay in that namespace.
    With `link`, inside that namespace instead (its one link leads to this host only)."""
    require_netns()
    enter = ["unshare", "-n"] if link is None else ["nsenter", f"--net=/run/netns/{link.netns}"]
    done = subprocess.run(
        [*enter, sys.executable, str(NETNS_DRIVER),
         json.dumps([[os.fspath(a) for a in c] for c in commands])],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert done.returncode == 0, f"netns driver failed: {done.stderr}"
    return [Run(r["rc"], r["out"], r["err"], r["seconds"]) for r in json.loads(done.stdout)]


def tree_snapshot(root: Path) -> dict[str, str]:
    """Everything observable about a tree: names, types, modes, contents, link targets."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = f"link {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = f"dir {st.st_mode:o}"
            else:
                out[rel] = f"file {st.st_mode:o} {hashlib.sha256(p.read_bytes()).hexdigest()}"
    return out


def host_policy(root: Path, *grants: str | os.PathLike[str]) -> Path:
    """`<root>/policy.yaml` allowing `grants` (`host-mount=/srv/pg`, `privileged`, ...), as an
    operator writes it for what a bundle asks of the host (docs/host-policy.md)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "policy.yaml"
    path.write_text("allow:\n" + "".join(f"  - '{os.fspath(g)}'\n" for g in grants))
    path.chmod(0o644)
    return path


def bundle_argv(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "bundler", *map(os.fspath, args)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def make_wheel(out_dir: Path, name: str, version: str, files: dict[str, str],
               requires: tuple[str, ...] = (), tag: str = "py3-none-any") -> Path:
    """Write a real, installable wheel (METADATA, WHEEL, RECORD with hashes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    path = out_dir / f"{dist}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    wheel = f"Wheel-Version: 1.0\nGenerator: bundler-tests\nRoot-Is-Purelib: true\nTag: {tag}\n"
    entries = {**files, f"{dist}.dist-info/METADATA": meta, f"{dist}.dist-info/WHEEL": wheel}
    record = "".join(f"{n},{_record_hash(c.encode())},{len(c.encode())}\n"
                     for n, c in entries.items())
    record += f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for n, c in sorted({**entries, f"{dist}.dist-info/RECORD": record}.items()):
            info = zipfile.ZipInfo(n, date_time=(2020, 1, 1, 0, 0, 0))
            zf.writestr(info, c)
    return path


SERVER_PY = textwrap.dedent('''\
    """Test app: serves /health with the greeting from the bundled `tinygreet` wheel."""
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import tinygreet

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            healthy = os.environ.get("APP_HEALTHY", "1") == "1"
            body = json.dumps({"greeting": tinygreet.greet(),
                               "version": os.environ.get("APP_VERSION")}).encode()
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


@dataclass(frozen=True)
class Project:
    dir: Path
    wheelhouse: Path
    port: int

    def profile(self, version: str = "1.0.0", healthy: bool = True, sequence: int | None = None,
                extra: str = "") -> Path:
        """Write a profile for `version` and return its path."""
        seq = f"sequence: {sequence}\n" if sequence else ""
        text = textwrap.dedent(f"""\
            schema: 1
            name: shop
            version: {version}
            target:
              python: "{sys.version_info[0]}.{sys.version_info[1]}"
              platform: manylinux_2_28_x86_64
            python:
              requirements: requirements.txt
              find_links: [wheelhouse]
              no_index: true
            files:
              - src: app
                dest: app
            services:
              - name: web
                cwd: app
                command: ["{{venv}}/bin/python", "server.py", "{self.port}"]
                env:
                  APP_VERSION: "{version}"
                  APP_HEALTHY: "{1 if healthy else 0}"
            health:
              - name: web
                http: http://127.0.0.1:{self.port}/health
                timeout: 1s
                retries: {40 if healthy else 4}
                interval: 250ms
            """) + seq + extra
        path = self.dir / f"shop-{version}.yaml"
        path.write_text(text)
        return path



# A release with one database migrated by SQL files (the shape the data-safety, disk-full and
# crash tests upgrade); DB_PROFILE is appended to a Project's profile.
DB_PROFILE = """\
env:
  required: [DATABASE_URL]
database:
  url: ${DATABASE_URL}
migrations:
  - {name: schema, sql: app/db/migrations}
"""


def write_migration(project: Project, name: str, sql: str) -> Path:
    """One SQL migration file, shipped with the app's files."""
    d = project.dir / "app" / "db" / "migrations"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(sql)
    return d / name


def build_release(project: Project, keys: tuple[Path, Path], cache: Path, version: str,
                  seq: int, *, healthy: bool = True, extra: str = DB_PROFILE) -> Path:
    """`bundle build` of the project's profile (plus `extra`) at `version`; the bundle's path."""
    result = bundle("build", project.profile(version, healthy=healthy, sequence=seq, extra=extra),
                    "--key", keys[0], "--out", project.dir / "dist", "--cache-dir", cache,
                    "--json")
    assert result.rc == 0, result.err
    return Path(json.loads(result.out)["bundle"])

def make_project(base: Path) -> Project:
    """A small app with one real dependency wheel, built locally: no index needed."""
    wheelhouse = base / "wheelhouse"
    whl = make_wheel(wheelhouse, "tinygreet", "1.0",
                     {"tinygreet/__init__.py": "def greet():\n    return 'hello from a wheel'\n"})
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    (base / "requirements.txt").write_text(f"tinygreet==1.0 --hash=sha256:{sha}\n")
    app = base / "app"
    app.mkdir()
    (app / "server.py").write_text(SERVER_PY)
    return Project(base, wheelhouse, free_port())
