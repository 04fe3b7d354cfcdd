"""Shared torch plumbing for differentiable reward models: numpy <-> torch, pixel gradients, CLIP preprocessing.

Preprocessing (resize, crop, normalise) is done in torch rather than PIL so that `score_and_grad` returns the
gradient with respect to the pixels the caller sent, as TailorPO-G needs. Never imports `rlalign`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reward_servers.base import check_images

# OpenAI CLIP's normalisation; also used by open_clip's LAION ViT-H-14 (HPSv2) and by PickScore's processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(
    pixels: Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, 3, size, size] normalised, differentiable.

    Same steps as CLIP's PIL transform: bicubic resize of the shorter side to `size`, centre crop, normalise.
    antialias=True approximates PIL's filtered downscale; for square inputs resize + crop is a plain resize.
    """
    h, w = pixels.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    pixels = pixels[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - m) / s


class TorchReward:
    """Base for torch reward models: subclasses implement `forward(pixels [B, 3, H, W] in [0, 1], prompts) -> [B]`.

    `score` and `score_and_grad` convert numpy batches, run `forward` in `self.dtype` on `self.device` and return
    float32 numpy. Parameters are frozen: only the pixels get gradients.
    """

    name: str = "torch"
    differentiable: bool = True

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype

    def forward(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        """[B, 3, H, W] float in [0, 1] -> [B] scores; must be differentiable in `pixels`."""
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        """The nn.Modules this reward owns (for `to` / freezing)."""
        return []

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TorchReward:
        """Move every module (and future inputs) to `device` / `dtype`; tests use float64 for finite differences."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        for m in self.modules():
            m.to(device=self.device, dtype=self.dtype)
        return self

    def _freeze(self) -> None:
        for m in self.modules():
            m.eval()
            m.requires_grad_(False)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """[B, H, W, 3] uint8 -> [B] float32."""
        check_images(images, prompts)
        with torch.no_grad():
            return self.forward(self._pixels(images), list(prompts)).float().cpu().numpy().astype(np.float32)

    def _pixels(self, images: np.ndarray) -> Tensor:
        """[B, H, W, 3] uint8 -> [B, 3, H, W] in [0, 1], in this model's device and dtype."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return x.permute(0, 3, 1, 2).to(self.dtype) / 255.0

    def score_and_grad(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """[B, H, W, 3] float32 in [0, 1] -> (scores [B], d score_i / d image_i [B, H, W, 3]), both float32.

        One backward of the sum: the models score images independently (eval mode, no batch statistics), so the
        gradient of the sum with respect to image i is the gradient of score i.
        """
        check_images(images, prompts, dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, self.dtype).requires_grad_(True)
        with torch.enable_grad():
            scores = self.forward(x.permute(0, 3, 1, 2), list(prompts))
            (grad,) = torch.autograd.grad(scores.sum(), x)
        return (
            scores.detach().float().cpu().numpy().astype(np.float32),
            grad.float().cpu().numpy().astype(np.float32),
        )
