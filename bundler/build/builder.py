"""`bundle build`: profile → resolved, cached artifacts → signed manifest → bundle file."""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler import __version__, ui
from bundler.build import actions, delta, lockfile, vulngate
from bundler.build.cache import Cache
from bundler.build.lockfile import Lock
from bundler.build.profile import Profile
from bundler.build.resolve import compose as compose_check
from bundler.build.resolve import files as files_resolver
from bundler.build.resolve import images, npm, npm_tree, prisma, runtimes, wheels
from bundler.build.sbom import make as sbom_make
from bundler.bundle import archive, nodetree, volumes
from bundler.bundle.imageref import canonical_tag
from bundler.bundle.manifest import IMAGES_PATH, SBOM_PATH, VULNS_PATH, FileEntry, Manifest
from bundler.bundle.models import ImageRef, NpmProject, NpmRef, Target
from bundler.bundle.signing import MAX_ENVELOPE_BYTES, key_id, sign
from bundler.engine import engine_client, local_image_ids
from bundler.errors import BuildError, BundlerError
from bundler.fsutil import require_space


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Manifest
    size: int
    keyid: str
    parts: tuple[Path, ...]  # the volume files, when split
    locked: bool             # resolution ran (no current lock) and bundle.lock was written
    fetched: int             # artifacts downloaded by this build (0: the cache had all)
    warnings: tuple[str, ...] = ()
    against: delta.HostHas | None = None  # a delta bundle: what the host was taken to have
    images: delta.ImagesPlan | None = None  # a delta with images: how they travel
    vulns: dict[str, object] | None = None  # the gate's record (sbom/vulns.json), if it ran


def build_time() -> int:
    """SOURCE_DATE_EPOCH when set (reproducible builds), else now."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return int(time.time())
    if not value.isdigit():
        raise BuildError(f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds",
                         hint="unset it, or set it to e.g. $(git log -1 --format=%ct)")
    return int(value)


def rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def lock(profile: Profile, cache: Cache, path: Path | None = None) -> tuple[Lock, int]:
    """Resolve everything for the target and write the lock; return it and the fetch count.

    Meanwhile the npm projects' tarballs are fetched and their node_modules pre-built into the
    cache (they depend on their package-lock.json, not on this lock): the build after a lock
    finds them there instead of doing that work alone."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="npm-ahead") as pool:
        ahead = pool.submit(_npm_ahead, profile, cache) if profile.npm else None
        result, fetched = _lock(profile, cache, path)
        if ahead is not None:
            fetched += ahead.result()
    return result, fetched


def _npm_ahead(profile: Profile, cache: Cache) -> int:
    """A warm-up only (the tarballs it downloaded): whatever fails here, the build does
    again and reports."""
    try:
        return _npm(profile, cache, [], {}, _check_prisma(profile))[1]
    except BundlerError as exc:
        ui.note(f"npm packages not fetched ahead ({exc.message.splitlines()[0]}); the build "
                "fetches them")
        return 0


def _lock(profile: Profile, cache: Cache, path: Path | None) -> tuple[Lock, int]:
    locked_wheels: tuple[wheels.LockedWheel, ...] = ()
    if profile.python is not None:
        ui.step(f"Resolving Python requirements for CPython {profile.target.python} on "
                f"{profile.target.platform}")
        locked_wheels = wheels.resolve(profile.python, profile.target, cache, ui.note)
    locked_runtimes = None
    if profile.runtimes is not None:
        ui.step(f"Resolving the Node.js runtime {profile.runtimes.node} for "
                f"{profile.target.platform}")
        locked_runtimes = runtimes.resolve(profile.runtimes, profile.target.tag, ui.note)
    result = Lock(inputs=lockfile.inputs_digest(profile), target=profile.target,
                  wheels=locked_wheels, sources=lockfile.sources_of(profile),
                  runtimes=locked_runtimes)
    fetched = len(locked_wheels)
    if profile.images:
        result = _fetch_images(profile, cache, result)
        fetched += 1
    lockfile.write(path or lockfile.default_path(profile), result)
    return result, fetched


def image_platform(target: Target) -> str:
    return target.tag.docker_platform


def _fetch_images(profile: Profile, cache: Cache, current: Lock) -> Lock:
    ui.step(f"Saving {len(profile.images)} image(s) into one archive (shared layers once)")
    specs = [images.ImageSpec(ref=i.ref, source=i.source, archive=i.archive,
                              platform=image_platform(profile.target), tls_verify=i.tls_verify)
             for i in profile.images]
    got = images.fetch(specs, cache, ui.note)
    return dataclasses.replace(
        current, images=tuple(ImageRef(r.ref, r.image_id) for r in got.images),
        images_archive=(got.sha256, got.size))


