"""A PEP 503 simple index on 127.0.0.1, serving wheels the tests build."""

from __future__ import annotations

import hashlib
import http.server
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename


def write_index(wheels: list[Path], root: Path) -> None:
    """Lay out root/simple/<project>/index.html linking (with #sha256=) to root/files/.

    Takes wheels and sdists (*.tar.gz)."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    projects: dict[str, list[Path]] = {}
    for whl in wheels:
        (files / whl.name).write_bytes(whl.read_bytes())
        name = (parse_wheel_filename(whl.name)[0] if whl.name.endswith(".whl")
                else parse_sdist_filename(whl.name)[0])
        projects.setdefault(canonicalize_name(name), []).append(whl)
    simple = root / "simple"
    simple.mkdir(exist_ok=True)
    links = []
    for name, items in sorted(projects.items()):
        (simple / name).mkdir(exist_ok=True)
        rows = "".join(
            f'<a href="../../files/{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
            f"{w.name}</a>\n" for w in items)
        (simple / name / "index.html").write_text(f"<html><body>\n{rows}</body></html>\n")
        links.append(f'<a href="{name}/">{name}</a>')
    (simple / "index.html").write_text("<html><body>" + "\n".join(links) + "</body></html>\n")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # uv reads a wheel only up to its METADATA when the server has no range requests,
        # then hangs up: a broken pipe here is a client's choice, not a failure
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve `root` on 127.0.0.1; yields the simple index URL."""
    server = _Server(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()
