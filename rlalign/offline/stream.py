"""A seeded, resumable stream of encoded preference pairs, and the learner batch made from it (docs/offline.md).

Imports only torch and numpy (plus the cache reader): pure bookkeeping, unit-tested without Ray.

Order: epoch e visits every pair once in the permutation `default_rng([seed, e])`; a batch that crosses the end
of an epoch takes the rest from the next one. The position (epoch, offset) is all the state there is: checkpoints
save it and a resumed run draws exactly the batches the uninterrupted run would have drawn.

A batch becomes the same `ScoredRollouts` online sampling gives the pair-wise algorithms (Diffusion-DPO, DDE, NCP):
pair i is group i with two rows, the preferred image scored 1 and the other 0, so `best_vs_worst` pairs them as the
people did. Only what those algorithms read is real: the final latents (`latents[:, -1]`), the prompt embeddings
and the group ids. There is no trajectory (`latents` holds x0 alone, no log-probs, no timesteps) and no image
(offline rows are never scored by a reward model); the unconditional embedding is zeros because none of these
losses uses classifier-free guidance (rlalign/algos/diffusion_dpo.py, dde.py, ncp.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from rlalign.types import Rollout, ScoredRollouts

OFFLINE_VERSION = -1  # policy_version of offline rows: no sampler rendered them


class PairSource(Protocol):
    def __len__(self) -> int: ...

    def take(self, index: np.ndarray) -> dict[str, Tensor]: ...


@dataclass
class StreamState:
    epoch: int = 0
    offset: int = 0  # pairs of this epoch's permutation already handed out
    pairs_seen: int = 0


class PairStream:
    def __init__(self, source: PairSource, pairs_per_batch: int, seed: int) -> None:
        if len(source) == 0:
            raise ValueError("the preference stream is empty")
        self.source, self.pairs, self.seed = source, pairs_per_batch, seed
        self.state = StreamState()
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source)))
        return self._perm[1]

    def next_indices(self, n: int | None = None) -> np.ndarray:
        """Global pair positions of the next batch (advances the state)."""
        need, out = n or self.pairs, []
        s = self.state
        while need:
            perm = self._permutation(s.epoch)
            got = perm[s.offset : s.offset + need]
            out.append(got)
            need -= len(got)
            s.offset += len(got)
            s.pairs_seen += len(got)
            if s.offset == len(perm):
                s.epoch, s.offset = s.epoch + 1, 0
        return np.concatenate(out)

    def next(self, n: int | None = None) -> dict[str, Tensor]:
        return self.source.take(self.next_indices(n))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "offset": self.state.offset, "pairs_seen": self.state.pairs_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = StreamState(int(state["epoch"]), int(state["offset"]), int(state.get("pairs_seen", 0)))


def offline_scored(pairs: dict[str, Tensor], *, eta: float, guidance_scale: float) -> ScoredRollouts:
    """Pairs (x0_w, x0_l [P,C,h,w], cond [P,L,D], tie [P]) -> rows [preferred..., other...], group i = pair i."""
    p = pairs["x0_w"].shape[0]
    x0 = torch.cat([pairs["x0_w"], pairs["x0_l"]]).float()
    cond = torch.cat([pairs["cond"], pairs["cond"]]).float()
    ids = torch.arange(p, dtype=torch.int64).repeat(2)
    rollout = Rollout(
        prompts=[""] * (2 * p),  # captions live in the cache; the learner never re-encodes text
        group_ids=ids,
        seeds=torch.full((2 * p,), -1, dtype=torch.int64),
        images=np.zeros((2 * p, 0, 0, 3), np.uint8),
        latents=x0.unsqueeze(1),
        log_probs=torch.zeros(2 * p, 0),
        timesteps=torch.zeros(0, dtype=torch.int64),
        prompt_embeds=cond,
        negative_embeds=torch.zeros(1, *cond.shape[1:]),
        policy_version=OFFLINE_VERSION,
        eta=eta,
        guidance_scale=guidance_scale,
    )
    scores = torch.cat([torch.ones(p), torch.zeros(p)])
    tie = pairs["tie"].float()
    metrics = {"offline/pairs": float(p), "offline/tie_frac": float(tie.mean()) if p else 0.0}
    return ScoredRollouts(rollout, scores, {"preference": scores.clone()}, metrics)


def final_latents_only(scored: ScoredRollouts) -> ScoredRollouts:
    """An online batch reduced to what pair-wise losses read (x0, prompts' embeddings, groups), so it can join
    offline pairs: the trajectory, log-probs and images are dropped."""
    r = scored.rollout
    slim = replace(
        r,
        images=np.zeros((len(r), 0, 0, 3), np.uint8),
        latents=r.latents[:, -1:],
        log_probs=torch.zeros(len(r), 0),
        timesteps=torch.zeros(0, dtype=torch.int64),
        step_pairs=None,
    )
    return replace(scored, rollout=slim)


def mix(online: ScoredRollouts, offline: ScoredRollouts) -> ScoredRollouts:
    """Online rows first, then offline pairs with group ids shifted past the online ones; scores are only compared
    inside a group, so the two scales never meet."""
    on, off = final_latents_only(online).rollout, offline.rollout
    shift = int(on.group_ids.max()) + 1 if len(on) else 0
    rollout = replace(
        on,
        prompts=[*on.prompts, *off.prompts],
        group_ids=torch.cat([on.group_ids, off.group_ids + shift]),
        seeds=torch.cat([on.seeds, off.seeds]),
        images=np.zeros((len(on) + len(off), 0, 0, 3), np.uint8),
        latents=torch.cat([on.latents, off.latents]),
        log_probs=torch.zeros(len(on) + len(off), 0),
        prompt_embeds=torch.cat([on.prompt_embeds, off.prompt_embeds.to(on.prompt_embeds.dtype)]),
    )
    components = {k: torch.cat([v, torch.full((len(off),), float("nan"))]) for k, v in online.components.items()}
    metrics = {**online.metrics, **offline.metrics, "offline/online_rows": float(len(on))}
    return ScoredRollouts(rollout, torch.cat([online.scores, offline.scores]), components, metrics)
