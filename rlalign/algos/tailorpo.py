"""TailorPO / TailorPO-G (Ren et al., arXiv 2502.01667): step-level DPO on candidates branched from one x_t.

At each denoising step the sampler draws k candidates x_{t-1} from the shared x_t, ranks them by the step-wise
reward of their one-step x0_hat, and stores (x_t, x^w, x^l). The learner applies DPO to the exact DDIM transition
log-ratios (docs/algorithms.md sections 2.5 and 5; design note docs/algorithms/tailorpo.md 2.4):

    lr(x) = log pi_theta(x|x_t) - log pi_ref(x|x_t) = mean_{C,h,w}(2 (x - mu_ref) d - d^2) / (2 sigma_t^2),
    d = mu_theta - mu_ref = b_t (eps_theta - eps_ref)   (CFG-guided eps, same guidance scale as the sampler)
    z = beta (lr(x^w) - lr(x^l)),   L = mean over pairs of -log sigmoid(z)

TailorPO-G moves the winner along the reward gradient before storing it (`guided_candidate`,
docs/algorithms.md section 6; docs/algorithms/tailorpo.md 3).
Choices where the paper could not be read (docs/algorithms.md section 11; config fields unless noted): eta and
CFG w are the sampler's own (the batch carries the rollout's values, `Rollout.eta`/`guidance_scale`), beta on
mean-reduced log-probs, no ratio clip, k > 2 uses best vs worst, ties (gap <= tie_eps) give no pair, steps with DDIM
std < min_std excluded (docs/algorithms/digits-calibration.md), `rms_sigma` guidance normalisation with eta_g 0.1.
Excluded rows (std < min_std) are kept in the batch with logit 0 and no gradient, so a fresh LoRA still gives
exactly ln 2 and micro-batch means still equal the full-batch mean (gradient is scaled by the kept fraction).
Shapes: B trajectories, S branched steps, N = training rows (pairs), k candidates, C/h/w latents.
Imports only torch and rlalign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rlalign.algos.common import DiffusionModel, LossOutput, batch_to, guided_eps, logistic_preference_loss
from rlalign.pairing import step_best_vs_worst
from rlalign.sampling.logprob import ddim_mean_coeffs, ddim_mean_std, ddim_std, log_ratio
from rlalign.types import ScoredRollouts

GUIDANCE_NORMS = ("rms_sigma", "none")
GUIDANCE_GRADS = ("full", "stopgrad_eps")


@dataclass
class TailorPOCfg:
    # DPO logit scale on mean-reduced log-ratios (docs/algorithms/tailorpo.md: D3PO 0.1, SPO 10; unconfirmed for
    # TailorPO)
    beta: float = 10.0
    # candidates branched from each shared x_t (sampler); best vs worst when k > 2
    k: int = 2
    # a step gives a pair only when best - worst step-wise reward > tie_eps (sampler)
    tie_eps: float = 0.0
    # steps whose DDIM std is below this are not trained: tiny std makes lr ~ 1/std explode (must be > 0)
    min_std: float = 0.05
    # D3PO/SPO clamp of exp(lr) to [1-eps, 1+eps]; None: no clip
    ratio_clip_eps: float | None = None
    # TailorPO-G step size (in noise std units with rms_sigma)
    eta_g: float = 0.1
    # rms_sigma: x+ = x_w + eta_g * sigma_t * g / rms(g); none: x+ = x_w + eta_g * g (paper's raw form)
    guidance_norm: str = "rms_sigma"
    # full: backprop through the U-Net in the chain rule of x0_hat; stopgrad_eps: g = g0 / sqrt(abar_s)
    guidance_grad: str = "full"
    # also push the loser down the reward gradient (x- = x_l - eta_g * g_l); off by default
    guide_loser: bool = False

    def __post_init__(self) -> None:
        if self.guidance_norm not in GUIDANCE_NORMS:
            raise ValueError(f"tailorpo.guidance_norm must be one of {GUIDANCE_NORMS}, got {self.guidance_norm!r}")
        if self.guidance_grad not in GUIDANCE_GRADS:
            raise ValueError(f"tailorpo.guidance_grad must be one of {GUIDANCE_GRADS}, got {self.guidance_grad!r}")
        if self.k < 2:
            raise ValueError(f"tailorpo.k must be >= 2, got {self.k}")
        if not self.min_std > 0:  # std = 0 steps (eta = 0, set_alpha_to_one) have no density to train
            raise ValueError(f"tailorpo.min_std must be > 0, got {self.min_std}")


class TailorPOBatch(NamedTuple):
    x_t: Tensor  # [N,C,h,w] shared state
    x_w: Tensor  # [N,C,h,w] preferred candidate (x^+ for TailorPO-G)
    x_l: Tensor  # [N,C,h,w] dispreferred candidate
    t: Tensor  # [N] int64 timestep of x_t
    cond: Tensor  # [N,L,D] prompt embeddings
    uncond: Tensor  # [N,L,D] empty-prompt embeddings (expanded)
    reward_w: Tensor  # [N] step-wise rewards (logging only)
    reward_l: Tensor  # [N]
    eta: float  # the sampler's DDIM eta (the learner rebuilds its Gaussian step)
    guidance_scale: float  # the sampler's classifier-free guidance w


class TailorPOForward(NamedTuple):
    lr_w: Tensor  # [N] log pi_theta(x_w) - log pi_ref(x_w) (0 where not kept)
    lr_l: Tensor  # [N]
    keep: Tensor  # [N] bool, std >= min_std
    std: Tensor  # [N] DDIM std of the step


def rank_candidates(rewards: Tensor, tie_eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Step-level pairing (`Sampler._branch` calls this): rewards [k,B] -> (win_idx, lose_idx, valid) [B].

    Best vs worst candidate per row (first index among equal rewards); valid is False when max - min <= tie_eps.
    """
    return step_best_vs_worst(rewards, tie_eps)


