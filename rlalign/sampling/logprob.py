"""DDIM (and DDPM) steps as Gaussian policies: means, standard deviations, log-probabilities, log-ratios.

Pure maths, imports only torch. Adapted from diffusers 0.42.1 `DDIMScheduler.step`
(src/diffusers/schedulers/scheduling_ddim.py) and ddpo-pytorch's `ddim_with_logprob.py`. Changes:
- per-row timesteps: `timestep` may be [] or [B] (diffusers takes one int), coefficients gathered per row;
- returns the Gaussian's mean and std instead of one sample, so a caller can draw k candidates from one x_t
  (`mean + std * noise`) or score a given x_{t-1} (`prev_sample=`);
- log-probabilities: Gaussian log-density **mean over all non-batch dims** ([B,C,h,w] -> [B]), as ddpo-pytorch,
  D3PO and SPO (tailorpo.md 1.3); every beta in rlalign is defined against this mean;
- clip_sample / thresholding are rejected (ValueError): clipping x0_hat makes the mean non-linear in the model
  output and kills gradients, and no rlalign config uses it; `use_clipped_model_output` is not offered.
Coefficients are computed in float64 from `scheduler.alphas_cumprod`, then cast to the compute dtype
(float32 for float32/bf16/fp16 inputs, float64 for float64 inputs).

Notation (tailorpo.md 1.2): abar_t = alphas_cumprod[t], s = prev timestep, abar_s = alphas_cumprod[s] or
`final_alpha_cumprod` when s < 0;
    x0_hat = (x_t - sqrt(1 - abar_t) e) / sqrt(abar_t)                     (epsilon prediction)
    sigma^2 = eta^2 (1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s)
    mu = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) e  =  a_t x_t + b_t e
Shapes: B rows, C/h/w latent dims.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_scheduler(scheduler: Any) -> None:
    cfg = scheduler.config
    if getattr(cfg, "thresholding", False) or getattr(cfg, "clip_sample", False):
        raise ValueError(
            "rlalign's DDIM policy needs clip_sample=False and thresholding=False (clipping x0_hat makes the step "
            f"non-Gaussian in the model output); got clip_sample={getattr(cfg, 'clip_sample', None)}, "
            f"thresholding={getattr(cfg, 'thresholding', None)}"
        )
    if cfg.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(T) before using the DDIM policy helpers")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(timestep: Tensor | int, batch: int, device: torch.device) -> Tensor:
    """timestep [] / int / [B] -> [B] int64 on `device`."""
    t = torch.as_tensor(timestep, device=device).long()
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be [] or [{batch}], got {tuple(t.shape)}")
    return t


def prev_timestep(scheduler: Any, t: Tensor | int) -> Tensor:
    """Previous grid timestep, diffusers' rule: `t - num_train_timesteps // num_inference_steps` (may be < 0)."""
    stride = int(scheduler.config.num_train_timesteps // scheduler.num_inference_steps)
    out: Tensor = torch.as_tensor(t).long() - stride
    return out


def alpha_bars(scheduler: Any, timestep: Tensor | int, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(abar_t, abar_prev) [B] float64; abar_prev = final_alpha_cumprod where the previous timestep is < 0."""
    t = _rows(timestep, batch, device)
    ac = torch.as_tensor(scheduler.alphas_cumprod).to(device=device, dtype=torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod).to(device=device, dtype=torch.float64)
    s = prev_timestep(scheduler, t)
    abar_t = ac[t]
    abar_s = torch.where(s >= 0, ac[s.clamp(min=0)], final)
    return abar_t, abar_s


def _view(v: Tensor, like: Tensor) -> Tensor:
    """[B] coefficient -> [B,1,...,1] in `like`'s compute dtype."""
    return v.to(_compute_dtype(like)).view(-1, *([1] * (like.ndim - 1)))


def _x0_eps(scheduler: Any, model_output: Tensor, abar_t: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) in compute dtype for any prediction type (diffusers' formulas)."""
    dt = _compute_dtype(sample)
    x, out = sample.to(dt), model_output.to(dt)
    sa, sb = _view(abar_t.sqrt(), x), _view((1 - abar_t).sqrt(), x)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - sb * out) / sa, out
    if kind == "v_prediction":
        return sa * x - sb * out, sa * out + sb * x
    return out, (x - sa * out) / sb  # "sample"


def predicted_x0(scheduler: Any, model_output: Tensor, timestep: Tensor | int, sample: Tensor) -> Tensor:
    """x0_hat(x_t, t) [B,C,h,w] from the model output (epsilon, v_prediction or sample), unclipped.

    Equals `DDIMScheduler.step(...).pred_original_sample` for configs without clipping. For TailorPO's step-wise
    reward, call it on the candidate x_{t-1} with the *previous* timestep s and the model output at s.
    """
    _check_scheduler(scheduler)
    abar_t, _ = alpha_bars(scheduler, timestep, sample.shape[0], sample.device)
    return _x0_eps(scheduler, model_output, abar_t, sample)[0]


def ddim_std(scheduler: Any, timestep: Tensor | int, eta: float, batch: int, device: torch.device) -> Tensor:
    """sigma_t = eta * sqrt(variance(t, s)) [B] float64 (diffusers `eta * _get_variance(t, s) ** 0.5`)."""
    abar_t, abar_s = alpha_bars(scheduler, timestep, batch, device)
    var = (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)
    return eta * var.clamp(min=0).sqrt()


def ddim_mean_coeffs(
    scheduler: Any, timestep: Tensor | int, eta: float, batch: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """(a_t, b_t, sigma_t) [B] float64 with `mu = a_t * x_t + b_t * model_output` (tailorpo.md 1.2).

    The mean is linear in the model output for every prediction type, so the policy-vs-reference mean gap is
    exactly `b_t * (out_theta - out_ref)`: the `d` of the stable log-ratio (`log_ratio`).
    """
    _check_scheduler(scheduler)
    abar_t, abar_s = alpha_bars(scheduler, timestep, batch, device)
    std = ddim_std(scheduler, timestep, eta, batch, device)
    c_dir = (1 - abar_s - std**2).clamp(min=0).sqrt()  # coefficient of eps_hat in mu
    c_x0 = abar_s.sqrt()  # coefficient of x0_hat in mu
    sa, sb = abar_t.sqrt(), (1 - abar_t).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":  # x0 = (x - sb e)/sa, eps = e
        a, b = c_x0 / sa, c_dir - c_x0 * sb / sa
    elif kind == "v_prediction":  # x0 = sa x - sb v, eps = sa v + sb x
        a, b = c_x0 * sa + c_dir * sb, -c_x0 * sb + c_dir * sa
    else:  # "sample": x0 = out, eps = (x - sa out)/sb
        a, b = c_dir / sb, c_x0 - c_dir * sa / sb
    return a, b, std


def ddim_mean_std(
    scheduler: Any, model_output: Tensor, timestep: Tensor | int, sample: Tensor, eta: float
) -> tuple[Tensor, Tensor]:
    """Gaussian DDIM policy at x_t: mean [B,C,h,w] (compute dtype) and std [B] (float64).

    mean == `DDIMScheduler.step(model_output, t, sample, eta=eta, variance_noise=zeros).prev_sample`.
    For k candidates from one shared x_t, call once and draw `mean[None] + std.view(1,-1,1,1,1) * noise[k,B,...]`.
    """
    _check_scheduler(scheduler)
    b = sample.shape[0]
    abar_t, abar_s = alpha_bars(scheduler, timestep, b, sample.device)
    std = ddim_std(scheduler, timestep, eta, b, sample.device)
    x0, eps = _x0_eps(scheduler, model_output, abar_t, sample)
    direction = _view((1 - abar_s - std**2).clamp(min=0).sqrt(), x0) * eps
    return _view(abar_s.sqrt(), x0) * x0 + direction, std


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-row log N(x; mean, std^2 I), **mean over non-batch dims** [B]. x is detached (the sample is data).

    Rows with std == 0 (a deterministic step, e.g. eta=0 or the last step when set_alpha_to_one=True) have no
    density: they get log_prob 0 and must be excluded from policy losses (`min_std`).
    """
    dt = _compute_dtype(mean)
    s = std.to(dt)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    sv = safe.view(-1, *([1] * (mean.ndim - 1)))
    elem = -((x.detach().to(dt) - mean) ** 2) / (2 * sv**2) - torch.log(sv) - _HALF_LOG_2PI
    lp = elem.mean(dim=tuple(range(1, mean.ndim)))
    return torch.where(s > 0, lp, torch.zeros_like(lp))


def ddim_step_with_logprob(
    scheduler: Any,
    model_output: Tensor,
    timestep: Tensor | int,
    sample: Tensor,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    variance_noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step as a Gaussian policy: (x_{t-1} [B,C,h,w], log pi(x_{t-1} | x_t) [B]).

    Without `prev_sample` it draws `x_{t-1} = mean + std * z` with z = `variance_noise` or
    `randn(generator)` (drawn like diffusers: shape/dtype of model_output, on the generator's device, then moved),
    which equals `DDIMScheduler.step(..., eta=eta, variance_noise=z).prev_sample`. With `prev_sample` it scores
    that sample instead (no noise drawn; the returned sample is `prev_sample` itself). log_prob is the Gaussian
    log-density mean-reduced over C,h,w (tailorpo.md 1.3); gradients flow only through the mean.
    """
    mean, std = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        if variance_noise is None:
            gen_device = generator.device if generator is not None else mean.device
            variance_noise = torch.randn(
                model_output.shape, generator=generator, device=gen_device, dtype=model_output.dtype
            ).to(mean.device)
        prev_sample = mean + _view(std, mean) * variance_noise.to(mean.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def log_ratio(x: Tensor, mu_ref: Tensor, d: Tensor, std: Tensor) -> Tensor:
    """log pi_theta(x|x_t) - log pi_ref(x|x_t) [B], exact and stable (tailorpo.md 1.3 d-form).

    x, mu_ref, d = mu_theta - mu_ref: [B,C,h,w]; std [B] (> 0, shared by both policies since sigma_t does not
    depend on theta). lr = mean_{C,h,w}(2 (x - mu_ref) d - d^2) / (2 sigma^2), computed in fp32 (fp64 for fp64).
    """
    dt = _compute_dtype(d)
    d = d.to(dt)
    s2 = std.to(dt).view(-1, *([1] * (d.ndim - 1))) ** 2
    elem = (2 * (x.detach().to(dt) - mu_ref.detach().to(dt)) * d - d**2) / (2 * s2)
    return elem.mean(dim=tuple(range(1, d.ndim)))


def add_noise(alphas_cumprod: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t [B] int, computed in fp32/fp64."""
    abar = alphas_cumprod.to(device=x0.device, dtype=torch.float64)[t.to(x0.device).long()]
    return _view(abar.sqrt(), x0) * x0.to(_compute_dtype(x0)) + _view((1 - abar).sqrt(), x0) * noise.to(
        _compute_dtype(x0)
    )


def ddpm_step(alphas_cumprod: Tensor, model_output: Tensor, t: Tensor, sample: Tensor, noise: Tensor) -> Tensor:
    """One DDPM ancestral step t -> t-1 ("fixed_small" variance, epsilon prediction, no clipping) (ncp.md 1.1).

        x0_hat = (x_t - sqrt(1-abar_t) e)/sqrt(abar_t);  a = abar_t/abar_s;  b = 1 - a   (s = t-1; abar_s=1 if s<0)
        mu = sqrt(abar_s) b/(1-abar_t) x0_hat + sqrt(a) (1-abar_s)/(1-abar_t) x_t;  sig^2 = (1-abar_s)/(1-abar_t) b
        x_s = mu + sig * noise                     (diffusers DDPMScheduler.step, 1000 inference steps)
    Shapes: model_output/sample/noise [B,C,h,w], t [B] int (or []); returns [B,C,h,w] in compute dtype.
    At t = 0 diffusers adds no noise (sig = 0 here too).
    """
    b_rows = sample.shape[0]
    t = _rows(t, b_rows, sample.device)
    ac = alphas_cumprod.to(device=sample.device, dtype=torch.float64)
    s = t - 1
    abar_t = ac[t]
    abar_s = torch.where(s >= 0, ac[s.clamp(min=0)], torch.ones_like(abar_t))
    a = abar_t / abar_s
    beta = 1 - a
    dt = _compute_dtype(sample)
    x = sample.to(dt)
    x0 = (x - _view((1 - abar_t).sqrt(), x) * model_output.to(dt)) / _view(abar_t.sqrt(), x)
    mu = _view(abar_s.sqrt() * beta / (1 - abar_t), x) * x0 + _view(a.sqrt() * (1 - abar_s) / (1 - abar_t), x) * x
    var = ((1 - abar_s) / (1 - abar_t) * beta).clamp(min=1e-20)  # diffusers clamps fixed_small at 1e-20
    sig = torch.where(t > 0, var.sqrt(), torch.zeros_like(var))
    return mu + _view(sig, x) * noise.to(dt)
