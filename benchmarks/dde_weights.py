"""Plot every DDE credit-weight mode over the training timestep t (docs/algorithms/dde.md 2.5), normalised to mean 1.

    .venv/bin/python benchmarks/dde_weights.py [--schedule scaled_linear|squaredcos_cap_v2] [--out PATH]

Writes runs/bench/dde_weights.png (linear and log axes), prints one JSON line (commit, schedule, per-mode argmax t
and weights at a few t) and a short table. CPU only, about a second; no downloads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

from rlalign.algos.dde import WEIGHT_MODES, dde_weight


def alphas_cumprod(schedule: str) -> torch.Tensor:
    """The training schedule as diffusers builds it (float64): SD1.5/SDXL scaled_linear or the digits cosine."""
    from diffusers import DDPMScheduler

    kw = {"beta_start": 0.00085, "beta_end": 0.012} if schedule == "scaled_linear" else {}
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, **kw).alphas_cumprod.double()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="scaled_linear", choices=["scaled_linear", "squaredcos_cap_v2"])
    parser.add_argument("--stride", type=int, default=50, help="t - s for the stepwise weight (1000 // steps)")
    parser.add_argument("--cap", type=float, default=None, help="DDECfg.weight_cap (default: raw weights)")
    parser.add_argument("--out", default="runs/bench/dde_weights.png")
    args = parser.parse_args()

    ac = alphas_cumprod(args.schedule)
    t = torch.arange(1000)
    weights = {m: dde_weight(ac, m, stride=args.stride, cap=args.cap) for m in WEIGHT_MODES}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, w in weights.items():
        for ax in axes:
            ax.plot(t.numpy(), w.numpy(), label=mode, lw=2 if mode == "dde_mid" else 1)
    axes[1].set_yscale("log")
    for ax, title in zip(axes, ("linear", "log"), strict=True):
        ax.set_xlabel("training timestep t (0 = clean)")
        ax.set_ylabel("w(t), mean 1 over t")
        ax.set_title(f"DDE weight modes, {args.schedule} ({title})")
        ax.grid(alpha=0.3)
    axes[0].legend()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)

    probe = [1, 51, 151, 354, 501, 751, 951, 999]
    record = {
        "bench": "dde_weights",
        "commit": commit(),
        "schedule": args.schedule,
        "stride": args.stride,
        "cap": args.cap,
        "png": str(out),
        "argmax_t": {m: int(w.argmax()) for m, w in weights.items()},
        "w_at": {m: {str(p): round(float(w[p]), 4) for p in probe} for m, w in weights.items()},
    }
    print(json.dumps(record))
    print(f"{'t':>5} " + " ".join(f"{m:>12}" for m in WEIGHT_MODES))
    for p in probe:
        print(f"{p:>5} " + " ".join(f"{float(weights[m][p]):>12.4f}" for m in WEIGHT_MODES))
    print(f"{'argmax':>5} " + " ".join(f"{int(weights[m].argmax()):>12d}" for m in WEIGHT_MODES))


if __name__ == "__main__":
    main()
