"""The swarm runtime's pure parts: bundler's update/rollback defaults for a stack, the
swarm.yaml it reads and the causes a failed update names (no engine; the real swarm is in
tests/test_swarm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundler.errors import InstallError
from bundler.install import swarm_runtime as sw


def test_defaults_fill_what_the_files_leave_out() -> None:
    services = {
        "api": {"image": "a"},
        "web": {"image": "w", "ports": [{"target": 80, "published": 8080, "mode": "host"}]},
        "db": {"image": "p", "volumes": ["pgdata:/var/lib/postgresql/data"]},
        "bind": {"image": "b", "volumes": ["./conf:/etc/conf", "/srv:/srv"]},
        "own": {"image": "o", "deploy": {"update_config": {"order": "stop-first",
                                                           "failure_action": "pause"},
                                         "rollback_config": {"order": "stop-first"}}},
    }
    out = sw.defaults(services)["services"]
    assert out["api"]["deploy"]["update_config"] == {"failure_action": "rollback",
                                                     "order": "start-first"}
    assert out["api"]["deploy"]["rollback_config"] == {"order": "start-first"}
    # host-mode ports and named volumes cannot have two tasks side by side
    assert out["web"]["deploy"]["update_config"]["order"] == "stop-first"
    assert out["db"]["deploy"]["update_config"]["order"] == "stop-first"
    assert out["bind"]["deploy"]["update_config"]["order"] == "start-first"
    assert "own" not in out  # what the compose file sets wins


def test_swarm_yaml(tmp_path: Path) -> None:
    assert not sw.configured(tmp_path)
    (tmp_path / "swarm.yaml").write_text("nodes:\n  n1: unix:///var/run/docker.sock\n"
                                         "  n2: ssh://deploy@10.0.0.2\n")
    assert sw.configured(tmp_path)
    assert sw.endpoints(tmp_path) == (sw.Endpoint("n1", "unix:///var/run/docker.sock"),
                                      sw.Endpoint("n2", "ssh://deploy@10.0.0.2"))
    (tmp_path / "swarm.yaml").write_text("nodes: [n1, n2]\n")
    with pytest.raises(InstallError, match="must map each node's hostname"):
        sw.endpoints(tmp_path)


def test_a_failed_update_names_every_distinct_task_error_newest_first() -> None:
    def task(err: str, message: str = "started") -> dict[str, object]:
        return {"Status": {"State": "failed", "Err": err, "Message": message}}

    # one task's error alone can be a side effect of the rollback (seen on CI: a network
    # error hid "unhealthy container"); the line carries each distinct cause once
    failed = [task("failed to allocate network (id 7w2i)"), task("unhealthy container"),
              task("unhealthy container"), task("", "rejected: no suitable node")]
    assert sw._causes(failed) == ("failed to allocate network (id 7w2i); "
                                             "unhealthy container; rejected: no suitable node")
    many = [task(f"error {i}\n  detail") for i in range(5)]
    assert sw._causes(many) == ("error 0 detail; error 1 detail; error 2 detail; "
                                           "and 2 more")
    assert sw._causes([]) == ""