def guided_candidate(
    x: Tensor, reward_grad: Tensor, step_size: float, *, std: Tensor | None = None, norm: str = "none"
) -> Tensor:
    """TailorPO-G: x^+ = x + step * g (norm "none"), or x + step * sigma_t * g / rms(g) (norm "rms_sigma").

    x, reward_grad [B,C,h,w] (g = d reward / d x, already through x0_hat's chain rule); std [B] sigma_t (needed
    for rms_sigma: the shift then has RMS `|step| * sigma_t` per element). A negative step moves x down the
    gradient (the sampler's `guide_loser`). Returns a detached [B,C,h,w]; `Sampler._guide` calls this.
    """
    g = reward_grad.detach().float()
    if norm == "none":
        shift = step_size * g
    elif norm == "rms_sigma":
        if std is None:
            raise ValueError("guided_candidate(norm='rms_sigma') needs std")
        rms = g.pow(2).mean(dim=tuple(range(1, g.ndim)), keepdim=True).sqrt().clamp(min=1e-12)
        shift = step_size * std.float().view(-1, *([1] * (g.ndim - 1))) * g / rms
    else:
        raise ValueError(f"unknown guidance norm {norm!r}; choose from {GUIDANCE_NORMS}")
    return (x.detach().float() + shift).to(x.dtype)


def build_batch(scored: ScoredRollouts, cfg: TailorPOCfg, generator: torch.Generator) -> TailorPOBatch:
    """Pure: valid step pairs of every trajectory, flattened (b, step) -> rows, shuffled (docs/algorithms/tailorpo.md
    2.5)."""
    r = scored.rollout
    sp = r.step_pairs
    if sp is None:
        raise ValueError("tailorpo needs rollout.step_pairs: the sampler must branch (Algorithm.needs_step_pairs)")
    b_idx, s_idx = torch.nonzero(sp.valid, as_tuple=True)
    perm = torch.randperm(b_idx.shape[0], generator=generator)
    b_idx, s_idx = b_idx[perm], s_idx[perm]
    n = b_idx.shape[0]
    return TailorPOBatch(
        x_t=sp.x_t[b_idx, s_idx],
        x_w=sp.x_w[b_idx, s_idx],
        x_l=sp.x_l[b_idx, s_idx],
        t=sp.timesteps[s_idx].long(),
        cond=r.prompt_embeds[b_idx],
        uncond=r.negative_embeds[:1].expand(n, -1, -1),
        reward_w=sp.reward_w[b_idx, s_idx].float(),
        reward_l=sp.reward_l[b_idx, s_idx].float(),
        eta=r.eta,
        guidance_scale=r.guidance_scale,
    )


