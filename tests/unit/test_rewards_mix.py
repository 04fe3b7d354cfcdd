"""WeightedMix: hand-computed totals, running and per-group normalisation, state round-trip, gradients."""

from __future__ import annotations

import numpy as np
import pytest

from reward_servers.mix import RunningMeanStd, WeightedMix, group_normalize
from reward_servers.simple import Brightness


class Table:
    """Returns fixed scores in order, batch after batch (so the mix's arithmetic can be checked by hand)."""

    differentiable = False

    def __init__(self, name: str, *batches: list[float]) -> None:
        self.name, self.batches = name, list(batches)

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        return np.asarray(self.batches.pop(0), np.float32)


IMGS = np.zeros((3, 2, 2, 3), np.uint8)
PROMPTS = ["a", "b", "c"]


def test_weighted_sum_returns_total_and_raw_components() -> None:
    # 2 * [1, 2, 3] + (-0.5) * [10, 0, 4] = [2 - 5, 4 - 0, 6 - 2] = [-3, 4, 4]
    mix = WeightedMix([(Table("a", [1, 2, 3]), 2.0), (Table("b", [10, 0, 4]), -0.5)])
    total, parts = mix.score_components(IMGS, PROMPTS)
    np.testing.assert_allclose(total, [-3, 4, 4])
    assert total.dtype == np.float32
    np.testing.assert_allclose(parts["a"], [1, 2, 3])
    np.testing.assert_allclose(parts["b"], [10, 0, 4])


def test_repeated_names_are_disambiguated() -> None:
    mix = WeightedMix([(Table("a", [1, 1, 1]), 1.0), (Table("a", [2, 2, 2]), 1.0)])
    _, parts = mix.score_components(IMGS, PROMPTS)
    assert sorted(parts) == ["a", "a#1"]


def test_running_normalisation_matches_numpy_over_all_batches_seen() -> None:
    b1, b2 = [1.0, 2.0, 6.0], [0.0, 4.0, 5.0]
    mix = WeightedMix([(Table("a", b1, b2), 3.0)], normalize="running", eps=0.0)
    mix.score(IMGS, PROMPTS)
    total = mix.score(IMGS, PROMPTS)
    seen = np.array(b1 + b2)
    np.testing.assert_allclose(total, 3.0 * (np.array(b2) - seen.mean()) / seen.std(), rtol=1e-6)
    st = mix.state_dict()["stats"]["a"]
    assert st["count"] == 6 and st["mean"] == pytest.approx(seen.mean())

    # state round-trip: a fresh mix with the loaded state normalises the next batch identically
    b3 = [7.0, 1.0, 3.0]
    fresh = WeightedMix([(Table("a", b3), 3.0)], normalize="running", eps=0.0)
    fresh.load_state_dict(mix.state_dict())
    mix.models[0].batches.append(b3)
    np.testing.assert_allclose(fresh.score(IMGS, PROMPTS), mix.score(IMGS, PROMPTS))


def test_running_mean_std_is_exact_in_any_chunking() -> None:
    x = np.random.default_rng(0).normal(3.0, 2.0, 101)
    rms = RunningMeanStd()
    for chunk in np.array_split(x, [1, 2, 30, 31, 80]):
        rms.update(chunk)
    assert rms.mean == pytest.approx(x.mean()) and rms.std == pytest.approx(x.std())


def test_group_normalisation_is_within_groups() -> None:
    # group 0: [1, 3] -> mean 2, std 1 -> [-1, 1]; group 1: [5] alone -> 0; group 2: [2, 2] -> std 0 -> [0, 0]
    x = np.array([1.0, 5.0, 3.0, 2.0, 2.0])
    ids = np.array([0, 1, 0, 2, 2])
    np.testing.assert_allclose(group_normalize(x, ids, eps=0.0 + 1e-12), [-1, 0, 1, 0, 0], atol=1e-9)
    imgs = np.zeros((5, 2, 2, 3), np.uint8)
    mix = WeightedMix([(Table("a", list(x)), 2.0)], normalize="group", eps=1e-12)
    total, parts = mix.score_components(imgs, list("abcde"), group_ids=ids)
    np.testing.assert_allclose(total, [-2, 0, 2, 0, 0], atol=1e-6)
    np.testing.assert_allclose(parts["a"], x)  # components stay raw
    assert not mix.differentiable


def test_group_ids_must_match_batch() -> None:
    mix = WeightedMix([(Table("a", [1, 2, 3]), 1.0)], normalize="group")
    with pytest.raises(ValueError, match="group_ids"):
        mix.score_components(IMGS, PROMPTS, group_ids=[0, 1])


def test_bad_normalize_and_empty_mix_are_refused() -> None:
    with pytest.raises(ValueError, match="normalize"):
        WeightedMix([(Brightness(), 1.0)], normalize="zscore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        WeightedMix([])


def test_mix_gradient_is_weighted_sum_of_component_gradients() -> None:
    x = np.random.default_rng(0).random((2, 3, 4, 3), dtype=np.float32)
    mix = WeightedMix([(Brightness(), 2.0), (Brightness(), -0.5)])
    s, g = mix.score_and_grad(x, ["a", "b"])
    np.testing.assert_allclose(s, 1.5 * x.reshape(2, -1).mean(1), rtol=1e-6)
    np.testing.assert_allclose(g, np.full_like(x, 1.5 / x[0].size), rtol=1e-6)


def test_running_mix_gradient_scales_by_running_std() -> None:
    mix = WeightedMix([(Brightness(), 2.0)], normalize="running", eps=0.0)
    imgs = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (0, 51, 255)])  # brightness 0, 0.2, 1
    mix.score(imgs, PROMPTS)
    std = np.std([0.0, 0.2, 1.0])
    x = np.full((1, 2, 2, 3), 0.5, np.float32)
    s, g = mix.score_and_grad(x, ["a"])
    np.testing.assert_allclose(s, 2.0 * (0.5 - 0.4) / std, rtol=1e-5)
    np.testing.assert_allclose(g, np.full_like(x, 2.0 / std / 12), rtol=1e-5)
    assert mix.state_dict()["stats"]["brightness"]["count"] == 3  # score_and_grad did not update the stats
