"""Tiny preference datasets for tests: Pick-a-Pic v2 column names, JPEG bytes in the rows, planted bad rows.

Shared by tests/unit/test_prefs.py and the Ray Data tests of rlalign/offline. In every good row the preferred image
is red and the other blue, with the labelled side alternating (even rows prefer jpg_0, odd rows jpg_1), so a reader
that ignores or swaps the labels shows it in the pixels. Images are landscape (3R x 2R) so decoding must resize and
crop.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

RED = (220, 30, 30)
BLUE = (30, 30, 220)

# The planted bad rows, in order, by the reason rlalign.offline.prefs reports for them (ties="drop").
PLANTED_BAD = (
    "undecodable image_0",
    "missing caption",
    "no preference (both labels 0)",
    "tie (dropped)",
    "missing label",
)


def jpeg_bytes(color: tuple[int, int, int], size: tuple[int, int], quality: int = 95) -> bytes:
    """A solid-colour JPEG of `size` (width, height)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def fixture_layout(n_good: int, plant_bad: bool = True) -> list[tuple[str, int]]:
    """Row order as ("good", i) / ("bad", j): good and planted rows interleaved (bad j after good j)."""
    n_bad = len(PLANTED_BAD) if plant_bad else 0
    order: list[tuple[str, int]] = []
    for i in range(max(n_good, n_bad)):
        order += [("good", i)] if i < n_good else []
        order += [("bad", i)] if i < n_bad else []
    return order


def planted_rows(n_good: int) -> dict[str, int]:
    """Reason -> row index of each planted bad row in `write_pickapic_fixture(..., n_good, ...)`."""
    return {PLANTED_BAD[j]: row for row, (kind, j) in enumerate(fixture_layout(n_good)) if kind == "bad"}


def good_rows(n_good: int, plant_bad: bool = True) -> list[int]:
    """Row indices of the good rows, in order."""
    return [row for row, (kind, _) in enumerate(fixture_layout(n_good, plant_bad)) if kind == "good"]


def _good_row(i: int, size: tuple[int, int]) -> dict[str, object]:
    red, blue = jpeg_bytes(RED, size), jpeg_bytes(BLUE, size)
    first = i % 2 == 0  # even rows prefer jpg_0
    return {
        "caption": f"a red square, pair {i}",
        "jpg_0": red if first else blue,
        "jpg_1": blue if first else red,
        "label_0": 1.0 if first else 0.0,
        "label_1": 0.0 if first else 1.0,
    }


def _bad_row(reason: str, size: tuple[int, int]) -> dict[str, object]:
    row: dict[str, object] = {
        "caption": f"planted: {reason}",
        "jpg_0": jpeg_bytes(RED, size),
        "jpg_1": jpeg_bytes(BLUE, size),
        "label_0": 1.0,
        "label_1": 0.0,
    }
    broken: dict[str, dict[str, object]] = {
        "undecodable image_0": {"jpg_0": b"\xff\xd8 this is not a jpeg"},
        "missing caption": {"caption": None},
        "no preference (both labels 0)": {"label_0": 0.0},
        "tie (dropped)": {"label_0": 0.5, "label_1": 0.5},  # image_0 red, image_1 blue
        "missing label": {"label_0": None},
    }
    return {**row, **broken[reason]}


def write_pickapic_fixture(dir: Path, n_good: int, resolution: int, plant_bad: bool = True) -> Path:
    """Write `dir/train.parquet` in Pick-a-Pic v2's layout (binary jpg_0/jpg_1, float64 labels, an extra column
    readers must ignore) with `n_good` good rows and, with `plant_bad`, one row per PLANTED_BAD reason."""
    size = (3 * resolution, 2 * resolution)
    rows = [
        _good_row(j, size) if kind == "good" else _bad_row(PLANTED_BAD[j], size)
        for kind, j in fixture_layout(n_good, plant_bad)
    ]
    table = pa.table(
        {
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
            "jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
            "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
            "label_0": pa.array([r["label_0"] for r in rows], pa.float64()),
            "label_1": pa.array([r["label_1"] for r in rows], pa.float64()),
            "ranking_id": pa.array(np.arange(len(rows), dtype=np.int64) + 1000),
        }
    )
    dir.mkdir(parents=True, exist_ok=True)
    path = dir / "train.parquet"
    pq.write_table(table, path)
    return path
