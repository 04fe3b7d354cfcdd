"""Throughput of each stage on the embedded digits model: sampler images/s (plain and branching), learner
training rows/s per algorithm, and the LoRA broadcast through Ray's object store to N samplers.

    .venv/bin/python benchmarks/throughput.py [--size default|tiny] [--algos tailorpo,diffusion_dpo] [--no-ray]

Prints one JSON line (commit, hardware, sizes, numbers) and a short table. Numbers, never assertions: the
targets live here, not in timed tests. CPU unless a GPU is visible (`model.device=auto`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from reward_servers.base import RewardServer
from rlalign.actors import branch_cfg, make_reward_model
from rlalign.config import load_config
from rlalign.learner import Learner
from rlalign.models.loading import load_parts, resolve_model_dir
from rlalign.prompts import PromptSource
from rlalign.rewards import LocalRewardHandle, RewardSet
from rlalign.sampling.sampler import Sampler


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def timed(fn: Callable[[], object], repeats: int = 2) -> float:
    fn()  # warm-up (first-call allocations, lazy imports)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_algo(algo: str, overrides: list[str], results: dict[str, float]) -> None:
    cfg = load_config(None, [f"algo={algo}", *overrides])
    mdir = str(resolve_model_dir(cfg.model, progress=True))
    make = functools.partial(load_parts, replace(cfg.model, path=mdir), cfg.lora, cfg.sampler.num_steps)
    server = RewardServer(functools.partial(make_reward_model, cfg.reward.models[0], mdir))
    rewards = RewardSet(list(cfg.reward.models), [LocalRewardHandle(cfg.reward.models[0].name, server)])
    branch = branch_cfg(cfg)
    sampler = Sampler(cfg.sampler, make, branch=branch, scorer=rewards if branch else None)
    learner = Learner(cfg, make)
    batch = PromptSource(cfg.prompts, 0).next(cfg.sampler.prompts_per_worker, cfg.sampler.images_per_prompt, 1)[0]
    holder = {}

    def sample() -> None:
        holder["r"] = sampler.generate(batch)

    sample_s = timed(sample)
    scored = rewards.score_rollout(holder["r"])
    learn_s = timed(lambda: learner.update(scored))
    key = "branching" if branch else "plain"
    results[f"sampler_{key}_images_per_s"] = len(batch) / sample_s
    results[f"{algo}_learn_s"] = learn_s
    results[f"{algo}_iteration_images_per_s"] = len(batch) / (sample_s + learn_s)


def bench_broadcast(overrides: list[str], workers: int, results: dict[str, float]) -> None:
    import ray

    from rlalign.actors import init_ray, spawn_learner, spawn_samplers

    cfg = load_config(None, [f"sampler.num_workers={workers}", "algo=diffusion_dpo", *overrides])
    mdir = str(resolve_model_dir(cfg.model))
    init_ray(cfg)
    try:
        rewards = RewardSet([], [])
        samplers, _ = spawn_samplers(cfg, mdir, rewards)
        learner = spawn_learner(cfg, mdir)

        def broadcast() -> None:
            ref = learner.export_weights.remote()
            ray.get([s.load_weights.remote(ref) for s in samplers])

        results["broadcast_s"] = timed(broadcast, repeats=5)
        update = ray.get(learner.export_weights.remote())
        results["lora_mb"] = sum(t.numel() * t.element_size() for t in update.tensors.values()) / 2**20
        results["broadcast_samplers"] = workers
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=["default", "tiny"])
    parser.add_argument("--algos", default="tailorpo,diffusion_dpo,ddpo")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    overrides = [f"model.size={args.size}"]
    results: dict[str, float] = {}
    for algo in args.algos.split(","):
        bench_algo(algo, overrides, results)
    if not args.no_ray:
        bench_broadcast(overrides, 2, results)
    cfg = load_config(None, overrides)
    line = {
        "benchmark": "throughput",
        "commit": commit(),
        "hardware": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "images_per_sampler_call": cfg.sampler.prompts_per_worker * cfg.sampler.images_per_prompt,
        "steps": cfg.sampler.num_steps,
        **{k: round(v, 4) for k, v in results.items()},
    }
    print(json.dumps(line))
    print(f"{'metric':40s} value")
    for k, v in results.items():
        print(f"{k:40s} {v:.3f}")


if __name__ == "__main__":
    main()
