"""NCP: preference optimisation in the U-Net's noise-conditioned embedding space (Gambashidze et al., arXiv
2406.17636; docs/algorithms/ncp.md). NCP-DPO, NCP-CPO and NCP-SFT share `build_batch` and the forward maths.

Per pair: shared t, eps, z (winner/loser and policy/reference/target). x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps;
target mode "prev" (default, docs/algorithms/ncp.md 1.1): one DDPM step t -> t-1 with the policy's, the reference's
and the true
noise, x_pol / x_ref / x_tgt; the frozen base U-Net's mid-block features E(., t-1, c) (`model.embed`) compare them:

    d(x) = mean((E(x) - E(x_tgt))^2)                                       [2P] (fp32)
    NCP-DPO: L = -mean log sigmoid(beta ((d_ref_w - d_ref_l) - (d_pol_w - d_pol_l)))
    NCP-CPO: L = -mean log sigmoid(-beta (d_pol_w - d_pol_l)) + lambda * beta * mean(d_pol_w)
    NCP-SFT: L = mean(d_pol_w)                                    (losers and the reference never computed)

E runs on the target, reference and policy rows in three same-sized calls (not one stacked no-grad call as
docs/algorithms/ncp.md suggests), so a fresh LoRA gives f_ref == f_pol bit-for-bit and the loss is exactly ln 2.
Choices (docs/algorithms/ncp.md, unconfirmed): t in [1, 999]; layer mid; target_mode prev; CPO's NLL weight lambda =
10 (the
authors' code has 0); beta multiplies the logits directly (as diffusion_dpo). Feature maps are compared in fp32.
v_prediction: every U-Net output is first converted to eps_hat (`logprob.predicted_eps`), so the DDPM step, x0_hat
and the re-noising below see a noise prediction whatever the model's parameterisation.
Shapes: P pairs, C/h/w latents, F feature maps [n, C_f, h_f, w_f]. Imports only torch and rlalign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rlalign.algos.common import DiffusionModel, LossOutput, batch_to, logistic_preference_loss, model_device
from rlalign.algos.diffusion_dpo import pair_final_latents
from rlalign.sampling.logprob import add_noise, ddpm_step, predicted_eps
from rlalign.types import ScoredRollouts

TARGET_MODES = ("prev", "x0", "uniform")
FEATURE_NORMS = ("none", "channel_rms")


@dataclass
class NCPCfg:
    # logit scale (authors' scripts: 2500), applied to feature-distance differences
    beta: float = 2500.0
    # NCP-CPO NLL weight lambda (loss adds lambda * beta * mean d_pol_w); 0 reproduces the authors' code
    cpo_nll_weight: float = 10.0
    # prev (one DDPM step to t-1) | x0 (compare x0_hat with x0 at s=0) | uniform (re-noise both at a fresh s)
    target_mode: str = "prev"
    # features: "mid" = mid_block output, "down" = its input; the learner passes it to UNetDenoiser(layer=...)
    layer: str = "mid"
    # none | channel_rms (divide both maps by the detached target's per-channel RMS)
    feature_norm: str = "none"
    # training timesteps t ~ U[t_min, t_max] (inclusive); t = 0 gives no signal in prev mode
    t_min: int = 1
    t_max: int = 999
    # a group gives a pair only when best - worst score > this
    min_reward_gap: float = 0.0

    def __post_init__(self) -> None:
        if self.target_mode not in TARGET_MODES:
            raise ValueError(f"ncp.target_mode must be one of {TARGET_MODES}, got {self.target_mode!r}")
        if self.layer not in ("mid", "down"):
            raise ValueError(f"ncp.layer must be mid or down, got {self.layer!r}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"ncp.feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        low = 1 if self.target_mode == "prev" else 0
        if not low <= self.t_min <= self.t_max <= 999:
            raise ValueError(f"ncp: need {low} <= t_min <= t_max <= 999, got {self.t_min}, {self.t_max}")


class NCPBatch(NamedTuple):
    x0_w: Tensor  # [P,C,h,w]
    x0_l: Tensor  # [P,C,h,w]
    cond_w: Tensor  # [P,L,D]
    cond_l: Tensor  # [P,L,D]
    t: Tensor  # [P] int64 shared in a pair
    eps: Tensor  # [P,C,h,w] forward noise, shared
    z: Tensor  # [P,C,h,w] DDPM step noise, shared
    s_uniform: Tensor  # [P] int64 embedding timestep for target_mode "uniform"


class NCPForward(NamedTuple):
    d_pol_w: Tensor  # [P] policy feature distance (grad)
    d_pol_l: Tensor | None  # [P] (None for SFT)
    d_ref_w: Tensor | None  # [P] reference, no grad (DPO only)
    d_ref_l: Tensor | None
    t: Tensor  # [P] (logging)


def build_batch(scored: ScoredRollouts, cfg: NCPCfg, generator: torch.Generator) -> NCPBatch:
    """Pure: best vs worst per group; shared t in [t_min, t_max], eps, z per pair (docs/algorithms/ncp.md 6)."""
    x0_w, x0_l, cond_w, cond_l = pair_final_latents(scored, cfg.min_reward_gap)
    p = x0_w.shape[0]
    t = torch.randint(cfg.t_min, cfg.t_max + 1, (p,), generator=generator)
    eps = torch.randn(x0_w.shape, generator=generator, dtype=torch.float32)
    z = torch.randn(x0_w.shape, generator=generator, dtype=torch.float32)
    s_uniform = torch.randint(0, 1000, (p,), generator=generator)
    return NCPBatch(x0_w, x0_l, cond_w, cond_l, t, eps, z, s_uniform)


def feature_distance(f: Tensor, f_tgt: Tensor, norm: str = "none") -> Tensor:
    """mean((f - f_tgt)^2) over non-batch dims in fp32 -> [n]; channel_rms divides by the target's RMS."""
    f, f_tgt = f.float(), f_tgt.detach().float()
    if norm == "channel_rms":
        rms = f_tgt.pow(2).mean(dim=tuple(range(2, f_tgt.ndim)), keepdim=True).sqrt().clamp(min=1e-6)
        f, f_tgt = f / rms, f_tgt / rms
    return ((f - f_tgt) ** 2).mean(dim=tuple(range(1, f.ndim)))


