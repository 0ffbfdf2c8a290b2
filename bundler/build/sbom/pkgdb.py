"""Parsers of the package databases an SBOM reads: dpkg's status, Alpine's apk database, a
Python distribution's METADATA, an npm package.json. Pure functions over bytes (the callers
bound what they read); a damaged record is skipped, never fatal: an SBOM says what it can."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser


@dataclass(frozen=True)
class Package:
    """One package found: its ecosystem (the purl type: deb, apk, pypi, npm), name, version,
    and what else the database says."""

    type: str
    name: str
    version: str
    license: str = ""  # an SPDX expression, a license name, or "" (unknown)
    arch: str = ""
    source: str = ""  # the source package (Debian), when it differs from `name`
    source_version: str = ""  # its version, when it differs from `version`


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    """RFC 822-style records separated by blank lines (dpkg's status): Field: value, with
    continuation lines starting with a blank (kept for no field we read)."""
    record: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if record:
                yield record
            record, last = {}, ""
        elif line[0] in " \t":
            if last:
                record[last] += "\n" + line.strip()
        elif ":" in line:
            last, _, value = line.partition(":")
            record[last] = value.strip()
    if record:
        yield record


def dpkg_status(data: bytes) -> list[Package]:
    """The installed packages of a dpkg status file (or one file of distroless's status.d/):
    `Status: install ok installed` only (a removed package's config files are no package)."""
    out = []
    for rec in _stanzas(data.decode("utf-8", "replace")):
        status = rec.get("Status", "install ok installed").split()
        if status[-1:] != ["installed"] or not rec.get("Package") or not rec.get("Version"):
            continue
        source, _, version = rec.get("Source", "").partition(" ")
        version = version.strip().strip("()")
        out.append(Package("deb", rec["Package"], rec["Version"],
                           arch=rec.get("Architecture", ""),
                           source=source if source != rec["Package"] else "",
                           source_version=version if version != rec["Version"] else ""))
    return out


def apk_installed(data: bytes) -> list[Package]:
    """Alpine's lib/apk/db/installed: records of one-letter keys (P name, V version, A arch,
    L license) separated by blank lines."""
    out = []
    for block in re.split(r"\n\s*\n", data.decode("utf-8", "replace")):
        rec: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep and len(key) == 1 and key not in rec:
                rec[key] = value.strip()
        if rec.get("P") and rec.get("V"):
            out.append(Package("apk", rec["P"], rec["V"], rec.get("L", ""), rec.get("A", "")))
    return out


_CLASSIFIER = "License :: "


def python_metadata(data: bytes) -> Package | None:
    """A distribution's METADATA (or PKG-INFO): name, version, and its license from
    License-Expression (PEP 639), else a one-line License field, else the license
    classifiers."""
    head = data.decode("utf-8", "replace").split("\n\n", 1)[0]
    msg = HeaderParser().parsestr(head)
    name, version = msg.get("Name"), msg.get("Version")
    if not name or not version:
        return None
    return Package("pypi", str(name).strip(), str(version).strip(), _py_license(msg))


def _py_license(msg: Message) -> str:
    expression = str(msg.get("License-Expression", "")).strip()
    if expression:
        return expression
    text = str(msg.get("License", "")).strip()
    if text and "\n" not in text and len(text) <= 100 and text.upper() != "UNKNOWN":
        return text
    names = [str(c).split("::")[-1].strip() for c in msg.get_all("Classifier") or ()
             if str(c).startswith(_CLASSIFIER) and str(c).count("::") >= 2]
    return " AND ".join(dict.fromkeys(names))


def npm_package_json(data: bytes) -> Package | None:
    """name, version and license of a package.json (`license`, or the old `licenses` list)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    name, version = doc.get("name"), doc.get("version")
    if not isinstance(name, str) or not isinstance(version, str) or not name or not version:
        return None
    return Package("npm", name, version, _npm_license(doc.get("license") or doc.get("licenses")))


def _npm_license(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return str(value["type"])
    if isinstance(value, list):
        names = [_npm_license(v) for v in value]
        return " OR ".join(n for n in names if n)
    return ""


def os_release(data: bytes) -> tuple[str, str]:
    """(ID, VERSION_ID) of an os-release file: the distribution a deb or apk purl names."""
    fields = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip("\"'")
    return fields.get("ID", ""), fields.get("VERSION_ID", "")
