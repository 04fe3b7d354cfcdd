"""HTTP server for one reward model: `python -m reward_servers.serve --model NAME [--path DIR] --port P`.

FastAPI + uvicorn rather than Ray Serve: both import in the ImageReward venv (which cannot hold Ray's pins next
to transformers 4.55) and start in about a second with no cluster; batching is a small asyncio queue below.

Endpoints (all but /health need `Authorization: Bearer TOKEN` when a token is set):
  GET  /health          -> {"status": "ok"}
  GET  /info            -> {"model", "version", "differentiable", "max_batch", "max_bytes", "formats", ...}
  GET  /stats           -> {"requests", "images", "batches", "last_batch_sizes"}
  POST /score           npz {images [B,H,W,3] uint8, prompts [B]} or JSON PNG -> {"scores": [B floats]}
  POST /score_and_grad  npz {images [B,H,W,3] float32 in [0,1], prompts [B]} -> npz {scores [B], grads [B,H,W,3]}
Errors: 401 bad/missing token, 413 body over --max-bytes or batch over --max-batch, 415 unknown content type,
400 malformed body, 422 wrong dtype/shape/prompt count (or the model refused the input), 500 model failure.
Concurrent requests with the same image size are merged into one model call of up to --max-batch images; each
request gets its own slice back, in its own order. The model runs in one worker thread, so it is never called
concurrently, and the event loop keeps answering /health meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Module level, not inside make_app: FastAPI resolves the (postponed) `Request` annotations in module globals.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from reward_servers import __version__
from reward_servers.base import RewardModel, check_images
from reward_servers.codec import JSON, NPZ, PayloadError, decode_json_images, decode_npz, encode_npz, prompts_from_array

log = logging.getLogger("reward_servers.serve")


@dataclass(eq=False)  # identity comparison: fields hold arrays
class _Job:
    """One request waiting for the model."""

    kind: str  # "score" | "grad"
    images: np.ndarray  # [b, H, W, 3]
    prompts: list[str]  # [b]
    future: asyncio.Future[Any] = field(repr=False)

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        """Jobs merge only when their kind and image size agree (they are concatenated along B)."""
        return self.kind, self.images.shape[1:]


class Batcher:
    """Merges concurrent requests into model calls of at most `max_batch` images, FIFO, order kept per request."""

    def __init__(self, model: RewardModel, max_batch: int, batch_wait_s: float) -> None:
        self.model, self.max_batch, self.batch_wait_s = model, max_batch, batch_wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pending: list[_Job] = []  # taken from the queue but not yet run (other kind / size, or no room)
        self.requests, self.images, self.batches = 0, 0, 0
        self.last_batch_sizes: deque[int] = deque(maxlen=100)

    async def submit(self, kind: str, images: np.ndarray, prompts: list[str]) -> Any:
        """Queue one request and wait for its slice of the result."""
        job = _Job(kind, images, prompts, asyncio.get_running_loop().create_future())
        self.requests += 1
        await self.queue.put(job)
        return await job.future

    def _room(self) -> int:
        head = self.pending[0]
        return self.max_batch - sum(len(j.images) for j in self.pending if j.key == head.key)

    async def run(self) -> None:
        """Worker loop (one task per server)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self.pending.append(await self.queue.get())
            # Give concurrent requests a short window to join, then take everything already queued.
            deadline = loop.time() + self.batch_wait_s
            while self._room() > 0 and (wait := deadline - loop.time()) > 0:
                try:
                    self.pending.append(await asyncio.wait_for(self.queue.get(), wait))
                except asyncio.TimeoutError:
                    break
            while not self.queue.empty():
                self.pending.append(self.queue.get_nowait())
            batch, n, head = [], 0, self.pending[0]
            for job in self.pending:
                if job.key == head.key and n + len(job.images) <= self.max_batch:
                    batch.append(job)
                    n += len(job.images)
            self.pending = [j for j in self.pending if j not in batch]
            batch = [j for j in batch if not j.future.done()]  # a client that went away needs no answer
            if batch:
                await self._run_batch(batch, n)

    async def _run_batch(self, batch: list[_Job], n: int) -> None:
        try:  # nothing may escape: an exception here would end the worker and leave every later request waiting
            images = np.concatenate([j.images for j in batch])
            prompts = [p for j in batch for p in j.prompts]
            if batch[0].kind == "score":
                result: Any = (await asyncio.to_thread(self.model.score, images, prompts),)
            else:
                result = await asyncio.to_thread(self.model.score_and_grad, images, prompts)  # type: ignore[attr-defined]
            arrays = [np.asarray(r, dtype=np.float32) for r in result]
            if any(len(a) != len(images) for a in arrays):
                raise RuntimeError(f"model returned {[a.shape for a in arrays]} for {len(images)} images")
            if not np.isfinite(arrays[0]).all():
                raise RuntimeError("model returned non-finite scores")
        except Exception as e:  # every request in the batch gets the error
            log.exception("model call failed")
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        self.batches += 1
        self.images += len(images)
        self.last_batch_sizes.append(len(images))
        start = 0
        for j in batch:
            end = start + len(j.images)
            if not j.future.done():
                j.future.set_result(tuple(a[start:end] for a in arrays))
            start = end


