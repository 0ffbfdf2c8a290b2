"""Keys, the DSSE envelope and Ed25519 signatures.

The envelope signs PAE(payloadType, payload): the type is bound into the signature, so a
signature made for one kind of document cannot be replayed as another. Verification works on
the exact payload bytes and only then hands them to the manifest parser.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from bundler.bundle.manifest import (
    PAYLOAD_TYPE,
    Manifest,
    canonical_json,
    parse_manifest,
    strict_loads,
)
from bundler.errors import SignatureError, SigningKeyError
from bundler.fsutil import atomic_write_bytes

# The one limit on an envelope's size: the reader refuses more, and so does `bundle build`.
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
# A signature entry with this field is a countersignature (`trustroot`): it signs the
# payload's digest, its role and its time, not the payload itself.
COUNTERSIGN = "countersign"
ENVELOPE_NAME = "envelope.json"
# We sign with one key; a few more leave room for co-signing. Many more is not a bundle.
MAX_SIGNATURES = 16


def _short(value: object, limit: int = 80) -> str:
    """repr() of untrusted text for an error message, cut so the message stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class TrustedKey:
    keyid: str
    key: Ed25519PublicKey
    source: str


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Policy(Protocol):
    """A trust that is more than a list of keys (a root of trust: `trustroot.RootTrust`)."""

    def verify_envelope(self, data: bytes) -> Verified: ...

    def verify_payload(self, data: bytes, expected_type: str, what: str,
                       by: set[str] | None = None) -> tuple[bytes, str]: ...


