"""DDPO: PPO-clip on recomputed DDIM log-probs, per-group advantages, min_std filter."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import make_scored, microbatch_mean, randomize_lora, run_algo

from rlalign.algos import get_algorithm
from rlalign.algos.common import guided_eps
from rlalign.algos.ddpo import DDPOCfg, build_batch, ddpo_loss
from rlalign.pairing import group_normalize
from rlalign.sampling.logprob import ddim_step_with_logprob

ALGO = get_algorithm("ddpo")


def test_clipped_equals_unclipped_when_ratio_is_one() -> None:
    lp = torch.randn(6, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1, 0.0])
    out = ddpo_loss(lp, lp.detach(), adv, clip_range=1e-4)
    torch.testing.assert_close(out.loss, -adv.mean())  # ratio 1: -A * 1, no clipping
    out.loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 6)  # d(-A exp(lp - old))/dlp at ratio 1 = -A / N: unclipped grad
    assert float(out.metrics["ddpo/clipfrac"]) == 0.0 and float(out.metrics["ddpo/approx_kl"]) == 0.0


def test_hand_computed_clipping() -> None:
    # row 0: A=+1, ratio e^0.5 > 1.1 -> max(-1.6487, -1.1) = -1.1 (clipped, no gradient)
    # row 1: A=-1, ratio e^0.5 -> max(1.6487, 1.1) = 1.6487 (unclipped: pessimistic bound keeps the gradient)
    lp = torch.tensor([0.5, 0.5], requires_grad=True)
    out = ddpo_loss(lp, torch.zeros(2), torch.tensor([1.0, -1.0]), clip_range=0.1)
    r = torch.exp(torch.tensor(0.5))
    torch.testing.assert_close(out.loss, (-1.1 + r) / 2)
    out.loss.backward()
    torch.testing.assert_close(lp.grad, torch.stack([torch.tensor(0.0), r / 2]))
    assert float(out.metrics["ddpo/clipfrac"]) == 1.0


def test_advantages_are_normalised_per_group() -> None:
    scored = make_scored(groups=3, per_group=4)
    b = build_batch(scored, DDPOCfg(), torch.Generator().manual_seed(0))
    adv = group_normalize(scored.rollout.group_ids, scored.scores, clamp=5.0)
    for g in range(3):
        rows = torch.arange(4) + 4 * g
        a = adv[rows]
        assert float(a.mean()) == pytest.approx(0.0, abs=1e-6) and float(a.std(unbiased=False)) == pytest.approx(
            1, abs=1e-5
        )
    # every training row carries its own image's advantage
    T = scored.rollout.timesteps.shape[0]
    for i in range(0, b.t.shape[0], 7):
        hit = (scored.rollout.latents[:, :T] == b.x_t[i]).flatten(2).all(-1).nonzero()[0]
        assert float(b.advantage[i]) == pytest.approx(float(adv[hit[0]]))
        assert torch.equal(b.x_prev[i], scored.rollout.latents[hit[0], hit[1] + 1])
        assert float(b.old_log_prob[i]) == float(scored.rollout.log_probs[hit[0], hit[1]])
    # shifting one group's scores changes nothing (the statistics are per group)
    shifted = replace(scored, scores=scored.scores + torch.tensor([100.0] * 4 + [0.0] * 8))
    b2 = build_batch(shifted, DDPOCfg(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(b2.advantage, b.advantage)


def _on_policy_scored(model, cfg: DDPOCfg):
    """Rollout sampled by the model itself, so the recomputed log-probs must equal the stored ones."""
    scored = make_scored(groups=2, per_group=2)
    r = scored.rollout
    g = torch.Generator().manual_seed(0)
    lat = [torch.randn(4, 4, 8, 8, generator=g)]
    lps = []
    with torch.no_grad():
        for t in r.timesteps:
            e = guided_eps(model, lat[-1], t, r.prompt_embeds, r.negative_embeds, r.guidance_scale)
            x, lp = ddim_step_with_logprob(model.scheduler, e, t, lat[-1], r.eta, generator=g)
            lat.append(x)
            lps.append(lp)
    rollout = replace(r, latents=torch.stack(lat, 1), log_probs=torch.stack(lps, 1))
    return replace(scored, rollout=rollout)


def test_forward_recomputes_the_samplers_log_probs(tiny_model) -> None:
    randomize_lora(tiny_model, scale=0.05)
    cfg = DDPOCfg(min_std=0.0)
    scored = _on_policy_scored(tiny_model, cfg)
    b = build_batch(scored, cfg, torch.Generator().manual_seed(1))
    fwd = ALGO.forward(tiny_model, b, cfg)
    torch.testing.assert_close(fwd.log_prob.detach(), b.old_log_prob, atol=1e-4, rtol=0)
    out = ALGO.loss(fwd, cfg)
    assert float(out.metrics["ddpo/clipfrac"]) == 0.0
    torch.testing.assert_close(microbatch_mean(ALGO, tiny_model, b, cfg, 16), out.loss.detach())


def test_forward_scores_the_rollouts_own_policy(tiny_model) -> None:
    # eta and CFG w come from the rollout (what the sampler used), not from a second copy in the ddpo section:
    # the same transitions recomputed under another w no longer match the stored log-probs
    randomize_lora(tiny_model, scale=0.05)
    cfg = DDPOCfg(min_std=0.0)
    scored = _on_policy_scored(tiny_model, cfg)
    other = replace(scored, rollout=replace(scored.rollout, guidance_scale=1.0))
    b = build_batch(other, cfg, torch.Generator().manual_seed(1))
    assert (b.eta, b.guidance_scale) == (scored.rollout.eta, 1.0)
    fwd = ALGO.forward(tiny_model, b, cfg)
    assert float((fwd.log_prob.detach() - b.old_log_prob).abs().max()) > 1e-3


def test_rollouts_of_different_policies_do_not_concatenate() -> None:
    from rlalign.types import concat_rollouts

    r = make_scored(groups=1, per_group=2).rollout
    assert concat_rollouts([r, r]).guidance_scale == r.guidance_scale
    with pytest.raises(ValueError, match="eta, guidance_scale"):
        concat_rollouts([r, replace(r, guidance_scale=r.guidance_scale + 1)])


def test_min_std_excludes_low_noise_steps(tiny_model) -> None:
    cfg = DDPOCfg(min_std=0.3)
    b = build_batch(make_scored(groups=2, per_group=2), cfg, torch.Generator().manual_seed(0))
    fwd = ALGO.forward(tiny_model, b, cfg)
    assert 0 < int(fwd.keep.sum()) < fwd.keep.shape[0]
    assert torch.all(b.t[~fwd.keep] < b.t[fwd.keep].min())  # the excluded steps are the low-noise end
    assert torch.all(fwd.log_prob[~fwd.keep] == 0)
    out = ALGO.loss(fwd, cfg)
    out.loss.backward()
    assert float(out.metrics["ddpo/kept_frac"]) == pytest.approx(float(fwd.keep.float().mean()))
    assert not ALGO.is_preference


def test_one_step_moves_log_prob_along_advantage(tiny_model) -> None:
    cfg = DDPOCfg(min_std=0.0)
    scored = _on_policy_scored(tiny_model, cfg)
    b = build_batch(scored, cfg, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for n, p in tiny_model.unet.named_parameters() if "lora_" in n], lr=1e-3)
    run_algo(ALGO, tiny_model, b, cfg).loss.backward()
    opt.step()
    with torch.no_grad():
        new = ALGO.forward(tiny_model, b, cfg).log_prob
    # first-order: the advantage-weighted log-likelihood goes up
    assert float((b.advantage * (new - b.old_log_prob)).sum()) > 0


def test_extreme_log_ratios_give_a_finite_loss_and_gradient() -> None:
    # benign inputs that overflowed exp: a 200-nat log-ratio with advantage 0 (single-image group) was -0 * inf = NaN
    lp = torch.tensor([200.0, 200.0, -200.0, 5.0], requires_grad=True)
    adv = torch.tensor([0.0, -1.0, 1.0, 0.0])
    out = ddpo_loss(lp, torch.zeros(4), adv, clip_range=0.1)
    # rows: 0; A=-1, log-ratio clamped to 20: max(e^20, 1.1) = e^20; A=1, clamped to -20: max(-e^-20, -0.9); 0
    hand = (math.exp(20.0) - math.exp(-20.0)) / 4
    torch.testing.assert_close(out.loss, torch.tensor(hand))
    out.loss.backward()
    assert lp.grad is not None and torch.isfinite(lp.grad).all()
    assert torch.equal(lp.grad, torch.zeros(4))  # clamped rows stop their gradient; A = 0 rows have none
    assert all(torch.isfinite(v) for k, v in out.metrics.items() if k != "ddpo/approx_kl")
