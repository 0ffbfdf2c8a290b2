"""The offline side of a root of trust: the trust directory (N.root.json for every root
version, targets.json for the release key delegation) and the signatures added to bundles.

Every document is made and signed with the `tuf` Metadata API and securesystemslib's
CryptoSigner; keys are bundler's Ed25519 pairs (`bundle keygen`). A new root or delegation
version starts unsigned: the root key holders sign it one by one, each on their own machine
(`bundle keys sign`), until the threshold is met.

New documents name keys by bundler's ids; documents another TUF tool wrote (TUF's canonical
ids) are signed and revoked in as they are: a key is found by its material, and signs under
the id the document gives it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlparse

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import DelegatedRole, Delegations, Metadata, Root, Targets

from bundler.bundle import trustroot, volumes
from bundler.bundle.archive import ENVELOPE, _header
from bundler.bundle.manifest import PAYLOAD_TYPE, canonical_json, strict_loads
from bundler.bundle.signing import (
    COUNTERSIGN,
    MAX_ENVELOPE_BYTES,
    MAX_SIGNATURES,
    _open_envelope,
    load_private_key,
    pae,
)
from bundler.errors import SignatureError, SigningKeyError
from bundler.fsutil import atomic_write_bytes

TARGETS_FILE = "targets.json"
_ROOT_NAME = re.compile(r"^([1-9][0-9]{0,8})\.root\.json$")


def _expiry(days: int) -> datetime:
    if days <= 0:
        raise SigningKeyError(f"--days must be positive, not {days}")
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)


def root_versions(directory: Path) -> list[Path]:
    """DIR/N.root.json, in version order."""
    found = [(int(m.group(1)), p) for p in directory.glob("*.root.json")
             if (m := _ROOT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _read(path: Path) -> Any:
    try:
        return trustroot.load_doc(path.read_bytes(), str(path))
    except OSError as exc:
        raise SigningKeyError(f"cannot read {path}: {exc.strerror}",
                         hint="`bundle keys init DIR` starts a trust directory") from None


def roots(directory: Path) -> list[Metadata[Root]]:
    paths = root_versions(directory)
    if not paths:
        raise SigningKeyError(f"{directory} has no N.root.json",
                         hint="start one with `bundle keys init DIR --key ROOT.pub ...`")
    return [trustroot.parse_root(_read(p), str(p)) for p in paths]


def targets(directory: Path) -> Metadata[Targets] | None:
    path = directory / TARGETS_FILE
    return trustroot.parse_targets(_read(path), str(path)) if path.is_file() else None


def _write(path: Path, md: Metadata[Any]) -> None:
    atomic_write_bytes(path, md.to_bytes(), mode=0o644)


def _keys(pubs: list[Path]) -> list[Any]:
    keys = [trustroot.load_any_public_key(p) for p in pubs]
    if len({k.keyid for k in keys}) != len(keys):
        raise SigningKeyError("the same key is named twice")
    return keys


def _check_threshold(threshold: int, keys: int, what: str) -> None:
    if not 1 <= threshold <= keys:
        raise SigningKeyError(
            f"a {what} threshold of {threshold} with {keys} keys can never be met",
            hint="pass --threshold between 1 and the number of --key")


def _new_root(version: int, pubs: list[Path], threshold: int, days: int,
              previous: Root | None = None) -> Metadata[Root]:
    """Root VERSION: new keys under bundler's ids; a key PREVIOUS lists keeps its id there
    (another tool's canonical one), so the delegation it signed still verifies."""
    _check_threshold(threshold, len(pubs), "root")
    root = Root(version=version, spec_version=trustroot.SPEC_VERSION, expires=_expiry(days))
    listed = dict(previous.keys) if previous is not None else {}
    for key in (_as_listed(k, listed) for k in _keys(pubs)):
        for role in root.roles:  # snapshot/timestamp unused offline: held by the root keys
            root.add_key(key, role)
    for held in root.roles.values():
        held.threshold = threshold
    return Metadata(root)


def init_root(directory: Path, pubs: list[Path], threshold: int, days: int) -> Path:
    if root_versions(directory):
        raise SigningKeyError(f"{directory} already has a root",
                         hint="`bundle keys rotate-root DIR` makes the next version")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "1.root.json"
    _write(path, _new_root(1, pubs, threshold, days))
    return path


def rotate_root(directory: Path, pubs: list[Path], threshold: int, days: int) -> Path:
    latest = roots(directory)[-1].signed
    path = directory / f"{latest.version + 1}.root.json"
    _write(path, _new_root(latest.version + 1, pubs, threshold, days, latest))
    return path


def _next_targets(directory: Path, days: int) -> Metadata[Targets]:
    held = targets(directory)
    if held is None:
        return Metadata(Targets(version=1, spec_version=trustroot.SPEC_VERSION,
                                expires=_expiry(days),
                                delegations=Delegations(keys={}, roles={})))
    t = held.signed
    t.version += 1
    t.expires = _expiry(days)
    if t.delegations is None or t.delegations.roles is None:
        t.delegations = Delegations(keys={}, roles={})
    return Metadata(t)  # unsigned: the old signatures are over another version


def delegate(directory: Path, role: str, products: list[str], pubs: list[Path],
             threshold: int, days: int, countersign: bool = False) -> Path:
    roots(directory)  # a delegation needs a root to sign it
    if not products:
        raise SigningKeyError("name at least one --product (a manifest name; * globs)")
    _check_threshold(threshold, len(pubs), "release")
    md = _next_targets(directory, days)
    delegations = md.signed.delegations
    assert delegations is not None and delegations.roles is not None
    keys = [_as_listed(k, delegations.keys) for k in _keys(pubs)]
    kind = trustroot.COUNTERSIGN_KIND if countersign else trustroot.RELEASE
    delegations.roles[role] = DelegatedRole(role, [k.keyid for k in keys], threshold, True,
                                            paths=list(products),
                                            unrecognized_fields={trustroot.KIND_FIELD: kind})
    for key in keys:
        delegations.keys[key.keyid] = key
    revoked = md.signed.unrecognized_fields.get(trustroot.REVOKED_FIELD, [])
    if revoked:
        live = {name for key in delegations.keys.values() for name in _names(key)}
        md.signed.unrecognized_fields[trustroot.REVOKED_FIELD] = [
            k for k in revoked if k not in live]
    _prune(delegations)
    path = directory / TARGETS_FILE
    _write(path, md)
    return path


def _as_listed(key: SSlibKey, listed: dict[str, Any]) -> SSlibKey:
    """KEY under the id the document already lists it by (another tool's canonical id), so
    delegating a key again never lists it twice."""
    material = trustroot.key_material(key)
    for _kid, other in sorted(listed.items()):
        if material is not None and isinstance(other, SSlibKey) and \
                trustroot.key_material(other) == material:
            return other
    return key


def _names(key: Any) -> set[str]:
    """Every id a key goes by: the document's, bundler's and TUF's default (the sha256 of
    its canonical JSON), to forget a revocation recorded under any of them."""
    names = {key.keyid}
    short = trustroot.short_id(key)
    if short:
        names.add(short)
    try:
        canonical = encode_canonical(
            {"keytype": key.keytype, "scheme": key.scheme, "keyval": key.keyval}) or ""
    except FormatError:  # a keyval canonical JSON cannot hold (a float): no default id
        return names
    return names | {hashlib.sha256(canonical.encode()).hexdigest()}


def _aliases(keys: dict[str, Any], keyid: str) -> list[str]:
    """The delegated key ids KEYID names (the document's id, bundler's or TUF's default id of
    a key), with any other id the same key is listed under."""
    named = [k for k, key in keys.items() if keyid in _names(key)]
    materials = {trustroot.key_material(keys[k]) for k in named} - {None}
    return sorted({*named, *(k for k, key in keys.items()
                             if trustroot.key_material(key) in materials)})


def revoke(directory: Path, keyid: str, days: int) -> Path:
    """The next delegation version without KEYID (the document's id or bundler's); both ids
    are recorded as revoked: a host names the key by the id a bundle's signature carries."""
    held = targets(directory)
    ids = _aliases(held.signed.delegations.keys or {}, keyid) if (
        held is not None and held.signed.delegations is not None) else []
    if not ids:
        raise SigningKeyError(f"key {keyid} is not delegated in {directory / TARGETS_FILE}",
                         hint="`bundle keys show DIR` lists the delegated keys")
    md = _next_targets(directory, days)
    delegations = md.signed.delegations
    assert delegations is not None and delegations.roles is not None
    gone = {name for kid in ids for name in (kid, trustroot.short_id(delegations.keys[kid]))
            if name is not None}
    for name, role in delegations.roles.items():
        if gone & set(role.keyids):
            role.keyids = [k for k in role.keyids if k not in gone]
            if len(role.keyids) < role.threshold:
                raise SigningKeyError(
                    f"role {name} would keep {len(role.keyids)} keys for a threshold of "
                    f"{role.threshold}",
                    hint="delegate a new key to it in the same version first (`bundle keys "
                         "delegate ... --key NEW.pub`), then revoke")
    revoked = list(md.signed.unrecognized_fields.get(trustroot.REVOKED_FIELD, []))
    md.signed.unrecognized_fields[trustroot.REVOKED_FIELD] = sorted({*revoked, *gone})
    _prune(delegations)
    path = directory / TARGETS_FILE
    _write(path, md)
    return path


def _prune(delegations: Delegations) -> None:
    used = {k for role in (delegations.roles or {}).values() for k in role.keyids}
    for keyid in list(delegations.keys):
        if keyid not in used:
            del delegations.keys[keyid]


HSM_PREFIX = "hsm:"
PIN_ENV = "BUNDLER_PKCS11_PIN"


def _signer(key_ref: Path, listed: SSlibKey | None = None) -> Signer:
    """A key file (`bundle keygen`), or `hsm:[KEYID][?label=TOKEN]`: a key in a PKCS#11 token
    (securesystemslib's HSMSigner; the module named by PYKCS11LIB, the PIN in
    BUNDLER_PKCS11_PIN). A token's private key never leaves it: only what to sign goes in.
    It signs under bundler's key id, or as LISTED (a document's entry for the same key)."""
    text = str(key_ref)
    if text.startswith(HSM_PREFIX):
        return _hsm_signer(text, listed)
    private = load_private_key(key_ref)
    return CryptoSigner(private, listed or trustroot.tuf_key(private.public_key()))


def _hsm_signer(uri: str, listed: SSlibKey | None = None) -> Signer:
    try:
        from securesystemslib.signer import HSMSigner
    except ImportError:  # pragma: no cover - the [hsm] extra is not installed
        raise SigningKeyError("PKCS#11 signing needs python-pkcs11",
                              hint="pip install 'bundler[hsm]'") from None
    pin = os.environ.get(PIN_ENV)
    if not pin:
        raise SigningKeyError(f"{uri}: the token's PIN is not set",
                              hint=f"export {PIN_ENV} (and PYKCS11LIB, the PKCS#11 module)")
    parsed = urlparse(uri)
    try:
        hsm_keyid = int(parsed.path) if parsed.path else HSMSigner.SCHEME_KEYID
        label = dict(parse_qsl(parsed.query)).get("label")
        _, found = HSMSigner.import_(hsm_keyid, label, lambda _secret: pin)
        public = serialization.load_pem_public_key(found.keyval["public"].encode())
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ValueError("the token's key is not an ECDSA key")
        return HSMSigner(hsm_keyid, listed or trustroot.tuf_key(public), lambda _secret: pin,
                         label)
    except Exception as exc:  # python-pkcs11 raises its own tree, UnsupportedLibraryError...
        raise SigningKeyError(f"{uri}: {type(exc).__name__}: {str(exc)[:200]}",
                              hint="check PYKCS11LIB, the token label, the key id and "
                                   f"{PIN_ENV}") from None


def _sign(signer: Signer, message: bytes) -> bytes:
    """The raw signature bytes; a token's failure (wrong PIN, key gone) is a key error."""
    try:
        return bytes.fromhex(signer.sign(message).signature)
    except Exception as exc:  # python-pkcs11's own tree (PinIncorrect...), ValueError
        if isinstance(signer, CryptoSigner):
            raise
        raise SigningKeyError(f"the token could not sign: {type(exc).__name__}",
                              hint=f"check {PIN_ENV} and that the token is present") from None


def token_public_key(uri: str) -> tuple[str, bytes]:
    """A token key's id and PEM public key, to delegate it (`bundle keys delegate --key`)."""
    signer = _signer(Path(uri))
    key = signer.public_key
    assert isinstance(key, SSlibKey)
    return key.keyid, str(key.keyval["public"]).encode()


@dataclass(frozen=True)
class Signed:
    path: Path
    keyid: str  # the document's id of the key (the newest root's, if two versions differ)
    signatures: int
    complete: bool  # the thresholds it needs are met
    detail: str
    keyids: tuple[str, ...] = ()  # every id it signed under (old and new root may differ)
    bundler_keyid: str = ""  # bundler's id of the key (`bundle keygen`'s)


def _listed_as(key: SSlibKey, allowed: list[tuple[str, Any]]) -> list[SSlibKey]:
    """The entries of ALLOWED (id, key) that are KEY, by material: a document written by
    another TUF tool names it by its own id, and the signature must carry that id."""
    material = trustroot.key_material(key)
    found: dict[str, SSlibKey] = {}
    for kid, entry in allowed:
        if material is not None and isinstance(entry, SSlibKey) and \
                trustroot.key_material(entry) == material:
            found.setdefault(kid, entry)
    return list(found.values())


def sign_doc(directory: Path, key_path: Path, which_targets: bool) -> Signed:
    """Add KEY's signature to the latest root version, or to the delegation, under each id
    the root(s) list the key by."""
    chain = roots(directory)
    mine = _signer(key_path).public_key
    assert isinstance(mine, SSlibKey)
    if which_targets:
        md: Metadata[Any] | None = targets(directory)
        if md is None:
            raise SigningKeyError(f"{directory} has no {TARGETS_FILE}",
                             hint="`bundle keys delegate DIR ...` writes one")
        path = directory / TARGETS_FILE
        allowed = _role_keys(chain[-1], Targets.type)
    else:
        md, path = chain[-1], root_versions(directory)[-1]
        allowed = _role_keys(chain[-1], Root.type)
        if len(chain) > 1:
            allowed += _role_keys(chain[-2], Root.type)
    assert md is not None
    listed = _listed_as(mine, allowed)
    if not listed:
        raise SigningKeyError(f"key {mine.keyid} is not a root key of {path.name}",
                              hint="sign with a key the root lists (`bundle keys show DIR`)")
    for entry in listed:
        try:
            md.sign(_signer(key_path, entry), append=True)
        except UnsignedMetadataError:
            raise SigningKeyError(f"{key_path}: the key could not sign {path.name}",
                                  hint=f"for a token: check {PIN_ENV} and that it is present"
                                  ) from None
    _write(path, md)
    complete, detail = _status(chain, md, which_targets)
    return Signed(path, listed[0].keyid, len(md.signatures), complete, detail,
                  tuple(e.keyid for e in listed), mine.keyid)


def _role_keys(root: Metadata[Root], role: str) -> list[tuple[str, Any]]:
    keys = root.signed.keys
    return [(kid, keys[kid]) for kid in root.signed.roles[role].keyids if kid in keys]


def _status(chain: list[Metadata[Root]], md: Metadata[Any],
            which_targets: bool) -> tuple[bool, str]:
    if which_targets:
        r = chain[-1].signed.get_verification_result(Targets.type, md.signed_bytes,
                                                     md.signatures)
        return bool(r), f"{len(r.signed)} of {r.threshold} root keys"
    previous = chain[-2].signed if len(chain) > 1 else None
    rv = md.signed.get_root_verification_result(previous, md.signed_bytes, md.signatures)
    text = f"{len(rv.second.signed)} of {rv.second.threshold} of its own root keys"
    if previous is not None:
        text += f", {len(rv.first.signed)} of {rv.first.threshold} of version " \
                f"{previous.version}'s"
    return bool(rv), text


def show(directory: Path) -> dict[str, Any]:
    chain = roots(directory)
    info = trustroot.describe(chain[-1], targets(directory))
    info["root"]["versions"] = [m.signed.version for m in chain]
    info["root"]["complete"], info["root"]["status"] = _status(chain, chain[-1], False)
    held = targets(directory)
    if held is not None:
        info["delegation"]["complete"], info["delegation"]["status"] = _status(
            chain, held, True)
    return info


# --- signatures and trust documents added to a built bundle --------------------------------

@dataclass(frozen=True)
class Resigned:
    signatures: list[str]
    added: list[str]
    carries: dict[str, Any]


def _split(path: Path) -> tuple[tarfile.TarInfo, bytes, int]:
    """The bundle's first header, its envelope, and the offset where the next member starts."""
    with path.open("rb") as fh:
        info = volumes.envelope_header(fh.read(tarfile.BLOCKSIZE))
        if info is None:
            raise SignatureError(f"{path} does not start with {ENVELOPE}",
                                 hint="pass a .bundle file or a volume set")
        if info.size > MAX_ENVELOPE_BYTES:
            raise SignatureError(f"{path}: {ENVELOPE} is over the {MAX_ENVELOPE_BYTES} limit")
        envelope = fh.read(info.size)
    blocks = -(-info.size // tarfile.BLOCKSIZE)
    return info, envelope, tarfile.BLOCKSIZE * (1 + blocks)


def _open(path: Path) -> tuple[tarfile.TarInfo, dict[str, Any], bytes, list[Any], int]:
    """A bundle's first header, envelope (parsed), payload bytes, signatures, rest offset."""
    info, raw, rest = _split(path)
    try:
        env = strict_loads(raw)
        body = base64.b64decode(env["payload"], validate=True)
        sigs = list(env["signatures"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{path}: {ENVELOPE} is malformed: {str(exc)[:200]}",
                             hint="this is not a bundler bundle") from None
    if env.get("payloadType") != PAYLOAD_TYPE:
        raise SignatureError(f"{path} is not a bundle (payload type "
                             f"{env.get('payloadType')!r})")
    return info, env, body, sigs, rest


def _target(path: Path) -> tuple[Path, Path | None]:
    """The file whose envelope signing rewrites (a bundle, or a volume set's head) and, for a
    set, its index (which gathers the same release signatures)."""
    index_file = volumes.find_index(path)
    if index_file is None:
        return path, None
    head = volumes.head_of(index_file)
    if not head.exists():
        raise SignatureError(
            f"{index_file.name} is a volume set without a head (written by an older bundler: "
            "its signatures are inside part 1), so it cannot gather signatures",
            hint="sign the single .bundle before splitting it, or rebuild the set")
    _, _, rest = _split(head)
    if head.stat().st_size != rest:
        raise SignatureError(f"{head.name} holds more than its envelope",
                             hint="copy the volume set again from the source")
    return head, index_file


def _sign_index(index_file: Path, signers: list[Signer]) -> None:
    """Add these keys' signatures to a volume set's part index (its payload untouched)."""
    data = index_file.read_bytes()
    _, body, sigs = _open_envelope(data, volumes.INDEX_TYPE, index_file.name,
                                   "copy the .parts file again from the source")
    env = strict_loads(data)
    have = {s.get("keyid") for s in sigs if isinstance(s, dict)}
    for signer in signers:
        if signer.public_key.keyid not in have:
            sig = _sign(signer, pae(volumes.INDEX_TYPE, body))
            sigs.append({"keyid": signer.public_key.keyid,
                         "sig": base64.b64encode(sig).decode()})
    if len(sigs) > MAX_SIGNATURES:
        raise SignatureError(f"at most {MAX_SIGNATURES} signatures fit a part index")
    env["signatures"] = sigs
    atomic_write_bytes(index_file, canonical_json(env), mode=0o644)


def countersign(path: Path, key_path: Path, role: str) -> dict[str, Any]:
    """Add ROLE's countersignature (over the payload's digest, the role and the time) to a
    bundle, or to a volume set's head; the payload and every member stay byte for byte the
    same."""
    path, _index = _target(path)
    info, env, body, sigs, rest = _open(path)
    signer = _signer(key_path)
    kid = signer.public_key.keyid
    if any(isinstance(s, dict) and s.get("keyid") == kid and
           s.get(COUNTERSIGN, {}).get("role") == role for s in sigs):
        raise SigningKeyError(f"{path} is already countersigned by key {kid} as {role}",
                              hint="each key countersigns once per role")
    if len(sigs) >= MAX_SIGNATURES:
        raise SignatureError(f"at most {MAX_SIGNATURES} signatures fit a bundle")
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = hashlib.sha256(body).hexdigest()
    sig = _sign(signer, trustroot.countersign_message(digest, role, when))
    sigs.append({"keyid": kid, "sig": base64.b64encode(sig).decode(),
                 COUNTERSIGN: {"role": role, "time": when}})
    env["signatures"] = sigs
    _rewrite(path, info, canonical_json(env), rest)
    return {"keyid": kid, "role": role, "time": when, "payload_sha256": digest}


def sign_bundle(path: Path, key_paths: list[Path], trust_dir: Path | None) -> Resigned:
    """Add signatures (and the trust documents of TRUST_DIR) to a bundle's envelope, or to a
    volume set's head (and the signatures to its part index too). The signed payload and
    every other member or part stay byte for byte the same; each file is replaced
    atomically."""
    if not key_paths and trust_dir is None:
        raise SigningKeyError("nothing to add: pass --key NAME.key and/or --trust-metadata DIR")
    path, index_file = _target(path)
    info, env, body, sigs, rest = _open(path)
    have = {s.get("keyid") for s in sigs if isinstance(s, dict) and COUNTERSIGN not in s}
    added = []
    signers = []
    for key_path in key_paths:
        signer = _signer(key_path)
        kid = signer.public_key.keyid
        if kid in have:
            raise SigningKeyError(f"{path} is already signed by key {kid}",
                                  hint="each key signs once; pass another key")
        sig = _sign(signer, pae(PAYLOAD_TYPE, body))
        sigs.append({"keyid": kid, "sig": base64.b64encode(sig).decode()})
        have.add(kid)
        added.append(kid)
        signers.append(signer)
    if len(sigs) > MAX_SIGNATURES:
        raise SignatureError(f"at most {MAX_SIGNATURES} signatures fit a bundle")
    env["signatures"] = sigs
    if trust_dir is not None:
        env = trustroot.attach(env, roots(trust_dir), targets(trust_dir))
    new = canonical_json(env)
    if index_file is not None and signers:
        _sign_index(index_file, signers)  # first: the head's old signers still sign it too
    _rewrite(path, info, new, rest)
    block = env.get(trustroot.TRUST_FIELD, {})
    carries = {"root_versions": [r["signed"]["version"] for r in block.get("root", [])],
               "delegation_version": block["targets"]["signed"]["version"]
               if "targets" in block else None}
    return Resigned([str(s["keyid"]) for s in sigs], added, carries)


def _rewrite(path: Path, info: tarfile.TarInfo, envelope: bytes, rest: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pad = -len(envelope) % tarfile.BLOCKSIZE
    try:
        with path.open("rb") as src, open(tmp, "xb") as dst:
            dst.write(_header(ENVELOPE, len(envelope), int(info.mtime)))
            dst.write(envelope + tarfile.NUL * pad)
            src.seek(rest)
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
