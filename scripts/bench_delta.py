#!/usr/bin/env python3
"""`make bench`, delta part (issue 19): what an upgrade costs when the host says what it has.

The stack is bench.py's (seed 001's 30 wheels, its npm project, three ~100 MiB images) plus
seed 001's backend code as `files:`. Release 1.0.0 is built and installed (offline) into a
root, which then writes its receipt (`bundle receipt`); a copy of that root (`cp -a`, same
path when restored) is the host state every upgrade starts from. For each change (nothing
but the version, the application code, one wheel, several wheels, every wheel of the lock),
release 1.1.0 is built twice from the same lock and warm cache, in full and `--against` the
receipt, and each bundle is installed as the upgrade on a freshly restored root, under
`unshare -n`, side by side in one run, in turns (full, delta, then delta, full, ...), the best
of each kept. A changed wheel is the same wheel rebuilt with one module changed (a new sha256,
as a patched rebuild or a new version would have), served by an index of its own.

Printed against issue 19's targets (never timing asserts in tests): app code only, delta
<= 2% of the full bundle and its upgrade <= 30% of the full one's wall time; one wheel, delta
<= that wheel + 1 MB; peak RSS (the bundler process's own VmHWM) of the delta build and
install < 150 MiB. A missed upgrade-time target gets a cProfile summary of a separate delta
upgrade; every upgrade carries its per-step breakdown (bundler's own `==>` lines).

    python scripts/bench_delta.py [--quick] [--json] [--out DIR] [--no-profile]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import hashlib
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_scale import carried_layers

import bench
from bench import MIB, Setup, bundle_cmd, checked, read_hwm, say, step_breakdown
from tests.npm_registry import make_project
from tests.pyindex_server import serve, write_index

MB = 1_000_000

# Issue 19's targets, never loosened: (op, bound, what).
TARGETS: dict[str, tuple[str, float, str]] = {
    "app_delta_size_ratio": ("<=", 0.02, "app code only: delta <= 2% of the full bundle"),
    "app_upgrade_time_ratio": ("<=", 0.30, "app code only: delta upgrade <= 30% of the full "
                               "upgrade as it was (every tree installed again: --no-reuse)"),
    "wheel_delta_excess_mb": ("<=", 1.0, "one wheel: delta <= that wheel + 1 MB"),
    "delta_peak_rss_mib": ("<", 150.0, "peak RSS of delta build and install < 150 MiB"),
    "image_delta_excess_mb": ("<=", 1.0, "one image's top layer: delta <= that layer + 1 MB"),
}

FILES = """\
files:
  - src: backend
    dest: backend
    exclude: ["__pycache__", "*.pyc", "requirements.in"]
"""


@dataclass(frozen=True)
class Change:
    name: str
    app: bool = False                 # the application code changed
    wheels: tuple[str, ...] = ()      # projects whose wheel is rebuilt; ("*",): every wheel
    image_mib: int = 0                # the last image rebuilt: a new top layer of this size


FULL_CHANGES = (
    Change("version only"),
    Change("app code", app=True),
    Change("one wheel", wheels=("sqlalchemy",)),
    Change("5 wheels", wheels=("sqlalchemy", "pydantic_core", "fastapi", "starlette",
                               "uvicorn")),
    Change("whole lock", wheels=("*",)),
    Change("image top layer 1 MiB", image_mib=1),
    Change("image top layer 16 MiB", image_mib=16),
    Change("image top layer 64 MiB", image_mib=64),
)
# the targets are read from these rows (--only always runs them)
REQUIRED = ("app code", "one wheel", "image top layer 1 MiB")
QUICK_CHANGES = (
    Change("version only"),
    Change("app code", app=True),
    Change("one wheel", wheels=("benchtiny_b",)),
    Change("2 wheels", wheels=("benchtiny_a", "benchtiny_b")),
    Change("whole lock", wheels=("*",)),
    Change("image top layer 1 MiB", image_mib=1),
    Change("image top layer 4 MiB", image_mib=4),
)


def _project(wheel: Path) -> str:
    return wheel.name.split("-", 1)[0].lower()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(
        b"=").decode()


def rebuilt(wheel: Path, dest: Path) -> Path:
    """The same wheel (file name, version) with its first module changed and RECORD to match:
    new bytes, a new sha256, everything else as it was."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w") as dst:
        infos = src.infolist()
        record = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        module = next(i.filename for i in infos
                      if i.filename.endswith(".py") and ".dist-info/" not in i.filename)
        data = {i.filename: src.read(i) for i in infos}
        data[module] += b"\n# bench_delta: rebuilt\n"
        rows = list(csv.reader(io.StringIO(data[record].decode())))
        for row in rows:
            if row and row[0] == module:
                row[1:3] = [_record_hash(data[module]), str(len(data[module]))]
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        data[record] = text.getvalue().encode()
        for info in infos:
            dst.writestr(info, data[info.filename], compress_type=info.compress_type)
    return out


