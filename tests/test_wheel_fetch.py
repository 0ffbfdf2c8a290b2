"""Wheels fetched directly over bundler's HTTP pool (issue 12): which file is chosen (as pip
would), from which source (PEP 691 JSON, PEP 503 HTML, find-links), retries, hashes.

The index is a tiny local HTTP server scripted per test (the adapter boundary); the choice is
compared with the real `pip download` against the same kind of index."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from bundler.build.cache import Cache
from bundler.build.profile import PythonSpec
from bundler.build.resolve import http as bhttp
from bundler.build.resolve import pyindex, wheels
from bundler.build.resolve import target as tgt
from bundler.bundle.models import Target
from bundler.errors import BuildError
from bundler.redact import redact
from tests.helpers import make_wheel
from tests.pyindex_server import serve, write_index

TARGET = Target("3.11", "manylinux_2_28_x86_64")
JSON = "application/vnd.pypi.simple.v1+json"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Index:
    """Scripted answers by path: a list is served in order (its last entry from then on)."""

    url: str
    routes: dict[str, list[Reply]]
    seen: list[tuple[str, str, str]]  # (path, Accept, Authorization)


@contextmanager
def index_server(auth: str | None = None) -> Iterator[Index]:
    routes: dict[str, list[Reply]] = {}
    seen: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            given = self.headers.get("Authorization", "")
            with lock:
                seen.append((self.path, self.headers.get("Accept", ""), given))
                replies = routes.get(self.path, [Reply(404, b"not found")])
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
            if auth is not None and given != auth:
                reply = Reply(401, b"who are you")
            self.send_response(reply.status)
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield Index(f"http://127.0.0.1:{server.server_address[1]}", routes, seen)
    finally:
        server.shutdown()
        server.server_close()


def html(links: list[str], base: str | None = None) -> Reply:
    head = f'<base href="{base}">' if base else ""
    body = f"<html><head>{head}</head><body>" + "".join(
        f"{a}\n" for a in links) + "</body></html>"
    return Reply(200, body.encode(), {"Content-Type": "text/html"})


def file_reply(path: Path) -> Reply:
    return Reply(200, path.read_bytes(), {"Content-Type": "application/octet-stream"})


def pinned(tmp: Path, *lines: str) -> PythonSpec:
    req = tmp / "requirements.txt"
    req.write_text("".join(f"{ln}\n" for ln in lines))
    return PythonSpec(requirements=req)


def resolve(spec: PythonSpec, tmp: Path) -> dict[str, wheels.LockedWheel]:
    got = wheels.resolve(spec, TARGET, Cache(tmp / "cache"), lambda _m: None)
    return {w.name: w for w in got}


def test_json_api_relative_urls_hashes_and_the_best_tag(tmp_path: Path) -> None:
    built = tmp_path / "built"
    generic = make_wheel(built, "alpha", "1.0", {"alpha.py": ""})
    best = make_wheel(built, "alpha", "1.0", {"alpha.py": ""},
                      tag="cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64")
    older = make_wheel(built, "alpha", "0.9", {"alpha.py": ""},
                       tag="cp311-cp311-manylinux_2_28_x86_64")
    other = make_wheel(built, "alpha", "1.0", {"alpha.py": ""},
                       tag="cp311-cp311-manylinux_2_34_x86_64")  # too new for the target
    with index_server() as idx:
        files = [{"filename": w.name, "url": f"../../files/{w.name}",
                  "hashes": {"sha256": sha(w)}} for w in (generic, best, older, other)]
        idx.routes["/simple/alpha/"] = [Reply(200, json.dumps(
            {"meta": {"api-version": "1.1"}, "name": "alpha", "files": files}).encode(),
            {"Content-Type": JSON})]
        for w in (generic, best, older, other):
            idx.routes[f"/files/{w.name}"] = [file_reply(w)]
        spec = PythonSpec(requirements=pinned(tmp_path, "alpha==1.0").requirements,
                          index_url=f"{idx.url}/simple/")
        got = resolve(spec, tmp_path)
        assert got["alpha"].file == best.name and got["alpha"].sha256 == sha(best)
        # asked for PEP 691 JSON first; only the chosen file was downloaded
        assert idx.seen[0][1].startswith(JSON)
        assert [p for p, _, _ in idx.seen if p.startswith("/files/")] == [f"/files/{best.name}"]
    assert Cache(tmp_path / "cache").has(sha(best))


def test_html_page_with_base_href_fragments_and_auth(tmp_path: Path) -> None:
    built = tmp_path / "built"
    whl = make_wheel(built, "beta-pkg", "2.0", {"beta_pkg.py": ""})
    token = "Basic " + base64.b64encode(b"user:s3cret").decode()
    with index_server(auth=token) as idx:
        idx.routes["/simple/beta-pkg/"] = [html(
            [f'<a href="{whl.name}#sha256={sha(whl)}">{whl.name}</a>'],
            base="/packages/b/")]
        idx.routes[f"/packages/b/{whl.name}"] = [file_reply(whl)]
        host = idx.url.removeprefix("http://")
        spec = PythonSpec(requirements=pinned(tmp_path, "Beta_Pkg==2.0").requirements,
                          index_url=f"http://user:s3cret@{host}/simple")
        got = resolve(spec, tmp_path)
        assert got["beta-pkg"].file == whl.name
        assert all(a == token for _, _, a in idx.seen)


@pytest.fixture
def netrc_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(path))
    bhttp._netrc.cache_clear()
    yield path
    bhttp._netrc.cache_clear()


def test_a_private_index_takes_its_credentials_from_netrc_as_pip_does(
        tmp_path: Path, netrc_file: Path) -> None:
    built = tmp_path / "built"
    whl = make_wheel(built, "gamma", "1.0", {"gamma.py": ""})
    token = "Basic " + base64.b64encode(b"ci:t0ken-from-netrc").decode()
    with index_server(auth=token) as idx:
        idx.routes["/simple/gamma/"] = [html([f'<a href="/f/{whl.name}">{whl.name}</a>'])]
        idx.routes[f"/f/{whl.name}"] = [file_reply(whl)]
        spec = PythonSpec(requirements=pinned(tmp_path, "gamma==1.0").requirements,
                          index_url=f"{idx.url}/simple/")
        # no netrc: the 401 says how to give credentials, and never shows any
        with pytest.raises(BuildError) as no_creds:
            resolve(spec, tmp_path)
        assert "HTTP 401" in no_creds.value.message, no_creds.value.message
        assert "user:token@host, or in ~/.netrc" in no_creds.value.message
        netrc_file.write_text("machine 127.0.0.1 login ci password t0ken-from-netrc\n")
        netrc_file.chmod(0o600)
        bhttp._netrc.cache_clear()
        got = resolve(spec, tmp_path)
        assert got["gamma"].sha256 == sha(whl)
        assert idx.seen[-1] == (f"/f/{whl.name}", "*/*", token)
        assert "t0ken-from-netrc" not in redact("GET failed: t0ken-from-netrc")


def test_429_with_retry_after_then_503_then_success(tmp_path: Path) -> None:
    whl = make_wheel(tmp_path / "built", "gamma", "1.0", {"gamma.py": ""})
    with index_server() as idx:
        idx.routes["/simple/gamma/"] = [Reply(429, b"slow down", {"Retry-After": "1"}),
                                        html([f'<a href="/f/{whl.name}">x</a>'])]
        idx.routes[f"/f/{whl.name}"] = [Reply(503, b"busy"), file_reply(whl)]
        spec = PythonSpec(requirements=pinned(tmp_path, "gamma==1.0").requirements,
                          index_url=f"{idx.url}/simple/")
        started = time.monotonic()
        got = resolve(spec, tmp_path)
        assert time.monotonic() - started >= 1.0  # Retry-After was honoured
        assert got["gamma"].sha256 == sha(whl)
        assert [p for p, _, _ in idx.seen] == ["/simple/gamma/", "/simple/gamma/",
                                               f"/f/{whl.name}", f"/f/{whl.name}"]


def test_hash_mismatch_names_the_file_and_stores_nothing(tmp_path: Path) -> None:
    whl = make_wheel(tmp_path / "built", "delta", "1.0", {"delta.py": ""})
    with index_server() as idx:
        idx.routes["/simple/delta/"] = [html([f'<a href="/f/{whl.name}">x</a>'])]
        idx.routes[f"/f/{whl.name}"] = [Reply(200, whl.read_bytes() + b"tampered")]
        spec = PythonSpec(requirements=pinned(
            tmp_path, f"delta==1.0 --hash=sha256:{sha(whl)}").requirements,
            index_url=f"{idx.url}/simple/")
        with pytest.raises(BuildError) as err:
            resolve(spec, tmp_path)
    assert whl.name in err.value.message and "--hash" in err.value.message
    objects = tmp_path / "cache" / "objects"
    assert not objects.exists() or not any(p.is_file() for p in objects.rglob("*"))


def test_yanked_file_only_when_every_candidate_is_yanked(tmp_path: Path) -> None:
    built = tmp_path / "built"
    good = make_wheel(built, "eps", "1.0", {"eps.py": ""})
    yanked_best = make_wheel(built, "eps", "1.0", {"eps.py": ""},
                             tag="cp311-cp311-manylinux_2_28_x86_64")
    only = make_wheel(built, "zeta", "3.0", {"zeta.py": ""})
    with index_server() as idx:
        idx.routes["/simple/eps/"] = [html([
            f'<a href="/f/{good.name}">a</a>',
            f'<a href="/f/{yanked_best.name}" data-yanked="broken build">b</a>'])]
        idx.routes["/simple/zeta/"] = [Reply(200, json.dumps({"files": [
            {"url": f"/f/{only.name}", "hashes": {}, "yanked": "oops"}]}).encode(),
            {"Content-Type": JSON})]
        for w in (good, yanked_best, only):
            idx.routes[f"/f/{w.name}"] = [file_reply(w)]
        spec = PythonSpec(requirements=pinned(tmp_path, "eps==1.0", "zeta==3.0").requirements,
                          index_url=f"{idx.url}/simple/")
        got = resolve(spec, tmp_path)
    assert got["eps"].file == good.name      # the yanked one has the better tag: skipped
    assert got["zeta"].file == only.name     # all yanked and pinned exactly: taken (PEP 592)


def test_requires_python_and_no_fitting_wheel_name_every_pin(tmp_path: Path) -> None:
    built = tmp_path / "built"
    futur = make_wheel(built, "eta", "1.0", {"eta.py": ""})
    native = make_wheel(built, "theta", "1.0", {"theta.py": ""},
                        tag="cp311-cp311-win_amd64")
    fine = make_wheel(built, "iota", "1.0", {"iota.py": ""})
    with index_server() as idx:
        idx.routes["/simple/eta/"] = [html(
            [f'<a href="/f/{futur.name}" data-requires-python="&gt;=3.12">a</a>'])]
        idx.routes["/simple/theta/"] = [html([f'<a href="/f/{native.name}">a</a>'])]
        idx.routes["/simple/iota/"] = [html([f'<a href="/f/{fine.name}">a</a>'])]
        idx.routes[f"/f/{fine.name}"] = [file_reply(fine)]
        spec = PythonSpec(requirements=pinned(
            tmp_path, "eta==1.0", "theta==1.0", "iota==1.0", "kappa==1.0").requirements,
            index_url=f"{idx.url}/simple/")
        with pytest.raises(BuildError) as err:
            resolve(spec, tmp_path)
    msg = err.value.message
    assert "eta 1.0 requires Python >=3.12" in msg
    assert "theta 1.0 has no wheel for CPython 3.11" in msg and "win_amd64" in msg
    assert "kappa 1.0 is not on the index" in msg and "iota" not in msg


def test_find_links_directory_without_an_index(tmp_path: Path) -> None:
    house = tmp_path / "house"
    whl = make_wheel(house, "lam", "0.1", {"lam.py": ""})
    make_wheel(house, "lam", "0.2", {"lam.py": ""})
    make_wheel(house, "other", "0.1", {"other.py": ""})
    spec = PythonSpec(requirements=pinned(tmp_path, f"lam==0.1 --hash=sha256:{sha(whl)}"
                                          ).requirements,
                      find_links=(str(house),), no_index=True)
    got = resolve(spec, tmp_path)
    assert got["lam"].file == whl.name and got["lam"].sha256 == sha(whl)


def test_a_locked_wheel_is_fetched_again_exactly(tmp_path: Path) -> None:
    built = tmp_path / "built"
    generic = make_wheel(built, "mu", "1.0", {"mu.py": ""})
    native = make_wheel(built, "mu", "1.0", {"mu.py": ""},
                        tag="cp311-cp311-manylinux_2_17_x86_64")
    with index_server() as idx:
        idx.routes["/simple/mu/"] = [html([f'<a href="/f/{w.name}">x</a>'
                                           for w in (generic, native)])]
        for w in (generic, native):
            idx.routes[f"/f/{w.name}"] = [file_reply(w)]
        spec = PythonSpec(requirements=tmp_path / "unused", index_url=f"{idx.url}/simple/")
        locked = [wheels.LockedWheel("mu", "1.0", (), generic.name, sha(generic),
                                     generic.stat().st_size)]
        fetched, n = wheels.materialize(locked, spec, TARGET, Cache(tmp_path / "c"),
                                        lambda _m: None)
    assert n == 1 and fetched.entries[0].sha256 == sha(generic)  # not the better-tagged one


def test_target_tags_are_in_pips_order() -> None:
    from pip._internal.models.target_python import TargetPython

    for plat in ("manylinux_2_28_x86_64", "manylinux_2_17_aarch64", "manylinux_2_12_x86_64",
                 "musllinux_1_2_x86_64", "linux_x86_64"):
        for py in ("3.8", "3.11", "3.13"):
            target = Target(py, plat)
            theirs = TargetPython(platforms=tgt.platforms(target), implementation="cp",
                                  py_version_info=tgt.python_tuple(target)).get_sorted_tags()
            assert [str(t) for t in tgt.sorted_tags(target)] == [str(t) for t in theirs]


# wheels of one version that differ in tag, build number and yanked state: pip must choose
# among them (each line: project, tags, yanked)
CHOICES = [
    ("nu", ["py3-none-any", "cp311-abi3-manylinux_2_17_x86_64",
            "cp311-cp311-manylinux_2_12_x86_64.manylinux2010_x86_64",
            "cp311-cp311-manylinux_2_16_x86_64"], []),
    ("xi", ["py2.py3-none-any", "cp311-none-any"], []),
    ("rho", ["cp310-abi3-manylinux_2_28_x86_64", "cp311-none-any", "py3-none-any"], []),
    ("omicron", ["py3-none-any", "cp311-cp311-manylinux_2_28_x86_64"],
     ["cp311-cp311-manylinux_2_28_x86_64"]),
    ("pi", ["cp311-cp311-linux_x86_64", "cp311-cp311-musllinux_1_2_x86_64",
            "py3-none-manylinux_2_17_x86_64"], []),
]


def test_the_choice_is_pips_on_a_local_index(tmp_path: Path) -> None:
    built = tmp_path / "built"
    made: list[Path] = []
    yanked: set[str] = set()
    for name, tags, yanked_tags in CHOICES:
        for tag in tags:
            whl = make_wheel(built / tag, name, "1.0", {f"{name}.py": f"# {tag}\n"}, tag=tag)
            made.append(whl)
            if tag in yanked_tags:
                yanked.add(whl.name)
    # a build-numbered twin outranks the plain one with the same tag
    twin = make_wheel(built / "b", "xi", "1.0", {"xi.py": "# build 1\n"}, tag="cp311-none-any")
    made.append(twin.rename(twin.with_name("xi-1.0-1-cp311-none-any.whl")))
    root = tmp_path / "index"
    write_index(made, root)
    for name in {n for n, _, _ in CHOICES}:
        page = root / "simple" / name / "index.html"
        text = page.read_text()
        for file in yanked:
            text = re.sub(rf'(href="[^"]*/{re.escape(file)}#[^"]*")', r'\1 data-yanked=""', text)
        page.write_text(text)
    pins = [f"{n}==1.0" for n, _, _ in CHOICES]
    with serve(root) as url:
        spec = PythonSpec(requirements=pinned(tmp_path, *pins).requirements, index_url=url)
        ours = {n: pyindex.choose_wheel(pyindex.project_files(spec, n), n, "1.0", TARGET)
                for n, _, _ in CHOICES}
        dest = tmp_path / "pip"
        args = [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps",
                "--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11",
                "--index-url", url, "-d", str(dest), *pins]
        for plat in tgt.platforms(TARGET):
            args += ["--platform", plat]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        subprocess.run(args, check=True, capture_output=True, env=env)
    theirs = {canonicalize_name(p.name.split("-")[0]): (p.name, sha(p)) for p in dest.iterdir()}
    assert {n: (f.filename, f.sha256) for n, f in ours.items() if f} == theirs
    assert ours["xi"] and ours["xi"].filename == "xi-1.0-1-cp311-none-any.whl"
    assert ours["rho"] and "abi3" in ours["rho"].filename
    assert ours["nu"] and "manylinux2010" in ours["nu"].filename  # pip's legacy-tag order
    assert ours["omicron"] and ours["omicron"].filename.endswith("py3-none-any.whl")


def test_redirected_page_links_are_relative_to_where_it_landed(tmp_path: Path) -> None:
    whl = make_wheel(tmp_path / "built", "sigma", "1.0", {"sigma.py": ""})
    with index_server() as idx:
        idx.routes["/simple/sigma/"] = [Reply(301, b"", {"Location": "/mirror/p/sigma/"})]
        idx.routes["/mirror/p/sigma/"] = [html([f'<a href="../../f/{whl.name}">x</a>'])]
        idx.routes[f"/mirror/f/{whl.name}"] = [file_reply(whl)]
        spec = PythonSpec(requirements=pinned(tmp_path, "sigma==1.0").requirements,
                          index_url=f"{idx.url}/simple/")
        assert resolve(spec, tmp_path)["sigma"].sha256 == sha(whl)


def test_file_index_and_find_links_pages_and_file_urls(tmp_path: Path) -> None:
    built = tmp_path / "built"
    on_disk = make_wheel(built, "tau", "1.0", {"tau.py": ""})
    linked = make_wheel(built, "upsilon", "1.0", {"upsilon.py": ""})
    direct = make_wheel(built, "phi", "1.0", {"phi.py": ""})
    write_index([on_disk], tmp_path / "index")  # simple/tau/index.html -> ../../files/
    with index_server() as idx:
        idx.routes["/links.html"] = [html([f'<a href="dl/{linked.name}">u</a>'])]
        idx.routes[f"/dl/{linked.name}"] = [file_reply(linked)]
        idx.routes[f"/wheels/{direct.name}"] = [file_reply(direct)]
        spec = PythonSpec(
            requirements=pinned(tmp_path, "tau==1.0", "upsilon==1.0", "phi==1.0").requirements,
            index_url=(tmp_path / "index" / "simple").as_uri(),
            find_links=(f"{idx.url}/links.html", f"{idx.url}/wheels/{direct.name}"))
        got = resolve(spec, tmp_path)
    assert {n: w.sha256 for n, w in got.items()} == {
        "tau": sha(on_disk), "upsilon": sha(linked), "phi": sha(direct)}


def test_downloads_that_fail_midway_give_their_connection_back(tmp_path: Path) -> None:
    """A failed consumer (hash mismatch, full disk) closes its connection: it must still
    free its pool slot, or after MAX_PARALLEL failures every later download waits forever."""
    from bundler.build.resolve import http as bhttp

    def refuse(_chunks: Iterator[bytes]) -> None:
        raise ValueError("no")

    outcome: list[object] = []

    def many() -> None:
        for _ in range(bhttp.MAX_PARALLEL * 2):
            with pytest.raises(ValueError):
                bhttp.stream(f"{idx.url}/blob", refuse)
        outcome.append(bhttp.get_bytes(f"{idx.url}/blob"))

    with index_server() as idx:
        idx.routes["/blob"] = [Reply(200, b"x" * 100_000)]
        worker = threading.Thread(target=many, daemon=True)
        worker.start()
        worker.join(timeout=30)
    assert not worker.is_alive(), "the pool ran out of connections"
    assert outcome == [b"x" * 100_000]


def test_lock_on_a_terminal_draws_the_downloads_and_finishes(tmp_path: Path) -> None:
    """More wheels than parallel downloads, with the live progress rows drawn (stderr is a
    terminal): every row comes and goes while others are still running."""
    built = tmp_path / "built"
    made = [make_wheel(built, f"tty{i}", "1.0", {f"tty{i}.py": "x = 1\n" * 20_000})
            for i in range(12)]
    write_index(made, tmp_path / "index")
    (tmp_path / "requirements.txt").write_text(
        "".join(f"tty{i}==1.0 --hash=sha256:{sha(w)}\n" for i, w in enumerate(made)))
    profile = tmp_path / "tty.yaml"
    with serve(tmp_path / "index") as url:
        profile.write_text(
            "schema: 1\nname: tty\nversion: 1.0.0\ntarget:\n  python: \"3.11\"\n"
            "  platform: manylinux_2_28_x86_64\npython:\n  requirements: requirements.txt\n"
            f"  index_url: {url}\n")
        leader, follower = os.openpty()
        chunks: list[bytes] = []

        def drain() -> None:  # a full pty would block the writer
            with contextlib.suppress(OSError):
                while chunk := os.read(leader, 65536):
                    chunks.append(chunk)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "bundler", "lock", str(profile), "--cache-dir",
                 str(tmp_path / "cache")], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=follower, timeout=120, check=False,
                env={**os.environ, "TERM": "xterm", "COLUMNS": "120"})
        finally:
            os.close(follower)
            reader.join(timeout=10)
            os.close(leader)
        screen = b"".join(chunks)
    assert done.returncode == 0, screen.decode(errors="replace")[-2000:]
    text = screen.decode(errors="replace")
    assert "wheels" in text and "files" in text and "\x1b[" in text  # the live rows
    locked = json.loads(profile.with_suffix(".lock").read_text())["python"]
    assert sorted(w["sha256"] for w in locked) == sorted(sha(w) for w in made)


def test_a_locked_wheel_gone_or_changed_on_the_index_fails_naming_it(tmp_path: Path) -> None:
    whl = make_wheel(tmp_path / "built", "chi", "1.0", {"chi.py": ""})
    with index_server() as idx:
        idx.routes["/simple/chi/"] = [html([f'<a href="/f/{whl.name}">x</a>'])]
        idx.routes[f"/f/{whl.name}"] = [Reply(200, whl.read_bytes() + b"!")]
        spec = PythonSpec(requirements=tmp_path / "unused", index_url=f"{idx.url}/simple/")
        size = whl.stat().st_size
        gone = [wheels.LockedWheel("chi", "1.0", (), "chi-1.0-py2-none-any.whl", sha(whl), size)]
        changed = [wheels.LockedWheel("chi", "1.0", (), whl.name, sha(whl), size)]
        for locked, words in ((gone, "chi-1.0-py2-none-any.whl (chi 1.0) is not on the package "
                                     "index any more"),
                              (changed, f"{whl.name} does not match bundle.lock")):
            with pytest.raises(BuildError) as err:
                wheels.materialize(locked, spec, TARGET, Cache(tmp_path / "c"), lambda _m: None)
            assert words in err.value.message


def test_parallel_downloads_report_the_first_failure_in_input_order() -> None:
    from concurrent.futures import ThreadPoolExecutor

    def job(i: int) -> int:
        if i == 0:
            time.sleep(0.3)  # fails last
            raise BuildError("pin 0 failed", hint="h")
        if i == 2:
            raise BuildError("pin 2 failed", hint="h")
        return i

    with ThreadPoolExecutor(max_workers=3) as pool, pytest.raises(BuildError) as err:
        bhttp.wait_in_order({pool.submit(job, i): i for i in range(3)})
    assert err.value.message == "pin 0 failed (and 1 more failed)" and err.value.hint == "h"
    with ThreadPoolExecutor(max_workers=2) as pool:
        bhttp.wait_in_order({pool.submit(job, i): i for i in (1, 3)})  # none fails: returns


def test_a_warm_cache_gives_each_target_its_own_wheel(tmp_path: Path) -> None:
    """A pin's hashes name every file of its version (one per Python ABI). The cache holds
    bytes, not names: one Python's cached wheel must not stand in for another's (issue 17:
    a kit for 3.13 carried 3.11's compiled cffi)."""
    house = tmp_path / "house"
    abi = {py: make_wheel(house, "delta", "1.0", {"delta.py": ""},
                          tag=f"cp{py}-cp{py}-manylinux_2_17_x86_64") for py in ("311", "312")}
    pin = "delta==1.0 " + " ".join(f"--hash=sha256:{sha(w)}" for w in abi.values())
    for index_states_hashes in (False, True):
        work = tmp_path / f"states-{index_states_hashes}"
        if index_states_hashes:  # a PEP 503 page with #sha256= fragments
            page = house / "links.html"
            page.write_text("".join(f'<a href="{w.name}#sha256={sha(w)}">{w.name}</a>\n'
                                    for w in abi.values()))
            links = (page.as_uri(),)
        else:  # a find-links directory: no stated hash, only the pin's
            links = (str(house),)
        spec = PythonSpec(requirements=pinned(work.parent, pin).requirements, find_links=links,
                          no_index=True)
        cache = Cache(work / "cache")
        for py in ("3.11", "3.12"):  # the second on a cache warm with the first's wheel
            (got,) = wheels.resolve(spec, Target(py, "manylinux_2_28_x86_64"), cache,
                                    lambda _m: None)
            wanted = abi[py.replace(".", "")]
            assert (got.file, got.sha256) == (wanted.name, sha(wanted)), py
        if index_states_hashes:
            page.unlink()
