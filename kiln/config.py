"""Typed configs shared by the stages: pure data, importing nothing of kiln but its errors.

Each stage's config is a tree of these dataclasses, built by a recipe function
(`kiln.recipes.pretrain.tiny()`), changed with dotted overrides (`kiln.overrides.apply`),
and checked before any process group or tensor exists: every numeric field with a domain
declares it (`ranged`), and `kiln.validation` checks them all, with each stage's own rules.
`kiln.launch.to_partial(cfg)` turns a stage config into a NeMo-Run task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from kiln.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take; `None` bounds are open-ended."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, None, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)  # ratios and probabilities, both ends allowed
DROPOUT = Range(0, 1, hi_open=True)
BETA = Range(0, 1, hi_open=True)  # Adam's moment decay


def ranged(default, domain: Range, **kwargs):
    """A dataclass field whose value must lie in `domain` (None always passes: it means unset)."""
    if callable(default):
        return field(default_factory=default, metadata={"domain": domain}, **kwargs)
    return field(default=default, metadata={"domain": domain}, **kwargs)


@dataclass
class RopeScaling:
    """Llama 3.1-style RoPE frequency scaling (megatron-core `rope_scaling`)."""

    factor: float = ranged(8.0, POSITIVE)
    low_freq_factor: float = ranged(1.0, POSITIVE)
    high_freq_factor: float = ranged(4.0, POSITIVE)
    original_max_position_embeddings: int = ranged(8192, AT_LEAST_1)


@dataclass
class MoEConfig:
    """Mixture of experts in place of the MLP (megatron-core's MoELayer): a router sends each token
    to `topk` of `num_experts` expert MLPs. Mixtral 8x7B: 8 experts, top-2, softmax, renormalised."""

    num_experts: int = ranged(8, Range(2))
    topk: int = ranged(2, AT_LEAST_1)
    ffn_hidden_size: int | None = ranged(None, AT_LEAST_1)  # each expert's; None = the model's ffn size
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    # True: the top-k weights sum to 1 (Mixtral, Qwen3-MoE); False: softmax over all experts, then
    # top-k as is (Qwen2-MoE's norm_topk_prob=false; megatron-core's moe_router_pre_softmax)
    normalize_topk: bool = True
    load_balancing: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    aux_loss_coeff: float = ranged(0.01, NON_NEGATIVE)
    z_loss_coeff: float | None = ranged(None, NON_NEGATIVE)
    # token dropping: None keeps every token; a factor caps each expert at factor x its even share
    capacity_factor: float | None = ranged(None, POSITIVE)
    drop_policy: Literal["probs", "position"] = "probs"
    pad_to_capacity: bool = False
    # an always-on expert beside the routed ones (Qwen2-MoE); its gate is a learned sigmoid
    shared_expert_ffn_size: int | None = ranged(None, AT_LEAST_1)
    shared_expert_gate: bool = False
    # one entry per layer, 1 = MoE, 0 = dense MLP (the model's ffn size); None = every layer MoE
    layer_pattern: list[int] | None = None

    def is_moe_layer(self, layer: int) -> bool:
        return self.layer_pattern is None or bool(self.layer_pattern[layer])


@dataclass
class ModelConfig:
    """A decoder-only transformer. GPT-2 and Llama are presets of these fields."""

    # shape
    num_layers: int = ranged(2, AT_LEAST_1)
    hidden_size: int = ranged(64, AT_LEAST_1)
    ffn_hidden_size: int | None = ranged(None, AT_LEAST_1)  # None: 4 x hidden (GELU) or Llama's 8/3 rule (SwiGLU)
    num_attention_heads: int = ranged(4, AT_LEAST_1)
    num_query_groups: int | None = ranged(None, AT_LEAST_1)  # KV heads for grouped-query attention; None = MHA
    kv_channels: int | None = ranged(None, AT_LEAST_1)  # head dim; None = hidden_size / num_attention_heads
    # vocabulary: None takes the tokenizer's size; the embedding is padded for TP
    vocab_size: int | None = ranged(None, AT_LEAST_1)
    make_vocab_size_divisible_by: int = ranged(128, AT_LEAST_1)
    max_position_embeddings: int = ranged(1024, AT_LEAST_1)
    # family-defining choices
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_epsilon: float = ranged(1e-5, POSITIVE)
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"  # gelu_tanh: GPT-2's gelu_new
    position_embedding: Literal["learned_absolute", "rope"] = "learned_absolute"
    rotary_base: int = ranged(10000, POSITIVE)
    rotary_percent: float = ranged(1.0, Range(0, 1, lo_open=True))
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    # a norm (model.normalization) over each head's queries and keys before RoPE (Qwen3, Qwen3-MoE);
    # megatron-core's qk_layernorm, in its TransformerConfig and layer spec alike
    qk_layernorm: bool = False
    # init and regularisation
    init_method_std: float = ranged(0.02, POSITIVE)
    hidden_dropout: float = ranged(0.0, DROPOUT)
    attention_dropout: float = ranged(0.0, DROPOUT)
    moe: MoEConfig | None = None  # None: a dense model

    @property
    def expert_ffn_size(self) -> int | None:
        if self.moe is None:
            return None
        return self.moe.ffn_hidden_size or self.ffn_size

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

    tp: int = ranged(1, AT_LEAST_1)
    pp: int = ranged(1, AT_LEAST_1)
    vpp: int | None = ranged(None, AT_LEAST_1)  # virtual pipeline stages per PP rank (interleaved 1F1B)
    sequence_parallel: bool = False
    # experts (model.moe): `ep` ranks split the experts; each expert's weights are split over
    # `etp` ranks (None = tp). Expert layers see world = pp x ep x etp x expert-DP.
    ep: int = ranged(1, AT_LEAST_1)
    etp: int | None = ranged(None, AT_LEAST_1)
    # how tokens reach their experts: alltoall sends each token only to its experts' ranks;
    # allgather gathers every token on every EP rank (simpler, more traffic)
    moe_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    world_size: int | None = ranged(None, AT_LEAST_1)  # None: from the launcher's environment

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)


@dataclass
class OptimizerConfig:
    name: Literal["adam", "adamw"] = "adamw"  # adamw: decoupled weight decay
    lr: float = ranged(3e-4, POSITIVE)
    min_lr: float = ranged(3e-5, NON_NEGATIVE)
    weight_decay: float = ranged(0.1, NON_NEGATIVE)
    beta1: float = ranged(0.9, BETA)
    beta2: float = ranged(0.95, BETA)
    eps: float = ranged(1e-8, POSITIVE)
    clip_grad: float = ranged(1.0, NON_NEGATIVE)  # max global grad norm; 0 turns clipping off
    distributed: bool = False  # shard optimizer state over DP (megatron distributed optimizer)


@dataclass
class ScheduleConfig:
    """LR schedule: linear warmup, then cosine decay or warmup-stable-decay (WSD)."""

    style: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    warmup_steps: int = ranged(0, NON_NEGATIVE)
    decay_steps: int | None = ranged(None, AT_LEAST_1)  # None: train.steps
    wsd_decay_steps: int | None = ranged(None, NON_NEGATIVE)  # WSD only: length of the final decay phase
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
    steps: int = ranged(20, NON_NEGATIVE)  # 0: eval-only, scores the loaded checkpoint on the validation data
    micro_batch_size: int = ranged(2, AT_LEAST_1)
    global_batch_size: int = ranged(8, AT_LEAST_1)
    seq_length: int = ranged(128, AT_LEAST_1)
    seed: int = ranged(1234, NON_NEGATIVE)
    eval_interval: int = ranged(0, NON_NEGATIVE)  # 0: no validation during training
    eval_steps: int = ranged(2, AT_LEAST_1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    stop_after_steps: int | None = ranged(None, AT_LEAST_1)  # end the process early (tests of resume)
    # on these signals: finish the step, checkpoint, exit 75 so the job script requeues
    preempt_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: <run_dir>/checkpoints
    save_interval: int = ranged(0, NON_NEGATIVE)  # 0: only at the end
    # resume continues from the newest valid checkpoint in `dir` when there is one; otherwise the
    # run starts from load_weights (weights only, fresh optimizer) or from scratch. Slurm jobs
    # always resume, so a requeued fine-tuning run continues and a first one starts from its base.
    resume: bool = False
    load_weights: str | None = None  # a checkpoint dir; also DPO's and RLHF's frozen reference
    keep_last: int | None = ranged(None, AT_LEAST_1)  # None: keep every checkpoint


@dataclass
class WandbConfig:
    """Weights & Biases (`pip install 'kiln[track]'`). The API key is never a field: it reaches the
    job as the secret WANDB_API_KEY (launch.secrets, by name)."""

    project: str = "kiln"
    entity: str | None = None  # None: the key's default entity
    name: str | None = None  # None: the run directory's name
    tags: list = field(default_factory=list)
    # auto: online when WANDB_API_KEY is set, else offline (upload later with `wandb sync <dir>`)
    mode: Literal["auto", "online", "offline"] = "auto"
    dir: str | None = None  # wandb writes under <dir>/wandb/; None: the run directory


@dataclass
class MLflowConfig:
    """MLflow (`pip install 'kiln[track]'`)."""

    tracking_uri: str | None = None  # None: a local store, sqlite:///<run_dir>/mlflow/mlflow.db
    experiment: str = "kiln"
    run_name: str | None = None  # None: the run directory's name
    tags: dict = field(default_factory=dict)


@dataclass
class LoggingConfig:
    log_interval: int = ranged(1, AT_LEAST_1)
    tensorboard: bool = True
    progress_bar: bool | None = None  # None: only when stdout is a terminal
    loss_spike_factor: float = ranged(3.0, NON_NEGATIVE)  # warn when loss > factor x running mean; 0 turns it off
    # experiment trackers beside TensorBoard, fed on rank 0 what metrics.jsonl gets; None: off.
    # `logging.wandb={}` (or any logging.wandb.<field>=...) turns one on
    wandb: WandbConfig | None = None
    mlflow: MLflowConfig | None = None


@dataclass
class PretrainConfig:
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
class RayConfig:
    """Where a data stage's tasks run with engine=ray. Tasks exchange files under `work_dir` (shared
    storage every node mounts), never through Ray's object store; the output is the same bytes as
    engine=local's for any number of nodes, workers or input splits."""

    # a running cluster: "host:port", "ray://host:10001" or "auto" (the one `ray start` left on this
    # machine); None: $RAY_ADDRESS when set, else kiln starts a local cluster and stops it at the end
    address: str | None = None
    num_cpus: int | None = ranged(None, AT_LEAST_1)  # the local cluster kiln starts; None: the stage's workers
    work_dir: str | None = None  # intermediate files and completion markers; None: <output_dir>.work
    split_mb: float = ranged(64.0, POSITIVE)  # uncompressed JSONL is split into contiguous byte ranges of this size
    max_task_retries: int = ranged(2, NON_NEGATIVE)  # a task that fails more often stops the run, naming its input
    buckets: int = ranged(16, AT_LEAST_1)  # shuffle buckets (reduce tasks) for exact digests and LSH bands


