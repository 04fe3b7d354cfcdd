"""Learner group (`learner.num_workers`): 2 learner actors in one gloo group give the LoRA one learner gives on the
same batches, for a step-wise (TailorPO) and a pair-wise (Diffusion-DPO) algorithm; a training run with 2 learners
trains and checkpoints."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
import ray
import torch
from component.test_learner import TINY_YAML, scored_rollouts, setup_run

from rlalign.actors import LearnerGroup, spawn_learner
from rlalign.config import load_config
from rlalign.models.loading import resolve_model_dir

UPDATES = 2


def _train(cfg: Any, batches: list[Any]) -> tuple[LearnerGroup, dict[str, torch.Tensor], list[dict[str, float]], float]:
    """A group of cfg.learner.num_workers on `batches` in turn: (group, LoRA, metrics, seconds per update)."""
    group = spawn_learner(cfg, str(resolve_model_dir(cfg.model, progress=False)))
    group.update(batches[0])  # warm-up outside the timing: the first call imports and allocates
    start = time.perf_counter()
    metrics = [group.update(b) for b in batches[1:]]
    seconds = (time.perf_counter() - start) / (len(batches) - 1)
    lora = ray.get(group.export_weights(), timeout=60).tensors
    return group, lora, metrics, seconds


@pytest.mark.parametrize("algo", ["tailorpo", "diffusion_dpo"])
def test_two_learners_give_the_lora_of_one(
    algo: str, ray_session: None, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # micro-batch 3 and 2 optimiser steps per update: shards, micro-batches and chunks all cut across each other
    extra = ("learner.micro_batch_size=3", "learner.optimizer_steps=2")
    cfg, sampler_parts = setup_run(tiny_overrides, algo, *extra)
    batches = [scored_rollouts(cfg, sampler_parts, seed=s) for s in range(UPDATES + 1)]
    runs = {}
    for n in (1, 2):
        one_or_two = load_config(TINY_YAML, [f"algo={algo}", *tiny_overrides, *extra, f"learner.num_workers={n}"])
        runs[n] = _train(one_or_two, batches)
    (g1, lora1, m1, s1), (g2, lora2, m2, s2) = runs[1], runs[2]
    assert lora1.keys() == lora2.keys()
    diff = max(float((lora1[k] - lora2[k]).abs().max()) for k in lora1)
    moved = max(float(v.abs().max()) for k, v in lora1.items() if "lora_B" in k)
    with capsys.disabled():
        print(f"\n{algo}: max |LoRA diff| 1 vs 2 learners after {UPDATES + 1} updates {diff:.3g} (|B| max {moved:.3g})")
        print(f"{algo}: s/update 1 learner {s1:.3f}, 2 learners {s2:.3f}")
    assert moved > 1e-3  # the LoRA did train
    assert diff < 1e-6
    for a, b in zip(m1, m2):  # the group reports the whole batch's values (U-Net rows summed over ranks), exactly
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == {
            k: v for k, v in b.items() if not k.startswith("time/")
        }
    assert g2.info()["workers"] == 2
    for group in (g1, g2):
        for actor in group.actors:
            ray.kill(actor)


def test_learner_group_refuses_zero_workers(tiny_overrides: list[str]) -> None:
    from rlalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"learner\.num_workers"):
        load_config(TINY_YAML, ["learner.num_workers=0", *tiny_overrides])


def test_shards_cover_every_row_once() -> None:
    from rlalign.distributed import shard

    for rows in range(0, 12):
        for world in (1, 2, 3, 5):
            cuts = [shard(rows, r, world) for r in range(world)]
            assert cuts[0][0] == 0 and cuts[-1][1] == rows
            assert all(a[1] == b[0] for a, b in itertools.pairwise(cuts))
            assert max(hi - lo for lo, hi in cuts) - min(hi - lo for lo, hi in cuts) <= 1


def test_resource_check_counts_every_learner(tiny_overrides: list[str]) -> None:
    from rlalign.resources import missing_resources

    cfg = load_config(TINY_YAML, ["learner.num_workers=3", "sampler.num_workers=1", *tiny_overrides])
    (line,) = missing_resources(cfg, {"CPU": 2.0})
    assert "learner 3 x 1 CPU" in line and "= 5 CPUs" in line, line
