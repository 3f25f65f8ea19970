"""Typed configs shared by the stages.

Each stage's config is a tree of these dataclasses, built by a recipe function
(`kiln.recipes.pretrain.tiny()`), changed with dotted overrides
(`kiln.overrides.apply`), and checked by `validate()` before any process group
or tensor exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the values and a fix."""


class StageConfig:
    """Base of every stage's config: `cfg.to_partial()` is the stage as a NeMo-Run task,
    ready for `run.run(..., executor=...)` or `run.Experiment.add`."""

    def to_partial(self):
        from kiln.launch.task import to_partial

        return to_partial(self)


@dataclass
class RopeScaling:
    """Llama 3.1-style RoPE frequency scaling (megatron-core `rope_scaling`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    """A decoder-only transformer. GPT-2 and Llama are presets of these fields."""

    # shape
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int | None = None  # None: 4 x hidden (GELU) or Llama's 8/3 rule (SwiGLU)
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # KV heads for grouped-query attention; None = MHA
    kv_channels: int | None = None  # head dim; None = hidden_size / num_attention_heads
    # vocabulary: None takes the tokenizer's size; the embedding is padded for TP
    vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 1024
    # family-defining choices
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_epsilon: float = 1e-5
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"  # gelu_tanh: GPT-2's gelu_new
    position_embedding: Literal["learned_absolute", "rope"] = "learned_absolute"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    # init and regularisation
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    @property
    def heads_kv(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "swiglu":  # Llama: 2/3 of 4h, rounded up to a multiple of 256
            return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)
        return 4 * self.hidden_size

    def padded_vocab_size(self, tp: int) -> int:
        """The embedding rows: vocab rounded up so every TP rank holds an equal, aligned slice."""
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is unset: set it, or give data.tokenizer so kiln reads it")
        multiple = self.make_vocab_size_divisible_by * tp
        return multiple * math.ceil(self.vocab_size / multiple)


@dataclass
class ParallelConfig:
    """How ranks split the model. DP is what is left of the world: world / (TP x PP)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline stages per PP rank (interleaved 1F1B)
    sequence_parallel: bool = False
    world_size: int | None = None  # None: from the launcher's environment

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)


@dataclass
class OptimizerConfig:
    name: Literal["adam", "adamw"] = "adamw"  # adamw: decoupled weight decay
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # max global grad norm; 0 turns clipping off
    distributed: bool = False  # shard optimizer state over DP (megatron distributed optimizer)


@dataclass
class ScheduleConfig:
    """LR schedule: linear warmup, then cosine decay or warmup-stable-decay (WSD)."""

    style: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: train.steps
    wsd_decay_steps: int | None = None  # WSD only: length of the final decay phase
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"


@dataclass
class DataConfig:
    """Megatron indexed datasets. `blend` is [weight, prefix, weight, prefix, ...] or [prefix]."""

    blend: list = field(default_factory=list)
    split: str = "98,2,0"  # train, valid, test weights
    tokenizer: str | None = None  # a Hugging Face tokenizer directory
    mock: bool = False  # megatron-core's MockGPTDataset: benchmarks only
    cache_dir: str | None = None  # where megatron-core caches sample indices


@dataclass
class TrainConfig:
    steps: int = 20
    micro_batch_size: int = 2
    global_batch_size: int = 8
    seq_length: int = 128
    seed: int = 1234
    eval_interval: int = 0  # 0: no validation during training
    eval_steps: int = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    stop_after_steps: int | None = None  # end the process early (tests of resume)
    # on these signals: finish the step, checkpoint, exit 75 so the job script requeues
    preempt_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: <run_dir>/checkpoints
    save_interval: int = 0  # 0: only at the end
    # resume continues from the newest valid checkpoint in `dir` when there is one; otherwise the
    # run starts from load_weights (weights only, fresh optimizer) or from scratch. Slurm jobs
    # always resume, so a requeued fine-tuning run continues and a first one starts from its base.
    resume: bool = False
    load_weights: str | None = None  # a checkpoint dir; also DPO's and RLHF's frozen reference
    keep_last: int | None = None  # None: keep every checkpoint


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard: bool = True
    progress_bar: bool | None = None  # None: only when stdout is a terminal
    loss_spike_factor: float = 3.0  # warn when loss > factor x running mean; 0 turns it off


