"""Bytes the driver process receives per logged metrics row, counted from outside the code under test, so the same
script measures a checkout where rollouts pass through the driver and one where they go by reference.

    PYTHONPATH=<checkout> .venv/bin/python benchmarks/driver_bytes.py configs/tiny.yaml model.size=tiny
    PYTHONPATH=<checkout> .venv/bin/python benchmarks/driver_bytes.py iterations=2      # the digits default

It wraps `ray.get` in this process (sums the pickled size of every result) and `MetricSink.log` (one row per
logged iteration, the count since the previous row), starts a local Ray of its own (address="local": never
someone else's cluster) and prints one JSON line per row; `driver/bytes_in` is the run's own figure where the
checkout logs it (docs/cluster.md has the figures).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from typing import Any

import ray
from rich.console import Console

import rlalign.metrics
from rlalign.config import load_config
from rlalign.driver import train


def main(argv: list[str]) -> None:
    count, rows = [0], []
    get, log = ray.get, rlalign.metrics.MetricSink.log

    def counting_get(refs: Any, *args: Any, **kwargs: Any) -> Any:
        out = get(refs, *args, **kwargs)
        count[0] += len(pickle.dumps(out, protocol=5))
        return out

    def counting_log(sink: Any, it: int, metrics: dict[str, float]) -> None:
        evaluation = any(k.startswith("eval/") for k in metrics)
        rows.append({"iteration": it, "bytes": count[0], "eval_row": evaluation, **_own(metrics)})
        count[0] = 0
        log(sink, it, metrics)

    ray.get = counting_get
    rlalign.metrics.MetricSink.log = counting_log  # type: ignore[method-assign]
    path = argv[0] if argv and argv[0].endswith(".yaml") else None
    cfg = load_config(path, argv[1:] if path else argv)
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    try:
        train(cfg, Console(quiet=True))
    finally:
        ray.shutdown()
    for row in rows:
        print(json.dumps(row))


def _own(metrics: dict[str, float]) -> dict[str, float]:
    return {"driver/bytes_in": metrics["driver/bytes_in"]} if "driver/bytes_in" in metrics else {}


if __name__ == "__main__":
    main(sys.argv[1:])
