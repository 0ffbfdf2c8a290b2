"""`bundle build` refuses a Prisma set-up that cannot run offline, naming the file and the fix
(bundler.build.resolve.prisma). The set-up that passes is the one seed 000 runs end to end
(tests/test_seed_000.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bundler.build.resolve import prisma
from bundler.errors import BuildError
from tests.helpers import bundle

BACKEND = Path(__file__).resolve().parent.parent / "profiles" / "health-platform" / "backend"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of seed 000's backend: the supported set-up, to be broken one way per test."""
    dest = tmp_path / "backend"
    shutil.copytree(BACKEND, dest, ignore=shutil.ignore_patterns("node_modules", "generated"))
    return dest


def _lock(project: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((project / "package-lock.json").read_text())
    return data


def _check(project: Path, lock: dict[str, Any] | None = None, migrates: bool = True,
           omit_dev: bool = True) -> tuple[str, ...]:
    return prisma.check(project, lock or _lock(project), project / "package-lock.json",
                        omit_dev, migrates)


def _refused(project: Path, lock: dict[str, Any] | None = None, **kw: Any) -> BuildError:
    with pytest.raises(BuildError) as info:
        _check(project, lock, **kw)
    assert "\n" not in info.value.message and "\n" not in info.value.hint
    return info.value


def test_the_seed_000_setup_passes_and_its_install_scripts_are_not_warned_about(
        project: Path) -> None:
    assert _check(project) == ("prisma", "@prisma/client", "@prisma/engines")


def test_a_project_without_prisma_is_not_checked(project: Path) -> None:
    lock = _lock(project)
    for key in [k for k in lock["packages"] if "prisma" in k]:
        del lock["packages"][key]
    assert _check(project, lock) == ()


@pytest.mark.parametrize("version", ["7.10.0", "8.1.0"])
def test_prisma_7_is_refused_with_the_version_to_pin(project: Path, version: str) -> None:
    lock = _lock(project)
    lock["packages"]["node_modules/prisma"]["version"] = version
    err = _refused(project, lock)
    assert str(project / "package-lock.json") in err.message
    assert f"prisma {version} cannot run offline" in err.message
    assert "downloads its native schema engine" in err.message
    assert "6.19.3" in err.hint


def test_an_older_prisma_is_refused(project: Path) -> None:
    lock = _lock(project)
    for key in ("node_modules/prisma", "node_modules/@prisma/client"):
        lock["packages"][key]["version"] = "5.22.0"
    err = _refused(project, lock)
    assert "prisma 5.22.0 is not a Prisma that bundler can run offline" in err.message
    assert "6.19.3" in err.hint


def test_a_generator_without_engine_type_client_is_refused_at_its_line(project: Path) -> None:
    schema = project / "prisma" / "schema.prisma"
    schema.write_text(schema.read_text().replace('  engineType = "client"\n', ""))
    err = _refused(project)
    line = schema.read_text().splitlines().index("generator client {") + 1
    assert err.message.startswith(f"{schema}:{line}: generator client has no engineType")
    assert 'add engineType = "client"' in err.hint and "adapter" in err.hint


def test_a_missing_config_is_refused(project: Path) -> None:
    (project / "prisma.config.ts").unlink()
    err = _refused(project)
    assert err.message.startswith(f"{project / 'prisma.config.ts'} is missing")
    assert 'engine: "js"' in err.hint and "adapter: true" in err.hint


@pytest.mark.parametrize(("old", "new", "missing"), [
    ('  engine: "js",\n', "", 'engine: "js"'),
    ("  experimental: { adapter: true },\n", "", "experimental: { adapter: true }"),
    ("  adapter: async () => new PrismaPg({ connectionString: process.env.DATABASE_URL }),\n",
     "", "adapter: async () => new PrismaPg(...)"),
])
def test_a_config_without_the_js_engine_or_adapter_is_refused(project: Path, old: str, new: str,
                                                              missing: str) -> None:
    config = project / "prisma.config.ts"
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new))
    err = _refused(project)
    assert err.message.startswith(f"{config} has no {missing}:")


def test_the_cli_adapter_from_adapter_pg_6_is_refused(project: Path) -> None:
    config = project / "prisma.config.ts"
    config.write_text(config.read_text().replace('from "prisma-cli-adapter-pg"',
                                                 'from "@prisma/adapter-pg"'))
    err = _refused(project)
    assert "@prisma/adapter-pg 6.19.3" in err.message and "prisma/orm#27403" in err.message
    assert "npm:@prisma/adapter-pg@7.10.1" in err.hint


def test_a_cli_adapter_the_lock_lacks_is_refused(project: Path) -> None:
    lock = _lock(project)
    del lock["packages"]["node_modules/prisma-cli-adapter-pg"]
    err = _refused(project, lock)
    assert "imports no @prisma/adapter-pg that the lock has" in err.message


def test_prisma_as_a_dev_dependency_is_refused_when_a_migration_runs_it(project: Path) -> None:
    lock = _lock(project)
    lock["packages"]["node_modules/prisma"]["dev"] = True
    err = _refused(project, lock)
    assert "prisma is a devDependency" in err.message
    assert _check(project, lock, omit_dev=False)  # carried when dev packages are


def test_client_and_cli_versions_must_agree(project: Path) -> None:
    lock = _lock(project)
    lock["packages"]["node_modules/@prisma/client"]["version"] = "6.19.2"
    assert "differ" in _refused(project, lock).message


def test_bundle_build_refuses_before_running_any_action(project: Path, tmp_path: Path,
                                                        keys: tuple[Path, Path]) -> None:
    """Through the CLI: exit 4 with the one-line error and its hint, and the profile's
    actions (the slow npm install) never ran."""
    lock = _lock(project)
    lock["packages"]["node_modules/prisma"]["version"] = "7.10.0"
    (project / "package-lock.json").write_text(json.dumps(lock))
    marker = tmp_path / "action-ran"
    (tmp_path / "p.yaml").write_text(
        "schema: 1\nname: prisma-app\nversion: 1.0.0\n"
        "target: {python: '3.11', platform: manylinux_2_28_x86_64}\n"
        f"actions:\n  - name: deps\n    run: [touch, {marker}]\n    cwd: backend\n"
        "npm:\n  - project: backend\n"
        "databases:\n  - {name: main, kind: postgres, url: '${DATABASE_URL}'}\n"
        "migrations:\n  - name: prisma\n    cwd: backend\n"
        "    command: [npx, prisma, migrate, deploy]\n")
    done = bundle("build", tmp_path / "p.yaml", "--key", keys[0], "--out", tmp_path / "out",
                  "--cache-dir", tmp_path / "cache")
    assert done.rc == BuildError.exit_code, done.err
    lines = done.err.strip().splitlines()
    assert lines[-2].startswith("error: ") and "prisma 7.10.0 cannot run offline" in lines[-2]
    assert lines[-1].startswith("hint: pin prisma and @prisma/client to exactly 6.19.3")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
