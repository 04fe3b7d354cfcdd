"""Sampler on the tiny digits model, in-process: determinism, shapes, log-probs, branching, guidance, weights.

Every test builds its own Sampler (the tiny model loads in a fraction of a second) and uses configs/tiny.yaml
sizes: 4 DDIM steps, 8x8x4 latents, 16x16 images.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict

from reward_servers.base import RewardServer
from reward_servers.simple import Brightness
from rlalign.actors import branch_cfg, make_reward_model
from rlalign.config import RewardSpec, RunCfg, load_config
from rlalign.learner import Learner
from rlalign.models.loading import DiffusionParts, load_parts, resolve_model_dir
from rlalign.prompts import PromptSource
from rlalign.rewards import LocalRewardHandle, RewardSet
from rlalign.sampling.logprob import ddim_step_with_logprob, predicted_x0, prev_timestep
from rlalign.sampling.sampler import BranchCfg, Sampler
from rlalign.types import PromptBatch, WeightsUpdate, concat_rollouts

TINY_YAML = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def setup_run(overrides: list[str], algo: str = "diffusion_dpo", *extra: str) -> tuple[RunCfg, str, Any]:
    """(config, model dir, make_parts factory) for the tiny digits model."""
    cfg = load_config(TINY_YAML, [f"algo={algo}", *overrides, *extra])
    mdir = str(resolve_model_dir(cfg.model, progress=False))
    make_parts = functools.partial(load_parts, replace(cfg.model, path=mdir), cfg.lora, cfg.sampler.num_steps)
    return cfg, mdir, make_parts


def digit_rewards(cfg: RunCfg, mdir: str) -> RewardSet:
    spec = cfg.reward.models[0]
    server = RewardServer(functools.partial(make_reward_model, spec, mdir))
    return RewardSet([spec], [LocalRewardHandle(spec.name, server)])


def brightness_rewards() -> RewardSet:
    return RewardSet([RewardSpec(name="brightness")], [LocalRewardHandle("brightness", RewardServer(Brightness))])


def prompt_batch(cfg: RunCfg, groups: int = 2, per_group: int = 2) -> PromptBatch:
    return PromptSource(cfg.prompts, 0).next(groups, per_group, 1)[0]


def sub_batch(batch: PromptBatch, lo: int, hi: int) -> PromptBatch:
    return PromptBatch(batch.prompts[lo:hi], batch.group_ids[lo:hi], batch.seeds[lo:hi])


@torch.no_grad()
def guided_eps(parts: DiffusionParts, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guided eps recomputed independently of the sampler (two separate U-Net calls)."""
    neg = parts.encode_prompts([""]).expand_as(cond)
    e_u = parts.unet(x, t, encoder_hidden_states=neg).sample.float()
    e_c = parts.unet(x, t, encoder_hidden_states=cond).sample.float()
    return e_u + w * (e_c - e_u)


class CountingScorer:
    """A StepScorer around a RewardSet that records every call's batch size."""

    differentiable = False

    def __init__(self, inner: RewardSet) -> None:
        self.inner, self.calls = inner, []

    def score(self, images: np.ndarray, prompts: Any) -> np.ndarray:
        self.calls.append(len(images))
        return self.inner.score(images, prompts)

    def score_and_grad(self, images: np.ndarray, prompts: Any) -> tuple[np.ndarray, np.ndarray]:
        raise AssertionError("a non-guided sampler must not ask for gradients")


class ConstantScorer:
    differentiable = False

    def score(self, images: np.ndarray, prompts: Any) -> np.ndarray:
        return np.ones(len(images), np.float32)

    def score_and_grad(self, images: np.ndarray, prompts: Any) -> tuple[np.ndarray, np.ndarray]:
        raise AssertionError("not differentiable")


# ---------------------------------------------------------------------------------------------------------------
# determinism and batch independence
# ---------------------------------------------------------------------------------------------------------------


def test_same_seeds_and_weights_give_bit_identical_rollouts(tiny_overrides: list[str]) -> None:
    cfg, _, make_parts = setup_run(tiny_overrides)
    batch = prompt_batch(cfg)
    a = Sampler(cfg.sampler, make_parts).generate(batch)
    b = Sampler(cfg.sampler, make_parts).generate(batch)
    np.testing.assert_array_equal(a.images, b.images)
    assert torch.equal(a.latents, b.latents)
    assert torch.equal(a.log_probs, b.log_probs)
    # different seeds give different images (the test above could not pass with a constant sampler)
    other = PromptBatch(batch.prompts, batch.group_ids, batch.seeds + 1000)
    c = Sampler(cfg.sampler, make_parts).generate(other)
    assert not torch.equal(a.latents, c.latents)


