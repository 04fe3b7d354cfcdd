"""Stage (3): fan images out to the reward servers, merge the weighted components, per-group statistics.

No Ray here: a reward is reached through a `RewardHandle` whose `submit` returns something with `.result()`.
`rlalign/actors.py` supplies handles backed by Ray actors; tests use `LocalRewardHandle` around an in-process
`reward_servers.base.RewardServer`. All reward servers are asked at once, then waited for, so they run in parallel.

`RewardSet` is also the sampler's `StepScorer` for TailorPO: the raw weighted sum ranks branched candidates
(normalisation is for learning signals across iterations, not for ranking within one step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from reward_servers.mix import RunningMeanStd, group_normalize
from rlalign.config import RewardSpec
from rlalign.types import Rollout, ScoredRollouts, Scores


class Pending(Protocol):
    def result(self, timeout: float | None = None) -> Any: ...


class RewardHandle(Protocol):
    name: str
    differentiable: bool

    def submit(self, images: np.ndarray, prompts: list[str]) -> Pending: ...

    def submit_grad(self, images: np.ndarray, prompts: list[str]) -> Pending: ...


class RewardError(RuntimeError):
    """A reward model failed or answered garbage; the message names the model."""


@dataclass
class _Done:
    value: Any
    error: Exception | None = None  # raised by result(), like a future, so RewardSet names the failing reward

    def result(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _call(fn: Any, *args: Any) -> _Done:
    try:
        return _Done(fn(*args))
    except Exception as err:
        return _Done(None, err)


class LocalRewardHandle:
    """In-process reward (tests, single-process use): the call runs at submit time."""

    def __init__(self, name: str, server: Any) -> None:
        self.name, self.server = name, server
        self.differentiable = bool(getattr(server, "differentiable", False))

    def submit(self, images: np.ndarray, prompts: list[str]) -> Pending:
        return _call(self.server.score, images, prompts)

    def submit_grad(self, images: np.ndarray, prompts: list[str]) -> Pending:
        return _call(self.server.score_and_grad, images, prompts)


@dataclass
class RewardSet:
    specs: list[RewardSpec]
    handles: list[RewardHandle]
    timeout_s: float = 120.0
    stats: dict[str, RunningMeanStd] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.specs) != len(self.handles):
            raise ValueError(f"{len(self.specs)} reward specs but {len(self.handles)} handles")
        self.names = self.component_names(self.specs)

    @staticmethod
    def component_names(specs: list[RewardSpec]) -> list[str]:
        """Metric names: the reward name, or name_<index> when one reward appears twice."""
        counts = {s.name: sum(o.name == s.name for o in specs) for s in specs}
        return [s.name if counts[s.name] == 1 else f"{s.name}_{i}" for i, s in enumerate(specs)]

    @property
    def differentiable(self) -> bool:
        """True when at least one component gives gradients (the others then add nothing to the gradient)."""
        return any(h.differentiable for h in self.handles)

    def _wait(self, name: str, pending: Pending) -> Any:
        try:
            return pending.result(timeout=self.timeout_s)
        except Exception as err:
            raise RewardError(f"reward {name!r} failed: {type(err).__name__}: {err}") from err

    def components(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Raw score of every reward model, asked in parallel; each checked for length and finiteness."""
        plist = list(prompts)
        pending = [h.submit(images, plist) for h in self.handles]
        out = {}
        for name, p in zip(self.names, pending):
            scores = np.asarray(self._wait(name, p), dtype=np.float32)
            if scores.shape != (len(images),):
                raise RewardError(f"reward {name!r} returned {scores.shape} scores for {len(images)} images")
            if not np.isfinite(scores).all():
                bad = np.flatnonzero(~np.isfinite(scores))
                raise RewardError(f"reward {name!r} returned non-finite scores at rows {bad[:8].tolist()}")
            out[name] = scores
        return out

    def weighted(self, comps: dict[str, np.ndarray]) -> np.ndarray:
        """The raw (never normalised) weighted sum of components: comparable across iterations and runs."""
        return sum(s.weight * comps[n] for s, n in zip(self.specs, self.names)).astype(np.float32)

    # StepScorer interface (sampler-side ranking and gradient guidance): raw weighted sums
    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return self.weighted(self.components(images, prompts))

    def score_and_grad(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        plist = list(prompts)
        pending = [
            (s, n, h.submit_grad(images, plist))
            for s, n, h in zip(self.specs, self.names, self.handles)
            if h.differentiable
        ]
        if not pending:
            raise RewardError("no differentiable reward model is configured (TailorPO-G needs one)")
        total = np.zeros(len(images), np.float32)
        grad = np.zeros(images.shape, np.float32)
        for spec, name, p in pending:
            scores, g = self._wait(name, p)
            total += spec.weight * np.asarray(scores, np.float32)
            grad += spec.weight * np.asarray(g, np.float32)
        return total, grad

    @property
    def retries(self) -> int:
        """Calls this copy of the handles sent again after a reward actor died (0 for in-process handles)."""
        return sum(int(getattr(h, "retries", 0)) for h in self.handles)

    # learning signal for the whole iteration
    def score_rollout(self, rollout: Rollout) -> ScoredRollouts:
        """Score a rollout here (in-process runs, tests, benchmarks); the driver scores from components the
        samplers computed (`score_components`): both give the same ScoredRollouts for the same components."""
        scores = self.score_components(
            self.components(rollout.images, rollout.prompts), rollout.group_ids, rollout.step_pairs is None
        )
        return ScoredRollouts(rollout, scores.scores, scores.components, scores.metrics)

    def score_components(self, comps: dict[str, np.ndarray], group_ids: torch.Tensor, plain: bool) -> Scores:
        """Normalise and weight raw components ([B] each) into the learning signal; updates the running statistics
        of `normalize: running` rewards, so it runs once per iteration, on the driver, which checkpoints them.
        `plain`: the images were sampled without branching (then their weighted reward is the policy's own)."""
        gids = group_ids.numpy()
        total = np.zeros(len(gids), np.float64)
        metrics: dict[str, float] = {}
        for spec, name in zip(self.specs, self.names):
            raw = comps[name]
            metrics[f"reward/{name}/mean"] = float(raw.mean())
            metrics[f"reward/{name}/std"] = float(raw.std())
            total += spec.weight * self._normalise(spec, name, raw, gids)
        metrics["reward/weighted/mean"] = float(total.mean())
        if plain:  # plainly sampled: the policy's own reward (a branching sampler logs its own)
            metrics["plain/weighted/mean"] = float(self.weighted(comps).mean())
        metrics["reward/group_std_mean"] = float(np.mean([total[gids == g].std() for g in np.unique(gids)]))
        return Scores(
            scores=torch.from_numpy(total.astype(np.float32)),
            components={k: torch.from_numpy(v.copy()) for k, v in comps.items()},
            metrics=metrics,
        )

    def _normalise(self, spec: RewardSpec, name: str, raw: np.ndarray, gids: np.ndarray) -> np.ndarray:
        if spec.normalize == "group":
            return group_normalize(raw, gids, eps=1e-6)
        if spec.normalize == "running":
            stats = self.stats.setdefault(name, RunningMeanStd())
            stats.update(raw)
            return (raw - stats.mean) / (stats.std + 1e-6)
        return raw

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {k: v.state_dict() for k, v in self.stats.items()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.stats = {}
        for k, v in state.items():
            self.stats[k] = RunningMeanStd()
            self.stats[k].load_state_dict(v)
