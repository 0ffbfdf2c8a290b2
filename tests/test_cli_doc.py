"""docs/cli.md is generated from the click commands (scripts/gen_cli_doc.py): the committed page
must be exactly what the generator writes, so it never drifts from the code."""

from __future__ import annotations

import subprocess
import sys

from scripts import gen_cli_doc
from tests.helpers import REPO


def test_committed_cli_doc_is_the_generated_one() -> None:
    committed = (REPO / "docs" / "cli.md").read_text()
    assert committed == gen_cli_doc.render(), \
        "docs/cli.md is stale: run python scripts/gen_cli_doc.py and commit it"


def test_every_command_has_its_help_and_the_kit_marks_are_the_kits_commands() -> None:
    import bundler.cli.main  # noqa: F401 - registers every command
    from bundler.cli.common import cli

    text = gen_cli_doc.render()
    for name, cmd in cli.commands.items():
        assert f"\n## bundle {name}\n" in text, name
        assert f"Usage: bundle {name} " in text, name
        for param in cmd.params:
            for opt in getattr(param, "opts", ()):
                if opt.startswith("-"):
                    assert opt in text, (name, opt)
    # What the kit's own entry point registers, in a fresh interpreter (nothing else imported).
    done = subprocess.run(
        [sys.executable, "-c", "import bundler.cli.kitmain\nfrom bundler.cli.common import cli\n"
         "print(' '.join(sorted(cli.commands)))"],
        cwd=REPO, capture_output=True, text=True, check=True)
    kit = set(done.stdout.split())
    marked = {line.split("`")[1].split()[1] for line in text.splitlines()
              if line.startswith("- [`bundle ") and "*(kit)*" in line}
    assert marked == kit