def test_n_samplers_times_b_prompts_equals_one_sampler_times_nb(tiny_overrides: list[str]) -> None:
    cfg, _, make_parts = setup_run(tiny_overrides)
    batch = prompt_batch(cfg, groups=2, per_group=2)
    whole = Sampler(cfg.sampler, make_parts).generate(batch)
    split = concat_rollouts(
        [Sampler(cfg.sampler, make_parts, worker_index=i).generate(sub_batch(batch, 2 * i, 2 * i + 2)) for i in (0, 1)]
    )
    assert split.prompts == whole.prompts
    assert torch.equal(split.group_ids, whole.group_ids) and torch.equal(split.seeds, whole.seeds)
    # x_T depends only on the seed: exact
    assert torch.equal(split.latents[:, 0], whole.latents[:, 0])
    # later steps go through U-Net calls of another batch size: equal up to float reduction order
    torch.testing.assert_close(split.latents, whole.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(split.log_probs, whole.log_probs, rtol=0, atol=1e-4)
    assert np.abs(split.images.astype(int) - whole.images.astype(int)).max() <= 1


def test_initial_noise_depends_only_on_the_image_seed(tiny_overrides: list[str]) -> None:
    cfg, _, make_parts = setup_run(tiny_overrides)
    sampler = Sampler(cfg.sampler, make_parts)
    batch = prompt_batch(cfg)
    r = sampler.generate(batch)
    for row, seed in enumerate(batch.seeds.tolist()):
        expected = torch.randn((1, *sampler.parts.latent_shape), generator=torch.Generator().manual_seed(seed))[0]
        assert torch.equal(r.latents[row, 0], expected)


# ---------------------------------------------------------------------------------------------------------------
# rollout record
# ---------------------------------------------------------------------------------------------------------------


def test_rollout_shapes_and_types(tiny_overrides: list[str]) -> None:
    cfg, _, make_parts = setup_run(tiny_overrides)
    sampler = Sampler(cfg.sampler, make_parts)
    batch = prompt_batch(cfg, groups=2, per_group=2)
    r = sampler.generate(batch)
    b, t = len(batch), cfg.sampler.num_steps
    c, h, w = sampler.parts.latent_shape
    factor = 2 ** (len(sampler.parts.vae.config.block_out_channels) - 1)
    assert r.latents.shape == (b, t + 1, c, h, w)
    assert r.log_probs.shape == (b, t) and torch.isfinite(r.log_probs).all()
    assert r.images.dtype == np.uint8 and r.images.shape == (b, h * factor, w * factor, 3)
    assert r.timesteps.shape == (t,) and r.timesteps.dtype == torch.int64
    assert (r.timesteps[:-1] > r.timesteps[1:]).all(), "DDIM runs from noise (high t) to data"
    assert r.prompt_embeds.shape[0] == b and r.negative_embeds.shape[0] == 1
    assert r.prompts == batch.prompts and torch.equal(r.group_ids, batch.group_ids)
    assert r.step_pairs is None
    assert r.policy_version == 0
    assert all(x.device.type == "cpu" for x in (r.latents, r.log_probs, r.prompt_embeds))
    # the final latent decodes to exactly the returned images
    with torch.no_grad():
        decoded = sampler.parts.decode(r.latents[:, -1])
    assert np.abs((decoded.permute(0, 2, 3, 1).numpy() * 255).round() - r.images).max() <= 1


@pytest.mark.parametrize("algo", ["diffusion_dpo", "tailorpo"])
def test_recorded_log_probs_equal_ddim_rescoring_of_the_stored_latents(tiny_overrides: list[str], algo: str) -> None:
    cfg, mdir, make_parts = setup_run(tiny_overrides, algo)
    b = branch_cfg(cfg)
    assert (b is not None) == (algo == "tailorpo")
    sampler = Sampler(cfg.sampler, make_parts, branch=b, scorer=digit_rewards(cfg, mdir) if b else None)
    r = sampler.generate(prompt_batch(cfg))
    parts, eta, w = sampler.parts, cfg.sampler.eta, cfg.sampler.guidance_scale
    for i, t in enumerate(r.timesteps):
        x = r.latents[:, i]
        e = guided_eps(parts, x, t, r.prompt_embeds, w)
        _, logp = ddim_step_with_logprob(parts.scheduler, e, t, x, eta, prev_sample=r.latents[:, i + 1])
        torch.testing.assert_close(r.log_probs[:, i], logp, rtol=0, atol=1e-4)
        # independent of rlalign's maths: diffusers' own DDIM mean and variance give the same Gaussian density
        mean = parts.scheduler.step(e, int(t), x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        std = eta * float(parts.scheduler._get_variance(int(t), int(prev_timestep(parts.scheduler, t)))) ** 0.5
        dens = -((r.latents[:, i + 1] - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)
        torch.testing.assert_close(r.log_probs[:, i], dens.mean(dim=(1, 2, 3)), rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# branching (TailorPO)
# ---------------------------------------------------------------------------------------------------------------


def test_branching_records_ranked_pairs_and_continues_from_the_winner(tiny_overrides: list[str]) -> None:
    cfg, mdir, make_parts = setup_run(tiny_overrides, "tailorpo")
    branch = branch_cfg(cfg)
    assert branch is not None and not branch.guide
    scorer = CountingScorer(digit_rewards(cfg, mdir))
    sampler = Sampler(cfg.sampler, make_parts, branch=branch, scorer=scorer)
    batch = prompt_batch(cfg)
    r = sampler.generate(batch)
    sp = r.step_pairs
    assert sp is not None
    b, t, k = len(batch), cfg.sampler.num_steps, branch.num_candidates
    lat = sampler.parts.latent_shape
    for x in (sp.x_t, sp.x_w, sp.x_l):
        assert x.shape == (b, t, *lat)
    assert sp.valid.shape == sp.reward_w.shape == sp.reward_l.shape == (b, t)
    assert sp.valid.dtype == torch.bool and torch.equal(sp.timesteps, r.timesteps)
    assert (sp.reward_w >= sp.reward_l).all()
    assert torch.equal(sp.valid, (sp.reward_w - sp.reward_l) > branch.tie_eps)
    assert sp.valid.any(), "the digit classifier should separate at least one candidate pair"
    # the trajectory continues from the winner; x_t is the shared parent
    assert torch.equal(sp.x_w, r.latents[:, 1:])
    assert torch.equal(sp.x_t, r.latents[:, :-1])
    assert not torch.equal(sp.x_w[sp.valid], sp.x_l[sp.valid])
    # one scorer call per step, each over all k candidates of every row; then the plain images' reward
    n = min(cfg.sampler.plain_images, b)
    assert n > 0 and scorer.calls == [k * b] * t + [n]
    # plain sampling on the same sampler neither branches nor scores
    plain = sampler.generate(batch, branch=False)
    assert plain.step_pairs is None and len(scorer.calls) == t + 1
    # plain/weighted/mean is the reward of exactly these images (same seeds, no branching), spread over the batch
    idx = (torch.arange(n) * (b // n)).tolist()
    expected = scorer.inner.score(plain.images[idx], [batch.prompts[i] for i in idx])
    assert r.metrics["plain/weighted/mean"] == pytest.approx(float(np.mean(expected.astype(np.float64))), abs=1e-6)
    # ... and the rollout carries them per prompt (what prompts.sampling=adaptive steers by)
    assert r.plain is not None and r.plain.prompts == [batch.prompts[i] for i in idx]
    np.testing.assert_allclose(r.plain.rewards, expected, atol=1e-6)
    assert plain.plain is None
    assert float(np.mean(expected)) != pytest.approx(float(sp.reward_w[:, -1].mean()), abs=1e-4)  # not the search


def test_branching_ties_are_invalid(tiny_overrides: list[str]) -> None:
    cfg, _, make_parts = setup_run(tiny_overrides, "tailorpo")
    sampler = Sampler(cfg.sampler, make_parts, branch=branch_cfg(cfg), scorer=ConstantScorer())
    sp = sampler.generate(prompt_batch(cfg)).step_pairs
    assert sp is not None
    assert not sp.valid.any()
    assert torch.equal(sp.reward_w, sp.reward_l)


def test_branching_tie_eps_drops_small_gaps(tiny_overrides: list[str]) -> None:
    cfg, mdir, make_parts = setup_run(tiny_overrides, "tailorpo")
    rewards = digit_rewards(cfg, mdir)
    batch = prompt_batch(cfg)
    sp0 = Sampler(cfg.sampler, make_parts, branch=BranchCfg(), scorer=rewards).generate(batch).step_pairs
    assert sp0 is not None
    gaps = (sp0.reward_w - sp0.reward_l)[sp0.valid]
    eps = float(gaps.median())
    sp1 = Sampler(cfg.sampler, make_parts, branch=BranchCfg(tie_eps=eps), scorer=rewards).generate(batch).step_pairs
    assert sp1 is not None
    assert torch.equal(sp1.valid, (sp1.reward_w - sp1.reward_l) > eps)
    # step 0 branches from the same x_T with the same noise: identical candidates, only validity changes
    assert torch.equal(sp1.reward_w[:, 0], sp0.reward_w[:, 0])
    assert sp1.valid.sum() < sp0.valid.sum()


def test_branching_sampler_needs_a_scorer(tiny_overrides: list[str]) -> None:
    cfg, _, make_parts = setup_run(tiny_overrides, "tailorpo")
    with pytest.raises(ValueError, match="scorer"):
        Sampler(cfg.sampler, make_parts, branch=BranchCfg(), scorer=None)


# ---------------------------------------------------------------------------------------------------------------
# TailorPO-G: gradient guidance of the winner
# ---------------------------------------------------------------------------------------------------------------


def _step_brightness(parts: DiffusionParts, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: float) -> Any:
    """Step-wise reward (target x0_hat) of samples x at the step after t: brightness of decode(x0_hat(x, s))."""
    s = prev_timestep(parts.scheduler, t)
    x0 = predicted_x0(parts.scheduler, guided_eps(parts, x, s, cond, w), s, x)
    with torch.no_grad():
        return parts.decode(x0).mean(dim=(1, 2, 3))


def test_tailorpo_g_guidance_moves_the_winner_up_the_reward(tiny_overrides: list[str]) -> None:
    cfg, _, make_parts = setup_run(tiny_overrides, "tailorpo_g")
    branch = branch_cfg(cfg)
    assert branch is not None and branch.guide
    rewards = brightness_rewards()
    assert rewards.differentiable
    batch = prompt_batch(cfg, groups=4, per_group=2)
    guided = Sampler(cfg.sampler, make_parts, branch=branch, scorer=rewards).generate(batch)
    plain = Sampler(cfg.sampler, make_parts, branch=replace(branch, guide=False), scorer=rewards).generate(batch)
    g, p = guided.step_pairs, plain.step_pairs
    assert g is not None and p is not None
    # step 0: same x_T, same candidates, same ranking; only the winner moved
    assert torch.equal(g.x_t[:, 0], p.x_t[:, 0]) and torch.equal(g.x_l[:, 0], p.x_l[:, 0])
    assert torch.equal(g.reward_w[:, 0], p.reward_w[:, 0])
    moved = (g.x_w[:, 0] - p.x_w[:, 0]).flatten(1)
    assert (moved.norm(dim=1) > 0).all()
    # rms_sigma: the shift per element has RMS eta_g * sigma_t
    sched = make_parts().scheduler
    t0 = int(guided.timesteps[0])
    sigma = cfg.sampler.eta * float(sched._get_variance(t0, int(prev_timestep(sched, t0)))) ** 0.5
    rms = moved.pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, branch.guidance_step * sigma), rtol=1e-3, atol=0)
    # the guided winner's step reward (brightness of its x0-hat) is higher than the unguided winner's
    parts = make_parts()
    w = cfg.sampler.guidance_scale
    gain = _step_brightness(parts, g.x_w[:, 0], guided.timesteps[0], guided.prompt_embeds, w) - _step_brightness(
        parts, p.x_w[:, 0], plain.timesteps[0], plain.prompt_embeds, w
    )
    assert gain.mean() > 0 and (gain > 0).float().mean() >= 0.75, gain


def test_stopgrad_eps_guidance_reuses_the_candidates_eps(tiny_overrides: list[str]) -> None:
    """stopgrad_eps: g = d R(decode(x0_hat(x, e))) / d x with e held at the winner's eps, which the candidates'
    scoring already computed. Step 0's guided winner equals that formula recomputed here from scratch, and every
    branched step costs k candidates plus the moved winner (2 U-Net rows each, CFG), no third eps."""
    cfg, _, make_parts = setup_run(tiny_overrides, "tailorpo_g", "tailorpo.guidance_grad=stopgrad_eps")
    branch = branch_cfg(cfg)
    assert branch is not None and branch.guide and branch.guidance_mode == "stopgrad_eps"
    rewards = brightness_rewards()
    batch = prompt_batch(cfg, groups=2, per_group=2)
    sampler = Sampler(cfg.sampler, make_parts, branch=branch, scorer=rewards)
    guided = sampler.generate(batch)
    plain = Sampler(cfg.sampler, make_parts, branch=replace(branch, guide=False), scorer=rewards).generate(batch)
    g, p = guided.step_pairs, plain.step_pairs
    assert g is not None and p is not None
    parts, w, t0 = make_parts(), cfg.sampler.guidance_scale, guided.timesteps[0]
    s = prev_timestep(parts.scheduler, t0)
    x = p.x_w[:, 0].clone().requires_grad_(True)  # step 0's unguided winner: guidance starts from it
    e = guided_eps(parts, p.x_w[:, 0], s, guided.prompt_embeds, w)  # held fixed: no grad through the U-Net
    img = parts.decode(predicted_x0(parts.scheduler, e, s, x))
    (grad,) = torch.autograd.grad(img.mean(dim=(1, 2, 3)).sum(), x)  # brightness = mean pixel
    sched = parts.scheduler
    sigma = cfg.sampler.eta * float(sched._get_variance(int(t0), int(s))) ** 0.5
    want = x.detach() + branch.guidance_step * sigma * grad / grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(g.x_w[:, 0], want, rtol=1e-4, atol=1e-5)
    # rows: the first eps (2B), then per step with a next timestep k candidates (2kB) and the moved winner (2B)
    n, k, steps = len(batch), branch.num_candidates, cfg.sampler.num_steps
    plain_rows = cfg.sampler.num_steps * 2 * min(cfg.sampler.plain_images, n)
    want_rows = 2 * n + (steps - 1) * (2 * k * n + 2 * n) + plain_rows
    assert guided.metrics["cost/sampler_unet_rows"] == want_rows


# ---------------------------------------------------------------------------------------------------------------
# weights from the learner
# ---------------------------------------------------------------------------------------------------------------


def test_constant_lora_survives_export_to_the_sampler(tiny_overrides: list[str]) -> None:
    cfg, mdir, make_parts = setup_run(tiny_overrides)
    learner = Learner(cfg, make_parts)
    sampler, fresh = Sampler(cfg.sampler, make_parts), Sampler(cfg.sampler, make_parts)
    rewards = digit_rewards(cfg, mdir)
    learner.update(rewards.score_rollout(sampler.generate(prompt_batch(cfg))))  # version 1
    value = 0.0123
    with torch.no_grad():
        for p in learner.params:
            p.fill_(value)
    update = learner.export_weights()
    assert update.version == 1
    assert sampler.load_weights(update) == 1
    lora = {n: p for n, p in sampler.parts.unet.named_parameters() if "lora_" in n}
    assert len(lora) == len(update.tensors) > 0
    for name, p in lora.items():
        assert torch.equal(p, torch.full_like(p, value)), name
    # the sampler's policy changed: its eps differs from a fresh sampler's on the same input
    x = torch.randn((2, *sampler.parts.latent_shape), generator=torch.Generator().manual_seed(0))
    t = sampler.parts.scheduler.timesteps[0]
    cond = sampler.parts.encode_prompts(["zero", "one"])
    with torch.no_grad():
        e_new, e_old = sampler._eps(x, t, cond), fresh._eps(x, t, cond)
    assert (e_new - e_old).abs().max() > 1e-3
    batch = prompt_batch(cfg)
    r = sampler.generate(batch)
    assert r.policy_version == 1
    assert not torch.equal(r.latents[:, -1], fresh.generate(batch).latents[:, -1])


def test_export_load_roundtrip_keeps_lora_state(tiny_overrides: list[str]) -> None:
    cfg, _, make_parts = setup_run(tiny_overrides)
    sampler = Sampler(cfg.sampler, make_parts)
    g = torch.Generator().manual_seed(3)
    state = get_peft_model_state_dict(sampler.parts.unet)
    tensors = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    assert sampler.load_weights(WeightsUpdate(7, tensors)) == 7
    after = get_peft_model_state_dict(sampler.parts.unet)
    assert after.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(after[k], v), k


def test_load_weights_with_a_foreign_key_raises(tiny_overrides: list[str]) -> None:
    cfg, _, make_parts = setup_run(tiny_overrides)
    sampler = Sampler(cfg.sampler, make_parts)
    with pytest.raises(ValueError, match=r"keys this U-Net lacks: \['text_model\.foo\.lora_A\.weight'\]"):
        sampler.load_weights(WeightsUpdate(5, {"text_model.foo.lora_A.weight": torch.zeros(2, 2)}))
    assert sampler.version == 0
