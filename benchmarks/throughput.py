"""Throughput of the actor pipeline on the embedded digits model: per-stage seconds, end-to-end images/s and
pipeline efficiency (sync and async), Ray's overhead against the same iterations in one process, the LoRA
broadcast against LoRA size and sampler count, and a model that predicts N samplers and M learner GPUs.

    .venv/bin/python benchmarks/throughput.py [--parts stages,overhead,broadcast,model] [--size default|tiny]
        [--algo tailorpo] [--iterations 6] [--ranks 4,16,64] [--samplers 1,2,4,8] [--worker-niceness 0]
    .venv/bin/python benchmarks/throughput.py --parts algos --algos tailorpo,diffusion_dpo   # per-algorithm stages

Parts:
  stages     two short `rlalign.driver.train` runs (ray.mode=sync, then async) read back from metrics.jsonl:
             median time/sample_s, reward_s, learn_s, sync_s, iteration_s over the steady iterations (the first is
             warm-up; async's last has nothing to overlap). Pipeline efficiency = end-to-end images/s / images/s of
             the slowest stage alone, the stage times taken from the sync run, where no stage overlaps another.
  overhead   the same iterations in one process without Ray (Sampler, RewardSet with LocalRewardHandle, Learner,
             weights handed over directly) against the sync run's iterations through actors: ratio - 1.
  broadcast  an SD1.5 attention LoRA (to_q/to_k/to_v/to_out.0 of the 16 transformer blocks, shapes from
             benchmarks/unet_configs/sd15_unet.json on the meta device; random bf16 values) at each rank, sent to
             1..8 dummy actors (num_cpus=0) that return its version: one ray.put read by all vs the dict passed by
             value in each call.
  model      `predict` below fed with the measured stage seconds: images/s for N samplers and M learner GPUs.
  algos      the earlier per-algorithm figures: sampler images/s and one learner update per algorithm, in process.

Prints one JSON line (commit, hardware, load averages, sizes, numbers), then markdown tables. Numbers, never
assertions: the targets are printed next to the figures (async efficiency >= 0.9, Ray overhead <= 5 %, a 25 MB
LoRA to 8 samplers < 0.5 s). Record the load: on a shared 2-core machine it moves every figure.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from reward_servers.base import RewardServer
from rlalign.actors import branch_cfg, make_reward_model
from rlalign.config import RunCfg, load_config
from rlalign.learner import Learner
from rlalign.models.loading import load_parts, resolve_model_dir
from rlalign.prompts import PromptSource
from rlalign.rewards import LocalRewardHandle, RewardSet
from rlalign.sampling.sampler import Sampler
from rlalign.types import WeightsUpdate

HERE = Path(__file__).parent
NICENESS_ENV = "RAY_worker_niceness"  # Ray's own spelling (ray_config_def.h); Ray's default nices workers to 15
STAGES = ("sample", "reward", "learn", "sync")  # the driver's time/<stage>_s keys; sync = the LoRA broadcast
TARGETS = {"async_efficiency": 0.9, "ray_overhead": 0.05, "broadcast_25mb_8_samplers_s": 0.5}
# the run settings behind --size: tiny is configs/tiny.yaml's batch on the tiny digits build (a smoke run);
# default is the digits demo's batch (8 prompts x 4 images, 20 DDIM steps) on one sampler, the default build (the
# demo splits it over 2 samplers; this benchmark scales samplers itself)
SIZES = {
    "tiny": ["model.size=tiny", "sampler.prompts_per_worker=2", "sampler.images_per_prompt=2", "sampler.num_steps=4"],
    "default": ["model.size=default", "sampler.num_workers=1", "sampler.prompts_per_worker=8"],
}
RUN = [  # short runs: no mid-run evaluation, image grids or checkpoints inside the timed loop
    "time_budget_min=0",
    "eval.every=0",
    "eval.images_per_prompt=1",
    "log.image_every=0",
    "log.save_every=0",
    "log.tensorboard=false",
]


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    return out.stdout.strip() or "unknown"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn: Callable[[], object], repeats: int = 2) -> float:
    fn()  # warm-up (first-call allocations, lazy imports)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


# ---------------------------------------------------------------------------------------------------- the model
@dataclass
class Prediction:
    sync: float  # images/s of rlalign's sync loop
    async_: float  # images/s of rlalign's async loop (one batch in flight; reward -> learn -> sync in series)
    ideal: float  # images/s if every stage overlapped every other (a deeper queue): the slowest stage's rate


def predict(stage_s: dict[str, float], images: int, samplers: int = 1, gpus: int = 1) -> Prediction:
    """Images/s for N samplers and M learner GPUs from one iteration's stage seconds measured with one sampler.

    stage_s: seconds per iteration of sample (one sampler renders `images`), reward, learn, sync (broadcast).
    Assumptions, as rlalign scales: each sampler renders its own `images` per iteration (prompts_per_worker is per
    worker), in parallel on its own device, so the batch is N * images and sampling stays `sample` seconds; reward
    scoring grows with the batch (one reward actor); learning grows with the batch and splits over M data-parallel
    learner ranks with no loss to communication; the broadcast costs the same for any N (one object-store copy).

        s, r, t, b = stage seconds (sample, reward, learn = train, sync = broadcast);  B = N * images
        sync:   T = s + N r + N t / M + b
        async:  T = max(s, N r + N t / M) + b   (samplers render k+1 while the driver scores and trains on k)
        ideal:  T = max(s, N r, N t / M, b)     (every stage overlaps: images/s of the slowest stage)
        images/s = B / T
    """
    s, r, t, b = (stage_s[k] for k in STAGES)
    n, m = samplers, gpus
    batch = n * images
    return Prediction(
        sync=batch / (s + n * r + n * t / m + b),
        async_=batch / (max(s, n * r + n * t / m) + b),
        ideal=batch / max(s, n * r, n * t / m, b),
    )


# ---------------------------------------------------------------------------------------------------- stages
def run_config(args: argparse.Namespace, out_dir: str, mode: str) -> RunCfg:
    return load_config(
        None,
        [
            f"algo={args.algo}",
            *SIZES[args.size],
            *RUN,
            f"iterations={args.iterations}",
            f"ray.mode={mode}",
            f"out_dir={out_dir}",
            f"name={mode}",
        ],
    )


def train_run(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One short driver run; the medians of its steady iterations (async: also without the last, which has no
    next batch to overlap)."""
    from rich.console import Console

    from rlalign.driver import train
    from rlalign.metrics import read_metrics

    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(args, out, mode)
        before, t0 = load(), time.perf_counter()
        result = train(cfg, console=Console(quiet=True))
        wall = time.perf_counter() - t0
        rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "time/iteration_s" in r]
    steady = rows[1:-1] if mode == "async" else rows[1:]
    med = {k: statistics.median(r[f"time/{k}_s"] for r in steady) for k in (*STAGES, "iteration")}
    images = cfg.sampler.prompts_per_worker * cfg.sampler.images_per_prompt * cfg.sampler.num_workers
    return {
        "mode": mode,
        "images": images,
        "iterations": len(rows),
        "steady_iterations": len(steady),
        "stage_s": {k: med[k] for k in STAGES},
        "iteration_s": med["iteration"],
        "images_per_s": images / med["iteration"],
        "run_wall_s": wall,
        "load_before": before,
        "load_after": load(),
    }


