"""`HTTPReward`: a RewardModel that scores through a `python -m reward_servers.serve` server.

Scoring is idempotent, so transport failures (refused connection, timeout, dropped connection) and 502/503/504
are retried a bounded number of times with exponential backoff; every request has a timeout, so a call never
hangs. Other 4xx/5xx answers raise at once with the server's message. Answers are checked (JSON shape, length,
dtype) before use. Batches larger than the server's max_batch or max_bytes are split, order kept.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from reward_servers.base import check_images
from reward_servers.codec import NPZ, PayloadError, decode_npz, encode_npz

RETRY_STATUS = frozenset({502, 503, 504})


class RewardServerError(RuntimeError):
    """The reward server answered, but with an error or with something that is not a valid answer."""


class RewardServerUnreachable(ConnectionError):
    """No answer from the reward server after every retry."""


class HTTPReward:
    """RewardModel over HTTP. `name` and `differentiable` come from the server's /info (fetched at construction).

    timeout_s bounds each request (connect: min(timeout_s, 10)); at most 1 + retries attempts, sleeping
    backoff_s * 2**k between them, so a call gives up after about (1 + retries) * timeout_s + backoff.
    """

    def __init__(
        self, url: str, token: str | None = None, timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 0.5
    ) -> None:
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("need retries >= 0, timeout_s > 0, backoff_s >= 0")
        self.url, self.retries, self.backoff_s, self.timeout_s = url.rstrip("/"), retries, backoff_s, timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)), headers=headers)
        info = self.info()
        try:
            self.name: str = str(info["model"])
            self.differentiable: bool = bool(info["differentiable"])
            self.max_batch: int = int(info["max_batch"])
            self.max_bytes: int = int(info["max_bytes"])
        except (KeyError, TypeError, ValueError) as e:
            raise RewardServerError(f"{self.url}/info is not a reward server's /info: {info!r}") from e

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One idempotent request with bounded retries; raises RewardServerUnreachable / RewardServerError."""
        url, last = self.url + path, ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = self._client.request(method, url, **kwargs)
            except httpx.TransportError as e:  # refused, timed out, connection dropped
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code in RETRY_STATUS:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code >= 400:
                raise RewardServerError(f"{method} {url} answered {r.status_code}: {_detail(r)}")
            return r
        raise RewardServerUnreachable(
            f"reward server {url} did not answer after {self.retries + 1} attempts (last: {last}). Check that "
            f"`python -m reward_servers.serve --port PORT` is running there and listening on that host/port."
        )

    def info(self) -> dict[str, Any]:
        """The server's /info: model, version, differentiable, max_batch, max_bytes."""
        r = self._request("GET", "/info")
        try:
            out = r.json()
        except ValueError as e:
            raise RewardServerError(f"{self.url}/info answered non-JSON: {r.text[:200]!r}") from e
        if not isinstance(out, dict):
            raise RewardServerError(f"{self.url}/info answered {out!r}, not an object")
        return out

    def _chunks(self, images: np.ndarray) -> list[slice]:
        per_image = max(1, images[0].nbytes) if len(images) else 1
        n = max(1, min(self.max_batch, (self.max_bytes // 2) // per_image))  # half: room for prompts, zip headers
        return [slice(i, i + n) for i in range(0, len(images), n)]

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """[B, H, W, 3] uint8 -> [B] float32 from the server's /score."""
        check_images(images, prompts)
        parts = [self._score_chunk(images[s], list(prompts[s])) for s in self._chunks(images)]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    def _score_chunk(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        body = encode_npz(images=np.ascontiguousarray(images), prompts=np.asarray(prompts, dtype=str))
        r = self._request("POST", "/score", content=body, headers={"Content-Type": NPZ})
        try:
            scores = r.json()["scores"]
            out = np.asarray(scores, dtype=np.float32)
        except (ValueError, KeyError, TypeError) as e:
            raise RewardServerError(f"{self.url}/score answered garbage: {r.text[:200]!r}") from e
        if out.shape != (len(images),):
            raise RewardServerError(f"{self.url}/score answered {out.shape} scores for {len(images)} images")
        return out

    def score_and_grad(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """[B, H, W, 3] float32 in [0, 1] -> (scores [B], grads [B, H, W, 3]) from /score_and_grad."""
        if not self.differentiable:
            raise TypeError(f"reward server {self.url} ({self.name!r}) is not differentiable")
        check_images(images, prompts, dtype=np.float32)
        parts = [self._grad_chunk(images[s], list(prompts[s])) for s in self._chunks(images)]
        if not parts:
            return np.zeros(0, np.float32), np.zeros(images.shape, np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _grad_chunk(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        body = encode_npz(images=np.ascontiguousarray(images), prompts=np.asarray(prompts, dtype=str))
        r = self._request("POST", "/score_and_grad", content=body, headers={"Content-Type": NPZ})
        try:
            out = decode_npz(r.content, ("scores", "grads"), max_bytes=8 * images.nbytes + 2**20)
        except PayloadError as e:
            raise RewardServerError(f"{self.url}/score_and_grad answered garbage: {e}") from e
        scores, grads = out["scores"], out["grads"]
        if scores.shape != (len(images),) or grads.shape != images.shape:
            raise RewardServerError(
                f"{self.url}/score_and_grad answered scores {scores.shape}, grads {grads.shape} "
                f"for images {images.shape}"
            )
        if scores.dtype != np.float32 or grads.dtype != np.float32:
            raise RewardServerError(f"{self.url}/score_and_grad answered {scores.dtype}/{grads.dtype}, not float32")
        return scores, grads


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail", r.text[:300]))
    except (ValueError, AttributeError):
        return r.text[:300]
