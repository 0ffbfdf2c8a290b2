#!/usr/bin/env python3
"""`make bench`: bundler against the users' manual checklist, side by side in one run (issue 12).

Workload (the full size): seed 001's Python pins (profiles/llm-webapp: 30 wheels, ~51 MB), its
npm project (12 tarballs) and three Docker images of ~100 MB sharing an 86 MB base, built
locally from a recipe (no registry) and tagged by its hash. Wheels and npm tarballs are served
by a local index and registry on 127.0.0.1 (tests/pyindex_server.py, tests/npm_registry.py),
seeded once from the real ones into the bench cache (~/.cache/bundler-bench, or
$BUNDLER_BENCH_CACHE): both pipelines download from the same local servers, so network noise
stays out of the ratios.

- manual build: `pip download` (host pip config isolated), `npm pack` of every locked package,
  `docker save` x3 (one by one, as the checklists do), `tar czf`, `sha256sum`.
- bundler build: `bundle lock` + `bundle build` from an empty cache (cold), then `bundle build`
  again (warm).
- target side, each under `unshare -n` with the images removed from the engine first:
  manual `sha256sum -c`, untar, `docker load` x3, `python3 -m venv` + `pip install --no-index
  --find-links`, `npm install --offline` of the packed tarballs; bundler `bundle install`.
- verify: bundles of two sizes (200 MiB and 1 GiB of payload) built by `bundle build`;
  throughput of bundler's streaming verification against hashlib sha256 and coreutils
  `sha256sum` over the same bytes (page cache warm), with the second core idle and busy (a CPU
  burner pinned to the last CPU), for one file and a 3-part volume set; peak RSS (VmHWM of the
  bundler process itself) of `bundle verify` and `bundle install` at both sizes.

Every ratio is printed against its target; a missed target is said so, and the JSON carries the
timing breakdown per step (bundler's own `==>` step lines, time-stamped as they arrive) and,
for missed build/install targets, a cProfile summary of a separate run (a missed warm
rebuild: "warm_profile"). `--build-only` runs just bundler's cold and warm builds and prints
them with a warm-rebuild profile: the quick loop when working on the build's speed.

    python scripts/bench.py [--quick] [--json] [--out DIR] [--chart PNG] [--no-profile]
    python scripts/bench.py --build-only [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bundler.fsutil import CHUNK  # noqa: E402
from tests.helpers import make_wheel  # noqa: E402
from tests.npm_registry import (  # noqa: E402
    LocalPackage,
    LocalRegistry,
    make_project,
    npm_env,
    sri_sha512,
)
from tests.pyindex_server import serve, write_index  # noqa: E402

SEED = REPO / "profiles" / "llm-webapp"
SEED_LOCK = REPO / "profiles" / "llm-webapp.lock"
MIB = 1024 * 1024
EPOCH = "1700000000"  # SOURCE_DATE_EPOCH: reproducible bundles, same in every run

# Issue 12's targets, never loosened: (op, bound, what).
TARGETS: dict[str, tuple[str, float, str]] = {
    "cold_build_ratio": ("<=", 0.5, "cold build (lock included) <= 0.5x manual"),
    "warm_rebuild_s": ("<=", 2.0, "warm rebuild <= 2 s"),
    "bundle_size_ratio": ("<=", 0.6, "bundle size <= 0.6x manual"),
    "target_install_ratio": ("<=", 0.3, "target install <= 0.3x manual"),
    "verify_busy_vs_sha256": (">=", 0.85, "verify >= 0.85x hashlib sha256, second core busy"),
    "volumes_busy_vs_sha256": (">=", 0.85, "volume-set verify >= 0.85x sha256, core busy"),
    "peak_rss_mib": ("<", 150.0, "peak RSS < 150 MB at every size"),
}


_T0 = time.perf_counter()


def say(text: str) -> None:
    print(f"bench [{time.perf_counter() - _T0:6.1f} s]: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# Running and timing commands


# Runs bundler's CLI and, at exit, writes the process's own peak RSS (VmHWM, KiB) to the file
# $BENCH_HWM_FILE names: ru_maxrss of a child would include uv, node, docker and the like.
_HWM = """
import atexit, os, runpy, sys
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            with open(os.environ["BENCH_HWM_FILE"], "w") as fh:
                fh.write(line.split()[1])
atexit.register(_hwm)
sys.argv = ["bundle", *sys.argv[1:]]
runpy.run_module("bundler", run_name="__main__", alter_sys=True)
"""


@dataclass
class Cmd:
    name: str
    argv: list[str]
    cwd: str | None = None
    env: dict[str, str] | None = None  # the whole environment (None: this process's)
    shell: bool = False


def bundle_cmd(name: str, *args: str | os.PathLike[str], hwm: Path | None = None) -> Cmd:
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH}
    argv = [os.fspath(a) for a in args]
    if hwm is not None:
        env["BENCH_HWM_FILE"] = str(hwm)
        return Cmd(name, [sys.executable, "-c", _HWM, *argv], env=env)
    return Cmd(name, [sys.executable, "-m", "bundler", *argv], env=env)


def run_timed(cmds: list[Cmd]) -> list[dict[str, Any]]:
    """Run commands one after another; per command: seconds, rc, the time of each `==>` step
    line bundler printed (seconds from its start), stderr's tail. What earlier runs left to
    write back is flushed first (not timed): else the second of two pipelines pays for the
    first's dirty pages (measured here: bundler's install right after the manual one's)."""
    os.sync()
    out = []
    for cmd in cmds:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=cmd.env, shell=cmd.shell,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        marks: list[tuple[float, str]] = []
        notes: list[tuple[float, str]] = []  # bundler's indented lines under a step
        tail: list[str] = []
        for line in proc.stderr:
            at = round(time.perf_counter() - start, 3)
            if line.startswith("==> "):
                marks.append((at, line[4:].strip()))
            elif line.startswith("    ") and len(notes) < 200:
                notes.append((at, line.strip()))
            tail = [*tail[-30:], line.rstrip()]
        proc.wait()
        out.append({"name": cmd.name, "seconds": time.perf_counter() - start,
                    "rc": proc.returncode, "marks": marks, "notes": notes, "tail": tail})
    return out