def _pred_and_target(
    ac: Tensor, mode: str, x_t: Tensor, x0: Tensor, t: Tensor, eps: Tensor, z: Tensor, s_uni: Tensor
) -> tuple[Tensor, Tensor]:
    """(embedding timestep s [n], target latent [n,C,h,w]) for the chosen target mode."""
    if mode == "prev":
        return t - 1, ddpm_step(ac, eps, t, x_t, z)
    if mode == "x0":
        return torch.zeros_like(t), x0.float()
    return s_uni, add_noise(ac, x0, eps, s_uni)


def _predicted(ac: Tensor, mode: str, e: Tensor, x_t: Tensor, t: Tensor, z: Tensor, s_uni: Tensor) -> Tensor:
    """The latent E sees for a noise prediction `e`, eps_hat not v (prev: DDPM step; x0: x0_hat; uniform: re-noised)."""
    if mode == "prev":
        return ddpm_step(ac, e, t, x_t, z)
    abar = ac[t].view(-1, 1, 1, 1)
    x0_hat = ((x_t.double() - (1 - abar).sqrt() * e.double()) / abar.sqrt()).float()
    if mode == "x0":
        return x0_hat
    return add_noise(ac, x0_hat, e, s_uni)


def ncp_forward(model: DiffusionModel, batch: NCPBatch, cfg: NCPCfg, *, need_ref: bool, need_loser: bool) -> NCPForward:
    """Policy forward (grad), optional reference forward, target + reference embeddings in one no-grad call."""
    b = batch_to(batch, model_device(model))
    ac = model.alphas_cumprod
    rows = 2 if need_loser else 1
    x0 = (torch.cat([b.x0_w, b.x0_l]) if need_loser else b.x0_w).float()
    cond = torch.cat([b.cond_w, b.cond_l]) if need_loser else b.cond_w
    t, eps, z, s_uni = (v.repeat(rows, *([1] * (v.ndim - 1))) for v in (b.t, b.eps, b.z, b.s_uniform))
    x_t = add_noise(ac, x0, eps, t)
    s, x_tgt = _pred_and_target(ac, cfg.target_mode, x_t, x0, t, eps, z, s_uni)
    e_pol = predicted_eps(model.scheduler, model.predict(x_t, t, cond, adapters=True), t, x_t)
    x_pol = _predicted(ac, cfg.target_mode, e_pol, x_t, t, z, s_uni)
    with torch.no_grad():
        f_tgt = model.embed(x_tgt, s, cond)
        f_ref = None
        if need_ref:  # a separate E call of the policy's batch size: at init f_ref == f_pol bit-for-bit (ln 2)
            e_ref = predicted_eps(model.scheduler, model.predict(x_t, t, cond, adapters=False), t, x_t)
            f_ref = model.embed(_predicted(ac, cfg.target_mode, e_ref, x_t, t, z, s_uni), s, cond)
    d_pol = feature_distance(model.embed(x_pol, s, cond), f_tgt, cfg.feature_norm)
    d_ref = feature_distance(f_ref, f_tgt, cfg.feature_norm) if f_ref is not None else None
    if not need_loser:
        return NCPForward(d_pol, None, None, None, b.t)
    d_pol_w, d_pol_l = d_pol.chunk(2)
    if d_ref is None:
        return NCPForward(d_pol_w, d_pol_l, None, None, b.t)
    d_ref_w, d_ref_l = d_ref.chunk(2)
    return NCPForward(d_pol_w, d_pol_l, d_ref_w, d_ref_l, b.t)


