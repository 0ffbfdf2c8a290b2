"""The swarm runtime's pure parts: bundler's update/rollback defaults for a stack, the
swarm.yaml it reads, the causes a failed update names, and a one-off job's failure paths
against a scripted engine API (the real swarm is in tests/test_swarm.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bundler.errors import CommandError, InstallError
from bundler.install import swarm_runtime as sw
from bundler.install.layout import Layout


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
    assert not sw.configured(Layout(tmp_path))
    (tmp_path / "swarm.yaml").write_text("nodes:\n  n1: unix:///var/run/docker.sock\n"
                                         "  n2: ssh://deploy@10.0.0.2\n")
    assert sw.configured(Layout(tmp_path))
    assert sw.endpoints(Layout(tmp_path)) == (sw.Endpoint("n1", "unix:///var/run/docker.sock"),
                                      sw.Endpoint("n2", "ssh://deploy@10.0.0.2"))
    (tmp_path / "swarm.yaml").write_text("nodes: [n1, n2]\n")
    with pytest.raises(InstallError, match="must map each node's hostname"):
        sw.endpoints(Layout(tmp_path))


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


class _Engine:
    """The manager's engine API as run_oneoff uses it, with the job's tasks scripted."""

    def __init__(self, tasks: list[dict[str, Any]], logs: bytes = b"") -> None:
        self.job_tasks, self.output = tasks, logs
        self.created: list[dict[str, Any]] = []
        self.removed: list[str] = []

    def services(self, filters: dict[str, str]) -> list[dict[str, Any]]:
        return []

    def tasks(self, filters: dict[str, str]) -> list[dict[str, Any]]:
        return self.job_tasks if filters == {"service": "job1"} else []

    def inspect_service(self, name: str) -> dict[str, Any]:
        return {"Spec": {"TaskTemplate": {"ContainerSpec": {"Image": "app:2"}}}}

    def info(self) -> dict[str, Any]:
        return {"Swarm": {"NodeID": "n0"}}

    def create_service(self, template: dict[str, Any], **kw: Any) -> dict[str, str]:
        self.created.append(template)
        return {"ID": "job1"}

    def remove_service(self, service_id: str) -> None:
        self.removed.append(service_id)

    def logs(self, container: str, **kw: Any) -> bytes:
        return self.output


def _oneoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: _Engine,
            service: str = "api", timeout: float = 5) -> Any:
    compose = tmp_path / "docker-compose.yml"
    compose.write_text("services:\n  api: {image: app:2}\n  db: {image: pg}\n")
    deployed: list[Any] = []
    monkeypatch.setattr(sw, "_manager", lambda: engine)
    monkeypatch.setattr(sw, "deploy", lambda *a, **kw: deployed.append(kw))
    monkeypatch.setattr(sw, "POLL", 0.01)
    stack = sw.Stack("st", (compose,), tmp_path, {"DB_PASSWORD": "s3cret"})
    return sw.run_oneoff(stack, lambda _: None, service, ["alembic", "upgrade", "head"],
                         {}, timeout), deployed


def test_a_one_off_job_for_a_service_the_stack_lacks_is_refused_before_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _Engine([])
    with pytest.raises(InstallError) as info:
        _oneoff(tmp_path, monkeypatch, engine, service="worker")
    assert info.value.message == "stack st has no service worker"
    assert "compose files" in (info.value.hint or "")
    assert engine.created == []


def test_a_one_off_job_returns_its_exit_and_redacted_output_and_is_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _Engine([{"Status": {"State": "failed", "Err": "task: non-zero exit (3)",
                                  "ContainerStatus": {"ContainerID": "c1", "ExitCode": 3}}}],
                     logs=b"connecting with s3cret\nERROR: relation nope\n")
    result, deployed = _oneoff(tmp_path, monkeypatch, engine)
    assert (result.returncode, result.output) == (3, "connecting with ****\nERROR: relation nope\n")
    assert deployed == [{"only": ()}]  # the new release's definitions, nothing else kept up
    assert engine.created[0]["ContainerSpec"]["Args"] == ["alembic", "upgrade", "head"]
    assert engine.removed == ["job1"]


def test_a_one_off_job_that_never_started_or_hangs_fails_in_one_line_and_is_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _Engine([{"Status": {"State": "rejected", "Err": "invalid mount config: bind "
                                  "source path does not exist: /srv/x"}}])
    with pytest.raises(CommandError) as info:
        _oneoff(tmp_path, monkeypatch, engine)
    assert info.value.message == ("alembic in a one-off task of swarm service api: the task was "
                                  "rejected: invalid mount config: bind source path does not "
                                  "exist: /srv/x")
    assert info.value.hint and engine.removed == ["job1"]

    engine = _Engine([{"Status": {"State": "running"}}])
    with pytest.raises(CommandError) as info:
        _oneoff(tmp_path, monkeypatch, engine, timeout=0.05)
    assert info.value.message == ("alembic in a one-off task of swarm service api: timed out "
                                  "after 0s (the job was stopped and removed)")
    assert info.value.hint and engine.removed == ["job1"]
