"""The Dockerfile's content (no Docker engine runs here: the image itself is built on GPU hosts)."""

from __future__ import annotations

import re
import subprocess

import tomllib

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def test_base_image_is_a_pinned_ngc_nemo_tag():
    image = re.search(r"^ARG NEMO_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/nemo:\d{2}\.\d{2}(\.\d+)?", image), image
    from kiln.launch.config import NGC_IMAGE

    assert image == NGC_IMAGE  # the Docker and Slurm executors default to the same image


def test_pins_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, arg in (("megatron-core", "MEGATRON_CORE_VERSION"), ("nemo-run", "NEMO_RUN_VERSION")):
        pinned = next(d for d in deps if d.startswith(name + "=="))
        assert f"ARG {arg}={pinned.split('==')[1]}" in DOCKERFILE


def test_installs_without_replacing_the_images_torch():
    for line in re.findall(r"pip install[^\n\\]*", DOCKERFILE):
        assert "--no-deps" in line, line
    assert "torch" not in " ".join(re.findall(r"pip install[^&]*", DOCKERFILE)).replace("torch.", "")
    assert "assert v('megatron-core') ==" in DOCKERFILE and "import transformer_engine.pytorch" in DOCKERFILE


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