def wheel_set(base: list[Path], change: Change, work: Path) -> tuple[list[Path], list[Path]]:
    """(the index's wheels for this change, the rebuilt ones)."""
    names = {_project(w) for w in base} if change.wheels == ("*",) else set(change.wheels)
    unknown = names - {_project(w) for w in base}
    if unknown:
        raise SystemExit(f"bench: no wheel for {sorted(unknown)} in the workload")
    dest = work / "wheels" / change.name.replace(" ", "-")
    changed = [rebuilt(w, dest) for w in base if _project(w) in names]
    return [dest / w.name if _project(w) in names else w for w in base], changed


def changed_image(ref: str, mib: int, work: Path) -> tuple[str, Path]:
    """`ref` rebuilt with a new top layer: `FROM ref` + one COPY of a new incompressible file
    of `mib` MiB; every other layer is ref's. Saved to an archive and removed from the engine
    at once, so neither release 1.0.0's install nor the receipt sees its layer: it is loaded
    back only to build 1.1.0, and removed again before every upgrade."""
    import docker  # type: ignore[import-untyped]

    repo, tag = ref.rsplit(":", 1)
    new = f"{repo}:{tag}-top{mib}"
    data = random.Random(f"{ref}-top-{mib}").randbytes(mib * MIB)
    context = bench._tar({"Dockerfile": f"FROM {ref}\nCOPY new/ /opt/new/\n".encode(),
                          "new/top.bin": data})
    client = docker.from_env(timeout=600)
    client.images.build(fileobj=io.BytesIO(context), custom_context=True, tag=new, rm=True,
                        pull=False)
    client.close()
    saved = work / f"image-top{mib}.tar"
    subprocess.run(["docker", "save", "-o", str(saved), new], check=True)
    drop([new])
    return new, saved


def drop(refs: list[str]) -> None:
    """Remove images (and the layers only they hold) so that the host lacks them again."""
    if refs:
        subprocess.run(["docker", "rmi", "-f", *refs], capture_output=True, check=False)


# ------------------------------------------------------------------------------------------
# Releases


def release(s: Setup, d: Path, version: str, sequence: int, index_url: str,
            requirements_in: str, frontend: Path, app_changed: bool,
            refs: list[str] | None = None) -> Path:
    """A profile directory: bench.py's profile + seed 001's backend code as files."""
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(bench.SEED / "backend" / "app", d / "backend" / "app",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (d / "backend" / "requirements.in").write_text(requirements_in)
    if app_changed:
        with open(d / "backend" / "app" / "main.py", "a") as fh:
            fh.write("\n\nRELEASE_NOTE = 'bench_delta: the application code changed'\n")
    shutil.copytree(frontend, d / "frontend", ignore=shutil.ignore_patterns("node_modules"))
    images = "".join(f"  - ref: {r}\n    source: engine\n" for r in refs or s.refs)
    text = bench.PROFILE.format(
        sequence=sequence, python=f"{sys.version_info[0]}.{sys.version_info[1]}",
        index=index_url, registry=s.registry.url, images=images)
    profile = d / "bench.yaml"
    profile.write_text(text.replace("version: 1.0.0", f"version: {version}") + FILES)
    return profile


def build(s: Setup, profile: Path, cache: Path, receipt: Path | None = None,
          host_pub: Path | None = None) -> dict[str, Any]:
    """`bundle lock` (not timed, first call only), then one timed `bundle build`: in full, or
    --against the receipt."""
    kind = "full" if receipt is None else "delta"
    out, hwm = profile.parent / kind, profile.parent / f"build-{kind}.hwm"
    if not profile.with_suffix(".lock").exists():
        checked(bench.run_timed([bundle_cmd("bundle lock", "lock", profile,
                                            "--cache-dir", cache)]))
    against: list[Path | str] = []
    if receipt is not None and host_pub is not None:
        against = ["--against", receipt, "--host-key", host_pub]
    [res] = checked(bench.run_timed([bundle_cmd(
        f"build {kind}", "build", profile, "--key", s.key, "--out", out, "--cache-dir", cache,
        *against, hwm=hwm)]))
    [bundle] = out.glob("*.bundle")
    return {"bundle": str(bundle), "bytes": bundle.stat().st_size,
            "seconds": round(res["seconds"], 3), "peak_rss_mib": read_hwm(hwm)}


def travelling(s: Setup, bundle: Path) -> dict[str, Any]:
    """What the bundle carries, from its own signed manifest (`bundle inspect --json`)."""
    done = subprocess.run(bundle_cmd("inspect", "inspect", bundle, "--trust", s.pub,
                                     "--json").argv, capture_output=True, text=True,
                          check=True)
    info = json.loads(done.stdout)
    files = [f for f in info["files"] if f.get("travels") is not False]
    return {"split": info["delta"],
            "files": {f["path"]: f["size"] for f in sorted(files, key=lambda f: -f["size"])}}


# ------------------------------------------------------------------------------------------
# The host state and the upgrades


def restore(root: Path, snap: Path) -> None:
    """The root exactly as release 1.0.0's install left it, at the same path (`cp -a` keeps
    hard links, modes, owners and times; bundler's records name the root's path)."""
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["cp", "-a", str(snap), str(root)], check=True)


