"""Records that cross process boundaries (sampler -> rewards -> learner -> samplers).

Every tensor here is a CPU tensor (numpy for images), so a record pickles cheaply into Ray's object store.
Shape letters: B images, G groups (prompts), S trained/branched steps, T denoising steps, C/h/w latents,
H/W pixels, L text tokens, D text width. This module imports only torch and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class PromptBatch:
    """What one sampler call renders: `B = groups * images_per_prompt` rows, a group = one prompt repeated."""

    prompts: list[str]  # [B]
    group_ids: Tensor  # [B] int64; equal ids = same prompt (pairs and advantages form inside a group)
    seeds: Tensor  # [B] int64; per-image noise seed, so any image can be re-rendered exactly

    def __post_init__(self) -> None:
        if not (len(self.prompts) == len(self.group_ids) == len(self.seeds)):
            raise ValueError(
                f"PromptBatch fields disagree: {len(self.prompts)} prompts, {len(self.group_ids)} group ids, "
                f"{len(self.seeds)} seeds"
            )

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class StepPairs:
    """TailorPO branching record: at each branched step, candidates drawn from one shared x_t, ranked.

    Row b, step j: from `x_t[b, j]` (at `timesteps[j]`) the sampler drew k candidates x_{t-1}; `x_w` is the best by
    the step-wise reward, `x_l` the worst. `x_w` is the sample the trajectory continued from (after reward-gradient
    guidance for TailorPO-G, in which case `x_w` is the guided x^+). `valid` is False for ties.
    """

    x_t: Tensor  # [B, S, C, h, w]
    x_w: Tensor  # [B, S, C, h, w]
    x_l: Tensor  # [B, S, C, h, w]
    timesteps: Tensor  # [S] int64, the t of x_t
    valid: Tensor  # [B, S] bool
    reward_w: Tensor  # [B, S] float32
    reward_l: Tensor  # [B, S] float32


@dataclass(frozen=True)
class PlainScores:
    """A branching sampler's plain (unbranched) renders of some of its prompts and their raw weighted reward: what
    the policy itself earns, where the rollout's own final images are best-of-k searches."""

    prompts: list[str]  # [P]
    rewards: np.ndarray  # [P] float64


@dataclass(frozen=True)
class Rollout:
    """One sampler call: images plus the denoising trajectory that produced them."""

    prompts: list[str]  # [B]
    group_ids: Tensor  # [B] int64
    seeds: Tensor  # [B] int64
    images: np.ndarray  # [B, H, W, 3] uint8, exactly what reward servers receive
    latents: Tensor  # [B, T + 1, C, h, w]; latents[:, 0] is x_T, latents[:, -1] the final latent x_0
    log_probs: Tensor  # [B, T] log p(x_{t-1} | x_t) under the sampling policy (mean over C*h*w)
    timesteps: Tensor  # [T] int64, the t of each step (latents[:, i] was at timesteps[i])
    prompt_embeds: Tensor  # [B, L, D] frozen text-encoder output (the learner never re-encodes)
    negative_embeds: Tensor  # [1, L, D] embedding of the empty prompt (classifier-free guidance)
    policy_version: int  # version of the WeightsUpdate the sampler held while sampling
    # the sampling policy's DDIM eta and classifier-free guidance w: the learner rebuilds exactly this policy
    eta: float
    guidance_scale: float
    step_pairs: StepPairs | None = None  # TailorPO / TailorPO-G branching record
    metrics: dict[str, float] = field(default_factory=dict)  # sampler-side diagnostics (seconds, std per step...)
    # branching samplers: the images rendered again plainly (`sampler.plain_images`), the policy's own reward
    plain: PlainScores | None = None

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class ScoredRollouts:
    """Rollouts of one iteration (all samplers, concatenated) with their final-image rewards."""

    rollout: Rollout
    scores: Tensor  # [B] float32, weighted sum of (optionally normalised) reward components; higher is better
    components: dict[str, Tensor]  # name -> [B] raw score of each reward model
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Scores:
    """The learning signal of one iteration without its rollout: what the driver sends the learners beside the
    rollouts' references (a `ScoredRollouts` is `Scores` plus the concatenated rollout)."""

    scores: Tensor  # [B] float32, as ScoredRollouts.scores
    components: dict[str, Tensor]  # name -> [B] raw score of each reward model
    metrics: dict[str, float] = field(default_factory=dict)

    def with_rollout(self, rollout: Rollout) -> ScoredRollouts:
        if len(rollout) != len(self.scores):
            raise ValueError(f"{len(self.scores)} scores for a rollout of {len(rollout)} images")
        return ScoredRollouts(rollout, self.scores, self.components, self.metrics)


