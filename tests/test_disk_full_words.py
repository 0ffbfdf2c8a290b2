"""What counts as a full disk (errors.disk_full), and the one line the install ends with."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from bundler.errors import CommandError, InstallError, SpaceError, disk_full
from bundler.install.installer import _disk_full_error
from bundler.install.layout import Layout


def _raised(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    sqlite3.OperationalError("database or disk is full"),
    InstallError("installing Python packages failed: uv pip install exited 2: error: "
                 "failed to write: No space left on device (os error 28)"),
    CommandError("npm ci failed (exit 228):\nnpm ERR! code ENOSPC"),
    InstallError("pg_dump: error: could not write to output file: No space left on device"),
])
def test_a_full_disk_is_recognised_in_every_form(exc: BaseException) -> None:
    assert disk_full(exc)


def test_a_full_disk_is_recognised_through_the_errors_it_caused() -> None:
    assert disk_full(_raised(InstallError("migration failed"),
                             OSError(errno.ENOSPC, "No space left on device")))
    assert not disk_full(_raised(InstallError("migration failed"),
                                 OSError(errno.EACCES, "Permission denied")))
    assert not disk_full(InstallError("health check 'web' failed: 503"))
    # a path that happens to hold the letters is not the error code
    assert not disk_full(InstallError("port 80 is held by /srv/wt-enospc/bin/python"))


def test_the_error_names_whose_disk_filled(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    mine = _disk_full_error("backing up failed", Layout(root))
    assert isinstance(mine, SpaceError) and mine.exit_code == SpaceError.exit_code
    assert f"the filesystem of {root} ran out of space" in mine.message
    assert "nothing was installed" in mine.hint and "\n" not in mine.message
    other = _disk_full_error("loading images failed", Layout(root), root_full=False)
    assert f"not the one holding {root}" in other.message
    assert "free space on the disk the error names" in other.hint
