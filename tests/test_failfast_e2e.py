"""A failed upgrade fails fast and says why, end to end: real builds, real venvs, the real
supervisor (and a real engine for compose); the install side under `unshare -n`. Its output
goes to a pipe, as in CI or under a deploy script."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bundler.errors import PolicyError, RolledBackError, UnhealthyError
from tests import docker_fixtures as dfx
from tests.helpers import Project, bundle, bundle_argv, offline

pytestmark = pytest.mark.slow

SETTING_ERROR = "Error: Invalid value for '--setting': 'fsat' is not one of 'fast', 'slow'."
TOKEN = "hunter2-token-7c1e"  # in the root's shared .env: a secret the crash prints
CRASH_PY = textwrap.dedent(f'''\
    """Exits at once the way a click app does on a misspelt setting."""
    import os, sys
    sys.stderr.write("loaded api token " + os.environ["API_TOKEN"] + "\\n"
                     "Try 'server.py --help' for help.\\n\\n{SETTING_ERROR}\\n")
    sys.exit(2)
''')


def build(project: Project, keys: tuple[Path, Path], cache: Path, profile: str,
          version: str) -> Path:
    path = project.dir / f"shop-{version}.yaml"
    path.write_text(profile)
    result = bundle("build", path, "--key", keys[0], "--out", project.dir / "dist",
                    "--cache-dir", cache, "--json")
    assert result.rc == 0, result.err
    return Path(json.loads(result.out)["bundle"])


def profile(project: Project, version: str, seq: int, *, retries: int, crash: bool = False,
            healthy: bool = True, extra_check: str = "", extra: str = "") -> str:
    text = project.profile(version, healthy=healthy, sequence=seq, extra=extra).read_text()
    text = text.replace(f"retries: {40 if healthy else 4}\n", f"retries: {retries}\n")
    if crash:
        text = text.replace('"server.py"', '"crash.py", "--setting", "fsat"')
    if extra_check:
        text = text.replace("    interval: 250ms\n", "    interval: 250ms\n" + extra_check, 1)
    return text


def shared_env(root: Path, text: str) -> None:
    """The operator's shared .env, written before the first install (modes as bundler
    wants them: nobody else may write what root trusts)."""
    (root / "shared").mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o755)
    env = root / "shared" / ".env"
    env.write_text(text)
    env.chmod(0o600)


def status(run: Any) -> dict[str, Any]:
    assert run.rc in (0, UnhealthyError.exit_code), run.err
    doc: dict[str, Any] = json.loads(run.out)
    return doc


def test_a_crashing_upgrade_fails_fast_says_why_and_the_previous_release_serves(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        roots: list[Path]) -> None:
    (project.dir / "app" / "crash.py").write_text(CRASH_PY)
    # 240 x 250 ms: a 60 s health budget the crash must not wait out
    v1 = build(project, keys, cache_dir, profile(project, "1.0.0", 1, retries=240), "1.0.0")
    # alive but unhealthy (503): no crash evidence, so every retry is spent (7 s)
    v2 = build(project, keys, cache_dir,
               profile(project, "2.0.0", 2, retries=28, healthy=False), "2.0.0")
    v3 = build(project, keys, cache_dir, profile(project, "3.0.0", 3, retries=240, crash=True),
               "3.0.0")
    root = tmp_path / "target"
    roots.append(root)
    shared_env(root, f"API_TOKEN={TOKEN}\n")
    trust = ["--trust", keys[1], "--root", root]
    r1, r2, r3, after = offline(
        bundle_argv("install", v1, *trust), bundle_argv("install", v2, *trust),
        bundle_argv("install", v3, *trust), bundle_argv("status", "--root", root, "--json"))
    assert r1.rc == 0, r1.err

    # The live but unhealthy release: all its retries, with a line every ~5 s in the pipe.
    assert r2.rc == RolledBackError.exit_code, r2.err
    assert r2.seconds > 7, r2.seconds
    waits = [x for x in r2.err.splitlines() if x.startswith("    health: web (http): attempt ")]
    assert waits, r2.err
    assert "/28; last: GET http://127.0.0.1:" in waits[0] and "status 503" in waits[0]

    # The crashing one: given up at the first evidence, well inside the 60 s budget.
    assert r3.rc == RolledBackError.exit_code, r3.err
    assert r3.seconds < 20, (r3.seconds, r3.err)
    errors = [x for x in r3.err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, r3.err
    line = errors[0]
    assert line.startswith("error: 3.0.0 failed and was rolled back to 1.0.0: health check "
                           "'web' failed: service web exited with 2 before it was healthy ("), line
    assert SETTING_ERROR in line  # the service's own stderr, on the error line
    assert "loaded api token ****" in line and TOKEN not in r3.err  # redacted
    assert "gave up at attempt " in line and "of 240" in line
    assert not [x for x in r3.err.splitlines() if "health: web (http): attempt" in x]

    st = status(after)
    assert st["current"]["version"] == "1.0.0" and st["healthy"] is True
    report = json.loads((root / "releases/3.0.0/report.json").read_text())
    assert report["outcome"] == "rolled back"
    (check,) = report["checks"]
    assert check["ok"] is False and SETTING_ERROR in check["evidence"][0]
    assert TOKEN not in (root / "releases/3.0.0/REPORT.md").read_text()
    hist = bundle("history", "--root", root, "--json")
    failed = [e for e in json.loads(hist.out)["events"]
              if (e["version"], e["step"], e["status"]) == ("3.0.0", "health", "failed")]
    assert len(failed) == 1 and SETTING_ERROR in failed[0]["detail"]


def test_a_failed_release_takes_no_keep_slot_and_is_no_rollback_target_unless_forced(
        project: Project, keys: tuple[Path, Path], cache_dir: Path, tmp_path: Path,
        roots: list[Path]) -> None:
    flag = tmp_path / "ready-flag"
    keep = "install:\n  keep: 2\n"
    # 3.0.0 runs fine but fails a check on something outside it (a flag file): rolled back
    check = (f'  - name: ready\n    command: ["test", "-f", "{flag}"]\n'
             "    retries: 3\n    interval: 250ms\n")
    bundles = {v: build(project, keys, cache_dir,
                        profile(project, v, seq, retries=40, extra=keep,
                                extra_check=check if v == "3.0.0" else ""), v)
               for seq, v in enumerate(("1.0.0", "2.0.0", "3.0.0", "4.0.0"), 1)}
    root = tmp_path / "target"
    roots.append(root)
    trust = ["--trust", keys[1], "--root", root]
    installs = [bundle_argv("install", bundles[v], *trust) for v in bundles]
    *runs, st4, refused, st_refused = offline(
        *installs, bundle_argv("status", "--root", root, "--json"),
        bundle_argv("rollback", "--root", root, "--to", "3.0.0", "--json"),
        bundle_argv("status", "--root", root, "--json"))
    assert [r.rc for r in runs] == [0, 0, RolledBackError.exit_code, 0], [r.err for r in runs]
    assert "health check 'ready' failed" in runs[2].err

    # keep: 2 -> 4.0.0 (current) and 2.0.0 (its rollback target); 3.0.0, the newest failed
    # release, stays for inspection in no slot of its own; 1.0.0 goes.
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["2.0.0", "3.0.0", "4.0.0"]
    statuses = {r["version"]: r["status"] for r in status(st4)["releases"]}
    assert statuses == {"1.0.0": "pruned", "2.0.0": "superseded", "3.0.0": "rolled_back",
                        "4.0.0": "active"}

    # A release that never passed its checks is no rollback target...
    assert refused.rc == PolicyError.exit_code, refused.err
    err = json.loads(refused.out)
    assert err["error"] == "PolicyError"
    assert err["message"].startswith("release 3.0.0 never passed its health checks")
    assert "--force" in err["hint"]
    assert status(st_refused)["current"]["version"] == "4.0.0"

    # ... unless forced, and then only if its checks pass now.
    flag.write_text("")
    forced, st_forced = offline(
        bundle_argv("rollback", "--root", root, "--to", "3.0.0", "--force", "--json"),
        bundle_argv("status", "--root", root, "--json"))
    assert forced.rc == 0, forced.err
    assert json.loads(forced.out)["to"] == "3.0.0"
    st = status(st_forced)
    assert st["current"]["version"] == "3.0.0" and st["healthy"] is True


@pytest.mark.docker
@pytest.mark.parametrize("when", ["at-once", "after-start"])
def test_a_compose_container_that_exits_non_zero_fails_the_upgrade_fast(
        when: str, engine: Any, keys: tuple[Path, Path], tmp_path: Path) -> None:
    """at-once: compose `up` sees the exit itself; after-start: the container outlives `up`
    (running past its settle time) and exits while bundler's own checks retry. Either way
    the error line carries the container's last log lines and the previous release serves."""
    pair = dfx.make_pair(engine, "ffast")
    root = tmp_path / "target"

    def make(version: str, seq: int, command: str, check: str, retries: int) -> str:
        app = tmp_path / f"app-{version}"
        app.mkdir()
        (app / "docker-compose.yml").write_text(textwrap.dedent(f"""\
            version: "3.7"
            services:
              web:
                image: {pair.a}
                command: ["busybox", "sh", "-c", {json.dumps(command)}]
                environment:
                  RELEASE: "{version}"
            """))
        path = tmp_path / f"p-{version}.yaml"
        # The check stands for the app's own (not answering yet, for 2.0.0): the engine's
        # word on the container is what must decide, within the 60 s budget.
        path.write_text(textwrap.dedent(f"""\
            schema: 1
            name: ffast
            version: {version}
            sequence: {seq}
            images:
              - ref: {pair.a}
            files:
              - {{src: app-{version}, dest: stack}}
            compose:
              files: [stack/docker-compose.yml]
            health:
              - name: web
                command: [{check}]
                retries: {retries}
                interval: 250ms
            """))
        built = bundle("build", path, "--key", keys[0], "--out", tmp_path / "out",
                       "--cache-dir", tmp_path / "cache", "--json")
        assert built.rc == 0, built.err
        return str(json.loads(built.out)["bundle"])

    delay = "" if when == "at-once" else "busybox sleep 4; "
    try:
        # (a shell that stops on SIGTERM: a plain `sleep` as pid 1 would hold every
        # recreate for docker's 10 s stop timeout)
        good = make("1.0.0", 1, "trap 'exit 0' TERM; busybox sleep 3600 & wait", "true", 3)
        bad = make("2.0.0", 2, f"{delay}echo 'starting web' >&2; "
                               f"echo \"{SETTING_ERROR}\" >&2; exit 3", "false", 240)
        trust = ["--trust", keys[1], "--root", root]
        r1, r2, after = offline(bundle_argv("install", good, *trust),
                                bundle_argv("install", bad, *trust),
                                bundle_argv("status", "--root", root, "--json"))
        assert r1.rc == 0, r1.err
        assert r2.rc == RolledBackError.exit_code, r2.err
        assert r2.seconds < 20, (r2.seconds, r2.err)
        errors = [x for x in r2.err.splitlines() if x.startswith("error:")]
        assert len(errors) == 1, r2.err
        line = errors[0]
        assert line.startswith("error: 2.0.0 failed and was rolled back to 1.0.0: "), line
        assert "compose service web exited with code 3" in line, line
        assert f"starting web | {SETTING_ERROR}" in line, line
        assert "last log lines" not in line  # the first line stands alone
        if when == "after-start":
            assert "health check 'web' failed" in line and "gave up at attempt" in line
        st = status(after)
        assert st["current"]["version"] == "1.0.0" and st["healthy"] is True
        units = {u["name"]: u for u in st["services"]}
        assert units["compose:web"]["running"] is True
    finally:
        bundle("stop", "--root", root)
        dfx.remove_images(engine, pair.a, pair.b, pair.base)
