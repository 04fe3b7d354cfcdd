"""Two driver iterations per algorithm through real Ray actors (2 samplers, learner, reward actor), tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from rlalign.algos import ALGORITHMS
from rlalign.config import RunCfg, load_config, summary
from rlalign.driver import train
from rlalign.metrics import read_metrics
from rlalign.models.loading import resolve_model_dir
from rlalign.prompts import load_prompts

CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
BYTES_FRACTION = 2  # driver/bytes_in stays under 1/2 of one iteration's latents (measured: see docs/cluster.md)


def _train_rows(run_dir: Path) -> list[dict[str, float]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/total" in r or "learner/skipped" in r]


def _latent_bytes(cfg: RunCfg) -> int:
    """Bytes of one iteration's rollout latents alone ([B, T + 1, C, h, w] float32): the least the driver received
    per iteration while whole rollouts came through it (with images, log-probs and text embeddings on top)."""
    unet = json.loads((resolve_model_dir(cfg.model) / "unet" / "config.json").read_text())
    latent = unet["in_channels"] * unet["sample_size"] ** 2
    return int(summary(cfg)["images_per_iteration"]) * (cfg.sampler.num_steps + 1) * latent * 4


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_two_iterations_through_ray(algo: str, ray_session: None, tiny_overrides: list[str]) -> None:
    cfg = load_config(CONFIG, [f"algo={algo}", "sampler.num_workers=2", "log.image_every=1", *tiny_overrides])
    result = train(cfg, Console(quiet=True))
    rows = _train_rows(result.run_dir)
    assert [r["iteration"] for r in rows] == [0, 1]
    for row in rows:
        assert math.isfinite(row["loss/total"]) and math.isfinite(row["learner/grad_norm"])
        # every sampler confirmed the learner's new version after each update (the broadcast reached all)
        assert row["sampler/min_loaded_version"] == row["sampler/max_loaded_version"] == row["learner/version"]
    assert [r["learner/version"] for r in rows] == [1.0, 2.0]
    assert [r["sampler/version"] for r in rows] == [0.0, 1.0]  # sync mode: rollouts use the newest weights
    # rollouts go from the samplers to the learners by reference: the driver receives summaries, metrics and the
    # image grid's 8 images (log.image_every=1), a fraction of the latents it used to receive
    assert all(0 < r["driver/bytes_in"] < _latent_bytes(cfg) / BYTES_FRACTION for r in rows), rows
    if ALGORITHMS[algo].is_preference:
        assert rows[0]["loss/first"] == pytest.approx(math.log(2.0), abs=1e-6)  # fresh LoRA: policy == reference
    run = result.run_dir
    assert (run / "ckpt" / "latest").read_text().strip() == "iter_000001"
    assert (run / "ckpt" / "iter_000001" / "diffusers_lora").is_dir()
    assert (run / "reward_curve.png").is_file() and list((run / "images").glob("train_iter_*.png"))
    assert {"eval/digit_accuracy", "eval/judge_accuracy", "eval/digit_prompt/mean"} <= set(result.after)


def test_async_mode_overlaps_and_bounds_policy_lag(ray_session: None, tiny_overrides: list[str]) -> None:
    """Async with an evaluation after every iteration: the batch in flight during an evaluation is trained on next,
    not thrown away and rendered again (which would show as lag 0); the driver checks that every evaluation was
    rendered with the learner's newest weights, behind that batch."""
    overrides = ["algo=diffusion_dpo", "ray.mode=async", "ray.max_policy_lag=1", "iterations=3", "eval.every=1"]
    result = train(load_config(CONFIG, [*overrides, *tiny_overrides]), Console(quiet=True))
    rows = _train_rows(result.run_dir)
    lags = [r["sampler/policy_lag"] for r in rows]
    assert lags[0] == 0 and all(lag == 1 for lag in lags[1:])  # k+1 was rendered while the learner trained on k
    for r in rows:  # the one cost axis: sampling plus training U-Net rows of the iteration
        assert r["cost/unet_rows"] == r["cost/sampler_unet_rows"] + r["cost/learner_unet_rows"] > 0
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval/digit_accuracy" in r]
    assert [int(r["iteration"]) for r in evals] == [0, 0, 1, 3]  # before, after iterations 0 and 1, after the run
    assert [r["learner/version"] for r in rows] == [1.0, 2.0, 3.0]


