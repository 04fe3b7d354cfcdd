"""Offline preference pairs: Ray Data encode throughput (1 and 2 workers) and learner pairs/s (docs/benchmarks.md).

    .venv/bin/rlalign data digits-prefs runs/digits-prefs --pairs 800          # the embedded model's pair set
    .venv/bin/python benchmarks/offline.py --prefs runs/digits-prefs/train.parquet --workers 1,2

Encode: for each worker count, a fresh cache directory and the whole pipeline of `rlalign train` (read the table,
decode + crop, VAE + text encoder on `--workers` Ray Data actors, write the safetensors shards). Reported: total
seconds and pairs/s, and the steady rate after the first batch arrived (actor start-up and model loading excluded).
Learner: the algorithm's update on offline batches of `--pairs-per-update` pairs, in this process (no Ray), after
one warm-up update. Prints one JSON line and a table. Numbers are for the machine it runs on; say which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def encode_rates(prefs: str, model: object, workers: int, batch: int, max_pairs: int) -> dict[str, float]:
    from rlalign.config import DataCfg
    from rlalign.offline.encode import encode_preferences

    marks: list[tuple[float, int]] = []
    cache_root = Path(tempfile.mkdtemp(prefix=f"bench-offline-w{workers}-"))
    data = DataCfg(preferences=prefs, encode_workers=workers, encode_batch_size=batch, max_pairs=max_pairs)
    start = time.perf_counter()
    cache = encode_preferences(data, model, cache_root, progress=lambda rows: marks.append((time.perf_counter(), rows)))
    total = time.perf_counter() - start
    shutil.rmtree(cache_root, ignore_errors=True)
    first_t, first_rows = marks[0]
    steady = (marks[-1][1] - first_rows) / max(marks[-1][0] - first_t, 1e-9) if len(marks) > 1 else float("nan")
    return {
        "workers": workers,
        "pairs": len(cache),
        "seconds": total,
        "pairs_per_s": len(cache) / total,
        "first_batch_s": first_t - start,
        "steady_pairs_per_s": steady,
    }


def learner_rate(cfg: object, prefs: str, pairs: int, updates: int) -> dict[str, float]:
    import functools

    import ray

    from rlalign.config import DataCfg
    from rlalign.learner import Learner
    from rlalign.models.loading import load_parts
    from rlalign.offline.encode import encode_preferences
    from rlalign.offline.stream import PairStream, offline_scored

    cache_root = Path(tempfile.mkdtemp(prefix="bench-offline-learn-"))
    cache = encode_preferences(DataCfg(preferences=prefs), cfg.model, cache_root)
    ray.shutdown()  # the learner runs in this process: give it the cores
    make = functools.partial(load_parts, cfg.model, cfg.lora, cfg.sampler.num_steps, role="learner")
    learner = Learner(cfg, make)
    stream = PairStream(cache, pairs, seed=0)

    def batch() -> object:
        return offline_scored(stream.next(), eta=cfg.sampler.eta, guidance_scale=cfg.sampler.guidance_scale)

    learner.update(batch())  # warm-up
    start = time.perf_counter()
    losses = [learner.update(batch())["loss/total"] for _ in range(updates)]
    seconds = time.perf_counter() - start
    shutil.rmtree(cache_root, ignore_errors=True)
    return {
        "algo": cfg.algo,
        "pairs_per_update": pairs,
        "updates": updates,
        "seconds_per_update": seconds / updates,
        "pairs_per_s": pairs * updates / seconds,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefs", required=True, help="a preference table (rlalign data digits-prefs writes one)")
    parser.add_argument("--workers", default="1,2", help="encode worker counts to measure")
    parser.add_argument("--batch", type=int, default=32, help="rows per Ray Data batch")
    parser.add_argument("--max-pairs", type=int, default=0, help="encode only the first N rows (0: all)")
    parser.add_argument("--algo", default="diffusion_dpo")
    parser.add_argument("--pairs-per-update", type=int, default=32)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--config", default=None, help="config file (default: the embedded digits model)")
    args = parser.parse_args(argv)

    import ray

    from rlalign.config import load_config
    from rlalign.models.loading import resolve_model_dir

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = load_config(args.config, [f"algo={args.algo}"])
    cfg = replace(cfg, model=replace(cfg.model, path=str(resolve_model_dir(cfg.model, progress=True))))
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR")
    encode = [encode_rates(args.prefs, cfg.model, int(w), args.batch, args.max_pairs) for w in args.workers.split(",")]
    learn = learner_rate(cfg, args.prefs, args.pairs_per_update, args.updates)
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, torch CPU"
    print(json.dumps({"benchmark": "offline", "machine": machine, "encode": encode, "learner": learn}))
    print(f"\nencode ({Path(args.prefs).name}, batch {args.batch})")
    print("| workers | pairs | seconds | pairs/s | first batch s | steady pairs/s |\n|---|---|---|---|---|---|")
    for e in encode:
        print(
            f"| {e['workers']} | {e['pairs']} | {e['seconds']:.1f} | {e['pairs_per_s']:.1f} | "
            f"{e['first_batch_s']:.1f} | {e['steady_pairs_per_s']:.1f} |"
        )
    print(
        f"\nlearner {learn['algo']}: {learn['pairs_per_update']} pairs/update, "
        f"{learn['seconds_per_update']:.2f} s/update, {learn['pairs_per_s']:.1f} pairs/s "
        f"(loss {learn['loss_first']:.4f} -> {learn['loss_last']:.4f} over {learn['updates']} updates)"
    )
    return 0 if np.isfinite(learn["pairs_per_s"]) else 1


if __name__ == "__main__":
    sys.exit(main())
