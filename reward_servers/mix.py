"""Weighted mixes of reward models, with optional running or per-group normalisation. Pure numpy.

total = sum_k w_k * normalise_k(score_k). Components are also returned raw, so the driver can log each one
(`reward/<name>/mean`) next to the total the learner sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from reward_servers.base import RewardModel

Normalize = Literal["none", "running", "group"]


class RunningMeanStd:
    """Mean and standard deviation of every value seen so far (Chan et al.'s parallel update: exact, order-free)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()
        if x.size == 0:
            return
        n, mean = x.size, float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation (0 before two values)."""
        return float(np.sqrt(self.m2 / self.count)) if self.count > 1 else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def group_normalize(x: np.ndarray, group_ids: np.ndarray, eps: float) -> np.ndarray:
    """(x - group mean) / (group std + eps) within each group id; a group of one maps to 0."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for g in np.unique(group_ids):
        idx = group_ids == g
        out[idx] = (x[idx] - x[idx].mean()) / (x[idx].std() + eps)
    return out


class WeightedMix:
    """A RewardModel whose score is a weighted sum of other reward models' (optionally normalised) scores.

    normalize:
      "none":    total = sum w_k s_k.
      "running": s_k -> (s_k - mean_k) / (std_k + eps) with mean/std over every score seen so far, this batch
                 included (state: `state_dict()` / `load_state_dict()`, saved with checkpoints).
      "group":   s_k z-scored within each group of `group_ids` (same prompt), as GRPO-style advantages;
                 `score()` without group ids treats the batch as one group.
    Differentiable when every component is and normalize is "none" or "running" (stats held fixed: the
    gradient is sum w_k g_k / (std_k + eps); `score_and_grad` does not update the running stats).
    """

    name = "mix"

    def __init__(
        self, components: Sequence[tuple[RewardModel, float]], normalize: Normalize = "none", eps: float = 1e-6
    ) -> None:
        if not components:
            raise ValueError("WeightedMix needs at least one (model, weight)")
        if normalize not in ("none", "running", "group"):
            raise ValueError(f"normalize must be 'none', 'running' or 'group', got {normalize!r}")
        self.models = [m for m, _ in components]
        self.weights = np.asarray([float(w) for _, w in components], dtype=np.float64)
        self.normalize, self.eps = normalize, eps
        self.names = _unique_names([m.name for m in self.models])
        self.stats = {n: RunningMeanStd() for n in self.names}
        self.differentiable = normalize != "group" and all(getattr(m, "differentiable", False) for m in self.models)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """[B, H, W, 3] uint8 -> [B] float32 weighted total."""
        return self.score_components(images, prompts)[0]

    def score_components(
        self, images: np.ndarray, prompts: Sequence[str], group_ids: np.ndarray | Sequence[int] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """-> (total [B] float32, {component name: raw score [B] float32}); running stats update here."""
        pairs = zip(self.names, self.models, strict=True)
        raw = {n: np.asarray(m.score(images, prompts), dtype=np.float32) for n, m in pairs}
        return self.combine(raw, group_ids), raw

    def combine(
        self, raw: dict[str, np.ndarray], group_ids: np.ndarray | Sequence[int] | None = None, update: bool = True
    ) -> np.ndarray:
        """Weighted total of already computed raw component scores [B] (the arithmetic, apart from the models)."""
        total = np.zeros(len(next(iter(raw.values()))), dtype=np.float64)
        for name, w in zip(self.names, self.weights, strict=True):
            x = np.asarray(raw[name], dtype=np.float64)
            if self.normalize == "running":
                if update:
                    self.stats[name].update(x)
                x = (x - self.stats[name].mean) / (self.stats[name].std + self.eps)
            elif self.normalize == "group":
                ids = np.zeros(len(x), np.int64) if group_ids is None else np.asarray(group_ids)
                if ids.shape != x.shape:
                    raise ValueError(f"group_ids must be [B]={x.shape}, got {ids.shape}")
                x = group_normalize(x, ids, self.eps)
            total += w * x
        return total.astype(np.float32)

    def score_and_grad(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """[B, H, W, 3] float32 -> (total [B], d total / d images [B, H, W, 3]); running stats are not updated."""
        if not self.differentiable:
            raise TypeError(f"mix {self.names} (normalize={self.normalize!r}) is not differentiable")
        total = np.zeros(len(images), dtype=np.float64)
        grad = np.zeros(images.shape, dtype=np.float64)
        for name, w, model in zip(self.names, self.weights, self.models, strict=True):
            s, g = model.score_and_grad(images, prompts)  # type: ignore[attr-defined]
            scale, shift = w, 0.0
            if self.normalize == "running":
                scale = w / (self.stats[name].std + self.eps)
                shift = self.stats[name].mean
            total += scale * (np.asarray(s, np.float64) - shift)
            grad += scale * np.asarray(g, np.float64)
        return total.astype(np.float32), grad.astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"normalize": self.normalize, "stats": {n: s.state_dict() for n, s in self.stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, s in state["stats"].items():
            self.stats[name].load_state_dict(s)


def _unique_names(names: list[str]) -> list[str]:
    """Disambiguate repeated component names: ["jpeg", "jpeg"] -> ["jpeg", "jpeg#1"]."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        out.append(n if k == 0 else f"{n}#{k}")
        seen[n] = k + 1
    return out
