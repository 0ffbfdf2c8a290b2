"""The host policy: what a release installed under this root may ask of the host.

`<root>/policy.yaml` (root's, not writable by others: StrictModes, like the rest of what
bundler trusts under the root) lists what the operator allows, in the `--allow` grammar:

    allow:
      - host-mount=/srv/chatbot/pg-socket   # this path and everything below it
      - cap=NET_ADMIN
      - privileged
    users: [app, root]   # optional: the only accounts a release may run its own code as

`bundle install --allow KIND[=VALUE]` (repeatable) allows more for one command. Everything
`bundler.bundle.hostreq` marks refused-by-default is refused unless allowed, before anything is
created: on the manifest's record first, then on the verified compose files themselves
(a signer may lie in the record), with only the staging directory to remove.

Running as root (a release with no `user`): allowed by default only where it changes nothing,
on a root with no current release or whose current release runs as root too; a release that
would bring root to a root whose current release runs as an unprivileged account needs
`user=root` allowed. With `users:` in the policy, only those accounts (and `--allow user=`).
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bundler.bundle import hostreq
from bundler.bundle.hostreq import Request
from bundler.bundle.manifest import Manifest
from bundler.errors import BundlerError, HostPolicyError
from bundler.install import environ, runtimes, strict
from bundler.install.layout import Layout, ReleaseDir

_HINT = "`bundle inspect BUNDLE` lists everything it asks of the host; see docs/host-policy.md"


@dataclass(frozen=True)
class Grant:
    kind: str
    value: str
    origin: str  # "--allow", or the policy file's path

    @property
    def text(self) -> str:
        return f"{self.kind}={self.value}" if self.value else self.kind


@dataclass(frozen=True)
class Policy:
    path: Path
    grants: tuple[Grant, ...] = ()
    users: tuple[str, ...] | None = None  # None: no `users:` key


def _bad(path: Path, what: str) -> HostPolicyError:
    return HostPolicyError(f"{path}: {what}",
                           hint="it lists what bundles may ask of this host: `allow:` a list "
                                "of KIND or KIND=VALUE (see docs/host-policy.md), `users:` a "
                                "list of account names")


def load(root: Path) -> Policy:
    """The root's policy (no file: nothing allowed beyond the defaults). StrictModes first."""
    path = Layout(root).policy_file
    strict.check_target(root)
    strict.check((path, "the host policy"))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Policy(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(path, f"cannot be read ({exc})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _bad(path, f"is not YAML ({str(exc).splitlines()[0]})") from None
    if doc is None:
        return Policy(path)
    if not isinstance(doc, dict) or set(doc) - {"allow", "users"}:
        raise _bad(path, "must be a mapping with only `allow:` and `users:`")
    allow, users = doc.get("allow") or [], doc.get("users")
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise _bad(path, "`allow:` must be a list of KIND or KIND=VALUE")
    if users is not None and (not isinstance(users, list)
                              or not all(isinstance(u, str) for u in users)):
        raise _bad(path, "`users:` must be a list of account names")
    grants = tuple(Grant(*hostreq.grant_parse(a, lambda m: _bad(path, m)), str(path))
                   for a in allow)
    return Policy(path, grants, tuple(users) if users is not None else None)


def flag_grants(values: Iterable[str]) -> tuple[Grant, ...]:
    """`--allow` values (already checked by the CLI) as grants."""
    return tuple(Grant(*hostreq.grant_parse(v, HostPolicyError), "--allow") for v in values)


@dataclass(frozen=True)
class Outcome:
    """Every request, and what allowed each one that is refused by default."""

    requests: tuple[Request, ...]
    allowed: tuple[tuple[Request, str], ...]  # (request, "--allow privileged" / policy line)

    def journal(self) -> str:
        return "; ".join(f"{r.grant} for {r.service or 'the release'} ({how})"
                         for r, how in self.allowed)


def _user_allowed(r: Request, policy: Policy, grants: Sequence[Grant],
                  root_ok: bool) -> str | None:
    for g in grants:
        if hostreq.covers(g.kind, g.value, r):
            return f"{g.origin}: {g.text}"
    if policy.users is not None:
        return f"{policy.path}: users" if r.value in policy.users else None
    if r.value != "root":
        return "default"
    return "default" if root_ok else None


def decide(requests: Sequence[Request], policy: Policy, flags: Sequence[Grant],
           root_ok: bool, label: str) -> Outcome:
    """HostPolicyError naming the first refused request (and how many more), the flags and
    the policy line that would allow them all; else the Outcome. `label`: how a service is
    named ("compose service")."""
    grants = (*flags, *policy.grants)
    allowed: list[tuple[Request, str]] = []
    refused: list[Request] = []
    for r in requests:
        if r.pending:
            raise HostPolicyError(f"{_who(r, label)} asks for {r.describe()}, which depends on "
                                  "the environment and could not be evaluated", hint=_HINT)
        if r.kind == "user":
            how = _user_allowed(r, policy, grants, root_ok)
        elif not r.refused_by_default:
            continue
        else:
            how = next((f"{g.origin}: {g.text}" for g in grants
                        if hostreq.covers(g.kind, g.value, r)), None)
        if how is None:
            refused.append(r)
        elif how != "default":
            allowed.append((r, how))
    if refused:
        raise _refusal(refused, policy, label)
    return Outcome(tuple(requests), tuple(allowed))


def _who(r: Request, label: str) -> str:
    return f"{label} {r.service}" if r.service else "the release"


def _refusal(refused: Sequence[Request], policy: Policy, label: str) -> HostPolicyError:
    first = refused[0]
    wanted = list(dict.fromkeys(r.grant for r in refused))
    more = ""
    if len(refused) > 1:
        more = " (and " + ", ".join(f"{r.grant} for {_who(r, label)}"
                                    for r in refused[1:]) + ")"
    flags = " ".join(f"--allow {_quoted(g)}" for g in wanted)
    lines = ", ".join(wanted)
    return HostPolicyError(
        f"{_who(first, label)} asks for {first.describe()}{more}, which this host's policy "
        f"does not allow: pass {flags} for this install, or add `allow: [{lines}]` to "
        f"{policy.path}", hint=_HINT)


def _quoted(grant: str) -> str:
    return f"'{grant}'" if any(c in grant for c in " '\"$;&|") else grant


# --- what a release asks, evaluated on this root ---------------------------------------------

def _runs_root(m: Manifest | None) -> bool:
    """Root changes nothing here: no current release, or it names no unprivileged `user`
    (what it runs on the host runs as root), or runs a service as root."""
    return m is None or m.runtime.user in (None, "root") or any(
        s.user == "root" for s in m.runtime.services)


def _workdir(m: Manifest) -> str:
    assert m.runtime.compose is not None
    return posixpath.dirname(m.runtime.compose.files[0]) or "."


def _compose_requests(layout: Layout, m: Manifest, values: dict[str, str],
                      ex: dict[str, Any], dotenv: dict[str, str] | None) -> list[Request]:
    env = _runtime(layout, m).interpolation_env(values, dotenv)
    if env is None:
        raise hostreq.Unevaluable("the bundle's own .env is not read yet")
    files = layout.release(m.version) / "files"
    home = env.get("HOME")
    return hostreq.analyse(ex, env, hostreq.Place(_workdir(m), str(files), home))


def _runtime(layout: Layout, m: Manifest) -> runtimes.Runtime:
    """How release `m` would run here (its environment is not needed for what is asked)."""
    return runtimes.bind(layout, ReleaseDir(layout.release(m.version)), m, "production")


def _label(layout: Layout, m: Manifest) -> str:
    return runtimes.pick(layout, m).service_label


def check_manifest(layout: Layout, m: Manifest, values: dict[str, str],
                   flags: Sequence[Grant], current: Manifest | None) -> Outcome:
    """Before anything is created: the accounts the release runs as, and what the manifest's
    record of its compose files asks (what cannot be evaluated yet is left to check_staged)."""
    policy = load(layout.root)
    requests = hostreq.process_requests(m.runtime)
    spec = m.runtime.compose
    if spec is not None and spec.host is not None:
        # No `.env` beside the compose file: a bundle cannot carry a dot file (PATH_RE).
        # What cannot be evaluated is left to check_files, which says why.
        with contextlib.suppress(hostreq.Unevaluable):
            requests += _compose_requests(layout, m, values, spec.host, {})
    return decide(requests, policy, flags, _runs_root(current), _label(layout, m))


def read_files(m: Manifest, files_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The excerpt of the release's compose files under `files_dir`, and the `.env` beside
    the first one (never in a bundle, but a kept release's service may have written one
    there: compose reads it when the root has no shared .env). HostPolicyError if they cannot
    be evaluated, or differ from what the signed manifest records of them."""
    spec = m.runtime.compose
    assert spec is not None
    try:
        texts = [(f, (files_dir / f).read_bytes()) for f in spec.files]
    except OSError as exc:
        raise HostPolicyError(f"a compose file of {m.name} {m.version} cannot be read: {exc}",
                              hint=_HINT) from None
    ex = hostreq.checked_excerpt(texts, spec.host, f"{m.name} {m.version}")
    dotenv_file = files_dir / _workdir(m) / ".env"
    try:
        dotenv = environ.read_env_file(dotenv_file) if dotenv_file.is_file() else {}
    except BundlerError as exc:
        raise HostPolicyError(f"the bundle's {_workdir(m)}/.env cannot be read as compose "
                              f"reads it: {exc.message}", hint=_HINT) from None
    return ex, dotenv


def check_files(layout: Layout, m: Manifest, values: dict[str, str], files_dir: Path,
                flags: Sequence[Grant], current: Manifest | None) -> Outcome:
    """The verified compose files under `files_dir` (staged, or a kept release's), with the
    environment compose will have: what install and rollback enforce."""
    policy = load(layout.root)
    requests = hostreq.process_requests(m.runtime)
    if m.runtime.compose is not None:
        ex, dotenv = read_files(m, files_dir)
        try:
            requests += _compose_requests(layout, m, values, ex, dotenv)
        except hostreq.Unevaluable as exc:
            raise HostPolicyError(f"what the compose files ask of the host cannot be "
                                  f"checked: {exc}", hint=_HINT) from None
    return decide(requests, policy, flags, _runs_root(current), _label(layout, m))


def check_release(layout: Layout, version: str, flags: Sequence[Grant],
                  current: Manifest | None) -> Outcome:
    """A kept release about to be started again by `rollback`: checked against today's
    policy and this command's --allow, as an install would be."""
    rel = ReleaseDir(layout.release(version))
    m = rel.manifest()
    if m is None:
        raise HostPolicyError(f"release {version} has no manifest to check", hint=_HINT)
    env = environ.release_env(layout, m.runtime.env, rel.environment(), version=version)
    return check_files(layout, m, env.as_dict(), rel.files, flags, current)
