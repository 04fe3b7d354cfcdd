"""A checkpoint outside rlalign: render prompts with plain diffusers and the exported LoRA.

`render_with_diffusers` loads the model directory as a stock `DiffusionPipeline`, calls `load_lora_weights` on a
checkpoint's `diffusers_lora/` and renders a `PromptBatch` with DDIM at the sampler's eta, steps and guidance,
drawing noise from one generator per image seeded by that image's seed. rlalign's sampler draws its noise the same
way (initial latent, then one draw per step, per image), so for the same LoRA the two render the same images up to
float rounding: tests/component/test_interop.py checks it, and benchmarks/diffusers_lora_eval.py scores a real
run's held-out set both ways.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlalign.types import PromptBatch


def load_pipeline_with_lora(model_dir: str | Path, lora_dir: str | Path | None, device: str = "cpu") -> Any:
    """Stock diffusers pipeline from a local directory (DDIM scheduler), with the exported LoRA loaded if given."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    raw = DDIMScheduler.load_config(Path(model_dir) / "scheduler", local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(raw, **({} if "clip_sample" in raw else {"clip_sample": False}))
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def render_with_diffusers(
    pipe: Any, batch: PromptBatch, *, num_steps: int, eta: float, guidance_scale: float, chunk: int = 64
) -> np.ndarray:
    """[B, H, W, 3] uint8 images of `batch` rendered by the stock pipeline (negative prompt: the pipeline's default)."""
    out = []
    for lo in range(0, len(batch), chunk):
        seeds = [int(s) for s in batch.seeds[lo : lo + chunk]]
        images = pipe(
            list(batch.prompts[lo : lo + chunk]),
            num_inference_steps=num_steps,
            eta=eta,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="np",
        ).images
        out.append((np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)