def efficiency(run: dict[str, Any], alone_s: dict[str, float]) -> dict[str, Any]:
    slowest = max(alone_s, key=lambda k: alone_s[k])
    bound = run["images"] / alone_s[slowest]
    return {"slowest_stage": slowest, "slowest_stage_images_per_s": bound, "efficiency": run["images_per_s"] / bound}


# ---------------------------------------------------------------------------------------------------- overhead
def bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """The driver's sync iteration twice over: in this process without Ray (sample -> score -> learn -> hand the
    LoRA to the sampler), and through the actors `rlalign.driver` spawns (sampler, reward actor, `LearnerGroup`),
    with the rollout coming back to this process (the driver's loop now passes it by reference: docs/cluster.md).
    The two alternate iteration by iteration, so both see the same machine load (it moves by 2x within minutes on
    a shared machine, more than the overhead we look for)."""
    import ray

    from rlalign.actors import init_ray, spawn_workers
    from rlalign.types import concat_rollouts

    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(args, out, "sync")
    mdir = str(resolve_model_dir(cfg.model, progress=True))
    make = functools.partial(load_parts, replace(cfg.model, path=mdir), cfg.lora, cfg.sampler.num_steps)
    spec = cfg.reward.models[0]
    server = RewardServer(functools.partial(make_reward_model, spec, mdir))
    rewards = RewardSet(list(cfg.reward.models), [LocalRewardHandle(spec.name, server)])
    branch = branch_cfg(cfg)
    sampler = Sampler(cfg.sampler, make, branch=branch, scorer=rewards if branch else None)
    learner = Learner(cfg, make, seed=cfg.seed)
    sampler.load_weights(learner.export_weights())

    def local(batch: Any) -> tuple[list[float], int]:
        t = [time.perf_counter()]
        rollout = sampler.generate(batch)
        t.append(time.perf_counter())
        scored = rewards.score_rollout(rollout)
        t.append(time.perf_counter())
        learner.update(scored)
        t.append(time.perf_counter())
        sampler.load_weights(learner.export_weights())
        t.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(t)], len(rollout)

    started = init_ray(cfg)
    w = spawn_workers(cfg, mdir)

    def through_ray(batch: Any) -> tuple[list[float], int]:
        t = [time.perf_counter()]
        rollout = concat_rollouts(w.samplers.get(w.samplers.generate([batch]), "sampler"))
        t.append(time.perf_counter())
        scored = w.rewards.score_rollout(rollout)
        t.append(time.perf_counter())
        w.learner.update(scored)  # the LearnerGroup: every rank, metrics of rank 0
        t.append(time.perf_counter())
        w.samplers.get(w.samplers.load(w.learner.export_weights()), "sampler weight load")
        t.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(t)], len(rollout)

    prompts = PromptSource(cfg.prompts, seed=cfg.seed)
    before, rows = load(), {"local": [], "ray": []}
    try:
        w.samplers.get(w.samplers.load(w.learner.export_weights()), "sampler weight load")
        for i in range(args.iterations):
            batch = prompts.next(cfg.sampler.prompts_per_worker, cfg.sampler.images_per_prompt, 1)[0]
            order = ("local", "ray") if i % 2 == 0 else ("ray", "local")  # ABBA: neither always goes first
            for name in order:
                rows[name].append((local if name == "local" else through_ray)(batch))
    finally:
        w.kill()
        if started:
            ray.shutdown()
    result: dict[str, Any] = {"load_before": before, "load_after": load()}
    for name, runs in rows.items():
        steady = runs[1:]  # the first iteration is warm-up
        stage_s = {k: statistics.median(r[0][i] for r in steady) for i, k in enumerate(STAGES)}
        iteration_s = statistics.median(sum(r[0]) for r in steady)
        images = runs[0][1]
        result[name] = {
            "images": images,
            "stage_s": stage_s,
            "iteration_s": iteration_s,
            "images_per_s": images / iteration_s,
        }
    result["ratio"] = result["ray"]["iteration_s"] / result["local"]["iteration_s"] - 1
    return result