def run_offline(cmds: list[Cmd]) -> list[dict[str, Any]]:
    """run_timed inside ONE new network namespace (no network but loopback), as the tests'
    `offline` does: the target side of the air gap, for real. The docker socket still works."""
    spec = json.dumps([asdict(c) for c in cmds])
    done = subprocess.run(["unshare", "-n", sys.executable, __file__, "--drive", spec],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench: the unshare -n driver failed:\n{done.stderr}")
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


def drive(spec: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    print(json.dumps(run_timed([Cmd(**c) for c in json.loads(spec)])))


def judge(targets: dict[str, tuple[str, float, str]], values: dict[str, float]
          ) -> list[dict[str, Any]]:
    """Each target (metric: (op, bound, what)) with its measured value and whether it is
    met."""
    out = []
    for metric, (op, bound, what) in targets.items():
        value = values[metric]
        met = value <= bound if op == "<=" else value < bound
        out.append({"metric": metric, "target": what, "op": op, "bound": bound,
                    "value": round(value, 4), "met": bool(met)})
    return out


def emit(result: dict[str, Any], out: Path | None, name: str, as_json: bool,
         text: Callable[[dict[str, Any]], list[str]]) -> None:
    """Write `out`/`name`.json (when asked), then print the result: JSON, or `text`'s lines
    (tables, verdicts)."""
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(text(result)))


def checked(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in results:
        if r["rc"] != 0:
            tail = "\n".join(r["tail"])
            raise SystemExit(f"bench: step {r['name']!r} failed (exit {r['rc']}):\n{tail}")
    return results


def steps(results: list[dict[str, Any]]) -> dict[str, float]:
    return {r["name"]: round(r["seconds"], 3) for r in results}


def step_breakdown(result: dict[str, Any]) -> dict[str, float]:
    """Seconds per `==>` step of one bundler run (startup: before the first step line)."""
    marks = result["marks"]
    if not marks:
        return {"total": round(result["seconds"], 3)}
    out = {"(startup)": marks[0][0]}
    ends = [t for t, _ in marks[1:]] + [result["seconds"]]
    for (t, text), end in zip(marks, ends, strict=True):
        out[text] = round(out.get(text, 0.0) + end - t, 3)
    return out


def read_hwm(path: Path) -> float | None:
    try:
        return int(path.read_text()) / 1024
    except (OSError, ValueError):
        return None


def profile_summary(path: Path, top: int = 15) -> dict[str, list[dict[str, Any]]]:
    """The cProfile dump's heaviest functions: bundler's own by cumulative time (which step
    the time went to: a step waiting on uv, npm or the engine shows here), and any function by
    own time (what the process itself did: `poll` is waiting on a child)."""
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    ours = str(REPO / "bundler")
    skip = (str(REPO / "bundler" / "cli"), str(REPO / "bundler" / "__main__.py"))

    def row(key: Any, v: Any, index: int) -> dict[str, Any]:
        f, line, fn = key
        name = os.path.relpath(f, REPO) if f.startswith(ours) else Path(f).name
        return {"function": f"{name}:{line}({fn})", "seconds": round(v[index], 3),
                "calls": v[1]}

    cumulative = sorted(((k, v) for k, v in raw.items()
                         if k[0].startswith(ours) and not k[0].startswith(skip)),
                        key=lambda kv: kv[1][3], reverse=True)[:top]
    own = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {"cumulative": [row(k, v, 3) for k, v in cumulative],
            "own": [row(k, v, 2) for k, v in own]}


def profiled(cmd: Cmd, out: Path) -> Cmd:
    """The same bundler command under cProfile (a separate run: never the timed one)."""
    args = cmd.argv[3:]  # after [python, -c, _HWM] or [python, -m, bundler]
    return Cmd(cmd.name, [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "bundler",
                          *args], cwd=cmd.cwd, env=cmd.env)


@contextlib.contextmanager
def core_busy() -> Iterator[None]:
    """A CPU burner pinned to the last CPU for the duration (the 'second core busy')."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(burner.pid, {max(os.sched_getaffinity(0))})
        time.sleep(0.2)
        yield
    finally:
        burner.kill()
        burner.wait()


# ------------------------------------------------------------------------------------------
# The workload


@dataclass(frozen=True)
class ImageRecipe:
    base_mib: int
    layer_mib: int
    count: int = 3
    incompressible: float = 0.4  # the rest: 4 bits of entropy per byte (zstd/gzip ~2x)
    generator: int = 1           # bump when the generated bytes change


_TEXT = bytes(b"etaoinshrdlucmf\n"[i % 16] for i in range(256))


def _blob(seed: str, size: int, recipe: ImageRecipe) -> bytes:
    rnd = random.Random(seed)
    hard = int(size * recipe.incompressible)
    return rnd.randbytes(hard) + rnd.randbytes(size - hard).translate(_TEXT)


def _files(prefix: str, total_mib: int, recipe: ImageRecipe) -> dict[str, bytes]:
    files, left, i = {}, total_mib * MIB, 0
    while left > 0:
        n = min(left, 4 * MIB)
        files[f"{prefix}/f{i:03d}.bin"] = _blob(f"{prefix}-{i}", n, recipe)
        left, i = left - n, i + 1
    return files


def _tar(files: dict[str, bytes], links: dict[str, str] | None = None,
         executable: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        dirs = {str(p) for n in files for p in Path(n).parents if str(p) != "."}
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if name in executable else 0o644
            tf.addfile(info, io.BytesIO(data))
        for name, target in sorted((links or {}).items()):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def _busybox() -> bytes:
    for path in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if path.is_file():
            return path.read_bytes()
    raise SystemExit("bench: busybox is needed for the images (apt-get install busybox-static)")


def _has_image(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True,
                          check=False).returncode == 0


def ensure_images(recipe: ImageRecipe) -> list[str]:
    """Three images FROM one base, built without a registry: `docker import` of the base (a
    static busybox and base_mib of data), then one COPY layer of layer_mib each. Tagged by
    the recipe's hash, so the engine itself is the cache."""
    import docker  # type: ignore[import-untyped]

    busybox = _busybox()
    tag = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode()
                         + hashlib.sha256(busybox).digest()).hexdigest()[:12]
    base = f"bundler-bench/base:{tag}"
    refs = [f"bundler-bench/app{i}:{tag}" for i in range(1, recipe.count + 1)]
    if all(_has_image(r) for r in refs):
        return refs
    client = docker.from_env(timeout=600)
    data = _tar({"bin/busybox": busybox, **_files("opt/base", recipe.base_mib, recipe)},
                links={"bin/sh": "busybox"}, executable=("bin/busybox",))
    client.api.import_image_from_data(data, repository=base.split(":")[0], tag=tag)
    for i, ref in enumerate(refs, 1):
        files = _files(f"payload/app{i}", recipe.layer_mib, recipe)
        context = _tar({"Dockerfile": f"FROM {base}\nCOPY payload/ /opt/\n".encode(), **files})
        client.images.build(fileobj=io.BytesIO(context), custom_context=True, tag=ref,
                            rm=True, pull=False)
    client.close()
    return refs


def remove_images(refs: list[str]) -> None:
    """Untag the bench images so that the target side really loads their layers."""
    subprocess.run(["docker", "rmi", "-f", *refs], capture_output=True, check=False)
    base = refs[0].replace("/app1:", "/base:")
    subprocess.run(["docker", "rmi", base], capture_output=True, check=False)


@dataclass
class Workload:
    name: str
    requirements_in: str                   # the loose pins both pipelines resolve
    wheels: list[Path]                     # what the local index serves
    npm_tarballs: list[Path]               # what the local registry serves (full size)
    npm_packages: list[LocalPackage] = field(default_factory=list)  # published (quick size)
    npm_project: Path | None = None        # package.json + package-lock.json (full size)
    npm_manifest: dict[str, Any] = field(default_factory=dict)      # quick size: locked here
    images: ImageRecipe = field(default_factory=lambda: ImageRecipe(86, 14))
    verify_sizes_mib: tuple[int, ...] = (200, 1024)


def _clean_pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return env


def _seed_wheels(cache: Path) -> list[Path]:
    """The lock's 30 wheels, exactly (sha256 checked), fetched once with an isolated pip from
    pip's default index, else taken from bundler's own download cache."""
    lock = json.loads(SEED_LOCK.read_text())
    pins = lock["python"]
    dest = cache / "wheels"
    dest.mkdir(parents=True, exist_ok=True)

    def good(p: dict[str, Any]) -> bool:
        path = dest / p["file"]
        return path.is_file() and bool(
            hashlib.sha256(path.read_bytes()).hexdigest() == p["sha256"])

    missing = [p for p in pins if not good(p)]
    objects = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bundler"
    for p in missing:
        obj = objects / "objects" / p["sha256"][:2] / p["sha256"]
        if obj.is_file():
            shutil.copyfile(obj, dest / p["file"])
    missing = [p for p in pins if not good(p)]
    if missing:
        say(f"seeding {len(missing)} wheel(s) once into {dest}")
        req = dest / "pins.txt"
        req.write_text("".join(f"{p['name']}=={p['version']} --hash=sha256:{p['sha256']}\n"
                               for p in missing))
        tags = sorted({t for p in missing if not p["file"].endswith("-any.whl")
                       for t in p["file"][:-4].split("-")[-1].split(".")})
        py = lock["target"]["python"].replace(".", "")
        subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--no-deps",
                        "--only-binary", ":all:", "--python-version", lock["target"]["python"],
                        "--implementation", "cp", "--abi", f"cp{py}",
                        *[a for t in tags for a in ("--platform", t)],
                        "--require-hashes", "-r", str(req), "-d", str(dest)],
                       env=_clean_pip_env(), check=True, stdout=sys.stderr)
        req.unlink()
        bad = [p["file"] for p in pins if not good(p)]
        if bad:
            raise SystemExit(f"bench: could not seed {bad}")
    return [dest / p["file"] for p in pins]