@dataclass(frozen=True)
class RolloutSummary:
    """What the driver receives of one sampler call instead of its `Rollout`: raw reward components and the few
    fields its metrics need; the `Rollout` stays in Ray's object store and goes to the learners by reference
    (rlalign/actors.py `SamplerPool.generate_scored`). A few hundred bytes per image, against the trajectory's
    latents, embeddings and images."""

    prompts: list[str]  # [B] (image-grid captions)
    group_ids: Tensor  # [B] int64
    components: dict[str, np.ndarray]  # name -> [B] float32 raw score of each reward model
    policy_version: int
    metrics: dict[str, float]  # the rollout's sampler-side metrics (Rollout.metrics)
    step_valid: Tensor | None = None  # [B, S] bool: StepPairs.valid (TailorPO), None without branching
    step_reward_gap: Tensor | None = None  # [B, S] float32: StepPairs.reward_w - reward_l
    plain: PlainScores | None = None  # Rollout.plain
    reward_s: float = 0.0  # seconds the sampler spent scoring its final images
    reward_retries: int = 0  # reward calls of that scoring sent again after a reward actor died

    def __len__(self) -> int:
        return len(self.prompts)


def summarize(rollout: Rollout, components: dict[str, np.ndarray], reward_s: float, retries: int) -> RolloutSummary:
    """The summary of a scored rollout (built inside the sampler, rlalign/sampling/sampler.py)."""
    pairs = rollout.step_pairs
    return RolloutSummary(
        prompts=list(rollout.prompts),
        group_ids=rollout.group_ids.clone(),
        components=components,
        policy_version=rollout.policy_version,
        metrics=dict(rollout.metrics),
        step_valid=None if pairs is None else pairs.valid.clone(),
        step_reward_gap=None if pairs is None else pairs.reward_w - pairs.reward_l,
        plain=rollout.plain,
        reward_s=reward_s,
        reward_retries=retries,
    )


@dataclass(frozen=True)
class WeightsUpdate:
    """The learner's LoRA weights, on CPU, with the version number the learner assigned them."""

    version: int
    tensors: dict[str, Tensor]


def concat_rollouts(rollouts: list[Rollout]) -> Rollout:
    """Concatenate rollouts from several samplers along B; group ids stay unique if each sampler's were."""
    if not rollouts:
        raise ValueError("concat_rollouts needs at least one rollout")
    if len(rollouts) == 1:
        return rollouts[0]
    first = rollouts[0]
    policies = {(r.eta, r.guidance_scale) for r in rollouts}
    if len(policies) > 1:
        raise ValueError(f"concat_rollouts: samplers used different (eta, guidance_scale): {sorted(policies)}")
    pairs = [r.step_pairs for r in rollouts]
    step_pairs = None
    if all(p is not None for p in pairs):
        ps = [p for p in pairs if p is not None]
        step_pairs = StepPairs(
            x_t=torch.cat([p.x_t for p in ps]),
            x_w=torch.cat([p.x_w for p in ps]),
            x_l=torch.cat([p.x_l for p in ps]),
            timesteps=ps[0].timesteps,
            valid=torch.cat([p.valid for p in ps]),
            reward_w=torch.cat([p.reward_w for p in ps]),
            reward_l=torch.cat([p.reward_l for p in ps]),
        )
    return replace(
        first,
        prompts=[p for r in rollouts for p in r.prompts],
        group_ids=torch.cat([r.group_ids for r in rollouts]),
        seeds=torch.cat([r.seeds for r in rollouts]),
        images=np.concatenate([r.images for r in rollouts]),
        latents=torch.cat([r.latents for r in rollouts]),
        log_probs=torch.cat([r.log_probs for r in rollouts]),
        prompt_embeds=torch.cat([r.prompt_embeds for r in rollouts]),
        policy_version=min(r.policy_version for r in rollouts),
        step_pairs=step_pairs,
        metrics=merge_metrics([r.metrics for r in rollouts]),
    )


def merge_metrics(per_sampler: list[dict[str, float]]) -> dict[str, float]:
    """One iteration's sampler metrics from each sampler's (keys of the first): what `concat_rollouts` logs."""
    return {k: _merge_metric(k, [m[k] for m in per_sampler if k in m]) for k in per_sampler[0]}


def _merge_metric(key: str, values: list[float]) -> float:
    """Costs add up over samplers (`cost/*`: U-Net rows); everything else is a per-sampler mean."""
    return float(np.sum(values)) if key.startswith("cost/") else float(np.mean(values))
