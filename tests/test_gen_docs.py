"""The documents drawn from the code (scripts/gen_docs.py) are committed as generated."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from bundler import errors

ROOT = Path(__file__).resolve().parent.parent


def _gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_docs", module)
    spec.loader.exec_module(module)
    return module


GEN = _gen_docs()


@pytest.mark.parametrize("name", sorted(GEN.DOCUMENTS))
def test_the_committed_document_is_what_the_code_generates(name: str) -> None:
    rel, make = GEN.DOCUMENTS[name]
    assert (ROOT / rel).read_text(encoding="utf-8") == make(), \
        f"{rel} is out of date: run python scripts/gen_docs.py {name}"


def test_every_error_class_has_its_row_and_its_meaning() -> None:
    text = (ROOT / "docs" / "exit-codes.md").read_text(encoding="utf-8")
    rows = {line.split(" | ")[1].strip("`"): int(line.split(" | ")[0].lstrip("| "))
            for line in text.splitlines() if line.startswith("| ") and "`" in line.split(" | ")[1]}
    classes = {c.__name__: c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.BundlerError)}
    assert rows == {name: c.exit_code for name, c in classes.items()}
    assert all(c.__doc__ for c in classes.values()), "an error class without a docstring"
    for code in (0, 2, 15):  # the codes no class, or only a late one, stood for
        assert f"\n| {code} | " in text


def test_check_mode_says_when_a_document_is_stale(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "docs").mkdir()
    monkeypatch.setattr(GEN, "ROOT", tmp_path)
    assert GEN.main(["exit-codes", "--check"]) == 1
    assert GEN.main(["exit-codes"]) == 0
    assert GEN.main(["exit-codes", "--check"]) == 0


def test_exit_codes_are_never_renumbered() -> None:
    """The tests name codes by class (`MigrationError.exit_code`); this is the one place the
    numbers are written, because automation branches on them."""
    assert {name: c.exit_code for name, c in vars(errors).items()
            if isinstance(c, type) and issubclass(c, errors.BundlerError)} == {
        "BundlerError": 1, "ProfileError": 3, "BuildError": 4, "SigningKeyError": 5,
        "SignatureError": 6, "IntegrityError": 7, "PolicyError": 8, "SpaceError": 9,
        "LockedError": 10, "InstallError": 11, "Cancelled": 11, "RolledBackError": 12,
        "RollbackFailedError": 13, "StateError": 14, "CommandError": 15, "ImageLoadError": 16,
        "MigrationError": 17, "EnvError": 18, "UnhealthyError": 19, "RecoveryPendingError": 20,
        "ExportError": 21, "NodeDownError": 22, "HostPolicyError": 23, "DeltaError": 24,
        "DriftFound": 25, "VulnerableError": 26,
            "Interrupted": 130}
