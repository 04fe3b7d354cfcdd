"""Pairing and normalisation inside groups (stage 4): scores -> winner/loser row indices, advantages.

Pure: imports only torch. A group is one prompt sampled several times (`group_ids` equal); pairs and advantages
never cross groups. Shapes: B rows (images), P pairs, k candidates per step (TailorPO).
Groups are visited in ascending group id, so outputs are deterministic for fixed inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _groups(group_ids: Tensor) -> list[Tensor]:
    """Row indices of each group, ascending group id, rows in ascending order."""
    ids = group_ids.long().cpu()
    return [torch.nonzero(ids == g).flatten() for g in torch.unique(ids)]


def best_vs_worst(group_ids: Tensor, scores: Tensor, min_gap: float = 0.0) -> tuple[Tensor, Tensor]:
    """One (winner, loser) pair per group: the highest against the lowest score.

    group_ids [B] int, scores [B] float -> (win_idx [P], lose_idx [P]) int64 row indices (P <= number of groups).
    A group gives no pair when `max - min <= min_gap` (with the default 0 only exact ties, and single-row groups,
    are dropped). Among equal maxima (minima) the first row wins (loses).
    """
    if group_ids.shape != scores.shape or scores.ndim != 1:
        raise ValueError(f"need group_ids and scores of one shape [B], got {group_ids.shape} and {scores.shape}")
    sc = scores.detach().cpu().double()
    win: list[int] = []
    lose: list[int] = []
    for rows in _groups(group_ids):
        s = sc[rows]
        hi, lo = int(torch.argmax(s)), int(torch.argmin(s))
        if s[hi] - s[lo] > min_gap:
            win.append(int(rows[hi]))
            lose.append(int(rows[lo]))
    return torch.tensor(win, dtype=torch.long), torch.tensor(lose, dtype=torch.long)


def all_pairs_above_margin(group_ids: Tensor, scores: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Every ordered pair (i, j) inside a group with `scores[i] - scores[j] > margin` -> (win_idx, lose_idx) [P]."""
    if group_ids.shape != scores.shape or scores.ndim != 1:
        raise ValueError(f"need group_ids and scores of one shape [B], got {group_ids.shape} and {scores.shape}")
    sc = scores.detach().cpu().double()
    win: list[Tensor] = []
    lose: list[Tensor] = []
    for rows in _groups(group_ids):
        s = sc[rows]
        i, j = torch.nonzero(s[:, None] - s[None, :] > margin, as_tuple=True)
        win.append(rows[i])
        lose.append(rows[j])
    if not win:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(win).long(), torch.cat(lose).long()


def group_normalize(group_ids: Tensor, scores: Tensor, eps: float = 1e-8, clamp: float | None = 5.0) -> Tensor:
    """Per-group advantage `(s - mean_g) / (std_g + eps)`, clamped to [-clamp, clamp] (DDPO, docs/algorithms.md 10).

    std is the population std (numpy's default, as ddpo-pytorch); a single-row group gets advantage 0.
    scores [B] -> [B] float32 on the scores' device.
    """
    if group_ids.shape != scores.shape or scores.ndim != 1:
        raise ValueError(f"need group_ids and scores of one shape [B], got {group_ids.shape} and {scores.shape}")
    sc = scores.detach().cpu().double()
    adv = torch.zeros_like(sc)
    for rows in _groups(group_ids):
        s = sc[rows]
        adv[rows] = (s - s.mean()) / (s.std(unbiased=False) + eps)
    if clamp is not None:
        adv = adv.clamp(-clamp, clamp)
    return adv.float().to(scores.device)


def step_best_vs_worst(rewards: Tensor, tie_eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """TailorPO step-level ranking of k candidates branched from one x_t (docs/algorithms.md section 5).

    rewards [k, B] step-wise rewards -> (win_idx [B], lose_idx [B], valid [B] bool): best vs worst candidate of
    each row; `valid` is False when `max - min <= tie_eps` (ties give no pair). For invalid rows the indices are
    still argmax/argmin, and the sampler still continues from win_idx (the first of equal maxima).
    """
    if rewards.ndim != 2 or rewards.shape[0] < 2:
        raise ValueError(f"need rewards [k >= 2, B], got {tuple(rewards.shape)}")
    r = rewards.detach()
    hi, lo = r.argmax(dim=0), r.argmin(dim=0)
    gap = r.max(dim=0).values - r.min(dim=0).values
    valid = gap > tie_eps
    return hi, lo, valid
