"""Offline preference reading (rlalign/offline/prefs.py): Pick-a-Pic parquet and JSONL with mapped columns, planted
bad rows counted (never raised), ties dropped or kept in both orders, resize + centre crop, clear errors."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from prefs_fixtures import PLANTED_BAD, good_rows, planted_rows, write_pickapic_fixture

from rlalign.offline.prefs import (
    BadRowSummary,
    PrefColumns,
    decode_batch,
    load_decoded,
    read_preference_table,
    resize_center_crop,
)

R = 16
N_GOOD = 6


def is_red(images: np.ndarray) -> np.ndarray:
    """[N, R, R, 3] -> [N] bool: every pixel reads red (JPEG noise allowed)."""
    x = images.astype(int)
    return ((x[..., 0] > 180) & (x[..., 2] < 80)).all(axis=(1, 2))


def is_blue(images: np.ndarray) -> np.ndarray:
    x = images.astype(int)
    return ((x[..., 2] > 180) & (x[..., 0] < 80)).all(axis=(1, 2))


@pytest.fixture
def pickapic(tmp_path: Path) -> Path:
    return write_pickapic_fixture(tmp_path / "pickapic", N_GOOD, R)


def test_pickapic_pairs_put_the_labelled_image_first(pickapic: Path) -> None:
    pairs, summary = load_decoded(str(pickapic), PrefColumns(), resolution=R, ties="drop")
    assert pairs["image_w"].shape == pairs["image_l"].shape == (N_GOOD, R, R, 3)
    assert pairs["image_w"].dtype == np.uint8
    # the fixture alternates which side is preferred; the preferred image is always the red one
    assert is_red(pairs["image_w"]).all() and is_blue(pairs["image_l"]).all()
    assert pairs["caption"].tolist() == [f"a red square, pair {i}" for i in range(N_GOOD)]
    assert pairs["row"].tolist() == good_rows(N_GOOD)
    assert not pairs["tie"].any()
    assert summary.rows_read == N_GOOD + len(PLANTED_BAD) and summary.pairs_kept == N_GOOD


def test_planted_bad_rows_are_counted_with_their_rows(pickapic: Path) -> None:
    _, summary = load_decoded(str(pickapic), PrefColumns(), resolution=R, ties="drop")
    where = planted_rows(N_GOOD)
    assert summary.counts == {reason: 1 for reason in PLANTED_BAD}
    assert summary.examples == {reason: [row] for reason, row in where.items()}
    text = summary.summary()
    assert text.splitlines()[0] == f"{N_GOOD + 5} rows read: {N_GOOD} pairs kept, 5 bad rows skipped"
    assert f"  undecodable image_0: 1 (rows {where['undecodable image_0']})" in text.splitlines()
    assert json.loads(json.dumps(summary.to_dict()))["bad_rows"] == 5


def test_kept_tie_gives_both_orders(pickapic: Path) -> None:
    pairs, summary = load_decoded(str(pickapic), PrefColumns(), resolution=R, ties="keep")
    tie_row = planted_rows(N_GOOD)["tie (dropped)"]
    at = np.flatnonzero(pairs["tie"])
    assert pairs["row"][at].tolist() == [tie_row, tie_row] and at[1] == at[0] + 1
    # the planted tie has a red image_0 and a blue image_1: one order each way
    assert is_red(pairs["image_w"][at[:1]]).all() and is_blue(pairs["image_w"][at[1:]]).all()
    assert is_blue(pairs["image_l"][at[:1]]).all() and is_red(pairs["image_l"][at[1:]]).all()
    assert "tie (dropped)" not in summary.counts and summary.bad_rows == 4
    assert summary.pairs_kept == N_GOOD + 2 and summary.rows_read == N_GOOD + 5


def test_batching_does_not_change_pairs_or_counts(pickapic: Path) -> None:
    whole, summary_whole = load_decoded(str(pickapic), resolution=R, ties="keep", batch_size=1000)
    small, summary_small = load_decoded(str(pickapic), resolution=R, ties="keep", batch_size=2)
    for key in whole:
        np.testing.assert_array_equal(whole[key], small[key])
    assert summary_whole.to_dict() == summary_small.to_dict()


def test_shard_directory_and_file_uri(pickapic: Path, tmp_path: Path) -> None:
    table = pq.read_table(pickapic)
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(table.slice(0, 4), shards / "part-000.parquet")
    pq.write_table(table.slice(4), shards / "part-001.parquet")
    from_dir, summary = load_decoded(str(shards), resolution=R)
    from_file, _ = load_decoded(pickapic.as_uri(), resolution=R)  # file:// URI
    assert from_dir["row"].tolist() == from_file["row"].tolist() == good_rows(N_GOOD)  # global row indices
    np.testing.assert_array_equal(from_dir["image_w"], from_file["image_w"])
    assert summary.counts == {reason: 1 for reason in PLANTED_BAD}


def save_png(path: Path, color: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_jsonl_with_mapped_columns_and_image_paths(tmp_path: Path) -> None:
    data = tmp_path / "mine"
    save_png(data / "images" / "red.png", (200, 0, 0), (40, 20))
    save_png(data / "images" / "blue.png", (0, 0, 200), (20, 40))
    absolute_red = tmp_path / "elsewhere" / "red.png"
    save_png(absolute_red, (200, 0, 0), (R, R))
    rows = [
        {"prompt": "left wins", "left": "images/red.png", "right": "images/blue.png", "pl": 1, "pr": 0},
        {"prompt": "right wins", "left": "images/blue.png", "right": str(absolute_red), "pl": 0, "pr": 1},
        {"prompt": "gone", "left": "images/red.png", "right": "images/missing.png", "pl": 1, "pr": 0},
        {"prompt": "", "left": "images/red.png", "right": "images/blue.png", "pl": 1, "pr": 0},
    ]
    path = data / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    columns = PrefColumns(caption="prompt", image_0="left", image_1="right", label_0="pl", label_1="pr")
    pairs, summary = load_decoded(str(path), columns, resolution=R)
    assert pairs["caption"].tolist() == ["left wins", "right wins"]
    assert (pairs["image_w"] == np.array([200, 0, 0], np.uint8)).all()  # PNG: exact colours after resize/crop
    assert (pairs["image_l"][0] == np.array([0, 0, 200], np.uint8)).all()
    assert summary.counts == {"missing image_1 file": 1, "missing caption": 1}
    assert summary.examples == {"missing image_1 file": [2], "missing caption": [3]}


def test_resize_center_crop_keeps_the_centre() -> None:
    # 4R x 2R: green, red, red, green quarters -> shorter side to R gives 2R x R; the centre R columns are red
    image = np.zeros((2 * R, 4 * R, 3), np.uint8)
    image[:] = (0, 200, 0)
    image[:, R : 3 * R] = (200, 0, 0)
    out = resize_center_crop(Image.fromarray(image), R)
    assert out.shape == (R, R, 3) and out.dtype == np.uint8
    assert (out[:, 2:-2] == np.array([200, 0, 0], np.uint8)).all()  # bicubic may blend the outermost columns
    for size in [(7, 3), (3, 7), (R, R), (5 * R, 5 * R)]:  # upscaled, portrait, unchanged, downscaled
        assert resize_center_crop(Image.new("L", size, 128), R).shape == (R, R, 3)


def test_decode_batch_rows_and_value_forms() -> None:
    red = Image.new("RGB", (R, R), (200, 0, 0))
    buffer = io.BytesIO()
    red.save(buffer, format="PNG")
    png = buffer.getvalue()
    batch = {  # no "row" column: positions; an HF datasets Image struct; numeric-string and NaN labels
        "caption": np.array(["a", "b", "c"], dtype=object),
        "jpg_0": np.array([png, {"bytes": png, "path": None}, png], dtype=object),
        "jpg_1": np.array([png, png, None], dtype=object),
        "label_0": np.array(["1", np.nan, 0.0], dtype=object),
        "label_1": np.array([0, 1.0, 1.0], dtype=object),
    }
    out = decode_batch(batch, PrefColumns(), base_dir=".", resolution=R, ties="drop")
    assert out["bad"].tolist() == ["", "missing label", "missing image_1"]
    assert out["row"].tolist() == [0, 1, 2] and out["row"].dtype == np.int64
    assert out["caption"].tolist() == ["a", "b", "c"]
    assert out["image_w"].shape == (3, R, R, 3) and not out["image_w"][1:].any()  # bad rows carry zeros
    assert out["tie"].dtype == bool
    with pytest.raises(ValueError, match="ties must be one of"):
        decode_batch(batch, PrefColumns(), ".", R, ties="average")


def test_examples_are_capped_and_summary_says_more() -> None:
    summary = BadRowSummary()
    summary.add(np.array(["missing caption"] * 7 + [""]), np.arange(8))
    assert summary.examples["missing caption"] == [0, 1, 2, 3, 4]
    assert "missing caption: 7 (rows 0, 1, 2, 3, 4, ...)" in summary.summary()
    assert summary.rows_read == 8 and summary.pairs_kept == 1


def test_errors_name_the_path_and_the_problem(pickapic: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.parquet"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        read_preference_table(str(missing))
    csv = tmp_path / "prefs.csv"
    csv.write_text("caption,jpg_0\n")
    with pytest.raises(ValueError, match=r"prefs\.csv: unknown extension \.csv"):
        read_preference_table(str(csv))
    with pytest.raises(ValueError, match=r"without \*\.parquet shards"):
        read_preference_table(str(tmp_path))  # a csv and a sub-directory, no parquet shard
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text('{"caption": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_preference_table(str(bad_json))


def test_missing_columns_list_config_keys_and_present_columns(pickapic: Path) -> None:
    columns = PrefColumns(image_1="jpg_right", label_1="pref_right")
    with pytest.raises(ValueError) as err:
        read_preference_table(str(pickapic), columns)
    message = str(err.value)
    assert str(pickapic) in message
    assert "'jpg_right' (data.columns.image_1)" in message and "'pref_right' (data.columns.label_1)" in message
    assert "columns present: caption, jpg_0, jpg_1, label_0, label_1, ranking_id" in message
