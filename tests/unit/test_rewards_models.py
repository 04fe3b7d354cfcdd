"""Tiny random-init builds of the torch rewards: shapes, score == score_and_grad, and pixel gradients that match
central finite differences (models run in float64 for the check)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from reward_servers.open_clip_models import AestheticScore, ClipScore, HPSv2
from reward_servers.pickscore import PickScore
from reward_servers.torch_base import TorchReward, clip_preprocess

PROMPTS = ["a photo of a cat", "two dogs"]

BUILDERS: dict[str, Callable[[Path], TorchReward]] = {
    "clip_score": lambda tmp: ClipScore.build_tiny(seed=0),
    "aesthetic": lambda tmp: AestheticScore.build_tiny(seed=0),
    "hpsv2": lambda tmp: HPSv2.build_tiny(seed=0),
    "pickscore": lambda tmp: PickScore.build_tiny(tmp / "pickscore", seed=0),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TorchReward:
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def _images(seed: int = 0) -> np.ndarray:
    # 40x48, not the tiny models' 32x32: exercises resize + centre crop
    return np.random.default_rng(seed).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)


def test_score_shape_and_agreement_with_score_and_grad(model: TorchReward) -> None:
    imgs = _images()
    s = model.score(imgs, PROMPTS)
    assert s.shape == (2,) and s.dtype == np.float32 and np.isfinite(s).all()
    assert s[0] != s[1]
    s2, g = model.score_and_grad(imgs.astype(np.float32) / 255.0, PROMPTS)
    np.testing.assert_allclose(s2, s, rtol=1e-4, atol=1e-5)
    assert g.shape == imgs.shape and g.dtype == np.float32 and np.abs(g).sum() > 0


def test_gradient_matches_finite_differences(model: TorchReward) -> None:
    model.to(dtype=torch.float64)
    try:
        rng = np.random.default_rng(1)
        x = rng.uniform(0.1, 0.9, (2, 40, 48, 3))
        _, g = model.score_and_grad(x.astype(np.float32), PROMPTS)
        x = x.astype(np.float32).astype(np.float64)  # the point score_and_grad saw

        def f(arr: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model.forward(torch.from_numpy(arr).permute(0, 3, 1, 2), PROMPTS).numpy()

        h = 1e-4
        for _ in range(3):  # random directions over all pixels
            v = rng.normal(size=x.shape)
            fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
            analytic = (g.astype(np.float64) * v).sum(axis=(1, 2, 3))
            np.testing.assert_allclose(analytic, fd, rtol=1e-4, atol=1e-7)
        # one pixel of image 0 moves score 0 only (images are scored independently)
        e = np.zeros_like(x)
        e[0, 20, 24, 1] = 1.0
        fd = (f(x + h * e) - f(x - h * e)) / (2 * h)
        np.testing.assert_allclose(fd[0], g[0, 20, 24, 1], rtol=1e-3, atol=1e-7)
        assert fd[1] == pytest.approx(0.0, abs=1e-9)
    finally:
        model.to(dtype=torch.float32)


def test_scores_depend_on_prompts_where_they_should(model: TorchReward) -> None:
    imgs = np.repeat(_images()[:1], 2, axis=0)
    s = model.score(imgs, ["a cat", "a completely different prompt"])
    if model.name == "aesthetic":
        assert s[0] == s[1]  # aesthetic ignores the prompt
    else:
        assert s[0] != s[1]


def test_clip_preprocess_resizes_crops_and_normalises() -> None:
    x = torch.rand(2, 3, 40, 64, requires_grad=True)
    y = clip_preprocess(x, 32)
    assert y.shape == (2, 3, 32, 32)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # an already-sized square input is only normalised
    z = torch.full((1, 3, 32, 32), 0.5)
    torch.testing.assert_close(
        clip_preprocess(z, 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), torch.zeros(1, 3, 32, 32)
    )


# ------------------------------------------------------------------ real-weights loading code, on a tiny arch

TINY_ARCH = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register a tiny open_clip architecture so `from_dir` runs its real loading path on small files."""
    import json

    import open_clip

    d = tmp_path_factory.mktemp("open_clip_cfg")
    (d / "rlalign-tiny-test.json").write_text(json.dumps(TINY_ARCH))
    open_clip.add_model_config(d)
    return "rlalign-tiny-test"


def test_open_clip_models_load_checkpoints_from_dir(tiny_arch: str, tmp_path: Path) -> None:
    imgs = _images()
    source = ClipScore.build_tiny(seed=3)  # same architecture as TINY_ARCH (quick_gelu=False)
    sd = source.model.state_dict()
    # open_clip checkpoint as published (plain state dict)
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    loaded = ClipScore.from_dir(tmp_path, arch=tiny_arch, quick_gelu=False)
    np.testing.assert_allclose(loaded.score(imgs, PROMPTS), source.score(imgs, PROMPTS), rtol=1e-5)
    # HPS layout: {"state_dict": ...} with DDP's "module." prefixes
    hps_dir = tmp_path / "hps"
    hps_dir.mkdir()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, hps_dir / "HPS_v2_compressed.pt")
    hps = HPSv2.from_dir(hps_dir, arch=tiny_arch)
    np.testing.assert_allclose(hps.score(imgs, PROMPTS), source.score(imgs, PROMPTS), rtol=1e-5)
    # aesthetic: open_clip checkpoint + the head's state dict (keys layers.0 ... layers.7)
    aes_source = AestheticScore.build_tiny(seed=3)
    torch.save(aes_source.head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    aes = AestheticScore.from_dir(tmp_path, arch=tiny_arch, quick_gelu=False)
    np.testing.assert_allclose(aes.score(imgs, PROMPTS), aes_source.score(imgs, PROMPTS), rtol=1e-5)


def test_aesthetic_head_keys_match_the_published_file() -> None:
    keys = set(AestheticScore.build_tiny().head.state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