@dataclass
class PrepareConfig:
    """`kiln prepare`: JSONL text -> Megatron indexed dataset (.bin/.idx) + tokenizer directory."""

    inputs: list = field(default_factory=list)  # JSONL files (.jsonl, .jsonl.gz)
    output_dir: str = "data/prepared"
    name: str = "corpus"  # output prefix: <output_dir>/<name>_text_document
    text_field: str = "text"
    tokenizer: str | None = None  # a tokenizer directory; None trains a byte-level BPE
    vocab_size: int = ranged(8192, Range(256))  # only when training a tokenizer
    batch_size: int = ranged(1000, AT_LEAST_1)  # documents per tokenizer call
    # a tokenizer trained here learns from at most this many MiB of text: the head of each input file,
    # in proportion to its size (deterministic; the manifest says what was read)
    tokenizer_sample_mb: float = ranged(1024.0, POSITIVE)
    # this fraction of documents (picked by a hash of the text: the same whatever the order or engine) is
    # not tokenized but written to <output_dir>/heldout.jsonl, for `kiln eval`'s held-out suite
    heldout: float = ranged(0.0, Range(0, 1, hi_open=True))
    merge: bool = True  # engine=ray: one prefix; false keeps one prefix per input split (for data.blend)
    engine: Literal["local", "ray"] = "local"  # ray: one task per input split on a Ray cluster
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class ConvertConfig:
    """`kiln convert`: one checkpoint format to another, verified by logits."""

    source: str = ""
    output: str = ""
    to: Literal["hf", "megatron", "nemo2", "nemo"] = "megatron"
    # the layout the Megatron output is padded for (vocab rows: multiple of 128 x TP)
    tp: int = ranged(1, AT_LEAST_1)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None keeps the source's
    # layer-by-layer parity (a layer's worth of memory) unless false; end-to-end logits too when true,
    # or when None and the model is under 2B parameters
    verify: bool | None = None
    tokenizer: str | None = None  # for Megatron sources without a recorded tokenizer
    max_shard_gb: float = ranged(5.0, POSITIVE)  # HF output shard size


