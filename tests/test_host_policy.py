"""What a signed bundle asks of the host (bundler.bundle.hostreq) and the root's host policy
(bundler.install.hostpolicy): the compose analysis for every kind of request, both volume
syntaxes, several files, interpolation; the policy file and --allow grants; and, through the
real CLI, process bundles that run as root, `bundle inspect`/`verify` listing the requests, and
a signer whose manifest records less than its compose file asks (refused, nothing created)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.bundle import hostreq
from bundler.bundle.hostreq import Place, Request, Unevaluable
from bundler.bundle.models import ComposeSpec, MigrationSpec, Runtime, Service
from bundler.errors import HostPolicyError, StateError
from bundler.install import hostpolicy
from tests.bundles import write_bundle
from tests.exit_codes import USAGE
from tests.helpers import bundle
from tests.helpers import tree_snapshot as snapshot

FILES = "/srv/app/releases/1.0.0/files"


def requests(*files: str, env: dict[str, str | None] | None = None,
             workdir: str = "stack") -> list[Request]:
    ex = hostreq.excerpt_of_files((f"stack/f{i}.yml", textwrap.dedent(text))
                                  for i, text in enumerate(files))
    place = Place(workdir, FILES if env is not None else None, "/root")
    return hostreq.analyse(ex, env, place)


def found(*files: str, env: dict[str, str | None] | None = None) -> set[tuple[str, str, bool]]:
    """(kind, value, refused by default) of every request."""
    return {(r.kind, r.value, r.refused_by_default) for r in requests(*files, env=env)}


def svc(body: str, top: str = "") -> str:
    return "services:\n  web:\n    image: x\n" + textwrap.indent(textwrap.dedent(body), "    ") \
        + textwrap.dedent(top)


# --- every kind of request -------------------------------------------------------------------

@pytest.mark.parametrize(("body", "want"), [
    ("privileged: true\n", {("privileged", "", True)}),
    ("privileged: false\n", set()),
    ("cap_add: [NET_ADMIN, cap_sys_admin, CHOWN]\n",
     {("cap", "NET_ADMIN", True), ("cap", "SYS_ADMIN", True), ("cap", "CHOWN", False)}),
    ("cap_drop: [ALL]\n", set()),
    ("network_mode: host\n", {("host-network", "", True)}),
    ("network_mode: bridge\n", set()),
    ("network_mode: 'service:db'\n", set()),
    ("network_mode: 'container:other'\n", {("join-container", "other", True)}),
    ("pid: host\n", {("host-pid", "", True)}),
    ("ipc: host\n", {("host-ipc", "", True)}),
    ("ipc: shareable\n", set()),
    ("userns_mode: host\n", {("host-userns", "", True)}),
    ("uts: host\n", {("host-uts", "", True)}),
    ("cgroup: host\n", {("host-cgroup", "", True)}),
    ("devices: ['/dev/kvm:/dev/kvm', {source: /dev/fuse, target: /dev/fuse}]\n",
     {("device", "/dev/kvm", True), ("device", "/dev/fuse", True)}),
    ("device_cgroup_rules: ['c 1:3 mr']\n", {("device", "c 1:3 mr", True)}),
    ("security_opt: ['seccomp:unconfined', 'apparmor=unconfined', 'label:disable', "
     "'no-new-privileges:true']\n",
     {("security-opt", "seccomp=unconfined", True), ("security-opt", "apparmor=unconfined", True),
      ("security-opt", "label=disable", True)}),
    ("user: root\n", {("container-root", "", False)}),
    ("user: '0:0'\n", {("container-root", "", False)}),
    ("user: '1000'\n", set()),
    ("sysctls: {net.core.somaxconn: 1024}\n", {("sysctl", "net.core.somaxconn", False)}),
    ("sysctls: ['net.ipv4.ip_forward=1']\n", {("sysctl", "net.ipv4.ip_forward", False)}),
    ("volumes_from: ['container:data-box:ro', 'db']\n", {("join-container", "data-box", True)}),
    ("env_file: [/etc/shadow, ./app.env]\n",
     {("host-mount", "/etc/shadow", True), ("release-mount", "stack/app.env", False)}),
    ("deploy: {resources: {reservations: {devices: [{capabilities: [gpu]}]}}}\n",
     {("device", "gpu", True)}),
])
def test_each_kind_of_request(body: str, want: set[tuple[str, str, bool]]) -> None:
    assert found(svc(body)) == want
    assert found(svc(body), env={}) == want  # nothing here depends on the environment


@pytest.mark.parametrize(("volume", "want"), [
    ("'/:/host'", {("host-mount", "/", True)}),
    ("'/etc:/etc:ro'", {("host-mount", "/etc", True)}),
    ("/var/run/docker.sock:/var/run/docker.sock", {("host-mount", "/var/run/docker.sock", True)}),
    ("'/srv/data/../../etc:/x'", {("host-mount", "/etc", True)}),
    ("./conf:/etc/conf:ro", {("release-mount", "stack/conf", False)}),
    ("../shared.conf:/c", {("release-mount", "shared.conf", False)}),
    ("~/.ssh:/keys", {("host-mount", "/root/.ssh", True)}),
    ("data:/data", set()),
    ("/anonymous", set()),
    ("{type: bind, source: /, target: /host}", {("host-mount", "/", True)}),
    ("{type: bind, source: ./conf, target: /c}", {("release-mount", "stack/conf", False)}),
    ("{type: volume, source: data, target: /data}", set()),
    ("{type: tmpfs, target: /tmp}", set()),
])
def test_short_and_long_volume_syntax(volume: str, want: set[tuple[str, str, bool]]) -> None:
    assert found(svc(f"volumes:\n  - {volume}\n", "volumes:\n  data: {}\n"), env={}) == want


def test_a_relative_path_that_leaves_the_release_is_a_host_mount() -> None:
    text = svc("volumes: ['../../../../etc:/e']\n")
    # on the target, the path compose will mount; in inspect, the path as written
    assert found(text, env={}) == {("host-mount", "/srv/app/etc", True)}
    assert found(text) == {("host-mount", "../../../../etc", True)}


def test_a_named_volume_that_binds_a_host_path_or_uses_a_driver() -> None:
    top = """\
        volumes:
          sneaky: {driver_opts: {type: none, o: bind, device: /}}
          nfs: {driver_opts: {type: nfs, o: 'addr=10.0.0.1', device: ':/export'}}
          plugin: {driver: rexray}
          ram: {driver_opts: {type: tmpfs, device: tmpfs}}
        """
    body = "volumes: ['sneaky:/host', 'nfs:/n', 'plugin:/p', 'ram:/r']\n"
    assert found(svc(body, top), env={}) == {("host-mount", "/", True),
                                             ("volume-driver", "local:nfs", True),
                                             ("volume-driver", "rexray", True)}


def test_the_host_network_by_name_and_secret_files() -> None:
    top = """\
        networks:
          outside: {external: true, name: host}
        secrets:
          key: {file: /root/.ssh/id_ed25519}
          mine: {file: ./secret.txt}
        """
    body = "networks: [outside]\nsecrets: [key, {source: mine, target: m}]\n"
    assert found(svc(body, top), env={}) == {("host-network", "", True),
                                             ("host-mount", "/root/.ssh/id_ed25519", True),
                                             ("release-mount", "stack/secret.txt", False)}


# --- several files, as compose merges them ---------------------------------------------------

def test_several_files_merge_as_compose_merges_them() -> None:
    base = """\
        services:
          web: {image: x, privileged: true, cap_add: [NET_ADMIN], volumes: ['/srv:/srv']}
          db: {image: y}
        """
    override = """\
        services:
          web: {privileged: false, cap_add: [SYS_TIME], volumes: ['/etc:/etc']}
          extra: {image: z, pid: host}
        volumes:
          late: {driver_opts: {o: bind, device: /var/lib}}
        """
    late = "services:\n  db: {volumes: ['late:/l']}\n"
    got = {(r.service, r.kind, r.value) for r in requests(base, override, late, env={})}
    # a scalar is the later file's (privileged: false wins); lists are unioned; a volume
    # defined in a later file binds a service of an earlier one
    assert got == {("web", "cap", "NET_ADMIN"), ("web", "cap", "SYS_TIME"),
                   ("web", "host-mount", "/srv"), ("web", "host-mount", "/etc"),
                   ("extra", "host-pid", ""), ("db", "host-mount", "/var/lib")}


# --- interpolation ----------------------------------------------------------------------------

def test_interpolated_values_are_pending_in_inspect_and_evaluated_on_the_target() -> None:
    text = svc("volumes: ['${SOCK}:/run/pg', 'data:${TARGET}', '${WHOLE}']\n"
               "privileged: ${PRIV:-false}\nnetwork_mode: $MODE\n", "volumes:\n  data: {}\n")
    pending = {(r.kind, r.value, r.pending) for r in requests(text)}
    assert pending == {("host-mount", "${SOCK}", True), ("host-mount", "${WHOLE}", True),
                       ("privileged", "", True), ("host-network", "", True)}
    env: dict[str, str | None] = {"SOCK": "/run/app-pg", "TARGET": "/data", "MODE": "host",
                                  "WHOLE": "/:/host"}  # compose interpolates, then splits
    assert found(text, env=env) == {("host-mount", "/run/app-pg", True),
                                    ("host-mount", "/", True), ("host-network", "", True)}
    assert found(text, env={**env, "PRIV": "true", "MODE": "bridge", "WHOLE": "/anon"}) == {
        ("host-mount", "/run/app-pg", True), ("privileged", "", True)}


@pytest.mark.parametrize(("text", "env", "want"), [
    ("${A}", {"A": "x"}, "x"), ("$A/b", {"A": "x"}, "x/b"), ("${A}", {}, ""),
    ("${A:-d}", {"A": ""}, "d"), ("${A-d}", {"A": ""}, ""), ("${A-d}", {}, "d"),
    ("${A:+set}", {"A": "x"}, "set"), ("${A:+set}", {"A": ""}, ""), ("${A+set}", {"A": ""}, "set"),
    ("$$A", {"A": "x"}, "$A"), ("a$${A}", {}, "a${A}"), ("${A:?need}", {"A": "x"}, "x"),
])
def test_interpolation_as_compose_does_it(text: str, env: dict[str, str], want: str) -> None:
    assert hostreq.interpolate(text, env, "here") == want


@pytest.mark.parametrize(("text", "env", "message"), [
    ("${A:?need it}", {}, "${A} is required and not set (need it)"),
    ("${A?}", {}, "${A} is required"),
    ("${A:-${B}}", {}, "nested"),
    ("${A B}", {}, "not a variable name"),
    ("$", {}, "is not valid compose interpolation"),
    ("${A}", {"A": None}, "may come from the bundle's own .env file"),
])
def test_interpolation_bundler_cannot_evaluate_is_refused(text: str, env: dict[str, str | None],
                                                          message: str) -> None:
    with pytest.raises(Unevaluable, match=re.escape(message)):
        hostreq.interpolate(text, env, "here")


def test_a_security_key_whose_variable_cannot_be_known_is_refused() -> None:
    text = svc("volumes: ['${SRC}:/x']\n")
    with pytest.raises(Unevaluable, match=r"own \.env"):
        requests(text, env={"SRC": None})
    with pytest.raises(Unevaluable, match=r"the (host path|volume source) is empty"):
        requests(text, env={})


@pytest.mark.parametrize(("text", "message"), [
    ("services:\n  web: {extends: {service: base}}\n  base: {privileged: true}\n", "`extends`"),
    ("include: [other.yml]\nservices: {}\n", "`include`"),
    ("services:\n  web:\n    cap_add: !reset []\n", "cannot be read"),
    ("services:\n  web:\n    cap_add: NET_ADMIN\n", "`cap_add` is not a list"),
    ("- a list\n", "is not a mapping"),
])
def test_what_compose_would_read_differently_is_refused(text: str, message: str) -> None:
    with pytest.raises(Unevaluable, match=message):
        hostreq.excerpt_of_files([("stack/c.yml", text)])


def test_an_alias_bomb_is_refused_not_walked() -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    text = "x-bomb:\n" + "".join(f"  {line}\n" for line in levels) + \
        "services:\n  web:\n    sysctls: *a6\n"
    with pytest.raises(Unevaluable, match="more than 100000 values"):
        hostreq.excerpt_of_files([("c.yml", text)])


@pytest.mark.parametrize("record", [
    {"version": 1, "services": {"web": {"cap_add": "NET_ADMIN"}}},
    {"version": 1, "services": ["web"]},
    {"version": 1, "services": {"web": {"volumes": [["/", "/host"]]}}},
    {"version": 2, "services": {}},
])
def test_a_malformed_record_is_unevaluable_not_a_crash(record: dict[str, Any]) -> None:
    with pytest.raises(Unevaluable):
        hostreq.analyse(record, None, Place("stack"))


def test_the_excerpt_is_plain_deterministic_json() -> None:
    text = svc("user: 0\nsysctls: {net.x: 1.5}\nprivileged: yes\n")
    ex = hostreq.excerpt_of_files([("c.yml", text)])
    assert ex == {"version": 1, "services": {"web": {"user": "0", "sysctls": ["net.x=1.5"],
                                                      "privileged": True}}}
    assert json.loads(json.dumps(ex)) == ex  # no floats, no tuples: the manifest signs it


# --- grants and the policy file --------------------------------------------------------------

def test_grants_parse_and_cover() -> None:
    def err(m: str) -> Exception:
        return ValueError(m)

    assert hostreq.grant_parse("cap=cap_net_admin", err) == ("cap", "NET_ADMIN")
    assert hostreq.grant_parse("host-mount=/srv/data/", err) == ("host-mount", "/srv/data")
    assert hostreq.grant_parse("security-opt=seccomp:unconfined", err) == (
        "security-opt", "seccomp=unconfined")
    for bad, why in (("root", "unknown kind"), ("privileged=yes", "takes no value"),
                     ("host-mount", "needs a value"), ("host-mount=srv", "absolute path")):
        with pytest.raises(ValueError, match=why):
            hostreq.grant_parse(bad, err)
    mount = Request("web", "host-mount", "/srv/data/x")
    assert hostreq.covers("host-mount", "/srv/data", mount)
    assert hostreq.covers("host-mount", "/", mount)
    assert not hostreq.covers("host-mount", "/srv/dat", mount)
    assert not hostreq.covers("host-mount", "/srv/data/x/y", mount)
    assert not hostreq.covers("cap", "/srv/data", mount)


def _policy(root: Path, text: str, mode: int = 0o644) -> Path:
    root.mkdir(exist_ok=True)
    path = root / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


def test_the_policy_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert hostpolicy.load(root).grants == ()  # no root, no file: only the defaults
    path = _policy(root, "allow: [privileged, 'host-mount=/srv/pg/', cap=net_admin]\n"
                         "users: [app]\n")
    policy = hostpolicy.load(root)
    assert [(g.kind, g.value, g.origin) for g in policy.grants] == [
        ("privileged", "", str(path)), ("host-mount", "/srv/pg", str(path)),
        ("cap", "NET_ADMIN", str(path))]
    assert policy.users == ("app",)
    for text, message in (("allow: privileged\n", "`allow:` must be a list"),
                          ("allow: [bogus]\n", "unknown kind 'bogus'"),
                          ("deny: [privileged]\n", "only `allow:` and `users:`"),
                          ("allow: [\n", "is not YAML"), ("users: root\n", "`users:` must")):
        _policy(root, text)
        with pytest.raises(HostPolicyError, match=message) as info:
            hostpolicy.load(root)
        assert info.value.exit_code == HostPolicyError.exit_code and str(path) in info.value.message


def test_a_policy_file_others_can_write_is_refused(tmp_path: Path) -> None:
    """StrictModes, as for everything else bundler trusts under the root: another user who
    can write it could allow themselves a privileged container."""
    root = tmp_path / "root"
    path = _policy(root, "allow: [privileged]\n", mode=0o664)
    with pytest.raises(StateError, match=r"the host policy.*writable by its group"):
        hostpolicy.load(root)
    path.chmod(0o644)
    os.chown(path, 65534, 65534)
    with pytest.raises(StateError, match=r"the host policy.*is owned by"):
        hostpolicy.load(root)


def _decide(reqs: list[Request], root: Path, flags: tuple[str, ...] = (),
            root_ok: bool = True) -> hostpolicy.Outcome:
    return hostpolicy.decide(reqs, hostpolicy.load(root), hostpolicy.flag_grants(flags),
                             root_ok, "compose service")


def test_refused_by_default_with_one_line_naming_service_request_flag_and_policy_line(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    reqs = requests(svc("privileged: true\nvolumes: ['/:/host']\ncap_add: [CHOWN]\n"), env={})
    with pytest.raises(HostPolicyError) as info:
        _decide(reqs, root)
    assert info.value.exit_code == HostPolicyError.exit_code
    assert info.value.message == (
        "compose service web asks for a privileged container (every capability and device, "
        "no confinement) (privileged: true) (and host-mount=/ for compose service web), which "
        "this host's policy does not allow: pass --allow privileged --allow host-mount=/ for "
        f"this install, or add `allow: [privileged, host-mount=/]` to {root}/policy.yaml")
    assert "\n" not in info.value.message
    # allowed: one by the flag, one by the policy file; the default cap needs nothing
    _policy(root, "allow: ['host-mount=/']\n")
    out = _decide(reqs, root, ("privileged",))
    assert [(r.grant, how) for r, how in out.allowed] == [
        ("privileged", "--allow: privileged"), ("host-mount=/", f"{root}/policy.yaml: "
                                                                "host-mount=/")]
    # a narrower grant does not cover the host's root
    _policy(root, "allow: ['host-mount=/srv']\n")
    with pytest.raises(HostPolicyError, match="asks for the host path / mounted"):
        _decide(reqs, root, ("privileged",))


def test_running_as_root(tmp_path: Path) -> None:
    """Root by default only where it changes nothing (no current release, or the current one
    runs as root too); with `users:` only those accounts; `--allow user=root` for one run."""
    root = tmp_path / "root"
    as_root = hostreq.process_requests(Runtime(services=(Service("w", ("sleep", "9")),)))
    assert [(r.service, r.kind, r.value, r.source) for r in as_root] == [
        ("", "user", "root", "the profile names no `user`")]
    assert _decide(as_root, root, root_ok=True).allowed == ()  # allowed, by default
    with pytest.raises(HostPolicyError) as info:
        _decide(as_root, root, root_ok=False)
    assert info.value.message.startswith("the release asks for running as root on the host "
                                         "(the profile names no `user`)")
    assert "--allow user=root" in info.value.message
    assert _decide(as_root, root, ("user=root",), root_ok=False).allowed[0][1] == \
        "--allow: user=root"
    as_app = hostreq.process_requests(Runtime(services=(
        Service("w", ("sleep", "9")), Service("ops", ("sleep", "9"), user="root")), user="app"))
    assert [(r.service, r.value) for r in as_app] == [("", "app"), ("ops", "root")]
    _policy(root, "users: [app]\n")
    with pytest.raises(HostPolicyError, match="service ops asks for running as root"):
        _decide(as_app, root, root_ok=True)  # users: decides, not the current release
    _policy(root, "users: [root]\n")
    with pytest.raises(HostPolicyError, match="the release asks for running as app"):
        _decide(as_app, root)


def test_a_compose_release_that_runs_nothing_on_the_host_asks_for_no_account() -> None:
    compose = ComposeSpec(("stack/c.yml",))
    assert hostreq.process_requests(Runtime(compose=compose)) == []
    host_run = Runtime(compose=compose, migrations=(MigrationSpec("m", "command", command=("x",)),))
    assert [r.value for r in hostreq.process_requests(host_run)] == ["root"]
    in_service = Runtime(compose=compose, migrations=(
        MigrationSpec("m", "command", command=("x",), service="web"),))
    assert hostreq.process_requests(in_service) == []


# --- through the CLI: inspect, verify, install -----------------------------------------------

COMPOSE = b"""services:
  web:
    image: busybox:x
    privileged: true
    volumes: ['/:/host', './conf:/conf', '${PGSOCK}:/run/pg']