# ---------------------------------------------------------------------------------------------------- broadcast
def sd15_lora_shapes() -> dict[str, tuple[int, int]]:
    """(in, out) features of every SD1.5 U-Net attention projection a LoRA targets: 128 Linear layers, sum of
    in + out = 199,296, so a rank-r LoRA holds r * 199,296 parameters (docs: ENVIRONMENT, "LoRA")."""
    from diffusers import UNet2DConditionModel

    config = json.loads((HERE / "unet_configs" / "sd15_unet.json").read_text())
    with torch.device("meta"):  # shapes only: no memory, no weights
        unet = UNet2DConditionModel.from_config(config)
    names = ("to_q", "to_k", "to_v", "to_out.0")
    return {
        n: (m.in_features, m.out_features)
        for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(names)
    }


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, dtype: torch.dtype, version: int) -> WeightsUpdate:
    g = torch.Generator().manual_seed(rank)
    tensors = {}
    for name, (fan_in, fan_out) in shapes.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g).to(dtype)
        tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g).to(dtype)
    return WeightsUpdate(version, tensors)


def bench_broadcast(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    @ray.remote(num_cpus=0)
    class Receiver:  # a sampler that only receives: the transfer and deserialisation, no U-Net
        def __init__(self) -> None:
            import torch  # noqa: F401  (the first tensor would otherwise pay the import)

        def load_weights(self, update: WeightsUpdate) -> int:
            return update.version

    shapes = sd15_lora_shapes()
    ranks = [int(r) for r in args.ranks.split(",")]
    counts = [int(n) for n in args.samplers.split(",")]
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    before, rows, version = load(), [], 0
    try:
        actors = [Receiver.remote() for _ in range(max(counts))]
        ray.get([a.__ray_ready__.remote() for a in actors])
        for rank in ranks:
            update = random_lora(shapes, rank, torch.bfloat16, 0)
            mb = sum(t.numel() * t.element_size() for t in update.tensors.values()) / 1e6

            def store(n: int, update: WeightsUpdate = update) -> None:
                ref = ray.put(update)  # one copy in the object store, read by every actor
                ray.get([a.load_weights.remote(ref) for a in actors[:n]])

            def naive(n: int, update: WeightsUpdate = update) -> None:
                ray.get([a.load_weights.remote(update) for a in actors[:n]])  # serialised and stored once per call

            def call(n: int) -> None:  # the same calls without the LoRA: the floor any broadcast pays here
                ray.get([a.load_weights.remote(WeightsUpdate(0, {})) for a in actors[:n]])

            for n in counts:
                row: dict[str, Any] = {"rank": rank, "mb": mb, "samplers": n}
                for name, send in (("empty_call", call), ("store", store), ("naive", naive)):
                    send(n)  # warm-up
                    times = []
                    for _ in range(args.repeats):
                        version += 1
                        t0 = time.perf_counter()
                        send(n)
                        times.append(time.perf_counter() - t0)
                    row[f"{name}_s"] = statistics.median(times)
                rows.append(row)
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()
    return {"rows": rows, "layers": len(shapes), "dtype": "bfloat16", "load_before": before, "load_after": load()}


# ---------------------------------------------------------------------------------------------------- algos
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


# ---------------------------------------------------------------------------------------------------- output
def table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join([*lines, *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows)])


