"""The registry of stages: the one list the CLI, the launchers and the pipeline read.

A stage names its config class, its entry point, its recipes, the validators that run before
any launch, the artifact directory it writes, the outputs later stages read from it, the
config fields that name its inputs, and the CLI flags that set config fields. Entries and
validators are "module:function" strings, imported when used (megatron-core is heavy), so
this module imports only the configs. Adding a stage is one entry here plus its package.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kiln import config as c
from kiln import overrides


@dataclass(frozen=True)
class Flag:
    """A CLI flag that sets one config field (`--input a.jsonl` appends to `inputs`)."""

    name: str  # "--input", or a bare name for a positional argument
    field: str  # dotted config path
    help: str = ""
    kind: str = "value"  # value | list (repeatable) | switch (store_true) | toggle (--x / --no-x)
    type: type = str
    choices: tuple = ()
    required: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    config: type
    entry: str  # "module:function(cfg) -> summary dict"
    distributed: bool  # one process per rank under torchrun / srun
    artifact: str | None  # the config field naming the directory (or file) the stage writes; None: it
    # writes none (serve) and so is no pipeline stage
    outputs: dict = field(default_factory=dict)  # name -> cfg -> path, what later stages read
    inputs: tuple = ()  # config fields naming upstream artifacts (wired by pipelines)
    validators: tuple = ()  # "module:function(cfg, check, problems)", run before any launch
    recipes: str | None = None  # "module:NAME", a dict of recipe name -> function
    flags: tuple = ()
    resolve: str | None = None  # "module:function(cfg) -> cfg", fills in what can be derived
    describe: str | None = None  # "module:function(cfg, world) -> str", what --dryrun prints
    aligner: bool = False  # can also run as NeMo-Aligner's trainer (--backend nemo-aligner)

    def run(self, cfg):
        return load(self.entry)(cfg)

    def artifact_dir(self, cfg) -> str:
        return _get(cfg, self.artifact)

    def output(self, cfg, name: str):
        if name not in self.outputs:
            raise KeyError(f"stage {self.name} has no output {name!r}; it has {', '.join(self.outputs)}")
        return self.outputs[name](cfg)

    def recipe_table(self) -> dict[str, Callable]:
        return load(self.recipes) if self.recipes else {}


def load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _get(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _sft_weights(cfg: c.SFTConfig) -> str:
    """What SFT hands on: the merged checkpoint when LoRA merges, else its checkpoints."""
    if cfg.lora.enabled and cfg.lora.merge:
        return f"{cfg.run_dir}/merged"
    return cfg.checkpoint_dir


TRAINING_VALIDATOR = "kiln.training.validate:rules"
_TRAINING_INPUTS = ("data.tokenizer", "checkpoint.load_weights")
_TRAINING_FLAGS = (
    Flag("--resume", "checkpoint.resume", "continue from the newest checkpoint", kind="switch"),
)
_TRAINING = {"distributed": True, "artifact": "run_dir", "resolve": "kiln.training.pretrain:resolve",
             "describe": "kiln.training.dryrun:describe", "flags": _TRAINING_FLAGS}
_RANKS_OUT = {"checkpoints": lambda cfg: cfg.checkpoint_dir}
_CONVERT_FLAGS = (
    Flag("--output", "output", "output directory (or .nemo file)", required=True),
    Flag("--tokenizer", "tokenizer", "tokenizer directory, when the source does not record one"),
)

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("curate", "normalize, filter, redact PII and deduplicate a raw corpus", c.CurateConfig,
          "kiln.curation.curate:curate", distributed=False, artifact="output_dir",
          outputs={"shards": lambda cfg: cfg.output_dir}, inputs=("inputs",),
          validators=("kiln.curation.curate:validate",),
          flags=(Flag("--input", "inputs", "JSONL (.jsonl, .gz, .zst), Parquet, WARC or HTML (repeatable)",
                      kind="list", required=True),
                 Flag("--output", "output_dir", "output directory: curated shards + curation_report.json",
                      required=True),
                 Flag("--text-field", "text_field"),
                 Flag("--pii", "pii", "redact emails, IP addresses, phone and card numbers", kind="switch"),
                 Flag("--strict", "strict", "fail on the first bad record instead of counting it", kind="switch"),
                 Flag("--workers", "workers", type=int))),
    Stage("prepare", "tokenize JSONL text into a Megatron indexed dataset", c.PrepareConfig,
          "kiln.data.prepare:prepare", distributed=False, artifact="output_dir",
          outputs={"prefix": lambda cfg: f"{cfg.output_dir}/{cfg.name}_text_document",
                   "tokenizer": lambda cfg: f"{cfg.output_dir}/tokenizer",
                   "heldout": lambda cfg: f"{cfg.output_dir}/heldout.jsonl"},
          inputs=("inputs", "tokenizer"), validators=("kiln.data.prepare:validate",),
          flags=(Flag("--input", "inputs", "JSONL file (.jsonl, .gz, .zst) or a directory of them (repeatable)",
                      kind="list", required=True),
                 Flag("--output", "output_dir", "output directory", required=True),
                 Flag("--text-field", "text_field"),
                 Flag("--tokenizer", "tokenizer", "a Hugging Face tokenizer directory (default: train a BPE)"),
                 Flag("--vocab-size", "vocab_size", "when training a tokenizer", type=int),
                 Flag("--name", "name", "dataset prefix name"))),
    Stage("pretrain", "pretrain a GPT with megatron-core", c.PretrainConfig, "kiln.training.pretrain:pretrain",
          outputs=_RANKS_OUT,
          inputs=("data.blend", *_TRAINING_INPUTS), validators=(TRAINING_VALIDATOR,),
          recipes="kiln.recipes.pretrain:RECIPES", **_TRAINING),
    Stage("sft", "supervised fine-tuning on chat data (full or LoRA), packed", c.SFTConfig, "kiln.alignment.sft:sft",
          outputs={"checkpoints": _sft_weights}, inputs=_TRAINING_INPUTS, validators=(TRAINING_VALIDATOR,),
          recipes="kiln.recipes.posttrain:SFT", **_TRAINING),
    Stage("dpo", "direct preference optimisation against a frozen reference", c.DPOConfig, "kiln.alignment.dpo:dpo",
          outputs=_RANKS_OUT, inputs=_TRAINING_INPUTS, validators=(TRAINING_VALIDATOR, "kiln.alignment.dpo:validate"),
          recipes="kiln.recipes.posttrain:DPO", aligner=True, **_TRAINING),
    Stage("rm", "train a reward model (scalar head, Bradley-Terry)", c.RMConfig, "kiln.alignment.rm:rm",
          outputs=_RANKS_OUT, inputs=_TRAINING_INPUTS, validators=(TRAINING_VALIDATOR,),
          recipes="kiln.recipes.posttrain:RM", aligner=True, **_TRAINING),
    Stage("rlhf", "RLHF: GRPO or PPO with generation on the Megatron model", c.RLHFConfig, "kiln.alignment.rlhf:rlhf",
          outputs=_RANKS_OUT, inputs=(*_TRAINING_INPUTS, "rlhf.reward"),
          validators=(TRAINING_VALIDATOR, "kiln.alignment.rlhf:validate"), recipes="kiln.recipes.posttrain:RLHF",
          aligner=True, **_TRAINING),
    Stage("convert", "HF <-> Megatron <-> .nemo, checked by logits", c.ConvertConfig,
          "kiln.conversion.convert:convert", distributed=False, artifact="output",
          outputs={"output": lambda cfg: cfg.output}, inputs=("source", "tokenizer"),
          validators=("kiln.conversion.convert:validate",),
          flags=(Flag("source", "source", "HF directory, kiln run/checkpoint directory, NeMo 2 directory or .nemo"),
                 Flag("--to", "to", choices=("hf", "megatron", "nemo2", "nemo"), required=True),
                 *_CONVERT_FLAGS,
                 Flag("--tp", "tp", "Megatron output: pad the vocabulary for this TP size", type=int),
                 Flag("--dtype", "dtype", "default: the source's", choices=("float32", "bfloat16", "float16")),
                 Flag("--verify", "verify", "compare logits (default: on below 2B parameters)", kind="toggle"))),
    Stage("export", "TensorRT-LLM checkpoint (+ build.sh), or HF for serving", c.ExportConfig,
          "kiln.export.trtllm:export", distributed=False, artifact="output",
          outputs={"output": lambda cfg: cfg.output}, inputs=("source", "tokenizer"),
          validators=("kiln.export.trtllm:validate",),
          flags=(Flag("source", "source", "HF directory, kiln checkpoint, NeMo 2 directory or .nemo"),
                 Flag("--to", "to", choices=("trtllm", "hf"), required=True),
                 *_CONVERT_FLAGS,
                 Flag("--tp", "tp", type=int), Flag("--pp", "pp", type=int),
                 Flag("--ep", "ep", "MoE: expert-parallel ranks within each TP group (divides --tp)", type=int),
                 Flag("--dtype", "dtype", choices=("float32", "float16", "bfloat16")),
                 Flag("--verify", "verify", "CPU reference forward over the rank shards vs the source "
                                            "(default: with float32)", kind="toggle"))),
    Stage("eval", "lm-eval suites (held-out bits per byte, demo, your tasks) on a model or an endpoint",
          c.EvalConfig, "kiln.evaluation.evaluate:evaluate", distributed=True, artifact="output_dir",
          outputs={"summary": lambda cfg: f"{cfg.output_dir}/eval_summary.json"},
          inputs=("source", "heldout", "tokenizer"), validators=("kiln.evaluation.evaluate:validate",),
          flags=(Flag("source", "source", "HF directory or kiln run / checkpoint directory (with --endpoint: "
                                          "the served model's tokenizer or HF directory)"),
                 Flag("--output", "output_dir", "output directory: results, samples, eval_summary.json"),
                 Flag("--suite", "suites", "heldout, demo (repeatable)", kind="list", choices=("heldout", "demo")),
                 Flag("--task", "tasks", "an lm-eval task YAML over local data (repeatable)", kind="list"),
                 Flag("--heldout", "heldout", "the heldout.jsonl `kiln prepare heldout=F` set aside"),
                 Flag("--endpoint", "endpoint", "score an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1"),
                 Flag("--baseline", "baseline", "an earlier eval_summary.json: fail on a regression"),
                 Flag("--tolerance", "tolerance", "how much worse than the baseline a metric may be", type=float),
                 Flag("--limit", "limit", "documents per task", type=int),
                 Flag("--tokenizer", "tokenizer", "when the source records none"),
                 Flag("--tp", "parallel.tp", "kiln checkpoint: tensor-parallel ranks", type=int),
                 Flag("--pp", "parallel.pp", "kiln checkpoint: pipeline-parallel ranks", type=int))),
    Stage("serve", "an OpenAI-compatible endpoint over an HF directory or a kiln checkpoint", c.ServeConfig,
          "kiln.serving.server:serve", distributed=True, artifact=None, inputs=("source", "tokenizer"),
          validators=("kiln.serving.server:validate",),
          flags=(Flag("source", "source", "HF directory, or a kiln run or checkpoint directory"),
                 Flag("--host", "host"), Flag("--port", "port", type=int),
                 Flag("--model-name", "model_name", "the `model` requests name (default: the source's name)"),
                 Flag("--tokenizer", "tokenizer", "for a checkpoint that records none"),
                 Flag("--chat-template", "chat_template", "tokenizer, llama3, chatml or plain"),
                 Flag("--tp", "parallel.tp", "kiln checkpoint: tensor-parallel ranks", type=int),
                 Flag("--pp", "parallel.pp", "kiln checkpoint: pipeline-parallel ranks", type=int),
                 Flag("--dtype", "dtype", choices=("float32", "float16", "bfloat16")),
                 Flag("--max-model-len", "max_model_len", type=int))),
)}


def stage_for(cfg) -> Stage:
    for stage in STAGES.values():
        if type(cfg) is stage.config:  # exact: SFTConfig is also a PretrainConfig
            return stage
    raise TypeError(f"{type(cfg).__name__} is not the config of any kiln stage ({', '.join(STAGES)})")


# A pipeline: one optional config per stage, in the registry's order, and `links` naming which
# stage output feeds which input field ("sft.checkpoint.load_weights": "pretrain.checkpoints").
PipelineConfig = dataclasses.make_dataclass(
    "PipelineConfig",
    [("name", str, field(default="pipeline")),
     *((name, stage.config | None, field(default=None)) for name, stage in STAGES.items() if stage.artifact),
     ("links", dict, field(default_factory=dict))],
    namespace={"__doc__": "The stages of a pipeline recipe, each optional, and the links between them.",
               "stages": lambda self: [(n, getattr(self, n)) for n in STAGES if getattr(self, n, None) is not None]},
)
PipelineConfig.__module__ = __name__


def dump_config(cfg, path: str | Path) -> Path:
    from kiln.artifact import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(overrides.to_dict(cfg), sort_keys=False))
    return Path(path)


def load_config(stage: Stage, path: str | Path):
    data = yaml.safe_load(Path(path).read_text()) or {}
    return overrides.from_dict(stage.config, data)

