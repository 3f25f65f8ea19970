"""Pipeline recipes: the stages of a run, each pointed at the artifacts of the one before."""

from __future__ import annotations

from kiln.config import ConvertConfig, ExportConfig, PrepareConfig
from kiln.pipeline import PipelineConfig
from kiln.recipes import pretrain


def tiny(root: str = "runs/demo") -> PipelineConfig:
    """The shipped demo corpus -> tokenized dataset -> the tiny Llama -> a Hugging Face directory
    -> a TensorRT-LLM checkpoint (TP=2), each conversion checked by logits; CPU, minutes."""
    data = f"{root}/data"
    model = pretrain.tiny()
    model.run_dir = f"{root}/pretrain"
    model.data.blend = [f"{data}/corpus_text_document"]
    model.data.tokenizer = f"{data}/tokenizer"
    return PipelineConfig(
        name="tiny",
        prepare=PrepareConfig(inputs=["data/demo/corpus.jsonl"], output_dir=data, vocab_size=2048),
        pretrain=model,
        convert=ConvertConfig(source=f"{model.run_dir}/checkpoints", output=f"{root}/hf", to="hf"),
        export=ExportConfig(source=f"{root}/hf", output=f"{root}/trtllm", tp=2, dtype="float32"),
    )


RECIPES = {"tiny": tiny}
