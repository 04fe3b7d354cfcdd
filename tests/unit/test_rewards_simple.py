"""jpeg and brightness rewards, RewardServer request order, and the image checks behind every reward."""

from __future__ import annotations

import numpy as np
import pytest

from reward_servers.base import RewardServer, check_images
from reward_servers.simple import Brightness, JpegCompressibility


def _images(b: int = 4, h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_jpeg_prefers_flat_images_and_is_deterministic() -> None:
    noise = _images(1, 64, 64)
    flat = np.full((1, 64, 64, 3), 128, np.uint8)
    model = JpegCompressibility()
    s_noise, s_flat = model.score(noise, ["x"]), model.score(flat, ["x"])
    assert s_noise.dtype == np.float32 and s_noise.shape == (1,)
    assert s_flat[0] > s_noise[0]  # smaller file, higher reward
    assert s_noise[0] < 0 and s_flat[0] < 0  # minus a size
    np.testing.assert_array_equal(model.score(noise, ["x"]), s_noise)


def test_jpeg_size_is_in_kilobytes() -> None:
    import io

    from PIL import Image

    img = _images(1, 32, 32)
    buf = io.BytesIO()
    Image.fromarray(img[0]).save(buf, format="JPEG", quality=95)
    assert JpegCompressibility().score(img, ["x"])[0] == pytest.approx(-buf.tell() / 1000.0)


def test_brightness_values_and_gradient() -> None:
    # two images: all 0 and all 255 -> 0 and 1
    imgs = np.stack([np.zeros((4, 5, 3), np.uint8), np.full((4, 5, 3), 255, np.uint8)])
    np.testing.assert_allclose(Brightness().score(imgs, ["a", "b"]), [0.0, 1.0])
    x = np.random.default_rng(1).random((2, 4, 5, 3), dtype=np.float32)
    s, g = Brightness().score_and_grad(x, ["a", "b"])
    np.testing.assert_allclose(s, x.reshape(2, -1).mean(1), rtol=1e-6)
    np.testing.assert_allclose(g, np.full_like(x, 1 / 60))  # mean of 4*5*3 = 60 values


class _Recorder:
    """Scores image i as its first pixel value; records each call's batch size."""

    name, differentiable = "recorder", False

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        self.calls.append(len(images))
        assert [int(p) for p in prompts] == [int(v) for v in images[:, 0, 0, 0]]  # prompts travel with images
        return images[:, 0, 0, 0].astype(np.float32)


def test_reward_server_keeps_request_order_across_chunks() -> None:
    recorder = _Recorder()
    server = RewardServer(lambda: recorder, max_batch=3)
    images = np.zeros((10, 2, 2, 3), np.uint8)
    values = np.random.default_rng(0).permutation(200)[:10]
    images[:, 0, 0, 0] = values
    out = server.score(images, [str(v) for v in values])
    np.testing.assert_array_equal(out, values.astype(np.float32))
    assert recorder.calls == [3, 3, 3, 1]


@pytest.mark.parametrize(
    ("images", "prompts", "match"),
    [
        (np.zeros((2, 4, 4, 3), np.float32), ["a", "b"], "uint8"),
        (np.zeros((2, 4, 4), np.uint8), ["a", "b"], "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), ["a"], "one prompt per image"),
        ([[0]], ["a"], "numpy array"),
    ],
)
def test_check_images_names_the_problem(images: np.ndarray, prompts: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_images(images, prompts)
