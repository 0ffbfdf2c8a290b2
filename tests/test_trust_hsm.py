"""Keys on hardware (issue 20, stage 5): a release key and a root key in a SoftHSM2 token
(Debian's softhsm2, through python-pkcs11 and securesystemslib's HSMSigner). The token makes
its own ECDSA P-256 keys; bundler only ever hands it what to sign. The host verifies the
token's signatures like any other delegated key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.bundles import data_offsets
from tests.helpers import bundle, bundle_argv, unavailable
from tests.test_trust_root import _payload_bytes, make_bundle

LIBS = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
PIN = "4321"

pytestmark = pytest.mark.slow  # a token made and used through the real CLI: ~7 s


@pytest.fixture
def token(tmp_path: Path) -> dict[str, str]:
    """A fresh SoftHSM2 token `bundler-test` with ECDSA P-256 key pairs of ids 2 and 3; the
    environment that signs with it."""
    lib = next((p for p in LIBS if Path(p).is_file()), None)
    if lib is None or shutil.which("softhsm2-util") is None:
        unavailable("SoftHSM2 is not installed (apt-get install softhsm2)")
    try:
        import pkcs11
        from pkcs11.util.ec import encode_named_curve_parameters
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
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        tok = pkcs11.lib(lib).get_token(token_label="bundler-test")
        with tok.open(rw=True, user_pin=PIN) as session:
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC,
                {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True)
            for keyid in (2, 3):
                params.generate_keypair(store=True, id=bytes([keyid]), label=f"k{keyid}")
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF")
        else:
            os.environ["SOFTHSM2_CONF"] = old
    return env


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
