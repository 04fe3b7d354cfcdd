"""DDPO baseline (Black et al., arXiv 2305.13301; kvablack/ddpo-pytorch): PPO-clip on DDIM step log-probs.

Advantages: per-group (per-prompt) normalised final rewards, clamped to [-adv_clip_max, adv_clip_max]. Every
stored transition (x_t -> x_{t-1}) of every image is a training row; the learner recomputes log pi_theta(x_{t-1} |
x_t) with CFG (`ddim_step_with_logprob(..., prev_sample=...)`) and compares it with the sampler's stored log-prob:

    ratio = exp(logp - logp_old);   L = mean over rows of max(-A ratio, -A clip(ratio, 1-eps, 1+eps))

The log-ratio is clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO] before exp, so a stale or far off-policy row cannot
overflow the ratio to inf (and -A * inf = NaN when A = 0, e.g. a single-image group); such rows lie far outside
the clip range, and the clamp only stops their gradient.

Steps whose DDIM std < min_std are excluded (docs/algorithms.md section 10, measured in
docs/algorithms/digits-calibration.md: tiny-std steps dominate the score-function gradient); they stay in the
batch with zero loss and zero gradient so micro-batch means equal the full-batch mean. log-probs are means over
C,h,w (as ddpo-pytorch). Not a preference loss (is_preference=False).
Shapes: B images, T steps, N = B*T rows, C/h/w latents. Imports only torch and rlalign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rlalign.algos.common import DiffusionModel, LossOutput, batch_to, guided_eps
from rlalign.pairing import group_normalize
from rlalign.sampling.logprob import ddim_std, ddim_step_with_logprob
from rlalign.types import ScoredRollouts

MAX_LOG_RATIO = 20.0  # |log ratio| cap before exp: ratio <= 4.9e8, finite in fp32 even times adv_clip_max


@dataclass
class DDPOCfg:
    # PPO clip range on the probability ratio (digits calibration: 5e-3; ddpo-pytorch: 1e-4)
    clip_range: float = 5e-3
    # advantages clamped to [-adv_clip_max, adv_clip_max] after per-group normalisation
    adv_clip_max: float = 5.0
    # steps whose DDIM std is below this are not trained (0.05 fixed the digits runs)
    min_std: float = 0.05

    def __post_init__(self) -> None:
        if self.clip_range <= 0 or self.adv_clip_max <= 0:
            raise ValueError("ddpo: clip_range and adv_clip_max must be > 0")


class DDPOBatch(NamedTuple):
    x_t: Tensor  # [N,C,h,w]
    x_prev: Tensor  # [N,C,h,w] the sampled x_{t-1}
    t: Tensor  # [N] int64
    old_log_prob: Tensor  # [N] sampler's log pi_old(x_{t-1} | x_t)
    advantage: Tensor  # [N] per-group normalised, clamped
    cond: Tensor  # [N,L,D]
    uncond: Tensor  # [N,L,D] (expanded)
    eta: float  # the sampler's DDIM eta and classifier-free guidance w: the policy whose log-probs are recomputed
    guidance_scale: float


class DDPOForward(NamedTuple):
    log_prob: Tensor  # [N] log pi_theta (grad); 0 where not kept
    old_log_prob: Tensor  # [N]
    advantage: Tensor  # [N]
    keep: Tensor  # [N] bool, std >= min_std


def build_batch(scored: ScoredRollouts, cfg: DDPOCfg, generator: torch.Generator) -> DDPOBatch:
    """Pure: per-group advantages; rows = every (image, step), shuffled."""
    r = scored.rollout
    adv = group_normalize(r.group_ids, scored.scores, clamp=cfg.adv_clip_max)
    b, steps = r.log_probs.shape
    perm = torch.randperm(b * steps, generator=generator)
    bi, si = perm // steps, perm % steps
    return DDPOBatch(
        x_t=r.latents[bi, si],
        x_prev=r.latents[bi, si + 1],
        t=r.timesteps[si].long(),
        old_log_prob=r.log_probs[bi, si].float(),
        advantage=adv[bi].float(),
        cond=r.prompt_embeds[bi],
        uncond=r.negative_embeds[:1].expand(b * steps, -1, -1),
        eta=r.eta,
        guidance_scale=r.guidance_scale,
    )


def forward(model: DiffusionModel, batch: DDPOBatch, cfg: DDPOCfg) -> DDPOForward:
    """Recompute log pi_theta of the stored transitions (CFG, LoRA on) on rows with std >= min_std."""
    n = batch.t.shape[0]
    keep = ddim_std(model.scheduler, batch.t.cpu(), batch.eta, n, torch.device("cpu")) >= cfg.min_std
    b = batch_to(batch, model.alphas_cumprod.device)
    idx = torch.nonzero(keep).flatten().to(b.t.device)
    log_prob = torch.zeros(n, device=b.t.device)
    if idx.numel() > 0:
        x_t, t = b.x_t[idx], b.t[idx]
        e = guided_eps(model, x_t, t, b.cond[idx], b.uncond[idx], b.guidance_scale, adapters=True)
        _, lp = ddim_step_with_logprob(model.scheduler, e, t, x_t, b.eta, prev_sample=b.x_prev[idx])
        log_prob = log_prob.index_copy(0, idx, lp.float())
    return DDPOForward(log_prob, b.old_log_prob.float(), b.advantage.float(), keep.to(b.t.device))


def ddpo_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantage: Tensor, *, clip_range: float, keep: Tensor | None = None
) -> LossOutput:
    """PPO-clip, mean over rows [N]: max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - logp_old).

    Rows with keep False contribute 0 (and no gradient); log-ratios are clamped to +-MAX_LOG_RATIO before exp.
    Metrics over kept rows: clipfrac, approx_kl (0.5 mean (logp - logp_old)^2, as ddpo-pytorch).
    """
    k = torch.ones_like(log_prob, dtype=torch.bool) if keep is None else keep
    diff = torch.where(k, log_prob - old_log_prob, torch.zeros_like(log_prob))
    ratio = torch.exp(diff.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # no inf ratio, so no 0 * inf = NaN
    unclipped = -advantage * ratio
    clipped = -advantage * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_row = torch.where(k, torch.maximum(unclipped, clipped), torch.zeros_like(ratio))
    kf = k.float()
    nk = kf.sum().clamp(min=1.0)
    d = diff.detach()
    return LossOutput(
        per_row.mean(),
        {
            "ddpo/clipfrac": (((ratio.detach() - 1).abs() > clip_range).float() * kf).sum() / nk,
            "ddpo/approx_kl": (0.5 * d**2 * kf).sum() / nk,
            "ddpo/ratio_mean": (ratio.detach() * kf).sum() / nk,
            "ddpo/adv_abs_mean": advantage.detach().abs().mean(),
            "ddpo/kept_frac": kf.mean(),
        },
    )


def loss(fwd: DDPOForward, cfg: DDPOCfg) -> LossOutput:
    return ddpo_loss(fwd.log_prob, fwd.old_log_prob, fwd.advantage, clip_range=cfg.clip_range, keep=fwd.keep)