def forward_dpo(model: DiffusionModel, batch: NCPBatch, cfg: NCPCfg) -> NCPForward:
    return ncp_forward(model, batch, cfg, need_ref=True, need_loser=True)


def forward_cpo(model: DiffusionModel, batch: NCPBatch, cfg: NCPCfg) -> NCPForward:
    return ncp_forward(model, batch, cfg, need_ref=False, need_loser=True)


def forward_sft(model: DiffusionModel, batch: NCPBatch, cfg: NCPCfg) -> NCPForward:
    return ncp_forward(model, batch, cfg, need_ref=False, need_loser=False)


def ncp_dpo_loss(d_pol_w: Tensor, d_pol_l: Tensor, d_ref_w: Tensor, d_ref_l: Tensor, *, beta: float) -> LossOutput:
    """NCP-DPO (docs/algorithms/ncp.md 2.1): logits = (d_ref_w - d_ref_l) - (d_pol_w - d_pol_l), all [P]."""
    out = logistic_preference_loss((d_ref_w - d_ref_l) - (d_pol_w - d_pol_l), beta)
    out.metrics.update(
        {
            "ncp/d_pol_w": d_pol_w.detach().mean(),
            "ncp/d_pol_l": d_pol_l.detach().mean(),
            "ncp/d_ref_w": d_ref_w.detach().mean(),
            "ncp/d_ref_l": d_ref_l.detach().mean(),
        }
    )
    return out


def ncp_cpo_loss(d_pol_w: Tensor, d_pol_l: Tensor, *, beta: float, nll_weight: float) -> LossOutput:
    """NCP-CPO (docs/algorithms/ncp.md 2.2): reference-free -log sigmoid(beta (d_l - d_w)) + nll_weight * beta * d_w,
    mean [P]."""
    logits = d_pol_l - d_pol_w
    pref = -F.logsigmoid(beta * logits).mean()
    nll = d_pol_w.mean()
    acc = (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean()
    return LossOutput(
        pref + nll_weight * beta * nll,
        {
            "loss/pref": pref.detach(),
            "loss/nll": nll.detach(),
            "pref/implicit_acc": acc.detach(),
            "pref/logit_mean": logits.detach().mean(),
            "ncp/d_pol_w": d_pol_w.detach().mean(),
            "ncp/d_pol_l": d_pol_l.detach().mean(),
        },
    )


def ncp_sft_loss(d_pol_w: Tensor) -> LossOutput:
    """NCP-SFT (docs/algorithms/ncp.md 2.3): mean perceptual denoising error on winners [P]."""
    return LossOutput(d_pol_w.mean(), {"ncp/d_pol_w": d_pol_w.detach().mean()})


def _t_metric(fwd: NCPForward) -> dict[str, Tensor]:
    return {"ncp/t_mean": fwd.t.detach().float().mean()}


def loss_dpo(fwd: NCPForward, cfg: NCPCfg) -> LossOutput:
    if fwd.d_pol_l is None or fwd.d_ref_w is None or fwd.d_ref_l is None:
        raise ValueError("ncp_dpo needs loser and reference distances (use forward_dpo)")
    out = ncp_dpo_loss(fwd.d_pol_w, fwd.d_pol_l, fwd.d_ref_w, fwd.d_ref_l, beta=cfg.beta)
    out.metrics.update(_t_metric(fwd))
    return out


def loss_cpo(fwd: NCPForward, cfg: NCPCfg) -> LossOutput:
    if fwd.d_pol_l is None:
        raise ValueError("ncp_cpo needs loser distances (use forward_cpo)")
    out = ncp_cpo_loss(fwd.d_pol_w, fwd.d_pol_l, beta=cfg.beta, nll_weight=cfg.cpo_nll_weight)
    out.metrics.update(_t_metric(fwd))
    return out


def loss_sft(fwd: NCPForward, cfg: NCPCfg) -> LossOutput:
    out = ncp_sft_loss(fwd.d_pol_w)
    out.metrics.update(_t_metric(fwd))
    return out
