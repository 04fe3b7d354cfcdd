"""Offline Diffusion-DPO through `train` on the tiny digits model, from a Pick-a-Pic-layout table with JPEG bytes and
planted bad rows (tests/prefs_fixtures.py): the bad rows are reported and skipped, the first loss is ln 2, the
checkpoints hold the stream's position, and a resumed run trains on exactly the pairs the uninterrupted one did."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from prefs_fixtures import PLANTED_BAD, write_pickapic_fixture
from rich.console import Console
from safetensors.torch import load_file

from rlalign.config import load_config
from rlalign.driver import train
from rlalign.learner import LORA_FILE
from rlalign.metrics import read_metrics
from rlalign.offline.encode import model_resolution

CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
N = 4


def _rows(run_dir: Path) -> list[dict[str, float]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/total" in r]


def _latest(run_dir: Path) -> Path:
    return run_dir / "ckpt" / (run_dir / "ckpt" / "latest").read_text().strip()


def test_offline_dpo_trains_reports_bad_rows_and_resumes_exactly(
    ray_session: None, tiny_overrides: list[str], tiny_digits_dir: Path, tmp_path: Path
) -> None:
    table = write_pickapic_fixture(tmp_path / "data", n_good=5, resolution=model_resolution(tiny_digits_dir))
    base = [
        "algo=diffusion_dpo",
        f"data.preferences={table}",
        "data.pairs_per_iteration=3",  # 4 x 3 pairs from 5: the stream crosses two epoch ends
        "learner.lr=1e-2",
        "ray.mode=async",  # the digits default: an offline-only run must not overlap (or checkpoint) sampling
        *tiny_overrides,
    ]
    full = train(load_config(CONFIG, [*base, f"iterations={N}", "name=full"]), Console(quiet=True))
    rows = _rows(full.run_dir)
    assert [r["offline/pairs"] for r in rows] == [3.0] * N
    assert [r["offline/pairs_seen"] for r in rows] == [3.0, 6.0, 9.0, 12.0]
    assert [r["offline/epoch"] for r in rows] == [0.0, 1.0, 1.0, 2.0]
    assert abs(rows[0]["loss/first"] - math.log(2)) < 1e-6  # fresh LoRA: policy == reference on human pairs too
    assert rows[0]["cost/unet_rows"] > 0 and "reward/weighted/mean" not in rows[0]  # no sampling, no reward
    bad = json.loads((full.run_dir / "offline_bad_rows.json").read_text())
    assert bad["counts"] == {reason: 1 for reason in PLANTED_BAD} and bad["pairs_kept"] == 5
    assert full.before and full.after  # held-out evaluation as in an online run
    state = json.loads((_latest(full.run_dir) / "state.json").read_text())
    assert state["offline"] == {"epoch": 2, "offset": 2, "pairs_seen": 12}
    assert (full.run_dir / "report.html").is_file()

    train(load_config(CONFIG, [*base, f"iterations={N // 2}", "name=half"]), Console(quiet=True))
    resumed = train(load_config(CONFIG, [*base, f"iterations={N}", "name=half", "resume=latest"]), Console(quiet=True))
    again = _rows(resumed.run_dir)
    assert [r["iteration"] for r in again] == list(range(N))
    assert [r["loss/total"] for r in again] == [r["loss/total"] for r in rows]  # the same pairs, t and noise
    a, b = load_file(str(_latest(resumed.run_dir) / LORA_FILE)), load_file(str(_latest(full.run_dir) / LORA_FILE))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    start = load_file(str(_latest(full.run_dir) / LORA_FILE))
    assert any(float(torch.count_nonzero(v)) for k, v in start.items() if "lora_B" in k)  # the LoRA moved


def test_online_fraction_mixes_human_pairs_into_the_samplers_updates(
    ray_session: None, tiny_overrides: list[str], tiny_digits_dir: Path, tmp_path: Path
) -> None:
    """data.online_fraction = 0.25: each update holds the samplers' G best-vs-worst pairs and round(3 G) offline
    pairs, so the online ones are a quarter of it."""
    table = write_pickapic_fixture(tmp_path / "data", n_good=5, resolution=model_resolution(tiny_digits_dir))
    cfg = load_config(
        CONFIG,
        [
            "algo=diffusion_dpo",
            f"data.preferences={table}",
            "data.online_fraction=0.25",
            "iterations=2",
            *tiny_overrides,
        ],
    )
    groups = cfg.sampler.prompts_per_worker * cfg.sampler.num_workers
    rows = _rows(train(cfg, Console(quiet=True)).run_dir)
    assert [r["offline/pairs"] for r in rows] == [3.0 * groups] * 2
    assert all(r["learner/rows"] == 4.0 * groups for r in rows)  # G online pairs + 3 G offline pairs
    assert all("reward/weighted/mean" in r and r["driver/bytes_in"] > 0 for r in rows)  # the samplers did sample
    assert rows[1]["offline/pairs_seen"] == 6.0 * groups
