"""The SBOM of a real bundle (issue 21): a Debian 12 image made from Debian packages (the bare
target image) plus a layer that adds a Python distribution and an npm package and a later
layer that deletes another distribution (a real whiteout), a real wheel, npm packages from a
registry. The SBOM validates against the CycloneDX schema with the library's validator, lists
the image's dpkg packages with their layer, its Python and npm packages (not the deleted
one), the wheel and the npm packages; a tampered SBOM is refused like any other file."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.bare_target import Images
from tests.docker_fixtures import remove_images, unique
from tests.helpers import Project, bundle
from tests.npm_registry import LocalPackage, local_registry, make_project

# bare_images: debootstrap from a Debian mirror on a cold cache (tests.bare_image)
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.network]

DOCKERFILE = """\
FROM {base}
RUN mkdir -p /usr/lib/python3/dist-packages/sbomdemo-1.0.dist-info \\
      /usr/lib/python3/dist-packages/gone-2.0.dist-info /opt/app/node_modules/leftish \\
 && printf 'Metadata-Version: 2.1\\nName: sbomdemo\\nVersion: 1.0\\nLicense-Expression: MIT\\n' \\
      > /usr/lib/python3/dist-packages/sbomdemo-1.0.dist-info/METADATA \\
 && printf 'Metadata-Version: 2.1\\nName: gone\\nVersion: 2.0\\n' \\
      > /usr/lib/python3/dist-packages/gone-2.0.dist-info/METADATA \\
 && printf '{{"name":"leftish","version":"3.1.4","license":"ISC"}}' \\
      > /opt/app/node_modules/leftish/package.json
RUN rm -rf /usr/lib/python3/dist-packages/gone-2.0.dist-info
"""


def _image(client: Any, base: str, ref: str) -> str:
    data = DOCKERFILE.format(base=base).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    image, _ = client.images.build(fileobj=io.BytesIO(buf.getvalue()), custom_context=True,
                                   tag=ref, rm=True, pull=False)
    return str(image.id)


def _tamper(src: Path, dst: Path, member: str) -> None:
    """A copy of the bundle with one byte of `member` changed (same size, same headers)."""
    data = bytearray(src.read_bytes())
    with tarfile.open(src) as tf:
        offset = tf.getmember(member).offset_data
    data[offset + 10] ^= 0x01
    dst.write_bytes(bytes(data))


def test_the_sbom_of_a_bundle_with_a_debian_image(
        engine: Any, bare_images: Images, project: Project, keys: tuple[Path, Path],
        cache_dir: Path, tmp_path: Path) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    ref = f"bundler-test/sbom-{unique()}:1"
    image_id = _image(engine, bare_images.ref("bare"), ref)
    try:
        diff_ids = engine.api.inspect_image(image_id)["RootFS"]["Layers"]
        packages = [LocalPackage("tiny-greeter", "1.2.0", fields={"license": "Apache-2.0"})]
        with local_registry(tmp_path / "registry", packages) as reg:
            make_project(project.dir / "web", reg, {"dependencies": {"tiny-greeter": "1.2.0"}})
            profile = project.profile(extra=f"""\
images:
  - ref: {ref}
npm:
  - project: web
    registry: {reg.url}
""")
            built = bundle("build", profile, "--key", keys[0], "--out", tmp_path / "dist",
                           "--cache-dir", cache_dir, "--json")
        assert built.rc == 0, built.err
    finally:
        remove_images(engine, ref)
    path = Path(json.loads(built.out)["bundle"])
    shown = bundle("sbom", path, "--trust", keys[1])
    assert shown.rc == 0, shown.err
    assert JsonStrictValidator(SchemaVersion.V1_7).validate_str(shown.out) is None
    doc = json.loads(shown.out)
    by_ref = {c["bom-ref"]: c for c in doc["components"]}

    def props(c: dict[str, Any]) -> dict[str, str]:
        return {p["name"]: p["value"] for p in c.get("properties", [])}

    image = by_ref[f"image/{ref}"]
    assert image["type"] == "container" and image["version"] == image_id
    inside = [c for c in doc["components"] if props(c).get("bundler:where") == ref]
    debs = {c["name"]: c for c in inside if props(c)["bundler:kind"] == "image-deb"}
    # minbase + python3: Debian's own packages, by name, with a deb purl and a layer
    for name in ("libc6", "dpkg", "python3", "bash", "coreutils"):
        assert name in debs, sorted(debs)
    assert debs["libc6"]["purl"].startswith("pkg:deb/debian/libc6@")
    assert "distro=debian-12" in debs["libc6"]["purl"]
    assert props(debs["libc6"])["bundler:layer"] == diff_ids[0]
    py = {c["name"]: c for c in inside if props(c)["bundler:kind"] == "image-pypi"}
    assert "gone" not in py  # deleted by a later layer: its whiteout hides it
    assert py["sbomdemo"]["purl"] == "pkg:pypi/sbomdemo@1.0"
    assert props(py["sbomdemo"])["bundler:layer"] == diff_ids[1]
    assert py["sbomdemo"]["licenses"] == [{"expression": "MIT"}] or \
        py["sbomdemo"]["licenses"] == [{"license": {"id": "MIT"}}]
    npm_in = [c for c in inside if props(c)["bundler:kind"] == "image-npm"]
    assert [(c["name"], c["version"]) for c in npm_in] == [("leftish", "3.1.4")]
    assert by_ref["wheel/tinygreet-1.0-py3-none-any.whl"]["purl"] == "pkg:pypi/tinygreet@1.0"
    greeter = by_ref["npm/tiny-greeter@1.2.0"]
    assert greeter["purl"] == "pkg:npm/tiny-greeter@1.2.0"
    assert greeter["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    assert greeter["hashes"][0]["alg"] == "SHA-512"
    deps = {d["ref"]: set(d.get("dependsOn", ())) for d in doc["dependencies"]}
    assert {c["bom-ref"] for c in inside} == deps[f"image/{ref}"]

    # tampered: verification refuses it like any other member (exit 7), and so does `sbom`
    bad = tmp_path / "tampered.bundle"
    _tamper(path, bad, "sbom/bom.cdx.json")
    for args in (("verify", bad), ("sbom", bad), ("inspect", bad)):
        refused = bundle(*args, "--trust", keys[1], "--json")
        assert refused.rc == 7, (args, refused.out, refused.err)
        assert json.loads(refused.out or refused.err)["error"] == "IntegrityError"