def make_app(
    model: RewardModel,
    *,
    max_batch: int = 32,
    max_bytes: int = 256 * 2**20,
    token: str | None = None,
    batch_wait_s: float = 0.005,
    weights: str | None = None,
) -> Any:
    """FastAPI app serving `model` (built in this process). Used by the CLI and by tests (uvicorn in a thread)."""
    batcher = Batcher(model, max_batch, batch_wait_s)
    differentiable = bool(getattr(model, "differentiable", False)) and hasattr(model, "score_and_grad")

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title=f"rlalign reward server: {model.name}", lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, message: str) -> Response:
        return JSONResponse({"detail": message}, status_code=status)

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise PayloadError(413, f"body of {declared} bytes is over max_bytes={max_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds chunked uploads that declare no length
            size += len(chunk)
            if size > max_bytes:
                raise PayloadError(413, f"body is over max_bytes={max_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(request: Request, dtype: type) -> tuple[np.ndarray, list[str], str]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (NPZ, JSON):
            raise PayloadError(415, f"content type must be {NPZ} or {JSON}, got {ctype or 'none'!r}")
        body = await read_body(request)
        if ctype == NPZ:
            arrays = decode_npz(body, ("images", "prompts"), max_bytes)
            images, prompts = arrays["images"], prompts_from_array(arrays["prompts"])
        else:
            if dtype is not np.uint8:
                raise PayloadError(415, f"/score_and_grad takes float32 images as {NPZ} only")
            images, prompts = decode_json_images(body, max_pixels=max_bytes // 3, max_images=max_batch)
        if images.ndim == 4 and len(images) > max_batch:
            raise PayloadError(413, f"batch of {len(images)} images is over max_batch={max_batch}")
        try:
            check_images(images, prompts, dtype=dtype)
        except ValueError as e:
            raise PayloadError(422, str(e)) from e
        if len(images) == 0:
            raise PayloadError(422, "empty batch")
        if 0 in images.shape[1:3]:  # a 0-pixel image has no score (a model's mean over it is NaN)
            raise PayloadError(422, f"images must be at least 1x1, got shape {tuple(images.shape)}")
        if images.dtype.kind == "f" and not np.isfinite(images).all():
            raise PayloadError(422, "float images hold NaN or infinity")
        return images, prompts, ctype

    async def handle(request: Request, kind: str) -> Response:
        if not authorised(request):
            return error(401, "missing or wrong bearer token")
        if kind == "grad" and not differentiable:
            return error(400, f"model {model.name!r} is not differentiable; use /score")
        try:
            images, prompts, _ = await parse(request, np.uint8 if kind == "score" else np.float32)
        except PayloadError as e:
            return error(e.status, str(e))
        except ClientDisconnect:  # the client left mid-body: nobody reads this, and it is no server error
            return error(400, "client disconnected before sending the whole body")
        try:
            result = await batcher.submit(kind, images, prompts)
        except ValueError as e:  # the model refused this input (e.g. too small for its preprocessing)
            return error(422, f"model {model.name!r} refused the input: {e}")
        except Exception as e:
            return error(500, f"model {model.name!r} failed: {type(e).__name__}: {e}")
        if kind == "score":
            return JSONResponse({"model": model.name, "scores": [float(s) for s in result[0].astype(np.float32)]})
        scores, grads = (np.ascontiguousarray(a, dtype=np.float32) for a in result)
        return Response(encode_npz(scores=scores, grads=grads), media_type=NPZ)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info(request: Request) -> Response:
        if not authorised(request):
            return error(401, "missing or wrong bearer token")
        return JSONResponse({
            "model": model.name,
            "model_class": type(model).__name__,
            "version": __version__,
            "weights": weights,
            "differentiable": differentiable,
            "max_batch": max_batch,
            "max_bytes": max_bytes,
            "formats": {"/score": [NPZ, JSON], "/score_and_grad": [NPZ] if differentiable else []},
        })  # fmt: skip

    @app.get("/stats")
    async def stats(request: Request) -> Response:
        if not authorised(request):
            return error(401, "missing or wrong bearer token")
        return JSONResponse({"requests": batcher.requests, "images": batcher.images, "batches": batcher.batches,
                             "last_batch_sizes": list(batcher.last_batch_sizes)})  # fmt: skip

    @app.post("/score")
    async def score(request: Request) -> Response:
        return await handle(request, "score")

    @app.post("/score_and_grad")
    async def score_and_grad(request: Request) -> Response:
        return await handle(request, "grad")

    return app


def _parse_option(text: str) -> tuple[str, Any]:
    """`key=value`; value read as JSON when it parses (numbers, true/false), else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option needs key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: Sequence[str] | None = None) -> None:
    from reward_servers.registry import REWARDS, make_reward

    p = argparse.ArgumentParser(prog="python -m reward_servers.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(REWARDS), help="registered reward name")
    p.add_argument("--path", default=None, help="local directory holding the model's weights")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (env RLALIGN_REWARD_TOKEN)")
    p.add_argument("--max-batch", type=int, default=32, help="images per model call and per request")
    p.add_argument("--max-bytes", type=int, default=256 * 2**20, help="largest request body")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="seeded random-weights build (tests, smoke runs)")
    p.add_argument("--option", type=_parse_option, action="append", default=[], help="model option key=value")
    args = p.parse_args(argv)

    import os

    import uvicorn

    token = args.token or os.environ.get("RLALIGN_REWARD_TOKEN") or None
    with contextlib.suppress(ValueError):
        if not ipaddress.ip_address(args.host).is_loopback and token is None:
            log.warning("serving on %s without a token: anyone who reaches the port can use it", args.host)
    options = dict(args.option)
    if args.tiny:
        options["tiny"] = True
    model = make_reward(args.model, path=args.path, device=args.device, **options)
    app = make_app(model, max_batch=args.max_batch, max_bytes=args.max_bytes, token=token,
                   batch_wait_s=args.batch_wait_ms / 1000, weights="tiny" if args.tiny else args.path)  # fmt: skip
    print(f"serving reward {model.name!r} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
