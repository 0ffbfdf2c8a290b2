from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle.manifest import PAYLOAD_TYPE, canonical_json
from bundler.bundle.signing import (
    generate,
    key_id,
    load_private_key,
    load_public_key,
    load_trust,
    sign,
    verify_envelope,
)
from bundler.errors import SignatureError, SigningKeyError
from tests.bundles import envelope_raw, manifest_for
from tests.helpers import bundle


def trusted(key: Ed25519PrivateKey, tmp_path: Path, name: str = "k") -> list:
    from cryptography.hazmat.primitives import serialization

    pub = tmp_path / f"{name}.pub"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return [load_public_key(pub)]


def test_keygen_writes_private_key_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    priv, pub, kid = generate(tmp_path / "release")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert load_public_key(pub).keyid == kid == key_id(load_private_key(priv).public_key())
    with pytest.raises(SigningKeyError, match="already exists"):
        generate(tmp_path / "release")
    result = bundle("keygen", tmp_path / "release")
    assert result.rc == SigningKeyError.exit_code and "--force" in result.err


def test_roundtrip_and_keyid(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    manifest = manifest_for({"files/a": b"a"})
    verified = verify_envelope(sign(manifest, key), trusted(key, tmp_path))
    assert verified.manifest == manifest
    assert verified.keyid == key_id(key.public_key())


def test_signing_is_deterministic(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    manifest = manifest_for({"files/a": b"a"})
    assert sign(manifest, key) == sign(manifest, key)


def test_wrong_key_is_refused(tmp_path: Path) -> None:
    envelope = sign(manifest_for({}), Ed25519PrivateKey.generate())
    with pytest.raises(SignatureError, match="not trusted"):
        verify_envelope(envelope, trusted(Ed25519PrivateKey.generate(), tmp_path))


def test_altered_manifest_is_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    doc = json.loads(sign(manifest_for({"files/a": b"a"}), key))
    body = base64.b64decode(doc["payload"]).replace(b'"version":"1.0.0"', b'"version":"6.6.6"')
    doc["payload"] = base64.b64encode(body).decode()
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(canonical_json(doc), trusted(key, tmp_path))


def test_no_signature(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    doc = json.loads(sign(manifest_for({}), key))
    doc["signatures"] = []
    with pytest.raises(SignatureError, match="not signed"):
        verify_envelope(canonical_json(doc), trusted(key, tmp_path))


def test_valid_signature_over_another_payload_type_is_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    body = manifest_for({}).to_bytes()
    other = envelope_raw(body, key, payload_type="application/vnd.in-toto+json")
    with pytest.raises(SignatureError, match="payloadType"):
        verify_envelope(other, trusted(key, tmp_path))
    # The type is bound into the signature: relabelling the envelope breaks it.
    relabelled = envelope_raw(body, key, payload_type=PAYLOAD_TYPE,
                              signed_type="application/vnd.in-toto+json")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(relabelled, trusted(key, tmp_path))


@pytest.mark.parametrize("body,match", [
    (b'{"schema":1,"schema":1}', "duplicate key"),
    (b'{"schema":1.0}', "float"),
    (b'{"schema":NaN}', "NaN"),
    (b'[1,2]', "must be an object"),
    (b'\xff\xfe', "malformed"),
])
def test_signed_but_malformed_manifest_is_refused(tmp_path: Path, body: bytes, match: str
                                                  ) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match=match):
        verify_envelope(envelope_raw(body, key), trusted(key, tmp_path))


def test_manifest_with_unsafe_paths_is_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    for bad in ("../etc/passwd", "/abs", "a\\b", "a/../b", "envelope.json", "a//b"):
        doc = json.loads(manifest_for({"files/x": b"x"}).to_bytes())
        doc["files"][0]["path"] = bad
        with pytest.raises(SignatureError, match="unsafe file path"):
            verify_envelope(envelope_raw(canonical_json(doc), key), trusted(key, tmp_path))


def test_malformed_envelope(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    for data in (b"not json", b'{"payloadType": 1}', b'{"payload":"!!","payloadType":"x",'
                 b'"signatures":[]}'):
        with pytest.raises(SignatureError):
            verify_envelope(data, trusted(key, tmp_path))


def test_key_files_of_the_wrong_kind(tmp_path: Path) -> None:
    priv, pub, _ = generate(tmp_path / "k")
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        load_private_key(pub)
    with pytest.raises(SigningKeyError, match="not a PEM public key"):
        load_public_key(priv)
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(SigningKeyError, match=r"no \*\.pub keys"):
        load_trust(tmp_path / "empty-dir") if (tmp_path / "empty-dir").mkdir() is None else None


def test_trust_directory_holds_several_keys(tmp_path: Path) -> None:
    (tmp_path / "trust").mkdir()
    _, _, kid1 = generate(tmp_path / "trust" / "a")
    _, _, kid2 = generate(tmp_path / "trust" / "b")
    assert {k.keyid for k in load_trust(tmp_path / "trust")} == {kid1, kid2}
