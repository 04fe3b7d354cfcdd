"""Diffusion-DPO (Wallace et al., arXiv 2311.12908), online: best vs worst image of each group
(docs/algorithms.md section 7; derivation in docs/algorithms/dde.md 1).

Winner and loser final latents are re-noised at a shared (t, noise); the policy is rewarded for beating the
reference's winner-loser gap in per-sample denoising error (the ELBO surrogate of DPO on p(x0)):

    logits = (ref_err_w - ref_err_l) - (err_w - err_l);   L = -mean log sigmoid(beta * logits)

Convention: `beta` multiplies the logits directly (diffusers' port, NCP code, STYLE.md); the original repo's
`-0.5 * beta_dpo * (...)` means beta here = beta_dpo / 2 (repo 5000 -> 2500). Errors are means over C,h,w.
The error is against the model's own regression target (`logprob.denoising_target`): the noise for epsilon models,
v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 for v_prediction models, as the authors' train.py and diffusers' port.
Shapes: B images, P pairs, C/h/w latents, L/D text tokens/width. Imports only torch and rlalign.
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
from rlalign.pairing import best_vs_worst
from rlalign.sampling.logprob import add_noise, denoising_target
from rlalign.types import ScoredRollouts


@dataclass
class DiffusionDPOCfg:
    # logit scale; = the repo's beta_dpo / 2 (paper SD1.5 2000 -> 1000); per-element-mean errors
    beta: float = 1000.0
    # a group gives a pair only when best - worst score > this (0 drops exact ties only)
    min_reward_gap: float = 0.0
    # training timesteps drawn uniformly from [t_min, t_max] (inclusive), one per pair
    t_min: int = 0
    t_max: int = 999

    def __post_init__(self) -> None:
        if not 0 <= self.t_min <= self.t_max:
            raise ValueError(f"diffusion_dpo: need 0 <= t_min <= t_max, got {self.t_min}, {self.t_max}")


class DPOBatch(NamedTuple):
    x0_w: Tensor  # [P,C,h,w] winner final latents
    x0_l: Tensor  # [P,C,h,w] loser final latents
    cond_w: Tensor  # [P,L,D] winner prompt embeddings
    cond_l: Tensor  # [P,L,D]
    t: Tensor  # [P] int64, shared by winner and loser
    noise: Tensor  # [P,C,h,w], shared by winner and loser


class DPOForward(NamedTuple):
    err_w: Tensor  # [P] policy denoising error (grad)
    err_l: Tensor  # [P]
    ref_err_w: Tensor  # [P] reference (adapters off, no grad)
    ref_err_l: Tensor  # [P]


def pair_final_latents(scored: ScoredRollouts, min_gap: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Best vs worst per group -> (x0_w, x0_l [P,C,h,w], cond_w, cond_l [P,L,D]); x0 = latents[:, -1]."""
    r = scored.rollout
    win, lose = best_vs_worst(r.group_ids, scored.scores, min_gap)
    x0 = r.latents[:, -1]
    return x0[win], x0[lose], r.prompt_embeds[win], r.prompt_embeds[lose]


def build_batch(scored: ScoredRollouts, cfg: DiffusionDPOCfg, generator: torch.Generator) -> DPOBatch:
    """Pure: pairs, shared t ~ U[t_min, t_max] and shared noise per pair (may have P = 0 rows)."""
    x0_w, x0_l, cond_w, cond_l = pair_final_latents(scored, cfg.min_reward_gap)
    p = x0_w.shape[0]
    t = torch.randint(cfg.t_min, cfg.t_max + 1, (p,), generator=generator)
    noise = torch.randn(x0_w.shape, generator=generator, dtype=torch.float32)
    return DPOBatch(x0_w, x0_l, cond_w, cond_l, t, noise)


def denoising_errors(
    model: DiffusionModel, x0_w: Tensor, x0_l: Tensor, cond_w: Tensor, cond_l: Tensor, t: Tensor, noise: Tensor
) -> DPOForward:
    """One policy call (grad) and one reference call (no grad) on the stacked [2P] batch (winners first).

    Errors are MSEs against the regression target of the model's prediction type (noise or v).
    """
    x0 = torch.cat([x0_w, x0_l]).float()
    eps = torch.cat([noise, noise]).float()
    t2 = torch.cat([t, t])
    cond = torch.cat([cond_w, cond_l])
    x_t = add_noise(model.alphas_cumprod, x0, eps, t2)
    target = denoising_target(model.scheduler, x0, eps, t2)
    err = per_sample_mse(model.predict(x_t, t2, cond, adapters=True), target)
    with torch.no_grad():
        ref = per_sample_mse(model.predict(x_t, t2, cond, adapters=False), target)
    err_w, err_l = err.chunk(2)
    ref_w, ref_l = ref.chunk(2)
    return DPOForward(err_w, err_l, ref_w, ref_l)


def forward(model: DiffusionModel, batch: DPOBatch, cfg: DiffusionDPOCfg) -> DPOForward:
    b = batch_to(batch, model_device(model))
    return denoising_errors(model, b.x0_w, b.x0_l, b.cond_w, b.cond_l, b.t, b.noise)


def diffusion_dpo_loss(
    err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, *, beta: float
) -> LossOutput:
    """Per-pair denoising errors [P] at a shared (t, noise); beating the reference's winner-loser gap is rewarded.

    Diffusion-DPO eq. (the repo's `-0.5*beta_dpo*((m_w - m_l) - (r_w - r_l))` with beta = beta_dpo/2).
    """
    out = logistic_preference_loss((ref_err_w - ref_err_l) - (err_w - err_l), beta)
    out.metrics.update(
        {
            "diffusion_dpo/err_w": err_w.detach().mean(),
            "diffusion_dpo/err_l": err_l.detach().mean(),
            "diffusion_dpo/ref_err_w": ref_err_w.detach().mean(),
            "diffusion_dpo/ref_err_l": ref_err_l.detach().mean(),
        }
    )
    return out


def loss(fwd: DPOForward, cfg: DiffusionDPOCfg) -> LossOutput:
    return diffusion_dpo_loss(fwd.err_w, fwd.err_l, fwd.ref_err_w, fwd.ref_err_l, beta=cfg.beta)