def step_log_ratios(
    model: DiffusionModel,
    x_t: Tensor,
    t: Tensor,
    cond: Tensor,
    uncond: Tensor,
    samples: list[Tensor],
    *,
    eta: float,
    guidance_scale: float,
) -> tuple[list[Tensor], Tensor]:
    """lr(x) for each x in `samples` (all branched from x_t) with one theta and one reference call.

    x_t [n,C,h,w], t [n], cond/uncond [n,L,D]; returns ([n] per sample, std [n]).
    """
    e_th = guided_eps(model, x_t, t, cond, uncond, guidance_scale, adapters=True)
    with torch.no_grad():
        e_ref = guided_eps(model, x_t, t, cond, uncond, guidance_scale, adapters=False)
        mu_ref, _ = ddim_mean_std(model.scheduler, e_ref, t, x_t, eta)
    _, b, std = ddim_mean_coeffs(model.scheduler, t, eta, x_t.shape[0], x_t.device)
    d = b.float().view(-1, 1, 1, 1) * (e_th.float() - e_ref.float())  # = mu_theta - mu_ref, exact
    return [log_ratio(x, mu_ref, d, std) for x in samples], std


def forward(model: DiffusionModel, batch: TailorPOBatch, cfg: TailorPOCfg) -> TailorPOForward:
    """Model calls only on rows with std >= min_std; other rows get lr = 0 (see module docstring)."""
    n = batch.t.shape[0]
    std_all = ddim_std(model.scheduler, batch.t.cpu(), batch.eta, n, torch.device("cpu"))
    keep = std_all >= cfg.min_std
    b = batch_to(batch, model.alphas_cumprod.device)
    idx = torch.nonzero(keep).flatten().to(b.t.device)
    lr_w = torch.zeros(n, device=b.t.device)
    lr_l = torch.zeros(n, device=b.t.device)
    if idx.numel() > 0:
        (w, lo), _ = step_log_ratios(
            model,
            b.x_t[idx],
            b.t[idx],
            b.cond[idx],
            b.uncond[idx],
            [b.x_w[idx], b.x_l[idx]],
            eta=b.eta,
            guidance_scale=b.guidance_scale,
        )
        lr_w = lr_w.index_copy(0, idx, w.float())
        lr_l = lr_l.index_copy(0, idx, lo.float())
    return TailorPOForward(lr_w, lr_l, keep.to(b.t.device), std_all.float().to(b.t.device))


def tailorpo_loss(
    logp_w: Tensor,
    logp_l: Tensor,
    ref_logp_w: Tensor,
    ref_logp_l: Tensor,
    *,
    beta: float,
    keep: Tensor | None = None,
    ratio_clip_eps: float | None = None,
) -> LossOutput:
    """-log sigmoid(beta * ((logp_w - ref_logp_w) - (logp_l - ref_logp_l))), mean over pairs [P].

    Inputs are per-pair transition log-probs (or pass the stable log-ratios as logp_* with zero refs). `keep`
    [P] bool: excluded rows get logit 0 (loss ln 2, no gradient). ratio_clip_eps clamps each log-ratio to
    [log(1-eps), log(1+eps)] (D3PO/SPO).
    """
    lr_w = logp_w - ref_logp_w
    lr_l = logp_l - ref_logp_l
    if ratio_clip_eps is not None:
        lo, hi = math.log1p(-ratio_clip_eps), math.log1p(ratio_clip_eps)
        lr_w, lr_l = lr_w.clamp(lo, hi), lr_l.clamp(lo, hi)
    logits = lr_w - lr_l
    if keep is not None:
        logits = torch.where(keep, logits, torch.zeros_like(logits))
    out = logistic_preference_loss(logits, beta)
    k = (torch.ones_like(logits, dtype=torch.bool) if keep is None else keep).float()
    nk = k.sum().clamp(min=1.0)
    acc = ((logits > 0).float() + 0.5 * (logits == 0).float()) * k
    z = (beta * logits).detach()
    out.metrics.update(
        {
            "pref/implicit_acc": (acc.sum() / nk).detach(),  # over kept rows only
            "tailorpo/lr_w": ((lr_w * k).sum() / nk).detach(),
            "tailorpo/lr_l": ((lr_l * k).sum() / nk).detach(),
            "tailorpo/sigmoid_z": ((torch.sigmoid(z) * k).sum() / nk).detach(),
            "tailorpo/kept_frac": k.mean().detach(),
        }
    )
    return out


def loss(fwd: TailorPOForward, cfg: TailorPOCfg) -> LossOutput:
    zero = torch.zeros_like(fwd.lr_w)
    return tailorpo_loss(
        fwd.lr_w, fwd.lr_l, zero, zero, beta=cfg.beta, keep=fwd.keep, ratio_clip_eps=cfg.ratio_clip_eps
    )
