"""The kit runs on the python3 that mainstream server systems ship: 3.9 and newer (issue 22).

- The linters' list of the kit's modules (pyproject's ruff per-file target versions, which
  scripts/lint_kit.py also hands to mypy as 3.9) is what `bundle kit` carries.
- bundler.compat, the one home of the 3.10+ features the target side uses, behaves like them.
"""

from __future__ import annotations

import enum
from pathlib import Path

import pytest

from bundler import compat
from bundler.build.kit import target_modules
from scripts import lint_kit

ROOT = Path(__file__).resolve().parent.parent


def test_the_linters_list_is_what_the_kit_carries() -> None:
    carried = sorted(p.relative_to(ROOT).as_posix() for p in target_modules().values())
    listed = lint_kit.kit_files()
    missing = sorted(set(carried) - set(listed))
    extra = sorted(set(listed) - set(carried))
    assert not missing and not extra, (
        "pyproject.toml [tool.ruff.per-file-target-version] must list exactly the kit's "
        f"modules: add {[f'{m} = py39' for m in missing]}, remove {extra}")


def test_strenum_members_are_their_values() -> None:
    class Kind(compat.StrEnum):
        A = "alpha"

    assert Kind.A == "alpha" and isinstance(Kind.A, str)
    assert str(Kind.A) == "alpha" and f"{Kind.A}" == "alpha" and f"{Kind.A:>6}" == " alpha"
    assert Kind("alpha") is Kind.A
    assert compat.StrEnum is enum.StrEnum  # this side runs 3.11+: the standard one


def test_utc_is_the_standard_one() -> None:
    import datetime

    assert compat.UTC is datetime.UTC


def test_zip_strict_refuses_unequal_lengths() -> None:
    assert list(compat.zip_strict([1, 2], "ab")) == [(1, "a"), (2, "b")]
    assert list(compat.zip_strict([1], "a", (True,))) == [(1, "a", True)]
    assert list(compat.zip_strict([], [])) == []
    with pytest.raises(ValueError):
        list(compat.zip_strict([1, 2], "a"))
    with pytest.raises(ValueError):
        list(compat.zip_strict([1], "ab"))


def test_f_setpipe_sz_is_linuxs() -> None:
    import fcntl

    assert fcntl.F_SETPIPE_SZ == compat.F_SETPIPE_SZ


# ---- preflight: another Python than the host's names its family's package ----------------------

OS_RELEASES = {
    "debian11": 'PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\nNAME="Debian GNU/Linux"\n'
                'VERSION_ID="11"\nID=debian\n',
    "ubuntu2204": 'PRETTY_NAME="Ubuntu 22.04.4 LTS"\nID=ubuntu\nID_LIKE=debian\n'
                  'VERSION_ID="22.04"\n',
    "rocky9": 'NAME="Rocky Linux"\nID="rocky"\nID_LIKE="rhel centos fedora"\n'
              'VERSION_ID="9.4"\nPRETTY_NAME="Rocky Linux 9.4 (Blue Onyx)"\n',
    "rhel9": 'NAME="Red Hat Enterprise Linux"\nID="rhel"\nID_LIKE="fedora"\n'
             'PRETTY_NAME="Red Hat Enterprise Linux 9.4 (Plow)"\n',
    "alpine": 'NAME="Alpine Linux"\nID=alpine\nPRETTY_NAME="Alpine Linux v3.20"\n',
}


@pytest.mark.parametrize(("host", "expected"), [
    ("debian11", "`apt-get install python3.12` on Debian GNU/Linux 11 (bullseye)"),
    ("ubuntu2204", "`apt-get install python3.12` on Ubuntu 22.04.4 LTS"),
    ("rocky9", "`dnf install python3.12` on Rocky Linux 9.4 (Blue Onyx)"),
    ("rhel9", "`dnf install python3.12` on Red Hat Enterprise Linux 9.4 (Plow)"),
    ("alpine", "Debian/Ubuntu: `apt-get install python3.12`; RHEL family: "
               "`dnf install python3.12`"),
])
def test_python_install_names_the_hosts_package(host: str, expected: str,
                                                tmp_path: Path) -> None:
    from bundler.bundle import hostneeds
    from bundler.install import python_env

    release = hostneeds.os_release(OS_RELEASES[host] + "# a comment\n\n")
    assert hostneeds.python_install("3.12", release) == expected
    (tmp_path / "os-release").write_text(OS_RELEASES[host])
    assert python_env.install_hint("3.12", (tmp_path / "nope", tmp_path / "os-release")) \
        == expected


def test_python_install_without_os_release_names_every_family(tmp_path: Path) -> None:
    from bundler.install import python_env

    assert python_env.install_hint("3.9", (tmp_path / "nope",)) == (
        "Debian/Ubuntu: `apt-get install python3.9`; RHEL family: `dnf install python3.9`")


@pytest.mark.parametrize(("requires", "python", "fits"), [
    ("!=3.9.0,!=3.9.1,>=3.8", "3.9", True),    # cryptography 45+: any 3.9.z but two
    ("!=3.9.0,!=3.9.1,>=3.8", "3.11", True),
    (">=3.9.7", "3.9", False),                 # a floor above X.Y.0 still refuses
    ("!=3.9.*,>=3.8", "3.9", False),           # the whole series excluded
    (">=3.10", "3.9", False),
    ("!=3.10.0", "3.10", True),
    ("<3.9.1", "3.9", True),
])
def test_excluding_single_patch_releases_does_not_exclude_the_series(
        requires: str, python: str, fits: bool) -> None:
    from bundler.build.resolve.pyindex import ProjectFile, python_fits
    from bundler.bundle.models import Target

    f = ProjectFile("x-1-py3-none-any.whl", "file:///x", requires_python=requires)
    assert python_fits(f, Target(python, "manylinux_2_28_x86_64")) is fits


def test_distutils_is_named_for_debian_and_ubuntu_hosts() -> None:
    from bundler.bundle import hostneeds

    debian = hostneeds.os_release(OS_RELEASES["debian11"])
    assert hostneeds.distutils_install(debian) == (
        "`apt-get install python3-distutils` on Debian GNU/Linux 11 (bullseye)")
    assert hostneeds.distutils_install(None) == "Debian/Ubuntu: `apt-get install python3-distutils`"


def test_install_txt_names_distutils_for_a_39_bundle_only() -> None:
    from bundler.bundle import hostneeds
    from bundler.bundle.models import Target
    from tests.bundles import manifest_for

    def needs(python: str) -> list[str]:
        m = manifest_for({}, target=Target(python, "manylinux_2_28_x86_64"),
                         python_lock="python/requirements.lock")
        return [n.what for n in hostneeds.host_needs(m)]

    assert any("python3-distutils" in n for n in needs("3.9"))
    assert not any("distutils" in n for n in needs("3.11"))
    assert any("`apt-get install python3.11`; RHEL family: `dnf install python3.11`" in n
               for n in needs("3.11"))
