"""`rlalign data digits-prefs` (rlalign/offline/digits_prefs.py) on the tiny digits model: Pick-a-Pic rows whose
preferred image the classifier really prefers, read back by rlalign/offline/prefs.py, deterministic for a seed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rlalign.cli import main
from rlalign.models.digits import all_digit_prompts, load_digit_reward
from rlalign.offline.digits_prefs import EVAL_SEED_FLOOR, choose_pair, make_digits_prefs
from rlalign.offline.prefs import PrefColumns, load_decoded

PAIRS = 10


def image_size(model_dir: Path) -> int:
    return int(json.loads((model_dir / "build_info.json").read_text())["spec"]["image_size"])


@pytest.fixture(scope="module")
def prefs_dir(tiny_digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits-prefs")
    argv = ["data", "digits-prefs", str(out), "--pairs", str(PAIRS), "--seed", "1", "--model-dir", str(tiny_digits_dir)]
    assert main(argv) == 0
    return out


def test_rows_have_pickapic_columns_jpegs_and_one_hot_labels(prefs_dir: Path, tiny_digits_dir: Path) -> None:
    table = pq.read_table(prefs_dir / "train.parquet").to_pydict()
    resolution = image_size(tiny_digits_dir)  # the model's native resolution (16 px for the tiny model)
    assert set(PrefColumns().mapping().values()) <= set(table) and len(table["caption"]) == PAIRS
    for side in ("jpg_0", "jpg_1"):
        for data in table[side]:
            with Image.open(io.BytesIO(data)) as image:
                assert image.format == "JPEG" and image.size == (resolution, resolution)
    labels = np.array([table["label_0"], table["label_1"]]).T
    assert set(labels.ravel().tolist()) == {0.0, 1.0} and (labels.sum(1) == 1).all()
    assert 0 < labels[:, 0].sum() < PAIRS  # the winner's side is a coin flip, not always jpg_0
    prompts = dict((p, d) for d, p in all_digit_prompts())
    assert [prompts[c] for c in table["caption"]] == table["digit"]  # training prompts, digit as prompted
    assert max(table["seed_0"] + table["seed_1"]) < EVAL_SEED_FLOOR  # never a held-out evaluation seed
    summary = json.loads((prefs_dir / "summary.json").read_text())
    assert summary["pairs"] == PAIRS and summary["seed"] == 1 and summary["model_dir"] == str(tiny_digits_dir)
    assert summary["classifier_accuracy_winners"] > summary["classifier_accuracy_losers"]
    assert "Pick-a-Pic" in (prefs_dir / "README.md").read_text()


def test_preferred_image_is_the_one_the_classifier_prefers(prefs_dir: Path, tiny_digits_dir: Path) -> None:
    table = pq.read_table(prefs_dir / "train.parquet").to_pydict()
    pairs, summary = load_decoded(str(prefs_dir / "train.parquet"), resolution=image_size(tiny_digits_dir))
    assert summary.bad_rows == 0 and summary.pairs_kept == PAIRS
    digit = np.array(table["digit"])
    probs = load_digit_reward(tiny_digits_dir).probabilities
    at = np.arange(PAIRS)
    p_w, p_l = probs(pairs["image_w"])[at, digit], probs(pairs["image_l"])[at, digit]  # re-read from the JPEGs
    assert (p_w > p_l).all()
    winner_is_0 = np.array(table["label_0"]) == 1.0
    stored_w = np.where(winner_is_0, table["classifier_prob_0"], table["classifier_prob_1"])
    stored_l = np.where(winner_is_0, table["classifier_prob_1"], table["classifier_prob_0"])
    assert (stored_w - stored_l >= 0.1).all()  # the default --min-gap
    np.testing.assert_allclose(p_w, stored_w, atol=0.05)  # JPEG noise only
    np.testing.assert_allclose(p_l, stored_l, atol=0.05)


def test_same_seed_same_pairs_whatever_the_batching(prefs_dir: Path, tiny_digits_dir: Path, tmp_path: Path) -> None:
    kwargs = {"model_dir": tiny_digits_dir, "progress": False}
    make_digits_prefs(tmp_path / "again", PAIRS, seed=1, prompts_per_call=3, **kwargs)
    make_digits_prefs(tmp_path / "other", PAIRS, seed=2, **kwargs)
    first = pq.read_table(prefs_dir / "train.parquet")
    assert pq.read_table(tmp_path / "again" / "train.parquet").equals(first)
    other = pq.read_table(tmp_path / "other" / "train.parquet")
    assert other["seed_0"].to_pylist() != first["seed_0"].to_pylist()


def test_choose_pair_prefers_correct_over_wrong_and_skips_small_gaps() -> None:
    prob = np.array([0.30, 0.90, 0.60, 0.05, 0.20])
    correct = np.array([False, True, True, False, False])
    assert choose_pair(prob, correct, 0.1) == (1, 3)  # best correct vs least likely wrong
    assert choose_pair(prob, np.zeros(5, bool), 0.1) == (1, 3)  # all wrong: highest vs lowest
    assert choose_pair(np.array([0.95, 0.97, 0.96]), np.ones(3, bool), 0.1) is None  # all right, nearly equal
    # a confident wrong read can outscore an unsure right one: the gap is negative, so no pair
    assert choose_pair(np.array([0.2, 0.45]), np.array([True, False]), 0.0) is None


def test_impossible_gap_stops_with_a_clear_error(tiny_digits_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="only 0 of 3 pairs after 2 prompt groups"):
        make_digits_prefs(
            tmp_path, 3, model_dir=tiny_digits_dir, images_per_prompt=2, min_gap=1.5, max_groups=2, progress=False
        )
