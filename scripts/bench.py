#!/usr/bin/env python3
"""Benchmarks, reported as ratios against a baseline measured in the same run.

verify: one streaming verification pass over a bundle, against plain hashlib sha256 over the
same file with the same chunk size (the floor any verifier pays). Peak RSS of verification is
measured in a child process, so that it reflects bundle size and not this script.

    python scripts/bench.py [--size-mib 1024] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler import archive, volumes
from bundler.fsutil import CHUNK, sha256_file
from bundler.manifest import FileEntry, Manifest
from bundler.models import Target
from bundler.signing import load_public_key, sign

_CHILD = """
import sys, resource
from pathlib import Path
from bundler import archive, volumes
from bundler.signing import load_public_key
with archive.open_bundle(Path(sys.argv[1]), [load_public_key(Path(sys.argv[2]))]) as r:
    r.read_envelope()
    r.extract(None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_payloads(work: Path, total: int, files: int) -> list[Path]:
    out = []
    per = total // files
    block = os.urandom(CHUNK)
    for i in range(files):
        path = work / f"payload-{i}.bin"
        with open(path, "wb") as fh:
            left = per
            while left:
                n = min(left, CHUNK)
                fh.write(block[:n])
                left -= n
        out.append(path)
    return out


def build_bundle(work: Path, size: int, key: Ed25519PrivateKey) -> tuple[Path, Path]:
    pub = work / "bench.pub"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    sources = make_payloads(work, size, files=8)
    entries = []
    for i, src in enumerate(sources):
        sha, n = sha256_file(src)
        entries.append((FileEntry(f"files/p{i}.bin", n, sha, "file"), src))
    manifest = Manifest(name="bench", version="1", sequence=1, created="2026-01-01T00:00:00Z",
                        target=Target(), files=tuple(e for e, _ in entries))
    path = work / "bench.bundle"
    archive.pack(path, sign(manifest, key), entries, mtime=0)
    for src in sources:
        src.unlink()
    return path, pub


def best_of(n: int, fn: object) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def split(path: Path, key: Ed25519PrivateKey, parts: int) -> Path:
    """Re-pack a bundle's bytes as a volume set of `parts` parts; return its index."""
    out = path.with_name("vol.bundle")
    writer = volumes.SplitWriter(out, path.stat().st_size // parts + 1)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            writer.write(chunk)
    index = writer.commit()
    volumes.write_index(out, index, key)
    return volumes.index_path(out)


def bench_verify(size_mib: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bundler-bench-") as tmp:
        work = Path(tmp)
        key = Ed25519PrivateKey.generate()
        path, pub = build_bundle(work, size_mib * 1024 * 1024, key)
        trusted = [load_public_key(pub)]
        nbytes = path.stat().st_size

        def baseline() -> None:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    digest.update(chunk)

        def verify() -> None:
            with archive.open_bundle(path, trusted) as reader:
                reader.read_envelope()
                reader.extract(None)

        baseline()  # warm the page cache so both read from memory
        t_hash = best_of(3, baseline)
        t_verify = best_of(3, verify)
        child = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(pub)],
                               capture_output=True, text=True, check=True)
        rss_kib = int(child.stdout.strip())
        index = split(path, key, parts=3)
        path.unlink()
        vol_trusted = trusted

        def verify_volumes() -> None:
            with archive.open_bundle(index, vol_trusted) as reader:
                reader.read_envelope()
                reader.extract(None)

        verify_volumes()
        t_vol = best_of(3, verify_volumes)
        vol_child = subprocess.run([sys.executable, "-c", _CHILD, str(index), str(pub)],
                                   capture_output=True, text=True, check=True)
        return {
            "volumes_vs_sha256": t_hash / t_vol,
            "volumes_peak_rss_mib": int(vol_child.stdout.strip()) / 1024,
            "bundle_mib": nbytes / 2**20,
            "sha256_mib_s": nbytes / 2**20 / t_hash,
            "verify_mib_s": nbytes / 2**20 / t_verify,
            "verify_vs_sha256": t_hash / t_verify,
            "verify_peak_rss_mib": rss_kib / 1024,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {"verify": bench_verify(args.size_mib)}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, values in results.items():
            print(name)
            for key, value in values.items():
                print(f"  {key:<22} {value:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
