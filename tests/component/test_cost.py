"""U-Net rows as the cost axis (`cost/sampler_unet_rows`, `cost/learner_unet_rows`): counted, not estimated.

Plain DDIM with CFG costs 2 rows per image per step; Diffusion-DPO costs 2 policy rows with gradient and 2
reference rows without per pair. Several samplers' costs add up in one iteration's row.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import torch
from component.test_learner import scored_rollouts, setup_run

from rlalign.config import LoraCfg, ModelCfg, SamplerCfg
from rlalign.learner import Learner
from rlalign.models.loading import load_parts
from rlalign.sampling.sampler import Sampler
from rlalign.types import PromptBatch, concat_rollouts


def test_sampler_counts_two_rows_per_image_per_step_with_cfg(tiny_digits_dir: Path) -> None:
    make = functools.partial(load_parts, ModelCfg(path=str(tiny_digits_dir)), LoraCfg(rank=2, alpha=2.0), 5)
    batch = PromptBatch(["a 1", "a 2", "a 3"], torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]))
    with_cfg = Sampler(SamplerCfg(num_steps=5, guidance_scale=3.0, batch_size=4), make).generate(batch)
    without = Sampler(SamplerCfg(num_steps=5, guidance_scale=1.0), make).generate(batch)
    assert with_cfg.metrics["cost/sampler_unet_rows"] == 2 * 3 * 5
    assert without.metrics["cost/sampler_unet_rows"] == 3 * 5
    again = Sampler(SamplerCfg(num_steps=5, guidance_scale=3.0, batch_size=4), make, worker_index=1).generate(batch)
    both = concat_rollouts([with_cfg, again])
    assert both.metrics["cost/sampler_unet_rows"] == 30 + 30  # two samplers' costs add up
    times = [r.metrics["time/sampler_call_s"] for r in (with_cfg, again)]
    assert both.metrics["time/sampler_call_s"] == sum(times) / 2  # other metrics stay per-sampler means


def test_learner_counts_policy_and_reference_rows(tiny_overrides: list[str]) -> None:
    cfg, make_parts = setup_run(tiny_overrides, "diffusion_dpo", "learner.micro_batch_size=64")
    learner_parts = functools.partial(
        load_parts, replace(cfg.model, path=make_parts.args[0].path), cfg.lora, cfg.sampler.num_steps, role="learner"
    )
    learner = Learner(cfg, learner_parts)
    metrics = learner.update(scored_rollouts(cfg, make_parts))
    pairs = metrics["learner/rows"]
    assert metrics["cost/learner_unet_grad_rows"] == 2 * pairs  # winner and loser through the policy
    assert metrics["cost/learner_unet_rows"] == 4 * pairs  # ... and through the frozen reference
