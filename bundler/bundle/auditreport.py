"""A signed drift-audit report (`bundle audit --report FILE`): the audit's findings, signed by
the host key that signs receipts (a DSSE envelope, as receipts are), for an auditor on the
connected side to check with the host's public key (`bundle audit --verify-report FILE
--host-key host.pub`). Written on the target, read on either side: here, with the bundle
format (docs/audit.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bundler.bundle.signing import TrustedKey, verify_payload
from bundler.errors import SignatureError

PAYLOAD_TYPE = "application/vnd.bundler.audit-report+json"
SCHEMA = 1


def to_bytes(doc: dict[str, Any]) -> bytes:
    """The report's payload: deterministic JSON (sorted keys), with its schema."""
    return (json.dumps({"schema": SCHEMA, **doc}, sort_keys=True, separators=(",", ":"))
            + "\n").encode()


@dataclass(frozen=True)
class Verified:
    keyid: str
    doc: dict[str, Any]

    @property
    def clean(self) -> bool:
        return bool(self.doc.get("clean"))

    @property
    def findings(self) -> list[dict[str, Any]]:
        return list(self.doc.get("findings") or [])


def verify(data: bytes, host_key: TrustedKey, what: str = "audit report") -> Verified:
    """The report, its signature checked against the host's public key first (SignatureError,
    exit 2, otherwise), then its form."""
    body, keyid = verify_payload(data, [host_key], PAYLOAD_TYPE, what)
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA \
                or not isinstance(doc.get("findings"), list) or doc.get("host_key") != keyid:
            raise ValueError("not an audit report this bundler reads")
    except ValueError as exc:
        raise SignatureError(f"{what} is malformed: {exc}",
                             hint="pass the file `bundle audit --report` wrote") from None
    return Verified(keyid, doc)
