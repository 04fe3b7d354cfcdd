"""The embedded digits model: tiny build, diffusers layout round-trip, tokenizer ids, determinism, atomic cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reward_servers.digit_prompt import digit_from_prompt
from rlalign.models import digits
from rlalign.models.digits import (
    BUILD_INFO,
    CLASSIFIER_DIR,
    PROMPT_TEMPLATES,
    all_digit_prompts,
    build_digits_model,
    cached_model_dir,
    default_cache_dir,
    digit_prompt,
    ensure_digits_model,
    load_digit_reward,
    load_digits_pipeline,
    make_tokenizer,
    sample_digits,
    tokenizer_words,
)

FAST = {"num_inference_steps": 3}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rlalign-cache")


@pytest.fixture(scope="module")
def tiny(cache: Path) -> Path:
    """A tiny build made through the cache (seconds)."""
    torch.set_num_threads(1)  # the build pins 1 thread anyway; sampling in these tests is tiny
    return ensure_digits_model(cache, seed=0, progress=False, size="tiny")


def test_prompts_parse_back() -> None:
    assert digit_prompt(7) == "a handwritten digit seven"
    assert digit_prompt(7, 1) == "7"
    assert len(all_digit_prompts()) == 10 * len(PROMPT_TEMPLATES)
    for d, prompt in all_digit_prompts():
        assert digit_from_prompt(prompt) == d
    with pytest.raises(ValueError, match=r"0\.\.9"):
        digit_prompt(10)


def test_layout(tiny: Path) -> None:
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", CLASSIFIER_DIR):
        assert (tiny / name).is_dir(), name
    index = json.loads((tiny / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    info = json.loads((tiny / BUILD_INFO).read_text())
    assert info["seed"] == 0 and info["size"] == "tiny" and info["unet_steps"] == 10
    assert {"classifier", "vae", "unet", "total"} <= set(info["seconds"])
    scheduler = json.loads((tiny / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["steps_offset"] == 1
    assert scheduler["clip_sample"] is False and scheduler["prediction_type"] == "epsilon"
    vae = json.loads((tiny / "vae" / "config.json").read_text())
    assert vae["in_channels"] == 3 and vae["scaling_factor"] == pytest.approx(info["vae"]["scaling_factor"])


def test_from_pretrained_round_trip(tiny: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    first = sample_digits(pipe, [3, 8], [1, 2], **FAST)
    assert first.shape == (2, 16, 16, 3) and first.dtype == np.uint8
    pipe.save_pretrained(tmp_path / "copy")
    again = sample_digits(load_digits_pipeline(tmp_path / "copy"), [3, 8], [1, 2], **FAST)
    np.testing.assert_array_equal(first, again)


def test_sampling_is_per_image_seeded(tiny: Path) -> None:
    pipe = load_digits_pipeline(tiny)
    pair = sample_digits(pipe, [1, 3], [4, 5], templates=[0, 0], **FAST)
    alone = sample_digits(pipe, [3], [5], templates=[0], **FAST)
    # batch size may change float summation order on CPU: allow a couple of uint8 levels
    assert np.abs(pair[1].astype(int) - alone[0].astype(int)).max() <= 2
    np.testing.assert_array_equal(pair, sample_digits(pipe, [1, 3], [4, 5], templates=[0, 0], **FAST))


def test_tokenizer_ids_stable(tiny: Path) -> None:
    expected = {
        "a handwritten digit seven": [589, 320, 562, 543, 581, 590],
        "7": [589, 278, 590],
        "the number seven": [589, 584, 575, 581, 590],
        "a drawing of the digit 7": [589, 320, 544, 576, 584, 543, 278, 590],
        "": [589, 590],
    }
    fresh = make_tokenizer(12)
    saved = load_digits_pipeline(tiny).tokenizer
    assert len(fresh) == len(saved) == 591
    for text, ids in expected.items():
        assert fresh(text).input_ids == ids
        assert saved(text).input_ids == ids
    for word in tokenizer_words():  # every known word is one token (start, word, end)
        assert len(fresh(word).input_ids) == 3, word
    assert saved.model_max_length == 12
    assert saved("a", padding="max_length", max_length=12).input_ids[-1] == saved.pad_token_id


def test_reward_ships_with_model(tiny: Path) -> None:
    reward = load_digit_reward(tiny)
    images = sample_digits(tiny, [0, 5], [0, 1], **FAST)
    assert reward.score(images, ["0", "five"]).shape == (2,)
    assert reward.predict_digits(images).shape == (2,)


def test_deterministic_for_a_seed(tiny: Path, tmp_path: Path) -> None:
    build_digits_model(tmp_path / "again", seed=0, size="tiny", progress=False)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tiny / part), load_file(tmp_path / "again" / part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{part}:{k}"


def test_cache_reuses_build(tiny: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tiny == cached_model_dir(cache, 0, "tiny")
    assert tiny.name == f"digits-v{digits.DIGITS_MODEL_VERSION}-tiny-seed0"

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(digits, "build_digits_model", fail)
    assert ensure_digits_model(cache, seed=0, progress=False, size="tiny") == tiny


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(out_dir: Path, **kwargs: object) -> None:
        (Path(out_dir) / "unet").mkdir()
        (Path(out_dir) / "unet" / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(digits, "build_digits_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_digits_model(tmp_path, seed=3, progress=False, size="tiny")
    assert list(tmp_path.iterdir()) == []  # neither the final directory nor the temporary one

    def complete(out_dir: Path, **kwargs: object) -> dict:
        (Path(out_dir) / BUILD_INFO).write_text("{}")
        return {}

    monkeypatch.setattr(digits, "build_digits_model", complete)
    path = ensure_digits_model(tmp_path, seed=3, progress=False, size="tiny")
    assert (path / BUILD_INFO).is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_lost_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = cached_model_dir(tmp_path, 4, "tiny")

    def racing(out_dir: Path, **kwargs: object) -> dict:
        final.mkdir(parents=True)  # another process finished first
        (final / BUILD_INFO).write_text('{"winner": true}')
        (Path(out_dir) / BUILD_INFO).write_text("{}")
        return {}

    monkeypatch.setattr(digits, "build_digits_model", racing)
    assert ensure_digits_model(tmp_path, seed=4, progress=False, size="tiny") == final
    assert json.loads((final / BUILD_INFO).read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLALIGN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("RLALIGN_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "rlalign"
