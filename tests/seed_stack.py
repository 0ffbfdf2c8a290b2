"""What the seed stacks' tests (test_seed_002, test_seed_003) share: HTTP from inside the
install's namespace, a compose service's container, full dumps taken inside it, cleanup."""

from __future__ import annotations

import contextlib
import sys
from typing import Any


def get(url: str) -> list[str]:
    """argv that prints the body of GET `url` (run inside the install's namespace)."""
    return [sys.executable, "-c", "import urllib.request, sys; r = urllib.request.urlopen("
            f"{url!r}, timeout=10); sys.stdout.write(r.read().decode())"]


def container(engine: Any, project: str, service: str) -> Any:
    (found,) = engine.containers.list(filters={"label": [
        f"com.docker.compose.project={project}", f"com.docker.compose.service={service}"]})
    return found


def pg_dump(engine: Any, project: str, user: str, dbname: str,
            service: str = "postgres") -> str:
    """The database's full plain-text dump, taken inside its container."""
    code, out = container(engine, project, service).exec_run(
        ["pg_dump", "-h", "/var/run/postgresql", "-U", user, dbname])
    assert code == 0, out
    # pg_dump 15.14+ brackets its output with a random \restrict key: not the contents
    return "".join(line for line in out.decode().splitlines(keepends=True)
                   if not line.startswith(("\\restrict ", "\\unrestrict ")))


def clean(engine: Any, project: str) -> None:
    """Remove the project's containers, volumes and networks."""
    label = {"label": f"com.docker.compose.project={project}"}
    for c in engine.containers.list(all=True, filters=label):
        c.remove(force=True)
    for v in engine.volumes.list(filters=label):
        v.remove(force=True)
    for n in engine.networks.list(filters=label):
        with contextlib.suppress(Exception):
            n.remove()
