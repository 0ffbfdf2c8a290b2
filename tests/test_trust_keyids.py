"""Trust documents whose key ids are not bundler's (issue 20, TAP 12): a root and delegation
made directly with python-tuf's Metadata API under TUF's canonical key ids (the sha256 of each
key's canonical JSON, what other TUF tools write) work with bundler's signatures, which carry
bundler's 16-hex ids. The real `bundle` CLI runs in process (CliRunner), the documents are
python-tuf's own, nothing is faked."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import CryptoSigner, Signature, SSlibKey
from tuf.api.metadata import DelegatedRole, Delegations, Metadata, Root, Targets

from bundler.bundle import archive, trustroot, volumes
from bundler.bundle.signing import key_id, load_private_key, unverified_payload
from bundler.cli.main import cli
from bundler.errors import PolicyError, SignatureError, SigningKeyError
from bundler.install import trust as trust_store
from bundler.install.layout import Layout
from tests.bundles import write_bundle, write_volume_set

NAMES = ("root1", "root2", "root3", "rel1", "rel2", "rel3", "scan")


def run(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def ok(*args: object) -> dict[str, Any]:
    done = run(*args, "--json")
    assert done.exit_code == 0, done.output
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def fails(code: int, *args: object) -> str:
    done = run(*args)
    assert done.exit_code == code, (done.exit_code, done.output)
    assert done.stderr.count("error:") == 1 and "hint:" in done.stderr, done.stderr
    return str(done.stderr)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """name -> the NAME prefix of a `bundle keygen` pair (NAME.key, NAME.pub)."""
    (tmp_path / "keys").mkdir()
    for name in NAMES:
        ok("keygen", tmp_path / "keys" / name)
    return {name: tmp_path / "keys" / name for name in NAMES}


def priv(k: Path) -> Ed25519PrivateKey:
    return load_private_key(Path(f"{k}.key"))


def canonical(k: Path) -> SSlibKey:
    """The key as another TUF tool names it: python-tuf's default (canonical) key id."""
    return SSlibKey.from_crypto(priv(k).public_key())


def short(k: Path) -> str:
    return key_id(priv(k).public_key())


def tuf_signer(k: Path) -> CryptoSigner:
    return CryptoSigner(priv(k), canonical(k))


def _in(days: int) -> datetime:
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)


def tuf_root(tdir: Path, keys: dict[str, Path], signers: tuple[str, ...]) -> Path:
    """1.root.json by python-tuf: root1..3 under canonical ids, threshold 2 for every role."""
    root = Root(expires=_in(365))
    for name in ("root1", "root2", "root3"):
        for role in root.roles:
            root.add_key(canonical(keys[name]), role)
    for role in root.roles.values():
        role.threshold = 2
    md = Metadata(root)
    for name in signers:
        md.sign(tuf_signer(keys[name]), append=True)
    tdir.mkdir(exist_ok=True)
    (tdir / "1.root.json").write_bytes(md.to_bytes())
    return tdir / "1.root.json"


def tuf_targets(tdir: Path, keys: dict[str, Path], roles: dict[str, tuple[tuple[str, ...], int]],
                signers: tuple[str, ...] = ("root1", "root2"),
                countersign: tuple[str, ...] = ()) -> None:
    """targets.json by python-tuf: ROLES (name -> release keys, threshold) for product shop,
    under canonical ids, signed by SIGNERS' canonical ids."""
    delegated = {}
    listed: dict[str, Any] = {}
    for role, (names, threshold) in roles.items():
        for name in names:
            listed[canonical(keys[name]).keyid] = canonical(keys[name])
        kind = {trustroot.KIND_FIELD: trustroot.COUNTERSIGN_KIND} if role in countersign else {}
        delegated[role] = DelegatedRole(role, [canonical(keys[n]).keyid for n in names],
                                        threshold, True, paths=["shop"],
                                        unrecognized_fields=kind)
    md = Metadata(Targets(expires=_in(90), delegations=Delegations(listed, delegated)))
    for name in signers:
        md.sign(tuf_signer(keys[name]), append=True)
    (tdir / "targets.json").write_bytes(md.to_bytes())


def host(tmp_path: Path, tdir: Path) -> Path:
    root = tmp_path / "host"
    ok("trust", "init", "--root-metadata", tdir / "1.root.json", "--root", root)
    return root


def make_bundle(tmp_path: Path, keys: dict[str, Path], signer: str, name: str = "b") -> Path:
    path = tmp_path / f"{name}.bundle"
    write_bundle(path, priv(keys[signer]), {"files/a": b"alpha"})
    return path


