"""The release's packages, installed offline from the verified bundle: its images loaded into
the engine (every node's, on a swarm), its Python venv, the carried Node.js and its npm
projects. They do not depend on each other (but npm on Node.js), so they run at the same time,
each its own journal step; the release directory is their undo (it goes as a whole)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from bundler import proc, ui
from bundler.bundle import nodetree
from bundler.bundle.manifest import Manifest
from bundler.bundle.models import NpmProject
from bundler.bundle.npmlock import NpmPackage
from bundler.compat import zip_strict
from bundler.errors import Cancelled, InstallError
from bundler.install import delta, node_runtime, npm_env, policy, python_env, reuse, runas
from bundler.install.journal import Journal
from bundler.install.layout import Layout, ReleaseDir
from bundler.install.release import Release

# Clones hard-link files from the earlier release's tree (copied only where the filesystem
# cannot link, or a file is writable by group or others): a copy of seed 001's trees costs more
# than their fresh install saves on a busy disk. A shared file written in place through one
# release's name is found before the other release runs again, and that tree installed again
# (`repair`).
LINK = True


def install(journal: Journal, release: Release, decision: policy.Decision,
            reuse_trees: bool = True) -> None:
    """Load the images, fill the venv and install each npm project (after the carried
    Node.js, which they run): these do not depend on each other, so they run at the same time,
    each journaled as its own step. The first failure stops the others (their commands are
    terminated, steps not yet begun never begin; an image load in flight is waited for) and
    is raised; Ctrl+C likewise. `reuse_trees`: a venv or node_modules an earlier release made
    from the same inputs is cloned (bundler.install.reuse), not installed again."""
    rel, m, layout = release.dir, release.manifest, release.layout
    reuse_from = earlier(layout, rel) if reuse_trees else []
    tasks: list[tuple[str, Callable[[], None]]] = []
    if m.images and delta.images_from_host(m):
        def images_held() -> None:
            with journal.step("images", "Checking the images the delta leaves to the engine"):
                delta.ensure_images(m, ui.note)
        tasks.append(("images", images_held))
    elif m.images:
        def images() -> None:
            with journal.step("images", f"Loading {len(m.images)} image(s) into the engine"), \
                    ui.activity("images: docker load"):
                loaded = release.runtime.load_images(ui.note)
                if loaded is not None:  # into these nodes' engines, each checked there
                    journal.record("images", "nodes", ", ".join(loaded))
        tasks.append(("images", images))
    if m.python_lock and decision.python is not None:
        python = decision.python

        def python_step() -> None:
            with journal.step("python", "Installing Python packages offline"), \
                    ui.activity("python: venv (reused, or uv pip install offline)"):
                made = python_env.provide(python, m, rel.path, reuse_from,
                                          LINK, ui.note)
                journal.record("python", "reused" if made.reused_from else "installed",
                               made.summary)
                ui.note(f"venv {made.summary}" + (f"; log: {made.log}" if made.log else ""))
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
                install_npm(rel, m, project, reuse_from,
                            lambda status, detail: journal.record(f"npm:{project.dest}",
                                                                  status, detail))
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
        failed = [(name, f.exception()) for (name, _), f in zip_strict(tasks, futures)
                  if f.done() and f.exception() is not None]
        if failed:
            first_name, first = next(((n, e) for n, e in failed
                                      if not isinstance(e, Cancelled)), failed[0])
            scope.cancel(f"{first_name} failed")
            wait(futures)
            assert first is not None
            raise first


def install_npm(rel: ReleaseDir, m: Manifest, project: NpmProject, reuse_from: list[Path],
                record: Callable[[str, str], None]) -> None:
    """npm project `project` of release `m` into its files/ (offline, from the bundle): a
    tree one of `reuse_from` (earlier releases) made from the same inputs is cloned; else the
    pre-built tree is unpacked, or `npm ci` runs (and its tree recorded for the next).
    `record(status, detail)`: how (the journal's step record)."""
    dest = rel.files / project.dest
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        # A new file, never written through: the profile's files/ may hold the same content,
        # hard-linked to the same store object (bundler.install.store).
        (dest / name).unlink(missing_ok=True)
        shutil.copyfile(rel.path / project.bundle_dir / name, dest / name)
    by_path = {f.path: f for f in m.files}
    if project.tree is not None and not (dest / nodetree.ROOT).exists():
        # Pre-built at build time (no install scripts, nothing platform-bound): cloned from an
        # earlier release's, or written from the one verified payload instead of running npm
        # ci, whose time is all unpacking.
        entry = by_path[project.tree]
        done = npm_env.provide_tree(rel.path / project.tree, entry.sha256, entry.size, dest,
                                    rel.path, project.dest, reuse_from,
                                    LINK, ui.note)
        record("reused" if done.startswith("reused") else "unpacked", done)
        ui.note(f"npm: {done}")
        return
    packages = [NpmPackage(p.name, p.version, p.integrity, p.tarball,
                           by_path[p.tarball].sha256, by_path[p.tarball].size)
                for p in project.packages]
    user = npm_env.runs_as(runas.maybe(m.runtime.user))
    env = dict(project.env)
    fp = npm_env.ci_fingerprint(dest, packages, project.omit_dev, env, rel.path, user)
    if not (dest / nodetree.ROOT).exists() and reuse_from:
        cloned = npm_env.reuse_ci_tree(fp, dest, rel.path, project.dest, reuse_from,
                                       LINK, ui.note)
        if cloned is not None:
            record("reused", cloned)
            ui.note(f"npm: {cloned}")
            return
    before = npm_env.outside_tree(dest)
    npm_env.install_offline(dest, rel.npm_tarballs, packages,
                            rel.npm_cache, ui.note, project.omit_dev, env,
                            release=rel.path, user=user)
    npm_env.record_ci_tree(fp, dest, rel.path, project.dest, before, ui.note)
    record("installed", f"npm ci --offline ({len(packages)} bundled package(s))")


def earlier(layout: Layout, rel: ReleaseDir) -> list[Path]:
    """The other release directories under the root, the current one first, then the most
    recently installed: where a tree to reuse may be (bundler.install.reuse)."""
    current = layout.current_version()
    others = [p for p in (layout.releases.iterdir() if layout.releases.is_dir() else ())
              if p.is_dir() and not p.is_symlink() and p != rel.path]
    others.sort(key=lambda p: (p.name != current, -_mtime(p / "bundle")))
    return others


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def repair(release: Release, note: Callable[[str], None]) -> list[str]:
    """Before `release` runs again (a rollback to it, a recovery restarting it): each of its
    trees that shares files with another release's (reuse.shared_doubt) and had one of them
    written in place through the other release is removed and installed again from this
    release's own packages, as its install did. The trees it holds alone are its own and left
    alone. Returns a line per tree installed again."""
    rel, m = release.dir, release.manifest
    done: list[str] = []
    rec = reuse.Record.load(python_env.record_path(rel.path))
    if m.python_lock and rec is not None and rec.top == os.path.abspath(rel.path / "venv"):
        why = reuse.shared_doubt(rec)
        if why is not None:
            python = python_env.find_python(m.target)
            if python is None:
                raise InstallError(f"the venv of {m.version} was changed ({why}) and no Python "
                                   f"{m.target.python} is left to install it again",
                                   hint=python_env.install_hint(m.target.python))
            note(f"venv of {m.version}: {why}; installing it again from its wheels")
            reuse.remove(rel.path / "venv")
            python_env.provide(python, m, rel.path, [], LINK, note)
            done.append(f"venv of {m.version}: {why}")
    for project in m.npm:
        rec = reuse.Record.load(npm_env.tree_record(rel.path, project.dest))
        top = rel.files / project.dest / nodetree.ROOT
        if rec is None or rec.top != os.path.abspath(top):
            continue
        why = reuse.shared_doubt(rec)
        if why is not None:
            note(f"node_modules of {m.version} ({project.dest}): {why}; installing it again")
            reuse.remove(top)
            install_npm(rel, m, project, [], lambda _status, _detail: None)
            done.append(f"node_modules of {m.version} ({project.dest}): {why}")
    return done


def with_node(env: dict[str, str], rel: ReleaseDir) -> dict[str, str]:
    """The release's carried Node.js first on PATH (command migrations run it)."""
    return node_runtime.on_path(env, rel.path)
