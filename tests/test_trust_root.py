"""A root of trust (issue 20): thresholds, delegated release keys, rotation and revocation
carried in bundles; the real `bundle` CLI for the offline verbs and the host, the real trust
store under a root for the chain of updates."""

from __future__ import annotations

import hashlib
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bundler.bundle import archive
from bundler.bundle.signing import load_private_key
from bundler.errors import PolicyError, SignatureError
from bundler.install import trust as trust_store
from bundler.install.layout import Layout
from tests.bundles import data_offsets, write_bundle, write_volume_set
from tests.helpers import bundle, tree_snapshot

# each test runs the real CLI a dozen to forty times (5-7 s): not for the fast loop
pytestmark = pytest.mark.slow


def ok(*args: object) -> dict:
    run = bundle(*map(str, args), "--json")
    assert run.rc == 0, run.err
    return json.loads(run.out)


def fails(code: int, *args: object) -> str:
    run = bundle(*map(str, args))
    assert run.rc == code, (run.rc, run.err)
    assert run.err.count("error:") == 1 and "hint:" in run.err, run.err
    return run.err


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """root1..3 and rel1..3: name -> the NAME prefix (NAME.key / NAME.pub)."""
    out = {}
    for name in ("root1", "root2", "root3", "rel1", "rel2", "rel3"):
        ok("keygen", tmp_path / "keys" / name) if (tmp_path / "keys").exists() else (
            (tmp_path / "keys").mkdir(), ok("keygen", tmp_path / "keys" / name))
        out[name] = tmp_path / "keys" / name
    return out


def pub(k: Path) -> str:
    return f"{k}.pub"


def key(k: Path) -> str:
    return f"{k}.key"


def make_root(tdir: Path, keys: dict[str, Path], threshold: int = 2) -> None:
    ok("keys", "init", tdir, "--key", pub(keys["root1"]), "--key", pub(keys["root2"]),
       "--key", pub(keys["root3"]), "--threshold", threshold)
    for name in ("root1", "root2")[:threshold]:
        ok("keys", "sign", tdir, "--key", key(keys[name]))


def delegate(tdir: Path, keys: dict[str, Path], rels: tuple[str, ...], threshold: int = 1,
             product: str = "shop", days: int = 90) -> None:
    args: list[object] = ["keys", "delegate", tdir, "--role", "release", "--product", product,
                          "--threshold", threshold, "--days", days]
    for r in rels:
        args += ["--key", pub(keys[r])]
    ok(*args)
    for name in ("root1", "root2"):
        ok("keys", "sign", tdir, "--targets", "--key", key(keys[name]))


def host(tmp_path: Path, tdir: Path) -> Path:
    root = tmp_path / "host"
    ok("trust", "init", "--root-metadata", tdir / "1.root.json", "--root", root)
    return root


def make_bundle(tmp_path: Path, keys: dict[str, Path], signer: str, name: str = "b",
                **over: object) -> Path:
    path = tmp_path / f"{name}.bundle"
    write_bundle(path, load_private_key(Path(key(keys[signer]))), {"files/a": b"alpha"}, **over)
    return path