def upgrade(s: Setup, root: Path, snap: Path, bundle: Path, tag: str,
            gone: list[str]) -> dict[str, Any]:
    """One timed upgrade from 1.0.0's host state; `gone`: images the host lacks (a changed
    image an earlier upgrade loaded is removed first)."""
    drop(gone)
    restore(root, snap)
    hwm = root.parent / f"upgrade-{tag}.hwm"
    extra = ["--no-reuse"] if tag == "fresh" else []
    [res] = checked(bench.run_offline([bundle_cmd(
        f"upgrade {tag}", "install", bundle, "--trust", s.pub, "--root", root, *extra,
        hwm=hwm)]))
    # The concurrent package steps (images, venv, node_modules) overlap: their own lines say
    # what each did and how (reused, installed, unpacked) where the step lines cannot.
    notes = [f"{at:.2f} s: {text}" for at, text in res["notes"]
             if text.startswith(("venv ", "npm: ", "images: ", "Node.js", "loaded "))]
    return {"seconds": round(res["seconds"], 3), "breakdown": step_breakdown(res),
            "notes": notes, "peak_rss_mib": read_hwm(hwm)}


def profile_upgrade(s: Setup, root: Path, snap: Path, bundle: Path, gone: list[str]
                    ) -> dict[str, Any]:
    drop(gone)
    restore(root, snap)
    dump = root.parent / "prof-delta-upgrade.out"
    cmd = bundle_cmd("upgrade", "install", bundle, "--trust", s.pub, "--root", root)
    checked(bench.run_offline([bench.profiled(cmd, dump)]))
    return bench.profile_summary(dump, top=25)


def measure(s: Setup, change: Change, d: Path, full: dict[str, Any], delta: dict[str, Any],
            root: Path, snap: Path, repeats: int, gone: list[str]) -> dict[str, Any]:
    """The same upgrade from both bundles, in turns (the order rotates each round): "full"
    and "delta" clone what earlier releases made from the same inputs (venv, node_modules);
    "fresh" is the full bundle with --no-reuse, every tree installed again, as every upgrade
    was before issue 19."""
    kinds = ("full", "delta", "fresh")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for i in range(repeats):
        order = kinds[i % 3:] + kinds[:i % 3]
        for kind in order:
            b = delta if kind == "delta" else full
            runs[kind].append(upgrade(s, root, snap, Path(b["bundle"]), kind, gone))
            say(f"  {change.name}: upgrade from the {kind} bundle "
                f"{runs[kind][-1]['seconds']:.1f} s")
    return {k: {**min(v, key=lambda r: r["seconds"]), "runs": [r["seconds"] for r in v]}
            for k, v in runs.items()}


# ------------------------------------------------------------------------------------------
# One run


