"""Shared pieces of every alignment algorithm: the loss record, the logistic preference loss, the model contract.

Pure maths: imports only torch (and numpy). The learner is the only caller that holds a real model; it passes it
in through the `DiffusionModel` protocol below, so every algorithm is testable with a tiny stand-in. The maths of
every algorithm, and the derivations the unit tests rely on: docs/algorithms.md.

The algorithm contract (one module per method, registered in `rlalign.algos.ALGORITHMS`):

    build_batch(scored: ScoredRollouts, cfg, generator: torch.Generator) -> Batch     # pure, CPU
    forward(model: DiffusionModel, batch: Batch, cfg) -> Forward                       # the only model calls
    loss(fwd: Forward, cfg) -> LossOutput                                               # pure

A Batch is a NamedTuple whose tensor fields all have the same leading dimension (training rows: pairs or
samples), so the learner can cut micro-batches with `slice_rows`; a loss is a mean over rows, so the
row-weighted mean of micro-batch losses equals the full-batch loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor


class LossOutput(NamedTuple):
    loss: Tensor  # scalar that backward() sees
    metrics: dict[str, Tensor]  # detached scalars; the learner reduces and logs


class DiffusionModel(Protocol):
    """What an algorithm may ask of the model. `adapters=False` is the frozen reference (LoRA disabled)."""

    scheduler: Any  # a diffusers DDIMScheduler with set_timesteps(T) already called (sampling grid); its
    # config.prediction_type (epsilon | v_prediction, `logprob.check_scheduler`) says what `predict` returns
    alphas_cumprod: Tensor  # [1000] float64 training schedule

    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor, *, adapters: bool = True) -> Tensor:
        """U-Net output at (x_t, t, cond): eps or v per scheduler.config.prediction_type. x_t [B,C,h,w], t [B] or [],
        cond [B,L,D] -> [B,C,h,w] float32. Losses convert it with `logprob.predicted_eps` / `denoising_target`.
        """
        ...

    def embed(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Frozen base U-Net's noise-conditioned features (NCP); gradients flow to `x`, never to weights."""
        ...


def logistic_preference_loss(logits: Tensor, beta: float) -> LossOutput:
    """-log sigmoid(beta * logits), mean over pairs.

    logits [P] > 0: the policy favours the winner more than the reference does. With policy == reference
    the logits are 0 and the loss is exactly ln 2 (docs/algorithms.md sections 3-4).
    """
    acc = (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean()
    return LossOutput(
        -F.logsigmoid(beta * logits).mean(),
        {
            "pref/logit_mean": logits.detach().mean(),
            "pref/logit_abs_mean": logits.detach().abs().mean(),
            "pref/implicit_acc": acc.detach(),
        },
    )


B = TypeVar("B", bound=tuple[Any, ...])


def num_rows(batch: tuple[Any, ...]) -> int:
    """Leading dimension shared by the batch's tensor fields."""
    for value in batch:
        if isinstance(value, Tensor) and value.ndim > 0:
            return int(value.shape[0])
        if isinstance(value, list):
            return len(value)
    raise ValueError(f"{type(batch).__name__} has no per-row field")


def slice_rows(batch: B, start: int, stop: int) -> B:
    """Rows [start, stop) of every per-row field (tensors with a leading dim, lists); other fields kept."""
    n = num_rows(batch)
    out = [
        value[start:stop]
        if (isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n) or isinstance(value, list)
        else value
        for value in batch
    ]
    return type(batch)(*out)


class Algorithm(NamedTuple):
    """One registered method; see the module docstring for the contract."""

    name: str
    cfg_key: str  # the RunCfg section this method reads (several names may share one, e.g. "ncp")
    build_batch: Callable[..., Any]
    forward: Callable[..., Any]
    loss: Callable[..., LossOutput]
    needs_step_pairs: bool = False  # sampler must branch (TailorPO family)
    needs_gradient_guidance: bool = False  # sampler must move the winner along the reward gradient
    is_preference: bool = True  # logistic preference loss: exactly ln 2 at step 0
    # trains on (winner, loser) final latents and their prompts only, so it can train on offline preference pairs
    # (data.preferences, rlalign/offline/); the TailorPO family needs branched steps and DDPO its own log-probs
    offline_pairs: bool = False


def guided_eps(
    model: DiffusionModel,
    x_t: Tensor,
    t: Tensor,
    cond: Tensor,
    uncond: Tensor,
    guidance_scale: float,
    *,
    adapters: bool = True,
) -> Tensor:
    """Classifier-free guided model output (eps or v: guidance is linear, so either works), one call on 2B rows.

    x_t [B,C,h,w], t [B] or [], cond [B,L,D], uncond [1,L,D] or [B,L,D]. guidance_scale 1 skips the
    unconditional half (the guided and conditional predictions coincide).
    """
    if guidance_scale == 1.0:
        return model.predict(x_t, t, cond, adapters=adapters)
    b = x_t.shape[0]
    t2 = t.repeat(2) if t.ndim == 1 else t
    both = model.predict(torch.cat([x_t, x_t]), t2, torch.cat([uncond.expand(b, -1, -1), cond]), adapters=adapters)
    e_u, e_c = both.chunk(2)
    return e_u + guidance_scale * (e_c - e_u)


def batch_to(batch: B, device: torch.device | str) -> B:
    """Every tensor field of a Batch NamedTuple moved to `device` (no-op for tensors already there)."""
    return type(batch)(*(v.to(device) if isinstance(v, Tensor) else v for v in batch))


def model_device(model: DiffusionModel) -> torch.device:
    """Where the model's schedule lives; algorithms move their batch there before calling the model."""
    return model.alphas_cumprod.device


def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """mean((a - b)^2) over non-batch dims, in fp32: [N,C,h,w] x2 -> [N] (Diffusion-DPO's denoising error)."""
    return ((a.float() - b.float()) ** 2).mean(dim=tuple(range(1, a.ndim)))