def test_root_needs_threshold_then_host_init_and_show(tmp_path: Path,
                                                      keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    ok("keys", "init", tdir, "--key", pub(keys["root1"]), "--key", pub(keys["root2"]),
       "--key", pub(keys["root3"]), "--threshold", "2")
    first = ok("keys", "sign", tdir, "--key", key(keys["root1"]))
    assert first["complete"] is False and first["signatures"] == 1
    err = fails(SignatureError.exit_code, "trust", "init", "--root-metadata",
                tdir / "1.root.json", "--root", tmp_path / "host")
    assert "signed by 1 of the 2 root keys" in err
    assert not (tmp_path / "host").exists()
    second = ok("keys", "sign", tdir, "--key", key(keys["root3"]))
    assert second["complete"] is True
    root = host(tmp_path, tdir)
    held = root / "state" / "trust" / "root.json"
    assert stat.S_IMODE(held.stat().st_mode) == 0o600
    assert stat.S_IMODE(held.parent.stat().st_mode) == 0o700
    shown = ok("trust", "show", "--root", root)
    assert shown["mode"] == "root" and shown["root"]["threshold"] == 2
    assert shown["delegation"] is None
    # a loose key cannot be slipped beside a root of trust
    fails(PolicyError.exit_code, "trust", "add", pub(keys["rel1"]), "--root", root)


def test_delegated_key_verifies_threshold_met_and_not_met(tmp_path: Path,
                                                          keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    make_root(tdir, keys)
    root = host(tmp_path, tdir)
    delegate(tdir, keys, ("rel1", "rel2", "rel3"), threshold=2)
    b = make_bundle(tmp_path, keys, "rel1")
    ok("sign", b, "--trust-metadata", tdir)
    err = fails(SignatureError.exit_code, "verify", b, "--root", root)
    assert "release threshold (release: 1 of 2 signatures)" in err
    before = hashlib.sha256(archive.manifest_of(b, _loose(keys, "rel1")).manifest_bytes)
    offsets = data_offsets(b)
    payload = _payload_bytes(b, offsets)
    added = ok("sign", b, "--key", key(keys["rel2"]))
    assert len(added["signatures"]) == 2
    # the signed payload and every member are byte for byte the same
    after = archive.manifest_of(b, _loose(keys, "rel2")).manifest_bytes
    assert hashlib.sha256(after).hexdigest() == before.hexdigest()
    assert _payload_bytes(b, data_offsets(b)) == payload
    verified = ok("verify", b, "--root", root)
    assert verified["ok"] is True
    fails(5, "sign", b, "--key", key(keys["rel2"]))  # each key signs once


def _loose(keys: dict[str, Path], name: str) -> list:
    from bundler.bundle.signing import load_public_key
    return [load_public_key(Path(pub(keys[name])))]


def _payload_bytes(path: Path, offsets: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    data = path.read_bytes()
    return {n: data[a:a + size] for n, (a, size) in offsets.items() if n != "envelope.json"}


def test_key_for_another_product_and_unknown_key_refused(tmp_path: Path,
                                                         keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    make_root(tdir, keys)
    root = host(tmp_path, tdir)
    delegate(tdir, keys, ("rel1",), product="billing")
    b = make_bundle(tmp_path, keys, "rel1")
    ok("sign", b, "--trust-metadata", tdir)
    assert "signed for release, not for 'shop'" in fails(6, "verify", b, "--root", root)
    c = make_bundle(tmp_path, keys, "rel2", name="c")
    ok("sign", c, "--trust-metadata", tdir)
    assert "not a release key delegated" in fails(6, "verify", c, "--root", root)


def _install_trust(root: Path, path: Path) -> trust_store.trustroot.RootTrust:
    """What install does with a bundle's trust: verify the envelope, recording updates."""
    held = trust_store.resolve(None, Layout(root), record=True)
    archive.manifest_of(path, held)
    return held  # type: ignore[return-value]


def test_rotation_of_release_key_and_root_over_versions_by_bundles_only(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    make_root(tdir, keys)
    root = host(tmp_path, tdir)
    delegate(tdir, keys, ("rel1",))
    b1 = make_bundle(tmp_path, keys, "rel1", name="b1", sequence=1)
    ok("sign", b1, "--trust-metadata", tdir)
    _install_trust(root, b1)
    assert ok("trust", "show", "--root", root)["delegation"]["version"] == 1

    # root v2: root3 replaces root1; signed by 2 of v1 (root1, root2) and 2 of v2 (root2, root3)
    ok("keys", "rotate-root", tdir, "--key", pub(keys["root2"]), "--key", pub(keys["root3"]),
       "--threshold", "2")
    ok("keys", "sign", tdir, "--key", key(keys["root1"]))
    ok("keys", "sign", tdir, "--key", key(keys["root2"]))
    assert ok("keys", "show", tdir)["root"]["complete"] is False
    ok("keys", "sign", tdir, "--key", key(keys["root3"]))
    # root v3: only root3 (threshold 1), signed by v2's threshold (root2, root3)
    ok("keys", "rotate-root", tdir, "--key", pub(keys["root3"]), "--threshold", "1")
    ok("keys", "sign", tdir, "--key", key(keys["root2"]))
    ok("keys", "sign", tdir, "--key", key(keys["root3"]))
    # the release key rotates too: rel2 replaces rel1, signed by the new root alone
    ok("keys", "delegate", tdir, "--role", "release", "--product", "shop",
       "--key", pub(keys["rel2"]))
    ok("keys", "sign", tdir, "--targets", "--key", key(keys["root3"]))
    b2 = make_bundle(tmp_path, keys, "rel2", name="b2", sequence=2)
    ok("sign", b2, "--trust-metadata", tdir)
    _install_trust(root, b2)
    shown = ok("trust", "show", "--root", root)
    assert shown["root"]["version"] == 3 and shown["delegation"]["version"] == 2
    # the old release key no longer verifies, even with the current trust documents
    b3 = make_bundle(tmp_path, keys, "rel1", name="b3", sequence=3)
    ok("sign", b3, "--trust-metadata", tdir)
    assert "not a release key" in fails(6, "verify", b3, "--root", root)


def test_root_update_not_signed_by_old_threshold_refused(tmp_path: Path,
                                                          keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    make_root(tdir, keys)
    root = host(tmp_path, tdir)
    delegate(tdir, keys, ("rel1",))
    # a thief with root3 alone makes v2 naming only root3: v1 needs 2 of its keys
    ok("keys", "rotate-root", tdir, "--key", pub(keys["root3"]), "--threshold", "1")
    ok("keys", "sign", tdir, "--key", key(keys["root3"]))
    b = make_bundle(tmp_path, keys, "rel1")
    ok("sign", b, "--trust-metadata", tdir)
    before = tree_snapshot(root)
    with pytest.raises(SignatureError, match="1/2 of version 1's root keys"):
        _install_trust(root, b)
    assert tree_snapshot(root) == before


def test_revoked_key_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    make_root(tdir, keys)
    root = host(tmp_path, tdir)
    delegate(tdir, keys, ("rel1", "rel2"))
    b1 = make_bundle(tmp_path, keys, "rel1", name="b1")
    ok("sign", b1, "--trust-metadata", tdir)
    _install_trust(root, b1)
    kid = _keyid(keys["rel1"])
    ok("keys", "revoke", tdir, kid)
    for name in ("root1", "root2"):
        ok("keys", "sign", tdir, "--targets", "--key", key(keys[name]))
    # the revocation rides in a bundle signed by the other key...
    b2 = make_bundle(tmp_path, keys, "rel2", name="b2")
    ok("sign", b2, "--trust-metadata", tdir)
    _install_trust(root, b2)
    assert ok("trust", "show", "--root", root)["delegation"]["revoked"] == [kid]
    # ...and the stolen key's bundle, even with the old delegation it carries, is refused
    b3 = make_bundle(tmp_path, keys, "rel1", name="b3")
    err = fails(6, "verify", b3, "--root", root)
    assert f"release key {kid}, revoked in delegation version 2" in err


def test_rollback_of_delegation_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    make_root(tdir, keys)
    root = host(tmp_path, tdir)
    delegate(tdir, keys, ("rel1", "rel2"))
    old = make_bundle(tmp_path, keys, "rel1", name="old")
    ok("sign", old, "--trust-metadata", tdir)  # carries delegation v1
    ok("keys", "revoke", tdir, _keyid(keys["rel2"]))
    for name in ("root1", "root2"):
        ok("keys", "sign", tdir, "--targets", "--key", key(keys[name]))
    new = make_bundle(tmp_path, keys, "rel1", name="new")
    ok("sign", new, "--trust-metadata", tdir)
    _install_trust(root, new)
    err = fails(PolicyError.exit_code, "verify", old, "--root", root)
    assert "delegation version 1, older than version 2" in err and "rollback" in err


def test_expired_root_and_delegation_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    make_root(tdir, keys)
    root = host(tmp_path, tdir)
    delegate(tdir, keys, ("rel1",))
    b = make_bundle(tmp_path, keys, "rel1")
    ok("sign", b, "--trust-metadata", tdir)
    held = trust_store.resolve(None, Layout(root))
    later = datetime.now(UTC) + timedelta(days=100)
    held.now = lambda: later  # type: ignore[union-attr]
    with pytest.raises(PolicyError, match=r"release key delegation \(version 1\) expired"):
        archive.manifest_of(b, held)
    much_later = datetime.now(UTC) + timedelta(days=400)
    held.now = lambda: much_later  # type: ignore[union-attr]
    with pytest.raises(PolicyError, match=r"root of trust \(version 1\) expired"):
        archive.manifest_of(b, held)


def test_loose_keys_keep_working(tmp_path: Path, keys: dict[str, Path]) -> None:
    root = tmp_path / "host"
    ok("trust", "add", pub(keys["rel1"]), "--root", root)
    b = make_bundle(tmp_path, keys, "rel1")
    assert ok("verify", b, "--root", root)["ok"] is True
    assert ok("trust", "show", "--root", root)["mode"] == "keys"


def test_carried_trust_has_strict_limits(tmp_path: Path, keys: dict[str, Path]) -> None:
    from bundler.bundle import trustroot
    with pytest.raises(SignatureError, match="over the"):
        trustroot.parse_root({"signed": {"x": "a" * (trustroot.MAX_TRUST_DOC_BYTES + 1)},
                              "signatures": []}, "carried root")
    with pytest.raises(SignatureError, match="not a TUF root"):
        trustroot.parse_root({"signed": {"_type": "root"}, "signatures": []}, "carried root")
    with pytest.raises(SignatureError, match="malformed"):
        trustroot.carried({trustroot.TRUST_FIELD: {"other": 1}})


def _keyid(k: Path) -> str:
    from bundler.bundle.signing import key_id
    return key_id(load_private_key(Path(key(k))).public_key())


def test_countersignature_required_missing_present_and_wrong_role(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    make_root(tdir, keys)
    root = host(tmp_path, tdir)
    ok("keys", "delegate", tdir, "--role", "release", "--product", "shop",
       "--key", pub(keys["rel1"]))
    ok("keys", "delegate", tdir, "--role", "scanner", "--product", "*", "--countersign",
       "--key", pub(keys["rel3"]))
    for name in ("root1", "root2"):
        ok("keys", "sign", tdir, "--targets", "--key", key(keys[name]))
    b = make_bundle(tmp_path, keys, "rel1")
    ok("sign", b, "--trust-metadata", tdir)
    # a countersigning role alone never authorises a release
    alone = make_bundle(tmp_path, keys, "rel3", name="alone")
    ok("sign", alone, "--trust-metadata", tdir)
    fails(SignatureError.exit_code, "verify", alone, "--root", root)

    assert ok("verify", b, "--root", root)["ok"] is True  # not required yet
    assert ok("trust", "require", "scanner", "--root", root)["required"] == ["scanner"]
    err = fails(PolicyError.exit_code, "verify", b, "--root", root)
    assert "requires 1 countersignature(s) by role 'scanner'" in err and "has 0" in err

    # by the wrong role: a release key countersigning as scanner
    wrong = tmp_path / "wrong.bundle"
    wrong.write_bytes(b.read_bytes())
    ok("countersign", wrong, "--role", "scanner", "--key", key(keys["rel2"]))
    err = fails(PolicyError.exit_code, "verify", wrong, "--root", root)
    assert f"key {_keyid(keys['rel2'])} is not one of its keys" in err

    members = _payload_bytes(b, data_offsets(b))
    done = ok("countersign", b, "--role", "scanner", "--key", key(keys["rel3"]))
    assert _payload_bytes(b, data_offsets(b)) == members
    assert ok("verify", b, "--root", root)["ok"] is True
    shown = ok("inspect", b, "--root", root)
    assert shown["signatures"] == [
        {"keyid": _keyid(keys["rel1"]), "role": "release", "time": None,
         "bundler_keyid": _keyid(keys["rel1"])},
        {"keyid": _keyid(keys["rel3"]), "role": "scanner", "time": done["time"],
         "bundler_keyid": _keyid(keys["rel3"])}]
    # a countersignature's time is signed: changing it breaks it
    raw = b.read_bytes().replace(done["time"].encode(), b"2020-01-01T00:00:00Z")
    b.write_bytes(raw)
    assert "has 0" in fails(PolicyError.exit_code, "verify", b, "--root", root)


def test_root_gap_and_fork_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    from bundler.build import trustdocs
    from bundler.bundle import trustroot
    tdir = tmp_path / "trust"
    make_root(tdir, keys)
    v1 = trustdocs.roots(tdir)[0]
    for _ in range(2):
        ok("keys", "rotate-root", tdir, "--key", pub(keys["root1"]), "--key",
           pub(keys["root2"]), "--threshold", "2")
        for name in ("root1", "root2"):
            ok("keys", "sign", tdir, "--key", key(keys[name]))
    _, v2, v3 = trustdocs.roots(tdir)
    assert trustroot.chain_root(v1, [v3, v2]).signed.version == 3  # order does not matter
    with pytest.raises(PolicyError, match="root version 3 but not 2"):
        trustroot.chain_root(v1, [v3])  # a gap
    assert trustroot.chain_root(v3, [v2]).signed.version == 3  # history: ignored, never back
    fork = trustroot.parse_root(v2.to_dict(), "fork")
    fork.signed.expires = fork.signed.expires.replace(year=fork.signed.expires.year + 1)
    with pytest.raises(PolicyError, match="different root version 2"):
        trustroot.chain_root(trustroot.chain_root(v1, [v2]), [fork])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_volume_set_gathers_signatures_countersignatures_and_trust_documents(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    """A split bundle under a root of trust: the release threshold (2 of 2), the trust
    documents and a required countersignature are all added to the set after it was split,
    each by rewriting its head alone: every part and the index's signed payload stay the
    same bytes."""
    tdir = tmp_path / "trust"
    make_root(tdir, keys)
    root = host(tmp_path, tdir)
    ok("keys", "delegate", tdir, "--role", "release", "--product", "shop", "--threshold", 2,
       "--key", pub(keys["rel1"]), "--key", pub(keys["rel2"]))
    ok("keys", "delegate", tdir, "--role", "scanner", "--product", "*", "--countersign",
       "--key", pub(keys["rel3"]))
    for name in ("root1", "root2"):
        ok("keys", "sign", tdir, "--targets", "--key", key(keys[name]))
    blob = bytes((i * 7919) % 251 for i in range(20000))
    index = write_volume_set(tmp_path / "shop.bundle", load_private_key(Path(key(keys["rel1"]))),
                             {"files/a": b"alpha", "files/blob": blob}, part_size=4096)
    head = tmp_path / "shop.bundle.000"
    parts = sorted(tmp_path.glob("shop.bundle.0[0-9][1-9]"))
    assert len(parts) >= 5
    before = {p.name: _sha(p) for p in parts}
    payload = json.loads(index.read_text())["payload"]

    err = fails(SignatureError.exit_code, "verify", index, "--root", root)
    assert "delegates no release key yet" in err
    ok("sign", index, "--trust-metadata", tdir)  # the documents alone: the threshold is not met
    err = fails(SignatureError.exit_code, "verify", parts[2], "--root", root)
    assert "release threshold (release: 1 of 2 signatures)" in err
    signed = ok("sign", head, "--key", key(keys["rel2"]))  # any file of the set names it
    assert signed["added"] == [_keyid(keys["rel2"])]
    assert ok("verify", index, "--root", root)["ok"] is True

    ok("trust", "require", "scanner", "--root", root)
    assert "has 0" in fails(PolicyError.exit_code, "verify", index, "--root", root)
    done = ok("countersign", parts[0], "--role", "scanner", "--key", key(keys["rel3"]))
    assert ok("verify", index, "--root", root)["ok"] is True
    shown = ok("inspect", index, "--root", root)
    assert shown["signatures"] == [
        *({"keyid": k, "role": "release", "time": None, "bundler_keyid": k}
          for k in sorted([_keyid(keys["rel1"]), _keyid(keys["rel2"])])),
        {"keyid": _keyid(keys["rel3"]), "role": "scanner", "time": done["time"],
         "bundler_keyid": _keyid(keys["rel3"])}]
    assert [p["file"] for p in shown["parts"]] == [head.name, *before]

    # Only the head changed: every part, and what the index signs, are the same bytes.
    assert {p.name: _sha(p) for p in parts} == before
    doc = json.loads(index.read_text())
    assert doc["payload"] == payload
    assert [s["keyid"] for s in doc["signatures"]] == [_keyid(keys["rel1"]),
                                                       _keyid(keys["rel2"])]
    # The host installs it, streaming the parts, and records the delegation it carried.
    done = ok("install", index, "--root", root)
    assert done["status"] == "installed", done
    assert (root / "current" / "files" / "blob").read_bytes() == blob
    assert ok("trust", "show", "--root", root)["delegation"]["version"] == 2  # two delegate runs


def test_a_volume_set_without_a_head_cannot_gather_signatures(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    from bundler.bundle import volumes

    b = make_bundle(tmp_path, keys, "rel1")
    out = tmp_path / "old.bundle"
    writer = volumes.SplitWriter(out, 1024)  # the layout before heads: part 1 opens with it
    writer.write(b.read_bytes())
    index = volumes.write_index(out, writer.commit(), load_private_key(Path(key(keys["rel1"]))))
    before = {p.name: _sha(p) for p in tmp_path.glob("old.bundle*")}
    err = fails(SignatureError.exit_code, "sign", index, "--key", key(keys["rel2"]))
    assert "a volume set without a head" in err and "sign the single .bundle" in err
    assert {p.name: _sha(p) for p in tmp_path.glob("old.bundle*")} == before
    assert ok("verify", index, "--trust", pub(keys["rel1"]))["ok"] is True  # still read

    # a head with bytes after its envelope is not rewritten either
    headed = write_volume_set(tmp_path / "new.bundle", load_private_key(Path(key(keys["rel1"]))),
                              {"files/a": b"alpha"}, part_size=1024)
    with open(tmp_path / "new.bundle.000", "ab") as fh:
        fh.write(bytes(512))
    before = {p.name: _sha(p) for p in tmp_path.glob("new.bundle*")}
    err = fails(SignatureError.exit_code, "sign", headed, "--key", key(keys["rel2"]))
    assert "new.bundle.000 holds more than its envelope" in err
    assert {p.name: _sha(p) for p in tmp_path.glob("new.bundle*")} == before
