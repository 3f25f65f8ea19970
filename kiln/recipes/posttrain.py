"""Post-training recipes: SFT, DPO, reward model and RLHF on the tiny demo model (CPU, minutes).

Each starts from the weights the demo pretraining wrote (`make demo`, or the tiny pipeline) and
reads the chat sets in data/demo/ (data/demo/generate_chat.py writes them).
"""

from __future__ import annotations

from kiln.config import (
    ChatDataConfig,
    CheckpointConfig,
    DPOConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    RLHFAlgoConfig,
    RLHFConfig,
    RMConfig,
    ScheduleConfig,
    SFTConfig,
    TrainConfig,
)
from kiln.recipes import models

DEMO = "runs/demo"  # the tiny pipeline's root: data/tokenizer and pretrain/checkpoints


def _common(cfg, data: str, valid: str | None, steps: int, lr: float):
    cfg.model = models.tiny_llama()
    cfg.parallel = ParallelConfig(tp=1, pp=1, world_size=1)
    cfg.train = TrainConfig(steps=steps, micro_batch_size=4, global_batch_size=8, seq_length=256, seed=1234,
                            eval_interval=steps // 2 if valid else 0, eval_steps=1)
    cfg.optimizer = OptimizerConfig(name="adamw", lr=lr, min_lr=lr / 10, weight_decay=0.0, clip_grad=1.0)
    cfg.schedule = ScheduleConfig(style="cosine", warmup_steps=2)
    cfg.data = ChatDataConfig(train=data, valid=valid, tokenizer=f"{DEMO}/data/tokenizer", chat_template="chatml")
    cfg.checkpoint = CheckpointConfig(load_weights=f"{DEMO}/pretrain/checkpoints", keep_last=1)
    cfg.logging = LoggingConfig(log_interval=5)
    return cfg


def sft_tiny() -> SFTConfig:
    """Full fine-tuning of the demo model on chat data, packed."""
    return _common(SFTConfig(run_dir=f"{DEMO}/sft"), "data/demo/sft.jsonl", "data/demo/sft_valid.jsonl",
                   steps=30, lr=1e-3)


def sft_lora_tiny() -> SFTConfig:
    cfg = sft_tiny()
    cfg.run_dir = f"{DEMO}/sft_lora"
    cfg.lora.enabled = True
    cfg.optimizer.lr = 5e-3
    return cfg


def dpo_tiny() -> DPOConfig:
    """DPO from the SFT model on a learnable preference set (clean answers over stuttering ones)."""
    cfg = _common(DPOConfig(run_dir=f"{DEMO}/dpo"), "data/demo/preference.jsonl",
                  "data/demo/preference_valid.jsonl", steps=20, lr=5e-4)
    cfg.checkpoint.load_weights = f"{DEMO}/sft/checkpoints"
    return cfg


def rm_tiny() -> RMConfig:
    cfg = _common(RMConfig(run_dir=f"{DEMO}/rm"), "data/demo/preference.jsonl",
                  "data/demo/preference_valid.jsonl", steps=20, lr=1e-3)
    cfg.checkpoint.load_weights = f"{DEMO}/sft/checkpoints"
    return cfg


def rlhf_tiny() -> RLHFConfig:
    """GRPO from the SFT model, rewarded by the demo reward model."""
    cfg = _common(RLHFConfig(run_dir=f"{DEMO}/rlhf"), "data/demo/prompts.jsonl", None, steps=6, lr=1e-4)
    cfg.checkpoint.load_weights = f"{DEMO}/sft/checkpoints"
    cfg.rlhf = RLHFAlgoConfig(reward=f"{DEMO}/rm/checkpoints", group_size=4, prompts_per_step=2)
    cfg.rlhf.generation.max_new_tokens = 12
    cfg.train.global_batch_size = 8  # prompts_per_step x group_size sequences per step
    return cfg


def _smoke(cfg, steps: int):
    """A tiny recipe cut to a few steps for CI, one process (one GPU, or the CPU): the same
    recipe on both, and on the CPU a reference loss curve under tests/assets/losses/."""
    cfg.run_dir = cfg.run_dir.replace(DEMO, "runs/smoke")
    cfg.train.steps = steps
    cfg.train.eval_interval = steps if cfg.data.valid else 0
    cfg.schedule.warmup_steps = 1
    cfg.logging.log_interval = 1
    return cfg


def sft_smoke() -> SFTConfig:
    cfg = _smoke(sft_tiny(), steps=8)
    cfg.train.micro_batch_size = 1  # packed sequences go one per microbatch on GPU (THD)
    return cfg


def dpo_smoke() -> DPOConfig:
    return _smoke(dpo_tiny(), steps=6)


def rm_smoke() -> RMConfig:
    return _smoke(rm_tiny(), steps=6)


def rlhf_smoke() -> RLHFConfig:
    return _smoke(rlhf_tiny(), steps=3)


MOE = "runs/demo_moe"  # the tiny_moe pipeline's root


def _on_moe(cfg):
    """A tiny recipe moved onto the tiny mixture of experts: its data and weights come from the
    tiny_moe pipeline; one process holds every expert (EP=1; the pretraining's EP=2 checkpoint
    reshards on load)."""
    cfg.run_dir = cfg.run_dir.replace(DEMO, MOE)
    cfg.model = models.tiny_moe()
    cfg.data.tokenizer = cfg.data.tokenizer.replace(DEMO, MOE)
    cfg.checkpoint.load_weights = cfg.checkpoint.load_weights.replace(DEMO, MOE)
    return cfg


def sft_moe_tiny() -> SFTConfig:
    return _on_moe(sft_tiny())


def dpo_moe_tiny() -> DPOConfig:
    return _on_moe(dpo_tiny())


SFT = {"tiny": sft_tiny, "tiny_lora": sft_lora_tiny, "smoke": sft_smoke, "tiny_moe": sft_moe_tiny}
DPO = {"tiny": dpo_tiny, "smoke": dpo_smoke, "tiny_moe": dpo_moe_tiny}
RM = {"tiny": rm_tiny, "smoke": rm_smoke}
RLHF = {"tiny": rlhf_tiny, "smoke": rlhf_smoke}
