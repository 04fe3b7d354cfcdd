"""Small rewards without weights: JPEG compressibility (DDPO's reward) and mean brightness (a toy for tests).

numpy + PIL only, so they also serve from the ImageReward venv and need no torch.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from reward_servers.base import check_images


class JpegCompressibility:
    """Negative JPEG size in kB (1 kB = 1000 bytes) at quality 95: simpler images score higher.

    Deterministic (libjpeg, fixed settings), CPU only, not differentiable (JPEG size is piecewise constant).
    """

    name = "jpeg"
    differentiable = False

    def __init__(self, quality: int = 95) -> None:
        self.quality = quality

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """[B, H, W, 3] uint8 -> [B] float32 = -(JPEG bytes / 1000)."""
        check_images(images, prompts)
        sizes = []
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return -np.asarray(sizes, dtype=np.float32)


class Brightness:
    """Mean pixel value in [0, 1]. Differentiable with a constant gradient 1 / (H * W * 3): a toy for tests."""

    name = "brightness"
    differentiable = True

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """[B, H, W, 3] uint8 -> [B] float32 mean / 255."""
        check_images(images, prompts)
        return (images.reshape(len(images), -1).mean(axis=1, dtype=np.float64) / 255.0).astype(np.float32)

    def score_and_grad(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """[B, H, W, 3] float32 in [0, 1] -> (mean [B], 1 / (H * W * 3) everywhere [B, H, W, 3])."""
        check_images(images, prompts, dtype=np.float32)
        scores = images.reshape(len(images), -1).mean(axis=1, dtype=np.float64).astype(np.float32)
        grad = np.full(images.shape, 1.0 / images[0].size if len(images) else 0.0, dtype=np.float32)
        return scores, grad
