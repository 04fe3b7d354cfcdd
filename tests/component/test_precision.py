"""Mixed precision on the tiny digits model: bf16/fp16 base weights, float32 LoRA + AdamW state, autocast forward.

The failure this guards against: with the adapter in the base layer's bf16, AdamW steps of lr ~1e-5 are smaller
than bf16's spacing near the LoRA A values (~0.1 -> spacing 2^-10 ~ 1e-3) and round away, so the run "trains"
with weights that never move. Also: float16 gets a GradScaler, gradient checkpointing changes nothing but memory,
and a step with a non-finite gradient leaves the LoRA untouched.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Any

import pytest
import torch
from component.test_learner import scored_rollouts, setup_run

from rlalign.learner import Learner
from rlalign.models.loading import load_parts, resolve_model_dir


def learner_for(overrides: list[str], algo: str, dtype: str, *extra: str) -> tuple[Learner, Any, Any]:
    cfg, sampler_parts = setup_run(overrides, algo, f"learner.dtype={dtype}", *extra)
    model = replace(cfg.model, path=str(resolve_model_dir(cfg.model, progress=False)))
    make = functools.partial(load_parts, model, cfg.lora, cfg.sampler.num_steps, dtype=dtype, role="learner")
    return Learner(cfg, make), cfg, sampler_parts


def lora_vector(learner: Learner) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in learner.params])


def test_learner_loads_unet_only_and_keeps_lora_fp32(tiny_overrides: list[str]) -> None:
    learner, _, _ = learner_for(tiny_overrides, "diffusion_dpo", "bfloat16")
    parts = learner.parts
    assert parts.vae is None and parts.text_encoder is None  # rollouts carry latents and embeddings
    assert parts.unet.conv_in.weight.dtype == torch.bfloat16
    assert learner.params and all(p.dtype == torch.float32 for p in learner.params)
    assert learner.info()["lora_dtype"] == "float32" and learner.info()["dtype"] == "bfloat16"


def train_both(overrides: list[str], lr: str, updates: int) -> dict[str, tuple[torch.Tensor, list[float]]]:
    """The same scored batch, `updates` Diffusion-DPO updates, in a float32 and a bf16 learner: (dW, losses)."""
    runs: dict[str, tuple[torch.Tensor, list[float]]] = {}
    scored = None
    for dtype in ("float32", "bfloat16"):
        learner, cfg, sampler_parts = learner_for(overrides, "diffusion_dpo", dtype, f"learner.lr={lr}")
        scored = scored if scored is not None else scored_rollouts(cfg, sampler_parts)
        start = lora_vector(learner)
        losses = [learner.update(scored)["loss/total"] for _ in range(updates)]
        runs[dtype] = (lora_vector(learner) - start, losses)
    return runs


def test_bf16_small_lr_updates_move_the_lora_like_fp32(tiny_overrides: list[str], capsys: Any) -> None:
    """lr 1e-5 (an SD-scale rate): bf16 base + fp32 LoRA moves the weights as the fp32 run does."""
    runs = train_both(tiny_overrides, "1e-5", 4)
    d32, (d16, l16) = runs["float32"][0], runs["bfloat16"]
    cosine = float(torch.nn.functional.cosine_similarity(d32, d16, dim=0))
    with capsys.disabled():
        print(f"\n[precision] lr 1e-5 x4: |dW| fp32 {d32.norm():.3e}, bf16 {d16.norm():.3e}, cosine {cosine:.3f}")
    assert d16.norm() > 0.5 * d32.norm() > 0  # the bf16 run's updates did not round away
    assert cosine > 0.9
    assert abs(l16[0] - math.log(2)) < 1e-6  # fresh LoRA: policy == reference in bf16 too


def test_bf16_loss_follows_the_fp32_run(tiny_overrides: list[str], capsys: Any) -> None:
    """Once the LoRA has moved past bf16 rounding (lr 1e-3), the bf16 loss falls as the fp32 one does.

    At lr 1e-5 the bf16 *loss reading* is dominated by rounding of the policy/reference outputs times beta
    (docs/precision.md), while its gradient direction already agrees (previous test).
    """
    runs = train_both(tiny_overrides, "1e-3", 4)
    (d32, l32), (d16, l16) = runs["float32"], runs["bfloat16"]
    with capsys.disabled():
        print(
            f"\n[precision] lr 1e-3 x4: |dW| fp32 {d32.norm():.3e}, bf16 {d16.norm():.3e}; "
            f"loss fp32 {' '.join(f'{x:.4f}' for x in l32)}, bf16 {' '.join(f'{x:.4f}' for x in l16)}"
        )
    assert l32[-1] < l32[0] and l16[-1] < l16[0]
    assert float(torch.nn.functional.cosine_similarity(d32, d16, dim=0)) > 0.9


def test_float16_trains_with_a_grad_scaler(tiny_overrides: list[str]) -> None:
    """fp16: the scaler skips overflowing steps (halving the scale) and then trains.

    The learner's own scaler starts at 2^16; whether the tiny model's gradients overflow at 2^16 depends on the batch
    (CI saw none in 24 updates), so the test swaps in one that starts at 2^28, which overflows float16 for certain.
    """
    learner, cfg, sampler_parts = learner_for(tiny_overrides, "diffusion_dpo", "float16", "learner.lr=1e-3")
    assert learner.scaler.is_enabled() and learner.scaler.get_scale() == 2.0**16
    learner.scaler = torch.amp.GradScaler(learner.parts.device.type, init_scale=2.0**28)
    initial = learner.scaler.get_scale()
    scored = scored_rollouts(cfg, sampler_parts)
    start = lora_vector(learner)
    metrics = [learner.update(scored) for _ in range(24)]
    applied = sum(1 - m["learner/skipped_steps"] for m in metrics)
    skipped = sum(m["learner/skipped_steps"] for m in metrics)
    assert skipped >= 1 and applied >= 1 and metrics[-1]["learner/grad_scale"] < initial
    assert (lora_vector(learner) - start).norm() > 0
    assert torch.isfinite(lora_vector(learner)).all()


def test_gradient_checkpointing_gives_the_same_update(tiny_overrides: list[str]) -> None:
    deltas = []
    scored = None
    for flag in ("false", "true"):
        learner, cfg, sampler_parts = learner_for(
            tiny_overrides, "tailorpo", "float32", f"learner.gradient_checkpointing={flag}"
        )
        assert learner.parts.unet.is_gradient_checkpointing == (flag == "true")
        scored = scored if scored is not None else scored_rollouts(cfg, sampler_parts)
        start = lora_vector(learner)
        learner.update(scored)
        deltas.append(lora_vector(learner) - start)
    torch.testing.assert_close(deltas[1], deltas[0], rtol=1e-4, atol=1e-7)


def test_non_finite_gradient_skips_the_step(tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    learner, cfg, sampler_parts = learner_for(tiny_overrides, "ddpo", "float32")
    scored = scored_rollouts(cfg, sampler_parts)
    start = lora_vector(learner)
    real_loss = learner.algo.loss

    def nan_loss(fwd: Any, algo_cfg: Any) -> Any:
        out = real_loss(fwd, algo_cfg)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(learner, "algo", learner.algo._replace(loss=nan_loss))
    metrics = learner.update(scored)
    assert metrics["learner/skipped_steps"] == 1.0
    torch.testing.assert_close(lora_vector(learner), start, rtol=0, atol=0)  # no NaN written into the LoRA
    monkeypatch.setattr(learner, "algo", learner.algo._replace(loss=real_loss))
    assert learner.update(scored)["learner/skipped_steps"] == 0.0
    assert torch.isfinite(lora_vector(learner)).all() and not torch.equal(lora_vector(learner), start)