# What a bundle is verified against: loose keys (the simple mode) or a root of trust.
Trust = Union[list[TrustedKey], Policy]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def generate(name: Path, force: bool = False) -> tuple[Path, Path, str]:
    """Write NAME.key (0600) and NAME.pub; return both paths and the key id."""
    priv_path = name.with_name(name.name + ".key")
    pub_path = name.with_name(name.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not force:
            raise SigningKeyError(f"{p} already exists",
                                  hint="choose another name, or pass --force to replace it")
    private = Ed25519PrivateKey.generate()
    atomic_write_bytes(priv_path, private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    atomic_write_bytes(pub_path, private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path, key_id(private.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SigningKeyError(
            f"{path} is not an unencrypted PEM private key",
            hint="pass the NAME.key written by `bundle keygen NAME` (not the .pub)",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 key",
                              hint="create one with `bundle keygen NAME`")
    return key


def load_public_key(path: Path) -> TrustedKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read public key {path}: {exc.strerror}",
                              hint="pass the NAME.pub written by `bundle keygen NAME`") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise SigningKeyError(
            f"{path} is not a PEM public key",
            hint="pass the NAME.pub written by `bundle keygen NAME` (never share the .key)",
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an Ed25519 public key")
    return TrustedKey(keyid=key_id(key), key=key, source=str(path))


def load_trust(path: Path) -> list[TrustedKey]:
    """A single .pub file, or every *.pub in a directory."""
    if path.is_dir():
        keys = [load_public_key(p) for p in sorted(path.glob("*.pub"))]
        if not keys:
            raise SigningKeyError(f"no *.pub keys in {path}",
                                  hint="copy the builder's NAME.pub into that directory")
        return keys
    return [load_public_key(path)]


def sign_payload(body: bytes, payload_type: str, private: Ed25519PrivateKey) -> bytes:
    """A DSSE envelope over `body`, deterministic (Ed25519 signatures are)."""
    sig = private.sign(pae(payload_type, body))
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(body).decode(),
        "signatures": [{"keyid": key_id(private.public_key()),
                        "sig": base64.b64encode(sig).decode()}],
    }
    return canonical_json(envelope)


def sign(manifest: Manifest, private: Ed25519PrivateKey) -> bytes:
    """Return the envelope bytes for `manifest`."""
    return sign_payload(manifest.to_bytes(), PAYLOAD_TYPE, private)


@dataclass(frozen=True)
class SignerInfo:
    """One valid signature on a bundle, for `bundle inspect`: whose key, for which role
    (`key` in the simple mode), and when (countersignatures sign their time). `keyid` is the
    trust document's id of the key; `bundler_keyid` bundler's (`bundle keygen`'s) when the
    document names it otherwise (TUF's canonical ids: `trustroot`)."""

    keyid: str
    role: str
    time: str | None = None
    bundler_keyid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"keyid": self.keyid, "role": self.role, "time": self.time,
                "bundler_keyid": self.bundler_keyid or self.keyid}


@dataclass(frozen=True)
class Verified:
    manifest: Manifest
    manifest_bytes: bytes
    keyid: str
    digest: str  # sha256 of the manifest bytes: the bundle's identity
    signers: tuple[SignerInfo, ...] = ()


def _open_envelope(data: bytes, expected_type: str, what: str,
                   malformed_hint: str) -> tuple[str, bytes, list[Any]]:
    """A DSSE envelope's payload type, payload bytes and signature entries, its form and
    payload type checked (not its signatures): what verifying and reading unverified share."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise SignatureError(f"{what} is {len(data)} bytes, over the "
                             f"{MAX_ENVELOPE_BYTES} limit", hint="this is not a bundler bundle")
    try:
        env = strict_loads(data)
        payload_type = env["payloadType"]
        body = base64.b64decode(env["payload"], validate=True)
        sigs = env["signatures"]
        if not isinstance(sigs, list) or not isinstance(payload_type, str):
            raise ValueError("bad envelope fields")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, binascii.Error) as exc:
        detail = str(exc)
        detail = detail if len(detail) <= 200 else detail[:200] + "..."
        raise SignatureError(f"{what} is malformed: {detail}", hint=malformed_hint) from None
    if payload_type != expected_type:
        raise SignatureError(f"{what} payloadType is {_short(payload_type)}, "
                             f"expected {expected_type!r}",
                             hint="this envelope signs another kind of document")
    return payload_type, body, sigs


def verify_payload(data: bytes, trusted: Trust, expected_type: str,
                   what: str = "envelope.json",
                   by: set[str] | None = None) -> tuple[bytes, str]:
    """Check a DSSE envelope against trusted keys; return (payload bytes, signer key id).
    `by`: only these of the trusted keys count (a volume set's index: the keys that signed
    its bundle's envelope).

    The payload is returned as the exact signed bytes and only then parsed by the caller.
    """
    if not isinstance(trusted, list):
        return trusted.verify_payload(data, expected_type, what, by)
    if by is not None:
        trusted = [k for k in trusted if k.keyid in by]
    payload_type, body, sigs = _open_envelope(
        data, expected_type, what, "this is not a bundler bundle, or it was damaged")
    if not sigs:
        raise SignatureError(f"{what} is not signed (no signatures)",
                             hint="build it with `bundle build --key NAME.key`")
    if len(sigs) > MAX_SIGNATURES:
        raise SignatureError(f"{what} has {len(sigs)} signatures; at most {MAX_SIGNATURES} "
                             "are accepted", hint="this is not a bundler bundle")
    by_id = {k.keyid: k for k in trusted}
    message = pae(payload_type, body)
    seen_ids = []
    for entry in sigs:
        if not isinstance(entry, dict) or COUNTERSIGN in entry:
            continue  # a countersignature signs another message: a root of trust checks it
        kid = entry.get("keyid")
        shown = str(kid)
        seen_ids.append(shown if len(shown) <= 40 else shown[:40] + "...")
        trusted_key = by_id.get(str(kid))
        if trusted_key is None:
            continue
        try:
            raw_sig = base64.b64decode(str(entry.get("sig", "")), validate=True)
            trusted_key.key.verify(raw_sig, message)
        except (InvalidSignature, binascii.Error, ValueError):
            raise SignatureError(
                f"signature by key {kid} does not verify: {what} was altered",
                hint="do not install this bundle; get a fresh copy from the builder",
            ) from None
        return body, trusted_key.keyid
    if by is not None:
        raise SignatureError(
            f"{what} is not signed by any key that signed the bundle ({', '.join(sorted(by))}); "
            f"it is signed by {', '.join(seen_ids) or 'none'}",
            hint=f"have the bundle's signer add a signature: `bundle sign {what} --key "
                 "NAME.key`, or copy the set again from the source")
    trusted_ids = ", ".join(sorted(by_id)) or "none"
    raise SignatureError(
        f"{what} is signed by key {', '.join(seen_ids)}, which is not trusted "
        f"(trusted: {trusted_ids})",
    )


def envelope_digest(envelope: bytes) -> str:
    """The sha256 of the manifest a bundle envelope signs (its identity, `Verified.digest`),
    for the writer that just made the envelope: its signatures are not checked."""
    _, body, _ = _open_envelope(envelope, PAYLOAD_TYPE, ENVELOPE_NAME, "internal")
    return hashlib.sha256(body).hexdigest()


def unverified_payload(data: bytes, expected_type: str, what: str) -> tuple[bytes, str]:
    """The payload of a DSSE envelope and the key id it names, WITHOUT checking the signature:
    for a document whose signer's key the reader does not have (a host's receipt read on the
    connected side with no --host-key). Its payload type is still checked."""
    _, body, sigs = _open_envelope(data, expected_type, what,
                                   "pass the file `bundle receipt` wrote")
    keyid = sigs[0].get("keyid", "") if sigs and isinstance(sigs[0], dict) else ""
    if not isinstance(keyid, str):
        raise SignatureError(f"{what} is malformed: bad envelope fields",
                             hint="pass the file `bundle receipt` wrote")
    return body, keyid


def verify_envelope(data: bytes, trusted: Trust) -> Verified:
    """Check the bundle envelope's signature; parse the manifest only after."""
    if not isinstance(trusted, list):
        return trusted.verify_envelope(data)
    body, keyid = verify_payload(data, trusted, PAYLOAD_TYPE)
    manifest = parse_manifest(body)
    return Verified(manifest, body, keyid, hashlib.sha256(body).hexdigest(),
                    (SignerInfo(keyid, "key"),))
