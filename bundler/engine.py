"""The Docker engine, through the docker SDK: one client factory for both sides (the build
host's engine for `source: engine` images, the target's for `docker load` and preflight)."""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from collections.abc import Sequence
from typing import Any

from bundler.errors import BundlerError

ENGINE_TIMEOUT = 3600.0  # docker-py's default of 60 s fails on large saves/loads (docker-py#1070)
LOOKUP_TIMEOUT = 10.0  # a quick look at the local engine that may find none (local_image_ids)


def docker_sdk() -> Any:
    """The `docker` package, imported only when used (it is slow to import)."""
    import docker  # type: ignore[import-untyped]

    return docker


def engine_client(error: type[BundlerError], base_url: str | None = None) -> Any:
    """A docker SDK client for the engine named by `base_url` (unix://, tcp://, ssh:// through
    the ssh binary) or else DOCKER_HOST (default: the local socket); `error` (the caller's
    side of the error tree) if the engine does not answer."""
    docker = docker_sdk()
    try:
        if base_url:
            client = docker.DockerClient(base_url=base_url, timeout=int(ENGINE_TIMEOUT),
                                         use_ssh_client=base_url.startswith("ssh://"))
        else:
            client = docker.from_env(timeout=int(ENGINE_TIMEOUT))
        client.ping()
    except docker.errors.DockerException as exc:
        raise error(f"the docker engine is not reachable: {first_line(str(exc))}",
                    hint="start it (`systemctl start docker`, or `dockerd &` as root) and check "
                         "`docker info`; DOCKER_HOST names the engine to use") from None
    return client


def local_image_ids(refs: Sequence[str], timeout: float = LOOKUP_TIMEOUT
                    ) -> dict[str, str | None] | None:
    """Each ref's image ID (None: the engine has no such image), asked of the local engine's
    API socket directly: importing the SDK and its HTTP stack takes about 0.2 s, more than a
    warm build spends on anything else but packing. None (ask through `engine_client`, whose
    errors say what is wrong) unless DOCKER_HOST is unset or a unix socket, the one case the
    SDK's `from_env` also serves over plain HTTP, and every answer is a plain 200 or 404."""
    import http.client

    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        return None

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(host.removeprefix("unix://"))
            self.sock = sock

    conn = Connection("localhost", timeout=timeout)
    out: dict[str, str | None] = {}
    try:
        for ref in refs:
            conn.request("GET", f"/images/{urllib.parse.quote_plus(ref, safe='/:')}/json")
            response = conn.getresponse()
            body = response.read()
            if response.status == 404:
                out[ref] = None
            elif response.status == 200:
                image_id = json.loads(body).get("Id")
                if not isinstance(image_id, str):
                    return None
                out[ref] = image_id
            else:
                return None
    except (OSError, http.client.HTTPException, ValueError, AttributeError):
        return None
    finally:
        conn.close()
    return out


def transport_errors() -> tuple[type[BaseException], ...]:
    """What the SDK's HTTP stack raises when the engine drops a connection mid-stream."""
    from requests.exceptions import RequestException
    from urllib3.exceptions import HTTPError

    return (RequestException, HTTPError)


def first_line(text: str) -> str:
    """The first line of an engine message, at most 300 characters ("" if empty)."""
    lines = str(text).strip().splitlines()
    return lines[0][:300] if lines else ""
