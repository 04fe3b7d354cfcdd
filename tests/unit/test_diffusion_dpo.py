"""Diffusion-DPO loss: ln 2 at init, hand case, symmetry, micro-batches, one step raises the winner."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ZeroDataOracle, adam_step, make_scored, microbatch_mean, randomize_lora, run_algo

from rlalign.algos import get_algorithm
from rlalign.algos.diffusion_dpo import DiffusionDPOCfg, build_batch, diffusion_dpo_loss

ALGO = get_algorithm("diffusion_dpo")


def test_loss_is_ln2_when_policy_equals_reference() -> None:
    err_w, err_l = torch.tensor([0.2, 0.9]), torch.tensor([0.4, 0.1])
    out = diffusion_dpo_loss(err_w, err_l, err_w, err_l, beta=5000.0)
    torch.testing.assert_close(out.loss, torch.tensor(math.log(2.0)))


def test_lowering_winner_error_is_rewarded() -> None:
    # reference gap 0.5 - 0.5 = 0; policy gap 0.4 - 0.5 = -0.1 -> logits = +0.1, beta * logits = 1
    lower, same = torch.tensor([0.4]), torch.tensor([0.5])
    out = diffusion_dpo_loss(lower, same, same, same, beta=10.0)
    torch.testing.assert_close(out.loss, -F.logsigmoid(torch.tensor(1.0)))
    assert out.metrics["pref/implicit_acc"] == 1.0


def test_swapping_winner_and_loser_flips_accuracy() -> None:
    g = torch.Generator().manual_seed(0)
    e = [torch.rand(16, generator=g) for _ in range(4)]
    a = diffusion_dpo_loss(e[0], e[1], e[2], e[3], beta=3.0).metrics["pref/implicit_acc"]
    b = diffusion_dpo_loss(e[1], e[0], e[3], e[2], beta=3.0).metrics["pref/implicit_acc"]
    assert 0.0 < float(a) < 1.0
    torch.testing.assert_close(a + b, torch.tensor(1.0))


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_mean_of_microbatch_losses_equals_full_batch(chunks: int) -> None:
    errs = [torch.rand(8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    parts = [diffusion_dpo_loss(*(e.chunk(chunks)[i] for e in errs), beta=3.0).loss for i in range(chunks)]
    torch.testing.assert_close(torch.stack(parts).mean(), diffusion_dpo_loss(*errs, beta=3.0).loss)


def test_build_batch_pairs_best_vs_worst_with_shared_t_and_noise() -> None:
    scored = make_scored(groups=3, per_group=4)
    b = build_batch(scored, DiffusionDPOCfg(), torch.Generator().manual_seed(0))
    assert b.x0_w.shape == (3, 4, 8, 8) and b.t.shape == (3,) and b.noise.shape == (3, 4, 8, 8)
    s, lat = scored.scores, scored.rollout.latents[:, -1]
    for p in range(3):
        rows = torch.arange(4) + 4 * p
        assert torch.equal(b.x0_w[p], lat[rows[s[rows].argmax()]])
        assert torch.equal(b.x0_l[p], lat[rows[s[rows].argmin()]])
    b2 = build_batch(scored, DiffusionDPOCfg(), torch.Generator().manual_seed(0))
    assert torch.equal(b.t, b2.t) and torch.equal(b.noise, b2.noise)  # seeded: replayable


def test_forward_on_fresh_lora_is_exactly_ln2(tiny_model) -> None:
    cfg = DiffusionDPOCfg()
    batch = build_batch(make_scored(), cfg, torch.Generator().manual_seed(0))
    fwd = ALGO.forward(tiny_model, batch, cfg)
    assert torch.equal(fwd.err_w, fwd.ref_err_w) and torch.equal(fwd.err_l, fwd.ref_err_l)
    assert abs(float(ALGO.loss(fwd, cfg).loss.detach()) - math.log(2)) < 1e-7


def test_one_step_raises_winner_likelihood_relative_to_loser(tiny_model) -> None:
    cfg = DiffusionDPOCfg(beta=1000.0)
    batch = build_batch(make_scored(), cfg, torch.Generator().manual_seed(0))
    before = adam_step(tiny_model, lambda: run_algo(ALGO, tiny_model, batch, cfg).loss)
    after = run_algo(ALGO, tiny_model, batch, cfg)
    # logits = (ref_w - ref_l) - (err_w - err_l) > 0: the winner's denoising error fell relative to the loser's
    assert float(after.metrics["pref/logit_mean"]) > 0
    assert float(after.loss.detach()) < before


def test_model_microbatches_equal_full_batch(tiny_model) -> None:
    randomize_lora(tiny_model)
    cfg = DiffusionDPOCfg(beta=50.0)
    batch = build_batch(make_scored(groups=5), cfg, torch.Generator().manual_seed(1))
    full = run_algo(ALGO, tiny_model, batch, cfg).loss
    torch.testing.assert_close(microbatch_mean(ALGO, tiny_model, batch, cfg, 2), full)


def test_forward_keeps_winner_and_loser_halves_apart(tiny_scheduler) -> None:
    from conftest import WinnerFirstProbe, winner_first_batch

    batch = winner_first_batch(build_batch(make_scored(), DiffusionDPOCfg(t_min=100), torch.Generator().manual_seed(0)))
    fwd = ALGO.forward(WinnerFirstProbe(tiny_scheduler), batch, DiffusionDPOCfg())
    assert torch.all(fwd.err_w < fwd.err_l)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_errors_are_against_the_prediction_types_target(prediction_type: str) -> None:
    from conftest import make_scheduler

    model = ZeroDataOracle(make_scheduler(10, prediction_type=prediction_type))
    cfg = DiffusionDPOCfg(t_min=100)
    batch = build_batch(make_scored(), cfg, torch.Generator().manual_seed(0))
    batch = batch._replace(x0_w=torch.zeros_like(batch.x0_w), x0_l=torch.zeros_like(batch.x0_l))
    fwd = ALGO.forward(model, batch, cfg)
    assert float(fwd.err_w.abs().max()) < 1e-10 and float(fwd.err_l.abs().max()) < 1e-10  # oracle: zero error
    # reference 0: error = mean(target^2) = mean(noise^2) (epsilon) or abar_t mean(noise^2) (v = sqrt(abar) noise)
    scale = model.alphas_cumprod[batch.t].float() if prediction_type == "v_prediction" else torch.ones(len(batch.t))
    torch.testing.assert_close(fwd.ref_err_w, scale * batch.noise.pow(2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=0)