def report(out: dict[str, Any]) -> str:
    parts = []
    if "stages" in out:
        rows = []
        for mode in ("sync", "async"):
            run = out["stages"][mode]
            eff = out["stages"][f"{mode}_efficiency"]
            rows.append(
                [
                    f"ray {mode}",
                    *(run["stage_s"][k] for k in STAGES),
                    run["iteration_s"],
                    run["images_per_s"],
                    f"{eff['slowest_stage']} {eff['slowest_stage_images_per_s']:.2f}",
                    eff["efficiency"],
                    str(run["load_before"]),
                ]
            )
        head = ["run", *(f"{k} s" for k in STAGES), "iteration s", "images/s", "slowest stage images/s"]
        parts.append(f"stages ({out['images_per_iteration']} images per iteration, medians of steady iterations)")
        parts.append(table([*head, "efficiency", "load (1/5/15 min)"], rows))
    if "overhead" in out:
        o = out["overhead"]
        rows = [[name, *(o[name]["stage_s"][k] for k in STAGES), o[name]["iteration_s"]] for name in ("local", "ray")]
        parts.append(f"Ray overhead, iterations alternating in one script (load {o['load_before']})")
        parts.append(table(["run", *(f"{k} s" for k in STAGES), "iteration s"], rows))
        parts.append(
            f"Ray overhead: {o['ray']['iteration_s']:.3f} s / {o['local']['iteration_s']:.3f} s per iteration - 1 "
            f"= {o['ratio']:+.1%}"
        )
    if "broadcast" in out:
        keys = ["rank", "mb", "samplers", "empty_call_s", "store_s", "naive_s"]
        rows = [[r[k] for k in keys] for r in out["broadcast"]["rows"]]
        parts.append(f"LoRA broadcast (SD1.5 attention, bf16, load {out['broadcast']['load_before']})")
        parts.append(table(["rank", "MB", "samplers", "empty call s", "object store s", "naive send s"], rows))
    if "model" in out:
        m = out["model"]
        rows = [[p["samplers"], p["gpus"], p["sync"], p["async"], p["ideal"]] for p in m["grid"]]
        parts.append(f"PREDICTION (images/s) from stage seconds {m['stage_s']} for {m['images']} images per sampler")
        parts.append(table(["N samplers", "M learner GPUs", "sync", "async", "every stage overlapped"], rows))
        if "check" in m:
            parts.append("prediction vs measured (N=1, M=1): " + ", ".join(f"{k} {v}" for k, v in m["check"].items()))
    if out.get("targets"):
        rows = [[k, t["value"], t["target"], "yes" if t["met"] else "NO"] for k, t in out["targets"].items()]
        parts.append(table(["target", "measured", "target", "met"], rows))
    if "algos" in out:
        parts.append(table(["metric", "value"], [[k, v] for k, v in out["algos"].items()]))
    return "\n\n".join(parts)


def rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, dict):
        return {k: rounded(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [rounded(x) for x in v]
    return v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="stages,overhead,broadcast,model")
    parser.add_argument("--size", default="default", choices=list(SIZES))
    parser.add_argument("--algo", default="tailorpo", help="algorithm of the stages/overhead runs")
    parser.add_argument("--iterations", type=int, default=6, help="per run: the first is warm-up")
    parser.add_argument("--ranks", default="4,16,64")
    parser.add_argument("--samplers", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=3, help="timed broadcasts per point (median)")
    parser.add_argument("--algos", default="tailorpo,diffusion_dpo,ddpo", help="for --parts algos")
    parser.add_argument("--json", type=Path, help="also write the JSON line to this file")
    parser.add_argument(
        "--worker-niceness",
        type=int,
        help="nice value of Ray's worker processes (Ray's default: 15, which a loaded machine punishes)",
    )
    args = parser.parse_args()
    if args.worker_niceness is not None:
        os.environ[NICENESS_ENV] = str(args.worker_niceness)
    for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    parts = set(args.parts.split(","))
    out: dict[str, Any] = {"load_start": load()}
    if "overhead" in parts or ("model" in parts and "stages" not in parts):
        out["overhead"] = bench_overhead(args)
    if "stages" in parts:
        sync = train_run(args, "sync")
        alone = sync["stage_s"]  # in sync mode no stage overlaps another: each one's time alone
        run = train_run(args, "async")
        out["images_per_iteration"] = sync["images"]
        out["stages"] = {
            "sync": sync,
            "sync_efficiency": efficiency(sync, alone),
            "async": run,
            "async_efficiency": efficiency(run, alone),
        }
    if "broadcast" in parts:
        out["broadcast"] = bench_broadcast(args)
    if "model" in parts:
        source = out["stages"]["sync"] if "stages" in out else out["overhead"]["ray"]
        stage_s, images = source["stage_s"], source["images"]
        grid = []
        for n in (1, 2, 4, 8):
            for m in (1, 2, 4):
                p = predict(stage_s, images, n, m)
                grid.append({"samplers": n, "gpus": m, "sync": p.sync, "async": p.async_, "ideal": p.ideal})
        out["model"] = {"stage_s": {k: round(v, 3) for k, v in stage_s.items()}, "images": images, "grid": grid}
        if "async" in out.get("stages", {}):
            one = predict(stage_s, images)
            out["model"]["check"] = {
                "sync predicted/measured": f"{one.sync:.2f}/{out['stages']['sync']['images_per_s']:.2f}",
                "async predicted/measured": f"{one.async_:.2f}/{out['stages']['async']['images_per_s']:.2f}",
            }
    if "algos" in parts:
        out["algos"] = {}
        for algo in args.algos.split(","):
            bench_algo(algo, SIZES[args.size], out["algos"])
    targets = {}
    if "async_efficiency" in out.get("stages", {}):
        v = out["stages"]["async_efficiency"]["efficiency"]
        targets["async_efficiency"] = {"value": v, "target": ">= 0.9", "met": v >= TARGETS["async_efficiency"]}
    if "overhead" in out:
        v = out["overhead"]["ratio"]
        targets["ray_overhead"] = {"value": v, "target": "<= 0.05", "met": v <= TARGETS["ray_overhead"]}
    big = [r for r in out.get("broadcast", {}).get("rows", []) if r["samplers"] == 8 and r["mb"] > 20]
    if big:
        v = big[-1]["store_s"]
        targets["broadcast_25mb_8_samplers_s"] = {
            "value": v,
            "target": "< 0.5",
            "met": v < TARGETS["broadcast_25mb_8_samplers_s"],
        }
    out["targets"] = targets
    out["load_end"] = load()
    line = {
        "benchmark": "throughput",
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "hardware": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "size": args.size,
        "algo": args.algo,
        "parts": sorted(parts),
        "ray_worker_niceness": int(os.environ.get(NICENESS_ENV, "15")),
        **out,
    }
    text = json.dumps(rounded(line))
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print()
    print(report(out))


if __name__ == "__main__":
    main()
