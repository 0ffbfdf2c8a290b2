"""The neutral modules both sides use: one image-name normaliser, one platform-tag parser."""

from __future__ import annotations

import pytest

from bundler.bundle.imageref import canonical_ref, canonical_tag, familiar_name
from bundler.bundle.models import Target
from bundler.bundle.platforms import Host, PlatformTag, parse_platform, wheel_platforms

POSTGRES = ["postgres:15", "library/postgres:15", "docker.io/postgres:15",
            "docker.io/library/postgres:15", "index.docker.io/postgres:15",
            "index.docker.io/library/postgres:15"]


@pytest.mark.parametrize("spelling", POSTGRES)
def test_docker_hub_spellings_are_one_image(spelling: str) -> None:
    # canonical_tag: the install-time check (docker load) and the resolver;
    # canonical_ref: the build-time compose check. Same answer for every spelling.
    assert canonical_tag(spelling) == "postgres:15"
    assert canonical_ref(spelling) == "postgres:15"


def test_the_compose_check_and_the_install_check_agree() -> None:
    from bundler.build.resolve.compose import ComposeFacts, check

    facts = ComposeFacts(services=("db",), images={"db": "index.docker.io/postgres:15"},
                         built=(), ports=())
    check(facts, ["library/postgres:15"], [])  # carried under another spelling: accepted
    check(facts, ["docker.io/library/postgres:15"], [])


@pytest.mark.parametrize(("ref", "want"), [
    ("postgres", "postgres:latest"),
    ("myorg/app:1", "myorg/app:1"),
    ("docker.io/myorg/app:1", "myorg/app:1"),
    ("library/team/app:1", "library/team/app:1"),      # only a one-level library/ is Hub's
    ("127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app:latest"),
    ("localhost/app:2", "localhost/app:2"),
    ("ghcr.io/library/x:1", "ghcr.io/library/x:1"),     # another registry keeps its path
])
def test_other_names_keep_their_registry(ref: str, want: str) -> None:
    assert canonical_tag(ref) == want


def test_a_digest_is_part_of_the_identity_for_compose() -> None:
    digest = "sha256:" + "a" * 64
    assert canonical_ref(f"app@{digest}") == canonical_ref(f"docker.io/library/app@{digest}")
    assert canonical_ref(f"app@{digest}") != canonical_ref("app")
    assert canonical_tag(f"app@{digest}") == "app:latest"
    assert familiar_name("index.docker.io/library/redis") == "redis"


def test_a_bad_reference_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        canonical_tag("Not/Valid:tag")


@pytest.mark.parametrize(("tag", "parsed"), [
    ("manylinux_2_28_x86_64", PlatformTag("manylinux", (2, 28), "x86_64")),
    ("musllinux_1_2_aarch64", PlatformTag("musllinux", (1, 2), "aarch64")),
    ("linux_x86_64", PlatformTag("linux", None, "x86_64")),
])
def test_platform_tags_parse_in_one_place(tag: str, parsed: PlatformTag) -> None:
    assert parse_platform(tag) == parsed
    assert str(parsed) == tag


def test_platform_facts() -> None:
    many = parse_platform("manylinux_2_17_aarch64")
    assert (many.libc, many.glibc, many.docker_platform, many.node_cpu) == \
        ("glibc", (2, 17), "linux/arm64", "arm64")
    musl = parse_platform("musllinux_1_2_x86_64")
    assert (musl.libc, musl.glibc, musl.docker_platform, musl.node_cpu) == \
        ("musl", None, "linux/amd64", "x64")
    assert wheel_platforms("manylinux_2_17_x86_64")[:2] == \
        ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert wheel_platforms("musllinux_1_1_x86_64") == \
        ["musllinux_1_1_x86_64", "musllinux_1_0_x86_64", "linux_x86_64"]
    with pytest.raises(ValueError):
        parse_platform("win_amd64")


def test_uv_and_policy_read_the_same_tag() -> None:
    from bundler.build.resolve.pylock import uv_platform
    from bundler.errors import PolicyError
    from bundler.install.policy import check_target

    t = Target(python="3.11", platform="manylinux_2_28_aarch64")
    assert uv_platform(t) == "aarch64-manylinux_2_28"
    check_target(t, Host("aarch64", "glibc", (2, 36)))
    with pytest.raises(PolicyError, match=r"glibc 2\.28"):
        check_target(t, Host("aarch64", "glibc", (2, 17)))
    with pytest.raises(PolicyError, match="this host is x86_64"):
        check_target(t, Host("x86_64", "glibc", (2, 36)))
    with pytest.raises(PolicyError, match="musl"):
        check_target(Target(platform="musllinux_1_2_x86_64"), Host("x86_64", "glibc", (2, 36)))
