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
    # stop-first: a pause of the monitor period (swarm's default 5 s) after each task, so a
    # failed new task stops the update before the next node's old task goes down
    assert out["web"]["deploy"]["update_config"]["delay"] == "5000ms"
    assert "delay" not in out["api"]["deploy"]["update_config"]
    # what the compose file sets wins; it set no delay for its stop-first update
    assert out["own"] == {"deploy": {"update_config": {"delay": "5000ms"}}}


@pytest.mark.parametrize(("update", "delay"), [
    ({"monitor": "2s"}, "2000ms"), ({"monitor": "1m30s"}, "90000ms"),
    ({"monitor": "250ms"}, "1000ms"), ({"monitor": "0s"}, "1000ms"),
    ({"monitor": "soon"}, "5000ms"), ({}, "5000ms")])
def test_stop_first_delay_follows_the_monitor(update: dict[str, str], delay: str) -> None:
    spec = {"image": "w", "ports": [{"target": 80, "published": 80, "mode": "host"}],
            "deploy": {"update_config": update}}
    assert sw.defaults({"web": spec})["services"]["web"]["deploy"]["update_config"][
        "delay"] == delay
    own = {**spec, "deploy": {"update_config": {**update, "delay": "0s"}}}
    assert "delay" not in sw.defaults({"web": own})["services"]["web"]["deploy"][
        "update_config"]  # the file's own delay wins


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


def test_a_one_off_job_is_the_service_with_the_migration_command() -> None:
    spec = {"Name": "st_api", "TaskTemplate": {
        "ContainerSpec": {"Image": "app:2", "Command": ["/entry"], "Args": ["serve"],
                          "Env": ["DATABASE_URL=postgresql://db/app", "B=old"],
                          "Mounts": [{"Type": "volume", "Source": "st_data", "Target": "/d"}],
                          "Healthcheck": {"Test": ["CMD", "curl", "localhost"]}},
        "RestartPolicy": {"Condition": "any"},
        "Placement": {"Constraints": ["node.role == worker"], "MaxReplicas": 1,
                      "Platforms": [{"Architecture": "amd64", "OS": "linux"}]},
        "Networks": [{"Target": "net1", "Aliases": ["api"]}], "ForceUpdate": 3}}
    job = sw.job_spec(spec, ["alembic", "upgrade", "head"], {"B": "2", "A": "1"}, "n0")
    c = job["ContainerSpec"]
    # compose run's rule: the command replaced, the entrypoint kept
    assert c["Command"] == ["/entry"] and c["Args"] == ["alembic", "upgrade", "head"]
    assert c["Env"] == ["DATABASE_URL=postgresql://db/app", "A=1", "B=2"]  # the migration's B
    assert c["Mounts"] == spec["TaskTemplate"]["ContainerSpec"]["Mounts"]
    assert c["Healthcheck"] == {"Test": ["NONE"]}
    assert job["RestartPolicy"]["Condition"] == "none"
    assert job["Placement"] == {"Constraints": ["node.id==n0"],
                                "Platforms": [{"Architecture": "amd64", "OS": "linux"}]}
    assert job["Networks"] == [{"Target": "net1"}]  # not answering for the service's name
    assert "ForceUpdate" not in job
    assert spec["TaskTemplate"]["ContainerSpec"]["Args"] == ["serve"]  # not changed in place
