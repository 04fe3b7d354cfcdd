"""Every alignment algorithm on the embedded digits model at equal cost: held-out accuracy against U-Net evaluations.

    .venv/bin/python benchmarks/algorithms.py --seeds 1,2,3 --minutes 0 --unet-rows 30000 --eval-every 5 \
        --out runs/bench-algos
    .venv/bin/python benchmarks/algorithms.py --seeds 0 --minutes 2 --algos dde_stepwise,ddpo      # smoke check

Each (algorithm, seed) is one `rlalign train` run in a subprocess with the algorithm's calibrated digits config
(`configs/<algo>_digits.yaml`, a link to its layer in rlalign/presets/; `configs/digits.yaml` + `algo=<algo>` for an
algorithm without one), `seed=<seed>`, `time_budget_min=<minutes>`, `unet_rows_budget=<unet_rows>` and
`eval.every=<eval_every>`. `--unet-rows` with `--minutes 0` gives every run the same compute whatever the machine's
load (the table's runs); `--iterations` caps the run instead. Runs go one after another (never in parallel: on 2
cores they would time each other). Seeds 1, 2, 3 are the table's (docs/benchmarks.md); the configs were tuned on
seed 0 (TailorPO's layer) and seeds >= 100 (the others).

From each run's metrics.jsonl: U-Net rows per iteration (`cost/unet_rows` if logged, else `cost/sampler_unet_rows`
+ `cost/learner_unet_rows`: sampling, branching and training rows alike; evaluation is not counted), wall time
(the sum of `time/iteration_s`, evaluation excluded), and at every evaluation point the independent judge's
accuracy (`eval/judge_accuracy`), the reward classifier's (`eval/digit_accuracy`) and the mean reward
(`eval/weighted/mean`). The accuracy "at budget B" is the last evaluation whose cumulative cost is <= B (the model a
user would hold after spending B); a run that never reached B gives no value there.

Writes into --out: runs/<algo>-s<seed>/ (the training runs), results.json (every evaluation point), table.md
(equal U-Net budgets, mean ± sample std over seeds, each algorithm's final point and gain over its base) and
accuracy_vs_unet.png (judge accuracy against U-Net evaluations and against wall seconds, mean over seeds, one line
per algorithm). Prints one JSON line and the
table. A run already complete in --out (its report.html written) is parsed, not trained again, so the table can be
built over several sessions (`--fresh` retrains it); an unfinished one is deleted and rerun. `--reuse` parses
what is in --out and trains nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from rlalign.algos import ALGORITHMS

ROOT = Path(__file__).resolve().parent.parent
ALGOS = list(ALGORITHMS)  # every registered algorithm, in the registry's order
JUDGE, CLASSIFIER, REWARD = "eval/judge_accuracy", "eval/digit_accuracy", "eval/weighted/mean"


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or "unknown"


def config_for(algo: str) -> tuple[Path, list[str]]:
    """The algorithm's calibrated digits config, or the demo preset with `algo=` when it has none."""
    own = ROOT / "configs" / f"{algo}_digits.yaml"
    return (own, []) if own.is_file() else (ROOT / "configs" / "digits.yaml", [f"algo={algo}"])


def train(algo: str, seed: int, args: argparse.Namespace, runs: Path) -> Path:
    """One `rlalign train` subprocess; returns its run directory (stdout/stderr in <name>.log beside it).

    A complete run (report.html is the driver's last write) is kept unless --fresh; a partial one is removed so the
    new run gets the same name (the driver would otherwise pick `<name>-1`)."""
    cfg, extra = config_for(algo)
    name = f"{algo}-s{seed}"
    if (runs / name / "report.html").is_file() and not args.fresh:
        print(f"{name}: complete in {runs}, reused")
        return runs / name
    shutil.rmtree(runs / name, ignore_errors=True)
    iterations = args.iterations if args.iterations else 1_000_000  # default: the time budget binds
    cmd = [
        sys.executable,
        "-m",
        "rlalign.cli",
        "train",
        str(cfg),
        *extra,
        f"seed={seed}",
        f"name={name}",
        f"out_dir={runs}",
        f"time_budget_min={args.minutes}",
        f"unet_rows_budget={args.unet_rows}",
        f"iterations={iterations}",
        f"eval.every={args.eval_every}",
        "log.image_every=0",
        *args.override,
    ]
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        print(f"{name}: rlalign train exited with {rc} (see {runs / (name + '.log')})", file=sys.stderr)
    return runs / name


