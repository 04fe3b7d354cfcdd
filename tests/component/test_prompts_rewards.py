"""Prompt source (determinism, cursor, group ids, seeds vs eval seeds) and the reward set (weighted merge, metrics,
normalisation, errors that name the reward). No diffusion model: rollouts are synthetic images."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from reward_servers.base import RewardServer
from reward_servers.digit_prompt import digit_from_prompt
from reward_servers.registry import make_reward
from rlalign.config import EvalCfg, PromptsCfg, RewardSpec, load_config
from rlalign.prompts import PromptRewards, PromptSource, PromptSourceState, eval_batches, load_prompts
from rlalign.rewards import LocalRewardHandle, RewardError, RewardSet
from rlalign.types import PromptBatch, Rollout, concat_rollouts

# ---------------------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------------------


def flat(batches: list[PromptBatch]) -> tuple[list[str], list[int], list[int]]:
    return (
        [p for b in batches for p in b.prompts],
        [int(g) for b in batches for g in b.group_ids],
        [int(s) for b in batches for s in b.seeds],
    )


def test_prompt_source_is_deterministic_per_seed() -> None:
    cfg = PromptsCfg()
    a = [flat(PromptSource(cfg, 3).next(4, 2, 2)) for _ in range(2)]
    assert a[0] == a[1]
    src1, src2 = PromptSource(cfg, 3), PromptSource(cfg, 3)
    for _ in range(5):
        assert flat(src1.next(3, 2, 2)) == flat(src2.next(3, 2, 2))
    other = flat(PromptSource(cfg, 4).next(4, 2, 2))
    assert other[0] != a[0][0], "another run seed should shuffle the prompts differently"


def test_prompt_source_layout_and_cursor() -> None:
    cfg = PromptsCfg()
    src = PromptSource(cfg, 0)
    batches = src.next(3, 4, 2)
    assert len(batches) == 2 and all(len(b) == 12 for b in batches)
    assert src.state == PromptSourceState(cursor=6, images=24, groups=6)
    for b in batches:
        for g in range(3):
            rows = slice(4 * g, 4 * g + 4)
            assert len(set(b.prompts[rows])) == 1, "a group is one prompt repeated"
            assert len(set(b.group_ids[rows].tolist())) == 1
            assert len(set(b.seeds[rows].tolist())) == 4, "distinct seeds inside a group"
    # an epoch visits every prompt exactly once
    n = len(src.prompts)
    epoch = PromptSource(cfg, 0).next(n, 1, 1)[0]
    assert sorted(epoch.prompts) == sorted(load_prompts(cfg))


def test_prompt_source_resumes_from_its_state() -> None:
    cfg = PromptsCfg()
    straight = PromptSource(cfg, 5)
    straight.next(7, 2, 1)
    expected = flat(straight.next(3, 2, 2))
    first = PromptSource(cfg, 5)
    first.next(7, 2, 1)
    resumed = PromptSource(cfg, 5)
    resumed.state = replace(first.state)
    assert flat(resumed.next(3, 2, 2)) == expected
    # wrapping past an epoch reshuffles but keeps going
    many = PromptSource(cfg, 5).next(len(straight.prompts) + 5, 1, 1)[0]
    assert len(many) == len(straight.prompts) + 5


def test_prompt_rewards_probabilities_by_hand() -> None:
    tracker = PromptRewards(["a", "b", "c", "d"], floor=0.5, decay=0.5)
    np.testing.assert_allclose(tracker.probabilities(), [0.25] * 4)  # nothing seen: uniform
    tracker.observe(["a", "a", "b", "c"], np.array([1.0, 0.8, 0.9, 0.5]))
    assert tracker.means == pytest.approx({"a": 0.9, "b": 0.9, "c": 0.5})
    # gaps to the best mean 0.9: a 0, b 0, c 0.4, d unseen -> the largest seen gap 0.4; sum 0.8
    np.testing.assert_allclose(tracker.probabilities(), [0.125, 0.125, 0.125 + 0.25, 0.125 + 0.25])
    tracker.observe(["c", "d"], np.array([0.7, 0.9]))  # c: 0.5 * 0.5 + 0.5 * 0.7 = 0.6; d first seen: 0.9
    assert tracker.means["c"] == pytest.approx(0.6) and tracker.means["d"] == pytest.approx(0.9)
    np.testing.assert_allclose(tracker.probabilities(), [0.125, 0.125, 0.625, 0.125])
    # any scale and offset of the reward gives the same draw
    shifted = PromptRewards(["a", "b", "c", "d"], floor=0.5, decay=0.5)
    shifted.load_state_dict({k: 10 * v - 3 for k, v in tracker.state_dict().items()})
    np.testing.assert_allclose(shifted.probabilities(), tracker.probabilities())
    equal = PromptRewards(["a", "b"], floor=0.0, decay=0.5)
    equal.observe(["a", "b"], np.array([0.3, 0.3]))
    np.testing.assert_allclose(equal.probabilities(), [0.5, 0.5])  # no gap anywhere: uniform
    with pytest.raises(ValueError, match="2 prompts but 1 rewards"):
        equal.observe(["a", "b"], np.array([0.3]))


def test_adaptive_source_favours_low_reward_prompts_and_resumes_exactly() -> None:
    cfg = PromptsCfg(sampling="adaptive", adaptive_floor=0.2)
    src = PromptSource(cfg, 3)
    hard = [p for p in src.prompts if digit_from_prompt(p) == 8]
    assert len(hard) == len(src.prompts) // 10
    first = flat(src.next(8, 1, 2))[0]
    assert len(set(first)) > 10  # nothing observed yet: spread over the list
    assert src.rewards is not None
    src.rewards.observe(src.prompts, np.array([0.1 if p in hard else 0.95 for p in src.prompts]))
    share = np.mean([p in hard for p in flat(src.next(200, 1, 1))[0]])
    # expected: 0.2 * (hard / N) + 0.8 * 1 (only the hard prompts have a gap)
    expected = 0.2 * len(hard) / len(src.prompts) + 0.8
    assert abs(share - expected) < 0.06
    # a resumed source (cursor + running rewards) draws exactly what the uninterrupted one draws
    resumed = PromptSource(cfg, 3)
    resumed.state = replace(src.state)
    assert resumed.rewards is not None
    resumed.rewards.load_state_dict(src.rewards.state_dict())
    assert flat(resumed.next(5, 2, 2)) == flat(src.next(5, 2, 2))


def test_group_ids_are_unique_per_group_across_splits_and_calls() -> None:
    src = PromptSource(PromptsCfg(), 0)
    seen: dict[int, tuple[str, set[int]]] = {}
    all_seeds: list[int] = []
    for _ in range(4):
        for b in src.next(2, 3, 3):
            for p, g, s in zip(b.prompts, b.group_ids.tolist(), b.seeds.tolist()):
                prompt, seeds = seen.setdefault(g, (p, set()))
                assert prompt == p
                seeds.add(s)
                all_seeds.append(s)
    assert len(seen) == 4 * 2 * 3
    assert all(len(s) == 3 for _, s in seen.values())
    assert len(set(all_seeds)) == len(all_seeds), "training seeds never repeat"


@pytest.mark.parametrize("run_seed", [0, 1, 9, 10, 11, 12345])
def test_eval_seeds_are_disjoint_from_training_seeds(run_seed: int) -> None:
    cfg = PromptsCfg()
    eval_seed = EvalCfg().seed
    ev = eval_batches(cfg, 2, eval_seed, splits=3)
    ev_seeds = {int(s) for b in ev for s in b.seeds}
    assert len(ev_seeds) == sum(len(b) for b in ev) == 2 * len(load_prompts(cfg))
    src = PromptSource(cfg, run_seed)
    train_seeds = {int(s) for b in src.next(50, 4, 4) for s in b.seeds}  # 800 images
    assert not ev_seeds & train_seeds
    # a long run: a million training images of this run seed still never reach the eval seeds
    src.state = PromptSourceState(cursor=0, images=1_000_000, groups=0)
    far = {int(s) for b in src.next(50, 4, 1) for s in b.seeds}
    assert not ev_seeds & far
    lo, hi = run_seed * 1_000_003, max(far)
    assert not any(lo <= s <= hi for s in ev_seeds)


def test_eval_batches_are_fixed_and_split_evenly() -> None:
    cfg = PromptsCfg()
    a, b = eval_batches(cfg, 2, 100, splits=3), eval_batches(cfg, 2, 100, splits=3)
    assert flat(a) == flat(b)
    assert len(a) == 3 and max(len(x) for x in a) - min(len(x) for x in a) <= 1
    one = eval_batches(cfg, 2, 100, splits=1)
    assert flat(one) == flat(a), "splitting does not change which (prompt, seed) pairs are evaluated"
    assert min(flat(one)[2]) == 100


def test_prompt_file_source(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na cat\n\na dog\n")
    cfg = PromptsCfg(source="file", path=str(path))
    assert load_prompts(cfg) == ["a cat", "a dog"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(PromptsCfg(source="file", path=str(empty)))


# ---------------------------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------------------------


def synthetic_rollout(groups: int = 3, per_group: int = 4, seed: int = 0) -> Rollout:
    """Images with distinct brightness and detail per row; only prompts, group ids and images matter here."""
    rng = np.random.default_rng(seed)
    b = groups * per_group
    base = rng.integers(0, 256, size=(b, 1, 1, 3))
    noise = rng.integers(0, 256, size=(b, 16, 16, 3)) * rng.uniform(0, 1, size=(b, 1, 1, 1))
    images = ((base + noise) / 2).clip(0, 255).astype(np.uint8)
    steps = 2
    return Rollout(
        prompts=[f"prompt {i // per_group}" for i in range(b)],
        group_ids=torch.arange(groups).repeat_interleave(per_group),
        seeds=torch.arange(b),
        images=images,
        latents=torch.zeros(b, steps + 1, 4, 2, 2),
        log_probs=torch.zeros(b, steps),
        timesteps=torch.tensor([500, 0]),
        prompt_embeds=torch.zeros(b, 3, 8),
        negative_embeds=torch.zeros(1, 3, 8),
        policy_version=0,
        eta=1.0,
        guidance_scale=1.0,
    )


def reward_set(*specs: RewardSpec) -> RewardSet:
    names = RewardSet.component_names(list(specs))
    handles = [LocalRewardHandle(n, RewardServer(lambda s=s: make_reward(s.name))) for n, s in zip(names, specs)]
    return RewardSet(list(specs), handles)


def test_score_rollout_weighted_sum_and_metrics() -> None:
    r = synthetic_rollout()
    rs = reward_set(RewardSpec(name="jpeg", weight=0.5), RewardSpec(name="brightness", weight=2.0))
    scored = rs.score_rollout(r)
    jpeg = make_reward("jpeg").score(r.images, r.prompts)
    bright = make_reward("brightness").score(r.images, r.prompts)
    assert scored.components.keys() == {"jpeg", "brightness"}
    np.testing.assert_allclose(scored.components["jpeg"].numpy(), jpeg)
    np.testing.assert_allclose(scored.components["brightness"].numpy(), bright)
    np.testing.assert_allclose(scored.scores.numpy(), 0.5 * jpeg + 2.0 * bright, rtol=1e-6, atol=1e-6)
    assert scored.scores.dtype == torch.float32 and scored.scores.shape == (len(r),)
    assert scored.rollout is r
    m = scored.metrics
    assert m["reward/jpeg/mean"] == pytest.approx(float(jpeg.mean()))
    assert m["reward/jpeg/std"] == pytest.approx(float(jpeg.std()))
    assert m["reward/brightness/mean"] == pytest.approx(float(bright.mean()))
    assert m["reward/weighted/mean"] == pytest.approx(float((0.5 * jpeg + 2.0 * bright).mean()), rel=1e-5)
    total = 0.5 * jpeg + 2.0 * bright
    gids = r.group_ids.numpy()
    assert m["reward/group_std_mean"] == pytest.approx(
        float(np.mean([total[gids == g].std() for g in range(3)])), rel=1e-5
    )
    # the StepScorer view is the same raw weighted sum
    np.testing.assert_allclose(rs.score(r.images, r.prompts), total, rtol=1e-6, atol=1e-6)
    assert rs.differentiable  # brightness gives gradients


def test_group_normalisation_per_component() -> None:
    r = synthetic_rollout(groups=3, per_group=4)
    rs = reward_set(RewardSpec(name="brightness", weight=3.0, normalize="group"), RewardSpec(name="jpeg", weight=0.0))
    scored = rs.score_rollout(r)
    s = scored.scores.numpy() / 3.0
    gids = r.group_ids.numpy()
    for g in range(3):
        assert abs(s[gids == g].mean()) < 1e-5
        assert s[gids == g].std() == pytest.approx(1.0, abs=1e-3)
    # the raw component is still logged unnormalised
    np.testing.assert_allclose(
        scored.components["brightness"].numpy(), make_reward("brightness").score(r.images, r.prompts)
    )
    # ranking inside each group is the raw ranking
    raw = scored.components["brightness"].numpy()
    for g in range(3):
        assert (np.argsort(s[gids == g]) == np.argsort(raw[gids == g])).all()


def test_running_normalisation_state_roundtrip() -> None:
    spec = RewardSpec(name="brightness", normalize="running")
    rs = reward_set(spec)
    first = rs.score_rollout(synthetic_rollout(seed=0))
    assert abs(float(first.scores.mean())) < 1e-5
    state = rs.state_dict()
    again = reward_set(spec)
    again.load_state_dict(state)
    nxt = synthetic_rollout(seed=1)
    torch.testing.assert_close(again.score_rollout(nxt).scores, rs.score_rollout(nxt).scores)


def test_duplicate_reward_names_get_indexed_components() -> None:
    rs = reward_set(RewardSpec(name="brightness", weight=1.0), RewardSpec(name="brightness", weight=2.0))
    scored = rs.score_rollout(synthetic_rollout())
    assert set(scored.components) == {"brightness_0", "brightness_1"}
    torch.testing.assert_close(scored.scores, 3.0 * scored.components["brightness_0"])


class BadModel:
    differentiable = False

    def __init__(self, name: str, answer: Any) -> None:
        self.name, self.answer = name, answer

    def score(self, images: np.ndarray, prompts: Any) -> np.ndarray:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer(len(images))


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (lambda n: np.zeros(n - 1, np.float32), r"reward 'broken' returned \(11,\) scores for 12 images"),
        (lambda n: np.full(n, np.nan, np.float32), r"reward 'broken' returned non-finite scores at rows \[0, 1, "),
        (RuntimeError("model exploded"), r"reward 'broken' failed: RuntimeError: model exploded"),
    ],
)
def test_bad_reward_raises_reward_error_naming_it(answer: Any, match: str) -> None:
    good = RewardSpec(name="brightness")
    bad = RewardSpec(name="broken")
    handles = [
        LocalRewardHandle("brightness", RewardServer(lambda: make_reward("brightness"))),
        LocalRewardHandle("broken", BadModelServer(BadModel("broken", answer))),
    ]
    rs = RewardSet([good, bad], handles)
    with pytest.raises(RewardError, match=match):
        rs.score_rollout(synthetic_rollout())


class BadModelServer:
    """Like RewardServer but without its checks, so the model's garbage reaches the RewardSet."""

    differentiable = False

    def __init__(self, model: BadModel) -> None:
        self.model = model

    def score(self, images: np.ndarray, prompts: Any) -> np.ndarray:
        return self.model.score(images, prompts)