def _images_current(profile: Profile, current: Lock, cache: Cache) -> bool:
    """The locked archive is cached and every engine image still has the locked Image ID
    (a local `docker build` since the lock would otherwise go unnoticed)."""
    if current.images_archive is None or not cache.has(current.images_archive[0]):
        return False
    engine = [i.ref for i in profile.images if i.source == "engine"]
    if not engine:
        return True
    now = local_image_ids(engine)
    if now is None:
        client = engine_client(BuildError)
        now = {ref: str(client.api.inspect_image(ref)["Id"]) for ref in engine}
    locked = {i.ref: i.image_id for i in current.images}
    return all(locked.get(canonical_tag(ref)) == now[ref] for ref in engine)


def build(profile: Profile, key: Ed25519PrivateKey, out_dir: Path, cache: Cache,
          sequence: int | None = None, part_size: int | None = None,
          lock_path: Path | None = None, frozen: bool = False,
          against: delta.HostHas | None = None,
          vulns: vulngate.Gate | None = None) -> BuildResult:
    # A delta's thin image archive is written here, packed, then removed.
    thin_file = out_dir / f".{profile.name}-{profile.version}.images.thin"
    try:
        return _build(profile, key, out_dir, cache, sequence, part_size, lock_path, frozen,
                      against, thin_file, vulns)
    finally:
        thin_file.unlink(missing_ok=True)


