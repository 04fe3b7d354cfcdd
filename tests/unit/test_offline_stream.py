"""The offline pair stream (rlalign/offline/stream.py): seeded epochs, exact resume, and the learner batch it makes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlalign.algos.diffusion_dpo import pair_final_latents
from rlalign.offline.stream import PairStream, mix, offline_scored
from rlalign.pairing import best_vs_worst
from rlalign.types import Rollout, ScoredRollouts


class FakeSource:
    """Pair i has x0_w filled with i, x0_l with -i, its caption embedding with 10 i."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def take(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(index, dtype=torch.float32).view(-1, 1, 1, 1)
        return {
            "x0_w": i.expand(-1, 2, 3, 3).clone(),
            "x0_l": (-i).expand(-1, 2, 3, 3).clone(),
            "cond": (10 * i[:, :, :, 0]).expand(-1, 4, 5).clone(),
            "tie": torch.zeros(len(index), dtype=torch.bool),
            "row": torch.as_tensor(index),
        }


def test_each_epoch_visits_every_pair_once_and_batches_cross_epochs() -> None:
    stream = PairStream(FakeSource(10), pairs_per_batch=4, seed=3)
    drawn = np.concatenate([stream.next_indices() for _ in range(5)])  # 20 pairs: two whole epochs
    assert sorted(drawn[:10].tolist()) == list(range(10)) and sorted(drawn[10:].tolist()) == list(range(10))
    assert drawn[:10].tolist() != drawn[10:].tolist()  # each epoch has its own order
    assert stream.state_dict() == {"epoch": 2, "offset": 0, "pairs_seen": 20}
    again = PairStream(FakeSource(10), pairs_per_batch=4, seed=3)
    assert np.concatenate([again.next_indices() for _ in range(5)]).tolist() == drawn.tolist()  # seeded
    other = PairStream(FakeSource(10), pairs_per_batch=4, seed=4)
    assert np.concatenate([other.next_indices() for _ in range(5)]).tolist() != drawn.tolist()


def test_a_resumed_stream_draws_what_the_uninterrupted_one_draws() -> None:
    whole = PairStream(FakeSource(7), pairs_per_batch=3, seed=0)
    expected = [whole.next_indices().tolist() for _ in range(6)]
    first = PairStream(FakeSource(7), pairs_per_batch=3, seed=0)
    head = [first.next_indices().tolist() for _ in range(2)]  # stops inside epoch 0 (offset 6 of 7)
    resumed = PairStream(FakeSource(7), pairs_per_batch=3, seed=0)
    resumed.load_state_dict(first.state_dict())
    assert head + [resumed.next_indices().tolist() for _ in range(4)] == expected


def test_an_empty_source_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        PairStream(FakeSource(0), pairs_per_batch=2, seed=0)


def test_offline_batch_pairs_the_preferred_image_over_the_other() -> None:
    pairs = FakeSource(5).take(np.array([3, 1, 4]))
    scored = offline_scored(pairs, eta=1.0, guidance_scale=5.0)
    r = scored.rollout
    assert len(r) == 6 and r.latents.shape == (6, 1, 2, 3, 3)
    win, lose = best_vs_worst(r.group_ids, scored.scores, 0.0)
    assert win.tolist() == [0, 1, 2] and lose.tolist() == [3, 4, 5]  # preferred rows first, scored 1 against 0
    x0_w, x0_l, cond_w, cond_l = pair_final_latents(scored, 0.0)
    assert x0_w[:, 0, 0, 0].tolist() == [3.0, 1.0, 4.0] and x0_l[:, 0, 0, 0].tolist() == [-3.0, -1.0, -4.0]
    assert torch.equal(cond_w, cond_l) and cond_w[:, 0, 0].tolist() == [30.0, 10.0, 40.0]  # one caption per pair
    assert scored.metrics["offline/pairs"] == 3.0


def _online(groups: int, per_group: int, steps: int) -> ScoredRollouts:
    b = groups * per_group
    latents = torch.randn(b, steps + 1, 2, 3, 3)
    rollout = Rollout(
        prompts=[f"p{i // per_group}" for i in range(b)],
        group_ids=torch.arange(groups).repeat_interleave(per_group),
        seeds=torch.arange(b),
        images=np.zeros((b, 8, 8, 3), np.uint8),
        latents=latents,
        log_probs=torch.zeros(b, steps),
        timesteps=torch.arange(steps),
        prompt_embeds=torch.randn(b, 4, 5),
        negative_embeds=torch.zeros(1, 4, 5),
        policy_version=2,
        eta=1.0,
        guidance_scale=5.0,
    )
    scores = torch.randn(b)
    return ScoredRollouts(rollout, scores, {"digit_prompt": scores.clone()}, {"reward/weighted/mean": 0.1})


def test_mixing_keeps_online_pairs_and_offline_pairs_apart() -> None:
    online = _online(groups=2, per_group=3, steps=4)
    offline = offline_scored(FakeSource(5).take(np.array([2, 0])), eta=1.0, guidance_scale=5.0)
    both = mix(online, offline)
    r = both.rollout
    assert len(r) == 6 + 4 and r.latents.shape[1] == 1
    assert torch.equal(r.latents[:6, 0], online.rollout.latents[:, -1])  # online x0 kept
    x0_w, x0_l, _, _ = pair_final_latents(both, 0.0)
    on_w, on_l, _, _ = pair_final_latents(online, 0.0)
    assert torch.equal(x0_w[:2], on_w) and torch.equal(x0_l[:2], on_l)  # the online groups pair as before
    assert x0_w[2:, 0, 0, 0].tolist() == [2.0, 0.0] and x0_l[2:, 0, 0, 0].tolist() == [-2.0, -0.0]
    assert math.isnan(float(both.components["digit_prompt"][-1])) and both.metrics["offline/online_rows"] == 6.0
