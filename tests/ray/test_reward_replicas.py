"""Replicated reward models (issue 11, item 3): `replicas: N` actors per model, a batch split over them, small
requests taking turns, the same scores as one actor, and per-reward load metrics in a real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
from rich.console import Console

from reward_servers.base import RewardServer
from rlalign.actors import make_reward_model, spawn_rewards
from rlalign.config import load_config
from rlalign.driver import train
from rlalign.metrics import read_metrics

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


def test_a_run_logs_each_reward_models_load(ray_session: None, tiny_overrides: list[str]) -> None:
    """Two reward models, one with 2 replicas: each logs its busy seconds and utilisation every iteration."""
    models = "[{name: digit_prompt, replicas: 2, num_cpus: 0.5}, {name: brightness, weight: 0.0, num_cpus: 0.5}]"
    cfg = load_config(CONFIG, [f"reward.models={models}", "sampler.num_workers=1", *tiny_overrides])
    result = train(cfg, Console(quiet=True))
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss/total" in r]
    assert len(rows) == 2
    for r in rows:
        print({k: round(v, 4) for k, v in r.items() if k.startswith(("time/reward", "reward_util"))})
        for name in ("digit_prompt", "brightness"):
            assert r[f"time/reward_busy/{name}"] > 0.0  # TailorPO's branch scoring and the driver's final scores
            assert 0.0 < r[f"reward_util/{name}"] <= 1.0
    placement = (result.run_dir / "placement.json").read_text()
    assert placement.count('"cpu"') >= 3  # devices: 2 digit_prompt replicas + brightness among the reward actors
