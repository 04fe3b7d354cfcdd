"""Can the demo's LoRA reach the 95 % target at all? Supervised denoising on the real digits, then the judge.

    .venv/bin/python benchmarks/lora_capacity.py [--steps 200] [--every 50] [--rank 16] [--lr 3e-3]

Attaches a fresh LoRA with the demo's targets and rank (`rlalign/presets/digits.yaml`) to the cached embedded
digits model and trains it with the base model's own objective (epsilon MSE on VAE latents of scikit-learn's
digits, the prompt templates, 10 % empty prompts, the same 1/SNR weight clamped to [1, 20]; text encoder frozen),
then samples 20 images per digit at the demo's sampler settings (10 DDIM steps, eta 1, CFG 3; seeds never used in
training) and reads them with the digits classifier and the independent judge (rlalign/evaluation.py). If this
reaches the target and RL does not, the limit is the reward signal, not the LoRA's reach or the sampler
(docs/benchmarks.md, "The demo and the 95 % target"). Prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from rich.console import Console
from rich.table import Table

from rlalign.config import load_config
from rlalign.evaluation import Evaluator, _to_8x8
from rlalign.models import digits as D
from rlalign.models.loading import resolve_model_dir

HELDOUT_SEED = 10_000  # sampling seeds 10000.. (training draws its noise from its own generator)


def measure(pipe, evaluator: Evaluator, per_digit: int, steps: int, guidance: float) -> dict[str, object]:
    wanted = np.repeat(np.arange(10), per_digit)
    n = len(wanted)
    templates = [i % len(D.PROMPT_TEMPLATES) for i in range(n)]
    seeds = [HELDOUT_SEED + i for i in range(n)]
    images = D.sample_digits(
        pipe, wanted.tolist(), seeds, templates=templates, num_inference_steps=steps, guidance_scale=guidance
    )
    judged = evaluator.judge.predict(_to_8x8(images))
    read = np.asarray(evaluator.classifier.predict_digits(images))
    return {
        "judge": float((judged == wanted).mean()),
        "classifier": float((read == wanted).mean()),
        "judge_per_digit": [round(float((judged[wanted == d] == d).mean()), 3) for d in range(10)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="evaluate every this many steps")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--per-digit", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config()
    model_dir = resolve_model_dir(cfg.model, progress=False)
    pipe = D.load_digits_pipeline(model_dir)
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(cfg.lora.target_modules)))
    params = [p for p in unet.parameters() if p.requires_grad]
    images, labels = D._digits_rgb(pipe.vae.config.sample_size)
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        prompts = [""] + [D.digit_prompt(d, t) for d in range(10) for t in range(len(D.PROMPT_TEMPLATES))]
        ids = pipe.tokenizer(
            prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        context = pipe.text_encoder(ids)[0]
    schedule = pipe.scheduler.alphas_cumprod
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    evaluator = Evaluator(model_dir)

    def evaluate(step: int, seconds: float) -> dict[str, object]:
        unet.eval()
        with torch.no_grad():
            out = measure(pipe, evaluator, args.per_digit, cfg.sampler.num_steps, cfg.sampler.guidance_scale)
        unet.train()
        return {"step": step, "train_s": round(seconds, 1), **out}

    points = [evaluate(0, 0.0)]
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(labels), (args.batch,), generator=g)
        rows = (
            1
            + labels[idx] * len(D.PROMPT_TEMPLATES)
            + torch.randint(0, len(D.PROMPT_TEMPLATES), idx.shape, generator=g)
        )
        rows = torch.where(torch.rand(idx.shape, generator=g) < 0.1, 0, rows)
        noise = torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, len(schedule), idx.shape, generator=g)
        abar = schedule[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents[idx] + (1 - abar).sqrt() * noise
        per_image = (unet(noisy, t, context[rows]).sample - noise).pow(2).mean(dim=(1, 2, 3))
        snr = schedule[t] / (1 - schedule[t])
        loss = (per_image * (1 / snr).clamp(1.0, 20.0)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            points.append(evaluate(step, time.perf_counter() - start))
            Console(stderr=True).print(f"step {step}: judge {points[-1]['judge']:.3f}")
    result = {
        "benchmark": "lora_capacity",
        "model_dir": str(Path(model_dir)),
        "rank": args.rank,
        "target_modules": list(cfg.lora.target_modules),
        "lr": args.lr,
        "batch": args.batch,
        "sampler": {"num_steps": cfg.sampler.num_steps, "eta": cfg.sampler.eta, "cfg": cfg.sampler.guidance_scale},
        "points": points,
    }
    print(json.dumps(result))
    table = Table(title="demo LoRA trained by supervised denoising on the real digits (held-out samples)")
    for col in ("step", "train s", "judge", "classifier", "judge per digit 0-9"):
        table.add_column(col)
    for p in points:
        per = " ".join(f"{v:.2f}" for v in p["judge_per_digit"])  # type: ignore[union-attr]
        table.add_row(str(p["step"]), str(p["train_s"]), f"{p['judge']:.3f}", f"{p['classifier']:.3f}", per)
    Console().print(table)


if __name__ == "__main__":
    main()
