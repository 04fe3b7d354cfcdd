"""Reward-hacking monitor: how far held-out images moved from the base model, how much within-prompt variety is
left, and whether rewards that were never trained on (audits) fall while the trained reward rises.

Pure maths on the held-out evaluation's final latents and reward means (torch and numpy only, no Ray); the driver
feeds it once per evaluation (rlalign/driver.py `Loop.evaluate`). Shape letters: B images, C/h/w latents.

- Distance between two latents is the RMS difference, ||a - b||_2 / sqrt(C*h*w): comparable across latent sizes.
- Drift: per-image distance between the current policy's final latent and the base model's, for the same prompt
  and seed (matched by seed). Logged as mean, p50 and p90.
- Feature drift (when `eval.features` names an image-feature model, e.g. clip_score or digit_prompt): the same
  pairs, as the cosine distance 1 - cos(f_now, f_base) of the model's image features, in [0, 2]; mean, p50, p90.
  Latent RMS says how much the pixels moved; the feature distance says how much of it a perception model sees.
- Diversity: within a prompt group, the mean pairwise distance of its final latents, averaged over groups with
  at least 2 images. `monitor/diversity_ratio` = now / base.
- Alarms (each 0 turns it off): an audit mean falls by more than `audit_drop` while the trained reward rises,
  both measured between the first and the last of the last `window` evaluations; diversity ratio below
  `diversity_below`; mean drift above `drift_above`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

AUDIT_PREFIX = "audit/"


def rms_distance(a: Tensor, b: Tensor) -> Tensor:
    """a, b [B, C, h, w] -> [B] float64: ||a - b||_2 / sqrt(C*h*w)."""
    d = (a.double() - b.double()).flatten(1)
    return d.pow(2).mean(dim=1).sqrt()


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """a, b [B, F] -> [B] float64: 1 - cos(a_i, b_i); 0 for identical directions, 2 for opposite ones."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return (1.0 - cos).clamp_min(0.0)  # rounding can leave -1e-16 for identical directions


def _summary(prefix: str, d: np.ndarray) -> dict[str, float]:
    return {
        f"{prefix}_mean": float(d.mean()),
        f"{prefix}_p50": float(np.percentile(d, 50)),
        f"{prefix}_p90": float(np.percentile(d, 90)),
    }


def diversity(latents: Tensor, group_ids: Tensor) -> float:
    """Mean over prompt groups (>= 2 images) of the mean pairwise RMS distance inside the group; nan if none."""
    flat = latents.double().flatten(1)
    per_group = []
    for g in torch.unique(group_ids):
        x = flat[group_ids == g]
        if len(x) < 2:
            continue
        d = torch.cdist(x, x) / math.sqrt(x.shape[1])  # [n, n], zero diagonal
        n = len(x)
        per_group.append(float(d.sum() / (n * (n - 1))))
    return float(np.mean(per_group)) if per_group else float("nan")


@dataclass
class AlarmRules:
    audit_drop: float = 0.0  # absolute fall of an audit mean (its own units) while the trained reward rises; 0: off
    window: int = 3  # evaluations the audit rule looks back over (first vs last of the last `window`)
    diversity_below: float = 0.0  # alarm when diversity now / base falls below this; 0: off
    drift_above: float = 0.0  # alarm when the mean RMS latent drift from base exceeds this; 0: off


def check_alarms(rules: AlarmRules, history: list[dict[str, float]]) -> list[str]:
    """The rules that fire on the newest row of `history` (rows: `trained`, `audit/<name>/mean`,
    `monitor/diversity_ratio`, `monitor/drift_latent_mean`), each as one readable sentence."""
    if not history:
        return []
    now, out = history[-1], []
    if rules.audit_drop > 0 and rules.window >= 2 and len(history) >= 2:
        first = history[-min(rules.window, len(history))]
        rise = now.get("trained", math.nan) - first.get("trained", math.nan)
        for key in sorted(k for k in now if k.startswith(AUDIT_PREFIX)):
            fall = first.get(key, math.nan) - now[key]
            if rise > 0 and fall > rules.audit_drop:
                out.append(
                    f"trained reward rose by {rise:.4f} while {key} fell by {fall:.4f} "
                    f"(> {rules.audit_drop:g}) over the last {min(rules.window, len(history))} evaluations"
                )
    ratio = now.get("monitor/diversity_ratio", math.nan)
    if rules.diversity_below > 0 and ratio < rules.diversity_below:  # nan compares False: no alarm
        out.append(f"diversity is {ratio:.3f} of the base model's (< {rules.diversity_below:g})")
    drift = now.get("monitor/drift_latent_mean", math.nan)
    if rules.drift_above > 0 and drift > rules.drift_above:
        out.append(f"mean latent drift from the base model is {drift:.4f} (> {rules.drift_above:g})")
    return out


