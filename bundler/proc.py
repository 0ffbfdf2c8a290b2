"""The only place that starts subprocesses.

Every call goes through `run` (wait for it) or `spawn` (detached, for supervised services),
so that environments are built the same way, timeouts are always set, and failures carry the
tail of the output instead of a bare exit status.

Which program a bare command name means: bundler's own tools (pg_dump, psql, mariadb, docker,
npm, ...) are looked up on bundler's own PATH (`own_path`: the environment bundler was started
with), never on a PATH in the child's environment, which may come from the operator's shared
.env. Only the release's own commands (`run(..., release_command=True)`: command migrations
and health checks; services through `popen`) are looked up on their environment's PATH, the
operator's if the .env sets one.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler.errors import Cancelled, CommandError

log = logging.getLogger(__name__)

TAIL_LINES = 20
DEFAULT_TIMEOUT = 600.0  # seconds; every run has one (a hung tool must not hang bundler)

# Variables that make tools reach for host configuration or the network on their own.
# bundler's calls must behave the same on every host (pip.conf, PIP_* and npm_config_* are
# common on real hosts and would silently change what is resolved or installed). pip, uv and
# Python read their variables by exact (upper-case) name; npm reads any case of
# `npm_config_` (@npmcli/config matches /^npm_config_/i), so that prefix is compared
# case-insensitively.
_SCRUBBED_PREFIXES = ("PIP_", "UV_", "PYTHON")
_SCRUBBED_ANY_CASE = ("npm_config_",)


def _scrubbed(name: str) -> bool:
    return name.startswith(_SCRUBBED_PREFIXES) or name.lower().startswith(_SCRUBBED_ANY_CASE)


class CancelScope:
    """Steps that run at the same time (install: images, Python, npm) share one scope: when
    one fails, `cancel` stops the others' commands (SIGTERM, then SIGKILL) and makes any
    later `run` in the scope raise Cancelled, so the failure is not waited out."""

    GRACE = 5.0

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen[bytes]] = set()
        self.reason = ""

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(f"stopped: {self.reason}")

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            children = list(self._children)
        for child in children:
            _stop(child, self.GRACE)

    def _add(self, child: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._children.add(child)
            stop = self._event.is_set()
        if stop:
            _stop(child, self.GRACE)

    def _remove(self, child: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._children.discard(child)


def _signal_group(child: subprocess.Popen[bytes], sig: int) -> None:
    """`sig` to the child's whole process group (it leads one: see `_run`), so that workers it
    forked die with it instead of holding its output pipe open."""
    with contextlib.suppress(OSError):
        os.killpg(child.pid, sig)


def _stop(child: subprocess.Popen[bytes], grace: float) -> None:
    _signal_group(child, signal.SIGTERM)

    def kill_later() -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(grace)
        _signal_group(child, signal.SIGKILL)  # and whatever it left behind

    threading.Thread(target=kill_later, daemon=True).start()


_scope = threading.local()


@contextlib.contextmanager
def cancel_scope(scope: CancelScope) -> Iterator[None]:
    """Commands this thread runs inside the block belong to `scope`."""
    _scope.current = scope
    try:
        yield
    finally:
        _scope.current = None


@dataclass(frozen=True)
class RunAs:
    """An unprivileged account a child runs as (a profile's `user`): its uid, primary gid,
    supplementary groups and home, looked up on this host by `lookup_user`."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @property
    def switches(self) -> bool:
        """Does running as this account change the process's identity? Not for the account
        bundler already runs as (then nothing is switched, and no privilege is needed)."""
        return self.uid != os.geteuid()

    def environ(self, env: Mapping[str, str]) -> dict[str, str]:
        """`env` with HOME, USER and LOGNAME of this account (never root's /root)."""
        return {**env, "HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    def group_name(self) -> str:
        try:
            return grp.getgrgid(self.gid).gr_name
        except KeyError:
            return str(self.gid)


def lookup_user(name: str) -> RunAs | None:
    """The account `name` on this host (None: there is none)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    groups = tuple(sorted(set(os.getgrouplist(name, entry.pw_gid))))
    return RunAs(name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir or "/")


def _identity(user: RunAs | None) -> tuple[int | None, int | None, list[int] | None]:
    """subprocess's `user`, `group` and `extra_groups` that make the child run as `user`
    (set after fork, before exec); all None when nothing is switched."""
    if user is None or not user.switches:
        return None, None, None
    return user.uid, user.gid, list(user.groups)


def _child_env(env: Mapping[str, str] | None, user: RunAs | None) -> dict[str, str]:
    base = dict(env) if env is not None else clean_env()
    return user.environ(base) if user is not None else base


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    output: str

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


def own_path() -> str:
    """bundler's own PATH: the absolute entries of the PATH it was started with (an empty or
    relative entry would mean the working directory), or the system default."""
    entries = [e for e in os.environ.get("PATH", "").split(os.pathsep) if os.path.isabs(e)]
    return os.pathsep.join(entries) if entries else os.defpath


def which(name: str) -> str | None:
    """The program bundler runs for `name`: looked up on `own_path` (see the module
    docstring); a name with a `/` is taken as is."""
    if "/" in name:
        return name
    return shutil.which(name, path=own_path())


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The host environment without variables that change tool behaviour behind our back."""
    env = {k: v for k, v in os.environ.items() if not _scrubbed(k)}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["LC_ALL"] = env.get("LC_ALL", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    what: str | None = None,
    stdin: Path | None = None,
    stdout: Path | None = None,
    user: RunAs | None = None,
    release_command: bool = False,
) -> Result:
    """Run a command to completion, capturing stdout+stderr together.

    `stdin` / `stdout`: files (or FIFOs) to connect instead; with `stdout`, the result's
    output is stderr alone. `user`: run as that account (its groups and HOME).
    `release_command`: the command is the release's own (a migration, a health check), looked
    up on `env`'s PATH; else it is bundler's tool, looked up on bundler's own (see the module
    docstring). Raises CommandError (with the output tail) on a non-zero exit when `check`,
    and always on a timeout or a missing executable.
    """
    argv = tuple(os.fspath(a) for a in args)
    label = what or argv[0]
    program = argv[0] if release_command else which(argv[0])
    if program is None:
        raise CommandError(f"{label}: executable not found: {argv[0]}",
                           hint=f"install {argv[0]} or put it on PATH")
    uid, gid, groups = _identity(user)
    log.debug("run: %s (cwd=%s)", " ".join(argv), cwd)
    with contextlib.ExitStack() as files:
        # Opened here, not by the child: a FIFO's open blocks until its peer opens it too.
        source = files.enter_context(open(stdin, "rb")) if stdin else subprocess.DEVNULL
        sink = files.enter_context(open(stdout, "wb")) if stdout else None
        scope: CancelScope | None = getattr(_scope, "current", None)
        if scope is not None:
            scope.check()
        try:
            done = _run(scope, argv, timeout,
                        executable=program,
                        cwd=cwd,
                        env=_child_env(env, user),
                        stdin=source,
                        stdout=sink if sink is not None else subprocess.PIPE,
                        stderr=subprocess.PIPE if sink is not None else subprocess.STDOUT,
                        user=uid, group=gid, extra_groups=groups)
        except FileNotFoundError as exc:
            raise CommandError(
                f"{label}: executable not found: {argv[0]}",
                hint=f"install {Path(argv[0]).name} or put it on PATH",
            ) from exc
        except PermissionError as exc:
            who = f" as user {user.name}" if user is not None else ""
            raise CommandError(
                f"{label}: cannot run {argv[0]}{who}: {exc.strerror}",
                hint="check that the file and its directories are readable and executable "
                     "by that user",
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise CommandError(
                f"{label}: timed out after {timeout:.0f}s",
                hint="the command hung; check the host's load and the command's own log",
            ) from exc
    if scope is not None:
        scope.check()  # stopped by the scope: its reason, not the child's exit status
    captured = done.stderr if sink is not None else done.stdout
    result = Result(argv, done.returncode, (captured or b"").decode("utf-8", "replace"))
    if check and done.returncode != 0:
        raise CommandError(
            f"{label} failed (exit {done.returncode}):\n{result.tail()}",
        )
    return result


def _run(scope: CancelScope | None, argv: tuple[str, ...], timeout: float,
         **popen: Any) -> subprocess.CompletedProcess[bytes]:
    """subprocess.run, with the child registered in `scope` while it runs.

    The child leads a process group of its own. When it exits, whatever is left of its group
    is killed: a command bundler waits for must not leave processes behind, and one that did
    (a worker pool whose parent was killed, say) would hold the output pipe open and hang
    this call. A timeout, Ctrl+C or a cancel kill the whole group too."""
    with subprocess.Popen(argv, start_new_session=True, **popen) as child:
        if scope is not None:
            scope._add(child)
        reaper = threading.Thread(target=_kill_leftovers, args=(child,), daemon=True)
        reaper.start()
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
            child.communicate()
            raise
        except BaseException:  # e.g. Ctrl+C: do not leave the child running
            _signal_group(child, signal.SIGKILL)
            child.wait()
            raise
        finally:
            if scope is not None:
                scope._remove(child)
        return subprocess.CompletedProcess(argv, child.returncode, out, err)


def _kill_leftovers(child: subprocess.Popen[bytes]) -> None:
    """Wait for `child` to exit WITHOUT reaping it (its pid, the group's id, stays reserved
    until `communicate` reaps it), then SIGKILL what is left of its process group."""
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # already reaped: nothing held the pipes
        return
    _signal_group(child, signal.SIGKILL)


def spawn(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log_path: Path,
) -> int:
    """Start a long-running process in its own session, detached from ours; return its pid.

    Its output is appended to `log_path`. It survives this process (services must outlive the
    `bundle install` that started them).
    """
    argv = [os.fspath(a) for a in args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Never through a symlink: a release's logs/ may be writable by its unprivileged `user`.
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with open(fd, "ab") as out:
        try:
            child = subprocess.Popen(
                argv,
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError as exc:
            raise CommandError(
                f"executable not found: {argv[0]}", hint="check the service's command"
            ) from exc
    return child.pid


def popen(args: Sequence[str], *, cwd: Path, env: Mapping[str, str],
          log_fh: int, user: RunAs | None = None) -> subprocess.Popen[bytes]:
    """Start a child that the caller supervises (same process group as the caller);
    `user`: as that account."""
    uid, gid, groups = _identity(user)
    try:
        return subprocess.Popen(list(args), cwd=cwd, env=_child_env(env, user),
                                stdin=subprocess.DEVNULL, stdout=log_fh,
                                stderr=subprocess.STDOUT, close_fds=True,
                                user=uid, group=gid, extra_groups=groups)
    except (FileNotFoundError, PermissionError) as exc:
        raise CommandError(f"cannot start {args[0]}: {exc.strerror}",
                           hint="check the service's command and that the file is executable"
                           ) from exc
