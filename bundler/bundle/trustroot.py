"""A root of trust with a threshold (TUF root metadata), delegated release keys (TUF targets
delegations, one role per product pattern) and the rotation that rides in bundles.

The thresholds, the root chain (each new root signed by the threshold of the old one and of
itself) and the delegations are the `tuf` package's Metadata API; this module only decides
what a bundler host does with them: which documents it accepts, in which order, and what it
says when it refuses. Nothing here is trusted for being in a bundle: the trust documents a
bundle carries are parsed with strict size limits, chained to the host's root, and only then
used to check the bundle's own signatures, before its manifest is parsed.

Key ids: the documents bundler writes name keys by bundler's id (`signing.key_id`, 16 hex
of the sha256 of the raw Ed25519 key; of the DER SubjectPublicKeyInfo for an ECDSA token key),
the same one `bundle keygen` prints and the bundle envelope's signatures carry. TUF allows
that: TAP 12 lets a key id be any string unique within its document. Documents made by other
TUF tools name keys by TUF's default id (the sha256 of the key's canonical JSON) or any other
form; they are accepted as they are: an envelope signature under bundler's id of a key is
matched to that key by its material (`short_id`, `role_signatures`), under the document's
own id, so each key counts once whatever it is called.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from securesystemslib.signer import Key, Signature, SSlibKey
from tuf.api.metadata import Metadata, Root, Targets

from bundler.bundle.manifest import PAYLOAD_TYPE, canonical_json, parse_manifest, strict_loads
from bundler.bundle.signing import (
    COUNTERSIGN,
    MAX_SIGNATURES,
    SignerInfo,
    Verified,
    _open_envelope,
    key_id,
    pae,
)
from bundler.errors import PolicyError, SignatureError, SigningKeyError
from bundler.progname import cmd

# The envelope field that carries trust documents (outside the signed payload: they are
# signed by the root's keys themselves).
TRUST_FIELD = "bundlerTrust"
# A root or delegation document is a few KiB; anything near this is not one.
MAX_TRUST_DOC_BYTES = 256 * 1024
# Root versions carried at once: enough for years of rotations between two installs.
MAX_ROOT_CHAIN = 32
# A delegated role's kind (in its signed entry): release keys sign the payload; countersigners
# (a scanning station) sign after build, and a host may require them.
KIND_FIELD = "x-bundler-kind"
RELEASE = "release"
COUNTERSIGN_KIND = "countersign"
COUNTERSIGN_TYPE = "application/vnd.bundler.countersignature+json"
# Release keys revoked by a delegation version, listed in its signed part so the host can
# say "revoked" rather than "unknown".
REVOKED_FIELD = "x-bundler-revoked"
SPEC_VERSION = "1.0.31"
_ECDSA_TYPES = ("ecdsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384")
# A PEM public key is a few hundred bytes; a longer keyval is not one bundler can sign with.
_MAX_PUBLIC = 4096


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _day(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def tuf_key(public: Ed25519PublicKey | ec.EllipticCurvePublicKey) -> SSlibKey:
    """The TUF form of a public key under bundler's key id: an Ed25519 key (`bundle keygen`),
    or an ECDSA P-256/P-384 key (what a PKCS#11 token signs with), whose id is the first 16
    hex of the sha256 of its DER SubjectPublicKeyInfo."""
    if isinstance(public, Ed25519PublicKey):
        return SSlibKey.from_crypto(public, keyid=key_id(public))
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return SSlibKey.from_crypto(public, keyid=hashlib.sha256(der).hexdigest()[:16])


def key_material(key: Key) -> bytes | None:
    """What bundler's key id hashes, from a document's key entry: an Ed25519 key's 32 raw
    bytes, an ECDSA key's DER SubjectPublicKeyInfo; None for any other (or malformed) key.
    Two entries with the same material are the same key, whatever their ids."""
    public = key.keyval.get("public") if isinstance(key.keyval, dict) else None
    if not isinstance(public, str) or len(public) > _MAX_PUBLIC:
        return None
    try:
        if key.keytype == "ed25519":
            raw = bytes.fromhex(public)
            return raw if len(raw) == 32 else None
        if key.keytype in _ECDSA_TYPES:
            loaded = serialization.load_pem_public_key(public.encode())
            if isinstance(loaded, ec.EllipticCurvePublicKey):
                return loaded.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return None


def short_id(key: Key) -> str | None:
    """Bundler's id of a document's key (what `bundle keygen` printed for it and what the
    envelope's signatures carry), whatever id the document names it by."""
    material = key_material(key)
    return None if material is None else hashlib.sha256(material).hexdigest()[:16]


def role_signatures(keys: Mapping[str, Key], keyids: Iterable[str],
                    sigs: Mapping[str, Signature]) -> dict[str, Signature]:
    """The envelope's signatures under a role's own key ids: a key's signature is the one
    under its document id, or else the one under bundler's id of it. One signature per key
    material, so a key listed twice under two ids still counts once towards a threshold."""
    out: dict[str, Signature] = {}
    seen: set[bytes] = set()
    for kid in sorted(set(keyids)):
        key = keys.get(kid)
        if key is None:
            continue
        material = key_material(key)
        if material is not None and material in seen:
            continue
        sig = sigs.get(kid)
        if sig is None and material is not None:
            sig = sigs.get(hashlib.sha256(material).hexdigest()[:16])
        if sig is not None:
            out[kid] = Signature(kid, sig.signature)
            if material is not None:
                seen.add(material)
    return out


def load_any_public_key(path: Path) -> SSlibKey:
    """A root, release or countersigning key for a trust document: Ed25519 or ECDSA
    P-256/P-384 (a token's, `bundle keys token-pub`), as PEM."""
    try:
        public = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise SigningKeyError(f"cannot read public key {path}: {exc.strerror}",
                              hint="pass a NAME.pub from `bundle keygen`") from None
    except (ValueError, TypeError):
        raise SigningKeyError(f"{path} is not a PEM public key",
                              hint="pass a NAME.pub from `bundle keygen`") from None
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in (
            "secp256r1", "secp384r1"):
        return tuf_key(public)
    if isinstance(public, Ed25519PublicKey):
        return tuf_key(public)
    raise SigningKeyError(f"{path} is neither an Ed25519 nor an ECDSA P-256/P-384 key")


def _doc_bytes(obj: Any, what: str) -> bytes:
    try:
        data = canonical_json(obj)
    except (TypeError, ValueError) as exc:
        raise SignatureError(f"{what} is malformed: {exc}",
                             hint="carry the documents `bundle keys` writes") from None
    if len(data) > MAX_TRUST_DOC_BYTES:
        raise SignatureError(f"{what} is {len(data)} bytes, over the {MAX_TRUST_DOC_BYTES} "
                             "byte limit", hint="this is not a bundler trust document")
    return data


def parse_root(obj: Any, what: str) -> Metadata[Root]:
    """A root document from parsed JSON, its form checked (not its signatures)."""
    md: Metadata[Root] = _parse(obj, what, Root)
    return md


def parse_targets(obj: Any, what: str) -> Metadata[Targets]:
    md: Metadata[Targets] = _parse(obj, what, Targets)
    return md


def _parse(obj: Any, what: str, kind: Any) -> Any:
    _doc_bytes(obj, what)
    try:
        md: Metadata[Any] = Metadata.from_dict(copy.deepcopy(obj))
    except Exception as exc:  # hostile input: whatever tuf's parser raises is one refusal
        detail = str(exc)[:200]
        raise SignatureError(f"{what} is not a TUF {kind.type} document: {detail}",
                             hint="carry the documents `bundle keys` writes") from None
    if not isinstance(md.signed, kind):
        raise SignatureError(f"{what} is a {md.signed.type} document, not {kind.type}",
                             hint="carry the documents `bundle keys` writes")
    return md


def load_doc(data: bytes, what: str) -> Any:
    if len(data) > MAX_TRUST_DOC_BYTES:
        raise SignatureError(f"{what} is {len(data)} bytes, over the {MAX_TRUST_DOC_BYTES} "
                             "byte limit", hint="this is not a bundler trust document")
    try:
        return strict_loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{what} is not valid JSON: {str(exc)[:200]}",
                             hint="pass the file `bundle keys` wrote") from None


def self_signed(md: Metadata[Root], what: str) -> None:
    """A first root: signed by the threshold of its own root keys."""
    result = md.signed.get_verification_result(Root.type, md.signed_bytes, md.signatures)
    if not result:
        raise SignatureError(
            f"{what} (root version {md.signed.version}) is signed by {len(result.signed)} of "
            f"the {result.threshold} root keys it needs",
            hint="have more root key holders sign it: `bundle keys sign DIR --key ROOT.key`")


def check_root_fresh(md: Metadata[Root], now: datetime) -> None:
    if md.signed.is_expired(now):
        raise PolicyError(
            f"the root of trust (version {md.signed.version}) expired on "
            f"{_day(md.signed.expires)}",
            hint="have the root key holders sign a new root version (`bundle keys rotate-root`) "
                 "and carry it in the next bundle (`bundle sign --trust-metadata`)")


def check_targets_fresh(md: Metadata[Targets], now: datetime) -> None:
    if md.signed.is_expired(now):
        raise PolicyError(
            f"the release key delegation (version {md.signed.version}) expired on "
            f"{_day(md.signed.expires)}",
            hint="have the root key holders sign a new delegation version (`bundle keys "
                 "delegate`) and carry it in the next bundle (`bundle sign --trust-metadata`)")


def chain_root(trusted: Metadata[Root], newer: list[Metadata[Root]]) -> Metadata[Root]:
    """TUF's root update (spec 5.3): each version N+1 signed by the threshold of version N's
    root keys and of its own; never back to an older version."""
    for md in sorted(newer, key=lambda m: m.signed.version):
        version, current = md.signed.version, trusted.signed.version
        if version < current:
            continue  # history the bundle carries; the host is past it
        if version == current:
            if md.signed_bytes != trusted.signed_bytes:
                raise PolicyError(
                    f"the bundle carries a different root version {version} than the one "
                    "this host trusts", hint="do not install it: root versions never fork")
            continue
        if version != current + 1:
            raise PolicyError(
                f"the bundle carries root version {version} but not {current + 1}: it does "
                f"not chain to version {current}, which this host trusts",
                hint="carry every root version since the hosts' (`bundle sign "
                     "--trust-metadata DIR` takes all of DIR/N.root.json)")
        result = md.signed.get_root_verification_result(
            trusted.signed, md.signed_bytes, md.signatures)
        if not result:
            raise SignatureError(
                f"root version {version} is signed by {len(result.first.signed)}/"
                f"{result.first.threshold} of version {current}'s root keys and "
                f"{len(result.second.signed)}/{result.second.threshold} of its own",
                hint="a new root needs the threshold of the old root keys AND of the new: "
                     "`bundle keys sign DIR --key ROOT.key`")
        trusted = md
    return trusted


def accept_targets(root: Metadata[Root], current: Metadata[Targets] | None,
                   new: Metadata[Targets]) -> Metadata[Targets]:
    """A delegation version signed by the root's targets role, never older than the one held."""
    result = root.signed.get_verification_result(Targets.type, new.signed_bytes,
                                                 new.signatures)
    if not result:
        raise SignatureError(
            f"the release key delegation (version {new.signed.version}) is signed by "
            f"{len(result.signed)} of the {result.threshold} root keys it needs",
            hint="have more root key holders sign it: `bundle keys sign DIR --targets "
                 "--key ROOT.key`")
    if current is None:
        return new
    if new.signed.version < current.signed.version:
        raise PolicyError(
            f"the bundle carries release key delegation version {new.signed.version}, older "
            f"than version {current.signed.version} which this host trusts: rollback refused",
            hint="carry the current delegation (`bundle sign BUNDLE --trust-metadata DIR`)")
    if new.signed.version == current.signed.version:
        if new.signed_bytes != current.signed_bytes:
            raise PolicyError(
                f"the bundle carries a different release key delegation version "
                f"{new.signed.version} than the one this host trusts",
                hint="do not install it: delegation versions never fork")
        return current
    return new


@dataclass(frozen=True)
class Carried:
    """The trust documents an envelope carries, parsed and size-checked, not yet trusted."""

    roots: tuple[Metadata[Root], ...] = ()
    targets: Metadata[Targets] | None = None


def carried(env: dict[str, Any]) -> Carried:
    block = env.get(TRUST_FIELD)
    if block is None:
        return Carried()
    if not isinstance(block, dict) or set(block) - {"root", "targets"}:
        raise SignatureError(f"envelope.json's {TRUST_FIELD} is malformed",
                             hint="this is not a bundler bundle, or it was damaged")
    roots = block.get("root", [])
    if not isinstance(roots, list) or len(roots) > MAX_ROOT_CHAIN:
        raise SignatureError(f"envelope.json carries more than {MAX_ROOT_CHAIN} root versions "
                             "or a malformed list", hint="this is not a bundler bundle")
    parsed = tuple(parse_root(r, f"carried root #{i + 1}") for i, r in enumerate(roots))
    targets = block.get("targets")
    return Carried(parsed, None if targets is None else
                   parse_targets(targets, "carried release key delegation"))


def attach(envelope: dict[str, Any], roots: list[Metadata[Root]],
           targets: Metadata[Targets] | None) -> dict[str, Any]:
    """`envelope` with these trust documents in its carried block (the payload untouched)."""
    out = dict(envelope)
    block: dict[str, Any] = {}
    if roots:
        block["root"] = [r.to_dict() for r in sorted(roots, key=lambda m: m.signed.version)]
    if targets is not None:
        block["targets"] = targets.to_dict()
    if block:
        out[TRUST_FIELD] = block
    else:
        out.pop(TRUST_FIELD, None)
    return out


@dataclass(frozen=True)
class Counter:
    """A countersignature entry: it signs the payload's digest, its role and its time."""

    keyid: str
    sig: Signature
    role: str
    time: str


def countersign_message(digest: str, role: str, time: str) -> bytes:
    """What a countersignature signs (DSSE PAE of its own type: never a manifest's)."""
    return pae(COUNTERSIGN_TYPE, canonical_json({"payload_sha256": digest, "role": role,
                                                 "time": time}))


def role_kind(role: Any) -> str:
    kind = role.unrecognized_fields.get(KIND_FIELD, RELEASE)
    return kind if kind in (RELEASE, COUNTERSIGN_KIND) else "unknown"


def _signatures(sigs: list[Any]) -> tuple[dict[str, Signature], list[Counter]]:
    """The envelope's release signatures as TUF Signature objects (hex) keyed by key id, and
    its countersignatures."""
    if len(sigs) > MAX_SIGNATURES:
        raise SignatureError(f"envelope.json has {len(sigs)} signatures; at most "
                             f"{MAX_SIGNATURES} are accepted", hint="this is not a bundler bundle")
    plain: dict[str, Signature] = {}
    counters: list[Counter] = []
    for entry in sigs:
        if not isinstance(entry, dict):
            continue
        kid, sig, extra = entry.get("keyid"), entry.get("sig"), entry.get(COUNTERSIGN)
        if not isinstance(kid, str) or not isinstance(sig, str):
            continue
        try:
            signature = Signature(kid, base64.b64decode(sig, validate=True).hex())
        except (binascii.Error, ValueError):
            continue
        if extra is None:
            plain.setdefault(kid, signature)
        elif (isinstance(extra, dict) and isinstance(extra.get("role"), str)
              and isinstance(extra.get("time"), str) and len(extra["time"]) <= 40):
            counters.append(Counter(kid, signature, extra["role"], extra["time"]))
    return plain, counters


@dataclass
class RootTrust:
    """A host's trust in root mode: its root, its delegation, and what to do with an update.

    `verify_envelope` is what `signing.verify_envelope` calls for it: updates carried by the
    envelope are chained first, then the bundle's signatures must meet the threshold of a
    delegated role, and only then is the manifest parsed and its product matched to that role.
    `record` (set by the install root) keeps an accepted update; `bundle verify` leaves it None.
    """

    root: Metadata[Root]
    targets: Metadata[Targets] | None
    source: str
    record: Callable[[Metadata[Root], Metadata[Targets] | None], None] | None = None
    now: Callable[[], datetime] = field(default=_now)
    required: tuple[str, ...] = ()  # countersigning roles this host's policy requires

    def updated(self, docs: Carried) -> tuple[Metadata[Root], Metadata[Targets] | None]:
        root = chain_root(self.root, list(docs.roots))
        check_root_fresh(root, self.now())
        targets = self.targets
        if root is not self.root and targets is not None:
            # a new root may have new targets keys: the held delegation must still verify
            targets = accept_targets(root, None, targets) if docs.targets is None else targets
        if docs.targets is not None:
            targets = accept_targets(root, targets, docs.targets)
        if targets is None:
            raise SignatureError(
                f"{self.source} delegates no release key yet",
                hint="carry a delegation in the bundle: `bundle keys delegate DIR ...`, then "
                     "`bundle sign BUNDLE --trust-metadata DIR`")
        check_targets_fresh(targets, self.now())
        return root, targets

    def signers(self, targets: Metadata[Targets], body: bytes,
                sigs: dict[str, Signature]) -> tuple[list[SignerInfo], list[str]]:
        """Release roles whose threshold the signatures meet, and a line per role that fell
        short."""
        message = pae(PAYLOAD_TYPE, body)
        met: list[SignerInfo] = []
        short: list[str] = []
        for name, role in _roles(targets):
            if role_kind(role) != RELEASE:
                continue
            result = targets.signed.get_verification_result(
                name, message, _for_role(targets, role, sigs))
            if result:
                met += [SignerInfo(k, name, bundler_keyid=short_id(key))
                        for k, key in sorted(result.signed.items())]
            elif result.signed:
                short.append(f"{name}: {len(result.signed)} of {role.threshold} signatures")
        return met, short

    def countersigners(self, targets: Metadata[Targets], digest: str,
                       counters: list[Counter]) -> dict[str, list[SignerInfo]]:
        """Valid countersignatures by role (each entry checked against its role's keys)."""
        roles = dict(_roles(targets))
        out: dict[str, list[SignerInfo]] = {}
        for c in counters:
            role = roles.get(c.role)
            if role is None or role_kind(role) != COUNTERSIGN_KIND:
                continue
            message = countersign_message(digest, c.role, c.time)
            result = targets.signed.get_verification_result(
                c.role, message, _for_role(targets, role, {c.keyid: c.sig}))
            have = {s.keyid for s in out.get(c.role, [])}
            for kid, key in sorted(result.signed.items()):
                if kid not in have:
                    out.setdefault(c.role, []).append(
                        SignerInfo(kid, c.role, c.time, bundler_keyid=short_id(key)))
        return out

    def verify_envelope(self, data: bytes) -> Verified:
        _, body, raw_sigs = _open_envelope(data, PAYLOAD_TYPE, "envelope.json",
                                           "this is not a bundler bundle, or it was damaged")
        env = strict_loads(data)  # already parsed once by _open_envelope: it is well-formed
        root, targets = self.updated(carried(env))
        assert targets is not None
        sigs, counters = _signatures(raw_sigs)
        met, short = self.signers(targets, body, sigs)
        if not met:
            raise self._refusal(targets, sigs, short)
        manifest = parse_manifest(body)
        roles = dict(_roles(targets))
        allowed = sorted({s.role for s in met
                          if roles[s.role].is_delegated_path(manifest.name)})
        if not allowed:
            raise SignatureError(
                f"the bundle of {manifest.name!r} is signed for "
                f"{', '.join(sorted({s.role for s in met}))}, not for {manifest.name!r}",
                hint="its release keys may not sign this product; have the root delegate it "
                     "(`bundle keys delegate DIR --product NAME`)")
        digest = hashlib.sha256(body).hexdigest()
        counted = self.countersigners(targets, digest, counters)
        self._check_required(roles, counted, counters, manifest.name)
        if self.record is not None and (root is not self.root or targets is not self.targets):
            self.record(root, targets)
        self.root, self.targets = root, targets
        signers = [s for s in met if s.role in allowed]
        signers += [s for role in sorted(counted) for s in counted[role]
                    if roles[role].is_delegated_path(manifest.name)]
        # the bundle's key as `bundle keygen` printed it and the envelope names it
        first = signers[0].bundler_keyid or signers[0].keyid
        return Verified(manifest, body, first, digest, tuple(signers))

    def _check_required(self, roles: dict[str, Any], counted: dict[str, list[SignerInfo]],
                        counters: list[Counter], product: str) -> None:
        for name in self.required:
            role = roles.get(name)
            if role is None or role_kind(role) != COUNTERSIGN_KIND:
                raise PolicyError(
                    f"this host requires a countersignature by role {name!r}, which the "
                    "delegation does not define as a countersigning role",
                    hint="have the root delegate it (`bundle keys delegate DIR --role NAME "
                         "--countersign ...`), or change the host's requirement (`"
                         f"{cmd('trust', 'require', '--root', 'ROOT')}`)")
            have = [s for s in counted.get(name, []) if role.is_delegated_path(product)]
            if len(have) >= role.threshold:
                continue
            counted_ids = {s.keyid for s in have} | {s.bundler_keyid for s in have}
            others = sorted({c.keyid for c in counters if c.role == name} - counted_ids)
            wrong = f"; key {', '.join(others)} is not one of its keys" if others else ""
            raise PolicyError(
                f"this host requires {role.threshold} countersignature(s) by role {name!r} for "
                f"{product!r}; the bundle has {len(have)}{wrong}",
                hint=f"have the {name} station countersign it: `bundle countersign BUNDLE "
                     f"--role {name} --key NAME.key`")

    def _refusal(self, targets: Metadata[Targets], sigs: dict[str, Signature],
                 short: list[str]) -> SignatureError:
        if short:
            return SignatureError(
                f"the bundle does not meet its release threshold ({'; '.join(short)})",
                hint=f"have another release key holder add a signature: `bundle sign BUNDLE "
                     f"--key NAME.key`, then retry `{cmd('install')}`")
        revoked = targets.signed.unrecognized_fields.get(REVOKED_FIELD, [])
        gone = [k for k in sigs if isinstance(revoked, list) and k in revoked]
        if gone:
            return SignatureError(
                f"the bundle is signed by release key {', '.join(gone)}, revoked in delegation "
                f"version {targets.signed.version}",
                hint="do not install it; have a current release key sign a new build")
        return SignatureError(
            f"the bundle is signed by key {', '.join(sorted(sigs)) or 'none'}, which is not a "
            f"release key delegated by {self.source} (delegation version "
            f"{targets.signed.version})",
            hint="have the root delegate that key (`bundle keys delegate`), or sign with a "
                 "delegated one")

    def verify_payload(self, data: bytes, expected_type: str, what: str,
                       by: set[str] | None = None) -> tuple[bytes, str]:
        """Another document signed by release keys (a volume set's part index), against the
        host's current delegation: the threshold of a release role, or (`by`: the release
        keys whose signatures the bundle's envelope was just accepted on) one of those keys.
        The index only carries the bundle; what is installed met the threshold itself."""
        _, body, raw_sigs = _open_envelope(data, expected_type, what,
                                           "this is not a bundler bundle, or it was damaged")
        _root, targets = self.updated(carried(strict_loads(data)))
        assert targets is not None
        sigs, _ = _signatures(raw_sigs)
        message = pae(expected_type, body)
        for name, role in _roles(targets):
            if role_kind(role) != RELEASE:
                continue
            result = targets.signed.get_verification_result(
                name, message, _for_role(targets, role, sigs))
            if result:
                kid, key = sorted(result.signed.items())[0]
                return body, short_id(key) or kid
            if by is not None and (ours := sorted(set(result.signed) & by)):
                return body, short_id(result.signed[ours[0]]) or ours[0]
        if by is not None:
            raise SignatureError(
                f"{what} is not signed by any key that signed the bundle "
                f"({', '.join(sorted(by))}); it is signed by {', '.join(sorted(sigs)) or 'none'}",
                hint="have a release key holder add a signature to the set: `bundle sign "
                     f"{what} --key NAME.key`")
        raise self._refusal(targets, sigs, [])

    def describe(self) -> dict[str, Any]:
        return {**describe(self.root, self.targets), "required": list(self.required)}


def _roles(targets: Metadata[Targets]) -> list[tuple[str, Any]]:
    delegations = targets.signed.delegations
    return sorted((delegations.roles or {}).items()) if delegations else []


def _for_role(targets: Metadata[Targets], role: Any,
              sigs: Mapping[str, Signature]) -> dict[str, Signature]:
    delegations = targets.signed.delegations
    keys = delegations.keys if delegations is not None and delegations.keys else {}
    return role_signatures(keys, role.keyids, sigs)


def _bundler_ids(keys: Mapping[str, Key]) -> dict[str, str]:
    """Document key id -> bundler's id of that key, for `--json` readers matching
    `bundle keygen`'s output (the same string for documents bundler wrote)."""
    out = {}
    for kid, key in sorted(keys.items()):
        short = short_id(key)
        if short is not None:
            out[kid] = short
    return out


def describe(root: Metadata[Root], targets: Metadata[Targets] | None) -> dict[str, Any]:
    """The trust a host (or a trust directory) holds, for `--json` and humans alike."""
    r = root.signed
    root_ids = r.roles[Root.type].keyids
    out: dict[str, Any] = {
        "root": {"version": r.version, "expires": _day(r.expires),
                 "threshold": r.roles[Root.type].threshold,
                 "keys": sorted(root_ids),
                 "signatures": sorted(root.signatures),
                 "bundler_keyids": _bundler_ids({k: r.keys[k] for k in root_ids
                                                 if k in r.keys})},
        "delegation": None,
    }
    if targets is not None:
        t = targets.signed
        roles = t.delegations.roles if t.delegations and t.delegations.roles else {}
        revoked = t.unrecognized_fields.get(REVOKED_FIELD, [])
        keys = t.delegations.keys if t.delegations and t.delegations.keys else {}
        out["delegation"] = {
            "version": t.version, "expires": _day(t.expires),
            "signatures": sorted(targets.signatures),
            "roles": [{"name": n, "kind": role_kind(role), "products": list(role.paths or []),
                       "threshold": role.threshold, "keys": sorted(role.keyids)}
                      for n, role in sorted(roles.items())],
            "revoked": sorted(revoked) if isinstance(revoked, list) else [],
            "bundler_keyids": _bundler_ids(keys),
        }
    return out


def summary(info: dict[str, Any]) -> str:
    """`describe`'s document as a few lines for a human."""
    r = info["root"]
    lines = [f"  root version {r['version']}: {r['threshold']} of "
             f"{_named(r['keys'], r.get('bundler_keyids', {}))}, expires {r['expires']}"]
    d = info["delegation"]
    if d is None:
        lines.append("  no release key delegated yet (it arrives in a bundle)")
        return "\n".join(lines)
    lines.append(f"  delegation version {d['version']}, expires {d['expires']}")
    ids = d.get("bundler_keyids", {})
    lines += [f"    {role['name']} ({role['kind']}): products {', '.join(role['products'])}; "
              f"{role['threshold']} of {_named(role['keys'], ids)}" for role in d["roles"]]
    if d["revoked"]:
        lines.append(f"    revoked: {', '.join(d['revoked'])}")
    if info.get("required"):
        lines.append(f"  this host requires countersignatures by {', '.join(info['required'])}")
    return "\n".join(lines)


def _named(keyids: list[str], bundler_ids: dict[str, str]) -> str:
    """Key ids for a human, with bundler's id beside any the document names otherwise."""
    return ", ".join(k if bundler_ids.get(k, k) == k else f"{k} (bundler: {bundler_ids[k]})"
                     for k in keyids)