def curve(metrics_path: Path) -> list[dict[str, float]]:
    """Evaluation points of one run: cumulative U-Net rows and wall seconds at each, with the eval metrics.

    Rows are read in file order; an iteration's cost is added before its own (mid-run) evaluation, which the driver
    runs after that iteration's update. The "before" row has cost 0; the "after" row carries no cost of its own.
    """
    points: list[dict[str, float]] = []
    rows = wall = 0.0
    iters = 0
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        if "cost/unet_rows" in r:
            rows += r["cost/unet_rows"]
        else:
            rows += r.get("cost/sampler_unet_rows", 0.0) + r.get("cost/learner_unet_rows", 0.0)
        if "time/iteration_s" in r:
            wall += r["time/iteration_s"]
            iters += 1
        if JUDGE in r:
            points.append(
                {
                    "iterations": iters,
                    "unet_rows": rows,
                    "wall_s": wall,
                    "judge": r[JUDGE],
                    "classifier": r.get(CLASSIFIER, math.nan),
                    "reward": r.get(REWARD, math.nan),
                }
            )
    return points


def at_budget(
    points: list[dict[str, float]], budget: float, key: str = "judge", axis: str = "unet_rows"
) -> float | None:
    """The metric of the last evaluation with cost (on `axis`) <= budget; None when the run never spent `budget`."""
    if not points or points[-1][axis] < budget:
        return None
    return [p for p in points if p[axis] <= budget][-1][key]


def mean_spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    m = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.1f}"
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}"


def rows_str(rows: float) -> str:
    return f"{rows / 1e6:.2f} M" if rows >= 1e6 else f"{rows / 1e3:.1f} k"


def budgets(results: dict[str, dict[int, list[dict[str, float]]]]) -> list[float]:
    """Four equal-cost columns: quarters of the smallest final cost any run reached (every run has a value)."""
    finals = [pts[-1]["unet_rows"] for runs in results.values() for pts in runs.values() if pts]
    if not finals:
        return []
    low = min(finals)
    return [low * f for f in (0.25, 0.5, 0.75, 1.0)]


