"""Replicated reward models (issue 11, item 3): `replicas: N` actors per model, a batch split over them, small
requests taking turns, the same scores as one actor (the per-reward load metrics of a real run: the 3-node test
in tests/ray/test_cluster.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from reward_servers.base import RewardServer
from rlalign.actors import make_reward_model, spawn_rewards
from rlalign.config import load_config

CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_a_batch_is_split_over_replicas_and_scores_as_one_actor(
    ray_session: None, tiny_overrides: list[str], tiny_digits_dir: Path
) -> None:
    cfg = load_config(CONFIG, ["reward.models=[{name: digit_prompt, replicas: 2, num_cpus: 0.5}]", *tiny_overrides])
    mdir = str(tiny_digits_dir)
    rewards, actors = spawn_rewards(cfg, mdir)
    try:
        assert len(actors) == 2 and len(rewards.handles) == 1
        handle = rewards.handles[0]
        images, prompts = _images(7), [f"a digit {i}" for i in range(7)]
        scores = handle.submit(images, prompts).result(60)
        one = RewardServer(lambda: make_reward_model(cfg.reward.models[0], mdir))
        np.testing.assert_array_equal(scores, one.score(images, prompts))  # split and joined in order
        first = ray.get([a.stats.remote() for a in actors])
        assert [s["images"] for s in first] == [4.0, 3.0] and [s["calls"] for s in first] == [1.0, 1.0]
        # gradients too: the chunks' pixel gradients join in order
        pixels = images.astype(np.float32) / 255.0
        s2, g2 = handle.submit_grad(pixels, prompts).result(60)
        s1, g1 = one.score_and_grad(pixels, prompts)
        np.testing.assert_allclose(s2, s1, rtol=0, atol=1e-6)
        np.testing.assert_allclose(g2, g1, rtol=0, atol=1e-6)
        # requests of one image cannot be split: they take turns, so no replica idles while the other queues
        for i in range(4):
            handle.submit(images[i : i + 1], prompts[i : i + 1]).result(60)
        calls = [s["calls"] for s in ray.get([a.stats.remote() for a in actors])]
        assert calls == [4.0, 4.0]  # 1 split + 1 grad split + 2 single requests each
    finally:
        for a in actors:
            ray.kill(a)