def test_adaptive_prompts_steer_by_the_plain_renders_of_a_branching_run(
    ray_session: None, tiny_overrides: list[str]
) -> None:
    """TailorPO's final images are searches: the running reward per prompt comes from the plain renders, one per
    group here (2 groups of 2 images per sampler, plain_images 2), through the summaries the samplers return."""
    overrides = ["algo=tailorpo", "sampler.num_workers=2", "prompts.sampling=adaptive", "sampler.plain_images=2"]
    result = train(load_config(CONFIG, [*overrides, *tiny_overrides]), Console(quiet=True))
    rows = _train_rows(result.run_dir)
    assert all(r["prompts/max_over_uniform"] >= 1.0 for r in rows)
    assert all(0.0 <= r["prompts/reward_min"] <= r["prompts/reward_max"] <= 1.0 for r in rows)
    state = json.loads((result.run_dir / "ckpt" / "iter_000001" / "state.json").read_text())
    means = state["prompt_rewards"]
    # 2 iterations x 2 samplers x 2 groups observed (a prompt drawn twice keeps one running mean)
    assert 2 <= len(means) <= 8 and set(means) <= set(load_prompts(load_config(CONFIG, tiny_overrides).prompts))
    assert all(0.0 <= v <= 1.0 for v in means.values())


def test_resume_latest_continues_the_run(ray_session: None, tiny_overrides: list[str]) -> None:
    first = train(load_config(CONFIG, ["algo=ddpo", "name=resumable", *tiny_overrides]), Console(quiet=True))
    again = load_config(CONFIG, ["algo=ddpo", "name=resumable", "iterations=3", "resume=latest", *tiny_overrides])
    result = train(again, Console(quiet=True))
    assert result.run_dir == first.run_dir  # resumed in place, not a new directory
    rows = _train_rows(result.run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2]  # the earlier log lines are kept
    assert rows[-1]["learner/version"] == 3.0


def test_time_budget_stops_early_but_still_saves_and_evaluates(ray_session: None, tiny_overrides: list[str]) -> None:
    cfg = load_config(CONFIG, ["algo=ddpo", "iterations=50", "time_budget_min=0.0001", *tiny_overrides])
    result = train(cfg, Console(quiet=True))
    assert result.iterations_done == 1  # the budget is checked after each iteration
    assert (result.run_dir / "ckpt" / "latest").read_text().strip() == "iter_000000"
    assert "eval/digit_accuracy" in result.after


def test_unet_rows_budget_stops_after_the_iteration_that_crosses_it(
    ray_session: None, tiny_overrides: list[str]
) -> None:
    cfg = load_config(CONFIG, ["algo=ddpo", "name=rows", "iterations=50", "unet_rows_budget=1", *tiny_overrides])
    result = train(cfg, Console(quiet=True))
    rows = _train_rows(result.run_dir)
    assert result.iterations_done == 1 and rows[0]["cost/unet_rows"] > 1  # the first iteration alone crosses it
    budget = 2 * rows[0]["cost/unet_rows"] - 1  # a resume counts the rows already spent: one more iteration
    again = ["algo=ddpo", "name=rows", "iterations=50", f"unet_rows_budget={budget:.0f}", "resume=latest"]
    resumed = train(load_config(CONFIG, [*again, *tiny_overrides]), Console(quiet=True))
    assert resumed.iterations_done == 2 and [r["iteration"] for r in _train_rows(resumed.run_dir)] == [0, 1]
