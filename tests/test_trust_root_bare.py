"""A root of trust on a bare Debian host with no network (issue 20): the kit initialises the
host with a root document, installs a bundle whose release threshold (2 of 2 delegated keys)
was met by a second signature added after build, refuses one signed by a single key, and
records the delegation the bundle carried; then the next stick carries, in a volume set that
gathered its second signature and the trust documents after it was split, a new root version
and a delegation that revokes a release key, and the kit records both as it installs."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest

from tests.bare_target import BareTargets, run_kit
from tests.helpers import bundle, tree_snapshot
from tests.test_usb_to_bare_host import (
    PROFILES,
    _demo_v2,
    build,
    bundler_cache,
    export,
    kit_on,
    new_stick,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.network]


def ok(*args: object) -> dict:
    done = bundle(*map(str, args), "--json")
    assert done.rc == 0, done.out + done.err
    return json.loads(done.out)


def test_kit_inits_root_of_trust_and_installs_delegated_bundle(
        bare_target: BareTargets, tmp_path: Path) -> None:
    k = tmp_path / "keys"
    k.mkdir()
    for name in ("root1", "root2", "root3", "rel1", "rel2", "rel3"):
        ok("keygen", k / name)
    tdir = tmp_path / "trust"
    ok("keys", "init", tdir, "--key", k / "root1.pub", "--key", k / "root2.pub",
       "--threshold", "2")
    for name in ("root1", "root2"):
        ok("keys", "sign", tdir, "--key", k / f"{name}.key")
    ok("keys", "delegate", tdir, "--role", "release", "--product", "demo", "--key",
       k / "rel1.pub", "--key", k / "rel2.pub", "--threshold", "2")
    for name in ("root1", "root2"):
        ok("keys", "sign", tdir, "--targets", "--key", k / f"{name}.key")

    v1 = build(PROFILES / "demo.yaml", k / "rel1.key", tmp_path / "dist1", sequence=1)
    once = tmp_path / "once.bundle"
    shutil.copy(v1, once)  # the same build, with one release signature only
    ok("sign", once, "--trust-metadata", tdir)
    ok("sign", v1, "--key", k / "rel2.key", "--trust-metadata", tdir)
    stick = tmp_path / "stick"
    stick.mkdir()
    exported = export(v1, stick, k / "rel1.pub")
    # A bundle under a root of trust: the stick holds the root it carries, not a public key,
    # and INSTALL.txt's step 2 initialises the host with it.
    assert exported["root_metadata"] == "1.root.json" and not (stick / "rel1.pub").exists()
    text = (stick / "INSTALL.txt").read_text()
    (step,) = [line.strip() for line in text.splitlines() if " trust init " in line]
    assert step.endswith("trust init --root-metadata 1.root.json --root /srv/demo"), step
    assert " 2 of the root keys " in text.replace("\n   ", " ")
    shutil.copy(once, stick / "once.bundle")
    host = bare_target(stick=stick)
    kit = stick / kit_on(stick)

    init = run_kit(host, kit, "trust", "init", "--root-metadata", "/stick/1.root.json",
                   "--root", "/srv/demo", "--json")  # step 2, run from the stick's directory
    assert init.rc == 0, init.out + init.err
    assert json.loads(init.out)["root"]["threshold"] == 2

    before = tree_snapshot(host.srv / "demo")
    refused = run_kit(host, kit, "install", "/stick/once.bundle", "--root", "/srv/demo")
    assert refused.rc == 6, refused.out + refused.err
    assert "release threshold (release: 1 of 2 signatures)" in refused.err
    assert tree_snapshot(host.srv / "demo") == before

    done = run_kit(host, kit, "install", f"/stick/{v1.name}", "--root", "/srv/demo")
    assert done.rc == 0, done.out + done.err
    assert "installed and healthy" in done.out
    shown = run_kit(host, kit, "trust", "show", "--root", "/srv/demo", "--json")
    assert shown.rc == 0, shown.err
    doc = json.loads(shown.out)
    assert doc["mode"] == "root" and doc["delegation"]["version"] == 1
    assert doc["delegation"]["roles"][0]["products"] == ["demo"]

    # The next stick: root v2 (root3 replaces root1; old and new thresholds sign) and
    # delegation v3 (v2 adds rel3, v3 revokes rel1), carried by v1.1.0 signed by rel2 + rel3.
    ok("keys", "rotate-root", tdir, "--key", k / "root2.pub", "--key", k / "root3.pub",
       "--threshold", "2")
    for name in ("root1", "root2", "root3"):
        ok("keys", "sign", tdir, "--key", k / f"{name}.key")
    ok("keys", "delegate", tdir, "--role", "release", "--product", "demo", "--key",
       k / "rel1.pub", "--key", k / "rel2.pub", "--key", k / "rel3.pub", "--threshold", "2")
    rel1_id = _keyid(k / "rel1.key")
    ok("keys", "revoke", tdir, rel1_id)
    for name in ("root2", "root3"):
        ok("keys", "sign", tdir, "--targets", "--key", k / f"{name}.key")
    v2 = build(_demo_v2(tmp_path), k / "rel2.key", tmp_path / "dist2", sequence=2)
    new_stick(stick)
    # This stick carries a volume set: split on the way out (its part index signed by rel2),
    # then the second release manager signs the set on the stick and adds the trust
    # documents: only its head (.000) is rewritten.
    split = ok("export", v2, stick, "--pub", k / "rel2.pub", "--key", k / "rel2.key",
               "--volume-size", "1M", "--cache-dir", bundler_cache())
    assert split["split"] is True
    parts = {f["name"]: f["sha256"] for f in split["files"] if f["role"] == "part"}
    assert len(parts) >= 1 and f"{v2.name}.000" in {f["name"] for f in split["files"]}
    index = stick / f"{v2.name}.parts"
    ok("sign", index, "--key", k / "rel3.key", "--trust-metadata", tdir)
    assert {n: _sha256(stick / n) for n in parts} == parts
    kit = stick / kit_on(stick)
    done = run_kit(host, kit, "install", f"/stick/{index.name}", "--root", "/srv/demo")
    assert done.rc == 0, done.out + done.err
    doc = json.loads(run_kit(host, kit, "trust", "show", "--root", "/srv/demo", "--json").out)
    assert doc["root"]["version"] == 2 and doc["delegation"]["version"] == 3
    assert doc["delegation"]["revoked"] == [rel1_id]
    for name in ("root.json", "targets.json"):
        held = host.srv / "demo" / "state" / "trust" / name
        assert stat.S_IMODE(held.stat().st_mode) == 0o600, name


def _keyid(private: Path) -> str:
    from bundler.bundle.signing import key_id, load_private_key
    return key_id(load_private_key(private).public_key())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
