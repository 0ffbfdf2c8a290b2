"""The target's trust store: the public keys it accepts bundles from, under the state dir
(`state/trust/`, 0700; each key 0600)."""

from __future__ import annotations

from pathlib import Path

from bundler.bundle.signing import TrustedKey, load_public_key, load_trust
from bundler.errors import SigningKeyError
from bundler.fsutil import atomic_write_bytes, make_dir, private_dir
from bundler.install import strict
from bundler.install.layout import Layout, check_root
from bundler.progname import cmd


def store(layout: Layout) -> Path:
    return layout.trust_dir


def add(layout: Layout, pub: Path) -> TrustedKey:
    key = load_public_key(pub)
    strict.check_target(layout.root)
    make_dir(layout.root, 0o755)
    private_dir(layout.state_dir)
    dest = private_dir(store(layout)) / f"{key.keyid}.pub"
    atomic_write_bytes(dest, pub.read_bytes(), mode=0o600)
    return load_public_key(dest)


def remove(layout: Layout, keyid: str) -> None:
    strict.check_target(layout.root)
    path = store(layout) / f"{keyid}.pub"
    if not path.is_file():
        raise SigningKeyError(f"key {keyid} is not in the trust store of {layout.root}",
                              hint=f"`{cmd('trust', 'list', '--root', layout.root)}` shows the "
                                   "trusted keys")
    path.unlink()


def listed(layout: Layout) -> list[TrustedKey]:
    directory = store(layout)
    strict.check_target(layout.root)  # StrictModes: no key planted by another user
    return [load_public_key(p) for p in sorted(directory.glob("*.pub"))] if directory.is_dir() \
        else []


def resolve(trust_path: Path | None, layout: Layout | None) -> list[TrustedKey]:
    """Keys named on the command line, else the root's trust store (the root must exist:
    a misspelt --root is reported as such, not as a missing key)."""
    if trust_path is not None:
        return load_trust(trust_path)
    if layout is not None:
        check_root(layout.root)
    keys = listed(layout) if layout is not None else []
    if not keys:
        where = f" and {layout.root} has no trusted key" if layout else ""
        root = layout.root if layout else "DIR"
        raise SigningKeyError(f"no trusted key: pass --trust KEY.pub{where}",
                              hint="add the builder's key once with "
                                   f"`{cmd('trust', 'add', 'KEY.pub', '--root', root)}`, or pass "
                                   "--trust")
    return keys
