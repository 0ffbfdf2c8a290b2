"""Values every runtime adapter speaks in (kept apart from the protocol in `__init__`, which
imports the adapters: an adapter never imports its own package)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UnitState:
    """One unit a release runs (a supervised service, a container, a swarm task), as it is now."""

    name: str
    running: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "running": self.running, "detail": self.detail}


@dataclass(frozen=True)
class NodeDown:
    """A node the release's runtime would run on that is not up (swarm.yaml's nodes)."""

    name: str
    state: str


@dataclass(frozen=True)
class HostCheck:
    """One row of `bundle doctor` that the runtime answers (ports, nodes)."""

    check: str
    status: str  # ok | warn | fail
    detail: str