def test_score_and_grad_needs_a_differentiable_reward() -> None:
    rs = reward_set(RewardSpec(name="jpeg"))
    assert not rs.differentiable
    images = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(RewardError, match="no differentiable reward"):
        rs.score_and_grad(images, ["a", "b"])
    mixed = reward_set(RewardSpec(name="jpeg", weight=5.0), RewardSpec(name="brightness", weight=2.0))
    scores, grad = mixed.score_and_grad(np.full((2, 8, 8, 3), 0.25, np.float32), ["a", "b"])
    np.testing.assert_allclose(scores, [0.5, 0.5])  # only the differentiable part: 2 * 0.25
    np.testing.assert_allclose(grad, np.full((2, 8, 8, 3), 2.0 / (8 * 8 * 3)), rtol=1e-6)


def test_reward_specs_and_handles_must_match() -> None:
    with pytest.raises(ValueError, match="2 reward specs but 1 handles"):
        RewardSet([RewardSpec(name="jpeg"), RewardSpec(name="brightness")], [LocalRewardHandle("jpeg", None)])


def test_tiny_config_reward_section_loads() -> None:
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml",
        ["reward.models=[{name: jpeg, weight: 0.5}, {name: brightness, weight: 2.0, normalize: group}]"],
    )
    assert [(m.name, m.weight, m.normalize) for m in cfg.reward.models] == [
        ("jpeg", 0.5, "none"),
        ("brightness", 2.0, "group"),
    ]


