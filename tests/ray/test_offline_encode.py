"""Ray Data encoding of offline preference pairs (rlalign/offline/encode.py) on the tiny digits model: bad rows
counted and skipped, the preferred image's latent is the VAE encoding of the preferred picture, 1 and 2 encode
workers give the same cache, and a second run opens the cache instead of encoding again."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prefs_fixtures import BLUE, PLANTED_BAD, RED, write_pickapic_fixture

from rlalign.config import DataCfg, ModelCfg
from rlalign.offline.encode import PairEncoder, encode_preferences, model_resolution

pytestmark = pytest.mark.usefixtures("ray_session")


def _solid(color: tuple[int, int, int], size: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, np.uint8), (1, size, size, 3)).copy()


def test_encode_counts_bad_rows_and_keeps_the_preferred_image_first(tiny_digits_dir: Path, tmp_path: Path) -> None:
    size = model_resolution(tiny_digits_dir)
    table = write_pickapic_fixture(tmp_path / "data", n_good=6, resolution=size)
    model = ModelCfg(path=str(tiny_digits_dir))
    data = DataCfg(preferences=str(table), encode_batch_size=4)
    cache = encode_preferences(data, model, tmp_path / "cache")
    print(f"\n[offline] encoded {len(cache)} pairs in {cache.seconds:.1f} s; bad rows: {cache.bad}")
    assert len(cache) == 6 and cache.seconds > 0
    assert cache.bad["counts"] == {reason: 1 for reason in PLANTED_BAD} and cache.bad["pairs_kept"] == 6
    pairs = cache.take(np.arange(6))
    encoder = PairEncoder(model, num_gpus=0.0)  # the same maths in this process, on solid colours
    red, blue = encoder._encode(_solid(RED, size)), encoder._encode(_solid(BLUE, size))
    for i in range(6):  # preferred = red in every good row, whichever column held it (the fixture alternates)
        dist_red = float((pairs["x0_w"][i] - torch.from_numpy(red[0])).abs().mean())
        dist_blue = float((pairs["x0_w"][i] - torch.from_numpy(blue[0])).abs().mean())
        assert dist_red < dist_blue, i
    # every pair's caption embedding is the text encoder's output for that caption
    captions = [cache.captions[int(j)] for j in range(len(cache.captions))]
    direct = encoder.parts.encode_prompts(captions)
    torch.testing.assert_close(cache.embeds, direct.cpu(), rtol=0, atol=1e-5)
    again = encode_preferences(data, model, tmp_path / "cache")  # same table and model: read from the cache
    assert again.seconds == 0.0 and again.directory == cache.directory


def test_two_encode_workers_give_the_same_cache(tiny_digits_dir: Path, tmp_path: Path) -> None:
    table = write_pickapic_fixture(tmp_path / "data", n_good=10, resolution=model_resolution(tiny_digits_dir))
    model = ModelCfg(path=str(tiny_digits_dir))
    caches: list[Any] = []
    for workers in (1, 2):
        data = DataCfg(preferences=str(table), encode_batch_size=3, encode_workers=workers)
        caches.append(encode_preferences(data, model, tmp_path / f"cache{workers}"))
    one, two = (c.take(np.arange(len(c))) for c in caches)
    assert len(caches[0]) == len(caches[1]) == 10
    for key in ("x0_w", "x0_l", "cond", "row"):
        assert torch.equal(one[key], two[key]), key  # row order too: the pipeline preserves it


def test_a_table_without_one_usable_row_names_the_reasons(tiny_digits_dir: Path, tmp_path: Path) -> None:
    table = write_pickapic_fixture(tmp_path / "data", n_good=0, resolution=model_resolution(tiny_digits_dir))
    data = replace(DataCfg(), preferences=str(table))
    with pytest.raises(ValueError, match=r"no usable preference pair(.|\n)*missing caption: 1"):
        encode_preferences(data, ModelCfg(path=str(tiny_digits_dir)), tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*/meta.json"))  # nothing that looks like a finished cache
