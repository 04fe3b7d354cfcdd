"""DDIM (and DDPM) steps as Gaussian policies: means, standard deviations, log-probabilities, log-ratios.

Pure maths, imports only torch. Adapted from diffusers 0.42.1 `DDIMScheduler.step`
(src/diffusers/schedulers/scheduling_ddim.py) and ddpo-pytorch's `ddim_with_logprob.py`. Changes:
- per-row timesteps: `timestep` may be [] or [B] (diffusers takes one int), coefficients gathered per row;
- returns the Gaussian's mean and std instead of one sample, so a caller can draw k candidates from one x_t
  (`mean + std * noise`) or score a given x_{t-1} (`prev_sample=`);
- log-probabilities: Gaussian log-density **mean over all non-batch dims** ([B,C,h,w] -> [B]), as ddpo-pytorch,
  D3PO and SPO (docs/algorithms.md section 2.4); every beta in rlalign is defined against this mean;
- clip_sample / thresholding are rejected (ValueError): clipping x0_hat makes the mean non-linear in the model
  output and kills gradients, and no rlalign config uses it; `use_clipped_model_output` is not offered;
- `check_scheduler` is the one place that accepts or refuses a scheduler (also used by the model loader):
  prediction_type epsilon or v_prediction ("sample" refused), grid spaced by diffusers' stride rule;
- `predicted_eps` / `denoising_target` let the losses that compare the model output with noise handle v_prediction.
Coefficients are computed in float64 from `scheduler.alphas_cumprod`, then cast to the compute dtype
(float32 for float32/bf16/fp16 inputs, float64 for float64 inputs).

Notation (docs/algorithms.md sections 1-2): abar_t = alphas_cumprod[t], s = prev timestep, abar_s = alphas_cumprod[s] or
`final_alpha_cumprod` when s < 0;
    x0_hat = (x_t - sqrt(1 - abar_t) e) / sqrt(abar_t)                     (epsilon prediction)
    x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v,  e = sqrt(abar_t) v + sqrt(1 - abar_t) x_t   (v_prediction)
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
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_scheduler(scheduler: Any) -> None:
    """Refuse (ValueError) every DDIM scheduler config whose step rlalign's maths would get wrong.

    - clip_sample / thresholding: clipping x0_hat makes the step non-Gaussian in the model output;
    - prediction_type must be "epsilon" or "v_prediction" (every algorithm handles both); "sample" is refused by
      name: no supported checkpoint uses it and the losses' scales (beta, DDE weights) are not defined for it;
    - once `set_timesteps(T)` was called, the grid must be the stride grid: with stride = num_train_timesteps // T,
      every timestep is the previous one minus stride and the last one is < stride. diffusers'
      `DDIMScheduler.step` (and our `prev_timestep`) take s = t - stride, so on such a grid s is exactly the next
      entry of `scheduler.timesteps` (or < 0, i.e. final_alpha_cumprod, after the last). timestep_spacing
      "leading" with steps_offset < stride, or "trailing" with T dividing num_train_timesteps, pass; "linspace"
      (and "trailing" otherwise) would make the sampler step to a timestep other than the one it scores next,
      so it is refused.
    Before `set_timesteps` only the first two checks run (the model loader calls this right after loading).
    """
    cfg = scheduler.config
    if getattr(cfg, "thresholding", False) or getattr(cfg, "clip_sample", False):
        raise ValueError(
            "rlalign's DDIM policy needs clip_sample=False and thresholding=False (clipping x0_hat makes the step "
            f"non-Gaussian in the model output); got clip_sample={getattr(cfg, 'clip_sample', None)}, "
            f"thresholding={getattr(cfg, 'thresholding', None)}"
        )
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"scheduler prediction_type {cfg.prediction_type!r} is not supported by rlalign (supported: "
            f"{', '.join(PREDICTION_TYPES)})"
        )
    steps = getattr(scheduler, "num_inference_steps", None)
    if steps is None:
        return
    stride = int(cfg.num_train_timesteps // steps)
    ts = torch.as_tensor(scheduler.timesteps).detach().cpu().long()
    expected = ts[0] - stride * torch.arange(ts.shape[0])
    if stride < 1 or not torch.equal(ts, expected) or int(ts[-1]) >= stride:
        raise ValueError(
            f"scheduler grid {ts.tolist()[:4]}...{ts.tolist()[-2:]} (timestep_spacing="
            f"{getattr(cfg, 'timestep_spacing', None)!r}, steps_offset={getattr(cfg, 'steps_offset', None)}, "
            f"{steps} steps) is not spaced by num_train_timesteps // steps = {stride} down to below {stride}; "
            "diffusers' DDIMScheduler.step steps to t - stride, which would not be the next grid timestep. Use "
            "timestep_spacing='leading' with steps_offset < stride (or 'trailing' with a step count that divides "
            "num_train_timesteps)"
        )


def _check_scheduler(scheduler: Any) -> None:
    check_scheduler(scheduler)
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


def timestep_stride(scheduler: Any) -> int:
    """num_train_timesteps // num_inference_steps: the gap between the sampler's grid timesteps (`check_scheduler`)."""
    _check_scheduler(scheduler)
    return int(scheduler.config.num_train_timesteps // scheduler.num_inference_steps)


def prev_timestep(scheduler: Any, t: Tensor | int) -> Tensor:
    """Previous timestep s = t - stride (diffusers' DDIMScheduler.step rule; < 0 means final_alpha_cumprod).

    `check_scheduler` refuses grids where this differs from the next entry of `scheduler.timesteps`, so on the
    grid s is the timestep the sampler visits next. Off-grid t (DDE's re-noised timesteps) get the same rule.
    """
    out: Tensor = torch.as_tensor(t).long() - timestep_stride(scheduler)
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
    """(x0_hat, eps_hat) in compute dtype for epsilon and v_prediction (diffusers' formulas)."""
    dt = _compute_dtype(sample)
    x, out = sample.to(dt), model_output.to(dt)
    sa, sb = _view(abar_t.sqrt(), x), _view((1 - abar_t).sqrt(), x)
    if scheduler.config.prediction_type == "epsilon":
        return (x - sb * out) / sa, out
    return sa * x - sb * out, sa * out + sb * x  # v_prediction (check_scheduler refuses the rest)


def predicted_x0(scheduler: Any, model_output: Tensor, timestep: Tensor | int, sample: Tensor) -> Tensor:
    """x0_hat(x_t, t) [B,C,h,w] from the model output (epsilon or v_prediction), unclipped.

    Equals `DDIMScheduler.step(...).pred_original_sample` for configs without clipping. For TailorPO's step-wise
    reward, call it on the candidate x_{t-1} with the *previous* timestep s and the model output at s.
    """
    _check_scheduler(scheduler)
    abar_t, _ = alpha_bars(scheduler, timestep, sample.shape[0], sample.device)
    return _x0_eps(scheduler, model_output, abar_t, sample)[0]


def predicted_eps(scheduler: Any, model_output: Tensor, timestep: Tensor | int, sample: Tensor) -> Tensor:
    """eps_hat(x_t, t) [B,C,h,w] from the model output: the output itself (epsilon) or sqrt(abar) v + sqrt(1-abar) x_t.

    For epsilon models this is `model_output` unchanged (cast to fp32/fp64), so eps-space losses stay bit-identical.
    For v_prediction, eps_hat - eps = sqrt(abar_t) (v_hat - v) at a fixed x_t.
    """
    _check_scheduler(scheduler)
    abar_t, _ = alpha_bars(scheduler, timestep, sample.shape[0], sample.device)
    return _x0_eps(scheduler, model_output, abar_t, sample)[1]


def denoising_target(scheduler: Any, x0: Tensor, noise: Tensor, timestep: Tensor | int) -> Tensor:
    """The model's regression target at x_t = sqrt(abar) x0 + sqrt(1-abar) noise: [B,C,h,w].

    epsilon: `noise` itself; v_prediction: v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (diffusers'
    `DDIMScheduler.get_velocity`), computed in fp32 (fp64 for fp64 inputs).
    """
    _check_scheduler(scheduler)
    if scheduler.config.prediction_type == "epsilon":
        return noise
    abar_t, _ = alpha_bars(scheduler, timestep, x0.shape[0], x0.device)
    dt = _compute_dtype(x0)
    return _view(abar_t.sqrt(), x0) * noise.to(dt) - _view((1 - abar_t).sqrt(), x0) * x0.to(dt)


def ddim_std(scheduler: Any, timestep: Tensor | int, eta: float, batch: int, device: torch.device) -> Tensor:
    """sigma_t = eta * sqrt(variance(t, s)) [B] float64 (diffusers `eta * _get_variance(t, s) ** 0.5`)."""
    abar_t, abar_s = alpha_bars(scheduler, timestep, batch, device)
    var = (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)
    return eta * var.clamp(min=0).sqrt()


def ddim_mean_coeffs(
    scheduler: Any, timestep: Tensor | int, eta: float, batch: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """(a_t, b_t, sigma_t) [B] float64 with `mu = a_t * x_t + b_t * model_output` (docs/algorithms.md section 2.3).

    The mean is linear in the model output for every prediction type, so the policy-vs-reference mean gap is
    exactly `b_t * (out_theta - out_ref)`: the `d` of the stable log-ratio (`log_ratio`).
    """
    _check_scheduler(scheduler)
    abar_t, abar_s = alpha_bars(scheduler, timestep, batch, device)
    std = ddim_std(scheduler, timestep, eta, batch, device)
    c_dir = (1 - abar_s - std**2).clamp(min=0).sqrt()  # coefficient of eps_hat in mu
    c_x0 = abar_s.sqrt()  # coefficient of x0_hat in mu
    sa, sb = abar_t.sqrt(), (1 - abar_t).sqrt()
    if scheduler.config.prediction_type == "epsilon":  # x0 = (x - sb e)/sa, eps = e
        a, b = c_x0 / sa, c_dir - c_x0 * sb / sa
    else:  # v_prediction: x0 = sa x - sb v, eps = sa v + sb x
        a, b = c_x0 * sa + c_dir * sb, -c_x0 * sb + c_dir * sa
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
    log-density mean-reduced over C,h,w (docs/algorithms.md section 2.4); gradients flow only through the mean.
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
    """log pi_theta(x|x_t) - log pi_ref(x|x_t) [B], exact and stable (docs/algorithms.md section 2.5).

    x, mu_ref, d = mu_theta - mu_ref: [B,C,h,w]; std [B] (shared by both policies since sigma_t does not depend
    on theta). lr = mean_{C,h,w}(2 (x - mu_ref) d - d^2) / (2 sigma^2), computed in fp32 (fp64 for fp64).
    sigma = 0 (a deterministic step: eta = 0, or the last step with set_alpha_to_one) has no density; such rows,
    and rows whose sigma^2 underflows to 0 in the compute dtype, get lr = 0 with zero gradient instead of inf/NaN,
    as `gaussian_log_prob` gives them log-prob 0. Callers exclude them anyway (TailorPO's min_std > 0).
    """
    dt = _compute_dtype(d)
    d = d.to(dt)
    s2 = std.to(dt) ** 2
    ok = s2 > 0
    s2v = torch.where(ok, s2, torch.ones_like(s2)).view(-1, *([1] * (d.ndim - 1)))
    elem = (2 * (x.detach().to(dt) - mu_ref.detach().to(dt)) * d - d**2) / (2 * s2v)
    lr = elem.mean(dim=tuple(range(1, d.ndim)))
    return torch.where(ok, lr, torch.zeros_like(lr))


def add_noise(alphas_cumprod: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t [B] int, computed in fp32/fp64."""
    abar = alphas_cumprod.to(device=x0.device, dtype=torch.float64)[t.to(x0.device).long()]
    return _view(abar.sqrt(), x0) * x0.to(_compute_dtype(x0)) + _view((1 - abar).sqrt(), x0) * noise.to(
        _compute_dtype(x0)
    )


def ddpm_step(alphas_cumprod: Tensor, model_output: Tensor, t: Tensor, sample: Tensor, noise: Tensor) -> Tensor:
    """One DDPM ancestral step t -> t-1 ("fixed_small" variance, epsilon prediction, no clipping)
    (docs/algorithms.md section 2.7; docs/algorithms/ncp.md 1.1).

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
