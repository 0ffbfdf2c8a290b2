"""The documents point at each other and at themselves correctly: every relative link in the
README, docs/ and bench/README.md names a file that exists and, with `#anchor`, a heading it
has; every document under docs/ is listed in the index (docs/README.md); and every `docs/...`
path bundler's own messages and docstrings name exists."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import REPO

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def documents() -> list[Path]:
    return [REPO / "README.md", REPO / "bench" / "README.md",
            *sorted((REPO / "docs").rglob("*.md"))]


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks and indented code."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced and not line.startswith("    "):
            out.append(line)
    return out


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lowercase, punctuation dropped, spaces to dashes, -N for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m[1].lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_link_resolves() -> None:
    broken = []
    for doc in documents():
        for line in _prose(doc.read_text()):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue  # http(s), mailto
                path, _, anchor = target.partition("#")
                dest = (doc.parent / path).resolve() if path else doc
                if not dest.exists():
                    broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_index_lists_every_document() -> None:
    index = (REPO / "docs" / "README.md").read_text()
    listed = {(REPO / "docs" / t).resolve() for t in LINK.findall(index)}
    missing = [p.relative_to(REPO).as_posix() for p in sorted((REPO / "docs").rglob("*.md"))
               if p.name != "README.md" and p.resolve() not in listed]
    assert not missing, f"add them to docs/README.md: {missing}"


def test_paths_named_in_the_code_exist() -> None:
    named = set()
    for src in [*(REPO / "bundler").rglob("*.py"), *(REPO / "profiles").glob("*.yaml")]:
        named.update(re.findall(r"\bdocs/[\w./-]+\.md\b", src.read_text()))
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, missing
