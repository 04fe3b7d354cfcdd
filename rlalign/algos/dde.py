"""DDE: Diffusion-DPO with an explicit per-timestep credit weight (Shi et al., arXiv 2411.14871;
docs/algorithms/dde.md 2).

The paper's method section could not be read; this is rlalign's reconstruction (docs/algorithms/dde.md 2.2-2.5),
**unconfirmed**.
For the split step t, log p_theta(x0) ~ log p_theta(x_t) [stepwise, upper segment] + log p_theta(x0 | x_t)
[single-shot, final segment]; both theta-dependent parts are multiples of the denoising-error difference
d = mse(e_theta, eps_tgt) - mse(e_ref, eps_tgt) from ONE network call at t:

    stepwise (S):    log-ratio = -lam_step(t) d,  lam_step = b_t^2 / (2 sig^2)  (DDIM posterior t -> s = t - stride)
    single-shot (SS): log-ratio = -lam_ss(t) d,   lam_ss = (1 - abar_t) / (2 s0^2 abar_t)  (x0_hat, eta = 0)
    logits = w(t) * ((ref_err_w - ref_err_l) - (err_w - err_l)),   L = -mean log sigmoid(beta * logits)

with w normalised to mean 1 over the training-timestep distribution, so `beta` is on Diffusion-DPO's scale and
`w == 1` ("uniform") is exactly `diffusion_dpo` for epsilon models (same beta convention: beta = repo beta_dpo / 2).
stride = num_train_timesteps // the sampler's step count, read from `model.scheduler` (`logprob.timestep_stride`),
so s is the sampler's next grid timestep.
v_prediction: the estimators are defined on eps errors, so the model output is converted to eps_hat
(`logprob.predicted_eps`; eps_hat - eps = sqrt(abar_t) (v_hat - v)) before the errors are taken. For v models
w == 1 is then Diffusion-DPO with an extra per-timestep factor abar_t (`diffusion_dpo` regresses on v itself).

Registry mapping (our decision): the registry name picks the estimator, i.e. the default weight:
`dde_stepwise` -> w = lam_step ("stepwise"), `dde_single_shot` -> w = lam_ss ("single_shot").
`DDECfg.weight` (default None) overrides that with any mode of `WEIGHT_MODES`; docs/algorithms/dde.md's recommended
middle-peaked stand-in is `weight: dde_mid` (also `dde_weight`'s default), `dde_sum` = lam_step + lam_ss.
State source: "renoise" (shared t and noise per pair, as Diffusion-DPO; default) or "trajectory" (the sampler's
stored x_t on its grid; winner and loser then have different x_t).
Shapes: B images, P pairs, T sampler steps, C/h/w latents. Imports only torch and rlalign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rlalign.algos.common import (
    DiffusionModel,
    LossOutput,
    batch_to,
    logistic_preference_loss,
    model_device,
    per_sample_mse,
)
from rlalign.algos.diffusion_dpo import pair_final_latents
from rlalign.pairing import best_vs_worst
from rlalign.sampling.logprob import add_noise, predicted_eps, timestep_stride
from rlalign.types import ScoredRollouts

WEIGHT_MODES = ("dde_mid", "dde_sum", "dde_index", "single_shot", "stepwise", "uniform")
STATE_SOURCES = ("renoise", "trajectory")


@dataclass
class DDECfg:
    # logit scale, Diffusion-DPO convention (= repo beta_dpo / 2); weights have mean 1 so the scale carries over
    beta: float = 1000.0
    # None: the registry name's estimator weight (dde_stepwise: stepwise, dde_single_shot: single_shot);
    # else one of dde_mid | dde_sum | dde_index | single_shot | stepwise | uniform (docs/algorithms/dde.md 2.5)
    weight: str | None = None
    # DDIM eta of the stepwise posterior q(x_s | x_t, x0) in lam_step (needs > 0); s = t - stride comes from the
    # model's scheduler (1000 // sampler steps)
    eta: float = 1.0
    # std of the single-shot Gaussian p(x0 | x_t); only rescales lam_ss (normalised away)
    s0: float = 1.0
    # w(t) clamped to at most this multiple of its mean, then renormalised (None: raw). 30 leaves every mode
    # unchanged on the SD schedule; on the digits cosine schedule single_shot/stepwise/dde_sum would otherwise put
    # ~all credit at t = 999 (abar_999 ~ 0)
    weight_cap: float | None = 30.0
    # renoise (shared fresh noise + t per pair) | trajectory (sampler's stored x_t on its grid)
    state_source: str = "renoise"
    # renoise: t ~ U[t_min, t_max] (inclusive), one per pair
    t_min: int = 0
    t_max: int = 999
    # a group gives a pair only when best - worst score > this
    min_reward_gap: float = 0.0

    def __post_init__(self) -> None:
        if self.weight is not None and self.weight not in WEIGHT_MODES:
            raise ValueError(f"dde.weight must be None or one of {WEIGHT_MODES}, got {self.weight!r}")
        if self.state_source not in STATE_SOURCES:
            raise ValueError(f"dde.state_source must be one of {STATE_SOURCES}, got {self.state_source!r}")
        if not 0 <= self.t_min <= self.t_max:
            raise ValueError(f"dde: need 0 <= t_min <= t_max, got {self.t_min}, {self.t_max}")
        if self.weight_cap is not None and self.weight_cap <= 1:
            raise ValueError(f"dde.weight_cap must be None or > 1, got {self.weight_cap}")
        if self.eta <= 0 or self.s0 <= 0:
            raise ValueError(f"dde: need eta > 0, s0 > 0; got {self.eta}, {self.s0}")


# ---------------------------------------------------------------- estimators and weights (float64)
def stepwise_weight(abar_t: Tensor, abar_s: Tensor, eta: float = 1.0) -> Tensor:
    """lam_step = b_t^2 / (2 sig^2) (docs/algorithms/dde.md 2.3, eq. S): per-element KL weight of the DDIM transition
    t -> s.

    sig^2 = eta^2 (1-abar_s)/(1-abar_t) (1-abar_t/abar_s), b_t = sqrt(1-abar_s-sig^2) - sqrt(abar_s(1-abar_t)/abar_t).
    0 where sig = 0 (abar_s == abar_t, e.g. t = 0 with set_alpha_to_one=False).
    """
    var = eta**2 * (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)
    b = (1 - abar_s - var).clamp(min=0).sqrt() - (abar_s * (1 - abar_t) / abar_t).sqrt()
    return torch.where(var > 0, b**2 / (2 * var.clamp(min=1e-300)), torch.zeros_like(var))


def single_shot_weight(abar_t: Tensor, s0: float = 1.0) -> Tensor:
    """lam_ss = (1 - abar_t) / (2 s0^2 abar_t) (docs/algorithms/dde.md 2.4, eq. SS): x0-space sensitivity to an eps
    error."""
    return (1 - abar_t) / (2 * s0**2 * abar_t)


def single_shot_x0(x_t: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """Single-shot terminal estimate: the eta = 0 DDIM jump x_t -> x0, x0_hat = (x_t - sqrt(1-abar) eps)/sqrt(abar).

    x_t, eps [B,C,h,w]; abar_t [B] (or scalar) float64. Equals running all remaining eta = 0 DDIM steps under a
    model whose eps is constant along the path (docs/algorithms/dde.md 7.6). `eps` is a noise prediction: convert a
    v_prediction
    output first (`logprob.predicted_eps`).
    """
    a = abar_t.to(torch.float64).reshape(-1, *([1] * (x_t.ndim - 1)))
    dt = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    return ((x_t.to(dt) - (1 - a).sqrt().to(dt) * eps.to(dt)) / a.sqrt().to(dt)).to(dt)


def dde_weight(
    alphas_cumprod: Tensor,
    mode: str = "dde_mid",
    *,
    timesteps: Tensor | None = None,
    stride: int | None = None,
    eta: float = 1.0,
    s0: float = 1.0,
    final_alpha_cumprod: float | None = None,
    cap: float | None = None,
) -> Tensor:
    """Credit weight w(t) at `timesteps` (default all 0..N-1), float64 [len(timesteps)], mean 1 over them.

    The mean-1 normalisation is over the given timesteps (= the uniform training distribution over them).
    Modes (docs/algorithms/dde.md 2.5): dde_mid abar(1-abar) (default stand-in, peaks at abar = 0.5); dde_sum
    lam_step + lam_ss;
    dde_index u(1-u), u = t/N; single_shot lam_ss; stepwise lam_step with s = t - stride (abar_s =
    final_alpha_cumprod, default abar[0], when s < 0); uniform 1 (= Diffusion-DPO). `stride` (the sampler's
    num_train_timesteps // steps) is required by stepwise and dde_sum.
    `cap`: clamp w to at most `cap` times its mean and renormalise (repeated until stable), so a few timesteps
    cannot take all the credit (on a cosine schedule abar_999 ~ 0 and lam_ss, lam_step put ~all weight at
    t = 999); None keeps the raw form.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown DDE weight mode {mode!r}; choose from {WEIGHT_MODES}")
    ac = alphas_cumprod.detach().to("cpu", torch.float64)
    n = ac.shape[0]
    t = torch.arange(n) if timesteps is None else timesteps.detach().to("cpu").long()
    abar = ac[t]
    if mode in ("stepwise", "dde_sum"):
        if stride is None or stride < 1:
            raise ValueError(f"DDE weight {mode!r} needs the sampler's timestep stride >= 1, got {stride}")
        final = float(ac[0]) if final_alpha_cumprod is None else float(final_alpha_cumprod)
        s = t - stride
        abar_s = torch.where(s >= 0, ac[s.clamp(min=0)], torch.full_like(abar, final))
        w = stepwise_weight(abar, abar_s, eta)
        if mode == "dde_sum":
            w = w + single_shot_weight(abar, s0)
    elif mode == "dde_mid":
        w = abar * (1 - abar)
    elif mode == "dde_index":
        u = t.double() / n
        w = u * (1 - u)
    elif mode == "single_shot":
        w = single_shot_weight(abar, s0)
    else:
        w = torch.ones_like(abar)
    mean = w.mean()
    if not mean > 0:
        raise ValueError(f"DDE weight {mode!r} is zero on every given timestep")
    w = w / mean
    if cap is not None:
        if cap <= 1:
            raise ValueError(f"DDE weight cap must be > 1 (the mean), got {cap}")
        for _ in range(100):  # clamp-and-renormalise converges in a few rounds
            if float(w.max()) <= cap * (1 + 1e-9):
                break
            w = w.clamp(max=cap)
            w = w / w.mean()
    return w


# ---------------------------------------------------------------- algorithm
class DDEBatch(NamedTuple):
    x0_w: Tensor  # [P,C,h,w] winner final latents
    x0_l: Tensor  # [P,C,h,w]
    cond_w: Tensor  # [P,L,D]
    cond_l: Tensor  # [P,L,D]
    t: Tensor  # [P] int64, shared by winner and loser
    noise: Tensor  # [P,C,h,w] shared noise (renoise mode; unused in trajectory mode)
    xt_w: Tensor | None  # [P,C,h,w] stored sampler state at t (trajectory mode) or None
    xt_l: Tensor | None  # [P,C,h,w]


class DDEForward(NamedTuple):
    err_w: Tensor  # [P] policy denoising error vs eps_tgt (grad)
    err_l: Tensor  # [P]
    ref_err_w: Tensor  # [P] reference, no grad
    ref_err_l: Tensor  # [P]
    weight: Tensor  # [P] w(t), mean 1 over the training distribution


def build_batch(scored: ScoredRollouts, cfg: DDECfg, generator: torch.Generator) -> DDEBatch:
    """Pure: best vs worst pairs; renoise: shared t ~ U[t_min, t_max] and noise; trajectory: shared grid index."""
    x0_w, x0_l, cond_w, cond_l = pair_final_latents(scored, cfg.min_reward_gap)
    p = x0_w.shape[0]
    if cfg.state_source == "renoise":  # same draws, same order as diffusion_dpo: uniform weight == Diffusion-DPO
        t = torch.randint(cfg.t_min, cfg.t_max + 1, (p,), generator=generator)
        noise = torch.randn(x0_w.shape, generator=generator, dtype=torch.float32)
        return DDEBatch(x0_w, x0_l, cond_w, cond_l, t, noise, None, None)
    r = scored.rollout
    win, lose = best_vs_worst(r.group_ids, scored.scores, cfg.min_reward_gap)
    k = torch.randint(0, r.timesteps.shape[0], (p,), generator=generator)  # latents[:, k] is at timesteps[k]
    noise = torch.zeros(x0_w.shape)  # unused: eps_tgt comes from the stored state
    return DDEBatch(x0_w, x0_l, cond_w, cond_l, r.timesteps[k].long(), noise, r.latents[win, k], r.latents[lose, k])


def _weights(model: DiffusionModel, t: Tensor, cfg: DDECfg, default_mode: str) -> Tensor:
    mode = cfg.weight or default_mode
    ac = model.alphas_cumprod
    if cfg.state_source == "renoise":
        grid = torch.arange(cfg.t_min, cfg.t_max + 1)
    else:
        grid = torch.as_tensor(model.scheduler.timesteps).long()
    table = dde_weight(
        ac,
        mode,
        timesteps=grid,
        stride=timestep_stride(model.scheduler),
        eta=cfg.eta,
        s0=cfg.s0,
        final_alpha_cumprod=float(model.scheduler.final_alpha_cumprod),
        cap=cfg.weight_cap,
    )
    full = torch.zeros(ac.shape[0], dtype=torch.float64)
    full[grid] = table
    return full[t.cpu()].float().to(t.device)


def _forward(model: DiffusionModel, batch: DDEBatch, cfg: DDECfg, default_mode: str) -> DDEForward:
    """One policy call (grad) + one reference call on [2P] rows (the "single inference"), eps errors in fp32."""
    b = batch_to(batch, model_device(model))
    t2 = torch.cat([b.t, b.t])
    x0 = torch.cat([b.x0_w, b.x0_l]).float()
    cond = torch.cat([b.cond_w, b.cond_l])
    if b.xt_w is None or b.xt_l is None:
        eps = torch.cat([b.noise, b.noise]).float()
        x_t = add_noise(model.alphas_cumprod, x0, eps, t2)
    else:  # eps_tgt = (x_t - sqrt(abar) x0) / sqrt(1 - abar) (docs/algorithms/dde.md 2.2)
        x_t = torch.cat([b.xt_w, b.xt_l]).float()
        abar = model.alphas_cumprod[t2].view(-1, 1, 1, 1)
        eps = ((x_t.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt()).float()
    sched = model.scheduler  # eps_hat: the output itself for epsilon models, converted for v_prediction
    err = per_sample_mse(predicted_eps(sched, model.predict(x_t, t2, cond, adapters=True), t2, x_t), eps)
    with torch.no_grad():
        ref = per_sample_mse(predicted_eps(sched, model.predict(x_t, t2, cond, adapters=False), t2, x_t), eps)
    err_w, err_l = err.chunk(2)
    ref_w, ref_l = ref.chunk(2)
    return DDEForward(err_w, err_l, ref_w, ref_l, _weights(model, b.t, cfg, default_mode))


def forward_stepwise(model: DiffusionModel, batch: DDEBatch, cfg: DDECfg) -> DDEForward:
    """`dde_stepwise`: w = lam_step unless cfg.weight overrides."""
    return _forward(model, batch, cfg, "stepwise")


def forward_single_shot(model: DiffusionModel, batch: DDEBatch, cfg: DDECfg) -> DDEForward:
    """`dde_single_shot`: w = lam_ss unless cfg.weight overrides."""
    return _forward(model, batch, cfg, "single_shot")


def dde_loss(
    err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, weight: Tensor, *, beta: float
) -> LossOutput:
    """-mean log sigmoid(beta * w(t) * ((ref_err_w - ref_err_l) - (err_w - err_l))), all [P] (docs/algorithms/dde.md
    2.5)."""
    out = logistic_preference_loss(weight * ((ref_err_w - ref_err_l) - (err_w - err_l)), beta)
    out.metrics.update(
        {
            "dde/weight_mean": weight.detach().mean(),
            "dde/err_w": err_w.detach().mean(),
            "dde/err_l": err_l.detach().mean(),
        }
    )
    return out


def loss(fwd: DDEForward, cfg: DDECfg) -> LossOutput:
    return dde_loss(fwd.err_w, fwd.err_l, fwd.ref_err_w, fwd.ref_err_l, fwd.weight, beta=cfg.beta)