def install_trust(root: Path, path: Path) -> None:
    """What install does with a bundle's trust: verify its envelope, recording updates."""
    archive.manifest_of(path, trust_store.resolve(None, Layout(root), record=True))


def test_canonical_ids_are_tufs_not_bundlers(keys: dict[str, Path]) -> None:
    key = canonical(keys["rel1"])
    assert len(key.keyid) == 64 and key.keyid != short(keys["rel1"])
    assert trustroot.short_id(key) == short(keys["rel1"])
    assert trustroot.short_id(SSlibKey(key.keyid, "ed25519", "ed25519", {"public": "zz"})) is None
    # a token's ECDSA key: bundler's id hashes its DER SubjectPublicKeyInfo
    token = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert trustroot.short_id(SSlibKey.from_crypto(token)) == trustroot.tuf_key(token).keyid


def test_release_threshold_met_only_by_two_bundler_signatures(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    tuf_root(tdir, keys, ("root1", "root2"))
    tuf_targets(tdir, keys, {"release": (("rel1", "rel2"), 2)})
    root = host(tmp_path, tdir)
    b = make_bundle(tmp_path, keys, "rel1")
    ok("sign", b, "--trust-metadata", tdir)
    err = fails(SignatureError.exit_code, "verify", b, "--root", root)
    assert "release threshold (release: 1 of 2 signatures)" in err
    added = ok("sign", b, "--key", f"{keys['rel2']}.key")
    assert added["added"] == [short(keys["rel2"])]  # the envelope carries bundler's ids
    assert ok("verify", b, "--root", root)["ok"] is True
    shown = ok("inspect", b, "--root", root)
    assert sorted((s["keyid"], s["bundler_keyid"]) for s in shown["signatures"]) == sorted(
        (canonical(keys[n]).keyid, short(keys[n])) for n in ("rel1", "rel2"))
    assert shown["keyid"] in (short(keys["rel1"]), short(keys["rel2"]))
    text = run("inspect", b, "--root", root).stdout
    assert f"{canonical(keys['rel1']).keyid} (bundler: {short(keys['rel1'])}) (release)" in text
    # the host shows both forms, and its --json adds bundler's beside the document's
    trust = ok("trust", "show", "--root", root)
    assert trust["root"]["keys"] == sorted(canonical(keys[n]).keyid
                                           for n in ("root1", "root2", "root3"))
    assert trust["root"]["bundler_keyids"][canonical(keys["root1"]).keyid] == \
        short(keys["root1"])
    assert f"(bundler: {short(keys['root3'])})" in run("trust", "show", "--root", root).stdout


def test_key_not_in_the_document_still_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    tuf_root(tdir, keys, ("root1", "root2"))
    tuf_targets(tdir, keys, {"release": (("rel1",), 1)})
    root = host(tmp_path, tdir)
    b = make_bundle(tmp_path, keys, "rel3")
    ok("sign", b, "--trust-metadata", tdir)
    err = fails(SignatureError.exit_code, "verify", b, "--root", root)
    assert f"signed by key {short(keys['rel3'])}, which is not a release key delegated" in err
    # a signature under a delegated key's bundler id, made by another key, does not verify
    forged = trustroot.role_signatures(
        {canonical(keys["rel1"]).keyid: canonical(keys["rel1"])},
        [canonical(keys["rel1"]).keyid],
        {short(keys["rel1"]): Signature(short(keys["rel1"]), priv(keys["rel3"]).sign(b"m").hex())})
    with pytest.raises(UnverifiedSignatureError):
        canonical(keys["rel1"]).verify_signature(next(iter(forged.values())), b"m")


def test_one_key_counts_once_whatever_it_is_called(keys: dict[str, Path]) -> None:
    """A delegation listing the same key under its canonical and its bundler id, threshold 2:
    one signature (under either id, or both) is one key, not two."""
    tuf = canonical(keys["rel1"])
    bundler = SSlibKey(short(keys["rel1"]), tuf.keytype, tuf.scheme, tuf.keyval)
    role = DelegatedRole("release", [tuf.keyid, bundler.keyid], 2, True, paths=["shop"])
    md = Targets(expires=_in(9), delegations=Delegations(
        {tuf.keyid: tuf, bundler.keyid: bundler}, {"release": role}))
    sig = priv(keys["rel1"]).sign(b"message").hex()
    for sigs in ({bundler.keyid: Signature(bundler.keyid, sig)},
                 {bundler.keyid: Signature(bundler.keyid, sig),
                  tuf.keyid: Signature(tuf.keyid, sig)}):
        mapped = trustroot.role_signatures(md.delegations.keys, role.keyids, sigs)  # type: ignore[union-attr]
        result = md.get_verification_result("release", b"message", mapped)
        assert not result and len(result.signed) == 1


def test_countersignature_required_and_present(tmp_path: Path, keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    tuf_root(tdir, keys, ("root1", "root2"))
    tuf_targets(tdir, keys, {"release": (("rel1",), 1), "scanner": (("scan",), 1)},
                countersign=("scanner",))
    root = host(tmp_path, tdir)
    ok("trust", "require", "scanner", "--root", root)
    b = make_bundle(tmp_path, keys, "rel1")
    ok("sign", b, "--trust-metadata", tdir)
    err = fails(PolicyError.exit_code, "verify", b, "--root", root)
    assert "by role 'scanner'" in err and "has 0" in err
    wrong = tmp_path / "wrong.bundle"
    wrong.write_bytes(b.read_bytes())
    ok("countersign", wrong, "--role", "scanner", "--key", f"{keys['rel2']}.key")
    err = fails(PolicyError.exit_code, "verify", wrong, "--root", root)
    assert f"key {short(keys['rel2'])} is not one of its keys" in err
    done = ok("countersign", b, "--role", "scanner", "--key", f"{keys['scan']}.key")
    assert ok("verify", b, "--root", root)["ok"] is True
    shown = ok("inspect", b, "--root", root)
    assert shown["signatures"][1] == {
        "keyid": canonical(keys["scan"]).keyid, "role": "scanner", "time": done["time"],
        "bundler_keyid": short(keys["scan"])}


def test_keys_sign_completes_a_tuf_root_and_rotation_chains(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    v1 = tuf_root(tdir, keys, ("root1",))  # python-tuf signed it once: 1 of 2
    assert "signed by 1 of the 2 root keys" in fails(
        SignatureError.exit_code, "trust", "init", "--root-metadata", v1,
        "--root", tmp_path / "host")
    done = ok("keys", "sign", tdir, "--key", f"{keys['root2']}.key")
    assert done["complete"] is True
    assert done["keyid"] == canonical(keys["root2"]).keyid
    assert done["bundler_keyid"] == short(keys["root2"])
    text = run("keys", "show", tdir).stdout
    assert f"{canonical(keys['root1']).keyid} (bundler: {short(keys['root1'])})" in text
    # the delegation python-tuf wrote unsigned gathers the root keys' signatures from bundler
    tuf_targets(tdir, keys, {"release": (("rel1",), 1)}, signers=())
    ok("keys", "sign", tdir, "--targets", "--key", f"{keys['root1']}.key")
    assert ok("keys", "sign", tdir, "--targets", "--key", f"{keys['root2']}.key")["complete"]
    root = host(tmp_path, tdir)
    # root v2 by bundler: root2 keeps its canonical id, root4 (new) gets bundler's
    ok("keygen", tmp_path / "keys" / "root4")
    ok("keys", "rotate-root", tdir, "--key", f"{keys['root2']}.pub",
       "--key", tmp_path / "keys" / "root4.pub", "--threshold", "2")
    v2 = json.loads((tdir / "2.root.json").read_bytes())["signed"]["roles"]["root"]["keyids"]
    assert sorted(v2) == sorted([canonical(keys["root2"]).keyid,
                                 key_id(load_private_key(tmp_path / "keys" / "root4.key")
                                        .public_key())])
    ok("keys", "sign", tdir, "--key", f"{keys['root1']}.key")
    assert ok("keys", "sign", tdir, "--key", f"{keys['root2']}.key")["complete"] is False
    assert ok("keys", "sign", tdir, "--key", tmp_path / "keys" / "root4.key")["complete"]
    # the rotation rides in a bundle; root2's signature on the delegation (under the id both
    # versions give it) still counts: root4 alone adds the second
    ok("keys", "sign", tdir, "--targets", "--key", tmp_path / "keys" / "root4.key")
    b = make_bundle(tmp_path, keys, "rel1")
    ok("sign", b, "--trust-metadata", tdir)
    install_trust(root, b)
    assert ok("trust", "show", "--root", root)["root"]["version"] == 2
    # a key that is not a root key is refused with the existing message
    err = fails(SigningKeyError.exit_code, "keys", "sign", tdir, "--key", f"{keys['rel1']}.key")
    assert f"key {short(keys['rel1'])} is not a root key of 2.root.json" in err


def test_a_key_in_old_and_new_root_under_two_ids_signs_under_both(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    """Root v2 written by another tool under bundler's ids (any unique form is legal): a
    holder of a key both versions list signs under each id, once."""
    tdir = tmp_path / "trust"
    tuf_root(tdir, keys, ("root1", "root2"))
    v2 = Root(version=2, expires=_in(365))
    for name in ("root2", "root3"):
        for role in v2.roles:
            v2.add_key(trustroot.tuf_key(priv(keys[name]).public_key()), role)
    for role in v2.roles.values():
        role.threshold = 2
    (tdir / "2.root.json").write_bytes(Metadata(v2).to_bytes())
    done = ok("keys", "sign", tdir, "--key", f"{keys['root2']}.key")
    assert sorted(done["keyids"]) == sorted([short(keys["root2"]),
                                             canonical(keys["root2"]).keyid])
    assert done["signatures"] == 2 and done["complete"] is False
    ok("keys", "sign", tdir, "--key", f"{keys['root1']}.key")
    assert ok("keys", "sign", tdir, "--key", f"{keys['root3']}.key")["complete"] is True


def test_revoke_by_either_id(tmp_path: Path, keys: dict[str, Path]) -> None:
    tdir = tmp_path / "trust"
    tuf_root(tdir, keys, ("root1", "root2"))
    tuf_targets(tdir, keys, {"release": (("rel1", "rel2", "rel3"), 1)})
    root = host(tmp_path, tdir)
    b1 = make_bundle(tmp_path, keys, "rel1", name="b1")
    ok("sign", b1, "--trust-metadata", tdir)
    install_trust(root, b1)
    ok("keys", "revoke", tdir, short(keys["rel1"]))               # bundler's id
    ok("keys", "revoke", tdir, canonical(keys["rel2"]).keyid)     # the document's
    for name in ("root1", "root2"):
        ok("keys", "sign", tdir, "--targets", "--key", f"{keys[name]}.key")
    shown = ok("keys", "show", tdir)["delegation"]
    assert shown["roles"][0]["keys"] == [canonical(keys["rel3"]).keyid]
    assert set(shown["revoked"]) == {canonical(keys[n]).keyid for n in ("rel1", "rel2")} | {
        short(keys[n]) for n in ("rel1", "rel2")}
    assert "is not delegated" in fails(SigningKeyError.exit_code, "keys", "revoke", tdir,
                                       short(keys["rel1"]))
    b2 = make_bundle(tmp_path, keys, "rel3", name="b2")
    ok("sign", b2, "--trust-metadata", tdir)
    install_trust(root, b2)
    b3 = make_bundle(tmp_path, keys, "rel1", name="b3")
    err = fails(SignatureError.exit_code, "verify", b3, "--root", root)
    assert f"release key {short(keys['rel1'])}, revoked in delegation version 3" in err
    # delegating the key again lifts its revocation, under every id it was recorded by
    ok("keys", "delegate", tdir, "--role", "release", "--product", "shop",
       "--key", f"{keys['rel1']}.pub", "--key", f"{keys['rel3']}.pub")
    revoked = ok("keys", "show", tdir)["delegation"]["revoked"]
    assert set(revoked) == {canonical(keys["rel2"]).keyid, short(keys["rel2"])}


def test_a_volume_set_under_canonical_ids(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A split bundle's index is checked by the keys its envelope was accepted on: in a
    canonical-id delegation, under the document's ids."""
    tdir = tmp_path / "trust"
    tuf_root(tdir, keys, ("root1", "root2"))
    tuf_targets(tdir, keys, {"release": (("rel1", "rel2", "rel3"), 2)})
    root = host(tmp_path, tdir)
    index = write_volume_set(tmp_path / "shop.bundle", priv(keys["rel1"]),
                             {"files/a": b"alpha" * 2000}, part_size=2048)
    ok("sign", index, "--key", f"{keys['rel2']}.key", "--trust-metadata", tdir)
    assert ok("verify", index, "--root", root)["ok"] is True
    # an index re-signed by a delegated release key that did not sign this bundle: refused
    body, _ = unverified_payload(index.read_bytes(), volumes.INDEX_TYPE, index.name)
    index.write_bytes(volumes.index_bytes(volumes.PartIndex.parse(body), priv(keys["rel3"])))
    err = fails(SignatureError.exit_code, "verify", index, "--root", root)
    assert "is not signed by any key that signed the bundle" in err
