"""Wire format of the reward HTTP server, shared by `serve.py` and `client.py`. numpy + PIL only; never pickle.

Binary: `application/x-npz`, an uncompressed `np.savez` archive (a zip of .npy files) with members `images`
([B, H, W, 3]) and `prompts` ([B] unicode); answers of /score_and_grad come back the same way (`scores`, `grads`).
Every member's .npy header (dtype, shape) is read and checked before any array is allocated, object dtypes are
refused and `np.load(allow_pickle=False)` reads the data, so a request can neither run code nor make the server
allocate more than the declared body size (zip bombs: the uncompressed sizes are checked first; a zero-size dtype
such as `<U0` counts one byte per element, so a header cannot declare a billion empty prompts).
JSON: `application/json` `{"prompts": [...], "images_png": [base64 PNG, ...]}` for uint8 /score requests; PNG
only, at most `max_images` images and `max_pixels` pixels in all, both checked from the PNG headers before any
image is decoded (a small PNG can declare a huge canvas).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import zipfile
from collections.abc import Iterable

import numpy as np
from PIL import Image

NPZ = "application/x-npz"
JSON = "application/json"


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class PayloadError(ValueError):
    """A request or response body that cannot be used; `status` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def encode_npz(**arrays: np.ndarray) -> bytes:
    """Arrays -> uncompressed npz bytes (prompts: pass `np.asarray(list_of_str)`, a unicode array, not objects)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_npz(body: bytes, required: Iterable[str], max_bytes: int) -> dict[str, np.ndarray]:
    """npz bytes -> {name: array} for exactly the `required` members, checked before loading (see module doc)."""
    required = set(required)
    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
        infos = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
    except (zipfile.BadZipFile, ValueError) as e:
        raise PayloadError(400, f"body is not an npz archive: {e}") from e
    if set(infos) != required:
        raise PayloadError(400, f"npz must hold exactly {sorted(required)}, got {sorted(infos)}")
    if sum(i.file_size for i in infos.values()) > max_bytes:
        raise PayloadError(413, f"npz unpacks to more than max_bytes={max_bytes}")
    out = {}
    for name, info in infos.items():
        try:
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in _HEADER_READERS:
                    raise PayloadError(400, f"member {name!r}: unsupported .npy format version {version}")
                shape, _, dtype = _HEADER_READERS[version](f)  # header only, nothing allocated yet
                if dtype.hasobject:
                    raise PayloadError(422, f"member {name!r}: object dtype refused (no pickle)")
                if math.prod(shape) * max(dtype.itemsize, 1) > info.file_size:  # exact ints: no int64 overflow
                    raise PayloadError(400, f"member {name!r}: header declares more data than it holds")
            with zf.open(info) as f:
                out[name] = np.load(f, allow_pickle=False)
        except PayloadError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise PayloadError(400, f"member {name!r} is not a valid .npy: {e}") from e
    return out


def encode_png_b64(image: np.ndarray) -> str:
    """[H, W, 3] uint8 -> base64 PNG (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_json_images(body: bytes, max_pixels: int, max_images: int | None = None) -> tuple[np.ndarray, list[str]]:
    """JSON {"prompts", "images_png"} -> ([B, H, W, 3] uint8, prompts); all images must share one size.

    413 when there are more than `max_images` images or more than `max_pixels` pixels in all (from the headers).
    """
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PayloadError(400, f"malformed JSON: {e}") from e
    if not (isinstance(obj, dict) and isinstance(obj.get("prompts"), list) and isinstance(obj.get("images_png"), list)):
        raise PayloadError(400, 'JSON body must be {"prompts": [str, ...], "images_png": [base64 PNG, ...]}')
    prompts, encoded = obj["prompts"], obj["images_png"]
    if not all(isinstance(p, str) for p in prompts):
        raise PayloadError(422, "prompts must be strings")
    if max_images is not None and len(encoded) > max_images:
        raise PayloadError(413, f"batch of {len(encoded)} images is over max_batch={max_images}")
    opened, pixels = [], 0
    for i, s in enumerate(encoded):  # headers first: nothing is decoded until the whole batch fits
        try:
            im = Image.open(io.BytesIO(base64.b64decode(s, validate=True)), formats=["PNG"])
        except (binascii.Error, TypeError, ValueError, OSError, Image.DecompressionBombError) as e:
            raise PayloadError(400, f"images_png[{i}] is not a base64 PNG: {e}") from e
        pixels += im.width * im.height
        if pixels > max_pixels:
            raise PayloadError(413, f"images_png[:{i + 1}] hold {pixels} pixels, over the limit of {max_pixels}")
        opened.append(im)
    images = []
    for i, im in enumerate(opened):
        try:
            images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as e:  # corrupt pixel data
            raise PayloadError(400, f"images_png[{i}] is not a valid PNG: {e}") from e
    if len({im.shape for im in images}) > 1:
        raise PayloadError(422, f"all images must share one size, got {sorted({im.shape for im in images})}")
    batch = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    return batch, prompts


def prompts_from_array(arr: np.ndarray) -> list[str]:
    """[B] unicode array -> list of str (422 for anything else)."""
    if arr.ndim != 1 or arr.dtype.kind != "U":
        raise PayloadError(422, f"prompts must be a 1-D unicode array, got {arr.dtype} shape {arr.shape}")
    return [str(p) for p in arr]
