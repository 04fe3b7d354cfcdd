"""Load the diffusion parts a sampler or the learner needs, from a local directory only (never a hub).

`load_parts(model_cfg, lora_cfg, num_steps)` returns the U-Net with a fresh peft LoRA (B matrices zero, so the
policy equals the frozen reference until the first update), the VAE, text encoder, tokenizer and a DDIM scheduler
set to the sampling grid. `kind=digits` builds the embedded model on first use; `kind=sd15` reads a local
StableDiffusionPipeline directory and names the missing piece when it is incomplete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlalign.config import LoraCfg, ModelCfg

PIPELINE_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelDirError(FileNotFoundError):
    """A model directory is missing or incomplete; the message says what to put where."""


@dataclass
class DiffusionParts:
    unet: Any  # diffusers UNet2DConditionModel with a LoRA adapter named "default"
    vae: Any  # diffusers AutoencoderKL (frozen)
    text_encoder: Any  # transformers CLIPTextModel (frozen)
    tokenizer: Any
    scheduler: Any  # diffusers DDIMScheduler, set_timesteps(num_steps) done
    device: torch.device
    dtype: torch.dtype
    model_dir: Path

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), size, size)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """prompts [B] -> text embeddings [B, L, D] float32 on the parts' device."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return out.float()

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, C, h, w] -> images [B, 3, H, W] float in [0, 1] (differentiable; callers pick no_grad)."""
        img = self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample.float()
        return (img / 2 + 0.5).clamp(0, 1)


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [0, 1] -> [B, H, W, 3] uint8 (what reward servers receive)."""
    return (images.detach().permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)


def resolve_model_dir(model_cfg: ModelCfg, *, progress: bool = True) -> Path:
    """The local pipeline directory: the configured path, or the embedded digits model (built on first use)."""
    if model_cfg.path:
        path = Path(model_cfg.path).expanduser()
        check_pipeline_dir(path)
        return path
    if model_cfg.kind != "digits":
        raise ModelDirError(f"model.kind={model_cfg.kind} needs model.path: a local diffusers pipeline directory")
    from rlalign.models.digits import ensure_digits_model

    return Path(ensure_digits_model(model_cfg.cache_dir, progress=progress, size=model_cfg.size))  # type: ignore[arg-type]


def check_pipeline_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelDirError(
            f"model directory {path} does not exist. Put a diffusers StableDiffusionPipeline there "
            f"(folders {', '.join(PIPELINE_FOLDERS)}), e.g. from pipe.save_pretrained(); rlalign never downloads."
        )
    missing = [f for f in PIPELINE_FOLDERS if not (path / f).is_dir()]
    if missing:
        raise ModelDirError(
            f"model directory {path} is incomplete: missing folder(s) {', '.join(missing)} "
            f"(a StableDiffusionPipeline directory has {', '.join(PIPELINE_FOLDERS)})"
        )


def pick_device(model_cfg: ModelCfg) -> torch.device:
    if model_cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(model_cfg.device)


def add_fresh_lora(unet: Any, lora_cfg: LoraCfg, seed: int = 0) -> None:
    """Attach a peft LoRA to the U-Net's matching modules; B starts at zero so policy == reference."""
    from peft import LoraConfig

    names = {name.rsplit(".", 1)[-1] for name, _ in unet.named_modules()} | {name for name, _ in unet.named_modules()}
    targets = [t for t in lora_cfg.target_modules if t in names or any(n.endswith("." + t) for n in names)]
    if not targets:
        raise ValueError(f"lora.target_modules {lora_cfg.target_modules} match no U-Net module")
    torch.manual_seed(seed)  # LoRA A init: same on every process, so version 0 is identical everywhere
    unet.add_adapter(LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, target_modules=targets))


def load_parts(
    model_cfg: ModelCfg, lora_cfg: LoraCfg, num_steps: int, *, lora: bool = True, progress: bool = False
) -> DiffusionParts:
    """Load unet/vae/text_encoder/tokenizer/scheduler from the local model dir; add a fresh LoRA to the U-Net."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars from every actor drown the run's own progress
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model_dir(model_cfg, progress=progress)
    device, dtype = pick_device(model_cfg), getattr(torch, model_cfg.dtype)
    kw: dict[str, Any] = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, **kw)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", **kw)
    scheduler = DDIMScheduler.from_pretrained(path / "scheduler", **kw)
    check_scheduler(scheduler)
    scheduler.set_timesteps(num_steps)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    if lora:
        add_fresh_lora(unet, lora_cfg)
        unet.to(device)
    return DiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, device, dtype, path)


def check_scheduler(scheduler: Any) -> None:
    """Our DDIM maths assumes no clipping or thresholding (tailorpo.md 1.2): refuse other configs loudly."""
    c = scheduler.config
    if c.clip_sample or c.thresholding:
        raise ValueError(
            f"scheduler config has clip_sample={c.clip_sample}, thresholding={c.thresholding}; rlalign's DDIM "
            "log-probs need both False (edit scheduler/scheduler_config.json)"
        )
    if c.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type {c.prediction_type!r} is not supported (epsilon, v_prediction)")
