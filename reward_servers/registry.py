"""Reward models by short name: `make_reward("aesthetic", path=DIR)`, `make_reward("jpeg")`, `list_rewards()`.

Imports stay lazy: building a registry entry imports its module (open_clip, transformers, ImageReward) only
when that reward is made, so this file also works in the ImageReward venv and in processes that only serve jpeg.
Every real-weights model loads from a local directory; a missing directory or file raises
`MissingWeightsError` naming the file and what to put there. `tiny=True` gives a seeded random build (tests).
"""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reward_servers.base import RewardModel


@dataclass(frozen=True)
class RewardSpec:
    """What a registered reward is, and how to make it."""

    make: Callable[..., RewardModel]  # (path, device, **options) -> model
    measures: str  # one line for `list_rewards()` and docs/rewards.md
    differentiable: bool
    weights: str  # files to put in the weights directory ("" when none)
    features: bool = False  # also has `features(images) -> [B, F]` (base.ImageFeatureModel): the monitor's space


def _attr(module: str, attr: str) -> Any:
    return getattr(importlib.import_module(module), attr)


def _no_path(name: str, path: str | None) -> None:
    if path is not None:
        raise ValueError(f"reward {name!r} has no weights; do not pass path (got {path!r})")


def _jpeg(path: str | None = None, device: str = "cpu", tiny: bool = False, quality: int = 95) -> RewardModel:
    _no_path("jpeg", path)
    return _attr("reward_servers.simple", "JpegCompressibility")(quality=quality)


def _brightness(path: str | None = None, device: str = "cpu", tiny: bool = False) -> RewardModel:
    _no_path("brightness", path)
    return _attr("reward_servers.simple", "Brightness")()


def _open_clip_model(cls_name: str) -> Callable[..., RewardModel]:
    def make(path: str | None = None, device: str = "cpu", tiny: bool = False, **options: Any) -> RewardModel:
        cls = _attr("reward_servers.open_clip_models", cls_name)
        return cls.build_tiny(device=device, **options) if tiny else cls.from_dir(path, device=device, **options)

    return make


def _pickscore(path: str | None = None, device: str = "cpu", tiny: bool = False, seed: int = 0) -> RewardModel:
    cls = _attr("reward_servers.pickscore", "PickScore")
    if tiny:  # the tiny build goes through the real directory loader; path (if given) is where it is written
        return cls.build_tiny(path or tempfile.mkdtemp(prefix="tiny-pickscore-"), device=device, seed=seed)
    return cls.from_dir(path, device=device)


def _image_reward(
    path: str | None = None, device: str = "cpu", tiny: bool = False, seed: int = 0, text_layers: int = 12
) -> RewardModel:
    if importlib.util.find_spec("ImageReward") is None:  # main env: transformers 5; ImageReward has its own venv
        raise ImportError(
            "image_reward needs the `image-reward` package, which runs in its own venv: create it with "
            "`bash scripts/setup_image_reward_env.sh`, serve it with `.venv-imagereward/bin/python -m "
            "reward_servers.serve --model image_reward --path DIR --port P`, and use make_reward('http', url=...)"
        )
    cls = _attr("reward_servers.image_reward", "ImageRewardModel")
    if tiny:
        directory = path or tempfile.mkdtemp(prefix="random-image-reward-")
        return cls.build_random(directory, device=device, seed=seed, text_layers=text_layers)
    return cls.from_dir(path, device=device)


def _digit_prompt(path: str | None = None, device: str = "cpu", tiny: bool = False, **options: Any) -> RewardModel:
    # Written by another engineer (reward_servers/digit_prompt.py); only its `from_dir(path, **kwargs)` is used here.
    from reward_servers.weights import require_dir

    d = require_dir(path, "digit_prompt", "'config.json' + 'model.safetensors' written by DigitClassifier.save", False)
    return _attr("reward_servers.digit_prompt", "DigitPromptReward").from_dir(d, device=device, **options)


def _http(
    path: str | None = None, device: str = "cpu", tiny: bool = False, url: str | None = None, **options: Any
) -> RewardModel:
    _no_path("http", path)
    if not url:
        raise ValueError("reward 'http' needs url='http://HOST:PORT' of a `python -m reward_servers.serve` server")
    return _attr("reward_servers.client", "HTTPReward")(url, **options)


REWARDS: dict[str, RewardSpec] = {
    "jpeg": RewardSpec(_jpeg, "compressibility: minus the JPEG size in kB at quality 95", False, ""),
    "brightness": RewardSpec(_brightness, "mean pixel value in [0, 1] (toy for tests)", True, ""),
    "aesthetic": RewardSpec(
        _open_clip_model("AestheticScore"),
        "LAION aesthetic score (MLP on CLIP ViT-L/14 image embedding)",
        True,
        "open_clip_pytorch_model.bin (open_clip ViT-L-14, OpenAI weights) + sac+logos+ava1-l14-linearMSE.pth",
        features=True,
    ),
    "clip_score": RewardSpec(
        _open_clip_model("ClipScore"),
        "prompt-image agreement: cosine of open_clip embeddings",
        True,
        "open_clip_pytorch_model.bin (open_clip checkpoint of `arch`, default ViT-L-14 OpenAI)",
        features=True,
    ),
    "pickscore": RewardSpec(
        _pickscore,
        "human preference (PickScore, CLIP ViT-H/14 on Pick-a-Pic)",
        True,
        "PickScore_v1 config.json + model.safetensors; CLIP-ViT-H-14 processor files",
        features=True,
    ),
    "hpsv2": RewardSpec(
        _open_clip_model("HPSv2"),
        "human preference (HPS v2 / v2.1, open_clip ViT-H-14)",
        True,
        "HPS_v2.1_compressed.pt or HPS_v2_compressed.pt",
        features=True,
    ),
    "image_reward": RewardSpec(
        _image_reward,
        "human preference (ImageReward, BLIP); own venv, serve over HTTP",
        True,
        "ImageReward.pt + med_config.json + bert-base-uncased vocab.txt",
    ),
    "digit_prompt": RewardSpec(
        _digit_prompt,
        "p(digit named in the prompt | image), small digit classifier",
        True,
        "config.json + model.safetensors (DigitClassifier.save)",
        features=True,
    ),
    "http": RewardSpec(_http, "any reward behind `python -m reward_servers.serve` (option url=)", False, ""),
}


def make_reward(name: str, path: str | None = None, device: str = "cpu", **options: Any) -> RewardModel:
    """Build reward `name`; real weights from local directory `path`; `tiny=True` for a random test build.

    Options go to the model (e.g. `quality=` for jpeg, `arch=` for clip_score, `version=` for hpsv2, `url=`
    for http). Raises KeyError naming the known rewards, MissingWeightsError naming a missing file.
    """
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    return REWARDS[name].make(path=path, device=device, **options)


def list_rewards() -> dict[str, RewardSpec]:
    """Registered rewards by name (a copy)."""
    return dict(REWARDS)
