"""The target's trust store, under the state dir (`state/trust/`, 0700; each file 0600): the
public keys it accepts bundles from (the simple mode), or a root of trust (`root.json`, and
the release key delegation `targets.json` once one arrives), which replaces loose keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bundler.bundle.manifest import canonical_json
from bundler.bundle.signing import Trust, TrustedKey, load_public_key, load_trust
from bundler.errors import PolicyError, SigningKeyError
from bundler.fsutil import atomic_write_bytes, make_dir, private_dir
from bundler.install import strict
from bundler.install.layout import Layout, check_root
from bundler.progname import cmd

if TYPE_CHECKING:  # tuf and securesystemslib load on a root-of-trust host only (CLI start)
    from tuf.api.metadata import Metadata, Root, Targets

    from bundler.bundle import trustroot


def store(layout: Layout) -> Path:
    return layout.trust_dir


ROOT_FILE = "root.json"
TARGETS_FILE = "targets.json"
REQUIRE_FILE = "require.json"  # the host's policy: countersigning roles every bundle needs


def _prepare(layout: Layout) -> Path:
    strict.check_target(layout.root)
    make_dir(layout.root, 0o755)
    private_dir(layout.state_dir)
    return private_dir(store(layout))


def has_root(layout: Layout) -> bool:
    return (store(layout) / ROOT_FILE).is_file()


def init(layout: Layout, root_file: Path) -> trustroot.RootTrust:
    """Initialise ROOT once with a root document signed by the threshold of its own keys."""
    from bundler.bundle import trustroot

    try:
        data = root_file.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read root document {root_file}: {exc.strerror}",
                              hint="pass the N.root.json written by `bundle keys init`") from None
    md = trustroot.parse_root(trustroot.load_doc(data, str(root_file)), str(root_file))
    trustroot.self_signed(md, str(root_file))
    trustroot.check_root_fresh(md, trustroot._now())
    if layout.root.exists():
        strict.check_target(layout.root)
    if has_root(layout):
        held = _root_trust(layout, record=False)
        raise PolicyError(f"{layout.root} already trusts a root of trust (version "
                          f"{held.root.signed.version})",
                          hint="new root versions arrive in bundles (`bundle sign "
                               "--trust-metadata`); init is done once per host")
    _record(layout, md, None)
    return _root_trust(layout, record=False)


def _record(layout: Layout, root: Metadata[Root], targets: Metadata[Targets] | None) -> None:
    """Keep an accepted root / delegation: the delegation first, so a crash between the two
    leaves the older root, which a later bundle chains from again."""
    directory = _prepare(layout)
    if targets is not None:
        atomic_write_bytes(directory / TARGETS_FILE, targets.to_bytes(), mode=0o600)
    atomic_write_bytes(directory / ROOT_FILE, root.to_bytes(), mode=0o600)


def _root_trust(layout: Layout, record: bool) -> trustroot.RootTrust:
    from bundler.bundle import trustroot

    strict.check_target(layout.root)
    directory = store(layout)
    root = trustroot.parse_root(trustroot.load_doc((directory / ROOT_FILE).read_bytes(),
                                                   ROOT_FILE), str(directory / ROOT_FILE))
    targets_path = directory / TARGETS_FILE
    targets = trustroot.parse_targets(
        trustroot.load_doc(targets_path.read_bytes(), TARGETS_FILE), str(targets_path)) \
        if targets_path.is_file() else None

    def keep(new_root: Metadata[Root], new_targets: Metadata[Targets] | None) -> None:
        _record(layout, new_root, new_targets)

    return trustroot.RootTrust(root, targets, f"the root of trust of {layout.root}",
                               record=keep if record else None, required=_required(directory))


def _required(directory: Path) -> tuple[str, ...]:
    from bundler.bundle import trustroot

    path = directory / REQUIRE_FILE
    if not path.is_file():
        return ()
    doc = trustroot.load_doc(path.read_bytes(), str(path))
    roles = doc.get("roles") if isinstance(doc, dict) else None
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        again = cmd("trust", "require", "ROLE", "--root", "ROOT")
        raise PolicyError(f"{path} is malformed", hint=f"set it again: `{again}`")
    return tuple(roles)


def require(layout: Layout, roles: list[str]) -> trustroot.RootTrust:
    """From now on every bundle needs the countersignatures of ROLES (none: no requirement)."""
    if not has_root(layout):
        init = cmd("trust", "init", "--root-metadata", "N.root.json", "--root", layout.root)
        raise PolicyError(f"{layout.root} has no root of trust: countersignatures need one",
                          hint=f"initialise it: `{init}`")
    directory = _prepare(layout)
    atomic_write_bytes(directory / REQUIRE_FILE,
                       canonical_json({"roles": sorted(set(roles))}), mode=0o600)
    return held(layout)


def held(layout: Layout) -> trustroot.RootTrust:
    """ROOT's root of trust (it has one: `has_root`), read-only."""
    return _root_trust(layout, record=False)


def add(layout: Layout, pub: Path) -> TrustedKey:
    key = load_public_key(pub)
    strict.check_target(layout.root)
    if has_root(layout):
        raise PolicyError(f"{layout.root} trusts a root of trust: loose keys are not used",
                          hint="release keys are delegated by the root (`bundle keys "
                               "delegate`) and arrive in bundles")
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


def resolve(trust_path: Path | None, layout: Layout | None, record: bool = False) -> Trust:
    """Keys named on the command line, else the root's trust store (the root must exist:
    a misspelt --root is reported as such, not as a missing key): its root of trust when it
    has one (`record`: keep the updates a bundle carries, as install does), else its keys."""
    if trust_path is not None:
        return load_trust(trust_path)
    if layout is not None:
        check_root(layout.root)
        if has_root(layout):
            return _root_trust(layout, record)
    keys = listed(layout) if layout is not None else []
    if not keys:
        where = f" and {layout.root} has no trusted key" if layout else ""
        root = layout.root if layout else "DIR"
        raise SigningKeyError(f"no trusted key: pass --trust KEY.pub{where}",
                              hint="add the builder's key once with "
                                   f"`{cmd('trust', 'add', 'KEY.pub', '--root', root)}`, or pass "
                                   "--trust")
    return keys
