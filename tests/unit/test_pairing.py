"""Pairing and per-group normalisation."""

from __future__ import annotations

import pytest
import torch

from rlalign.pairing import all_pairs_above_margin, best_vs_worst, group_normalize, step_best_vs_worst


def test_best_vs_worst_per_group_with_ties_and_gap() -> None:
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    scores = torch.tensor([0.1, 0.9, 0.5, 2.0, 2.0, 1.0, 1.3, 5.0])
    win, lose = best_vs_worst(groups, scores)
    # group 0: best row 1, worst row 0; group 1 tie -> none; group 2: 6 vs 5; group 3 single row -> none
    assert win.tolist() == [1, 6] and lose.tolist() == [0, 5]
    win, lose = best_vs_worst(groups, scores, min_gap=0.5)  # group 2 gap 0.3 <= 0.5 dropped
    assert win.tolist() == [1] and lose.tolist() == [0]
    win, lose = best_vs_worst(groups, -scores)  # swapping the order swaps the roles
    assert win.tolist() == [0, 5] and lose.tolist() == [1, 6]
    with pytest.raises(ValueError):
        best_vs_worst(groups, scores[:3])


def test_all_pairs_above_margin() -> None:
    groups = torch.tensor([0, 0, 0, 1, 1])
    scores = torch.tensor([0.0, 1.0, 3.0, 1.0, 1.0])
    win, lose = all_pairs_above_margin(groups, scores, margin=0.5)
    assert sorted(zip(win.tolist(), lose.tolist(), strict=True)) == [(1, 0), (2, 0), (2, 1)]
    win, _ = all_pairs_above_margin(groups, scores, margin=1.5)
    assert win.tolist() == [2, 2]


def test_group_normalize_is_per_group_and_clamped() -> None:
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    scores = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0, 7.0])
    adv = group_normalize(groups, scores)
    # group 0: mean 2, population std 1 -> [-1, 1]; group 1: mean 20, std sqrt(200/3); single row -> 0
    s1 = (200 / 3) ** 0.5
    expected = torch.tensor([-1.0, 1.0, -10 / s1, 0.0, 10 / s1, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    # a constant shift of one group leaves every advantage unchanged (stats are per group, not global)
    torch.testing.assert_close(group_normalize(groups, scores + torch.tensor([100.0, 100, 0, 0, 0, 0])), adv)
    outlier = group_normalize(
        torch.zeros(101, dtype=torch.long), torch.cat([torch.zeros(100), torch.ones(1)]), clamp=5.0
    )
    assert float(outlier.max()) == 5.0


def test_step_best_vs_worst() -> None:
    rewards = torch.tensor([[0.1, 0.5, 1.0], [0.3, 0.5, 0.0], [0.2, 0.5, 2.0]])  # [k=3, B=3]
    win, lose, valid = step_best_vs_worst(rewards)
    assert win.tolist() == [1, 0, 2] and lose.tolist() == [0, 0, 1] and valid.tolist() == [True, False, True]
    _, _, valid = step_best_vs_worst(rewards, tie_eps=1.5)
    assert valid.tolist() == [False, False, True]
