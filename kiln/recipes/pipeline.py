"""Pipeline recipes: the stages of a run, and the links that feed each stage its upstream's output.

Links are resolved after overrides (kiln.pipeline.resolve_links), so changing a stage's own
fields (`pretrain.run_dir=...`) moves every stage that reads from it; the path fields a link
fills are left out of the recipe.
"""

from __future__ import annotations

from kiln.config import ConvertConfig, CurateConfig, EvalConfig, ExportConfig, PrepareConfig
from kiln.recipes import posttrain, pretrain
from kiln.stages import PipelineConfig

# target field <- stage.output (a list: the first stage present in the pipeline)
TRAINING_CHAIN = {
    "prepare.inputs": "curate.shards",
    "pretrain.data.blend": "prepare.prefix",
    "pretrain.data.tokenizer": "prepare.tokenizer",
    "sft.data.tokenizer": "prepare.tokenizer",
    "sft.checkpoint.load_weights": "pretrain.checkpoints",
    "dpo.data.tokenizer": "prepare.tokenizer",
    "dpo.checkpoint.load_weights": ["sft.checkpoints", "pretrain.checkpoints"],
    "rm.data.tokenizer": "prepare.tokenizer",
    "rm.checkpoint.load_weights": ["sft.checkpoints", "pretrain.checkpoints"],
    "rlhf.data.tokenizer": "prepare.tokenizer",
    "rlhf.checkpoint.load_weights": ["sft.checkpoints", "pretrain.checkpoints"],
    "rlhf.rlhf.reward": "rm.checkpoints",
    "convert.source": ["rlhf.checkpoints", "dpo.checkpoints", "sft.checkpoints", "pretrain.checkpoints"],
    "export.source": "convert.output",
    "eval.source": "convert.output",  # the HF export: what users deploy is what is scored
    "eval.heldout": "prepare.heldout",
}


def _chain(name: str, root: str, model, tuned: list, export_tp: int, suites: list, **front) -> PipelineConfig:
    """The stages after the data: `model` pretrains, `tuned` (SFT, DPO, RM, RLHF; None skips one) post-train, then
    HF and a TensorRT-LLM checkpoint (fp32, checked), and lm-eval `suites` on the HF export; every
    run directory under `root`."""
    model.run_dir = f"{root}/pretrain"
    for cfg in filter(None, tuned):
        cfg.run_dir = f"{root}/{cfg.run_dir.rsplit('/', 1)[-1]}"
    sft, dpo, rm, rlhf = tuned
    return PipelineConfig(
        name=name, **front, pretrain=model, sft=sft, dpo=dpo, rm=rm, rlhf=rlhf,
        convert=ConvertConfig(output=f"{root}/hf", to="hf"),
        export=ExportConfig(output=f"{root}/trtllm", tp=export_tp, dtype="float32"),
        eval=EvalConfig(output_dir=f"{root}/eval", suites=suites),
        links=dict(TRAINING_CHAIN),
    )


def tiny(root: str = "runs/demo") -> PipelineConfig:
    """The shipped demo corpus -> curated (normalized, filtered, deduplicated) -> tokenized
    dataset -> the tiny Llama -> SFT on chat data -> DPO -> a reward model -> GRPO against it ->
    a Hugging Face directory -> a TensorRT-LLM checkpoint (TP=2), each conversion checked by
    logits -> held-out bits per byte (5 % of the curated documents, never trained on) and the demo
    tasks, scored by lm-eval on the HF directory; CPU, minutes."""
    curate = CurateConfig(inputs=["data/demo/corpus.jsonl"], output_dir=f"{root}/curated")
    # the demo corpus comes from a small grammar: its repeated n-grams are by design, not boilerplate
    curate.filters.max_top_ngram_ratios = {}
    curate.filters.max_duplicate_ngram_ratios = {}
    tuned = [posttrain.sft_tiny(), posttrain.dpo_tiny(), posttrain.rm_tiny(), posttrain.rlhf_tiny()]
    return _chain("tiny", root, pretrain.tiny(), tuned, export_tp=2, suites=["heldout", "demo"], curate=curate,
                  prepare=PrepareConfig(output_dir=f"{root}/data", vocab_size=2048, heldout=0.05))


def smoke(root: str = "runs/smoke") -> PipelineConfig:
    """Every stage in CI-sized steps on ONE GPU, or on the CPU (pretraining as TP=2 on two
    processes): prepare -> pretrain -> SFT -> DPO -> reward model -> GRPO -> HF -> TensorRT-LLM ->
    the demo tasks (no data held out: the reference curves stay those of the whole corpus).
    On the CPU each training stage must reproduce its reference curve (tests/assets/losses/)."""
    tuned = [posttrain.sft_smoke(), posttrain.dpo_smoke(), posttrain.rm_smoke(), posttrain.rlhf_smoke()]
    prepare = PrepareConfig(inputs=["data/demo/corpus.jsonl"], output_dir=f"{root}/data", vocab_size=2048)
    return _chain("smoke", root, pretrain.smoke(), tuned, export_tp=1, suites=["demo"], prepare=prepare)


def tiny_moe(root: str = "runs/demo_moe") -> PipelineConfig:
    """The demo corpus -> tokenized -> the tiny mixture of experts pretrained with EP=2 -> SFT -> DPO
    -> a Hugging Face Mixtral directory -> a TensorRT-LLM checkpoint (TP=2 with the experts split
    by EP=2) -> the demo tasks; CPU, minutes."""
    prepare = PrepareConfig(inputs=["data/demo/corpus.jsonl"], output_dir=f"{root}/data", vocab_size=2048)
    pipeline = _chain("tiny_moe", root, pretrain.tiny_moe(), [posttrain.sft_moe_tiny(), posttrain.dpo_moe_tiny(),
                      None, None], export_tp=2, suites=["demo"], prepare=prepare)
    pipeline.export.ep = 2
    return pipeline


RECIPES = {"tiny": tiny, "smoke": smoke, "tiny_moe": tiny_moe}
