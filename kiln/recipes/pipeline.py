"""Pipeline recipes: the stages of a run, each pointed at the artifacts of the one before."""

from __future__ import annotations

from kiln.config import ConvertConfig, CurateConfig, ExportConfig, PrepareConfig
from kiln.pipeline import PipelineConfig
from kiln.recipes import posttrain, pretrain


def tiny(root: str = "runs/demo") -> PipelineConfig:
    """The shipped demo corpus -> curated (normalized, filtered, deduplicated) -> tokenized
    dataset -> the tiny Llama -> SFT on chat data -> DPO -> a reward model -> GRPO against it ->
    a Hugging Face directory -> a TensorRT-LLM checkpoint (TP=2), each conversion checked by
    logits; CPU, minutes."""
    data = f"{root}/data"
    model = pretrain.tiny()
    model.run_dir = f"{root}/pretrain"
    model.data.blend = [f"{data}/corpus_text_document"]
    model.data.tokenizer = f"{data}/tokenizer"
    tuned = [posttrain.sft_tiny(), posttrain.dpo_tiny(), posttrain.rm_tiny(), posttrain.rlhf_tiny()]
    sft, dpo, rm, rlhf = tuned
    for cfg in tuned:
        cfg.run_dir = f"{root}/{cfg.run_dir.rsplit('/', 1)[-1]}"
        cfg.data.tokenizer = f"{data}/tokenizer"
    sft.checkpoint.load_weights = f"{model.run_dir}/checkpoints"
    for cfg in (dpo, rm, rlhf):
        cfg.checkpoint.load_weights = f"{sft.run_dir}/checkpoints"
    rlhf.rlhf.reward = f"{rm.run_dir}/checkpoints"
    curate = CurateConfig(inputs=["data/demo/corpus.jsonl"], output_dir=f"{root}/curated")
    # the demo corpus comes from a small grammar: its repeated n-grams are by design, not boilerplate
    curate.filters.max_top_ngram_ratios = {}
    curate.filters.max_duplicate_ngram_ratios = {}
    return PipelineConfig(
        name="tiny",
        curate=curate,
        prepare=PrepareConfig(inputs=[f"{curate.output_dir}/curated_00000.jsonl"], output_dir=data, vocab_size=2048),
        pretrain=model,
        sft=sft,
        dpo=dpo,
        rm=rm,
        rlhf=rlhf,
        convert=ConvertConfig(source=f"{rlhf.run_dir}/checkpoints", output=f"{root}/hf", to="hf"),
        export=ExportConfig(source=f"{root}/hf", output=f"{root}/trtllm", tp=2, dtype="float32"),
    )


RECIPES = {"tiny": tiny}
