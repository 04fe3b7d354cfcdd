"""Registry: names, lazy imports, tiny builds, and missing-weights errors that name the file to provide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reward_servers.registry import REWARDS, list_rewards, make_reward
from reward_servers.weights import MissingWeightsError


def test_known_names() -> None:
    expected = {"jpeg", "brightness", "aesthetic", "clip_score", "pickscore", "hpsv2", "image_reward"}
    assert expected | {"http", "digit_prompt"} <= set(list_rewards())
    assert REWARDS["jpeg"].differentiable is False and REWARDS["aesthetic"].differentiable is True


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(KeyError, match=r"known: .*aesthetic"):
        make_reward("aesthetics")


def test_registry_import_is_light() -> None:
    heavy = "('torch', 'open_clip', 'transformers')"
    code = f"import sys, reward_servers.registry; print([m for m in {heavy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_simple_rewards_build() -> None:
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    assert make_reward("jpeg").score(imgs, ["a", "b"]).shape == (2,)
    assert make_reward("brightness").name == "brightness"
    with pytest.raises(ValueError, match="no weights"):
        make_reward("jpeg", path="/somewhere")


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("aesthetic", ["open_clip_pytorch_model.bin"]),
        ("clip_score", ["open_clip_pytorch_model.bin"]),
        ("hpsv2", ["HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt"]),
        ("pickscore", ["config.json"]),
        ("image_reward", ["ImageReward.pt"]),
    ],
)
def test_missing_weights_name_the_file(name: str, files: list[str], tmp_path: Path) -> None:
    if name == "image_reward":  # its package is not in the main env: the error says how to get there instead
        with pytest.raises(ImportError, match=r"setup_image_reward_env\.sh"):
            make_reward(name, path=str(tmp_path))
        return
    with pytest.raises(MissingWeightsError) as err:  # directory exists but is empty
        make_reward(name, path=str(tmp_path))
    assert files[0] in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(MissingWeightsError, match="does not exist") as err:
        make_reward(name, path=str(tmp_path / "nope"))
    assert any(f in str(err.value) for f in files)
    with pytest.raises(MissingWeightsError, match="tiny=True") as err:
        make_reward(name)
    assert any(f in str(err.value) for f in files)


def test_aesthetic_needs_its_head_file_too(tmp_path: Path) -> None:
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MissingWeightsError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth"):
        make_reward("aesthetic", path=str(tmp_path))


def test_hpsv2_version_picks_the_file(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match=r"HPS_v2_compressed\.pt") as err:
        make_reward("hpsv2", path=str(tmp_path), version="v2")
    assert "v2.1" not in str(err.value)


def test_tiny_builds_through_registry(tmp_path: Path) -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for name in ("aesthetic", "clip_score", "hpsv2"):
        assert make_reward(name, tiny=True).score(imgs, ["a", "b"]).shape == (2,)
    model = make_reward("pickscore", path=str(tmp_path / "ps"), tiny=True)
    assert (tmp_path / "ps" / "config.json").is_file() and model.score(imgs, ["a", "b"]).shape == (2,)


def test_http_needs_a_url() -> None:
    with pytest.raises(ValueError, match="url="):
        make_reward("http")


@pytest.mark.parametrize("name", sorted(n for n, r in REWARDS.items() if r.features))
def test_rewards_with_features_return_one_row_per_image(name: str, tmp_path: Path) -> None:
    """Every reward the registry says has image features (the monitor's eval.features) has them: [B, F] float32,
    the same image twice gives the same row, and the features respond to the image."""
    if name == "digit_prompt":
        from reward_servers.digit_prompt import DigitClassifier

        DigitClassifier(image_size=16).save(tmp_path / "clf")
        model = make_reward(name, path=str(tmp_path / "clf"))
    else:
        model = make_reward(name, tiny=True, **({"path": str(tmp_path / "w")} if name == "pickscore" else {}))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    imgs = np.concatenate([noise, noise, np.zeros_like(noise)])
    f = model.features(imgs)
    assert f.dtype == np.float32 and f.ndim == 2 and f.shape[0] == 3 and f.shape[1] > 1
    assert np.array_equal(f[0], f[1]) and not np.allclose(f[0], f[2])
