"""The one error tree. Every error has a distinct exit code and a hint that says how to fix it.

The CLI prints `error: <message>` and `hint: <hint>` on one line each and exits with
`exit_code`; `--json` renders the same fields. Codes are part of the public interface:
automation branches on them, so never renumber.

A default hint that names a target-side command writes it `{bundle} ...`: it is filled in
with the command that runs bundler here (`bundler.progname`: `bundle`, or the kit's
`python3 -I -S KIT`) when the error is made. Connected-side commands stay a literal `bundle`.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from bundler import progname


class BundlerError(Exception):
    """An internal error: a bug in bundler (the traceback file is named)."""

    exit_code = 1
    default_hint = "this is a bug in bundler; please report it with the command you ran"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint.replace("{bundle}", progname.prog())

    def to_dict(self) -> dict[str, object]:
        return {
            "error": type(self).__name__,
            "exit_code": self.exit_code,
            "message": self.message,
            "hint": self.hint,
        }


@dataclass(frozen=True)
class Problem:
    """One problem in an input file, located so an editor can jump to it."""

    file: str
    line: int
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class ProfileError(BundlerError):
    """The profile is not valid. Carries every problem found, not just the first."""

    exit_code = 3
    default_hint = "fix the listed lines; `bundle validate PROFILE` re-checks without building"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        first = problems[0] if problems else Problem("?", 0, "invalid profile")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{first}{more}")

    def to_dict(self) -> dict[str, object]:
        data = super().to_dict()
        data["problems"] = [
            {"file": p.file, "line": p.line, "message": p.message, "hint": p.hint}
            for p in self.problems
        ]
        return data


class BuildError(BundlerError):
    """Resolving, fetching or packing failed on the connected side: a download, no wheel for
    the target (each package named with the reason), incomplete pins, a failing action, a
    stale lock with `--frozen`, a manifest over the 16 MiB envelope limit."""

    exit_code = 4
    default_hint = "fix the cause above and run `bundle build` again; nothing was written"


class SigningKeyError(BundlerError):
    """A key file is missing, unreadable or of the wrong kind."""

    exit_code = 5
    default_hint = "create a key pair with `bundle keygen NAME` and pass NAME.key / NAME.pub"


class SignatureError(BundlerError):
    """The envelope is missing, malformed, or not signed by a trusted key: unsigned, an
    untrusted key, an altered manifest, a wrong payload type."""

    exit_code = 6
    default_hint = (
        "check that --trust names the public key of whoever built this bundle; "
        "if it does, the bundle was altered: do not install it"
    )


class IntegrityError(BundlerError):
    """A payload member does not match the signed manifest: altered, missing, extra,
    duplicated, not a regular file; or the bundle is truncated."""

    exit_code = 7
    default_hint = "the bundle was altered or damaged in transit: copy it again from the source"


class PolicyError(BundlerError):
    """The bundle is authentic but must not be installed here: expired (`install` and
    `verify`), built by a newer bundler than this one, another product, a replayed or older
    sequence, this host's clock before the bundle's creation or the root's last install, a
    wrong target; or a destructive command not confirmed (`uninstall --purge` without
    `--yes`)."""

    exit_code = 8
    default_hint = "build a fresh bundle for this target, or see `{bundle} install --help`"


class SpaceError(BundlerError):
    """Not enough free disk space for the work asked for (bytes needed and available are
    named), or a filesystem filled up during the work."""

    exit_code = 9
    default_hint = "free some space or choose another --root on a larger filesystem"


class LockedError(BundlerError):
    """Another bundler process holds the lock on this root."""

    exit_code = 10
    default_hint = "wait for the other install to finish; `{bundle} status` shows what it is doing"


class InstallError(BundlerError):
    """An install step failed before the new release went live; the host is as it was."""

    exit_code = 11
    default_hint = "fix the cause above and run `{bundle} install` again"


class ImageLoadError(InstallError):
    """Loading the bundle's container images failed, or they are not the images it names.

    Raised before the engine commits anything where that can be known (a damaged archive, an
    Image ID that differs from the signed manifest): the upload is aborted, nothing is loaded.
    """

    exit_code = 16

    default_hint = (
        "the bundle's image archive does not match its signed manifest: copy the bundle again "
        "if it was damaged in transit, otherwise rebuild it with `bundle build`"
    )


class MigrationError(InstallError):
    """A database migration failed, or must not run (an applied SQL file was edited since).

    The message names the migration, the file or revision, and the database's own error.
    """

    exit_code = 17
    default_hint = (
        "fix the migration named above and build a new bundle; the database is restored from "
        "the backup taken before migrating"
    )


class RolledBackError(BundlerError):
    """The new release failed after start; it was stopped and the previous one restored."""

    exit_code = 12
    default_hint = "see the install report in the release dir; the previous release is serving"


class RollbackFailedError(BundlerError):
    """Rolling back failed too: the host needs an operator now."""

    exit_code = 13
    default_hint = "run `{bundle} status` and `{bundle} history`, then `{bundle} rollback` by hand"


class StateError(BundlerError):
    """The install root or its state database is not in the expected shape: nothing installed
    under `--root`, or state written by a newer bundler."""

    exit_code = 14
    default_hint = "check --root; `{bundle} status --root DIR` shows what is installed there"


class CommandError(BundlerError):
    """A subprocess failed. Wrapped into a stage-specific error by the caller where useful."""

    exit_code = 15
    default_hint = "read the output tail above; the full log path is named where there is one"


class Cancelled(InstallError):
    """A step stopped because another step running at the same time failed first."""


class Interrupted(BundlerError):
    """Interrupted (Ctrl+C): the new release was removed, the previous one restored."""

    exit_code = 130
    default_hint = "nothing was committed; run the same command again to finish"


class EnvError(BundlerError):
    """The release environment is incomplete: required variables are not set (all are named;
    values are never printed)."""

    exit_code = 18
    default_hint = "set them in the root's shared .env (`<root>/shared/.env`), then install again"


class UnhealthyError(BundlerError):
    """`status`, `start` or `doctor` found the release unhealthy or the host not ready.

    Not a failure of bundler itself (that is exit 1): the command ran and its report says what
    is wrong (printed as usual; with `--json` it is the document on stdout).
    """

    exit_code = 19
    default_hint = "see the FAIL rows above; `{bundle} doctor` checks the host, " \
                   "`{bundle} history` shows what happened"


class ExportError(BundlerError):
    """`bundle export` cannot write the stick: its kit is missing, a different file already
    has a name it writes, or a file could not be written on DEST. What this run wrote is
    removed again; DEST holds no half-written file."""

    exit_code = 21
    default_hint = "fix the cause above and run `bundle export` again"


class RecoveryPendingError(BundlerError):
    """An interrupted install left a database restore pending, and restoring would discard
    writes made since: the operator must choose (nothing was changed)."""

    exit_code = 20
    default_hint = ("`{bundle} recover --root DIR --restore-db` restores the backup (the current "
                    "contents are saved to backups/ first); `--keep-db` keeps the database as "
                    "it is")


class NodeDownError(InstallError):
    """A swarm node is down, or bundler cannot reach its engine at the endpoint `swarm.yaml`
    names (every such node is named): refused before anything changed (the images could not
    reach it, and the stack would run degraded)."""

    exit_code = 22
    default_hint = ("bring the node back (`docker node ls` on a manager; its engine must answer "
                    "at the endpoint swarm.yaml names), or install with --allow-degraded")


class HostPolicyError(PolicyError):
    """The bundle asks the host for something this root's host policy does not allow (a
    privileged container, a host path mounted, a capability, a host namespace, root...), or
    for something bundler cannot check exactly: refused before anything is created. The error
    names the `--allow` flag and the `<root>/policy.yaml` line that would allow it."""

    exit_code = 23
    default_hint = ("`{bundle} inspect BUNDLE` lists what the bundle asks of the host; "
                    "docs/host-policy.md says how to allow it")



class DeltaError(BundlerError):
    """A receipt or a delta bundle does not fit: a receipt that is malformed, for another
    product, or not older than the release being built (`bundle build --against`); or, on the
    target, an artifact a delta bundle does not carry is missing from the root's store or
    corrupt there, or an image it leaves to the host is not in the engine (refused before
    anything changes: the root is as it was)."""

    exit_code = 24
    default_hint = ("carry the full bundle (build without --against), or build the delta "
                    "against a fresh receipt: `{bundle} receipt --root DIR --out FILE`")


class DriftFound(BundlerError):
    """`bundle audit` found drift: a file of the release changed, added or removed since it was
    installed (by path, relative to the release), one of its images replaced or gone from the
    engine, or a container of its stack running another image (docs/audit.md). Nothing was
    changed by the audit."""

    exit_code = 25
    default_hint = ("`{bundle} audit --root DIR --json` lists every finding; what bundler "
                    "installed comes back with the next release, or `{bundle} rollback`")


class VulnerableError(BundlerError):
    """Vulnerabilities at or above the policy (`--fail-on SEVERITY`) were found in what the
    bundle carries (`bundle build --vulns`) or in what a root has installed (`bundle vulns`):
    each named with its id, component, version, the version that fixes it and its severity
    (docs/vulns.md). `bundle build` wrote no bundle; `bundle vulns` changed nothing."""

    exit_code = 26
    default_hint = ("upgrade the components named to a fixed version (pin it in the lock) and "
                    "build again, or choose the bar with --fail-on (see docs/vulns.md)")

# What a full disk looks like from here: the OS error itself, SQLite's SQLITE_FULL, and the
# words the tools bundler runs print for it (uv, pip, npm, pg_dump, tar, docker).
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# The error codes only in capitals and as words (npm's `code ENOSPC`): a path may hold them.
_FULL_WORDS = re.compile(r"(?i:no space left on device|disk quota exceeded|database or disk "
                         r"is full)|\bE(?:NOSPC|DQUOT)\b")


def disk_full(exc: BaseException | None) -> bool:
    """`exc`, or an error that led to it, is a filesystem running out of space."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        text = exc.message if isinstance(exc, BundlerError) else str(exc)
        if _FULL_WORDS.search(text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
