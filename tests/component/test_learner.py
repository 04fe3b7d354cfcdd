"""Learner on the tiny digits model, in-process: first loss, versions, exported keys, overfitting, micro-batch
exactness, save/load resume determinism and all-tie batches.

Rollouts come from a real Sampler scored by the embedded digit classifier (configs/tiny.yaml sizes).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import get_peft_model_state_dict

from reward_servers.base import RewardServer
from rlalign.actors import branch_cfg, make_reward_model
from rlalign.algos.common import num_rows
from rlalign.config import RunCfg, load_config
from rlalign.learner import Learner
from rlalign.models.loading import load_parts, resolve_model_dir
from rlalign.prompts import PromptSource
from rlalign.rewards import LocalRewardHandle, RewardSet
from rlalign.sampling.sampler import Sampler
from rlalign.types import ScoredRollouts

TINY_YAML = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
PREFERENCE_ALGOS = ["tailorpo", "diffusion_dpo", "dde_stepwise", "ncp_dpo"]


def setup_run(overrides: list[str], algo: str, *extra: str) -> tuple[RunCfg, Any]:
    cfg = load_config(TINY_YAML, [f"algo={algo}", *overrides, *extra])
    mdir = str(resolve_model_dir(cfg.model, progress=False))
    return cfg, functools.partial(load_parts, replace(cfg.model, path=mdir), cfg.lora, cfg.sampler.num_steps)


def scored_rollouts(cfg: RunCfg, make_parts: Any, *, groups: int = 4, seed: int = 0) -> ScoredRollouts:
    """One sampler call (branching when the algorithm needs step pairs) scored by the digit classifier."""
    mdir = str(resolve_model_dir(cfg.model, progress=False))
    spec = cfg.reward.models[0]
    rewards = RewardSet(
        [spec], [LocalRewardHandle(spec.name, RewardServer(functools.partial(make_reward_model, spec, mdir)))]
    )
    branch = branch_cfg(cfg)
    sampler = Sampler(cfg.sampler, make_parts, branch=branch, scorer=rewards if branch else None)
    batch = PromptSource(cfg.prompts, seed).next(groups, cfg.sampler.images_per_prompt, 1)[0]
    return rewards.score_rollout(sampler.generate(batch))


def lora_tensors(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.export_weights().tensors.items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# first update, versions, exported keys
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", PREFERENCE_ALGOS)
def test_fresh_lora_first_loss_is_ln2_and_versions_count_updates(tiny_overrides: list[str], algo: str) -> None:
    cfg, make_parts = setup_run(tiny_overrides, algo)
    learner = Learner(cfg, make_parts)
    scored = scored_rollouts(cfg, make_parts)
    before = lora_tensors(learner)
    assert learner.export_weights().version == 0
    m1 = learner.update(scored)
    assert m1["learner/rows"] > 0
    assert abs(m1["loss/first"] - math.log(2)) < 1e-6, m1
    assert m1["learner/version"] == 1.0 and learner.version == 1
    m2 = learner.update(scored)
    assert m2["learner/version"] == 2.0 and learner.export_weights().version == 2
    assert math.isfinite(m2["loss/first"]) and m2["loss/first"] != m1["loss/first"]
    after = lora_tensors(learner)
    assert any(not torch.equal(before[k], after[k]) for k in before), "two updates left the LoRA unchanged"


def test_export_weights_holds_only_lora_tensors_on_cpu(tiny_overrides: list[str]) -> None:
    cfg, make_parts = setup_run(tiny_overrides, "diffusion_dpo")
    learner = Learner(cfg, make_parts)
    update = learner.export_weights()
    assert update.tensors, "no LoRA tensors exported"
    assert all("lora_" in k for k in update.tensors), [k for k in update.tensors if "lora_" not in k][:3]
    assert all(v.device.type == "cpu" for v in update.tensors.values())
    assert update.tensors.keys() == get_peft_model_state_dict(learner.parts.unet).keys()
    n_lora = sum(1 for n, _ in learner.parts.unet.named_parameters() if "lora_" in n)
    assert len(update.tensors) == n_lora == len(learner.params)
    # fresh adapter: every B is zero, every A is not
    assert all(not v.any() for k, v in update.tensors.items() if "lora_B" in k)
    assert all(v.any() for k, v in update.tensors.items() if "lora_A" in k)
    # a copy: changing the learner afterwards does not change an exported update
    with torch.no_grad():
        for p in learner.params:
            p.add_(1.0)
    assert all(not v.any() for k, v in update.tensors.items() if "lora_B" in k)


# ---------------------------------------------------------------------------------------------------------------
# learning
# ---------------------------------------------------------------------------------------------------------------


def test_tailorpo_overfits_a_fixed_batch(tiny_overrides: list[str]) -> None:
    # TailorPO's batch is the stored step pairs (no fresh t / noise), so the loss is a deterministic function of
    # the weights and repeated updates on the same rollouts must lower it step after step
    cfg, make_parts = setup_run(tiny_overrides, "tailorpo")
    learner = Learner(cfg, make_parts)
    scored = scored_rollouts(cfg, make_parts, groups=2)
    losses = [learner.update(scored)["loss/first"] for _ in range(6)]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.05, losses


def test_diffusion_dpo_overfits_a_fixed_batch(tiny_overrides: list[str]) -> None:
    # every update draws fresh (t, noise) from the learner's generator; re-seeding it before each update makes the
    # batch truly fixed (same pairs, t and noise), so the loss on exactly that batch must fall
    cfg, make_parts = setup_run(tiny_overrides, "diffusion_dpo", "learner.lr=1e-3", "diffusion_dpo.beta=100")
    learner = Learner(cfg, make_parts)
    scored = scored_rollouts(cfg, make_parts)
    held = learner.algo.build_batch(scored, learner.algo_cfg, torch.Generator().manual_seed(5))

    def held_loss() -> float:
        with torch.no_grad():
            return float(
                learner.algo.loss(learner.algo.forward(learner.model, held, learner.algo_cfg), learner.algo_cfg).loss
            )

    start = held_loss()
    assert abs(start - math.log(2)) < 1e-6
    for _ in range(8):
        learner.generator.manual_seed(5)
        learner.update(scored)
    assert held_loss() < start - 0.1


@pytest.mark.parametrize("algo", ["diffusion_dpo", "tailorpo"])
def test_micro_batch_accumulation_is_exact(tiny_overrides: list[str], algo: str) -> None:
    # whole update, public metrics: micro-batch 1 and one full micro-batch see the same loss and gradient norm.
    # (TailorPO with micro-batch 1 also covers a micro-batch whose only row is masked out by min_std)
    runs = []
    for micro in ("1", "1024"):
        cfg, make_parts = setup_run(tiny_overrides, algo, f"learner.micro_batch_size={micro}")
        learner = Learner(cfg, make_parts)
        runs.append(learner.update(scored_rollouts(cfg, make_parts)))
    a, b = runs
    assert a["learner/rows"] == b["learner/rows"] > 2
    assert abs(a["loss/first"] - b["loss/first"]) < 1e-6
    assert abs(a["learner/grad_norm"] - b["learner/grad_norm"]) <= 1e-5 * b["learner/grad_norm"]
    assert b["learner/grad_norm"] > 0

    # away from the fresh LoRA (where every split gives ln 2), per-parameter gradients and losses agree exactly
    learner.update(scored_rollouts(cfg, make_parts))
    batch = learner.algo.build_batch(scored_rollouts(cfg, make_parts, seed=1), learner.algo_cfg, torch.Generator())
    rows = num_rows(batch)
    results = []
    for micro in (rows, 1, 3):
        learner.cfg.micro_batch_size = micro
        loss, _ = learner._accumulate(batch)
        results.append((loss, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in learner.params]))
        learner.opt.zero_grad(set_to_none=True)
    (full_loss, full_grads), *splits = results
    assert abs(full_loss - math.log(2)) > 1e-4, "still at the fresh LoRA: the comparison would be trivial"
    scale = max(float(g.abs().max()) for g in full_grads)
    assert scale > 0
    for loss, grads in splits:
        # diffusion_dpo's beta = 1000 multiplies float32 rounding of the per-row errors (~1e-7) into the logits
        assert abs(loss - full_loss) < 1e-4 * max(1.0, full_loss)
        for g, h in zip(grads, full_grads):
            torch.testing.assert_close(g, h, rtol=1e-3, atol=1e-4 * scale)  # float32 rounding x beta


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_save_load_reproduces_the_next_update(tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg, make_parts = setup_run(tiny_overrides, "diffusion_dpo", "learner.lr=1e-3")
    first, second = scored_rollouts(cfg, make_parts, seed=0), scored_rollouts(cfg, make_parts, seed=1)
    learner = Learner(cfg, make_parts, seed=0)
    learner.update(first)
    learner.save(tmp_path / "ckpt", extra_state={"note": "x"})
    assert (tmp_path / "ckpt" / "diffusers_lora").is_dir()
    expected = learner.update(second)
    expected_weights = lora_tensors(learner)

    resumed = Learner(cfg, make_parts, seed=123)  # another seed: the saved generator must win
    assert resumed.load(tmp_path / "ckpt") == 1
    got = resumed.update(second)
    assert abs(got["loss/first"] - expected["loss/first"]) < 1e-6
    assert got["learner/version"] == expected["learner/version"] == 2.0
    # the optimiser state came back too (AdamW moments decide the step): same weights after the update
    assert_same_tensors(got_weights := lora_tensors(resumed), expected_weights, atol=1e-6)
    assert got_weights

    # control: without load, the same next batch gives another loss (t / noise come from the learner generator)
    fresh = Learner(cfg, make_parts, seed=123)
    fresh.update(first)
    assert abs(fresh.update(second)["loss/first"] - expected["loss/first"]) > 1e-6


def test_load_incomplete_checkpoint_names_the_missing_file(tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg, make_parts = setup_run(tiny_overrides, "diffusion_dpo")
    learner = Learner(cfg, make_parts)
    learner.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"optimizer\.pt"):
        learner.load(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------------------------
# nothing to learn
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["diffusion_dpo", "tailorpo"])
def test_all_ties_batch_is_skipped_without_a_new_version(tiny_overrides: list[str], algo: str) -> None:
    cfg, make_parts = setup_run(tiny_overrides, algo)
    learner = Learner(cfg, make_parts)
    scored = scored_rollouts(cfg, make_parts)
    learner.update(scored)  # version 1, LoRA no longer zero
    before = lora_tensors(learner)
    ties = replace(scored, scores=torch.full_like(scored.scores, 0.5))
    if scored.rollout.step_pairs is not None:  # TailorPO pairs are the sampler's step-wise ranking
        sp = scored.rollout.step_pairs
        sp = replace(sp, valid=torch.zeros_like(sp.valid), reward_l=sp.reward_w.clone())
        ties = replace(ties, rollout=replace(scored.rollout, step_pairs=sp))
    metrics = learner.update(ties)
    assert metrics["learner/skipped"] == 1.0 and metrics["learner/rows"] == 0.0
    assert "learner/version" not in metrics and "loss/total" not in metrics
    assert learner.version == 1 and learner.export_weights().version == 1
    assert_same_tensors(lora_tensors(learner), before)
    # the next real batch still trains and takes the next version
    assert learner.update(scored)["learner/version"] == 2.0


def test_tailorpo_batch_of_only_masked_steps_does_not_crash(tiny_overrides: list[str]) -> None:
    # regression: rows whose DDIM std is below tailorpo.min_std get no model call, so a (micro-)batch of only such
    # rows has a loss without a graph; backward() on it used to raise in Learner._accumulate
    cfg, make_parts = setup_run(tiny_overrides, "tailorpo")
    learner = Learner(cfg, make_parts)
    scored = scored_rollouts(cfg, make_parts)
    sp = scored.rollout.step_pairs
    assert sp is not None
    last_only = torch.zeros_like(sp.valid)
    last_only[:, -1] = True  # the final step of the 4-step grid has std < min_std
    masked = replace(scored, rollout=replace(scored.rollout, step_pairs=replace(sp, valid=last_only)))
    before = lora_tensors(learner)
    metrics = learner.update(masked)
    assert metrics["tailorpo/kept_frac"] == 0.0 and metrics["learner/rows"] == len(scored.rollout)
    assert abs(metrics["loss/first"] - math.log(2)) < 1e-6
    assert_same_tensors(lora_tensors(learner), before)
