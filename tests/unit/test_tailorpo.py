"""TailorPO / TailorPO-G: step-level DPO on branched candidates, stable log-ratios, reward-gradient guidance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import adam_step, make_model, make_scored, microbatch_mean, randomize_lora, run_algo

from rlalign.algos import get_algorithm
from rlalign.algos.common import guided_eps
from rlalign.algos.tailorpo import (
    TailorPOCfg,
    build_batch,
    guided_candidate,
    rank_candidates,
    tailorpo_loss,
)
from rlalign.sampling.logprob import ddim_mean_std, ddim_step_with_logprob, log_ratio, predicted_x0

ALGO = get_algorithm("tailorpo")


def _batch(cfg: TailorPOCfg, seed: int = 0, groups: int = 1, per_group: int = 2):
    """20 rows (2 trajectories x 10 steps): enough for every property, cheap on 2 shared cores."""
    scored = make_scored(groups=groups, per_group=per_group, with_step_pairs=True)
    return build_batch(scored, cfg, torch.Generator().manual_seed(seed))


def test_loss_is_ln2_when_policy_equals_reference() -> None:
    lp = torch.tensor([-1.0, 0.3, 2.0])
    torch.testing.assert_close(tailorpo_loss(lp, lp.flip(0), lp, lp.flip(0), beta=10.0).loss, torch.tensor(math.log(2)))


def test_hand_computed_case() -> None:
    # lr_w = (-1.0) - (-1.1) = 0.1, lr_l = 0 -> z = beta * 0.1 = 1 -> loss = -log sigmoid(1) = softplus(-1)
    out = tailorpo_loss(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.1]), torch.tensor([-2.0]), beta=10.0
    )
    torch.testing.assert_close(out.loss, -F.logsigmoid(torch.tensor(1.0)))
    torch.testing.assert_close(out.loss, torch.tensor(math.log1p(math.exp(-1.0))))
    assert float(out.metrics["pref/implicit_acc"]) == 1.0


def test_swap_flips_accuracy_and_ratio_clip() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(16, generator=g) for _ in range(4))
    acc = tailorpo_loss(a, b, c, d, beta=1.0).metrics["pref/implicit_acc"]
    acc_swapped = tailorpo_loss(b, a, d, c, beta=1.0).metrics["pref/implicit_acc"]
    assert 0 < float(acc) < 1
    torch.testing.assert_close(acc + acc_swapped, torch.tensor(1.0))
    # ratio clip: lr_w = 1 clamps to log(1.1), lr_l = -1 clamps to log(0.9)
    out = tailorpo_loss(
        torch.tensor([1.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1), beta=1.0, ratio_clip_eps=0.1
    )
    torch.testing.assert_close(out.loss, -F.logsigmoid(torch.tensor(math.log(1.1) - math.log(0.9))))


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_mean_of_microbatch_losses_equals_full_batch(chunks: int) -> None:
    xs = [torch.randn(8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    parts = [tailorpo_loss(*(x.chunk(chunks)[i] for x in xs), beta=2.0).loss for i in range(chunks)]
    torch.testing.assert_close(torch.stack(parts).mean(), tailorpo_loss(*xs, beta=2.0).loss)


def test_gradient_wrt_mean_is_antiparallel_to_winner_minus_loser() -> None:
    g = torch.Generator().manual_seed(1)
    xw, xl, mu_ref = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    d = torch.zeros(1, 4, 8, 8, requires_grad=True)  # d = mu_theta - mu_ref as a free parameter
    std = torch.tensor([0.5])
    z = 2.0 * (log_ratio(xw, mu_ref, d, std) - log_ratio(xl, mu_ref, d, std))
    F.softplus(-z).sum().backward()
    cos = F.cosine_similarity(d.grad.flatten(), (xw - xl).flatten(), dim=0)
    assert float(cos) == pytest.approx(-1.0, abs=1e-6)


def test_build_batch_drops_invalid_pairs_and_keeps_alignment() -> None:
    scored = make_scored(groups=2, per_group=2, with_step_pairs=True)
    sp = scored.rollout.step_pairs
    sp.valid[0, 3] = False
    sp.valid[2, :] = False
    b = build_batch(scored, TailorPOCfg(), torch.Generator().manual_seed(0))
    assert b.t.shape[0] == 4 * 10 - 1 - 10
    for i in range(b.t.shape[0]):  # each row's x_w is the stored winner of the same (trajectory, step)
        hits = (sp.x_w == b.x_w[i]).flatten(2).all(-1).nonzero()
        assert hits.shape[0] == 1
        bi, si = hits[0].tolist()
        assert sp.valid[bi, si] and torch.equal(sp.x_t[bi, si], b.x_t[i]) and int(sp.timesteps[si]) == int(b.t[i])
        assert torch.equal(b.cond[i], scored.rollout.prompt_embeds[bi])


def test_forward_on_fresh_lora_is_ln2_with_cfg(tiny_model) -> None:
    cfg = TailorPOCfg(min_std=1e-6)
    b = _batch(cfg)
    assert (b.eta, b.guidance_scale) == (1.0, 3.0)  # the rollout's sampling policy, CFG on
    fwd = ALGO.forward(tiny_model, b, cfg)
    assert torch.equal(fwd.lr_w, torch.zeros_like(fwd.lr_w)) and torch.equal(fwd.lr_l, torch.zeros_like(fwd.lr_l))
    assert abs(float(ALGO.loss(fwd, cfg).loss.detach()) - math.log(2)) < 1e-7


def test_forward_log_ratios_equal_naive_log_prob_difference() -> None:
    model = make_model()
    randomize_lora(model, scale=0.05)
    cfg = TailorPOCfg(min_std=1e-6)
    b = _batch(cfg, groups=1, per_group=2)
    fwd = ALGO.forward(model, b, cfg)
    with torch.no_grad():
        e_th = guided_eps(model, b.x_t, b.t, b.cond, b.uncond, b.guidance_scale, adapters=True)
        e_ref = guided_eps(model, b.x_t, b.t, b.cond, b.uncond, b.guidance_scale, adapters=False)
        for x, lr in ((b.x_w, fwd.lr_w), (b.x_l, fwd.lr_l)):
            lp_th = ddim_step_with_logprob(
                model.scheduler, e_th.double(), b.t, b.x_t.double(), b.eta, prev_sample=x.double()
            )[1]
            lp_rf = ddim_step_with_logprob(
                model.scheduler, e_ref.double(), b.t, b.x_t.double(), b.eta, prev_sample=x.double()
            )[1]
            torch.testing.assert_close(lr.double(), lp_th - lp_rf, rtol=1e-3, atol=1e-6)
    assert float(fwd.lr_w.detach().abs().max()) > 0


def test_min_std_rows_are_excluded_with_ln2_and_no_gradient(tiny_model) -> None:
    randomize_lora(tiny_model)
    cfg = TailorPOCfg(min_std=0.3)  # excludes the low-noise end of the 10-step SD grid
    b = _batch(cfg)
    fwd = ALGO.forward(tiny_model, b, cfg)
    assert 0 < int(fwd.keep.sum()) < fwd.keep.shape[0]
    assert torch.all(fwd.lr_w[~fwd.keep] == 0) and torch.all(fwd.std[~fwd.keep] < 0.3)
    out = ALGO.loss(fwd, cfg)
    assert float(out.metrics["tailorpo/kept_frac"]) == pytest.approx(float(fwd.keep.float().mean()))


def test_one_step_raises_winner_log_ratio_and_microbatches(tiny_model) -> None:
    cfg = TailorPOCfg(beta=10.0, min_std=1e-6)
    b = _batch(cfg)
    before = adam_step(tiny_model, lambda: run_algo(ALGO, tiny_model, b, cfg).loss)
    after = run_algo(ALGO, tiny_model, b, cfg)
    assert before == pytest.approx(math.log(2), abs=1e-6)
    assert float(after.metrics["pref/logit_mean"]) > 0 and float(after.loss.detach()) < before
    torch.testing.assert_close(microbatch_mean(ALGO, tiny_model, b, cfg, 7), after.loss.detach())


def test_rank_candidates_ties_give_no_pair() -> None:
    win, lose, valid = rank_candidates(torch.tensor([[1.0, 2.0], [3.0, 2.0]]))
    assert win.tolist() == [1, 0] and lose.tolist() == [0, 0] and valid.tolist() == [True, False]


def test_guided_candidate_rms_sigma_shift() -> None:
    g = torch.Generator().manual_seed(2)
    x, grad = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g) * 1e3
    std = torch.tensor([0.9, 0.2, 0.05])
    xp = guided_candidate(x, grad, 0.1, std=std, norm="rms_sigma")
    rms = (xp - x).pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, 0.1 * std)
    torch.testing.assert_close(guided_candidate(x, grad, 0.5), x + 0.5 * grad)
    with pytest.raises(ValueError):
        guided_candidate(x, grad, 0.1, norm="rms_sigma")


def test_guided_step_increases_toy_reward_for_most_samples(tiny_model) -> None:
    """TailorPO-G: r = mean brightness of x0_hat(x, s) (through the U-Net, 'full' chain rule)."""
    randomize_lora(tiny_model, scale=0.1)
    sched = tiny_model.scheduler
    n, s = 32, torch.tensor(int(tiny_model.scheduler.timesteps[4]))
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(n, 3, 8, generator=g), torch.zeros(1, 3, 8)

    def reward(x: torch.Tensor) -> torch.Tensor:
        e = guided_eps(tiny_model, x, s, cond, uncond, 3.0)
        return predicted_x0(sched, e, s, x).mean(dim=(1, 2, 3))

    x = torch.randn(n, 4, 8, 8, generator=g).requires_grad_(True)
    r0 = reward(x)
    (grad,) = torch.autograd.grad(r0.sum(), x)
    _, std = ddim_mean_std(sched, grad, s, x.detach(), 1.0)
    x_plus = guided_candidate(x, grad, 0.1, std=std, norm="rms_sigma")
    with torch.no_grad():
        gain = reward(x_plus) - r0.detach()
    assert float((gain > 0).float().mean()) > 0.9


def test_tailorpo_g_is_registered_with_guidance() -> None:
    g = get_algorithm("tailorpo_g")
    assert g.needs_gradient_guidance and g.needs_step_pairs and g.loss is ALGO.loss and g.cfg_key == "tailorpo"
    assert not ALGO.needs_gradient_guidance
    with pytest.raises(ValueError):
        TailorPOCfg(guidance_norm="l2")


@pytest.mark.parametrize("min_std", [0.0, -0.1, float("nan")])
def test_min_std_must_be_positive(min_std: float) -> None:
    with pytest.raises(ValueError, match=r"tailorpo\.min_std must be > 0"):
        TailorPOCfg(min_std=min_std)
    TailorPOCfg(min_std=1e-6)


def test_step_log_ratios_match_diffusers_means_for_v_prediction() -> None:
    from conftest import make_scheduler

    from rlalign.algos.tailorpo import step_log_ratios

    model = make_model()
    model.scheduler = sched = make_scheduler(10, prediction_type="v_prediction")
    randomize_lora(model, scale=0.05)
    g = torch.Generator().manual_seed(4)
    t = sched.timesteps[[0, 4, 9]].long()
    x_t, x = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(3, 3, 8, generator=g), torch.zeros(3, 3, 8)
    (lr,), _ = step_log_ratios(model, x_t, t, cond, uncond, [x], eta=1.0, guidance_scale=3.0)
    with torch.no_grad():
        e_th, e_ref = (guided_eps(model, x_t, t, cond, uncond, 3.0, adapters=a).double() for a in (True, False))
    naive = []
    for i, ti in enumerate(t.tolist()):  # diffusers' own v_prediction step, row by row, in float64
        row = slice(i, i + 1)
        zero = torch.zeros_like(x_t[row], dtype=torch.float64)
        mu_th, mu_ref = (
            sched.step(e[row], ti, x_t[row].double(), eta=1.0, variance_noise=zero).prev_sample for e in (e_th, e_ref)
        )
        var = float(sched._get_variance(ti, ti - 100))
        naive.append((((x[row] - mu_ref) ** 2 - (x[row] - mu_th) ** 2) / (2 * var)).mean())
    assert float(lr.detach().abs().max()) > 1e-4  # the policy differs from the reference
    torch.testing.assert_close(lr.detach().double(), torch.stack(naive), rtol=1e-3, atol=1e-7)


def test_rank_candidates_k3_best_vs_worst_with_tie_eps() -> None:
    rewards = torch.tensor([[0.1, 5.0, 2.0], [0.9, 5.0, 2.5], [0.5, 5.05, 2.0]])  # [k=3, B=3]
    win, lose, valid = rank_candidates(rewards, tie_eps=0.1)
    # column 1: gap 0.05 <= tie_eps; column 2: equal minima, the first loses
    assert win.tolist() == [1, 2, 1] and lose.tolist() == [0, 0, 0] and valid.tolist() == [True, False, True]


def test_guided_candidate_negative_step_and_the_samplers_former_formula() -> None:
    g = torch.Generator().manual_seed(5)
    x, grad = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    std = torch.tensor([0.5, 0.1], dtype=torch.float64)  # as ddim_mean_std returns it
    up = guided_candidate(x, grad, 0.2, std=std, norm="rms_sigma")
    down = guided_candidate(x, grad, -0.2, std=std, norm="rms_sigma")
    torch.testing.assert_close(down - x, -(up - x))
    torch.testing.assert_close((down - x).pow(2).mean(dim=(1, 2, 3)).sqrt(), 0.2 * std.float())
    assert float(((down - x) * grad).sum()) < 0  # the loser is pushed down the reward gradient
    torch.testing.assert_close(guided_candidate(x, grad, -0.5), x - 0.5 * grad)
    # bit-identical to the expression Sampler._guide used before it called guided_candidate
    rms = grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    for sign in (1.0, -1.0):
        former = x + sign * (0.2 * std.to(grad).view(-1, 1, 1, 1) * grad / rms)
        assert torch.equal(guided_candidate(x, grad, sign * 0.2, std=std, norm="rms_sigma"), former)
        assert torch.equal(guided_candidate(x, grad, sign * 0.2, norm="none"), x + sign * (0.2 * grad))
