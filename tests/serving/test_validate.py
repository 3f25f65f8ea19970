"""`kiln serve`'s checks before any process group starts: each problem names the field and the fix."""

from __future__ import annotations

import pytest

from kiln.config import ParallelConfig, ServeConfig
from kiln.errors import ConfigError
from kiln.serving.server import validate
from kiln.validation import Check, ensure_valid
from tests.serving.models import hf_model, megatron_checkpoint


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-validate")
    hf = hf_model(root / "hf")
    return hf, megatron_checkpoint(hf, root / "kiln")


def problems(cfg: ServeConfig, world: int = 1) -> str:
    with pytest.raises(ConfigError) as err:
        ensure_valid(cfg, validate, check=Check(world_size=world))
    return str(err.value)


def test_valid_sources_pass(sources):
    ensure_valid(ServeConfig(source=str(sources[0])), validate)
    ensure_valid(ServeConfig(source=str(sources[1]), parallel=ParallelConfig(tp=2)), validate,
                 check=Check(world_size=2))


def test_each_problem_names_its_field_and_fix(sources, tmp_path):
    hf, kiln = map(str, sources)
    assert "an HF directory is served by transformers in one process" in problems(
        ServeConfig(source=hf, parallel=ParallelConfig(tp=2)), world=2)
    message = problems(ServeConfig(source=kiln, parallel=ParallelConfig(tp=3)), world=3)
    assert "parallel.tp=3 does not divide the model's 4 attention heads" in message
    assert "parallel.tp=3 does not divide the model's 2 KV heads" in message
    assert "set --nproc 2" in problems(ServeConfig(source=kiln, parallel=ParallelConfig(tp=2)), world=1)
    assert "max_model_len=4096 exceeds the model's 128 positions" in problems(ServeConfig(source=hf,
                                                                                          max_model_len=4096))
    assert "chat_template='nope'" in problems(ServeConfig(source=hf, chat_template="nope"))
    assert "port=0 must be in [1, 65535]" in problems(ServeConfig(source=hf, port=0))
    assert f"source: {tmp_path / 'absent'} does not exist" in problems(ServeConfig(source=str(tmp_path / "absent")))
    assert "source is empty" in problems(ServeConfig())


def test_the_serve_stage_is_registered_but_no_pipeline_stage():
    from kiln.cli import build_parser
    from kiln.stages import STAGES, PipelineConfig

    assert STAGES["serve"].artifact is None and not hasattr(PipelineConfig(), "serve")
    args = build_parser().parse_args(["serve", "runs/hf", "--port", "9000", "--tp", "2"])
    assert (args.source, args.port, args.tp) == ("runs/hf", 9000, 2)


def test_a_multi_rank_dry_run_prints_the_torchrun_command_that_would_serve(sources, capsys):
    from kiln.cli import main

    assert main(["serve", str(sources[1]), "--tp", "2", "--port", "9001", "--dryrun"]) == 0
    out = capsys.readouterr().out
    assert "# runs in the foreground" in out and "torch.distributed.run --nproc-per-node 2" in out
    assert f"-m kiln.cli serve {sources[1]} --config" in out and "NeMo" not in out
    assert "nothing was started" in out
