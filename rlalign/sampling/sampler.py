"""Stage (2): the sampler renders DDIM trajectories with eta > 0 (every step has a log-probability).

A plain class: `rlalign/actors.py` makes it an actor; tests build it in-process. It holds the pipeline parts plus
the current LoRA (theta_old) and returns `Rollout` records of CPU tensors.

Noise is drawn per image from a generator seeded by that image's seed, so an image depends only on its prompt,
seed and policy version: N samplers x B prompts give the same images as 1 sampler x N*B prompts.

Branching (TailorPO, docs/algorithms/tailorpo.md 2.3): at every step k candidates x_{t-1} are drawn from one shared
x_t, each is
scored by the step-wise reward (on its predicted x0, the noisy sample itself, or the final image of a
deterministic completion: `reward.target`), the best continues the trajectory, and the (best, worst) pair is
stored. TailorPO-G moves the best candidate along the reward gradient, chained from the reward model's pixel
gradient through the VAE decoder and the x0-hat map (docs/algorithms.md section 6; docs/algorithms/tailorpo.md
3.1-3.3).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from peft import set_peft_model_state_dict
from torch import Tensor

from rlalign.algos.tailorpo import guided_candidate, rank_candidates  # the unit-tested maths, not copies
from rlalign.config import SamplerCfg
from rlalign.models.conditioning import unet_eps
from rlalign.models.loading import DiffusionParts, to_uint8
from rlalign.sampling.logprob import ddim_mean_std, ddim_step_with_logprob, predicted_x0, prev_timestep
from rlalign.types import PlainScores, PromptBatch, Rollout, RolloutSummary, StepPairs, WeightsUpdate, summarize


class StepScorer(Protocol):
    """Scores decoded images for the sampler's step-wise ranking (a weighted sum of reward models)."""

    differentiable: bool

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """[N, H, W, 3] uint8 -> [N] float32."""
        ...

    def score_and_grad(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """[N, H, W, 3] float32 in [0, 1] -> ([N], [N, H, W, 3])."""
        ...


class FinalScorer(Protocol):
    """Scores a rollout's final images with every reward model (rlalign/rewards.py `RewardSet`)."""

    @property
    def retries(self) -> int:
        """Reward calls sent again so far (after a reward actor died)."""
        ...

    def components(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """[N, H, W, 3] uint8 -> name -> [N] float32 raw scores."""
        ...


@dataclass(frozen=True)
class BranchCfg:
    """How a sampler branches (TailorPO); built by the driver from the run's `tailorpo` and `reward` sections."""

    num_candidates: int = 2  # k candidates x_{t-1} per shared x_t
    tie_eps: float = 0.0  # pairs whose reward gap is <= tie_eps are stored as invalid
    target: str = "x0_hat"  # x0_hat | noisy | final: what the step-wise reward looks at
    guide: bool = False  # TailorPO-G: move the preferred candidate along the reward gradient
    guidance_step: float = 0.1  # eta_g
    guidance_norm: str = "rms_sigma"  # rms_sigma: shift of eta_g noise std per element | none: raw eta_g * grad
    guidance_mode: str = "full"  # full: backprop through the U-Net in x0-hat | stopgrad_eps: skip that Jacobian
    guide_loser: bool = False  # also push the dispreferred candidate down the reward gradient (symmetric option)


class Sampler:
    def __init__(
        self,
        cfg: SamplerCfg,
        make_parts: Callable[[], DiffusionParts],
        *,
        branch: BranchCfg | None = None,
        scorer: StepScorer | None = None,
        rewards: FinalScorer | None = None,
        worker_index: int = 0,
    ) -> None:
        self.cfg, self.branch, self.scorer, self.rewards = cfg, branch, scorer, rewards
        self.parts = make_parts()
        self.version = 0
        self.worker_index = worker_index
        self._negative: Tensor | None = None
        self.unet_rows = 0  # U-Net forward rows so far (CFG counts 2 per image): the cost axis of benchmarks
        if branch is not None and scorer is None:
            raise ValueError("a branching sampler needs a step scorer (the reward models)")

    # ------------------------------------------------------------------ weights
    def load_weights(self, update: WeightsUpdate) -> int:
        """Load a broadcast LoRA state; returns the version now held."""
        tensors = {k: v.to(self.parts.device) for k, v in update.tensors.items()}
        result = set_peft_model_state_dict(self.parts.unet, tensors)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"LoRA update {update.version} has keys this U-Net lacks: {unexpected[:3]}")
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing:  # a partial update would silently mix two versions of the adapter
            raise ValueError(f"LoRA update {update.version} lacks {len(missing)} adapter tensors, e.g. {missing[:2]}")
        self.version = update.version
        return self.version

    def info(self) -> dict[str, object]:
        import os
        import socket

        return {
            "worker": self.worker_index,
            "version": self.version,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.parts.device),
            "dtype": str(self.parts.dtype).removeprefix("torch."),
            "layout": self.parts.layout,
        }

    # ------------------------------------------------------------------ model calls
    def _negative_embeds(self) -> Tensor:
        if self._negative is None:
            self._negative = self.parts.negative_embeds()
        return self._negative

    def _eps(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Guided noise prediction in chunks of `batch_size` U-Net rows. x [N,C,h,w], t [], cond [N,L,D]."""
        w, neg = self.cfg.guidance_scale, self._negative_embeds()
        per = max(1, self.cfg.batch_size // (2 if w != 1.0 else 1))
        outs = []
        for i in range(0, x.shape[0], per):
            xs, cs = x[i : i + per], cond[i : i + per]
            outs.append(self._guided(xs, t, cs, neg, w))
        return torch.cat(outs)

    def _guided(self, x: Tensor, t: Tensor, cond: Tensor, neg: Tensor, w: float) -> Tensor:
        unet, dtype = self.parts.unet, self.parts.dtype
        self.unet_rows += x.shape[0] * (1 if w == 1.0 else 2)
        if w == 1.0:
            return unet_eps(unet, x, t, cond, dtype=dtype)
        both = unet_eps(unet, torch.cat([x, x]), t, torch.cat([neg.expand_as(cond), cond]), dtype=dtype)
        e_u, e_c = both.chunk(2)
        return e_u + w * (e_c - e_u)

    def _decode_uint8(self, latents: Tensor) -> np.ndarray:
        per = self.cfg.batch_size
        return np.concatenate([to_uint8(self.parts.decode(latents[i : i + per])) for i in range(0, len(latents), per)])

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def generate(self, batch: PromptBatch, *, branch: bool = True) -> Rollout:
        """Render one batch. `branch=False` forces plain sampling (evaluation) even on a branching sampler."""
        start, rows_before = time.perf_counter(), self.unet_rows
        parts, sched, eta = self.parts, self.parts.scheduler, self.cfg.eta
        gens = [torch.Generator().manual_seed(int(s)) for s in batch.seeds]
        cond = parts.encode_prompts(list(batch.prompts))
        x = self._noise(gens, 1)[0]
        timesteps = sched.timesteps.to(torch.int64)
        latents, log_probs, stds = [x], [], []
        branching = self.branch if (branch and self.branch is not None) else None
        pairs: dict[str, list[Tensor]] = {k: [] for k in ("x_t", "x_w", "x_l", "valid", "r_w", "r_l")}
        e = self._eps(x, timesteps[0], cond)
        for i, t in enumerate(timesteps):
            mean, std = ddim_mean_std(sched, e, t, x, eta)
            stds.append(float(std.flatten()[0]))
            if branching is None:
                x_next = mean + _bcast(std, mean) * self._noise(gens, 1)[0]
                e_next = self._eps(x_next, timesteps[i + 1], cond) if i + 1 < len(timesteps) else None
            else:
                x_next, x_l, valid, r_w, r_l, e_next = self._branch(branching, gens, batch, cond, mean, std, t)
                for key, value in zip(("x_t", "x_w", "x_l", "valid", "r_w", "r_l"), (x, x_next, x_l, valid, r_w, r_l)):
                    pairs[key].append(value)
            _, logp = ddim_step_with_logprob(sched, e, t, x, eta, prev_sample=x_next)
            log_probs.append(logp)
            latents.append(x_next)
            x, e = x_next, e_next
        images = self._decode_uint8(x)
        step_pairs = None
        if branching is not None:
            step_pairs = StepPairs(
                x_t=torch.stack(pairs["x_t"], 1).cpu(),
                x_w=torch.stack(pairs["x_w"], 1).cpu(),
                x_l=torch.stack(pairs["x_l"], 1).cpu(),
                timesteps=timesteps.cpu(),
                valid=torch.stack(pairs["valid"], 1).cpu(),
                reward_w=torch.stack(pairs["r_w"], 1).cpu(),
                reward_l=torch.stack(pairs["r_l"], 1).cpu(),
            )
        seconds = time.perf_counter() - start
        metrics = {"time/sampler_call_s": seconds, "sampler/images_per_s": len(batch) / max(seconds, 1e-9)}
        plain = None
        if branching is not None and self.cfg.plain_images > 0:
            plain = self._plain_reward(batch)
            metrics["plain/weighted/mean"] = float(plain.rewards.mean())
            metrics["time/sampler_plain_s"] = time.perf_counter() - start - seconds
        metrics["cost/sampler_unet_rows"] = float(self.unet_rows - rows_before)  # summed over samplers per iteration
        metrics.update({f"sampler/std/step_{j:02d}": s for j, s in enumerate(stds)})
        return Rollout(
            prompts=list(batch.prompts),
            group_ids=batch.group_ids.clone(),
            seeds=batch.seeds.clone(),
            images=images,
            latents=torch.stack(latents, 1).cpu(),
            log_probs=torch.stack(log_probs, 1).cpu(),
            timesteps=timesteps.cpu(),
            prompt_embeds=cond.cpu(),
            negative_embeds=self._negative_embeds().cpu(),
            policy_version=self.version,
            eta=eta,
            guidance_scale=self.cfg.guidance_scale,
            step_pairs=step_pairs,
            metrics=metrics,
            plain=plain,
        )

    def generate_scored(self, batch: PromptBatch) -> tuple[RolloutSummary, Rollout]:
        """Render one batch and score its final images here, with the reward handles this sampler holds. Two
        results, so that Ray can return them as two objects (rlalign/actors.py `SamplerPool.generate_scored`): the
        small summary the driver reads and the rollout, which stays in the object store until the learners read
        it. Scores are the raw components; normalisation needs the driver's running statistics."""
        if self.rewards is None:
            raise ValueError("generate_scored needs the reward models (Sampler(rewards=...))")
        rollout = self.generate(batch)
        t0, retries = time.perf_counter(), self.rewards.retries
        comps = self.rewards.components(rollout.images, rollout.prompts)
        summary = summarize(rollout, comps, time.perf_counter() - t0, self.rewards.retries - retries)
        return summary, rollout

    def _plain_reward(self, batch: PromptBatch) -> PlainScores:
        """The policy's own reward next to the search's: `sampler.plain_images` of this batch's images (spread over
        its prompts: with one per group, every prompt gets one) rendered again without branching, from the same
        seeds, and scored by the same rewards (raw weighted sum, as the candidates are ranked). Their U-Net rows
        count in this call's cost; `prompts.sampling=adaptive` steers by these rewards (rlalign/prompts.py)."""
        assert self.scorer is not None
        n = min(self.cfg.plain_images, len(batch))
        idx = torch.arange(n) * (len(batch) // n)
        sub = PromptBatch([batch.prompts[i] for i in idx.tolist()], batch.group_ids[idx], batch.seeds[idx])
        plain = self.generate(sub, branch=False)
        scores = np.asarray(self.scorer.score(plain.images, plain.prompts), dtype=np.float64)
        return PlainScores(list(plain.prompts), scores)

    def _noise(self, gens: list[torch.Generator], k: int) -> Tensor:
        """[k, B, C, h, w] standard normal, drawn per image from its own generator (batch-independent)."""
        shape = self.parts.latent_shape
        per_image = [torch.randn((k, *shape), generator=g) for g in gens]
        return torch.stack(per_image, 1).to(self.parts.device)

    # ------------------------------------------------------------------ branching (TailorPO / TailorPO-G)
    def _branch(
        self,
        cfg: BranchCfg,
        gens: list[torch.Generator],
        batch: PromptBatch,
        cond: Tensor,
        mean: Tensor,
        std: Tensor,
        t: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """One branched step. Returns (x_w (continues), x_l, valid [B], r_w [B], r_l [B], eps at (x_w, s) or None)."""

        assert self.scorer is not None
        k, b = cfg.num_candidates, mean.shape[0]
        s = prev_timestep(self.parts.scheduler, t)
        cand = mean[None] + _bcast(std, mean)[None] * self._noise(gens, k)  # [k, B, C, h, w]
        flat = cand.reshape(k * b, *mean.shape[1:])
        cond_k = cond.repeat(k, 1, 1)
        e_c = self._eps(flat, s, cond_k) if int(s) >= 0 else None  # reused for the winner's next step
        targets = self._reward_targets(cfg.target, flat, e_c, s, cond_k)
        prompts = list(batch.prompts) * k
        rewards = torch.from_numpy(np.asarray(self.scorer.score(self._decode_uint8(targets), prompts))).float()
        rewards = rewards.reshape(k, b)
        w_idx, l_idx, valid = rank_candidates(rewards, cfg.tie_eps)  # best vs worst; ties give no pair
        rows = torch.arange(b)
        r_w, r_l = rewards[w_idx, rows], rewards[l_idx, rows]
        x_w, x_l = cand[w_idx, rows], cand[l_idx, rows]
        e_k = None if e_c is None else e_c.reshape(k, b, *mean.shape[1:])
        e_next = None if e_k is None else e_k[w_idx, rows]
        if cfg.guide and self.scorer.differentiable:
            if cfg.guide_loser:  # before x_w moves: both start from the candidates' eps
                e_l = None if e_k is None else e_k[l_idx, rows]
                x_l = self._guide(cfg, x_l, e_l, s, cond, list(batch.prompts), std, sign=-1.0)
            x_w = self._guide(cfg, x_w, e_next, s, cond, list(batch.prompts), std)
            e_next = self._eps(x_w, s, cond) if int(s) >= 0 else None  # x moved: its eps must be recomputed
        return x_w, x_l, valid, r_w, r_l, e_next

    def _reward_targets(self, target: str, flat: Tensor, e_c: Tensor | None, s: Tensor, cond: Tensor) -> Tensor:
        """Latents whose decoded image the step-wise reward scores."""
        if target == "noisy" or int(s) < 0:
            return flat  # at the last step the candidates are final latents
        if target == "x0_hat":
            assert e_c is not None
            return predicted_x0(self.parts.scheduler, e_c, s, flat)
        return self._complete(flat, s, cond)  # final: deterministic DDIM (eta = 0) to the end

    def _complete(self, x: Tensor, s: Tensor, cond: Tensor) -> Tensor:
        sched = self.parts.scheduler
        for t in sched.timesteps[sched.timesteps <= int(s)]:
            mean, _ = ddim_mean_std(sched, self._eps(x, t, cond), t, x, 0.0)
            x = mean
        return x

    def _guide(
        self,
        cfg: BranchCfg,
        x_w: Tensor,
        e_w: Tensor | None,
        s: Tensor,
        cond: Tensor,
        prompts: list[str],
        std: Tensor,
        sign: float = 1.0,
    ) -> Tensor:
        """x^+ = x^w + sign * eta_g * normalise(d reward / d x^w), chained through x0-hat and the VAE decoder
        (docs/algorithms.md section 6). `e_w` is the guided eps the candidates' scoring already computed at (x^w, s):
        stopgrad_eps holds it fixed, so it is reused rather than recomputed (2 U-Net rows per image and step saved)."""

        assert self.scorer is not None
        x = x_w.detach().requires_grad_(True)
        with torch.enable_grad():
            if int(s) >= 0 and cfg.target != "noisy":
                if cfg.guidance_mode == "full":
                    e = self._eps(x, s, cond)
                else:
                    assert e_w is not None, "stopgrad_eps guidance reuses the candidates' eps"
                    e = e_w.detach()
                x0 = predicted_x0(self.parts.scheduler, e, s, x)
            else:
                x0 = x
            img = self.parts.decode(x0)  # [B, 3, H, W] in [0, 1]
            pixels = img.detach().permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            _, grad_pixels = self.scorer.score_and_grad(pixels, prompts)
            grad_img = torch.from_numpy(np.ascontiguousarray(grad_pixels)).permute(0, 3, 1, 2).to(img)
            (g,) = torch.autograd.grad(img, x, grad_outputs=grad_img)
        return guided_candidate(x_w, g, sign * cfg.guidance_step, std=std, norm=cfg.guidance_norm)


def _bcast(std: Tensor, like: Tensor) -> Tensor:
    """std [B] or [] -> broadcastable against like [B, C, h, w]."""
    std = std.to(like)
    return std.reshape(-1, *([1] * (like.ndim - 1))) if std.ndim else std
