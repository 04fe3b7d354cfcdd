"""Model directory checks and `load_parts` on the tiny digits model (local files only, fresh LoRA)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlalign.config import LoraCfg, ModelCfg
from rlalign.models.loading import (
    PIPELINE_FOLDERS,
    DiffusionParts,
    ModelDirError,
    check_pipeline_dir,
    load_parts,
    resolve_model_dir,
    to_uint8,
)


def tiny_parts(model_dir: Path, *, lora: bool = True, rank: int = 4) -> DiffusionParts:
    model = ModelCfg(path=str(model_dir), device="cpu")
    return load_parts(model, replace(LoraCfg(), rank=rank, alpha=float(rank)), 4, lora=lora)


def test_missing_model_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelDirError, match=r"model directory .*no-such-model does not exist") as info:
        check_pipeline_dir(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert "rlalign never downloads" in str(info.value)
    with pytest.raises(ModelDirError, match="does not exist"):
        resolve_model_dir(ModelCfg(kind="sd15", path=str(missing)))


@pytest.mark.parametrize("absent", ["scheduler", "vae", "unet"])
def test_incomplete_model_dir_names_the_missing_folder(tmp_path: Path, absent: str) -> None:
    for folder in PIPELINE_FOLDERS:
        if folder != absent:
            (tmp_path / folder).mkdir()
    with pytest.raises(ModelDirError, match=rf"incomplete: missing folder\(s\) {absent} \("):
        check_pipeline_dir(tmp_path)


def test_model_dir_lists_every_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelDirError, match=r"missing folder\(s\) vae, text_encoder, tokenizer, scheduler \("):
        check_pipeline_dir(tmp_path)


def test_sd15_without_path_is_a_clear_error() -> None:
    with pytest.raises(ModelDirError, match=r"model\.kind=sd15 needs model\.path"):
        resolve_model_dir(ModelCfg(kind="sd15"))


def test_tiny_model_dir_is_complete(tiny_digits_dir: Path) -> None:
    check_pipeline_dir(tiny_digits_dir)
    assert resolve_model_dir(ModelCfg(path=str(tiny_digits_dir))) == tiny_digits_dir


def test_load_parts_fresh_lora_and_frozen_base(tiny_digits_dir: Path) -> None:
    parts = tiny_parts(tiny_digits_dir)
    assert parts.device.type == "cpu" and parts.dtype == torch.float32 and parts.model_dir == tiny_digits_dir
    lora = {n: p for n, p in parts.unet.named_parameters() if "lora_" in n}
    assert lora, "no LoRA adapter attached"
    b_mats = {n: p for n, p in lora.items() if "lora_B" in n}
    a_mats = {n: p for n, p in lora.items() if "lora_A" in n}
    assert len(b_mats) == len(a_mats) > 0
    assert all(not p.any() for p in b_mats.values()), "LoRA B must start at zero (policy == reference)"
    assert all(p.abs().sum() > 0 for p in a_mats.values())
    assert all(p.shape[0] == 4 for p in a_mats.values()), "rank from lora.rank"
    # only LoRA is trainable; base U-Net, VAE and text encoder are frozen
    assert all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for n, p in parts.unet.named_parameters() if "lora_" not in n)
    assert not any(p.requires_grad for p in parts.vae.parameters())
    assert not any(p.requires_grad for p in parts.text_encoder.parameters())
    # LoRA A is seeded: two loads agree, so version 0 is the same in every process
    again = tiny_parts(tiny_digits_dir)
    for (n, p), (m, q) in zip(lora.items(), ((m, q) for m, q in again.unet.named_parameters() if "lora_" in m)):
        assert n == m and torch.equal(p, q)
    # the scheduler is set to the sampling grid
    assert len(parts.scheduler.timesteps) == 4


def test_load_parts_without_lora(tiny_digits_dir: Path) -> None:
    parts = tiny_parts(tiny_digits_dir, lora=False)
    assert not any("lora_" in n for n, _ in parts.unet.named_parameters())


def test_encode_prompts_shape(tiny_digits_dir: Path) -> None:
    parts = tiny_parts(tiny_digits_dir)
    emb = parts.encode_prompts(["a handwritten digit 3", "seven", ""])
    length, width = parts.tokenizer.model_max_length, parts.text_encoder.config.hidden_size
    assert emb.shape == (3, length, width) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    assert not torch.equal(emb[0], emb[1])
    torch.testing.assert_close(parts.encode_prompts(["seven"])[0], emb[1], rtol=0, atol=1e-5)


def test_decode_range_and_shape(tiny_digits_dir: Path) -> None:
    parts = tiny_parts(tiny_digits_dir)
    c, h, w = parts.latent_shape
    assert c == parts.unet.config.in_channels
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((3, c, h, w), generator=g) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1, 1)
    with torch.no_grad():
        img = parts.decode(latents)
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    assert img.shape == (3, 3, h * factor, w * factor)
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert img[0].std() > 0, "a decoded random latent should not be flat"
    u8 = to_uint8(img)
    assert u8.shape == (3, h * factor, w * factor, 3) and u8.dtype.name == "uint8"
    # decode is differentiable (TailorPO-G chains the reward gradient through it)
    x = latents[:1].clone().requires_grad_(True)
    parts.decode(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_scheduler_with_clipping_is_refused(tiny_digits_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for folder in PIPELINE_FOLDERS:
        if folder != "scheduler":
            (model_dir / folder).symlink_to(tiny_digits_dir / folder)
    shutil.copytree(tiny_digits_dir / "scheduler", model_dir / "scheduler")
    cfg_path = model_dir / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["clip_sample"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="clip_sample=True"):
        tiny_parts(model_dir)


# ---------------------------------------------------------------------------------------------------------------
# layouts, devices, speed switches (issue: real SD on GPUs)
# ---------------------------------------------------------------------------------------------------------------


def test_layouts_are_detected_and_a_wrong_kind_is_named(tiny_sd15_dir: Path, tiny_sdxl_dir: Path) -> None:
    assert check_pipeline_dir(tiny_sd15_dir) == "sd15" and check_pipeline_dir(tiny_sdxl_dir) == "sdxl"
    with pytest.raises(ModelDirError, match=r"model.kind=sd15 but .* holds an sdxl pipeline: set model.kind=sdxl"):
        check_pipeline_dir(tiny_sdxl_dir, "sd15")


def test_sdxl_dir_without_second_encoder_names_it(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_dir, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ModelDirError, match=r"missing folder\(s\) tokenizer_2 \(a StableDiffusionXLPipeline"):
        check_pipeline_dir(broken)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA visible the error path cannot happen")
def test_actor_given_a_gpu_it_cannot_see_says_so() -> None:
    from rlalign.actors import reward_device
    from rlalign.config import RewardSpec
    from rlalign.models.loading import resolve_device

    with pytest.raises(RuntimeError, match=r"asked for CUDA .*num_gpus=1.*torch.cuda.is_available\(\) is False"):
        resolve_device(ModelCfg(), num_gpus=1)
    assert resolve_device(ModelCfg(), num_gpus=0).type == "cpu"
    with pytest.raises(RuntimeError, match=r"reward 'digit_prompt' needs a GPU \(num_gpus=0.5"):
        reward_device(RewardSpec(name="digit_prompt", num_gpus=0.5))
    assert reward_device(RewardSpec(name="digit_prompt")) == "cpu"


def test_speed_switches_reach_the_modules(tiny_digits_dir: Path) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    model = ModelCfg(path=str(tiny_digits_dir), attention="eager", vae_slicing=True, vae_tiling=True)
    parts = load_parts(model, replace(LoraCfg(), rank=2, alpha=2.0), 4)
    assert all(isinstance(p, AttnProcessor) for p in parts.unet.attn_processors.values())
    assert parts.vae.use_slicing and parts.vae.use_tiling
    sdpa = load_parts(ModelCfg(path=str(tiny_digits_dir)), replace(LoraCfg(), rank=2, alpha=2.0), 4)
    assert all(isinstance(p, AttnProcessor2_0) for p in sdpa.unet.attn_processors.values())
    learner = load_parts(ModelCfg(path=str(tiny_digits_dir)), LoraCfg(rank=2, alpha=2.0), 4, role="learner")
    assert learner.vae is None and learner.text_encoder is None and learner.tokenizer is None