def _build(profile: Profile, key: Ed25519PrivateKey, out_dir: Path, cache: Cache,
           sequence: int | None, part_size: int | None, lock_path: Path | None, frozen: bool,
           against: delta.HostHas | None, thin_file: Path,
           vulns: vulngate.Gate | None = None) -> BuildResult:
    created = build_time()
    harmless = _check_prisma(profile)  # before the actions: a refusal should come at once
    actions.run_all(profile.actions)
    entries: list[FileEntry] = []
    sources: dict[str, Path] = {}
    lock_file = lock_path or lockfile.default_path(profile)
    current = lockfile.load_current(profile, lock_file)
    fetched = 0
    relocked = current is None
    if current is None:
        if frozen:
            raise BuildError(f"{lock_file} is missing or out of date with the profile",
                             hint="run `bundle lock PROFILE` and commit the lock file")
        current, fetched = lock(profile, cache, lock_file)
        ui.note(f"wrote {lock_file}")
    else:
        ui.step(f"Using {lock_file} (up to date: nothing to resolve)")
        if profile.images and not _images_current(profile, current, cache):
            if frozen:
                raise BuildError(f"the images in {lock_file} are not the engine's current ones "
                                 "or not cached", hint="run `bundle lock PROFILE`")
            current = _fetch_images(profile, cache, current)
            lockfile.write(lock_file, current)
            fetched += 1
    lock_path_in_bundle = None
    if profile.python is not None:
        got, n = wheels.materialize(current.wheels, profile.python, profile.target, cache,
                                    ui.note)
        fetched += n
        entries += [*got.entries, got.lock]
        sources.update(got.sources)
        lock_path_in_bundle = got.lock.path
    if current.images_archive is not None:
        sha, size = current.images_archive
        entries.append(FileEntry(IMAGES_PATH, size, sha, "images"))
        sources[IMAGES_PATH] = cache.path(sha)
    npm_projects, npm_fetched, warnings = _npm(profile, cache, entries, sources, harmless)
    fetched += npm_fetched
    node_runtime = None
    if profile.runtimes is not None and current.runtimes is not None:
        ui.step(f"Fetching the Node.js runtime ({current.runtimes[0].name}@"
                f"{current.runtimes[0].version}, npm@{current.runtimes[1].version})")
        node_runtime, runtime_files, n = runtimes.fetch(current.runtimes, profile.runtimes,
                                                        cache, ui.note)
        fetched += n
        for entry in runtime_files:
            entries.append(entry)
            sources[entry.path] = cache.path(entry.sha256)
    if profile.files:
        ui.step("Collecting files")
        collected = files_resolver.collect(profile.files, cache)
        entries += collected.entries
        sources.update(collected.sources)
    runtime = profile.runtime
    compose = runtime.compose
    if compose is not None:
        listed = {e.path for e in entries}
        missing = [f for f in compose.files if f"files/{f}" not in listed]
        if missing:
            raise BuildError(f"compose file {missing[0]} is not among the bundled files",
                             hint="add it under `files:` (its dest is the path compose.files "
                                  "names)")
        facts = compose_check.inspect([(f, sources[f"files/{f}"]) for f in compose.files])
        needed = [(m.service, f"migration {m.name}") for m in runtime.migrations if m.service]
        for spec in runtime.all_databases():
            if spec.compose_service:
                needed.append((spec.compose_service, "databases.compose_service"
                               if spec.name else "database.compose_service"))
        compose_check.check(facts, [i.ref for i in profile.images], needed)
        runtime = dataclasses.replace(
            runtime, compose=dataclasses.replace(compose, ports=facts.ports, host=facts.host))
    expires = None
    if profile.expires_ms is not None:
        expires = rfc3339(created + profile.expires_ms // 1000)
    # Monotonic by default: the build time. Explicit values win (CLI, then profile).
    sequence = sequence or profile.sequence or created
    entries.append(_sbom(sbom_make.Release(
        profile.name, profile.version, sequence, created, tuple(entries), dict(sources),
        npm_projects, node_runtime, current.images,
        cache.path(current.images_archive[0]) if current.images_archive else None,
        current.images_archive[0] if current.images_archive else "", cache.root / "sbom-scan"),
        cache, sources))
    vulns_doc = _vulns(vulns, entries[-1], cache, entries, sources) if vulns else None
    if against is not None:
        delta.check_fits(against, profile.name, sequence)
        ui.note(against.note)
        entries = delta.mark(entries, current.images, against)
    images_plan = None
    if against is not None and current.images_archive is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        at = next(i for i, e in enumerate(entries) if e.kind == "images")
        entries[at], sources[IMAGES_PATH], images_plan = delta.thin_images(
            entries[at], sources[IMAGES_PATH], against, thin_file)
        ui.note(images_plan.note)
    manifest = Manifest(
        name=profile.name,
        version=profile.version,
        sequence=sequence,
        created=rfc3339(created),
        expires=expires,
        builder=f"bundler {__version__}",
        target=profile.target,
        files=tuple(sorted(entries, key=lambda e: e.path)),
        python_lock=lock_path_in_bundle,
        npm=npm_projects,
        images=current.images,
        runtimes=node_runtime,
        runtime=runtime,
    )
    envelope = sign(manifest, key)
    if len(envelope) > MAX_ENVELOPE_BYTES:  # every target would refuse it: refuse it here
        raise BuildError(f"the signed manifest of {len(entries)} files is {len(envelope)} "
                         f"bytes, over the {MAX_ENVELOPE_BYTES} byte envelope limit",
                         hint="bundle fewer, larger files (e.g. pack a directory of many small "
                              "files into one archive), or split the release in two")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{profile.name}-{profile.version}.bundle"
    total = manifest.travel_size
    require_space(out_dir, total + len(envelope) + 1024 * 1024, "writing the bundle")
    packed = manifest.travelling
    ui.step(f"Packing {len(packed)} file(s) into {out}"
            + (f" ({len(manifest.from_host)} left to the host)" if manifest.from_host else "")
            + (f" in volumes of at most {part_size} bytes" if part_size else ""))
    with ui.bytes_progress("packing", total) as advance:
        index = archive.pack(out, envelope, [(e, sources[e.path]) for e in packed], created,
                             advance, part_size, corrupt=cache.evict)
    _remove_stale(out, volume_set=index is not None)
    if index is None:
        return BuildResult(out, manifest, out.stat().st_size, key_id(key.public_key()), (),
                           relocked, fetched, warnings, against, images_plan, vulns_doc)
    index_file = volumes.write_index(out, index, key)
    parts = (volumes.head_of(index_file), *(out_dir / p.file for p in index.parts))
    size = index.total_size + parts[0].stat().st_size
    return BuildResult(index_file, manifest, size, key_id(key.public_key()), parts,
                       relocked, fetched, warnings, against, images_plan, vulns_doc)


def _sbom(release: sbom_make.Release, cache: Cache, sources: dict[str, Path]) -> FileEntry:
    """The SBOM of what this build gathered (before a delta leaves anything out), cached and
    listed as the payload SBOM_PATH."""
    ui.step("Writing the SBOM (CycloneDX)" + (
        f": reading the packages inside {len(release.images)} image(s)" if release.images
        else ""))
    sha, size = cache.put_bytes(sbom_make.make(release))
    sources[SBOM_PATH] = cache.path(sha)
    return FileEntry(SBOM_PATH, size, sha, "sbom")


def _vulns(gate: vulngate.Gate, bom: FileEntry, cache: Cache, entries: list[FileEntry],
           sources: dict[str, Path]) -> dict[str, object]:
    """The gate over the SBOM just made (VulnerableError refuses the build); its record is
    listed as the payload VULNS_PATH."""
    payload, scan = vulngate.run(gate, cache.path(bom.sha256).read_bytes())
    sha, size = cache.put_bytes(payload)
    sources[VULNS_PATH] = cache.path(sha)
    entries.append(FileEntry(VULNS_PATH, size, sha, "sbom"))
    return {"path": VULNS_PATH, "findings": len(scan.findings), "records": scan.records,
            "modified": scan.modified, "fail_on": gate.fail_on}


def npm_target(target: Target) -> dict[str, str]:
    """node's process.platform / process.arch and the libc of the target."""
    plat = target.tag
    return {"os": "linux", "cpu": plat.node_cpu, "libc": plat.libc}


def _check_prisma(profile: Profile) -> dict[Path, tuple[str, ...]]:
    """Each npm project's Prisma set-up checked (resolve.prisma); per project, the packages
    whose install-script downloads are then harmless."""
    migrates = any(m.kind == "command" and any("prisma" in arg for arg in m.command)
                   for m in profile.runtime.migrations)
    out: dict[Path, tuple[str, ...]] = {}
    for spec in profile.npm:
        lock_path = spec.project / "package-lock.json"
        if lock_path.is_file():  # missing: npm.fetch says so, with its fix
            lock = npm.read_json(lock_path, "package-lock.json")
            out[spec.project] = prisma.check(spec.project, lock, lock_path,
                                             not spec.include_dev, migrates)
    return out


def _npm(profile: Profile, cache: Cache, entries: list[FileEntry], sources: dict[str, Path],
         harmless: dict[Path, tuple[str, ...]]
         ) -> tuple[tuple[NpmProject, ...], int, tuple[str, ...]]:
    """Fetch each npm project's tarballs; add them (shared ones once) and its package files."""
    projects: list[NpmProject] = []
    downloaded = 0
    warnings: list[str] = []
    for spec in profile.npm:
        ui.step(f"Fetching npm packages for {spec.dest}")
        t = npm_target(profile.target)
        got = npm.fetch(npm.NpmSpec(project=spec.project, registry=spec.registry,
                                    omit_dev=not spec.include_dev, os=t["os"], cpu=t["cpu"],
                                    libc=t["libc"],
                                    harmless_scripts=harmless.get(spec.project, ())),
                        cache, ui.note)
        downloaded += got.downloaded
        warnings += got.warnings
        for pkg in got.packages:
            if pkg.tarball not in sources:
                entries.append(FileEntry(pkg.tarball, pkg.size, pkg.sha256, "npm"))
                sources[pkg.tarball] = cache.path(pkg.sha256)
        tree = npm_tree.build(spec.project, got.packages, not spec.include_dev, cache,
                              ui.note)
        project = NpmProject(dest=spec.dest, omit_dev=not spec.include_dev, env=spec.env,
                             packages=tuple(NpmRef(p.name, p.version, p.integrity, p.tarball)
                                            for p in got.packages),
                             tree=None if tree is None else
                             f"npm/projects/{spec.dest}/{nodetree.TREE_NAME}")
        if tree is not None and project.tree is not None:
            entries.append(FileEntry(project.tree, tree[1], tree[0], "npm"))
            sources[project.tree] = cache.path(tree[0])
        for name, (sha, size) in (("package.json", got.package_json),
                                  ("package-lock.json", got.package_lock)):
            path = f"{project.bundle_dir}/{name}"
            entries.append(FileEntry(path, size, sha, "npm"))
            sources[path] = cache.path(sha)
        projects.append(project)
    return tuple(projects), downloaded, tuple(warnings)


def _remove_stale(out: Path, volume_set: bool) -> None:
    """A bundle and a volume set of the same name must not sit side by side: readers would
    pick the wrong one."""
    if volume_set:
        out.unlink(missing_ok=True)
        return
    volumes.index_path(out).unlink(missing_ok=True)
    for part in out.parent.glob(f"{out.name}.[0-9][0-9][0-9]"):
        part.unlink()