@dataclass
class ExportConfig:
    """`kiln export`: a TensorRT-LLM checkpoint (+ build.sh), or an HF directory for serving."""

    source: str = ""  # HF directory, kiln Megatron checkpoint, NeMo 2 directory or .nemo
    output: str = ""
    to: Literal["trtllm", "hf"] = "trtllm"
    tp: int = ranged(1, AT_LEAST_1)
    pp: int = ranged(1, AT_LEAST_1)
    # experts (MoE models): TensorRT-LLM splits each TP group into ep x (tp / ep) ranks, `ep` ranks
    # holding num_experts / ep experts each, every expert cut over tp / ep ranks (moe_tp_size)
    ep: int = ranged(1, AT_LEAST_1)
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    verify: bool | None = None  # CPU reference forward over the rank shards vs the source (fp32 only)
    max_batch_size: int = ranged(8, AT_LEAST_1)
    max_input_len: int = ranged(2048, AT_LEAST_1)  # at most max_seq_len
    max_seq_len: int | None = ranged(None, AT_LEAST_1)  # None: the model's positions, at most 4096
    tokenizer: str | None = None


@dataclass
class ServeConfig:
    """`kiln serve`: an OpenAI-compatible endpoint over an HF directory (transformers) or a kiln
    checkpoint (megatron-core, TP x PP ranks serving one copy of the model together)."""

    source: str = ""  # HF directory, or a kiln run / checkpoint directory
    host: str = "127.0.0.1"  # 0.0.0.0 serves other machines too
    port: int = ranged(8000, Range(1, 65535))
    model_name: str | None = None  # the `model` requests name; None: the source directory's name
    tokenizer: str | None = None  # for a checkpoint that records none
    chat_template: str = "tokenizer"  # /v1/chat/completions: the tokenizer's own, or llama3 | chatml | plain
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: the HF source's; bf16 on GPU else fp32
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # TP/PP: kiln checkpoints only
    max_model_len: int | None = ranged(None, AT_LEAST_1)  # prompt + completion; None: the model's positions
    max_tokens: int = ranged(256, AT_LEAST_1)  # a completion's length when a request names none
    # requests admitted at once: one generates, the others wait their turn; beyond it, 503
    max_queue: int = ranged(64, AT_LEAST_1)


