"""The Dockerfile's content (no Docker engine runs here: the image itself is built on GPU hosts)."""

from __future__ import annotations

import re
import subprocess

import tomllib

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def test_base_image_is_a_pinned_ngc_nemo_tag_and_jobs_default_to_the_kiln_image():
    image = re.search(r"^ARG NEMO_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/nemo:\d{2}\.\d{2}(\.\d+)?", image), image
    from kiln.launch.config import KILN_IMAGE, NGC_BASE_IMAGE, LaunchConfig

    assert image == NGC_BASE_IMAGE
    # the stock image has no kiln and another megatron-core: jobs run in the image built from it
    assert LaunchConfig().docker.image == KILN_IMAGE == "kiln:0.1.0"


def test_pins_match_pyproject_and_megatron_cores_own_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    for name, arg in (("megatron-core", "MEGATRON_CORE_VERSION"), ("nemo-run", "NEMO_RUN_VERSION")):
        pinned = next(d for d in deps if d.startswith(name + "=="))
        assert f"ARG {arg}={pinned.split('==')[1]}" in DOCKERFILE
    import kiln

    assert f"megatron-core=={kiln.MEGATRON_CORE}" in deps  # what ranks check at start
    # the gpu extra's TransformerEngine range is the one megatron-core 0.16.1 declares
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    declared = Requirement(next(r for r in requires("megatron-core") if r.startswith("transformer-engine")))
    gpu = Requirement(next(d for d in project["optional-dependencies"]["gpu"] if d.startswith("transformer-engine")))
    for release in ("2.8.0", "2.9.0", "2.9.1", "2.11.0", "2.11.9", "2.12.0", "3.0.0"):
        assert (release in declared.specifier) == (release in gpu.specifier), (release, gpu, declared)


def test_installs_without_replacing_the_images_torch_and_checks_the_imported_modules():
    for line in re.findall(r"pip install[^\n\\]*", DOCKERFILE):
        assert "--no-deps" in line, line
    assert "torch" not in " ".join(re.findall(r"pip install[^&]*", DOCKERFILE)).replace("torch.", "")
    # the version Python imports, and where from: the image's own megatron-core is on its PYTHONPATH
    assert "from megatron.core.package_info import __version__" in DOCKERFILE
    assert "megatron.core.__file__.startswith('${KILN_SITE}')" in DOCKERFILE
    assert "ENV PYTHONPATH=${KILN_SITE}" in DOCKERFILE and "transformer_engine.pytorch, megatron.core" in DOCKERFILE


def test_entrypoint_runs_kiln_or_the_given_executable(tmp_path):
    assert 'ENTRYPOINT ["kiln-entrypoint"]' in DOCKERFILE
    fake = tmp_path / "kiln"
    fake.write_text("#!/bin/sh\necho kiln-called \"$@\"\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    run = lambda *a: subprocess.run(["bash", str(ROOT / "docker/entrypoint.sh"), *a],  # noqa: E731
                                    capture_output=True, text=True, env=env).stdout.strip()
    assert run("pretrain", "--recipe", "tiny") == "kiln-called pretrain --recipe tiny"
    assert run("kiln", "pipeline", "status") == "kiln-called pipeline status"
    assert run("echo", "direct") == "direct"