@dataclass
class PretrainConfig(StageConfig):
    run_dir: str = "runs/pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run_dir}/checkpoints"

    def num_microbatches(self, world_size: int) -> int:
        dp = self.parallel.dp(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)


@dataclass
class PrepareConfig(StageConfig):
    """`kiln prepare`: JSONL text -> Megatron indexed dataset (.bin/.idx) + tokenizer directory."""

    inputs: list = field(default_factory=list)  # JSONL files (.jsonl, .jsonl.gz)
    output_dir: str = "data/prepared"
    name: str = "corpus"  # output prefix: <output_dir>/<name>_text_document
    text_field: str = "text"
    tokenizer: str | None = None  # a tokenizer directory; None trains a byte-level BPE
    vocab_size: int = 8192  # only when training a tokenizer
    batch_size: int = 1000  # documents per tokenizer call


@dataclass
class ConvertConfig(StageConfig):
    """`kiln convert`: one checkpoint format to another, verified by logits."""

    source: str = ""
    output: str = ""
    to: Literal["hf", "megatron", "nemo2", "nemo"] = "megatron"
    tp: int = 1  # the layout the Megatron output is padded for (vocab rows: multiple of 128 x TP)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None keeps the source's
    verify: bool | None = None  # None: on for models under 2B parameters
    tokenizer: str | None = None  # for Megatron sources without a recorded tokenizer
    max_shard_gb: float = 5.0  # HF output shard size


@dataclass
class ExportConfig(StageConfig):
    """`kiln export`: a TensorRT-LLM checkpoint (+ build.sh), or an HF directory for serving."""

    source: str = ""  # HF directory, kiln Megatron checkpoint, NeMo 2 directory or .nemo
    output: str = ""
    to: Literal["trtllm", "hf"] = "trtllm"
    tp: int = 1
    pp: int = 1
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    verify: bool | None = None  # CPU reference forward over the rank shards vs the source (fp32 only)
    max_batch_size: int = 8
    max_input_len: int = 2048
    max_seq_len: int = 4096
    tokenizer: str | None = None


@dataclass
class ChatDataConfig:
    """Fine-tuning and alignment data: JSONL records, rendered with a chat template.

    SFT reads `messages` ([{role, content}], system/user/assistant, ending on assistant) or
    `prompt` + `completion`; DPO and reward models read `prompt` + `chosen` + `rejected`
    (strings, or message lists); RLHF reads `prompt` (a string or messages).
    """

    train: str = ""
    valid: str | None = None  # None: no validation
    tokenizer: str | None = None  # a Hugging Face tokenizer directory
    # 'tokenizer' uses the tokenizer's own Jinja chat_template; built-ins: chatml, llama3, plain
    chat_template: str = "chatml"
    packing: bool = True  # SFT: several examples per sequence, attention kept within each
    strict: bool = False  # stop at the first bad record instead of skipping and counting it


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    merge: bool = True  # also write <run_dir>/merged: a plain checkpoint with the adapters folded in


@dataclass
class FinetuneConfig(PretrainConfig):
    """What SFT, DPO, reward-model and RLHF runs share: pretraining's engine config, chat data,
    and the weights to start from (checkpoint.load_weights)."""

    data: ChatDataConfig = field(default_factory=ChatDataConfig)


@dataclass
class SFTConfig(FinetuneConfig):
    run_dir: str = "runs/sft"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DPOLossConfig:
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only)
    rpo_alpha: float | None = None  # RPO: add rpo_alpha x the NLL of the chosen answer
    reference: Literal["cached", "online"] = "cached"  # cached: one pass before training


@dataclass
class DPOConfig(FinetuneConfig):
    run_dir: str = "runs/dpo"
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)