@dataclass
class EvalConfig:
    """`kiln eval`: lm-evaluation-harness suites on an HF directory, a kiln Megatron checkpoint
    (scored on kiln's engine under `parallel`) or an OpenAI-compatible endpoint, fully offline."""

    source: str = ""  # HF directory, or a kiln run / checkpoint directory; with `endpoint`: its tokenizer
    endpoint: str | None = None  # base URL of an OpenAI-compatible server (…/v1); the model is scored there
    endpoint_model: str | None = None  # the served model name; None: the server's first /v1/models entry
    output_dir: str = "runs/eval"
    # heldout: bits per byte on `heldout`; demo: kiln's tasks about the demo world
    suites: list = field(default_factory=lambda: ["heldout"])
    tasks: list = field(default_factory=list)  # lm-eval task YAML files over local JSONL/Parquet
    heldout: str | None = None  # held-out JSONL set aside by `kiln prepare` (its heldout.jsonl)
    tokenizer: str | None = None  # when the source records none
    max_length: int | None = ranged(None, AT_LEAST_1)  # tokens per window; None: the model's positions
    batch_size: int = ranged(8, AT_LEAST_1)  # sequences per forward
    limit: int | None = ranged(None, AT_LEAST_1)  # documents per task (smoke runs)
    seed: int = ranged(1234, NON_NEGATIVE)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # Megatron checkpoints only
    # a gate: compare with an earlier eval_summary.json; a metric worse by more than `tolerance`
    # (absolute) fails the stage with a non-zero exit
    baseline: str | None = None
    tolerance: float = ranged(0.0, NON_NEGATIVE)


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
    rank: int = ranged(8, AT_LEAST_1)
    alpha: float = ranged(16.0, POSITIVE)
    dropout: float = ranged(0.0, DROPOUT)
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
    beta: float = ranged(0.1, POSITIVE)
    label_smoothing: float = ranged(0.0, Range(0, 0.5, hi_open=True))  # conservative DPO (sigmoid only)
    rpo_alpha: float | None = ranged(None, NON_NEGATIVE)  # RPO: add rpo_alpha x the NLL of the chosen answer
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
    max_new_tokens: int = ranged(16, AT_LEAST_1)
    temperature: float = ranged(1.0, NON_NEGATIVE)  # 0: greedy
    top_k: int = ranged(0, NON_NEGATIVE)  # 0: off
    top_p: float = ranged(1.0, Range(0, 1, lo_open=True))
    stop_token_ids: list = field(default_factory=list)  # besides the tokenizer's EOS


