"""Licenses read from the artifacts the bundle carries: a wheel's METADATA, an npm tarball's
package.json. Bounded, streaming reads; a file that cannot be read gives no license."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from bundler.build.sbom import pkgdb

MAX_META = 1024 * 1024


def wheel_license(path: Path) -> str:
    """License of a wheel, from its top-level *.dist-info/METADATA."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if len(parts) == 2 and parts[0].endswith(".dist-info") \
                        and parts[1] == "METADATA" and info.file_size <= MAX_META:
                    found = pkgdb.python_metadata(zf.read(info))
                    return found.license if found is not None else ""
    except (OSError, zipfile.BadZipFile, ValueError):
        pass
    return ""


def npm_license(path: Path) -> str:
    """License of an npm tarball, from the package.json at its top (`package/package.json`)."""
    try:
        with tarfile.open(path, mode="r|gz") as tf:
            for member in tf:
                parts = member.name.lstrip("./").split("/")
                if len(parts) == 2 and parts[1] == "package.json" and member.isreg() \
                        and member.size <= MAX_META:
                    fh = tf.extractfile(member)
                    found = pkgdb.npm_package_json(fh.read()) if fh is not None else None
                    return found.license if found is not None else ""
    except (OSError, tarfile.TarError, EOFError, ValueError):
        pass
    return ""
