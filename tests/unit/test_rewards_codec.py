"""The reward server's wire format: npz members are checked before allocation, pickles and bombs are refused."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable

import numpy as np
import pytest

from reward_servers.codec import PayloadError, decode_json_images, decode_npz, encode_npz, encode_png_b64

MEMBERS = ("images", "prompts")


def _status(fn: Callable[..., object], *args: object) -> int:
    with pytest.raises(PayloadError) as err:
        fn(*args)
    return err.value.status


def test_roundtrip() -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    out = decode_npz(encode_npz(images=images, prompts=np.asarray(["a cat", "ünïcode"])), MEMBERS, 10**6)
    np.testing.assert_array_equal(out["images"], images)
    assert list(out["prompts"]) == ["a cat", "ünïcode"]


def test_object_arrays_are_refused() -> None:
    body = encode_npz(images=np.array([None], dtype=object), prompts=np.asarray(["a"]))
    assert _status(decode_npz, body, MEMBERS, 10**6) == 422


def test_zip_bomb_is_refused_before_inflating() -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, images=np.zeros((64, 128, 128, 3), np.uint8), prompts=np.asarray(["a"] * 64))
    assert len(buf.getvalue()) < 100_000  # small on the wire, 3 MB unpacked
    assert _status(decode_npz, buf.getvalue(), MEMBERS, 1_000_000) == 413


def test_header_that_declares_more_data_than_sent_is_refused() -> None:
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "|u1", "fortran_order": False, "shape": (10**5, 10**5, 3)})
    npy.write(b"\x00" * 16)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("images.npy", npy.getvalue())
        zf.writestr("prompts.npy", _npy(["a"]))
    assert _status(decode_npz, buf.getvalue(), MEMBERS, 10**9) == 400


def _npy(prompts: list[str]) -> bytes:
    b = io.BytesIO()
    np.save(b, np.asarray(prompts))
    return b.getvalue()


@pytest.mark.parametrize(
    "body",
    [b"not a zip", encode_npz(images=np.zeros((1, 2, 2, 3), np.uint8)), encode_npz(a=np.zeros(1), b=np.zeros(1))],
)
def test_malformed_or_wrong_members_are_400(body: bytes) -> None:
    assert _status(decode_npz, body, MEMBERS, 10**6) == 400


def test_json_png_decoding_and_limits() -> None:
    a = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    body = json.dumps({"prompts": ["x"], "images_png": [encode_png_b64(a)]}).encode()
    images, prompts = decode_json_images(body, 100)
    np.testing.assert_array_equal(images[0], a)
    assert prompts == ["x"]
    assert _status(decode_json_images, body, 19) == 413  # 20 pixels > 19, refused from the PNG header
    b = np.zeros((3, 3, 3), np.uint8)
    mixed = json.dumps({"prompts": ["x", "y"], "images_png": [encode_png_b64(a), encode_png_b64(b)]}).encode()
    assert _status(decode_json_images, mixed, 100) == 422
    assert _status(decode_json_images, b'{"prompts": [1], "images_png": []}', 100) == 422
    assert _status(decode_json_images, b"[1, 2]", 100) == 400
