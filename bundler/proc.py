"""The only place that starts subprocesses.

Every call goes through `run` (wait for it) or `spawn` (detached, for supervised services),
so that environments are built the same way, timeouts are always set, and failures carry the
tail of the output instead of a bare exit status.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bundler.errors import CommandError

log = logging.getLogger(__name__)

TAIL_LINES = 20

# Variables that make tools reach for host configuration or the network on their own.
# bundler's calls must behave the same on every host (pip.conf, PIP_* and npm_config_* are
# common on real hosts and would silently change what is resolved or installed).
_SCRUBBED_PREFIXES = ("PIP_", "NPM_CONFIG_", "npm_config_", "UV_", "PYTHON")


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    output: str

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The host environment without variables that change tool behaviour behind our back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
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
    timeout: float = 600,
    check: bool = True,
    what: str | None = None,
    stdin: Path | None = None,
    stdout: Path | None = None,
) -> Result:
    """Run a command to completion, capturing stdout+stderr together.

    `stdin` / `stdout`: files (or FIFOs) to connect instead; with `stdout`, the result's
    output is stderr alone. Raises CommandError (with the output tail) on a non-zero exit when
    `check`, and always on a timeout or a missing executable.
    """
    argv = tuple(os.fspath(a) for a in args)
    label = what or argv[0]
    log.debug("run: %s (cwd=%s)", " ".join(argv), cwd)
    with contextlib.ExitStack() as files:
        # Opened here, not by the child: a FIFO's open blocks until its peer opens it too.
        source = files.enter_context(open(stdin, "rb")) if stdin else subprocess.DEVNULL
        sink = files.enter_context(open(stdout, "wb")) if stdout else None
        try:
            done = subprocess.run(
                argv,
                cwd=cwd,
                env=dict(env) if env is not None else clean_env(),
                stdin=source,
                stdout=sink if sink is not None else subprocess.PIPE,
                stderr=subprocess.PIPE if sink is not None else subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise CommandError(
                f"{label}: executable not found: {argv[0]}",
                hint=f"install {Path(argv[0]).name} or put it on PATH",
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise CommandError(
                f"{label}: timed out after {timeout:.0f}s",
                hint="the command hung; check the host's load and the command's own log",
            ) from exc
    captured = done.stderr if sink is not None else done.stdout
    result = Result(argv, done.returncode, (captured or b"").decode("utf-8", "replace"))
    if check and done.returncode != 0:
        raise CommandError(
            f"{label} failed (exit {done.returncode}):\n{result.tail()}",
        )
    return result


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
    with open(log_path, "ab") as out:
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
          log_fh: int) -> subprocess.Popen[bytes]:
    """Start a child that the caller supervises (same process group as the caller)."""
    try:
        return subprocess.Popen(list(args), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                                stdout=log_fh, stderr=subprocess.STDOUT, close_fds=True)
    except (FileNotFoundError, PermissionError) as exc:
        raise CommandError(f"cannot start {args[0]}: {exc.strerror}",
                           hint="check the service's command and that the file is executable"
                           ) from exc