def _seed_npm(cache: Path) -> list[Path]:
    """The seed project's locked tarballs (integrity checked), fetched once with `npm pack`
    from npm's default registry."""
    lock = json.loads((SEED / "frontend" / "package-lock.json").read_text())
    pkgs = {k.rsplit("node_modules/", 1)[1]: v for k, v in lock["packages"].items() if k}
    dest = cache / "npm"
    dest.mkdir(parents=True, exist_ok=True)

    def path(name: str, version: str) -> Path:
        return dest / f"{name.replace('@', '').replace('/', '-')}-{version}.tgz"

    def good(name: str, meta: dict[str, Any]) -> bool:
        p = path(name, meta["version"])
        return p.is_file() and sri_sha512(p.read_bytes()) == meta["integrity"]

    missing = [f"{n}@{m['version']}" for n, m in pkgs.items() if not good(n, m)]
    if missing:
        say(f"seeding {len(missing)} npm tarball(s) once into {dest}")
        env = npm_env(cache / "npm-home")
        subprocess.run(["npm", "pack", "--pack-destination", str(dest), *missing], cwd=dest,
                       env=env, check=True, capture_output=True)
        bad = [n for n, m in pkgs.items() if not good(n, m)]
        if bad:
            raise SystemExit(f"bench: npm tarballs do not match the lock: {bad}")
    return [path(n, m["version"]) for n, m in pkgs.items()]


def full_workload(cache: Path) -> Workload:
    return Workload(
        name="seed-001",
        requirements_in=(SEED / "backend" / "requirements.in").read_text(),
        wheels=_seed_wheels(cache), npm_tarballs=_seed_npm(cache),
        npm_project=SEED / "frontend")


