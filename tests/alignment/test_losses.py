"""kiln's preference losses equal TRL's on the same log-probabilities (TRL is a test-only
dependency). TRL 1.16 computes its loss inside DPOTrainer._compute_loss from a model's
per-token log-probs, so the test drives that method with a stand-in model that returns
fixed per-token log-probs."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kiln.alignment.losses import bradley_terry_loss, dpo_loss, gae, group_advantages, kl_penalty
from kiln.config import DPOLossConfig

trl = pytest.importorskip("trl")


def _trl_loss(per_token_logps, ref_per_token_logps, mask, loss_types, weights, beta):
    """TRL's DPO loss for rows [chosen..., rejected...] of per-token log-probs."""
    b, s = per_token_logps.shape

    def model(**_):
        return SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(b, s),
                               mean_logits=torch.zeros(b, s), is_top1=torch.zeros(b, s, dtype=torch.bool))

    model.training = True
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
                           loss_weights=weights, beta=beta, use_weighting=False, label_smoothing=0.0,
                           _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    full_mask = torch.cat([torch.zeros(b, 1), mask], dim=1)  # input positions; the first is prompt
    ref = (ref_per_token_logps * mask).sum(-1)
    inputs = {"input_ids": torch.zeros(b, s + 1, dtype=torch.long), "attention_mask": torch.ones(b, s + 1),
              "completion_mask": full_mask.long(), "ref_chosen_logps": ref[: b // 2],
              "ref_rejected_logps": ref[b // 2:]}
    return trl.DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_losses_match_trl(loss_type):
    torch.manual_seed(0)
    pairs, s = 6, 9
    mask = (torch.rand(2 * pairs, s) > 0.3).float()
    policy, ref = -torch.rand(2 * pairs, s) * 3, -torch.rand(2 * pairs, s) * 3
    policy, ref = policy * mask, ref * mask  # TRL's log_probs are zero off the completion
    cfg = DPOLossConfig(loss_type=loss_type, beta=0.2)
    lp, lr, counts = policy.sum(-1), ref.sum(-1), mask.sum(-1)
    ours, _, _ = dpo_loss(lp[:pairs], lp[pairs:], lr[:pairs], lr[pairs:], cfg, counts[:pairs], counts[pairs:])
    theirs = _trl_loss(policy, ref, mask, [loss_type], [1.0], beta=0.2)
    torch.testing.assert_close(ours.mean(), theirs, rtol=1e-6, atol=1e-6)


def test_rpo_adds_the_chosen_nll_as_trl_does():
    torch.manual_seed(1)
    pairs, s = 4, 7
    mask = torch.ones(2 * pairs, s)  # equal lengths: TRL averages NLL over the batch's tokens, kiln per answer
    policy, ref = -torch.rand(2 * pairs, s) * 3, -torch.rand(2 * pairs, s) * 3
    cfg = DPOLossConfig(loss_type="sigmoid", beta=0.1, rpo_alpha=0.5)
    lp, lr = policy.sum(-1), ref.sum(-1)
    dpo, _, _ = dpo_loss(lp[:pairs], lp[pairs:], lr[:pairs], lr[pairs:], cfg)
    nll = -policy[:pairs].mean(-1)
    ours = (dpo + cfg.rpo_alpha * nll).mean()
    theirs = _trl_loss(policy, ref, mask, ["sigmoid", "sft"], [1.0, 0.5], beta=0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_label_smoothing_is_conservative_dpo():
    x = torch.tensor([0.5, -1.0, 2.0])
    zeros = torch.zeros(3)
    cfg = DPOLossConfig(beta=0.3, label_smoothing=0.1)
    ours, _, _ = dpo_loss(x, zeros, zeros, zeros, cfg)
    expected = -0.9 * F.logsigmoid(0.3 * x) - 0.1 * F.logsigmoid(-0.3 * x)
    torch.testing.assert_close(ours, expected)


def test_bradley_terry_group_advantages_and_kl():
    torch.testing.assert_close(bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])),
                               -F.logsigmoid(torch.tensor([2.0])))
    adv = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0, 5.0, 5.0]), 3)
    assert adv[:3].mean().abs() < 1e-6 and adv[0] < 0 < adv[2] and adv[3:].abs().max() < 1e-3
    logp = torch.log(torch.tensor([0.2, 0.5]))
    assert kl_penalty(logp, logp).abs().max() == 0 and (kl_penalty(logp, logp - 1) > 0).all()


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.1, 0.2, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])  # generated tokens at positions 1-3
    gamma, lam = 0.9, 0.8
    d3 = 1.0 - 0.3
    d2 = 0.2 + gamma * 0.3 - 0.4
    d1 = 0.1 + gamma * 0.4 - 0.5
    a3, a2 = d3, d2 + gamma * lam * d3
    a1 = d1 + gamma * lam * a2
    adv, ret = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0.0]]))
