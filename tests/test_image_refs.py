"""One image-reference parse (bundler.bundle.imageref): what `bundle validate` accepts in a
profile's `images:` is exactly what `bundle build` takes, bad forms named with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundler.build.profile import load_profile
from bundler.build.resolve.images import ImageSpec, _validate
from bundler.errors import BuildError, ProfileError
from tests.helpers import bundle

DIGEST = "sha256:" + "ab" * 32
REF_LINE = 5  # the line of `ref:` in _profile's text


def _profile(tmp_path: Path, *images: tuple[str, str]) -> Path:
    path = tmp_path / "bundle.yaml"
    path.write_text("schema: 1\nname: shop\nversion: 1.0.0\nimages:\n" + "".join(
        f"  - ref: '{ref}'\n    source: {source}\n" for ref, source in images))
    return path


BAD = [
    ("app:1:2", "engine"),                        # two tags
    ("App:1", "engine"),                          # uppercase repository
    ("shop/App:1", "registry"),
    ("app:", "engine"),                           # empty tag
    ("localhost:5000/app:", "registry"),
    ("app@sha256:abc", "registry"),               # digest too short
    (f"app@md5:{'0' * 32}", "registry"),          # not a sha256 digest
    (f"app@{DIGEST}", "engine"),                  # a digest pins only a registry pull
    (f"app:1@{DIGEST}", "archive"),
    ("localhost:port/app:1", "registry"),         # registry port not a number
    ("app:-1", "engine"),                         # a tag starts with a letter, digit or _
]
GOOD = [
    ("app:1", "engine"),
    ("localhost:5000/app:1", "registry"),         # registry with port
    ("localhost:5000/team/app", "registry"),      # port, no tag: latest
    ("Registry.Example.com:443/app:1.2", "registry"),  # the host part may be uppercase
    ("app:V1_rc", "engine"),                      # so may the tag
    (f"app@{DIGEST}", "registry"),
    (f"localhost:5000/app:1@{DIGEST}", "registry"),
]


@pytest.mark.parametrize(("ref", "source"), BAD, ids=[f"{r} ({s})" for r, s in BAD])
def test_validate_and_build_refuse_the_same_bad_reference(tmp_path: Path, ref: str,
                                                          source: str) -> None:
    path = _profile(tmp_path, (ref, source))
    if source == "archive":
        path.write_text(path.read_text() + "    archive: app.tar\n")
    with pytest.raises(ProfileError) as info:
        load_profile(path, check_files=False)
    got = [p for p in info.value.problems if p.message.startswith("images[0].ref: ")]
    assert [(p.file, p.line) for p in got] == [(str(path), REF_LINE)], info.value.problems
    assert ref in got[0].message and "name:tag" in got[0].hint
    archive = tmp_path / "app.tar" if source == "archive" else None
    if archive is not None:
        archive.write_bytes(b"")
    with pytest.raises(BuildError) as built:
        _validate([ImageSpec(ref, source=source, archive=archive)])
    assert ref in built.value.message


@pytest.mark.parametrize(("ref", "source"), GOOD, ids=[f"{r} ({s})" for r, s in GOOD])
def test_validate_and_build_take_the_same_good_reference(tmp_path: Path, ref: str,
                                                         source: str) -> None:
    profile = load_profile(_profile(tmp_path, (ref, source)), check_files=False)
    assert [i.ref for i in profile.images] == [ref]
    _validate([ImageSpec(ref, source=source)])


def test_one_image_spelt_two_ways_is_refused_by_both(tmp_path: Path) -> None:
    images = [("postgres:15", "registry"), ("docker.io/library/postgres:15", "registry")]
    with pytest.raises(ProfileError) as info:
        load_profile(_profile(tmp_path, *images), check_files=False)
    assert any("image 'postgres:15' appears twice" in p.message for p in info.value.problems)
    with pytest.raises(BuildError, match="listed twice"):
        _validate([ImageSpec(ref, source=source) for ref, source in images])


def test_bundle_validate_names_the_line_of_a_bad_reference(tmp_path: Path) -> None:
    path = _profile(tmp_path, ("localhost:5000/app:1", "registry"), ("app:1:2", "engine"))
    result = bundle("validate", path)
    assert result.rc == ProfileError.exit_code, result.err
    assert f"{path}:{REF_LINE + 2}: images[1].ref: 'app:1:2' is not a valid image reference" \
        in result.err, result.err
    assert "images[0]" not in result.err