def run(quick: bool, cache: Path, profile_runs: bool, only: tuple[str, ...] = (),
        keep: Path | None = None) -> dict[str, Any]:
    started = time.time()
    load_before = os.getloadavg()
    changes: tuple[Change, ...] = QUICK_CHANGES if quick else FULL_CHANGES
    if only:
        changes = tuple(c for c in changes if c.name in only or c.name in REQUIRED)
    repeats = 1 if quick else 2
    with contextlib.ExitStack() as stack:
        if keep is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="bundler-bench-delta-")))
        else:  # left behind for a closer look (roots, bundles, logs)
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir(parents=True)
            work = keep
        wl = bench.quick_workload(work) if quick else bench.full_workload(cache)
        refs = bench.ensure_images(wl.images)
        rebuilt_images = {c.name: changed_image(refs[-1], c.image_mib, work)
                          for c in changes if c.image_mib}
        key, pub = bench.make_keys(work)
        index_url, registry, specs = stack.enter_context(bench.servers(work, wl))
        frontend = work / "frontend-template"
        if wl.npm_project is not None:
            shutil.copytree(wl.npm_project, frontend,
                            ignore=shutil.ignore_patterns("node_modules"))
        else:
            make_project(frontend, registry, wl.npm_manifest)
        s = Setup(work, index_url, registry, specs, refs, key, pub, work / "rel")
        bcache, root, snap = work / "bundler-cache", work / "root", work / "root-1.0.0"

        say("release 1.0.0: lock, build, install (offline, images removed first)")
        base_profile = release(s, s.app / "base", "1.0.0", 1, index_url, wl.requirements_in,
                               frontend, app_changed=False)
        base = build(s, base_profile, bcache)
        bench.remove_images(refs)
        hwm = work / "install-base.hwm"
        [first] = checked(bench.run_offline([bundle_cmd(
            "install 1.0.0", "install", base["bundle"], "--trust", pub, "--root", root,
            hwm=hwm)]))
        receipt = work / "host.receipt"
        [rec] = checked(bench.run_timed([bundle_cmd("receipt", "receipt", "--root", root,
                                                    "--out", receipt)]))
        host_pub = root / "state" / "host.pub"
        subprocess.run(["cp", "-a", str(root), str(snap)], check=True)
        initial = {"bytes": base["bytes"], "build_seconds": base["seconds"],
                   "install_seconds": round(first["seconds"], 3),
                   "install_breakdown": step_breakdown(first),
                   "install_peak_rss_mib": read_hwm(hwm),
                   "receipt_seconds": round(rec["seconds"], 3),
                   "receipt_bytes": receipt.stat().st_size}

        rows = []
        for n, change in enumerate(changes, 2):
            say(f"change {change.name!r}: build full and delta, upgrade from each")
            url = index_url
            wheels, changed = wl.wheels, list[Path]()
            if change.wheels:
                wheels, changed = wheel_set(wl.wheels, change, work)
                idx = work / f"index-{n}"
                write_index(wheels, idx)
                url = stack.enter_context(serve(idx))
            images, gone = refs, list[str]()
            if change.image_mib:
                new, saved = rebuilt_images[change.name]
                subprocess.run(["docker", "load", "-q", "-i", str(saved)], check=True,
                               capture_output=True)
                images, gone = [*refs[:-1], new], [new]
            profile = release(s, s.app / f"v{n}", "1.1.0", n, url, wl.requirements_in,
                              frontend, app_changed=change.app, refs=images)
            full = build(s, profile, bcache)
            delta = build(s, profile, bcache, receipt, host_pub)
            drop(gone)
            layers: list[int] = []
            if change.image_mib:  # the layers the delta carries: the new top one alone
                layers = carried_layers(Path(delta["bundle"]))
                change_bytes = sum(layers)
            elif change.app:
                main_py = profile.parent / "backend" / "app" / "main.py"
                change_bytes = main_py.stat().st_size
            else:
                change_bytes = sum(w.stat().st_size for w in changed)
            row: dict[str, Any] = {
                "change": change.name,
                "changed_files": len(changed) + int(change.app) + len(layers),
                "changed_layers": layers,
                "change_bytes": change_bytes, "full": full, "delta": delta,
                "delta_carries": travelling(s, Path(delta["bundle"]))}
            row["upgrade"] = measure(s, change, profile.parent, full, delta, root, snap,
                                     repeats, gone)
            rows.append(row)
        by_name = {r["change"]: r for r in rows}
        app, one = by_name["app code"], by_name["one wheel"]
        app_time_ratio = (app["upgrade"]["delta"]["seconds"]
                          / app["upgrade"]["fresh"]["seconds"])
        if profile_runs and app_time_ratio > TARGETS["app_upgrade_time_ratio"][1]:
            say("app-code upgrade missed its target: profiling the delta upgrade")
            app["upgrade"]["delta"]["profile"] = profile_upgrade(
                s, root, snap, Path(app["delta"]["bundle"]), [])
        rss = [v for r in rows for v in (r["delta"]["peak_rss_mib"],
                                         r["upgrade"]["delta"]["peak_rss_mib"])
               if v is not None]
        values = {
            "app_delta_size_ratio": app["delta"]["bytes"] / app["full"]["bytes"],
            "app_upgrade_time_ratio": app_time_ratio,
            "wheel_delta_excess_mb": (one["delta"]["bytes"] - one["change_bytes"]) / MB,
            "delta_peak_rss_mib": max(rss) if rss else float("nan"),
            "image_delta_excess_mb": max((r["delta"]["bytes"] - r["change_bytes"]) / MB
                                         for r in rows if r["changed_layers"]),
        }
        for r in rows:
            for b in (r["full"], r["delta"]):
                b["bundle"] = Path(b["bundle"]).name
        wheels_mib = round(sum(w.stat().st_size for w in wl.wheels) / MIB, 1)
    targets = bench.judge(TARGETS, values)
    result = {
        "bench": {"schema": 1, "quick": quick, "repeats": repeats,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  "seconds": round(time.time() - started, 1),
                  "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "machine": platform.machine(), "docker": bench._docker_version(),
                           "loadavg_1_5_15": {"start": load_before, "end": os.getloadavg()}}},
        "workload": {"name": wl.name, "wheels": len(wl.wheels),
                     "wheels_mib": wheels_mib,
                     "images": len(refs)},
        "initial": initial,
        "changes": rows,
        "targets": targets,
        # Not a target: with reuse on both sides, what the delta saves is the transfer and
        # the checking of the bytes that stayed home.
        "app_upgrade_vs_full_with_reuse": round(
            app["upgrade"]["delta"]["seconds"] / app["upgrade"]["full"]["seconds"], 4),
    }
    return bench._relative(result, work)


