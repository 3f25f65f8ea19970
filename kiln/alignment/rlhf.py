"""`kiln rlhf`: GRPO or PPO on the engine. Each step samples `group_size` completions for each
of `prompts_per_step` prompts with the current policy (KV-cached generation), scores them with
a reward model (`kiln rm` checkpoint) or a Python function, and takes one optimizer step on
the clipped policy objective.

- GRPO: advantages are rewards relative to the prompt's group; a per-token KL penalty against
  the frozen reference joins the loss.
- PPO: a critic (the GPT with a scalar head) predicts values; per-token rewards are the KL
  penalty plus the sequence reward on the last token; GAE gives advantages and returns; the
  critic takes its own optimizer step on the clipped value loss, then the policy on the
  clipped surrogate. The critic is checkpointed with the policy and resumed with it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from kiln.artifact import write_manifest
from kiln.config import RLHFConfig
from kiln.data.chat import ChatFormatter
from kiln.data.records import DataReport, RecordError, read_jsonl
from kiln.data.sft import Example, build_sample
from kiln.data.tokenizer import eod_id, load
from kiln.training import checkpoint as ckpt
from kiln.training import loop
from kiln.training.engine import build_engine, train_step
from kiln.training.model import build_model, resolve_precision
from kiln.training.pretrain import run_ranks
from kiln.training.shapes import check_weights
from kiln.validation import Check, Problems, ensure_valid

REPORTS = ("loss", "reward", "kl", "completion_tokens", "value_loss")


def rlhf(cfg: RLHFConfig) -> dict:
    return run_ranks(cfg, _train)


def validate(cfg: RLHFConfig, check: Check, problems: Problems) -> None:
    r = cfg.rlhf
    dp = max(1, cfg.parallel.dp(check.world_size))
    if cfg.parallel.vpp:
        problems.add("parallel.vpp: RLHF generation walks the pipeline one stage per rank; unset parallel.vpp")
    if r.prompts_per_step * r.group_size != cfg.train.global_batch_size:
        problems.add(f"train.global_batch_size={cfg.train.global_batch_size} must equal rlhf.prompts_per_step "
                     f"x rlhf.group_size = {r.prompts_per_step * r.group_size} (sequences per step)")
    if r.prompts_per_step % dp:
        problems.add(f"rlhf.prompts_per_step={r.prompts_per_step} must divide among DP={dp} ranks")
    if r.algorithm == "grpo" and r.group_size < 2:
        problems.add("rlhf.group_size must be at least 2 for GRPO: it compares completions of one prompt")
    if not cfg.checkpoint.load_weights:
        problems.add("checkpoint.load_weights is unset: RLHF starts from (and stays near) a trained policy")
    if not r.reward:
        problems.add("rlhf.reward is unset: give a reward-model checkpoint (kiln rm) or module:function")
    elif is_reward_function(r.reward, check):
        module, _, name = r.reward.partition(":")
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            problems.add(f"rlhf.reward={r.reward}: cannot import it ({exc}); give module:function on the Python "
                         f"path, or a reward-model checkpoint directory")
    else:
        check_weights("rlhf.reward", r.reward, cfg.model, None, check, problems, scalar_head=True)


def is_reward_function(reward: str, check: Check | None = None) -> bool:
    """"module:function" rather than a checkpoint path (which exists, or an earlier stage writes)."""
    return ":" in reward and "/" not in reward and not (check or Check()).will_exist(reward)


def load_prompts(path: str, formatter: ChatFormatter, strict: bool) -> tuple[list[str], list[list[int]]]:
    report, texts, tokens = DataReport(), [], []
    for where, record in read_jsonl(path, report, strict):
        prompt = record.get("prompt")
        try:
            if isinstance(prompt, str) and prompt.strip():
                messages = [{"role": "user", "content": prompt}]
            elif isinstance(prompt, list) and prompt and prompt[-1].get("role") == "user":
                messages = prompt
            else:
                raise RecordError("'prompt' must be a non-empty string or messages ending on a user turn")
        except (RecordError, AttributeError) as exc:
            report.drop(where, str(exc), "invalid", strict)
            continue
        report.kept += 1
        texts.append(messages[-1]["content"])
        tokens.append(formatter.prompt_tokens(messages))
    if not tokens:
        raise ValueError(f"{path}: no usable prompts ({report.summary()})")
    return texts, tokens


class Rewards:
    """A reward model checkpoint scored on the same layout, or a Python function of strings."""

    def __init__(self, cfg: RLHFConfig, device):
        self.cfg, self.device = cfg, device
        spec = cfg.rlhf.reward
        if is_reward_function(spec):
            module, name = spec.split(":")
            self.function = getattr(importlib.import_module(module), name)
        else:
            from kiln.alignment.rm import with_scalar_head

            self.function = None
            rm_cfg, transform = with_scalar_head(cfg)
            chunks, _ = build_model(rm_cfg.model, cfg.parallel, resolve_precision(cfg.train.precision), device,
                                    False, transform)
            ckpt.load(spec, chunks)
            self.chunks = chunks

    def __call__(self, prompts: list[str], completions: list[str], batch: dict) -> torch.Tensor:
        """One reward per completion, on every rank."""
        if self.function is not None:
            return torch.tensor([float(r) for r in self.function(prompts, completions)], device=self.device)
        from kiln.alignment.rm import scores

        rows = batch["tokens"].size(0)
        found = pipeline_forward(self.chunks, batch, rows, self.cfg.train.seq_length,
                                 lambda values, b: scores(values, b["loss_mask"]))
        return from_last_stage(found, torch.zeros(rows, device=self.device))


def pipeline_forward(chunks: list, group: dict, rows: int, seq: int, outputs,
                     labels: bool = False) -> torch.Tensor | None:
    """Forward-only over `group` in microbatches of `rows`, through megatron-core's pipeline
    schedule: `outputs(model_output, batch)` per microbatch, concatenated, on the last pipeline
    stage; None on the others."""
    from kiln.training.engine import run_schedule

    count = group["tokens"].size(0) // rows
    batches = [{k: v[m * rows:(m + 1) * rows] for k, v in group.items()} for m in range(count)]

    def forward_step(batch, model):
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"] if labels else None)
        return out, lambda o: (o.sum() * 0, torch.tensor(1), {"out": outputs(o, batch).detach()})

    for chunk in chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            reports = run_schedule(chunks, lambda: iter(batches), count, seq, rows, forward_step, forward_only=True)
    finally:
        for chunk in chunks:
            chunk.train()
    return torch.cat([r["out"] for r in reports]) if reports else None


def token_logps(per_token_loss: torch.Tensor, _batch: dict) -> torch.Tensor:
    return -per_token_loss.float()


def token_values(values: torch.Tensor, batch: dict) -> torch.Tensor:
    return values[..., 0].float() * batch["loss_mask"]


def from_last_stage(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """`value` (held by the last pipeline stage) on every stage of this pipeline."""
    from megatron.core import parallel_state as ps

    out = value if value is not None else torch.zeros_like(like)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(out, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return out


def grpo_forward_step(cfg: RLHFConfig):
    from kiln.alignment.losses import clipped_policy_loss, kl_penalty

    r = cfg.rlhf

    def forward_step(batch: dict, model):
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token):
            mask = batch["loss_mask"]
            logps = -per_token.float()
            policy = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], r.clip_eps)
            kl = kl_penalty(logps, batch["ref_logps"])
            kl_weight = r.kl_coef if r.algorithm == "grpo" else 0.0  # PPO has it in its rewards
            total = ((policy + kl_weight * kl) * mask).sum()
            tokens = mask.sum()
            rows = torch.tensor(float(mask.size(0)), device=tokens.device)
            report = {"loss": torch.stack([total.detach(), tokens]),
                      "kl": torch.stack([(kl.detach() * mask).sum(), tokens]),
                      "reward": torch.stack([batch["rewards"].sum(), rows]),
                      "completion_tokens": torch.stack([tokens, rows]),
                      "value_loss": torch.stack([batch["value_loss"].sum(), rows])}
            return total, tokens.to(torch.int), report

        return output, loss_func

    return forward_step


def build_critic(cfg: RLHFConfig, device):
    """The PPO critic: a scalar-head GPT with its own optimizer, from the reward model when
    there is one, else from the policy's starting weights with a fresh head."""
    from kiln.alignment.rm import is_head, with_scalar_head

    critic_cfg, transform = with_scalar_head(cfg)
    critic = build_engine(critic_cfg, device, transform)
    reward_model = not is_reward_function(cfg.rlhf.reward)
    ckpt.load(cfg.rlhf.reward if reward_model else cfg.checkpoint.load_weights, critic.chunks,
              fresh=None if reward_model else is_head)
    return critic


