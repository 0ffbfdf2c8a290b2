"""The install root every target command works on (issue 17 §6): a misspelt --root is named as
such (StateError, exit 14, with the roots it may have meant), never reported as a missing key
or missing state; --root may come from BUNDLER_ROOT; every command says which root it used
(`==> root: DIR` on stderr, a `root` field in --json). Only `install --trust` and `trust add`
create a root. Each refusal leaves the real root exactly as it was and creates nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler import progname
from bundler.errors import SigningKeyError, StateError
from bundler.install.layout import check_root
from tests.bundles import write_bundle
from tests.exit_codes import USAGE
from tests.helpers import bundle, tree_snapshot


def _install(base: Path) -> tuple[Path, Path]:
    """(root, bundle): a root with one release installed, and its key trusted, by the real
    CLI."""
    key = Ed25519PrivateKey.generate()
    pub = base / "release.pub"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    made = base / "shop-1.0.0.bundle"
    write_bundle(made, key, {"files/app.txt": b"hello\n"})
    root = base / "srv" / "app"
    done = bundle("install", made, "--trust", pub, "--root", root)
    assert done.rc == 0, done.err
    assert bundle("trust", "add", pub, "--root", root).rc == 0
    return root, made


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One installed root for the tests that must leave it as it is (they check they do)."""
    return _install(tmp_path_factory.mktemp("roots"))


@pytest.fixture
def installed(tmp_path: Path) -> tuple[Path, Path]:
    return _install(tmp_path)


