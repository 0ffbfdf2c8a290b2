"""Keys on hardware (issue 20, stage 5): a release key and a root key in a SoftHSM2 token
(Debian's softhsm2, through python-pkcs11 and securesystemslib's HSMSigner). The token makes
its own ECDSA P-256 keys; bundler only ever hands it what to sign. The host verifies the
token's signatures like any other delegated key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bundles import data_offsets
from tests.helpers import bundle, bundle_argv, unavailable
from tests.test_trust_root import _payload_bytes, make_bundle

LIBS = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
PIN = "4321"

pytestmark = pytest.mark.slow  # a token made and used through the real CLI: ~3 s each


@pytest.fixture
def token(tmp_path: Path) -> dict[str, str]:
    """A fresh SoftHSM2 token `bundler-test` with ECDSA P-256 key pairs of ids 2 and 3; the
    environment that signs with it."""
    lib = next((p for p in LIBS if Path(p).is_file()), None)
    if lib is None or shutil.which("softhsm2-util") is None:
        unavailable("SoftHSM2 is not installed (apt-get install softhsm2)")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        unavailable("python-pkcs11 is not installed (pip install 'bundler[hsm]')")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    env = {"SOFTHSM2_CONF": str(conf), "PYKCS11LIB": lib, "BUNDLER_PKCS11_PIN": PIN}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bundler-test",
                    "--pin", PIN, "--so-pin", "87654321"], check=True, capture_output=True,
                   env={**os.environ, **env})
    # in a child: SoftHSM2 reads SOFTHSM2_CONF once per process, so a second test's token
    # would not be seen by a library this process already loaded
    subprocess.run([sys.executable, "-c", _MAKE_KEYS, lib, PIN], check=True,
                   capture_output=True, env={**os.environ, **env})
    return env


_MAKE_KEYS = """
import sys, pkcs11
from pkcs11.util.ec import encode_named_curve_parameters
tok = pkcs11.lib(sys.argv[1]).get_token(token_label="bundler-test")
with tok.open(rw=True, user_pin=sys.argv[2]) as session:
    params = session.create_domain_parameters(
        pkcs11.KeyType.EC,
        {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
    for keyid in (2, 3):
        params.generate_keypair(store=True, id=bytes([keyid]), label=f"k{keyid}")
"""


def run(env: dict[str, str], *args: object) -> dict:
    done = bundle(*map(str, args), "--json", env=env)
    assert done.rc == 0, done.out + done.err
    return json.loads(done.out)


def test_release_and_root_keys_in_a_softhsm2_token(tmp_path: Path,
                                                   token: dict[str, str]) -> None:
    release = "hsm:2?label=bundler-test"
    root_uri = "hsm:3?label=bundler-test"
    rel = run(token, "keys", "token-pub", release, "--out", tmp_path / "rel-hsm.pub")
    rootk = run(token, "keys", "token-pub", root_uri, "--out", tmp_path / "root-hsm.pub")
    assert rel["keyid"] != rootk["keyid"]
    k = tmp_path / "keys"
    k.mkdir()
    run(token, "keygen", k / "root2")
    run(token, "keygen", k / "rel1")
    tdir = tmp_path / "trust"
    # root: the token's key and a file key, 2 of 2
    run(token, "keys", "init", tdir, "--key", tmp_path / "root-hsm.pub", "--key",
        k / "root2.pub", "--threshold", "2")
    run(token, "keys", "sign", tdir, "--key", root_uri)
    assert run(token, "keys", "sign", tdir, "--key", k / "root2.key")["complete"] is True
    # release: the token's key and a file key, 2 of 2
    run(token, "keys", "delegate", tdir, "--role", "release", "--product", "shop", "--key",
        tmp_path / "rel-hsm.pub", "--key", k / "rel1.pub", "--threshold", "2")
    run(token, "keys", "sign", tdir, "--targets", "--key", root_uri)
    run(token, "keys", "sign", tdir, "--targets", "--key", k / "root2.key")
    host = tmp_path / "host"
    run(token, "trust", "init", "--root-metadata", tdir / "1.root.json", "--root", host)

    b = make_bundle(tmp_path, {"rel1": k / "rel1"}, "rel1")
    members = _payload_bytes(b, data_offsets(b))
    refused = bundle("verify", b, "--root", host)  # one of two
    assert refused.rc == 6, refused.err
    signed = run(token, "sign", b, "--key", release, "--trust-metadata", tdir)
    assert rel["keyid"] in signed["added"]
    assert _payload_bytes(b, data_offsets(b)) == members
    # the host needs no token, no PIN and no PKCS#11 library to verify
    clean = {k: v for k, v in os.environ.items()
             if k not in ("SOFTHSM2_CONF", "PYKCS11LIB", "BUNDLER_PKCS11_PIN")}
    done = subprocess.run(bundle_argv("inspect", b, "--root", host, "--json"),
                          capture_output=True, text=True, env=clean, check=False)
    assert done.returncode == 0, done.stderr
    roles = {s["keyid"]: s["role"] for s in json.loads(done.stdout)["signatures"]}
    assert roles[rel["keyid"]] == "release"

    # a wrong PIN fails as a key error, with the variable named and the PIN never printed
    c = make_bundle(tmp_path, {"rel1": k / "rel1"}, "rel1", name="c")
    before = c.read_bytes()
    bad = bundle("sign", c, "--key", release, env={**token, "BUNDLER_PKCS11_PIN": "0000"})
    assert bad.rc == 5 and "BUNDLER_PKCS11_PIN" in bad.err and "0000" not in bad.err, bad.err
    assert c.read_bytes() == before


def test_token_keys_in_documents_with_canonical_key_ids(tmp_path: Path,
                                                        token: dict[str, str]) -> None:
    """A root and delegation python-tuf wrote under TUF's canonical ids name the token's ECDSA
    keys: the token signs the root under the root's id for it, and the envelope's signature
    (bundler's id) counts for the delegation's canonical id."""
    from cryptography.hazmat.primitives import serialization
    from securesystemslib.signer import CryptoSigner, SSlibKey
    from tuf.api.metadata import DelegatedRole, Delegations, Metadata, Root, Targets

    from bundler.bundle.signing import load_private_key
    from tests.test_trust_keyids import _in

    release, root_uri = "hsm:2?label=bundler-test", "hsm:3?label=bundler-test"
    rel = run(token, "keys", "token-pub", release, "--out", tmp_path / "rel-hsm.pub")
    run(token, "keys", "token-pub", root_uri, "--out", tmp_path / "root-hsm.pub")
    k = tmp_path / "keys"
    k.mkdir()
    run(token, "keygen", k / "root2")
    run(token, "keygen", k / "rel1")

    def canonical(path: Path) -> SSlibKey:
        public = serialization.load_pem_public_key(path.read_bytes())
        return SSlibKey.from_crypto(public)  # type: ignore[arg-type]

    file_root = CryptoSigner(load_private_key(k / "root2.key"), canonical(k / "root2.pub"))
    root = Root(expires=_in(365))
    for key in (canonical(tmp_path / "root-hsm.pub"), canonical(k / "root2.pub")):
        for role in root.roles:
            root.add_key(key, role)
    for held in root.roles.values():
        held.threshold = 2
    md = Metadata(root)
    md.sign(file_root)
    tdir = tmp_path / "trust"
    tdir.mkdir()
    (tdir / "1.root.json").write_bytes(md.to_bytes())
    done = run(token, "keys", "sign", tdir, "--key", root_uri)
    assert done["complete"] is True and len(done["keyid"]) == 64

    rels = [canonical(tmp_path / "rel-hsm.pub"), canonical(k / "rel1.pub")]
    targets = Metadata(Targets(expires=_in(90), delegations=Delegations(
        {r.keyid: r for r in rels},
        {"release": DelegatedRole("release", [r.keyid for r in rels], 2, True,
                                  paths=["shop"])})))
    targets.sign(file_root)
    (tdir / "targets.json").write_bytes(targets.to_bytes())
    assert run(token, "keys", "sign", tdir, "--targets", "--key", root_uri)["complete"]
    host = tmp_path / "host"
    run(token, "trust", "init", "--root-metadata", tdir / "1.root.json", "--root", host)

    b = make_bundle(tmp_path, {"rel1": k / "rel1"}, "rel1")
    assert run(token, "sign", b, "--key", release, "--trust-metadata", tdir)["added"] == [
        rel["keyid"]]
    shown = run({}, "inspect", b, "--root", host)
    by_bundler = {s["bundler_keyid"]: s["keyid"] for s in shown["signatures"]}
    assert by_bundler[rel["keyid"]] == rels[0].keyid
