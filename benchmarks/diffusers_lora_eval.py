"""Held-out accuracy of a run's LoRA loaded in plain diffusers, beside the run's own (in-project) evaluation.

    .venv/bin/python benchmarks/diffusers_lora_eval.py runs/digits [--ckpt iter_000059]

Renders the run's held-out set (its eval prompts x `eval.images_per_prompt` seeds from `eval.seed`, exactly what
the driver's evaluation renders) with a stock `DiffusionPipeline` + `load_lora_weights(ckpt/diffusers_lora)`,
scores it with the digits classifier and the independent judge, and prints one JSON line and a table next to the
run's last `eval/*` row from metrics.jsonl, then the accuracy per prompted digit and what the judge read each digit
as (where the remaining errors are). Digits runs only (the accuracies need the embedded classifier).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from rlalign import checkpoint as ckpt
from rlalign.config import RunCfg
from rlalign.evaluation import Evaluator
from rlalign.interop import load_pipeline_with_lora, render_with_diffusers
from rlalign.metrics import read_metrics
from rlalign.models.loading import resolve_model_dir
from rlalign.prompts import eval_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--ckpt", default="latest", help="checkpoint name under ckpt/ (default: what latest names)")
    args = parser.parse_args()
    path = ckpt.resolve_resume(
        args.run_dir, args.ckpt if args.ckpt == "latest" else str(args.run_dir / "ckpt" / args.ckpt)
    )
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunCfg), OmegaConf.load(path / "config.yaml")))
    assert isinstance(cfg, RunCfg)
    model_dir = resolve_model_dir(cfg.model, progress=False)
    if not (model_dir / "digit_classifier").is_dir():
        sys.exit(f"{model_dir} has no digit_classifier: this script scores digits runs only")
    batch = eval_batches(cfg.prompts, cfg.eval.images_per_prompt, cfg.eval.seed, 1)[0]
    start = time.perf_counter()
    pipe = load_pipeline_with_lora(model_dir, path / "diffusers_lora")
    images = render_with_diffusers(
        pipe, batch, num_steps=cfg.sampler.num_steps, eta=cfg.sampler.eta, guidance_scale=cfg.sampler.guidance_scale
    )
    evaluator = Evaluator(model_dir)
    plain = evaluator.metrics(images, list(batch.prompts))
    per_digit = evaluator.per_digit(images, list(batch.prompts))
    rows = [r for r in read_metrics(args.run_dir / "metrics.jsonl") if "eval/digit_accuracy" in r]
    ours = rows[-1] if rows else {}
    result = {
        "run": str(args.run_dir),
        "checkpoint": path.name,
        "images": len(images),
        "seconds": round(time.perf_counter() - start, 1),
        "diffusers": plain,
        "rlalign_last_eval": {k: ours.get(k) for k in plain} | {"iteration": ours.get("iteration")},
        "mean_image": float(np.mean(images)),
        "per_digit": per_digit,
    }
    print(json.dumps(result))
    print(f"{'metric':<24}{'plain diffusers':>18}{'rlalign eval':>16}")
    for key, value in plain.items():
        theirs = ours.get(key, float("nan"))
        print(f"{key:<24}{value:>18.3f}{theirs:>16.3f}")
    print(f"\n{'digit':<6}{'n':>4}{'judge':>8}{'classifier':>12}  judge read it as (counts of 0..9)")
    for digit, row in per_digit.items():
        print(f"{digit:<6}{row['n']:>4}{row['judge']:>8.2f}{row['classifier']:>12.2f}  {row['judged_as']}")


if __name__ == "__main__":
    main()
