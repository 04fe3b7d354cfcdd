"""Checkpoint layout (commit, rotation, `latest`, resume lookup) and run outputs (metrics.jsonl, image grid, curve)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rlalign.checkpoint import (
    checkpoint_name,
    checkpoint_root,
    commit,
    list_checkpoints,
    read_state,
    resolve_resume,
    staging_dir,
)
from rlalign.metrics import MetricSink, plot_reward_curve, read_metrics, save_image_grid


def save(run_dir: Path, iteration: int, keep_last: int = 3) -> Path:
    staged = staging_dir(run_dir, iteration)
    (staged / "adapter_model.safetensors").write_bytes(b"lora")
    return commit(run_dir, staged, iteration, {"iteration": iteration}, f"iterations: {iteration}\n", keep_last)


def latest_name(run_dir: Path) -> str:
    return (checkpoint_root(run_dir) / "latest").read_text().strip()


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_commit_writes_state_config_and_moves_latest(tmp_path: Path) -> None:
    final = save(tmp_path, 7)
    assert final == checkpoint_root(tmp_path) / "iter_000007" == checkpoint_root(tmp_path) / checkpoint_name(7)
    assert final.is_dir() and not (checkpoint_root(tmp_path) / "iter_000007.tmp").exists()
    assert (final / "adapter_model.safetensors").read_bytes() == b"lora"
    assert read_state(final) == {"iteration": 7}
    assert (final / "config.yaml").read_text() == "iterations: 7\n"
    assert latest_name(tmp_path) == "iter_000007"
    assert resolve_resume(tmp_path, "latest") == final
    assert not (checkpoint_root(tmp_path) / "latest.tmp").exists()
    save(tmp_path, 8)
    assert resolve_resume(tmp_path, "latest") == checkpoint_root(tmp_path) / "iter_000008"


def test_rotation_keeps_the_last_k(tmp_path: Path) -> None:
    for it in (1, 2, 3, 4, 5):
        save(tmp_path, it, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_000004", "iter_000005"]
    assert latest_name(tmp_path) == "iter_000005"
    # keep_last <= 0 keeps everything
    for it in (6, 7):
        save(tmp_path, it, keep_last=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"iter_{i:06d}" for i in (4, 5, 6, 7)]


def test_rotation_orders_by_iteration_not_by_creation(tmp_path: Path) -> None:
    # iteration 100 sorts after 99 only because names are zero-padded
    for it in (99, 100, 101):
        save(tmp_path, it, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_000100", "iter_000101"]


def test_resume_latest_without_pointer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"resume=latest but .*latest does not exist"):
        resolve_resume(tmp_path, "latest")


def test_resume_explicit_directory(tmp_path: Path) -> None:
    final = save(tmp_path, 3)
    assert resolve_resume(tmp_path, str(final)) == final
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))
    incomplete = tmp_path / "half"
    incomplete.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no state\.json"):
        resolve_resume(tmp_path, str(incomplete))


def test_interrupted_staging_dir_is_ignored(tmp_path: Path) -> None:
    save(tmp_path, 1)
    # a save of iteration 2 died after writing everything but before commit's rename
    staged = staging_dir(tmp_path, 2)
    (staged / "state.json").write_text(json.dumps({"iteration": 2}))
    assert staged.name == "iter_000002.tmp"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_000001"]
    assert latest_name(tmp_path) == "iter_000001"
    assert resolve_resume(tmp_path, "latest").name == "iter_000001"
    # later saves with rotation neither pick it up as latest nor count it as a checkpoint
    save(tmp_path, 3, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_000003"]
    assert resolve_resume(tmp_path, "latest").name == "iter_000003"
    # staging the same iteration again starts from an empty directory
    again = staging_dir(tmp_path, 2)
    assert again == staged and list(again.iterdir()) == []


def test_recommit_of_an_existing_iteration_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 4)
    staged = staging_dir(tmp_path, 4)
    final = commit(tmp_path, staged, 4, {"iteration": 4, "again": True}, "x: 1\n", keep_last=3)
    assert read_state(final) == {"iteration": 4, "again": True}
    assert not (final / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------


def test_metric_sink_lines_are_flushed_and_readable(tmp_path: Path) -> None:
    sink = MetricSink(tmp_path / "run", tensorboard=False)
    sink.log(0, {"reward/mean": 0.5, "learner/version": 1, "bad": float("nan"), "inf": float("inf")})
    # readable before close: every line is flushed as it is written
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows == [{"iteration": 0, "reward/mean": 0.5, "learner/version": 1.0}]
    sink.log(1, {"reward/mean": 0.75})
    assert [r["iteration"] for r in read_metrics(sink.path)] == [0, 1]
    sink.close()
    # a resumed run appends
    sink = MetricSink(tmp_path / "run", tensorboard=False)
    sink.log(2, {"reward/mean": 1.0})
    sink.close()
    rows = read_metrics(sink.path)
    assert [r["reward/mean"] for r in rows] == [0.5, 0.75, 1.0]
    assert all(json.loads(line) for line in sink.path.read_text().splitlines())
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_metric_sink_tensorboard_writes_events(tmp_path: Path) -> None:
    sink = MetricSink(tmp_path / "run", tensorboard=True)
    sink.log(0, {"reward/mean": 0.5})
    sink.close()
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_save_image_grid_size_and_content(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    path = save_image_grid(images, ["a"] * 5, tmp_path / "grids" / "g.png", columns=4, tile=32)
    assert path.is_file()
    with Image.open(path) as grid:
        assert grid.format == "PNG"
        # 4 columns of 32-px tiles; 2 rows of 32-px tiles plus two 12-px caption lines each
        assert grid.size == (4 * 32, 2 * (32 + 24))
        arr = np.asarray(grid.convert("RGB"))
    # tile 0 at the origin, nearest-neighbour upscaled 2x; tile 4 starts the second row
    np.testing.assert_array_equal(arr[0:32:2, 0:32:2], images[0])
    np.testing.assert_array_equal(arr[56 : 56 + 32 : 2, 0:32:2], images[4])
    # the sidecar: each tile's box and caption, for the report's HTML captions
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["captions"] == ["a"] * 5 and side["boxes"][4] == [0, 56, 32, 88]
    x0, y0, x1, y1 = side["boxes"][1]
    np.testing.assert_array_equal(arr[y0:y1:2, x0:x1:2], images[1])


def test_save_image_grid_shrinks_large_images(tmp_path: Path) -> None:
    images = np.full((2, 512, 512, 3), 200, dtype=np.uint8)  # SD-sized: tiles 128 px wide, not 2048
    path = save_image_grid(images, ["p", "q"], tmp_path / "g.png")
    with Image.open(path) as grid:
        assert grid.size == (2 * 128, 128 + 24)


def test_save_image_grid_widens_cells_for_long_captions(tmp_path: Path) -> None:
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    path = save_image_grid(images, ["x" * 40, "y"], tmp_path / "g.png", columns=8, tile=8)
    with Image.open(path) as grid:
        assert grid.size == (2 * 120, 8 + 24)  # cell width 6 * 40 // 2 = 120 > tile width 8


def test_plot_reward_curve_writes_a_png(tmp_path: Path) -> None:
    rows = [
        {"iteration": 0, "reward/digit/mean": 0.1, "eval/accuracy": 0.2, "loss/total": 0.7},
        {"iteration": 1, "reward/digit/mean": 0.3},
        {"iteration": 2, "reward/digit/mean": 0.4, "eval/accuracy": 0.5},
    ]
    path = plot_reward_curve(rows, tmp_path / "plots" / "reward.png")
    assert path is not None and path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    # nothing to plot: no file
    assert plot_reward_curve([{"iteration": 0, "loss/total": 1.0}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    assert plot_reward_curve([], tmp_path / "empty.png") is None