"""


def _compose_bundle(tmp_path: Path, key: Ed25519PrivateKey, compose: bytes = COMPOSE,
                    record: dict[str, Any] | str | None = "honest", name: str = "c") -> Path:
    files = {"files/stack/compose.yml": compose}
    host = hostreq.excerpt_of_files([("stack/compose.yml", compose)]) if record == "honest" \
        else record
    spec = ComposeSpec(("stack/compose.yml",), host=host if isinstance(host, dict) else None)
    (tmp_path / name).mkdir()
    path = tmp_path / name / "shop-2.0.0.bundle"
    write_bundle(path, key, files, version="2.0.0", sequence=20,
                 runtime=Runtime(compose=spec))
    return path


def test_inspect_and_verify_list_every_request(tmp_path: Path, key: Ed25519PrivateKey,
                                               pub: Path) -> None:
    path = _compose_bundle(tmp_path, key)
    for command in ("inspect", "verify"):
        shown = bundle(command, path, "--trust", pub, "--json")
        assert shown.rc == 0, shown.err
        doc = json.loads(shown.out)
        assert doc["host_requests_complete"] is True
        assert [(r["service"], r["kind"], r["value"], r["pending"], r["allow"])
                for r in doc["host_requests"]] == [
            ("web", "privileged", "", False, "privileged"),
            ("web", "host-mount", "/", False, "host-mount=/"),
            ("web", "release-mount", "stack/conf", False, None),
            ("web", "host-mount", "${PGSOCK}", True, None)], command
        human = bundle(command, path, "--trust", pub)
        assert human.rc == 0, human.err
        assert ("    service web: a privileged container (every capability and device, no "
                "confinement) (privileged: true)  [refused unless allowed: --allow privileged]"
                ) in human.out.splitlines(), human.out
        assert "    service web: the host path / mounted (volumes: /:/host)  [refused unless " \
               "allowed: --allow host-mount=/]" in human.out.splitlines()
        assert "    service web: the host path ${PGSOCK} mounted (volumes: ${PGSOCK}:/run/pg)  " \
               "[decided at install from the environment, then checked]" in human.out, human.out


def test_a_process_bundle_lists_the_account_it_runs_as(tmp_path: Path, key: Ed25519PrivateKey,
                                                       pub: Path) -> None:
    path = tmp_path / "p.bundle"
    write_bundle(path, key, {"files/a.txt": b"a"},
                 runtime=Runtime(services=(Service("w", ("sleep", "9")),), user="root"))
    shown = bundle("inspect", path, "--trust", pub, "--json")
    assert json.loads(shown.out)["host_requests"] == [
        {"service": "", "kind": "user", "value": "root", "source": "user: root",
         "refused_by_default": True, "pending": False, "allow": "user=root"}]
    human = bundle("inspect", path, "--trust", pub).out
    assert "    the release: running as root on the host (user: root)  [allowed while the " \
           "current release runs as root too, else --allow user=root]" in human.splitlines()


def test_an_older_bundle_says_its_compose_requests_are_not_recorded(
        tmp_path: Path, key: Ed25519PrivateKey, pub: Path) -> None:
    path = _compose_bundle(tmp_path, key, record=None)
    shown = bundle("inspect", path, "--trust", pub, "--json")
    doc = json.loads(shown.out)
    assert (doc["host_requests_complete"], doc["host_requests"]) == (False, [])
    assert "`bundle verify` reads them" in bundle("inspect", path, "--trust", pub).out
    verified = json.loads(bundle("verify", path, "--trust", pub, "--json").out)
    assert verified["host_requests_complete"] is True
    assert ("web", "privileged") in {(r["service"], r["kind"])
                                     for r in verified["host_requests"]}


def test_a_record_that_hides_what_the_files_ask_is_refused(tmp_path: Path,
                                                           key: Ed25519PrivateKey,
                                                           pub: Path) -> None:
    """A hostile signer records a harmless excerpt and ships a privileged compose file:
    `verify` refuses it (exit 23), `inspect` (envelope only) can only show the record."""
    lie = hostreq.excerpt_of_files([("stack/compose.yml", "services:\n  web: {image: x}\n")])
    path = _compose_bundle(tmp_path, key, record=lie)
    assert json.loads(bundle("inspect", path, "--trust", pub, "--json").out)[
        "host_requests"] == []
    done = bundle("verify", path, "--trust", pub)
    assert done.rc == HostPolicyError.exit_code, done.err
    assert "error: the signed manifest of shop 2.0.0 records other requests than its compose " \
           "files make of the host" in done.err


def _error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def installed(tmp_path: Path, key: Ed25519PrivateKey, pub: Path) -> Path:
    """A root whose current release (shop 1.0.0) runs nothing."""
    (tmp_path / "b1").mkdir()
    path = tmp_path / "b1" / "shop-1.0.0.bundle"
    write_bundle(path, key, {"files/a.txt": b"1"}, sequence=10)
    root = tmp_path / "target"
    done = bundle("install", path, "--trust", pub, "--root", root)
    assert done.rc == 0, done.err
    return root


def _runs_as(tmp_path: Path, key: Ed25519PrivateKey, user: str | None, version: str,
             sequence: int) -> Path:
    path = tmp_path / f"shop-{version}.bundle"
    write_bundle(path, key, {"files/a.txt": version.encode()}, version=version,
                 sequence=sequence, runtime=Runtime(
                     services=(Service("w", ("sleep", "600")),), user=user))
    return path


def test_a_process_bundle_that_runs_as_root(tmp_path: Path, key: Ed25519PrivateKey, pub: Path,
                                            installed: Path) -> None:
    """`users: [app]` in the policy: a release running as root is refused before anything
    changes (state.db included), and `--allow user=root` installs it (journaled)."""
    root = installed
    _policy(root, "users: [app]\n")
    path = _runs_as(tmp_path, key, "root", "2.0.0", 20)
    before = snapshot(root)
    done = bundle("install", path, "--trust", pub, "--root", root)
    assert done.rc == HostPolicyError.exit_code, done.err
    assert _error(done.err) == (
        "error: the release asks for running as root on the host (user: root), which this "
        "host's policy does not allow: pass --allow user=root for this install, or add "
        f"`allow: [user=root]` to {root}/policy.yaml")
    assert snapshot(root) == before
    bad = bundle("install", path, "--trust", pub, "--root", root, "--allow", "root")
    assert bad.rc == USAGE and "unknown kind 'root'" in bad.err
    done = bundle("install", path, "--trust", pub, "--root", root, "--allow", "user=root")
    try:
        assert done.rc == 0, done.err
        history = json.loads(bundle("history", "--root", root, "--json").out)["events"]
        assert any(e["step"] == "host-policy" and e["detail"] == "user=root for the release "
                   "(--allow: user=root)" for e in history), history
    finally:
        bundle("stop", "--root", root)


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every account can reach (tmp_path is 0700: `nobody` could not reach a
    root below it, and the install would be refused for that)."""
    base = Path(tempfile.mkdtemp(prefix="bundler-policy-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_without_a_policy_root_is_refused_only_over_a_release_that_names_a_user(
        tmp_path: Path, key: Ed25519PrivateKey, pub: Path, installed: Path,
        world: Path) -> None:
    """Without a policy file, a release with no `user` installs on a fresh root, or over one
    that names no `user` either (the seeds' profiles), but not over a current release that
    names an unprivileged account: that would bring root where there was none."""
    fresh = tmp_path / "fresh"
    done = bundle("install", _runs_as(tmp_path, key, None, "2.0.0", 20), "--trust", pub,
                  "--root", fresh)
    try:
        assert done.rc == 0, done.err
    finally:
        bundle("stop", "--root", fresh)
    # `installed` holds 1.0.0, which names no `user`: 2.0.0 (root) goes over it
    done = bundle("install", _runs_as(tmp_path, key, None, "2.0.0", 20), "--trust", pub,
                  "--root", installed)
    try:
        assert done.rc == 0, done.err
    finally:
        bundle("stop", "--root", installed)
    quiet = tmp_path / "shop-3.0.0.bundle"  # runs nothing, but names its account
    write_bundle(quiet, key, {"files/a.txt": b"3"}, version="3.0.0", sequence=30,
                 runtime=Runtime(user="nobody"))
    root = world / "root"
    done = bundle("install", quiet, "--trust", pub, "--root", root)
    assert done.rc == 0, done.err
    before = snapshot(root)
    escalate = _runs_as(tmp_path, key, None, "5.0.0", 50)
    done = bundle("install", escalate, "--trust", pub, "--root", root)
    assert done.rc == HostPolicyError.exit_code, done.err
    assert _error(done.err).startswith(
        "error: the release asks for running as root on the host (the profile names no "
        "`user`), which this host's policy does not allow: pass --allow user=root"), done.err
    assert snapshot(root) == before