def value_forward_step(clip_eps: float):
    from kiln.alignment.losses import clipped_value_loss

    def forward_step(batch: dict, model):
        output = model(batch["tokens"], batch["position_ids"], None)

        def loss_func(values):
            mask = batch["loss_mask"]
            loss = (clipped_value_loss(values[..., 0].float(), batch["old_values"], batch["returns"], clip_eps)
                    * mask).sum()
            tokens = mask.sum()
            return loss, tokens.to(torch.int), {"value_loss": torch.stack([loss.detach(), tokens])}

        return output, loss_func

    return forward_step


def _train(cfg: RLHFConfig, rank: int, world: int, device, started: float, request: RLHFConfig) -> dict:
    from kiln.alignment.losses import group_advantages
    from kiln.training.generate import generate

    ensure_valid(cfg, validate, check=Check(world_size=world), what="the rlhf config")
    cfg.logging.loss_spike_factor = 0  # a policy-gradient loss hovers around zero: no descent to watch
    tokenizer = load(cfg.data.tokenizer)
    formatter = ChatFormatter(tokenizer, cfg.data.chat_template)
    prompt_texts, prompt_tokens = load_prompts(cfg.data.train, formatter, cfg.data.strict)
    engine = build_engine(cfg, device)
    reference, _ = build_model(cfg.model, cfg.parallel, resolve_precision(cfg.train.precision), device, False)
    ckpt.load(cfg.checkpoint.load_weights, reference)
    rewards = Rewards(cfg, device)
    r, t, seq = cfg.rlhf, cfg.train, cfg.train.seq_length
    pad = eod_id(tokenizer)
    stop = {pad, *r.generation.stop_token_ids}
    count = cfg.num_microbatches(world)
    policy = engine.chunks[0]
    critic = build_critic(cfg, device) if r.algorithm == "ppo" else None

    def rollouts(step: int):
        """This DP rank's prompts of `step`, sampled, scored and turned into training rows."""
        mine = [step * r.prompts_per_step + j for j in range(engine.dp_rank, r.prompts_per_step, engine.dp_size)]
        rows, reward_list = [], []
        for index in mine:
            p = index % len(prompt_tokens)
            prompt = prompt_tokens[p][: seq - r.generation.max_new_tokens]
            completions = generate(policy, prompt, r.group_size, r.generation, stop, cfg.model.vocab_size,
                                   seed=t.seed * 1_000_003 + index)
            samples = [build_sample([Example(prompt + c, [0] * len(prompt) + [1] * len(c))], seq, pad)
                       for c in completions]
            batch = {k: torch.stack([s[k] for s in samples]).to(device)
                     for k in ("tokens", "labels", "loss_mask", "position_ids")}
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
            reward_list.append(rewards([prompt_texts[p]] * len(texts), texts, batch).float())
            rows.append(batch)
            if rank == 0:  # what the policy wrote, to read along (rank 0's share of the prompts)
                with open(Path(cfg.run_dir) / "rollouts.jsonl", "a") as log:
                    for c, text, reward in zip(completions, texts, reward_list[-1].tolist(), strict=True):
                        log.write(json.dumps({"step": step + 1, "prompt": prompt_texts[p], "completion": text,
                                              "tokens": c, "reward": reward}) + "\n")
        group = {k: torch.cat([b[k] for b in rows]) for k in rows[0]}
        group["rewards"] = torch.cat(reward_list)
        placeholder = torch.zeros(group["tokens"].shape, device=device)  # stages before the last
        for key, chunks in (("old_logps", engine.chunks), ("ref_logps", reference)):
            found = pipeline_forward(chunks, group, t.micro_batch_size, seq, token_logps, labels=True)
            group[key] = found if found is not None else placeholder
        mask = group["loss_mask"]
        if critic is None:
            group["advantages"] = group_advantages(group["rewards"], r.group_size)[:, None] * mask
            group["value_loss"] = torch.zeros_like(group["rewards"])
        else:
            ppo_targets(group, critic)
        return iter(split(group))

    def split(group: dict) -> list[dict]:
        mbs = t.micro_batch_size
        return [{k: v[m * mbs:(m + 1) * mbs] for k, v in group.items()} for m in range(count)]

    def ppo_targets(group: dict, critic) -> None:
        """GAE on per-token rewards (KL penalty, plus the sequence reward on its last token), then
        one critic step on the clipped value loss; the rows get advantages and the critic's loss."""
        from kiln.alignment.losses import gae, whiten
        from kiln.alignment.rm import last_positions

        mask = group["loss_mask"]
        values = pipeline_forward(critic.chunks, group, t.micro_batch_size, seq, token_values)
        values = values if values is not None else torch.zeros_like(group["old_logps"])  # unused off the last stage
        rewards = -r.kl_coef * (group["old_logps"] - group["ref_logps"]) * mask
        rows = torch.arange(mask.size(0), device=mask.device)
        rewards[rows, last_positions(mask)] += group["rewards"]
        advantages, returns = gae(rewards, values, mask, r.gamma, r.lam)
        group["advantages"] = whiten(advantages, mask)
        group["returns"], group["old_values"] = returns, values
        result = train_step(critic, lambda: iter(split(group)), count, seq, t.micro_batch_size,
                            value_forward_step(r.value_clip_eps), ("value_loss",))
        group["value_loss"] = torch.full_like(group["rewards"], result["value_loss"])

    task = loop.Task(
        name="rlhf", batches=rollouts, forward_step=grpo_forward_step(cfg),
        tokens_per_step=t.global_batch_size * seq, report_names=REPORTS,
        tokenizer=cfg.data.tokenizer,
        describe=f" | {r.algorithm.upper()} {r.prompts_per_step} prompts x {r.group_size}, reward {r.reward}",
        companions={"critic": critic} if critic is not None else {},
    )
    summary = loop.train(cfg, engine, task, rank, world, device)
    if rank == 0 and "steps" in summary:
        reward = None if is_reward_function(cfg.rlhf.reward) else cfg.rlhf.reward
        write_manifest(cfg.run_dir, "rlhf", cfg, loop.manifest_inputs(cfg, reward), summary, started, request=request)
    return summary