def quick_workload(work: Path) -> Workload:
    """A few seconds: three tiny wheels, two npm packages, 4 MiB + 1 MiB images."""
    wh = work / "quick-wheels"
    wheels = [make_wheel(wh, "benchtiny-a", "1.0", {"benchtiny_a.py": "A = 1\n"},
                         requires=("benchtiny-b>=1",)),
              make_wheel(wh, "benchtiny-b", "1.2", {"benchtiny_b.py": "B = 2\n"}),
              make_wheel(wh, "benchtiny-c", "0.3", {"benchtiny_c.py": "C = 3\n"})]
    return Workload(
        name="quick", requirements_in="benchtiny-a\nbenchtiny-c\n", wheels=wheels,
        npm_tarballs=[],
        npm_packages=[LocalPackage("bench-left", "1.0.0", {"index.js": "exports.l = 1;\n"}),
                      LocalPackage("bench-right", "2.1.0", {"index.js": "exports.r = 2;\n"},
                                   {"dependencies": {"bench-left": "^1.0.0"}})],
        npm_manifest={"dependencies": {"bench-right": "^2.0.0"}},
        images=ImageRecipe(4, 1), verify_sizes_mib=(8, 32))


# ------------------------------------------------------------------------------------------
# The pipelines


@dataclass
class Setup:
    work: Path
    index_url: str
    registry: LocalRegistry
    npm_specs: list[str]    # name@version of every locked package
    refs: list[str]
    key: Path
    pub: Path
    app: Path               # the bench profile's directory


PROFILE = """\
schema: 1
name: bench
version: 1.0.0
sequence: {sequence}
target:
  python: "{python}"
  platform: manylinux_2_28_x86_64
python:
  requirements_in: backend/requirements.in
  index_url: {index}
npm:
  - project: frontend
    registry: {registry}
images:
{images}
"""


def write_profile(s: Setup, sequence: int = 1) -> Path:
    images = "".join(f"  - ref: {r}\n    source: engine\n" for r in s.refs)
    path = s.app / "bench.yaml"
    path.write_text(PROFILE.format(
        sequence=sequence, python=f"{sys.version_info[0]}.{sys.version_info[1]}",
        index=s.index_url, registry=s.registry.url, images=images))
    return path