@dataclass
class RMConfig(FinetuneConfig):
    """A reward model: the GPT with a scalar head, trained with the Bradley-Terry loss."""

    run_dir: str = "runs/rm"


@dataclass
class GenerationConfig:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    stop_token_ids: list = field(default_factory=list)  # besides the tokenizer's EOS


@dataclass
class RLHFAlgoConfig:
    """GRPO (group-relative advantages, no critic) or PPO (a critic, GAE); one optimizer step
    per batch of fresh rollouts."""

    algorithm: Literal["grpo", "ppo"] = "grpo"
    # reward: a reward-model checkpoint directory (from `kiln rm`), or "module:function"
    # taking (prompts: list[str], completions: list[str]) -> list[float]
    reward: str = ""
    group_size: int = 4  # GRPO: completions per prompt, advantages relative to the group
    prompts_per_step: int = 4
    kl_coef: float = 0.05  # penalty on log(pi / pi_ref), per token
    clip_eps: float = 0.2
    # PPO: the critic starts from the reward model (or the policy's weights, for a reward
    # function) with a fresh scalar head, and trains with the policy's optimizer settings
    gamma: float = 1.0
    lam: float = 0.95
    value_clip_eps: float = 0.2
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class RLHFConfig(FinetuneConfig):
    run_dir: str = "runs/rlhf"
    rlhf: RLHFAlgoConfig = field(default_factory=RLHFAlgoConfig)


@dataclass
class FilterConfig:
    """NeMo Curator's heuristic filters and language id; thresholds default to Gopher / C4."""

    enabled: bool = True
    # kiln: Curator's filters in kiln's worker pool; curator: Curator's pipeline on Ray
    engine: Literal["kiln", "curator"] = "kiln"
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_to_word_ratio: float = 0.1
    max_non_alpha_numeric_to_text_ratio: float = 0.25
    max_repeated_line_fraction: float = 0.7
    max_repeated_paragraphs_ratio: float = 0.7
    # n (as a string: the config travels as JSON/YAML) -> max ratio
    max_top_ngram_ratios: dict = field(default_factory=lambda: {"2": 0.2, "3": 0.18, "4": 0.16})
    max_duplicate_ngram_ratios: dict = field(default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12,
                                                                      "9": 0.11, "10": 0.10})
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_boilerplate_string_ratio: float = 0.4
    languages: list = field(default_factory=lambda: ["en"])  # empty: no language filter
    min_langid_score: float = 0.3


@dataclass
class CurateConfig(StageConfig):
    """`kiln curate`: raw JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or Parquet -> normalized,
    PII-redacted, deduplicated JSONL shards plus curation_report.json."""

    inputs: list = field(default_factory=list)
    output_dir: str = "data/curated"
    text_field: str = "text"
    id_field: str | None = "id"  # None, or a record without it: "<file>:<line>" is the id
    normalize: bool = True  # NFKC, mojibake repair (ftfy), control and zero-width characters, whitespace
    filters: FilterConfig = field(default_factory=FilterConfig)
    exact_dedup: bool = True
    fuzzy_dedup: bool = True
    jaccard_threshold: float = 0.8  # near-duplicates: estimated Jaccard of word n-gram sets
    ngram: int = 5  # words per shingle
    num_perm: int = 128  # MinHash permutations; bands x rows are derived from the threshold
    dedup_backend: Literal["auto", "cpu", "gpu"] = "auto"  # auto: Curator's cuDF workflows when cuDF imports
    gpu_char_ngrams: int = 24  # GPU fuzzy dedup shingles characters (Curator's default), not words
    pii: bool = False  # redact emails, IP addresses, phone and credit-card numbers
    workers: int = 2  # processes for normalization and MinHash
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    shard_mb: float = 256.0  # target shard size (text bytes); a shard closes once it reaches it
    max_line_bytes: int = 10_000_000  # longer input lines are bad input
    strict: bool = False  # stop at the first bad record instead of skipping and counting it
