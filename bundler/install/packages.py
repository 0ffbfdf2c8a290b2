"""The release's packages, installed offline from the verified bundle: its images loaded into
the engine (every node's, on a swarm), its Python venv, the carried Node.js and its npm
projects. They do not depend on each other (but npm on Node.js), so they run at the same time,
each its own journal step; the release directory is their undo (it goes as a whole)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from bundler import proc, ui
from bundler.bundle import nodetree
from bundler.bundle.manifest import Manifest
from bundler.bundle.models import NpmProject
from bundler.bundle.npmlock import NpmPackage
from bundler.errors import Cancelled
from bundler.install import node_runtime, npm_env, policy, python_env, runas
from bundler.install.journal import Journal
from bundler.install.layout import ReleaseDir
from bundler.install.release import Release


def install(journal: Journal, release: Release, decision: policy.Decision) -> None:
    """Load the images, fill the venv and install each npm project (after the carried
    Node.js, which they run): these do not depend on each other, so they run at the same time,
    each journaled as its own step. The first failure stops the others (their commands are
    terminated, steps not yet begun never begin; an image load in flight is waited for) and
    is raised; Ctrl+C likewise."""
    rel, m, layout = release.dir, release.manifest, release.layout
    tasks: list[tuple[str, Callable[[], None]]] = []
    if m.images:
        def images() -> None:
            with journal.step("images", f"Loading {len(m.images)} image(s) into the engine"), \
                    ui.activity("images: docker load"):
                loaded = release.runtime.load_images(ui.note)
                if loaded is not None:  # into these nodes' engines, each checked there
                    journal.record("images", "nodes", ", ".join(loaded))
        tasks.append(("images", images))
    if m.python_lock and decision.python is not None:
        python, python_lock = decision.python, m.python_lock

        def python_step() -> None:
            with journal.step("python", "Installing Python packages offline"), \
                    ui.activity("python: uv pip install (offline)"):
                made = python_env.create_venv(python, rel.venv, rel.wheels,
                                              rel.path / python_lock, rel.logs, ui.note)
                ui.note(f"venv ready; log: {made}")
        tasks.append(("python", python_step))
    node_ready = threading.Event()
    if m.runtimes is not None:
        runtimes = m.runtimes

        def node() -> None:
            with journal.step("runtime:node", f"Unpacking Node.js {runtimes.node.version} "
                                              "(carried in the bundle)"):
                node_runtime.install(rel.path, m, ui.note, layout.root)
            node_ready.set()
        tasks.append(("runtime:node", node))
    else:
        node_ready.set()
    for project in m.npm:
        def npm_step(project: NpmProject = project) -> None:
            while not node_ready.wait(0.1):
                scope.check()  # the runtime step failed: never begin
            scope.check()
            how = "pre-built node_modules" if project.tree else "npm ci --offline"
            with journal.step(f"npm:{project.dest}",
                              f"Installing npm packages offline into files/{project.dest}"), \
                    ui.activity(f"npm:{project.dest}: {how}"):
                install_npm(rel, m, project)
        tasks.append((f"npm:{project.dest}", npm_step))
    if not tasks:
        return
    scope = proc.CancelScope()

    def run(task: Callable[[], None]) -> None:
        with proc.cancel_scope(scope):
            scope.check()
            task()

    if len(tasks) == 1:
        tasks[0][1]()
        return
    with ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="install") as pool:
        futures = [pool.submit(run, task) for _, task in tasks]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl+C while the steps run: stop them, then roll back
            scope.cancel("interrupted")
            wait(futures)
            raise
        failed = [(name, f.exception()) for (name, _), f in zip(tasks, futures, strict=True)
                  if f.done() and f.exception() is not None]
        if failed:
            first_name, first = next(((n, e) for n, e in failed
                                      if not isinstance(e, Cancelled)), failed[0])
            scope.cancel(f"{first_name} failed")
            wait(futures)
            assert first is not None
            raise first


def install_npm(rel: ReleaseDir, m: Manifest, project: NpmProject) -> None:
    """npm project `project` of release `m` into its files/ (offline, from the bundle)."""
    dest = rel.files / project.dest
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(rel.path / project.bundle_dir / name, dest / name)
    by_path = {f.path: f for f in m.files}
    if project.tree is not None and not (dest / nodetree.ROOT).exists():
        # Pre-built at build time (no install scripts, nothing platform-bound): written from
        # the one verified payload instead of running npm ci, whose time is all unpacking.
        entry = by_path[project.tree]
        files = nodetree.extract(rel.path / project.tree, entry.sha256, entry.size, dest)
        ui.note(f"npm: node_modules written from the bundle's pre-built tree ({files} files)")
        return
    packages = [NpmPackage(p.name, p.version, p.integrity, p.tarball,
                           by_path[p.tarball].sha256, by_path[p.tarball].size)
                for p in project.packages]
    npm_env.install_offline(dest, rel.npm_tarballs, packages,
                            rel.npm_cache, ui.note, project.omit_dev, dict(project.env),
                            release=rel.path, user=runas.maybe(m.runtime.user))


def with_node(env: dict[str, str], rel: ReleaseDir) -> dict[str, str]:
    """The release's carried Node.js first on PATH (command migrations run it)."""
    return node_runtime.on_path(env, rel.path)