def table(results: dict[str, dict[int, list[dict[str, float]]]], grid: list[float]) -> str:
    head = ["algorithm", "seeds", "base"] + [f"judge @ {rows_str(b)} rows" for b in grid]
    head += ["judge final", "gain (points)", "classifier final", "reward final", "U-Net rows final", "wall s final"]
    head += ["iterations"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for algo, runs in results.items():
        pts = [p for p in runs.values() if p]
        if not pts:
            lines.append(f"| {algo} | 0 | " + " | ".join(["n/a"] * (len(head) - 2)) + " |")
            continue
        cells = [algo, str(len(pts)), mean_spread([p[0]["judge"] for p in pts])]
        for b in grid:
            cells.append(mean_spread([v for p in pts if (v := at_budget(p, b)) is not None]))
        cells.append(mean_spread([p[-1]["judge"] for p in pts]))
        # against the run's own base: algorithms sample at their own settings (the TailorPO family at 10 steps)
        cells.append(mean_spread([p[-1]["judge"] - p[0]["judge"] for p in pts]))
        cells.append(mean_spread([p[-1]["classifier"] for p in pts]))
        cells.append(f"{statistics.fmean(p[-1]['reward'] for p in pts):.3f}")
        cells.append(rows_str(statistics.fmean(p[-1]["unet_rows"] for p in pts)))
        cells.append(f"{statistics.fmean(p[-1]['wall_s'] for p in pts):.0f}")
        cells.append(f"{statistics.fmean(p[-1]['iterations'] for p in pts):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_curve(pts: list[list[dict[str, float]]], axis: str) -> tuple[list[float], list[float]]:
    """Mean judge accuracy over seeds at each evaluation point on `axis` (unet_rows or wall_s), to the shortest run."""
    end = min(p[-1][axis] for p in pts)
    xs = sorted({q[axis] for p in pts for q in p if q[axis] <= end})
    ys = [100 * statistics.fmean(v for p in pts if (v := at_budget(p, x, axis=axis)) is not None) for x in xs]
    return xs, ys


def plot(results: dict[str, dict[int, list[dict[str, float]]]], path: Path) -> None:
    """Judge accuracy vs U-Net rows (left) and vs wall seconds (right); per algorithm the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_rows, by_wall) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for algo, runs in results.items():
        pts = [p for p in runs.values() if p]
        if not pts:
            continue
        xs, ys = mean_curve(pts, "unet_rows")
        by_rows.step([x / 1e6 for x in xs], ys, where="post", marker="o", markersize=3, label=f"{algo} (n={len(pts)})")
        xs, ys = mean_curve(pts, "wall_s")
        by_wall.step(xs, ys, where="post", marker="o", markersize=3, label=f"{algo} (n={len(pts)})")
    by_rows.set_xlabel("U-Net evaluations (million rows: sampling + branching + training)")
    by_wall.set_xlabel("training wall seconds (sum of time/iteration_s; evaluation excluded)")
    by_rows.set_ylabel("held-out prompt accuracy, independent judge (%)")
    fig.suptitle("digits model: accuracy vs compute (mean over seeds)")
    for ax in (by_rows, by_wall):
        ax.grid(alpha=0.3)
    by_rows.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", default=",".join(ALGOS), help="comma-separated registered names")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--minutes", type=float, default=7.0, help="time_budget_min of every run (0: none)")
    parser.add_argument(
        "--unet-rows", type=int, default=0, help="unet_rows_budget of every run: equal compute on any machine (0: none)"
    )
    parser.add_argument("--iterations", type=int, default=0, help="cap iterations instead (0: the budget binds)")
    parser.add_argument("--eval-every", type=int, default=10, help="eval.every: points on each curve")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-algos")
    parser.add_argument("--reuse", action="store_true", help="parse runs already in --out, train nothing")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that are already complete in --out")
    parser.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    algos = [a for a in args.algos.split(",") if a]
    unknown = [a for a in algos if a not in ALGOS]
    if unknown:
        parser.error(f"unknown algorithm(s) {unknown}; choose from {ALGOS}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs = args.out / "runs"
    start = time.perf_counter()
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    for algo in algos:
        results[algo] = {}
        for seed in seeds:
            run_dir = runs / f"{algo}-s{seed}" if args.reuse else train(algo, seed, args, runs)
            metrics = run_dir / "metrics.jsonl"
            results[algo][seed] = curve(metrics) if metrics.is_file() else []
    grid = budgets(results)
    md = table(results, grid)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(md + "\n")
    plot(results, args.out / "accuracy_vs_unet.png")
    line = {
        "benchmark": "algorithms",
        "commit": commit(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "hardware": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "seeds": seeds,
        "minutes": args.minutes,
        "unet_rows_budget": args.unet_rows,
        "eval_every": args.eval_every,
        "budgets_unet_rows": [round(b) for b in grid],
        "final_judge": {
            a: round(statistics.fmean(p[-1]["judge"] for p in r.values() if p), 4)
            for a, r in results.items()
            if any(r.values())
        },
        "seconds": round(time.perf_counter() - start, 1),
        "out": str(args.out),
    }
    print(json.dumps(line))
    print(md)


if __name__ == "__main__":
    main()
