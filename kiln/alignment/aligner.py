"""`--backend nemo-aligner`: the same DPO / reward-model / RLHF request, run by NeMo-Aligner's
own trainers inside its NGC container, for teams already on it.

kiln writes the data in NeMo-Aligner's formats next to the run, renders the trainer command
with its Hydra overrides (model parallelism, batch sizes, optimizer, steps, the `.nemo` from
`kiln convert --to nemo`), and kiln.launch.driver.launch_aligner runs it as a script through the
same Slurm or Docker executor. NeMo-Aligner (deprecated upstream for NeMo-RL) cannot be installed
next to kiln's pins, so here only the rendered commands are tested; nothing in this module ran it.
RLHF renders NeMo-Aligner's PPO (critic server + actor): it has no GRPO.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from kiln.data.records import DataReport, read_jsonl
from kiln.errors import ConfigError

ALIGNER = "/opt/NeMo-Aligner/examples/nlp/gpt"  # where the NeMo containers that ship it keep it
ALIGNER_IMAGE = "nvcr.io/nvidia/nemo:24.07"  # a NeMo 1.x container with NeMo-Aligner installed


def _text(value) -> str:
    if isinstance(value, list):
        return "\n".join(m["content"] for m in value)
    return value


def write_aligner_data(stage: str, path: str, out: Path) -> Path:
    """DPO: {prompt, chosen_response, rejected_response}; RM: consecutive {text} lines, chosen
    first (NeMo-Aligner's binary-ranking format)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    report = DataReport()
    with open(out, "w") as f:
        for _where, r in read_jsonl(path, report, strict=True):
            prompt = _text(r["prompt"])
            if stage == "dpo":
                f.write(json.dumps({"prompt": prompt, "chosen_response": _text(r["chosen"]),
                                    "rejected_response": _text(r["rejected"])}) + "\n")
            else:
                for side in ("chosen", "rejected"):
                    f.write(json.dumps({"text": prompt + _text(r[side])}) + "\n")
    return out


def _common(cfg, nemo: str, nodes: int, devices: int) -> list[str]:
    t, p, o = cfg.train, cfg.parallel, cfg.optimizer
    return [
        f"trainer.num_nodes={nodes}", f"trainer.devices={devices}",
        f"pretrained_checkpoint.restore_from_path={nemo}",
        f"++model.tensor_model_parallel_size={p.tp}", f"++model.pipeline_model_parallel_size={p.pp}",
        f"++model.micro_batch_size={t.micro_batch_size}", f"++model.global_batch_size={t.global_batch_size}",
        f"++model.encoder_seq_length={t.seq_length}", f"++model.optim.lr={o.lr}",
        f"++model.optim.weight_decay={o.weight_decay}", f"++model.optim.sched.min_lr={o.min_lr}",
        f"exp_manager.explicit_log_dir={cfg.run_dir}/aligner", "exp_manager.create_wandb_logger=False",
    ]


def _data_prefix(train: Path, valid: Path) -> str:
    return f"model.data.data_prefix={{train: [{train}], validation: [{valid}], test: [{valid}]}}"


PREFERENCE_LOSS = {"sigmoid": "dpo", "ipo": "ipo"}


def render(stage: str, cfg, nemo: str, nodes: int = 1, devices: int = 8) -> list[str]:
    """The shell command(s) NeMo-Aligner runs for this request."""
    if not nemo or not nemo.endswith(".nemo"):
        raise ConfigError(f"--aligner-input={nemo!r}: NeMo-Aligner restores a .nemo file; write one with "
                          f"`kiln convert <checkpoint> --to nemo --output model.nemo`")
    data = Path(cfg.run_dir) / "aligner_data"
    args = _common(cfg, nemo, nodes, devices)
    if stage in ("dpo", "rm"):
        train = data / f"{stage}_train.jsonl"
        valid = data / f"{stage}_valid.jsonl" if cfg.data.valid else train
        args.append(_data_prefix(train, valid))
    if stage == "dpo":
        d = cfg.dpo
        loss = "rpo_sq" if d.rpo_alpha else PREFERENCE_LOSS.get(d.loss_type)
        if loss is None:
            raise ConfigError(f"dpo.loss_type={d.loss_type}: NeMo-Aligner has dpo, ipo and rpo losses; "
                              f"use sigmoid or ipo with --backend nemo-aligner")
        args += [f"trainer.dpo.max_steps={cfg.train.steps}", f"model.dpo.ref_policy_kl_penalty={d.beta}",
                 f"model.dpo.preference_loss={loss}",
                 f"model.dpo.sft_loss_weight={d.rpo_alpha or 0.0}"]
        return [_command("train_gpt_dpo.py", args)]
    if stage == "rm":
        args += [f"trainer.rm.max_steps={cfg.train.steps}", "model.reward_model_type=binary_ranking"]
        return [_command("train_reward_model.py", args)]
    if stage == "rlhf":
        r = cfg.rlhf
        from kiln.alignment.rlhf import is_reward_function

        if is_reward_function(r.reward):
            raise ConfigError("rlhf.reward is a Python function: NeMo-Aligner's PPO needs a reward model "
                              "(.nemo from kiln convert of a `kiln rm` checkpoint)")
        critic = _command("serve_ppo_critic.py", [f"pretrained_checkpoint.restore_from_path={r.reward}",
                                                 f"trainer.num_nodes={nodes}", f"trainer.devices={devices}"])
        actor = _command("train_gpt_ppo_actor.py", args + [
            f"trainer.ppo.max_steps={cfg.train.steps}", f"model.ppo.initial_policy_kl_penalty={r.kl_coef}",
            f"model.ppo.ratio_eps={r.clip_eps}", f"model.ppo.num_rollout_samples={r.prompts_per_step * r.group_size}",
            f"model.ppo.length_params.max_length={r.generation.max_new_tokens}",
            f"model.ppo.sampling_params.temperature={r.generation.temperature}",
            f"model.ppo.sampling_params.top_k={r.generation.top_k}",
            f"model.ppo.sampling_params.top_p={r.generation.top_p}",
            f"\"model.data.data_prefix={{train: [{cfg.data.train}], validation: [{cfg.data.train}], "
            f"test: [{cfg.data.train}]}}\"",
            "remote_critic_rm.critic.ip=localhost", "remote_critic_rm.critic.port=5567",
        ])
        return [f"{critic} &", "sleep 120  # the critic server loads its model", actor]
    raise ConfigError(f"--backend nemo-aligner supports dpo, rm and rlhf, not {stage}")


def _command(script: str, args: list[str]) -> str:
    quoted = [a if a.startswith('"') else shlex.quote(a) for a in args]
    return " \\\n  ".join([f"python -u {ALIGNER}/{script}", *quoted])


def write_data(stage: str, cfg) -> None:
    """NeMo-Aligner's data files for a DPO or reward-model request, next to the run."""
    if stage not in ("dpo", "rm"):
        return
    data = Path(cfg.run_dir) / "aligner_data"
    write_aligner_data(stage, cfg.data.train, data / f"{stage}_train.jsonl")
    if cfg.data.valid:
        write_aligner_data(stage, cfg.data.valid, data / f"{stage}_valid.jsonl")
