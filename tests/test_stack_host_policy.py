"""The host policy against a real engine, installed under `unshare -n`: a compose bundle that
asks for a privileged container and the host's `/` is refused (exit 23) before anything is
created (no staging directory, no container, state.db unchanged), then allowed with --allow and
with `<root>/policy.yaml`; `rollback` to such a release is checked again; and a signer whose
manifest hides what its compose file asks is refused on the verified files themselves."""

from __future__ import annotations

import contextlib
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle import hostreq
from bundler.bundle.models import ComposeSpec, Runtime
from bundler.errors import HostPolicyError, RolledBackError
from bundler.install import compose_runtime as cr
from tests import docker_fixtures as dfx
from tests.bundles import write_bundle
from tests.helpers import Run, bundle, bundle_argv, host_policy, offline
from tests.helpers import tree_snapshot as snapshot

pytestmark = [pytest.mark.docker]

PRODUCT = "hostpol"
PRIVILEGED = "privileged: true\nvolumes: ['/:/host:ro']\n"
HOST_ROOT = "volumes: ['/:/host:ro']\ncap_add: [SYS_ADMIN]\npid: host\n"
FLAGS = ("--allow", "host-mount=/", "--allow", "cap=SYS_ADMIN", "--allow", "host-pid")


def _profile(base: Path, version: str, seq: int, image: str, asks: str, check: str) -> Path:
    app = base / f"app-{version}"
    app.mkdir(parents=True)
    (app / "docker-compose.yml").write_text("services:\n  web:\n" + textwrap.indent(
        f"image: {image}\ncommand: [busybox, sleep, '3600']\ninit: true\n{asks}"
        f"healthcheck:\n  test: [CMD-SHELL, '{check}']\n  interval: 1s\n  retries: 10\n",
        "    "))
    profile = base / f"p-{version}.yaml"
    profile.write_text(textwrap.dedent(f"""\
        schema: 1
        name: {PRODUCT}
        version: {version}
        sequence: {seq}
        images:
          - ref: {image}
        files:
          - {{src: app-{version}, dest: stack}}
        compose:
          files: [stack/docker-compose.yml]
        """))
    return profile


def _containers(engine: Any, root: Path) -> list[tuple[str, str]]:
    label = f"com.docker.compose.project={cr.project_name(PRODUCT, root)}"
    return sorted((c.id, c.status) for c in engine.containers.list(all=True,
                                                                   filters={"label": label}))


def _purge(engine: Any, *roots: Path) -> None:
    for root in roots:
        if root.exists():
            bundle("stop", "--root", root)
        label = f"com.docker.compose.project={cr.project_name(PRODUCT, root)}"
        for c in engine.containers.list(all=True, filters={"label": label}):
            with contextlib.suppress(Exception):
                c.remove(force=True)
        for n in engine.networks.list(filters={"label": label}):
            with contextlib.suppress(Exception):
                n.remove()


def _runs_privileged(engine: Any, image: str) -> bool:
    import docker

    name = f"hostpol-probe-{dfx.unique()}"
    try:
        engine.containers.run(image, ["busybox", "true"], privileged=True, name=name)
        return True
    except docker.errors.APIError as exc:
        assert "apply caps" in str(exc), exc  # the engine's own refusal, nothing else
        return False
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            engine.containers.get(name).remove(force=True)


