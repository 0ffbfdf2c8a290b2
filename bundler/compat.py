"""The one home of what the target side takes from Python 3.10+ (issue 22).

The target kit runs on the host's own python3, 3.9 and newer (RHEL 9 and Debian 11 ship 3.9),
so the modules it carries use nothing newer than 3.9; where a newer feature reads better and is
used in several places, its 3.9 equivalent lives here. `make lint` checks the kit's modules as
Python 3.9 (ruff's per-file target version, mypy's python_version: scripts/lint_kit.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from datetime import timezone
from enum import Enum
from typing import TypeVar, overload

UTC = timezone.utc  # datetime.UTC (3.11) is this same object

# fcntl.F_SETPIPE_SZ (3.10): Linux's F_LINUX_SPECIFIC_BASE + 7
F_SETPIPE_SZ = 1031

if sys.version_info >= (3, 11):
    from enum import StrEnum as StrEnum  # re-exported
else:
    class StrEnum(str, Enum):
        """enum.StrEnum (3.11): members are strings; str() and format() give the value."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return str(self.value).__format__(spec)


_A = TypeVar("_A")
_B = TypeVar("_B")
_C = TypeVar("_C")


@overload
def zip_strict(a: Iterable[_A], b: Iterable[_B], /) -> Iterator[tuple[_A, _B]]: ...


@overload
def zip_strict(a: Iterable[_A], b: Iterable[_B], c: Iterable[_C], /
               ) -> Iterator[tuple[_A, _B, _C]]: ...


def zip_strict(*iterables: Iterable[object]) -> Iterator[tuple[object, ...]]:
    """`zip(..., strict=True)` (3.10): ValueError when one runs out before the others."""
    iterators = [iter(it) for it in iterables]
    missing = object()
    while True:
        row = tuple(next(it, missing) for it in iterators)
        if all(v is missing for v in row):
            return
        if any(v is missing for v in row):
            raise ValueError("zip_strict: arguments of different lengths")
        yield row
