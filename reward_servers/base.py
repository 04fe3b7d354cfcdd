"""The reward-model interface and the batching server around it. Never imports `rlalign`.

Images cross this interface as `[B, H, W, 3]` arrays: uint8 RGB for `score`, float32 in [0, 1] for
`score_and_grad` (the pixel gradient is what TailorPO-G chains back through the VAE decoder and the U-Net).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class RewardModel(Protocol):
    name: str
    differentiable: bool

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """images [B, H, W, 3] uint8 RGB, B prompts -> [B] float32, higher is better."""
        ...


@runtime_checkable
class DifferentiableRewardModel(RewardModel, Protocol):
    def score_and_grad(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """images [B, H, W, 3] float32 in [0, 1] -> (scores [B] float32, d score / d images [B, H, W, 3] float32)."""
        ...


@runtime_checkable
class ImageFeatureModel(Protocol):
    """A reward model that also exposes the image features it scores from (CLIP embeddings, a classifier's
    penultimate layer): the monitor measures how far images moved from the base model's in this space."""

    def features(self, images: np.ndarray) -> np.ndarray:
        """images [B, H, W, 3] uint8 RGB -> [B, F] float32 features."""
        ...


def check_images(images: np.ndarray, prompts: Sequence[str], *, dtype: type = np.uint8) -> None:
    """Raise ValueError naming what is wrong with an image batch (shape, dtype, prompt count)."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {tuple(images.shape)}")
    if images.dtype != np.dtype(dtype):
        raise ValueError(f"images must be {np.dtype(dtype).name}, got {images.dtype}")
    if len(prompts) != len(images):
        raise ValueError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")


class RewardServer:
    """Batches requests for one RewardModel. Plain class; rlalign/actors.py makes it an actor."""

    def __init__(self, make_model: Callable[[], RewardModel], max_batch: int = 32) -> None:
        self.model, self.max_batch = make_model(), max_batch  # weights load inside the owning process
        self.busy_s, self.calls, self.images = 0.0, 0, 0  # since start: what `stats` reports

    @property
    def differentiable(self) -> bool:
        return bool(getattr(self.model, "differentiable", False))

    def info(self) -> dict[str, object]:
        """Name, capabilities and device (a method, so remote callers can ask a Ray actor)."""
        return {
            "name": self.model.name,
            "differentiable": self.differentiable,
            "max_batch": self.max_batch,
            "device": str(getattr(self.model, "device", "cpu")),
        }

    def stats(self) -> dict[str, float]:
        """Totals since start: seconds spent scoring, calls and images served. A caller that reads them twice gets
        this server's load in between (the driver logs it per iteration: a slow reward model shows there)."""
        return {"busy_s": self.busy_s, "calls": float(self.calls), "images": float(self.images)}

    def _count(self, start: float, n: int) -> None:
        self.busy_s += time.perf_counter() - start
        self.calls += 1
        self.images += n

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """[B, H, W, 3] uint8 -> [B] float32, in request order."""
        start = time.perf_counter()
        check_images(images, prompts)
        n = self.max_batch
        parts = [self.model.score(images[i : i + n], list(prompts[i : i + n])) for i in range(0, len(images), n)]
        self._count(start, len(images))
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    def score_and_grad(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """[B, H, W, 3] float32 in [0, 1] -> (scores [B], grads [B, H, W, 3]), in request order."""
        if not isinstance(self.model, DifferentiableRewardModel) or not self.differentiable:
            raise TypeError(f"reward model {self.model.name!r} is not differentiable")
        start = time.perf_counter()
        check_images(images, prompts, dtype=np.float32)
        n = self.max_batch
        parts = [
            self.model.score_and_grad(images[i : i + n], list(prompts[i : i + n])) for i in range(0, len(images), n)
        ]
        self._count(start, len(images))
        return (
            np.concatenate([p[0] for p in parts]).astype(np.float32),
            np.concatenate([p[1] for p in parts]).astype(np.float32),
        )
