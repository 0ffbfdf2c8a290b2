"""Build-side actions: commands the profile runs before anything is resolved or packed."""

from __future__ import annotations

import os

from bundler import proc, ui
from bundler.build.profile import Action
from bundler.errors import BuildError, CommandError


def run_all(actions: tuple[Action, ...]) -> None:
    for action in actions:
        ui.step(f"Running action {action.name}: {' '.join(action.run)}")
        # The author's own environment: actions are their build steps (npm, docker, make),
        # unlike bundler's pip calls, which are isolated from host configuration.
        env = {**os.environ, **dict(action.env)}
        try:
            proc.run(action.run, cwd=action.cwd, env=env, timeout=action.timeout_ms / 1000,
                     what=f"action {action.name}", release_command=True)
        except CommandError as exc:
            raise BuildError(exc.message, hint=f"fix action '{action.name}' (cwd {action.cwd}); "
                                               "nothing was packed") from None
