"""DDIM step as a Gaussian policy: matches diffusers, exact log-densities, stable log-ratio, DDPM step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SD_SCHEDULE, make_scheduler
from diffusers import DDIMScheduler

from rlalign.sampling.logprob import (
    check_scheduler,
    ddim_mean_coeffs,
    ddim_mean_std,
    ddim_std,
    ddim_step_with_logprob,
    ddpm_step,
    denoising_target,
    gaussian_log_prob,
    log_ratio,
    predicted_eps,
    predicted_x0,
    prev_timestep,
    timestep_stride,
)


def _double(sched):  # diffusers then computes in float64 too: exact comparison
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).double()
    return sched


def _pick(sched):  # first, a middle, the second-to-last and the last grid timestep
    ts = sched.timesteps
    return [int(ts[0]), int(ts[len(ts) // 2]), int(ts[-2]), int(ts[-1])]


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_mean_and_sample_match_diffusers_float64(steps: int, eta: float, prediction_type: str, spacing: str) -> None:
    sched = _double(make_scheduler(steps, prediction_type=prediction_type, timestep_spacing=spacing))
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    e = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in _pick(sched):
        ref_mean = sched.step(e, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        out = sched.step(e, t, x, eta=eta, variance_noise=z)
        mean, std = ddim_mean_std(sched, e, t, x, eta)
        assert mean.dtype == torch.float64 and std.shape == (3,)
        torch.testing.assert_close(mean, ref_mean, atol=1e-10, rtol=0)
        sample, _ = ddim_step_with_logprob(sched, e, torch.tensor(t), x, eta, variance_noise=z)
        torch.testing.assert_close(sample, out.prev_sample, atol=1e-10, rtol=0)
        torch.testing.assert_close(predicted_x0(sched, e, t, x), out.pred_original_sample, atol=1e-10, rtol=0)
        s = int(prev_timestep(sched, t))
        torch.testing.assert_close(
            std, torch.full((3,), eta * float(sched._get_variance(t, s)) ** 0.5, dtype=torch.float64)
        )
        a, b, _ = ddim_mean_coeffs(sched, t, eta, 3, x.device)  # mu = a x + b e, any prediction type
        torch.testing.assert_close(a.view(-1, 1, 1, 1) * x + b.view(-1, 1, 1, 1) * e, mean, atol=1e-10, rtol=0)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_float32_matches_diffusers_default_scheduler(eta: float) -> None:
    sched = make_scheduler(10)  # float32 alphas, as diffusers ships them
    g = torch.Generator().manual_seed(0)
    x, e, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for t in _pick(sched):
        ref = sched.step(e, t, x, eta=eta, variance_noise=z).prev_sample
        sample, _ = ddim_step_with_logprob(sched, e, t, x, eta, variance_noise=z)
        assert sample.dtype == torch.float32
        torch.testing.assert_close(sample, ref, atol=2e-5, rtol=1e-5)


def test_generator_draw_matches_diffusers() -> None:
    sched = make_scheduler(10)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = int(sched.timesteps[3])
    ref = sched.step(e, t, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    ours, _ = ddim_step_with_logprob(sched, e, t, x, 1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_previous_timestep_rule_and_final_alpha() -> None:
    sched = make_scheduler(10)  # leading spacing, offset 1: 901, 801, ..., 1
    assert int(sched.timesteps[-1]) == 1 and int(prev_timestep(sched, 1)) == -99
    std = ddim_std(sched, 1, 1.0, 1, torch.device("cpu"))
    ac, final = sched.alphas_cumprod.double(), float(sched.final_alpha_cumprod)
    expected = math.sqrt((1 - final) / (1 - ac[1]) * (1 - ac[1] / final))
    assert final == pytest.approx(float(ac[0]))
    assert float(std) == pytest.approx(float(expected), rel=1e-9) and float(std) > 0


def test_log_prob_equals_hand_computed_gaussian() -> None:
    sched = _double(make_scheduler(10))
    g = torch.Generator().manual_seed(1)
    x, e, y = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([901, 501, 1])  # per-row timesteps [B]
    mean, std = ddim_mean_std(sched, e, t, x, 1.0)
    _, lp = ddim_step_with_logprob(sched, e, t, x, 1.0, prev_sample=y)
    # log N(y; mu, s^2) per element = -(y-mu)^2/(2 s^2) - log s - log(2 pi)/2, then mean over C,h,w
    s = std.view(-1, 1, 1, 1)
    hand = (-((y - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lp, hand, atol=1e-12, rtol=0)
    normal = torch.distributions.Normal(mean, s).log_prob(y).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lp, normal, atol=1e-10, rtol=0)
    # per-row t equals row-by-row scalar t
    for i in range(3):
        _, lp_i = ddim_step_with_logprob(sched, e[i : i + 1], t[i], x[i : i + 1], 1.0, prev_sample=y[i : i + 1])
        torch.testing.assert_close(lp_i, lp[i : i + 1])


def test_scoring_the_drawn_sample_reproduces_its_log_prob() -> None:
    sched = make_scheduler(10)
    g = torch.Generator().manual_seed(2)
    x, e = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.full((4,), int(sched.timesteps[2]))
    sample, lp = ddim_step_with_logprob(sched, e, t, x, 1.0, generator=torch.Generator().manual_seed(3))
    same, lp2 = ddim_step_with_logprob(sched, e, t, x, 1.0, prev_sample=sample)
    assert same is sample
    torch.testing.assert_close(lp2, lp)
    # a sample from the policy has log-prob near -log(sigma) - log(2 pi)/2 - 1/2 (mean of z^2 ~ 1 over 256 dims)
    _, std = ddim_mean_std(sched, e, t, x, 1.0)
    expected = -torch.log(std.float()) - 0.5 * math.log(2 * math.pi) - 0.5
    assert torch.allclose(lp, expected, atol=0.2)


def test_timestep_scalar_and_rows_agree_and_bad_shape_raises() -> None:
    sched = make_scheduler(10)
    g = torch.Generator().manual_seed(4)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    m0, s0 = ddim_mean_std(sched, e, torch.tensor(501), x, 1.0)
    m1, s1 = ddim_mean_std(sched, e, torch.tensor([501, 501]), x, 1.0)
    torch.testing.assert_close(m0, m1)
    torch.testing.assert_close(s0, s1)
    with pytest.raises(ValueError, match="timestep"):
        ddim_mean_std(sched, e, torch.tensor([501, 501, 501]), x, 1.0)


def test_clip_and_thresholding_configs_are_rejected() -> None:
    e = x = torch.zeros(1, 4, 8, 8)
    for bad in ({"clip_sample": True}, {"thresholding": True}):
        with pytest.raises(ValueError, match="clip_sample"):
            ddim_mean_std(make_scheduler(10, **bad), e, 501, x, 1.0)


def test_k_candidates_share_one_mean() -> None:
    sched = make_scheduler(10)
    g = torch.Generator().manual_seed(5)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = int(sched.timesteps[1])
    mean, std = ddim_mean_std(sched, e, t, x, 1.0)
    noise = torch.randn(3, 2, 4, 8, 8, generator=g)
    cand = mean[None] + std.float().view(1, -1, 1, 1, 1) * noise
    for j in range(3):
        ref = sched.step(e, t, x, eta=1.0, variance_noise=noise[j]).prev_sample
        torch.testing.assert_close(cand[j], ref, atol=2e-5, rtol=1e-5)


def test_stable_log_ratio_equals_naive_difference_float64() -> None:
    g = torch.Generator().manual_seed(6)
    x, mu_ref, d = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    d = 0.01 * d
    std = torch.tensor([0.9, 0.2, 0.05], dtype=torch.float64)
    naive = gaussian_log_prob(x, mu_ref + d, std) - gaussian_log_prob(x, mu_ref, std)
    torch.testing.assert_close(log_ratio(x, mu_ref, d, std), naive, rtol=1e-10, atol=1e-12)


def test_zero_std_rows_have_zero_log_prob() -> None:
    sched = make_scheduler(10)
    x = torch.randn(1, 4, 8, 8)
    _, lp = ddim_step_with_logprob(sched, x, 501, x, 0.0, prev_sample=x)
    assert float(lp) == 0.0


def test_ddpm_step_matches_diffusers() -> None:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
    )
    g = torch.Generator().manual_seed(7)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in (999, 500, 10, 1, 0):
        ref = sched.step(e, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        ours = ddpm_step(sched.alphas_cumprod, e, torch.tensor(t), x, z)
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("steps", "overrides"),
    [(10, {}), (20, {}), (50, {"steps_offset": 0}), (20, {"timestep_spacing": "trailing"}), (7, {})],
)
def test_prev_timestep_is_the_next_grid_entry_on_accepted_grids(steps: int, overrides: dict) -> None:
    sched = make_scheduler(steps, **overrides)
    check_scheduler(sched)
    ts = [int(t) for t in sched.timesteps]
    assert timestep_stride(sched) == 1000 // steps
    assert [int(prev_timestep(sched, t)) for t in ts[:-1]] == ts[1:]
    assert int(prev_timestep(sched, ts[-1])) < 0  # after the last step: final_alpha_cumprod
    rows = prev_timestep(sched, torch.tensor(ts[:-1]))
    assert rows.tolist() == ts[1:]


@pytest.mark.parametrize(
    ("steps", "overrides"),
    [
        (10, {"timestep_spacing": "linspace"}),  # 999, 888, ...: diffusers steps to t - 100 instead
        (30, {"timestep_spacing": "trailing"}),  # 999, 966, 932, ...: uneven gaps
        (10, {"steps_offset": 100}),  # leading 1000..100: the last step would not reach final_alpha_cumprod
    ],
)
def test_grids_off_the_stride_rule_are_refused_by_name(steps: int, overrides: dict) -> None:
    sched = DDIMScheduler(**{**SD_SCHEDULE, **overrides})
    check_scheduler(sched)  # before set_timesteps only the config is checked (what the loader sees)
    sched.set_timesteps(steps)
    with pytest.raises(ValueError, match="timestep_spacing"):
        check_scheduler(sched)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="timestep_spacing"):
        ddim_mean_std(sched, x, int(sched.timesteps[0]), x, 1.0)


def test_sample_prediction_is_refused_by_name_before_and_after_set_timesteps() -> None:
    bare = DDIMScheduler(**{**SD_SCHEDULE, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        check_scheduler(bare)
    sched = make_scheduler(10, prediction_type="sample")
    x = torch.zeros(1, 4, 8, 8)
    for call in (
        lambda: ddim_mean_std(sched, x, 501, x, 1.0),
        lambda: predicted_eps(sched, x, 501, x),
        lambda: denoising_target(sched, x, x, 501),
    ):
        with pytest.raises(ValueError, match="'sample'"):
            call()
    check_scheduler(make_scheduler(10, prediction_type="v_prediction"))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_regression_target_and_eps_conversion_match_diffusers(prediction_type: str) -> None:
    sched = _double(make_scheduler(10, prediction_type=prediction_type))
    g = torch.Generator().manual_seed(8)
    x0, noise = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([901, 451, 1])
    x_t = sched.add_noise(x0, noise, t)
    target = denoising_target(sched, x0, noise, t)
    if prediction_type == "epsilon":
        assert target is noise
    else:
        torch.testing.assert_close(target, sched.get_velocity(x0, noise, t), atol=1e-12, rtol=0)
    # the exact target converts back to the true noise and the true x0 (an oracle model has zero eps error)
    torch.testing.assert_close(predicted_eps(sched, target, t, x_t), noise, atol=1e-10, rtol=0)
    torch.testing.assert_close(predicted_x0(sched, target, t, x_t), x0, atol=1e-10, rtol=0)
    # eps error = sqrt(abar_t) * v error at a fixed x_t (v_prediction), = the output error (epsilon)
    out = target + 0.1 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    scale = sched.alphas_cumprod[t].sqrt() if prediction_type == "v_prediction" else torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(
        predicted_eps(sched, out, t, x_t) - noise, scale.view(-1, 1, 1, 1) * (out - target), atol=1e-10, rtol=0
    )


def test_log_ratio_of_a_zero_std_row_is_zero_with_finite_gradient() -> None:
    g = torch.Generator().manual_seed(9)
    x, mu_ref = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(2))
    d = (0.01 * torch.randn(3, 4, 8, 8, generator=g)).requires_grad_(True)
    std = torch.tensor([0.5, 0.0, 1e-30], dtype=torch.float64)  # 1e-30 squared underflows to 0 in fp32
    lr = log_ratio(x, mu_ref, d, std)
    assert lr[1] == 0 and lr[2] == 0
    s = 0.5
    hand = ((2 * (x[0] - mu_ref[0]) * d[0] - d[0] ** 2) / (2 * s**2)).mean()
    torch.testing.assert_close(lr[0], hand)
    (grad,) = torch.autograd.grad(lr.sum(), d)
    assert torch.isfinite(grad).all() and grad[1:].abs().sum() == 0 and grad[0].abs().sum() > 0
