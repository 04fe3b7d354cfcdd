"""The exported LoRA, loaded by plain diffusers, reproduces the learner's U-Net (SD1.5, SDXL and digits layouts).

Compares U-Net outputs, not files: `pipe.load_lora_weights(ckpt/diffusers_lora)` must put a LoRA on every adapted
module with the learner's alpha/rank scale (alpha != rank here), so the pipeline's U-Net output equals the
learner's to float tolerance while the LoRA's own effect is large.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize_lora

from rlalign.config import LoraCfg, ModelCfg, RunCfg
from rlalign.learner import Learner
from rlalign.models.conditioning import split_cond
from rlalign.models.denoiser import adapters_disabled
from rlalign.models.loading import load_parts

ALL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@pytest.fixture
def model_dirs(tiny_digits_dir: Path, tiny_sd15_dir: Path, tiny_sdxl_dir: Path) -> dict[str, Path]:
    return {"digits": tiny_digits_dir, "sd15": tiny_sd15_dir, "sdxl": tiny_sdxl_dir}


def make_learner(model_dir: Path, lora: LoraCfg) -> Learner:
    cfg = replace(RunCfg(), algo="diffusion_dpo", lora=lora)
    cfg.model = ModelCfg(path=str(model_dir))
    return Learner(cfg, functools.partial(load_parts, cfg.model, lora, 4, role="learner"))


def train_lora(learner: Learner, seed: int = 3) -> None:
    """Stand-in for training: every LoRA B gets a random value (the export must carry any values exactly)."""
    randomize_lora(learner.model, scale=0.2, seed=seed)


def unet_inputs(parts: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed (x_t, t, packed cond) for the parts' U-Net; SDXL cond carries pooled embeddings and time ids."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *parts.latent_shape), generator=g)
    t = torch.tensor([700, 50])
    sampler_parts = load_parts(ModelCfg(path=str(parts.model_dir)), LoraCfg(), 4, lora=False)
    cond = sampler_parts.encode_prompts(["a photo of a 3", "seven"])
    return x, t, cond


def diffusers_unet_out(pipe: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    hidden, added = split_cond(cond, pipe.unet.config)
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def lora_modules(unet: Any) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in unet.modules())


@pytest.mark.parametrize("layout", ["digits", "sd15", "sdxl"])
def test_plain_diffusers_reproduces_the_trained_unet(
    layout: str, model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffusers import DiffusionPipeline

    learner = make_learner(model_dirs[layout], LoraCfg(rank=4, alpha=8.0, target_modules=ALL_TARGETS))
    train_lora(learner)
    learner.save(tmp_path / "ckpt")
    x, t, cond = unet_inputs(learner.parts)
    with torch.no_grad():
        ours = learner.model.predict(x, t, cond)
        with adapters_disabled(learner.parts.unet):
            base = learner.model.predict(x, t, cond)

    pipe = DiffusionPipeline.from_pretrained(model_dirs[layout])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's "inconsistency ... additional target modules" is a partial load
        pipe.load_lora_weights(tmp_path / "ckpt" / "diffusers_lora")
    theirs = diffusers_unet_out(pipe, x, t, cond)

    effect = (ours - base).abs().max().item()
    diff = (ours - theirs).abs().max().item()
    with capsys.disabled():
        print(f"\n[export {layout}] max|diffusers - learner| = {diff:.2e}, LoRA effect max|policy - base| {effect:.3f}")
    assert lora_modules(pipe.unet) == lora_modules(learner.parts.unet) > 0
    assert effect > 0.05
    assert diff <= 1e-5


def test_alpha_scale_survives_export(tiny_sd15_dir: Path, tmp_path: Path) -> None:
    """The same B with alpha 8 vs 4 (rank 4) doubles the LoRA effect in the loaded pipeline too."""
    from diffusers import DiffusionPipeline

    effects = []
    for alpha in (4.0, 8.0):
        learner = make_learner(tiny_sd15_dir, LoraCfg(rank=4, alpha=alpha, target_modules=["to_q", "to_v"]))
        train_lora(learner)
        learner.save(tmp_path / f"a{alpha}")
        pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
        x, t, cond = unet_inputs(learner.parts)
        base = diffusers_unet_out(pipe, x, t, cond)
        pipe.load_lora_weights(tmp_path / f"a{alpha}" / "diffusers_lora")
        effects.append(diffusers_unet_out(pipe, x, t, cond) - base)
    ratio = (effects[1].norm() / effects[0].norm()).item()
    assert 1.8 < ratio < 2.2  # to first order the LoRA delta is linear in its scale


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_init_from_seeds_a_run_with_the_same_unet(layout: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """lora.init_from accepts a diffusers export (with another alpha: rescaled) and our peft file alike."""
    trained = make_learner(model_dirs[layout], LoraCfg(rank=4, alpha=8.0, target_modules=ALL_TARGETS))
    train_lora(trained)
    trained.save(tmp_path / "ckpt")
    x, t, cond = unet_inputs(trained.parts)
    with torch.no_grad():
        want = trained.model.predict(x, t, cond)
    for source in (tmp_path / "ckpt" / "diffusers_lora", tmp_path / "ckpt" / "adapter_model.safetensors"):
        seeded = make_learner(
            model_dirs[layout], LoraCfg(rank=4, alpha=2.0, target_modules=ALL_TARGETS, init_from=str(source))
        )
        with torch.no_grad():
            got = seeded.model.predict(x, t, cond)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert all(p.dtype == torch.float32 for p in seeded.params)


def test_init_from_with_another_rank_is_a_clear_error(tiny_sd15_dir: Path, tmp_path: Path) -> None:
    trained = make_learner(tiny_sd15_dir, LoraCfg(rank=4, alpha=4.0, target_modules=["to_q", "to_v"]))
    trained.save(tmp_path / "ckpt")
    bad = LoraCfg(rank=8, alpha=8.0, target_modules=["to_q", "to_v"], init_from=str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=r"lora.init_from=.* does not fit lora.rank=8"):
        make_learner(tiny_sd15_dir, bad)