@dataclass
class Monitor:
    rules: AlarmRules = field(default_factory=AlarmRules)
    base_seeds: Tensor | None = None  # [B] int64
    base_latents: Tensor | None = None  # [B, C, h, w] final latents of the base model
    base_diversity: float = math.nan
    base_features: Tensor | None = None  # [B, F] image features of the base model's images (eval.features)
    history: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation (with `iteration`)
    alarms: list[tuple[int, str]] = field(default_factory=list)  # (iteration, sentence) of every alarm fired

    def set_base(self, seeds: Tensor, group_ids: Tensor, latents: Tensor, features: Tensor | None = None) -> None:
        self.base_seeds, self.base_latents = seeds.clone(), latents.float().clone()
        self.base_diversity = diversity(latents, group_ids)
        self.base_features = None if features is None else features.float().clone()

    def base_state(self) -> dict[str, Tensor]:
        assert self.base_seeds is not None and self.base_latents is not None
        state = {"seeds": self.base_seeds, "latents": self.base_latents, "diversity": torch.tensor(self.base_diversity)}
        if self.base_features is not None:
            state["features"] = self.base_features
        return state

    def load_base_state(self, state: dict[str, Tensor]) -> None:
        self.base_seeds, self.base_latents = state["seeds"], state["latents"]
        self.base_diversity = float(state["diversity"])
        self.base_features = state.get("features")

    def observe(
        self,
        iteration: int,
        seeds: Tensor,
        group_ids: Tensor,
        latents: Tensor,
        trained: float,
        metrics: dict[str, float],
        features: Tensor | None = None,
    ) -> dict[str, float]:
        """One evaluation: final latents [B, C, h, w] with their seeds [B] and prompt groups [B], the trained
        reward's mean, the evaluation's metrics (its `audit/*` keys are watched) and, optionally, image features
        [B, F]. Returns `monitor/*` metrics and records the row; alarms fired are in `self.alarms` and as
        `monitor/alarm` 1.0."""
        out: dict[str, float] = {}
        if self.base_latents is not None and self.base_seeds is not None:
            index = {int(s): i for i, s in enumerate(self.base_seeds.tolist())}
            rows = [(i, index[int(s)]) for i, s in enumerate(seeds.tolist()) if int(s) in index]
            if rows:
                now_i, base_i = (list(x) for x in zip(*rows))
                d = rms_distance(latents[now_i], self.base_latents[base_i]).numpy()
                out.update(_summary("monitor/drift_latent", d))
                if features is not None and self.base_features is not None:
                    f = cosine_distance(features[now_i], self.base_features[base_i]).numpy()
                    out.update(_summary("monitor/drift_feature", f))
        div = diversity(latents, group_ids)
        out["monitor/diversity"] = div
        if math.isfinite(self.base_diversity) and self.base_diversity > 0:
            out["monitor/diversity_ratio"] = div / self.base_diversity
        row = {"iteration": float(iteration), "trained": trained, **out}
        row.update({k: v for k, v in metrics.items() if k.startswith(AUDIT_PREFIX)})
        self.history.append(row)
        fired = check_alarms(self.rules, self.history)
        self.alarms.extend((iteration, msg) for msg in fired)
        out["monitor/alarm"] = 1.0 if fired else 0.0
        row["monitor/alarm"] = out["monitor/alarm"]
        return {k: v for k, v in out.items() if math.isfinite(v)} | {"monitor/alarm": out["monitor/alarm"]}

    def fired(self, iteration: int) -> list[str]:
        return [msg for it, msg in self.alarms if it == iteration]