@dataclass
class RLHFAlgoConfig:
    """GRPO (group-relative advantages, no critic) or PPO (a critic, GAE); one optimizer step
    per batch of fresh rollouts."""

    algorithm: Literal["grpo", "ppo"] = "grpo"
    # reward: a reward-model checkpoint directory (from `kiln rm`), or "module:function"
    # taking (prompts: list[str], completions: list[str]) -> list[float]
    reward: str = ""
    group_size: int = ranged(4, AT_LEAST_1)  # GRPO: completions per prompt, advantages relative to the group
    prompts_per_step: int = ranged(4, AT_LEAST_1)
    kl_coef: float = ranged(0.05, NON_NEGATIVE)  # penalty on log(pi / pi_ref), per token
    clip_eps: float = ranged(0.2, POSITIVE)
    # PPO: the critic starts from the reward model (or the policy's weights, for a reward
    # function) with a fresh scalar head, and trains with the policy's optimizer settings
    gamma: float = ranged(1.0, FRACTION)
    lam: float = ranged(0.95, FRACTION)
    value_clip_eps: float = ranged(0.2, POSITIVE)
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
    min_words: int = ranged(50, NON_NEGATIVE)
    max_words: int = ranged(100_000, AT_LEAST_1)
    min_mean_word_length: float = ranged(3.0, NON_NEGATIVE)
    max_mean_word_length: float = ranged(10.0, POSITIVE)
    max_symbol_to_word_ratio: float = ranged(0.1, NON_NEGATIVE)
    max_non_alpha_numeric_to_text_ratio: float = ranged(0.25, FRACTION)
    max_repeated_line_fraction: float = ranged(0.7, FRACTION)
    max_repeated_paragraphs_ratio: float = ranged(0.7, FRACTION)
    # n (as a string: the config travels as JSON/YAML) -> max ratio
    max_top_ngram_ratios: dict = field(default_factory=lambda: {"2": 0.2, "3": 0.18, "4": 0.16})
    max_duplicate_ngram_ratios: dict = field(default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12,
                                                                      "9": 0.11, "10": 0.10})
    max_bullet_lines_ratio: float = ranged(0.9, FRACTION)
    max_ellipsis_lines_ratio: float = ranged(0.3, FRACTION)
    max_boilerplate_string_ratio: float = ranged(0.4, FRACTION)
    languages: list = field(default_factory=lambda: ["en"])  # empty: no language filter
    min_langid_score: float = ranged(0.3, FRACTION)


@dataclass
class CurateConfig:
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
    # near-duplicates: estimated Jaccard of word n-gram sets
    jaccard_threshold: float = ranged(0.8, Range(0, 1, lo_open=True, hi_open=True))
    ngram: int = ranged(5, AT_LEAST_1)  # words per shingle
    num_perm: int = ranged(128, Range(8))  # MinHash permutations; bands x rows are derived from the threshold
    dedup_backend: Literal["auto", "cpu", "gpu"] = "auto"  # auto: Curator's cuDF workflows when cuDF imports
    # GPU fuzzy dedup shingles characters (Curator's default), not words
    gpu_char_ngrams: int = ranged(24, AT_LEAST_1)
    pii: bool = False  # redact emails, IP addresses, phone and credit-card numbers
    workers: int = ranged(2, AT_LEAST_1)  # processes for normalization and MinHash
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    shard_mb: float = ranged(256.0, POSITIVE)  # target shard size (text bytes); a shard closes once it reaches it
    max_line_bytes: int = ranged(10_000_000, AT_LEAST_1)  # longer input lines are bad input
    strict: bool = False  # stop at the first bad record instead of skipping and counting it
    engine: Literal["local", "ray"] = "local"  # local: worker processes on this machine; ray: tasks on a Ray cluster
    ray: RayConfig = field(default_factory=RayConfig)