# Every target command that reads a root; BUNDLE stands for the bundle file.
COMMANDS = [
    ("status",), ("history",), ("stop",), ("start",), ("rollback",), ("rollback", "--to", "1.0.0"),
    ("recover",), ("doctor",), ("doctor", "BUNDLE"), ("trust", "list"),
    ("trust", "remove", "feedfacefeedface"), ("install", "BUNDLE"), ("verify", "BUNDLE"),
    ("inspect", "BUNDLE"), ("diff", "BUNDLE", "BUNDLE"), ("uninstall",),
    ("uninstall", "--purge", "--yes"), ("start", "--boot"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_misspelt_root_is_named_and_nothing_changes(shared: tuple[Path, Path],
                                                      command: tuple[str, ...]) -> None:
    root, made = shared
    misspelt = root.parent / "appp"
    before = tree_snapshot(root.parent)
    argv = [made if w == "BUNDLE" else w for w in command]
    done = bundle(*argv, "--root", misspelt)
    assert done.rc == StateError.exit_code, done.err
    assert f"error: no install root at {misspelt} (did you mean {root}?)" in done.err, done.err
    assert f"==> root: {misspelt}\n" in done.err
    assert "trusted key" not in done.err
    assert not misspelt.exists()
    assert tree_snapshot(root.parent) == before


@pytest.mark.parametrize("command", [("status",), ("trust", "list"), ("install", "BUNDLE")],
                         ids=" ".join)
def test_a_misspelt_root_from_bundler_root_is_named_too(shared: tuple[Path, Path],
                                                        command: tuple[str, ...]) -> None:
    root, made = shared
    misspelt = root.parent / "ap"
    argv = [made if w == "BUNDLE" else w for w in command]
    done = bundle(*argv, "--json", env={"BUNDLER_ROOT": str(misspelt)})
    assert done.rc == StateError.exit_code, done.err
    doc = json.loads(done.out)
    assert doc["error"] == "StateError" and doc["root"] == str(misspelt)
    assert doc["message"] == f"no install root at {misspelt} (did you mean {root}?)"
    assert not misspelt.exists()


def test_only_install_with_trust_creates_a_root(tmp_path: Path, key: Ed25519PrivateKey,
                                                pub: Path) -> None:
    made = tmp_path / "shop-1.0.0.bundle"
    write_bundle(made, key, {"files/app.txt": b"hello\n"})
    new = tmp_path / "new"
    refused = bundle("install", made, "--root", new)
    assert refused.rc == StateError.exit_code and f"no install root at {new}" in refused.err
    assert f"--trust KEY.pub --root {new}`" in refused.err  # the hint: how a first install goes
    assert not new.exists()
    done = bundle("install", made, "--trust", pub, "--root", new, "--json")
    assert done.rc == 0, done.err
    assert json.loads(done.out)["root"] == str(new)
    assert (new / "current").is_symlink()


def test_a_root_with_no_trusted_key_is_still_reported_as_such(
        installed: tuple[Path, Path]) -> None:
    root, made = installed
    keyid = json.loads(bundle("trust", "list", "--root", root, "--json").out)["keys"][0]["keyid"]
    assert bundle("trust", "remove", keyid, "--root", root).rc == 0
    done = bundle("verify", made, "--root", root)
    assert done.rc == SigningKeyError.exit_code \
        and f"no trusted key: pass --trust KEY.pub and {root} has no trusted " \
        "key" in done.err, done.err
    assert f"`bundle trust add KEY.pub --root {root}`" in done.err


def test_bundler_root_is_used_said_and_in_every_json_document(
        installed: tuple[Path, Path]) -> None:
    root, made = installed
    env = {"BUNDLER_ROOT": str(root)}
    status = bundle("status", env=env)
    assert status.rc == 0, status.err
    assert f"==> root: {root} (from BUNDLER_ROOT)\n" in status.err
    assert "shop 1.0.0" in status.out
    for argv in (["status"], ["history"], ["trust", "list"], ["recover"], ["doctor"],
                 ["verify", made], ["inspect", made], ["install", made]):
        done = bundle(*argv, "--json", env=env)
        assert done.rc == 0, (argv, done.err)
        assert json.loads(done.out)["root"] == str(root), argv
        assert "==> root:" not in done.err  # people's line only
    other = root.parent / "other"
    wins = bundle("status", "--root", other, env=env)  # the flag wins over the variable
    assert wins.rc == StateError.exit_code and f"no install root at {other}" in wins.err
    missing = bundle("status", env={"BUNDLER_ROOT": ""})
    assert missing.rc == USAGE and "BUNDLER_ROOT" in missing.err


def test_trust_add_creates_a_root_and_says_so(tmp_path: Path, pub: Path) -> None:
    root = tmp_path / "fresh"
    done = bundle("trust", "add", pub, "--root", root)
    assert done.rc == 0, done.err
    assert f"==> root: {root} (new)\n" in done.err
    assert bundle("trust", "list", "--root", root).rc == 0


def test_a_relative_root_is_said_absolute(shared: tuple[Path, Path]) -> None:
    root, _ = shared
    done = bundle("history", "--root", os.path.relpath(root), "--json")
    assert done.rc == 0, done.err
    assert json.loads(done.out)["root"] == str(root)


def test_check_root_names_the_root_it_may_have_meant(tmp_path: Path) -> None:
    root = tmp_path / "srv" / "app"
    (root / "state").mkdir(parents=True)
    check_root(root)
    cases = {
        tmp_path / "srv" / "apq": f"no install root at {tmp_path / 'srv' / 'apq'} (did you "
                                  f"mean {root}?)",
        tmp_path / "svr" / "app": f"no install root at {tmp_path / 'svr' / 'app'} (did you "
                                  f"mean {root}?)",
        tmp_path / "srv": f"{tmp_path / 'srv'} is not an install root: it has no state/ "
                          f"(nothing was installed or trusted there) (did you mean {root}?)",
        root / "state": f"{root / 'state'} is not an install root: it has no state/ (nothing "
                        f"was installed or trusted there) (did you mean {root}?)",
        tmp_path / "elsewhere": f"no install root at {tmp_path / 'elsewhere'}",
    }
    for path, message in cases.items():
        with pytest.raises(StateError) as caught:
            check_root(path)
        assert caught.value.message == message
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="not a directory"):
        check_root(tmp_path / "file")


def test_hints_name_the_command_that_runs_here() -> None:
    try:
        progname.set_prog("python3 -I -S /media/usb/bundler-kit.pyz")
        assert StateError("x").hint == ("check --root; `python3 -I -S /media/usb/bundler-kit.pyz "
                                        "status --root DIR` shows what is installed there")
        assert progname.cmd("status", "--root", "/srv/my app") == \
            "python3 -I -S /media/usb/bundler-kit.pyz status --root '/srv/my app'"
    finally:
        progname.set_prog(progname.DEFAULT)
    assert progname.cmd("status") == "bundle status"