def bundler_build(s: Setup, profile_runs: bool) -> dict[str, Any]:
    profile = write_profile(s)
    cache, out = s.work / "bundler-cache", s.work / "bundler-dist"
    lock = profile.with_suffix(".lock")
    lock.unlink(missing_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cold_cmds = [bundle_cmd("bundle lock", "lock", profile, "--cache-dir", cache),
                 bundle_cmd("bundle build", "build", profile, "--key", s.key, "--out", out,
                            "--cache-dir", cache)]
    cold = checked(run_timed(cold_cmds))
    warm = checked(run_timed([bundle_cmd(f"warm {i}", "build", profile, "--key", s.key,
                                         "--out", out, "--cache-dir", cache)
                              for i in (1, 2)]))
    [bundle] = out.glob("*.bundle")
    result: dict[str, Any] = {
        "cold_seconds": sum(r["seconds"] for r in cold), "steps": steps(cold),
        "breakdown": {r["name"]: step_breakdown(r) for r in cold},
        "warm_seconds": min(r["seconds"] for r in warm),
        "warm_runs": [round(r["seconds"], 3) for r in warm],
        "warm_breakdown": step_breakdown(min(warm, key=lambda r: r["seconds"])),
        "bundle": str(bundle), "bytes": bundle.stat().st_size}
    if profile_runs:
        shutil.rmtree(cache, ignore_errors=True)
        lock.unlink(missing_ok=True)
        dumps = [s.work / "prof-lock.out", s.work / "prof-build.out"]
        checked(run_timed([profiled(c, d) for c, d in zip(cold_cmds, dumps, strict=True)]))
        result["profile"] = {c.name: profile_summary(d)
                             for c, d in zip(cold_cmds, dumps, strict=True)}
    return result


def warm_profile(s: Setup) -> dict[str, Any]:
    """A cProfile summary of one more warm rebuild (after bundler_build: lock current, cache
    warm; a separate run, never a timed one)."""
    profile = write_profile(s)
    cache, out = s.work / "bundler-cache", s.work / "bundler-dist"
    dump = s.work / "prof-warm.out"
    checked(run_timed([profiled(bundle_cmd("warm", "build", profile, "--key", s.key,
                                           "--out", out, "--cache-dir", cache), dump)]))
    return profile_summary(dump)


def manual_build(s: Setup, wl: Workload) -> dict[str, Any]:
    stage, dist = s.work / "manual-stage", s.work / "manual-dist"
    for d in (stage, dist):
        shutil.rmtree(d, ignore_errors=True)
    for d in (stage / "packages", stage / "npm", stage / "images", dist):
        d.mkdir(parents=True)
    (stage / "requirements.in").write_text(wl.requirements_in)
    home = s.work / "manual-npm-home"
    shutil.rmtree(home, ignore_errors=True)
    cmds = [
        Cmd("pip download", [sys.executable, "-m", "pip", "download", "--isolated",
                             "--no-cache-dir", "--index-url", s.index_url,
                             "-r", str(stage / "requirements.in"),
                             "-d", str(stage / "packages")], env=_clean_pip_env()),
        Cmd("npm pack", ["npm", "pack", "--registry", s.registry.url, "--pack-destination",
                         str(stage / "npm"), *s.npm_specs], cwd=str(stage), env=npm_env(home)),
        *[Cmd(f"docker save {i}", ["docker", "save", "-o",
                                   str(stage / "images" / f"app{i}.tar"), ref])
          for i, ref in enumerate(s.refs, 1)],
        Cmd("tar czf", ["tar", "czf", str(dist / "release.tar.gz"), "-C", str(stage), "."]),
        Cmd("sha256sum", ["sh", "-c", "sha256sum release.tar.gz > release.tar.gz.sha256"],
            cwd=str(dist)),
    ]
    res = checked(run_timed(cmds))
    shutil.rmtree(stage)
    return {"seconds": sum(r["seconds"] for r in res), "steps": steps(res),
            "bytes": (dist / "release.tar.gz").stat().st_size,
            "archive": str(dist / "release.tar.gz")}


def manual_install(s: Setup, archive: Path) -> dict[str, Any]:
    target = s.work / "manual-target"
    shutil.rmtree(target, ignore_errors=True)
    (target / "app").mkdir(parents=True)
    (target / "release").mkdir()
    (target / "app" / "package.json").write_text(
        '{"name": "app", "version": "1.0.0", "private": true}\n')
    rel = target / "release"
    remove_images(s.refs)
    home = target / "npm-home"
    npm_cmd = ("npm install --offline --no-audit --no-fund --no-save "
               f"{rel}/npm/*.tgz")
    cmds = [
        Cmd("sha256sum -c", ["sha256sum", "-c", "release.tar.gz.sha256"],
            cwd=str(archive.parent)),
        Cmd("tar xzf", ["tar", "xzf", str(archive), "-C", str(rel)]),
        *[Cmd(f"docker load {i}", ["docker", "load", "-i", str(rel / "images" / f"app{i}.tar")])
          for i in range(1, len(s.refs) + 1)],
        Cmd("python3 -m venv", ["python3", "-m", "venv", str(target / "venv")],
            env=_clean_pip_env()),
        Cmd("pip install", [str(target / "venv" / "bin" / "pip"), "install", "--isolated",
                            "--no-index", "--find-links", str(rel / "packages"),
                            "-r", str(rel / "requirements.in")], env=_clean_pip_env()),
        Cmd("npm install", ["sh", "-c", npm_cmd], cwd=str(target / "app"), env=npm_env(home)),
    ]
    res = checked(run_offline(cmds))
    shutil.rmtree(target)
    return {"seconds": sum(r["seconds"] for r in res), "steps": steps(res)}


def bundler_install(s: Setup, bundle: Path, profile_runs: bool) -> dict[str, Any]:
    root, hwm = s.work / "bundler-target", s.work / "install.hwm"
    shutil.rmtree(root, ignore_errors=True)
    remove_images(s.refs)
    cmd = bundle_cmd("bundle install", "install", bundle, "--trust", s.pub, "--root", root,
                     hwm=hwm)
    [res] = checked(run_offline([cmd]))
    result: dict[str, Any] = {"seconds": res["seconds"], "breakdown": step_breakdown(res),
                              "peak_rss_mib": read_hwm(hwm)}
    if profile_runs:
        shutil.rmtree(root, ignore_errors=True)
        remove_images(s.refs)
        dump = s.work / "prof-install.out"
        checked(run_offline([profiled(cmd, dump)]))
        result["profile"] = profile_summary(dump)
    shutil.rmtree(root, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------
# Verification: throughput and memory at two sizes


def _best(n: int, *fns: Callable[[], object]) -> list[float]:
    """Best of n runs of each function, run in turns (a, b, a, b, ...) so that a change in the
    machine's load during the measurement hits every function alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [min(t) for t in times]


def _hashlib(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)


def _verify(path: Path, pub: Path) -> None:
    from bundler.bundle import archive
    from bundler.bundle.signing import load_public_key

    with archive.open_bundle(path, [load_public_key(pub)]) as reader:
        reader.read_envelope()
        reader.extract(None)


def _split(path: Path, key: Path, parts: int) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bundler.bundle import volumes

    out = path.with_name("vol.bundle")
    index = volumes.split_file(path, out, path.stat().st_size // parts + 1)
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    volumes.write_index(out, index, private)
    return volumes.index_path(out)


def sized_bundle(s: Setup, mib: int) -> Path:
    """A bundle of `mib` MiB of payload (incompressible, 8 files), made by `bundle build`."""
    d = s.work / f"sized-{mib}"
    shutil.rmtree(d, ignore_errors=True)
    (d / "payload").mkdir(parents=True)
    rnd = random.Random(mib)
    per = mib * MIB // 8
    for i in range(8):
        with open(d / "payload" / f"p{i}.bin", "wb") as fh:
            left = per
            while left:
                n = min(left, 16 * MIB)
                fh.write(rnd.randbytes(n))
                left -= n
    (d / "sized.yaml").write_text(
        f"schema: 1\nname: sized\nversion: {mib}.0.0\nsequence: {mib}\n"
        f'target:\n  python: "{sys.version_info[0]}.{sys.version_info[1]}"\n'
        "  platform: manylinux_2_28_x86_64\nfiles:\n  - src: payload\n    dest: data\n")
    checked(run_timed([bundle_cmd("build", "build", d / "sized.yaml", "--key", s.key,
                                  "--out", d / "dist", "--cache-dir", d / "cache")]))
    shutil.rmtree(d / "payload")
    shutil.rmtree(d / "cache")
    [bundle] = (d / "dist").glob("*.bundle")
    return bundle


def bench_verify(s: Setup, sizes: tuple[int, ...]) -> dict[str, Any]:
    rss: dict[str, dict[str, float | None]] = {"verify": {}, "install": {}}
    cli: dict[str, float] = {}
    bundles = {}
    for mib in sizes:
        bundle = bundles[mib] = sized_bundle(s, mib)
        vh, ih = s.work / f"verify-{mib}.hwm", s.work / f"install-{mib}.hwm"
        root = s.work / f"sized-root-{mib}"
        [v] = checked(run_timed([bundle_cmd("verify", "verify", bundle, "--trust", s.pub,
                                            "--root", root, hwm=vh)]))
        checked(run_offline([bundle_cmd("install", "install", bundle, "--trust", s.pub,
                                        "--root", root, hwm=ih)]))
        shutil.rmtree(root)
        rss["verify"][f"{mib} MiB"] = read_hwm(vh)
        rss["install"][f"{mib} MiB"] = read_hwm(ih)
        cli[f"{mib} MiB"] = round(bundle.stat().st_size / MIB / v["seconds"], 1)
    big = bundles[max(sizes)]
    for b in bundles.values():
        if b != big:
            shutil.rmtree(b.parent.parent)
    nbytes = big.stat().st_size
    mb = nbytes / MIB

    def sha256sum() -> None:
        subprocess.run(["sha256sum", str(big)], capture_output=True, check=True)

    index = _split(big, s.key, parts=3)
    vol_parts = sorted(index.parent.glob("vol.bundle.0*"))
    _hashlib(big)
    _verify(index, s.pub)  # both in the page cache now
    t: dict[str, float] = {}
    t["hashlib"], t["sha256sum"], t["verify"], t["volumes"] = _best(
        3, lambda: _hashlib(big), sha256sum, lambda: _verify(big, s.pub),
        lambda: _verify(index, s.pub))
    with core_busy():
        t["hashlib_busy"], t["verify_busy"], t["volumes_busy"] = _best(
            3, lambda: _hashlib(big), lambda: _verify(big, s.pub),
            lambda: _verify(index, s.pub))
    # the baseline is the faster of hashlib's two runs: a busy core can never flatter verify
    base = min(t["hashlib"], t["hashlib_busy"])
    result: dict[str, Any] = {
        "bundle_mib": round(mb, 1),
        "mib_s": {k: round(mb / v, 1) for k, v in t.items()},
        "cli_verify_mib_s": cli,
        "verify_vs_sha256": t["hashlib"] / t["verify"],
        "verify_busy_vs_sha256": base / t["verify_busy"],
        "volumes_vs_sha256": t["hashlib"] / t["volumes"],
        "volumes_busy_vs_sha256": base / t["volumes_busy"],
        "verify_vs_sha256sum": t["sha256sum"] / t["verify"],
        "peak_rss_mib": rss,
    }
    worst = min(("verify_busy", "volumes_busy"), key=lambda k: base / t[k])
    if base / t[worst] < TARGETS["verify_busy_vs_sha256"][1]:
        path = index if worst == "volumes_busy" else big
        prof = cProfile.Profile()
        with core_busy():
            prof.enable()
            _verify(path, s.pub)
            prof.disable()
        dump = s.work / "prof-verify.out"
        prof.dump_stats(str(dump))
        result["profile"] = {worst: profile_summary(dump)}
    for p in [*vol_parts, index]:
        p.unlink()
    shutil.rmtree(big.parent.parent)
    return result


# ------------------------------------------------------------------------------------------
# One run


@contextlib.contextmanager
def servers(work: Path, wl: Workload) -> Iterator[tuple[str, LocalRegistry, list[str]]]:
    index_root = work / "index"
    write_index(wl.wheels, index_root)
    (work / "registry").mkdir()
    registry = LocalRegistry(work / "registry")
    try:
        for tgz in wl.npm_tarballs:
            registry.serve_tarball(tgz.read_bytes())
        published = registry.publish(*wl.npm_packages) if wl.npm_packages else []
        specs = [f"{p.name}@{p.version}" for p in published]
        for tgz in wl.npm_tarballs:
            with tarfile.open(tgz) as tf:
                fh = tf.extractfile("package/package.json")
                assert fh is not None
                meta = json.loads(fh.read())
            specs.append(f"{meta['name']}@{meta['version']}")
        with serve(index_root) as url:
            yield url, registry, specs
    finally:
        registry.close()


def make_keys(work: Path) -> tuple[Path, Path]:
    checked(run_timed([bundle_cmd("keygen", "keygen", work / "bench")]))
    return work / "bench.key", work / "bench.pub"


def run(quick: bool, cache: Path, profile_runs: bool, build_only: bool = False
        ) -> dict[str, Any]:
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bundler-bench-") as tmp:
        work = Path(tmp)
        wl = quick_workload(work) if quick else full_workload(cache)
        refs = ensure_images(wl.images)
        key, pub = make_keys(work)
        with servers(work, wl) as (index_url, registry, specs):
            app = work / "app"
            (app / "backend").mkdir(parents=True)
            (app / "backend" / "requirements.in").write_text(wl.requirements_in)
            if wl.npm_project is not None:
                shutil.copytree(wl.npm_project, app / "frontend",
                                ignore=shutil.ignore_patterns("node_modules"))
            else:
                make_project(app / "frontend", registry, wl.npm_manifest)
            s = Setup(work, index_url, registry, specs, refs, key, pub, app)
            if build_only:
                say("bundler build (cold, warm), then a profiled warm rebuild")
                bundler = bundler_build(s, profile_runs=False)
                bundler["warm_profile"] = warm_profile(s)
                return _relative(bundler, work)
            say("manual build")
            manual = manual_build(s, wl)
            say("bundler build (cold, warm)")
            bundler = bundler_build(s, profile_runs=False)
            if profile_runs and bundler["warm_seconds"] > TARGETS["warm_rebuild_s"][1]:
                say("warm rebuild missed its target: profiling it")
                bundler["warm_profile"] = warm_profile(s)
            say("target installs (unshare -n)")
            m_inst = manual_install(s, Path(manual["archive"]))
            b_inst = bundler_install(s, Path(bundler["bundle"]), profile_runs=False)
            ratios = {
                "cold_build_ratio": bundler["cold_seconds"] / manual["seconds"],
                "bundle_size_ratio": bundler["bytes"] / manual["bytes"],
                "target_install_ratio": b_inst["seconds"] / m_inst["seconds"],
            }
            if profile_runs and ratios["cold_build_ratio"] > TARGETS["cold_build_ratio"][1]:
                say("cold build missed its target: profiling it")
                bundler["profile"] = bundler_build(s, profile_runs=True)["profile"]
            if profile_runs and (ratios["target_install_ratio"]
                                 > TARGETS["target_install_ratio"][1]):
                say("target install missed its target: profiling it")
                b_inst["profile"] = bundler_install(s, Path(bundler["bundle"]),
                                                    profile_runs=True)["profile"]
        say("verify throughput and peak RSS")
        verify = bench_verify(s, wl.verify_sizes_mib)
        wheels_mib = round(sum(w.stat().st_size for w in wl.wheels) / MIB, 1)
    rss_all = [v for kind in verify["peak_rss_mib"].values() for v in kind.values()
               if v is not None]
    if b_inst["peak_rss_mib"] is not None:
        rss_all.append(b_inst["peak_rss_mib"])
    ratios.update({
        "verify_vs_sha256": verify["verify_vs_sha256"],
        "verify_busy_vs_sha256": verify["verify_busy_vs_sha256"],
        "volumes_busy_vs_sha256": verify["volumes_busy_vs_sha256"],
        "verify_vs_sha256sum": verify["verify_vs_sha256sum"],
    })
    values = {**ratios, "warm_rebuild_s": bundler["warm_seconds"],
              "peak_rss_mib": max(rss_all) if rss_all else float("nan")}
    targets = []
    for metric, (op, bound, what) in TARGETS.items():
        value = values[metric]
        met = value <= bound if op == "<=" else value >= bound if op == ">=" else value < bound
        targets.append({"metric": metric, "target": what, "op": op, "bound": bound,
                        "value": round(value, 3), "met": bool(met)})
    image_mib = wl.images.base_mib + wl.images.layer_mib
    result = {
        "bench": {"schema": 1, "quick": quick, "date": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  "seconds": round(time.time() - started, 1),
                  "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "machine": platform.machine(), "docker": _docker_version(),
                           # other processes on the host share the cores: say how busy
                           "loadavg_1_5_15": {"start": load_before, "end": os.getloadavg()}}},
        "workload": {"name": wl.name, "wheels": len(wl.wheels),
                     "wheels_mib": wheels_mib,
                     "npm_packages": len(s.npm_specs),
                     "images": len(refs), "image_mib": image_mib,
                     "shared_base_mib": wl.images.base_mib},
        "build": {"manual": {k: v for k, v in manual.items() if k != "archive"},
                  "bundler": {k: v for k, v in bundler.items() if k != "bundle"}},
        "install": {"manual": m_inst, "bundler": b_inst},
        "verify": verify,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": targets,
    }
    return _relative(result, work)


def _relative(result: dict[str, Any], work: Path) -> dict[str, Any]:
    """The run's temp dir means nothing afterwards (it shows in bundler's step lines)."""
    loaded: dict[str, Any] = json.loads(json.dumps(result).replace(str(work), "$WORK"))
    return loaded


def _docker_version() -> str:
    done = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip()


# ------------------------------------------------------------------------------------------
# Output


def table(r: dict[str, Any]) -> str:
    b, i, v = r["build"], r["install"], r["verify"]
    mib = v["mib_s"]
    rows = [
        ("cold build (lock incl.)", f"{b['manual']['seconds']:.1f} s",
         f"{b['bundler']['cold_seconds']:.1f} s", r["ratios"]["cold_build_ratio"],
         "cold_build_ratio"),
        ("warm rebuild", "-", f"{b['bundler']['warm_seconds']:.2f} s", None, "warm_rebuild_s"),
        ("bundle size", f"{b['manual']['bytes'] / 1e6:.0f} MB",
         f"{b['bundler']['bytes'] / 1e6:.0f} MB", r["ratios"]["bundle_size_ratio"],
         "bundle_size_ratio"),
        ("target install (verify+images+pkgs)", f"{i['manual']['seconds']:.1f} s",
         f"{i['bundler']['seconds']:.1f} s", r["ratios"]["target_install_ratio"],
         "target_install_ratio"),
        ("verify vs hashlib sha256", f"{mib['hashlib']:.0f} MB/s", f"{mib['verify']:.0f} MB/s",
         r["ratios"]["verify_vs_sha256"], None),
        ("verify vs sha256sum", f"{mib['sha256sum']:.0f} MB/s", f"{mib['verify']:.0f} MB/s",
         r["ratios"]["verify_vs_sha256sum"], None),
        ("verify, 2nd core busy", f"{max(mib['hashlib'], mib['hashlib_busy']):.0f} MB/s",
         f"{mib['verify_busy']:.0f} MB/s", r["ratios"]["verify_busy_vs_sha256"],
         "verify_busy_vs_sha256"),
        ("volume set verify, core busy", f"{max(mib['hashlib'], mib['hashlib_busy']):.0f} MB/s",
         f"{mib['volumes_busy']:.0f} MB/s", r["ratios"]["volumes_busy_vs_sha256"],
         "volumes_busy_vs_sha256"),
    ]
    rss = v["peak_rss_mib"]
    rss_text = ", ".join(f"{kind} {size} {val:.0f}" for kind, sizes in rss.items()
                         for size, val in sizes.items() if val is not None)
    if i["bundler"]["peak_rss_mib"] is not None:
        rss_text += f", install workload {i['bundler']['peak_rss_mib']:.0f}"
    status = {t["metric"]: t for t in r["targets"]}
    lines = ["| measure | baseline | bundler | ratio | target |", "|---|---|---|---|---|"]

    def verdict(metric: str | None) -> str:
        if metric is None:
            return ""
        t = status[metric]
        return f"{t['op']} {t['bound']:g}: {'met' if t['met'] else '**MISSED**'}"

    for name, base, ours, ratio, metric in rows:
        lines.append(f"| {name} | {base} | {ours} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} | {verdict(metric)} |")
    lines.append(f"| peak RSS, MiB ({rss_text}) | - | "
                 f"{status['peak_rss_mib']['value']:.0f} MiB max | | "
                 f"{verdict('peak_rss_mib')} |")
    return "\n".join(lines)


def missed_notes(r: dict[str, Any]) -> str:
    out = []
    for t in r["targets"]:
        if not t["met"]:
            out.append(f"MISSED: {t['target']} (measured {t['value']:g})")
    b, i = r["build"], r["install"]
    out.append("breakdown, manual build: " + _fmt(b["manual"]["steps"]))
    for name, bd in b["bundler"]["breakdown"].items():
        out.append(f"breakdown, {name}: " + _fmt(bd))
    out.append("breakdown, warm rebuild: " + _fmt(b["bundler"]["warm_breakdown"]))
    out.append("breakdown, manual install: " + _fmt(i["manual"]["steps"]))
    out.append("breakdown, bundle install: " + _fmt(i["bundler"]["breakdown"]))
    return "\n".join(out)


def _fmt(d: dict[str, float]) -> str:
    return "; ".join(f"{k} {v:.2f} s" for k, v in d.items())


def chart(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10.5), height_ratios=(1.25, 1))
    fig.suptitle(f"bundler vs the manual checklist ({r['workload']['name']}, "
                 f"{r['bench']['date'][:10]}, {r['bench']['host']['cpus']} cores)", fontsize=13)
    b, i = r["build"], r["install"]

    ax = axes[0][0]
    cold: dict[str, float] = {}
    for bd in b["bundler"]["breakdown"].values():  # lock, then build
        for k, v in bd.items():
            cold[_short(k)] = cold.get(_short(k), 0.0) + v
    bars = {"build, manual": b["manual"]["steps"],
            "build, bundler (cold)": cold,
            "rebuild, bundler (warm)": {_short(k): v
                                        for k, v in b["bundler"]["warm_breakdown"].items()},
            "install, manual": i["manual"]["steps"],
            "install, bundler": {_short(k): v for k, v in i["bundler"]["breakdown"].items()}}
    cmap = matplotlib.colormaps["tab20"]
    palette: dict[str, Any] = {}
    names = list(bars)
    xmax = max(sum(v.values()) for v in bars.values())
    for y, label in enumerate(names):
        left = 0.0
        for step, secs in bars[label].items():
            ax.barh(y, secs, left=left, color=palette.setdefault(
                step.rstrip(" 0123456789"), cmap(len(palette) % 20)),
                edgecolor="white")
            if secs > 0.12 * xmax:
                ax.text(left + secs / 2, y, step, ha="center", va="center", fontsize=7)
            left += secs
        ax.text(left + 0.01 * xmax, y, f"{left:.1f} s", va="center", fontsize=9)
    ax.set_xlim(0, xmax * 1.12)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (stacked by step; bundler's from its own step lines)")
    ax.set_title("Wall time, same workload, same run")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=n) for n, c in palette.items()], fontsize=7,
              ncol=4, loc="upper center", bbox_to_anchor=(0.45, -0.13), frameon=False)

    ax = axes[0][1]
    sizes = [b["manual"]["bytes"] / 1e6, b["bundler"]["bytes"] / 1e6]
    ax.bar(["manual (tar czf)", "bundler"], sizes, color=["#999999", "#1f77b4"])
    for x, v in enumerate(sizes):
        ax.text(x, v, f"{v:.0f} MB", ha="center", va="bottom")
    ax.set_ylabel("MB")
    ax.set_title("What goes on the stick")

    ax = axes[1][0]
    mib = r["verify"]["mib_s"]
    keys = ["sha256sum", "hashlib", "verify", "volumes", "hashlib_busy", "verify_busy",
            "volumes_busy"]
    labels = ["sha256sum", "hashlib\nsha256", "bundler\nverify", "volume\nset", "hashlib\n(busy)",
              "verify\n(busy)", "volumes\n(busy)"]
    cols = ["#999999", "#999999", "#1f77b4", "#1f77b4", "#bbbbbb", "#ff7f0e", "#ff7f0e"]
    ax.bar(labels, [mib[k] for k in keys], color=cols)
    for x, k in enumerate(keys):
        ax.text(x, mib[k], f"{mib[k]:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MiB/s")
    ax.set_title(f"Verify throughput ({r['verify']['bundle_mib']:.0f} MiB bundle, page cache; "
                 "busy = 2nd core burning)", fontsize=10)

    ax = axes[1][1]
    ts = r["targets"]
    # how far from the target: >1 means met (value/bound or bound/value)
    score = [(t["bound"] / t["value"] if t["op"] in ("<=", "<") else t["value"] / t["bound"])
             if t["value"] else 0.0 for t in ts]
    ax.barh(range(len(ts)), score, color=["#2ca02c" if t["met"] else "#d62728" for t in ts])
    ax.axvline(1.0, color="black", linewidth=1)
    for y, t in enumerate(ts):
        ax.text(0.02, y, f"{t['target']}: {t['value']:g}", va="center", fontsize=8)
    ax.set_yticks([])
    ax.invert_yaxis()
    ax.set_xlabel("headroom: >1 met (green), <1 missed (red)")
    ax.set_title("Issue 12's targets")

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(step: str) -> str:
    """A chart label for one of bundler's step lines: its first words, no paths."""
    words = [w for w in step.split() if "/" not in w and "$" not in w][:3]
    return step if step.startswith("(") else " ".join(words)[:26]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a small workload (seconds, no network): for CI")
    parser.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    parser.add_argument("--out", type=Path, help="write DIR/bench-{full,quick}.json (+ .png)")
    parser.add_argument("--chart", type=Path, help="write a PNG chart here")
    parser.add_argument("--no-profile", action="store_true",
                        help="do not profile missed targets (saves a cold build and install)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "BUNDLER_BENCH_CACHE", Path.home() / ".cache" / "bundler-bench")))
    parser.add_argument("--chart-from", type=Path, metavar="JSON",
                        help="only draw --chart from an earlier run's JSON")
    parser.add_argument("--build-only", action="store_true",
                        help="only bundler's cold and warm builds and a cProfile summary of "
                             "one more warm rebuild (JSON on stdout; nothing written)")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args.drive)
        return 0
    if args.chart_from:
        chart(json.loads(args.chart_from.read_text()), args.chart or
              args.chart_from.with_suffix(".png"))
        return 0
    if args.build_only:
        print(json.dumps(run(args.quick, args.cache, False, build_only=True), indent=2))
        return 0
    result = run(args.quick, args.cache, profile_runs=not args.no_profile and not args.quick)
    name = "bench-quick" if args.quick else "bench-full"
    emit(result, args.out, name, args.json, lambda r: [table(r), missed_notes(r)])
    if args.out:
        chart(result, args.out / f"{name}.png")
    if args.chart:
        chart(result, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