# ------------------------------------------------------------------------------------------
# Output


def table(r: dict[str, Any]) -> str:
    lines = ["| change | changed | full bundle | delta bundle | delta/full "
             "| upgrade, full --no-reuse | upgrade, full | upgrade, delta "
             "| delta/full --no-reuse | delta/full | delta build | RSS build/install |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["changes"]:
        u = c["upgrade"]
        lines.append(
            f"| {c['change']} | {_size(c['change_bytes'])} ({c['changed_files']} "
            f"{'layer' if c['changed_layers'] else 'file'}(s)) "
            f"| {_size(c['full']['bytes'])} | {_size(c['delta']['bytes'])} "
            f"| {c['delta']['bytes'] / c['full']['bytes']:.2%} "
            f"| {u['fresh']['seconds']:.1f} s "
            f"| {u['full']['seconds']:.1f} s | {u['delta']['seconds']:.1f} s "
            f"| {u['delta']['seconds'] / u['fresh']['seconds']:.2f}x "
            f"| {u['delta']['seconds'] / u['full']['seconds']:.2f}x "
            f"| {c['delta']['seconds']:.1f} s "
            f"| {_mib(c['delta']['peak_rss_mib'])}/{_mib(u['delta']['peak_rss_mib'])} MiB |")
    return "\n".join(lines)


def verdicts(r: dict[str, Any]) -> str:
    return "\n".join(f"{'met' if t['met'] else 'MISSED'}: {t['target']} "
                     f"(measured {t['value']:g}, bound {t['bound']:g})" for t in r["targets"])


def breakdowns(r: dict[str, Any]) -> str:
    out = []
    for c in r["changes"]:
        for kind in ("fresh", "full", "delta"):
            out.append(f"breakdown, {c['change']}, upgrade from {kind}: "
                       + bench._fmt(c["upgrade"][kind]["breakdown"]))
    return "\n".join(out)


def _size(n: int) -> str:
    return f"{n / MB:.1f} MB" if n >= 100_000 else f"{n / 1000:.1f} kB"


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a small workload (no network): for CI")
    parser.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    parser.add_argument("--out", type=Path, help="write DIR/bench-delta[-quick].json")
    parser.add_argument("--no-profile", action="store_true",
                        help="do not profile a missed upgrade-time target")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "BUNDLER_BENCH_CACHE", Path.home() / ".cache" / "bundler-bench")))
    parser.add_argument("--only", action="append", default=[], metavar="CHANGE",
                        help="run this change (repeatable; the targets' rows always run): "
                             + ", ".join(c.name for c in FULL_CHANGES))
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="work in DIR (emptied first) and leave it there afterwards")
    args = parser.parse_args()
    result = run(args.quick, args.cache, profile_runs=not args.no_profile and not args.quick,
                 only=tuple(args.only), keep=args.keep)
    bench.emit(result, args.out, "bench-delta-quick" if args.quick else "bench-delta",
               args.json, lambda r: [table(r), verdicts(r), breakdowns(r)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
