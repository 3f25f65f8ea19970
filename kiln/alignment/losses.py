"""Alignment losses on sequence log-probabilities: DPO and its variants, Bradley-Terry, and the
policy-gradient pieces of RLHF (GAE, group-relative advantages, clipped objectives, KL).

Plain functions of tensors, so tests compare them with TRL on identical inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.config import DPOLossConfig


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, cfg: DPOLossConfig, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None):
    """Per-pair losses and the implicit rewards beta * log(pi / pi_ref) of each answer.

    Inputs are summed log-probabilities of each answer. IPO compares per-token averages (as TRL
    does, following the IPO authors), so it needs the answers' token counts.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    beta = cfg.beta
    if cfg.loss_type == "sigmoid":  # DPO; with label smoothing, conservative DPO
        eps = cfg.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif cfg.loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif cfg.loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("IPO needs the token counts of the chosen and rejected answers")
        mean_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (mean_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type={cfg.loss_type!r}: use sigmoid, ipo or hinge")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), per pair."""
    return -F.logsigmoid(reward_chosen - reward_rejected)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each completion's reward relative to the other completions of its prompt,
    (r - mean) / (std + eps) within consecutive groups of `group_size`."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over [batch, T] per-token rewards and values, where
    `mask` marks each row's generated tokens (one contiguous run). Returns (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.size(1) else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) / (var.sqrt() + eps) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_eps: float) -> torch.Tensor:
    """PPO's clipped value objective, per token."""
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float) -> torch.Tensor:
    """PPO's clipped surrogate, per token (to be masked and summed by the caller)."""
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(r) - r - 1 with r = log pi_ref - log pi;
    non-negative and unbiased (Schulman's estimator, as GRPO uses)."""
    r = ref_logps - logps
    return torch.exp(r) - r - 1
