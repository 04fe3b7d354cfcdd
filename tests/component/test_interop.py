"""Plain diffusers + the exported LoRA renders the images rlalign's sampler renders (same prompts, seeds, LoRA).

This is the whole path a user takes with a checkpoint: export, `load_lora_weights`, stock pipeline call with DDIM
eta and per-image generators. Images must agree to a couple of uint8 levels (float rounding through the VAE).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_lora

from rlalign.config import LoraCfg, ModelCfg, RunCfg, SamplerCfg
from rlalign.interop import load_pipeline_with_lora, render_with_diffusers
from rlalign.learner import Learner
from rlalign.models.loading import load_parts
from rlalign.sampling.sampler import Sampler
from rlalign.types import PromptBatch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@pytest.mark.parametrize("layout", ["digits", "sdxl"])
def test_stock_pipeline_with_exported_lora_renders_our_images(
    layout: str, tiny_digits_dir: Path, tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    model_dir = tiny_digits_dir if layout == "digits" else tiny_sdxl_dir
    lora = LoraCfg(rank=4, alpha=8.0, target_modules=TARGETS)
    model = ModelCfg(path=str(model_dir))
    learner = Learner(replace(RunCfg(), lora=lora, model=model), functools.partial(load_parts, model, lora, 6))
    randomize_lora(learner.model, scale=0.1, seed=2)
    learner.save(tmp_path / "ckpt")

    sampler_cfg = SamplerCfg(num_steps=6, eta=1.0, guidance_scale=3.0)
    sampler = Sampler(sampler_cfg, functools.partial(load_parts, model, lora, 6))
    sampler.load_weights(learner.export_weights())
    batch = PromptBatch(["a photo of a 3", "a 7", "a 7"], torch.tensor([0, 1, 1]), torch.tensor([11, 12, 13]))
    ours = sampler.generate(batch, branch=False).images

    pipe = load_pipeline_with_lora(model_dir, tmp_path / "ckpt" / "diffusers_lora")
    theirs = render_with_diffusers(pipe, batch, num_steps=6, eta=1.0, guidance_scale=3.0)
    without = render_with_diffusers(
        load_pipeline_with_lora(model_dir, None), batch, num_steps=6, eta=1.0, guidance_scale=3.0
    )
    assert theirs.shape == ours.shape
    diff = np.abs(theirs.astype(int) - ours.astype(int))
    assert diff.max() <= 2, diff.max()
    assert np.abs(without.astype(int) - ours.astype(int)).max() > 10  # the LoRA matters for these images