def _error(run: Run) -> str:
    lines = [ln for ln in run.err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, run.err
    return lines[0]


@pytest.mark.slow
def test_privileged_and_host_mounts_refused_before_anything_then_allowed(
        tmp_path: Path, engine: Any, keys: tuple[Path, Path]) -> None:
    image = f"bundler-test/hostpol:{dfx.unique()}"
    dfx.import_base(engine, image)
    root, fresh = tmp_path / "target", tmp_path / "fresh"
    try:
        built = {}
        for version, seq, asks, check in (
                ("1.0.0", 1, "", "busybox true"),
                ("2.0.0", 2, PRIVILEGED, "test -e /host/etc/os-release"),
                ("3.0.0", 3, HOST_ROOT, "test -e /host/etc/os-release"),
                ("4.0.0", 4, "", "busybox true")):
            done = bundle("build", _profile(tmp_path, version, seq, image, asks, check),
                          "--key", keys[0], "--out", tmp_path / "out", "--cache-dir",
                          tmp_path / "cache", "--json")
            assert done.rc == 0, done.err
            built[version] = Path(json.loads(done.out)["bundle"])

        # inspect lists what the privileged bundle asks, from the envelope alone
        shown = bundle("inspect", built["2.0.0"], "--trust", keys[1], "--json")
        assert shown.rc == 0, shown.err
        assert [(r["service"], r["kind"], r["value"], r["allow"])
                for r in json.loads(shown.out)["host_requests"]] == [
            ("web", "privileged", "", "privileged"), ("web", "host-mount", "/", "host-mount=/")]

        trust: list[str | Path] = ["--trust", keys[1], "--root", root]
        (first,) = offline(bundle_argv("install", built["1.0.0"], *trust))
        assert first.rc == 0, first.err
        before, running = snapshot(root), _containers(engine, root)
        assert len(running) == 1

        (refused,) = offline(bundle_argv("install", built["2.0.0"], *trust))
        assert refused.rc == HostPolicyError.exit_code, refused.err
        assert _error(refused) == (
            "error: compose service web asks for a privileged container (every capability and "
            "device, no confinement) (privileged: true) (and host-mount=/ for compose service "
            "web), which this host's policy does not allow: pass --allow privileged --allow "
            "host-mount=/ for this install, or add `allow: [privileged, host-mount=/]` to "
            f"{root}/policy.yaml")
        # nothing was created: no staging directory, no release, state.db byte for byte, the
        # same container running
        assert snapshot(root) == before
        assert _containers(engine, root) == running
        (flagged,) = offline(bundle_argv("install", built["2.0.0"], *trust, "--allow",
                                         "privileged", "--allow", "host-mount=/"))
        # allowed: the policy lets it through to the engine. Where the engine itself runs in a
        # container that cannot grant every capability (this machine: DESIGN.md section 9),
        # runc refuses a privileged container, and the install rolls back as for any failed
        # start; elsewhere it installs.
        assert flagged.rc == (0 if _runs_privileged(engine, image)
                              else RolledBackError.exit_code), flagged.err
        assert "host's policy" not in flagged.err

        refused, policy_missing = offline(
            bundle_argv("install", built["3.0.0"], *trust),
            bundle_argv("install", built["3.0.0"], *trust, "--allow", "host-mount=/srv"))
        assert refused.rc == HostPolicyError.exit_code \
            and policy_missing.rc == HostPolicyError.exit_code
        assert "pass --allow host-pid --allow cap=SYS_ADMIN --allow host-mount=/ for this " \
               "install" in _error(refused)
        # a grant below / does not cover /
        assert "host-mount=/ for compose service web" in _error(policy_missing)

        policy = host_policy(root, "host-mount=/", "cap=SYS_ADMIN", "host-pid")
        (allowed,) = offline(bundle_argv("install", built["3.0.0"], *trust))
        assert allowed.rc == 0, allowed.err
        (web,) = engine.containers.list(filters={
            "label": f"com.docker.compose.project={cr.project_name(PRODUCT, root)}"})
        host = web.attrs["HostConfig"]
        assert (host["Privileged"], host["CapAdd"], host["PidMode"]) == (
            False, ["CAP_SYS_ADMIN"], "host")
        assert web.exec_run(["busybox", "test", "-e", "/host/etc/os-release"]).exit_code == 0
        events = json.loads(bundle("history", "--root", root, "--json").out)["events"]
        assert [e["detail"] for e in events if e["step"] == "host-policy"] == [
            "privileged for web (--allow: privileged); host-mount=/ for web (--allow: "
            "host-mount=/)",
            f"host-pid for web ({policy}: host-pid); cap=SYS_ADMIN for web ({policy}: "
            f"cap=SYS_ADMIN); host-mount=/ for web ({policy}: host-mount=/)"]

        # a release installed under a looser policy is not restarted silently by `rollback`
        (plain,) = offline(bundle_argv("install", built["4.0.0"], *trust))
        assert plain.rc == 0, plain.err
        policy.unlink()
        before, running = snapshot(root), _containers(engine, root)
        (back,) = offline(bundle_argv("rollback", "--root", root, "--to", "3.0.0"))
        assert back.rc == HostPolicyError.exit_code, back.err
        assert "pass --allow host-pid --allow cap=SYS_ADMIN --allow host-mount=/" in _error(back)
        # (checked before the journal is written or anything stopped)
        assert (snapshot(root), _containers(engine, root)) == (before, running)
        back_allowed, status = offline(
            bundle_argv("rollback", "--root", root, "--to", "3.0.0", *FLAGS),
            bundle_argv("status", "--root", root, "--json"))
        assert back_allowed.rc == 0, back_allowed.err
        assert json.loads(status.out)["current"]["version"] == "3.0.0"

        # a fresh root: refused leaves no root at all; --allow installs it
        (refused,) = offline(
            bundle_argv("install", built["3.0.0"], "--trust", keys[1], "--root", fresh))
        assert refused.rc == HostPolicyError.exit_code, refused.err
        assert not fresh.exists()
        (allowed,) = offline(
            bundle_argv("install", built["3.0.0"], "--trust", keys[1], "--root", fresh, *FLAGS))
        assert allowed.rc == 0, allowed.err
    finally:
        _purge(engine, root, fresh)
        dfx.remove_images(engine, image)


def test_a_fresh_root_is_not_created_by_a_refused_install(tmp_path: Path, engine: Any,
                                                          key: Ed25519PrivateKey,
                                                          pub: Path) -> None:
    """Refused before anything is created, on the manifest's record alone."""
    root = tmp_path / "target"
    path = _hand_made(tmp_path, key, b"services:\n  web: {image: x, network_mode: host}\n")
    done = bundle("install", path, "--trust", pub, "--root", root)
    assert done.rc == HostPolicyError.exit_code, done.err
    assert "compose service web asks for the host's network stack (network_mode: host)" \
        in _error(done)
    assert not root.exists()


def _hand_made(tmp_path: Path, key: Ed25519PrivateKey, compose: bytes,
               record: str | dict[str, Any] | None = "honest") -> Path:
    """A signed compose bundle with no images, its manifest's record of the compose file
    honest, absent (an older bundle) or a lie."""
    files = {"files/stack/compose.yml": compose}
    host = hostreq.excerpt_of_files([("stack/compose.yml", compose)]) if record == "honest" \
        else record
    spec = ComposeSpec(("stack/compose.yml",), host=host if isinstance(host, dict) else None)
    out = tmp_path / f"made{len(list(tmp_path.glob('made*')))}"
    out.mkdir()
    path = out / "shop-2.0.0.bundle"
    write_bundle(path, key, files, version="2.0.0", sequence=20, runtime=Runtime(compose=spec))
    return path


LIE = hostreq.excerpt_of_files([("stack/compose.yml", "services:\n  web: {image: x}\n")])


@pytest.mark.parametrize(("compose", "record", "message"), [
    (b"services:\n  web: {image: x, privileged: true}\n", LIE,
     "error: the signed manifest of shop 2.0.0 records other requests than its compose files "
     "make of the host: that record was not made from these files"),
    (b"services:\n  web: {image: x, privileged: true}\n", None,
     "error: compose service web asks for a privileged container"),
    (b"services:\n  web: {image: x, volumes: ['${SRC:-/}:/host']}\n", "honest",
     "error: compose service web asks for the host path / mounted (volumes: ${SRC:-/}:/host)"),
    (b"services:\n  web: {image: x, volumes: ['${SRC:?set SRC}:/host']}\n", "honest",
     "error: what the compose files ask of the host cannot be checked: service web: volumes: "
     "${SRC:?set SRC}:/host: ${SRC} is required and not set (set SRC)"),
], ids=["lying-record", "older-bundle", "default-value", "unset-required"])
def test_the_verified_compose_files_decide(tmp_path: Path, engine: Any, key: Ed25519PrivateKey,
                                           pub: Path, compose: bytes, record: Any,
                                           message: str) -> None:
    """After verification and before anything else, on the staged files themselves: refused
    with exit 23, the staging directory removed, an existing root byte for byte as before."""
    root = tmp_path / "target"
    (tmp_path / "b1").mkdir()
    first = tmp_path / "b1" / "shop-1.0.0.bundle"
    write_bundle(first, key, {"files/a.txt": b"1"}, sequence=10)
    assert bundle("install", first, "--trust", pub, "--root", root).rc == 0
    before = snapshot(root)
    done = bundle("install", _hand_made(tmp_path, key, compose, record), "--trust", pub,
                  "--root", root)
    assert done.rc == HostPolicyError.exit_code, done.err
    assert _error(done).startswith(message), done.err
    assert snapshot(root) == before
    assert not list(root.glob(".staging-*"))
