"""INSTALL.txt, the operator's page on the stick `bundle export` writes: every file's sha256,
what the host needs first, how it comes to trust the bundle (its public key, or, for a bundle
under a root of trust, the root document it carries), and the kit commands, in order."""

from __future__ import annotations

import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

from bundler.bundle import hostneeds
from bundler.bundle.manifest import Manifest

NAME = "INSTALL.txt"
MARK = "; written by `bundle export`."  # the end of its first line


@dataclass(frozen=True)
class Root:
    """The latest root document a bundle under a root of trust carries (N.root.json)."""

    name: str
    data: bytes
    version: int
    threshold: int
    keys: tuple[str, ...]


def carried_root(envelope: bytes) -> Root | None:
    """The root a bundle carries, for the stick: such a host is initialised with a root
    document, not a public key. None in the simple mode."""
    from bundler.bundle import trustroot
    from bundler.bundle.manifest import strict_loads

    roots = trustroot.carried(strict_loads(envelope)).roots
    if not roots:
        return None
    latest = max(roots, key=lambda md: md.signed.version)
    info = trustroot.describe(latest, None)["root"]
    return Root(f"{info['version']}.root.json", latest.to_bytes(), info["version"],
                info["threshold"], tuple(info["keys"]))


def _trust_step(run: str, root_dir: str, keyid: str, key_file: str | None,
                root: Root | None) -> str:
    if root is None:
        assert key_file is not None
        return f"""\
2. Trust the signing key (once per install root; confirm its key id {keyid} with the
   sender):
     {run} trust add {shlex.quote(key_file)} --root {root_dir}"""
    return f"""\
2. This release is signed under a root of trust (root version {root.version}: {root.threshold}
   of the root keys {", ".join(root.keys)}).
   Once per install root, initialise the host with it, after confirming those key ids and
   the threshold with your security officer (a host that trusts this root already, at any
   version, skips this step: every bundle carries the updates; `trust show` lists them):
     {run} trust init --root-metadata {root.name} --root {root_dir}"""


def text(manifest: Manifest, keyid: str, files: list[tuple[str, str]], kit: str,
         bundle_arg: str, key_file: str | None, root: Root | None) -> bytes:
    """The page for `files` ((sha256, name) each, in order); the host trusts `key_file`, or
    (`root`) is initialised with the root document."""
    root_dir = f"/srv/{manifest.name}"
    run = f"python3 -I -S {shlex.quote(kit)}"
    sums = "\n".join(f"{sha}  {name}" for sha, name in files)
    required = manifest.runtime.env.required
    env_note = "" if not required else f"""
   Before the first install, set what the release needs in {root_dir}/shared/.env (one
   NAME=value a line; kept across releases, never in the bundle): {", ".join(required)}."""
    page = f"""\
{manifest.name} {manifest.version} (sequence {manifest.sequence}) for \
{manifest.target.platform}, signed by key {keyid}{MARK}

Files (sha256, two spaces, name). To check them all, in this directory:
  grep -E '^[0-9a-f]{{64}}  ' INSTALL.txt | sha256sum -c

{sums}

On the air-gapped host (the kit runs on its python3, which must be CPython \
{manifest.target.python}; nothing else
is needed), in the directory that holds these files (e.g. cd /media/usb):
{_host_steps(manifest)}
1. Check the kit's sha256 against the one you were given separately: it is the one file
   that bundler cannot check itself.
     sha256sum {shlex.quote(kit)}

{_trust_step(run, root_dir, keyid, key_file, root)}

3. Check the signature and every byte, installing nothing:
     {run} verify {shlex.quote(bundle_arg)} --root {root_dir}

4. Install, start and health-check it (an upgrade, if {root_dir} has an older release):{env_note}
     {run} install {shlex.quote(bundle_arg)} --root {root_dir}

5. Its release, services and health:
     {run} status --root {root_dir}

Back to the previous release, if need be: {run} rollback --root {root_dir}

After the first install this stick is no longer needed to run bundler on the host: the
install copies the kit (verified) into {root_dir}/bin/ and writes {root_dir}/bin/bundle, which runs
it. Use {root_dir}/bin/bundle for every later command (status, history, stop, start, rollback,
recover, uninstall); where systemd runs the host, the install also enables a unit that starts
the stack at boot and health-checks it ({root_dir}/bin/bundle uninstall --root {root_dir} stops the
stack and removes the unit, keeping databases, data and backups). A later bundle comes with
its own kit: install it with that kit, which then replaces the copy in {root_dir}/bin/.
"""
    return page.encode()


def _host_steps(manifest: Manifest) -> str:
    """Step 0 of INSTALL.txt: what the host must have before the install (bundler.bundle.hostneeds),
    each with its command when one line provides it; empty when it needs nothing more."""
    needs = hostneeds.host_needs(manifest)
    if not needs:
        return ""
    lines = ["", "0. Prepare the host, once (`install` checks these first and names what is "
                 "missing):"]
    for need in needs:
        what = need.what + (":" if need.command else "")
        lines += textwrap.wrap(what, 88, initial_indent="   - ",
                               subsequent_indent="     ", break_on_hyphens=False,
                               break_long_words=False)
        if need.command:
            lines.append(f"       {need.command}")
    return "\n".join(lines) + "\n"


def written_by_export(target: Path) -> bool:
    """Whether `target` is an INSTALL.txt an earlier `bundle export` wrote (for another
    bundle, on a stick used again): bundler's own file, replaced rather than refused."""
    if not target.is_file() or target.is_symlink():
        return False
    with open(target, "rb") as fh:
        first = fh.read(4096).split(b"\n", 1)[0]
    return first.decode(errors="replace").endswith(MARK)