@pytest.mark.parametrize("normalize", ["none", "group", "running"])
def test_driver_scores_from_sampler_components_equal_scoring_the_whole_rollout(normalize: str) -> None:
    """The driver path (each sampler scores its own rollout, the driver normalises the concatenated components,
    rlalign/driver.py `Loop._score`) gives bit-identical scores, components and metrics to scoring the concatenated
    rollout in one place, and leaves the same running statistics behind."""
    specs = [RewardSpec(name="jpeg", weight=0.5, normalize=normalize), RewardSpec(name="brightness", weight=2.0)]
    whole_set, split_set = reward_set(*specs), reward_set(*specs)
    parts = [synthetic_rollout(groups=2, seed=s) for s in (0, 1)]
    parts[1] = replace(parts[1], group_ids=parts[1].group_ids + 2)
    for _ in range(2):  # the second round reads the running statistics the first one left
        whole = whole_set.score_rollout(concat_rollouts(parts))
        comps = [split_set.components(r.images, r.prompts) for r in parts]
        cat = {k: np.concatenate([c[k] for c in comps]) for k in comps[0]}
        split = split_set.score_components(cat, torch.cat([r.group_ids for r in parts]), plain=True)
        assert torch.equal(split.scores, whole.scores) and split.metrics == whole.metrics
        assert all(torch.equal(split.components[k], whole.components[k]) for k in whole.components)
    assert split_set.state_dict() == whole_set.state_dict()
