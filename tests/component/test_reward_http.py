"""The reward HTTP server started for real on localhost, and the HTTPReward client against it and against fakes.

Servers: `make_app` under uvicorn in a thread (in-process models, e.g. a slow recorder for batching) and
`python -m reward_servers.serve` as a subprocess (the CLI path, with token and limits). Loopback only.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from conftest import free_port, reward_server_process

from reward_servers.client import HTTPReward, RewardServerError, RewardServerUnreachable
from reward_servers.codec import NPZ, decode_npz, encode_npz, encode_png_b64
from reward_servers.registry import make_reward
from reward_servers.serve import make_app
from reward_servers.simple import Brightness, JpegCompressibility

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """uvicorn on a pre-bound loopback socket (no port race); yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def npz_body(images: np.ndarray, prompts: list[str]) -> bytes:
    return encode_npz(images=images, prompts=np.asarray(prompts, dtype=str))


def brightness_images(values: list[int], size: int = 4) -> np.ndarray:
    return np.stack([np.full((size, size, 3), v, np.uint8) for v in values])


# ------------------------------------------------------------------------------ the CLI server, for real

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m reward_servers.serve --model brightness` with a token, max batch 4, max body 20 kB."""
    args = ["--model", "brightness", "--token", TOKEN, "--max-batch", "4", "--max-bytes", "20000"]
    with reward_server_process(args, tmp_path_factory.mktemp("cli-server") / "server.log") as (url, _proc):
        yield url


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(url: str, body: bytes, ctype: str = NPZ, auth: dict[str, str] | None = AUTH, path: str = "/score") -> Any:
    return httpx.post(url + path, content=body, headers={"Content-Type": ctype, **(auth or {})}, timeout=10)


def assert_still_serving(url: str) -> None:
    r = post(url, npz_body(brightness_images([0, 255]), ["a", "b"]))
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == [0.0, 1.0]


def test_cli_server_scores_and_reports_info(cli_server: str) -> None:
    assert httpx.get(cli_server + "/health", timeout=5).json() == {"status": "ok"}
    info = httpx.get(cli_server + "/info", headers=AUTH, timeout=5).json()
    assert info["model"] == "brightness" and info["differentiable"] is True
    assert info["max_batch"] == 4 and info["max_bytes"] == 20000 and info["version"]
    r = post(cli_server, npz_body(brightness_images([51, 255, 0]), ["a", "b", "c"]))
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["scores"], [0.2, 1.0, 0.0], rtol=1e-6)


def _pickled_npz() -> bytes:
    return encode_npz(images=np.array([{"x": 1}], dtype=object), prompts=np.asarray(["a"]))


def _json_png(images: np.ndarray, prompts: list[str]) -> bytes:
    return json.dumps({"prompts": prompts, "images_png": [encode_png_b64(i) for i in images]}).encode()


BAD_REQUESTS: dict[str, tuple[int, dict[str, Any]]] = {
    "no token": (401, {"auth": None}),
    "wrong token": (401, {"auth": {"Authorization": "Bearer nope"}}),
    "oversized body": (413, {"body": npz_body(np.zeros((4, 48, 48, 3), np.uint8), list("abcd"))}),
    "batch over max_batch": (413, {"body": npz_body(brightness_images([1] * 5), list("abcde"))}),
    "float images to /score": (422, {"body": npz_body(np.zeros((2, 4, 4, 3), np.float32), ["a", "b"])}),
    "int16 images": (422, {"body": npz_body(np.zeros((2, 4, 4, 3), np.int16), ["a", "b"])}),
    "no channel axis": (422, {"body": npz_body(np.zeros((2, 4, 4), np.uint8), ["a", "b"])}),
    "prompt count": (422, {"body": npz_body(brightness_images([1, 2]), ["a"])}),
    "pickled object array": (422, {"body": _pickled_npz()}),
    "uint8 to /score_and_grad": (422, {"body": npz_body(brightness_images([1]), ["a"]), "path": "/score_and_grad"}),
    "not an npz": (400, {"body": b"\x00garbage\xff" * 10}),
    "npz missing prompts": (400, {"body": encode_npz(images=brightness_images([1]))}),
    "malformed JSON": (400, {"body": b'{"prompts": [', "ctype": "application/json"}),
    "JSON without images": (400, {"body": b'{"prompts": ["a"]}', "ctype": "application/json"}),
    "bad base64 PNG": (400, {"body": b'{"prompts": ["a"], "images_png": ["@@@"]}', "ctype": "application/json"}),
    "unknown content type": (415, {"body": b"hello", "ctype": "text/plain"}),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_server_keeps_serving(cli_server: str, case: str) -> None:
    status, kw = BAD_REQUESTS[case]
    body = kw.get("body", npz_body(brightness_images([0, 255]), ["a", "b"]))
    r = post(cli_server, body, ctype=kw.get("ctype", NPZ), auth=kw.get("auth", AUTH), path=kw.get("path", "/score"))
    assert r.status_code == status, r.text
    assert r.json()["detail"]
    assert_still_serving(cli_server)


def test_declared_oversized_body_is_refused_before_reading(cli_server: str) -> None:
    # Content-Length alone over the limit: 413 without the server waiting for (or buffering) the body
    with socket.create_connection(("127.0.0.1", int(cli_server.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(
            f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {NPZ}\r\nContent-Length: 999999999\r\n\r\n".encode()
        )
        assert s.recv(100).startswith(b"HTTP/1.1 413")
    assert_still_serving(cli_server)


def test_json_png_matches_npz(cli_server: str) -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    via_json = post(cli_server, _json_png(imgs, ["a", "b", "c"]), ctype="application/json").json()["scores"]
    via_npz = post(cli_server, npz_body(imgs, ["a", "b", "c"])).json()["scores"]
    assert via_json == via_npz


def test_score_and_grad_over_http(cli_server: str) -> None:
    x = np.random.default_rng(0).random((2, 4, 4, 3), dtype=np.float32)
    r = post(cli_server, npz_body(x, ["a", "b"]), path="/score_and_grad")
    assert r.status_code == 200 and r.headers["content-type"] == NPZ
    out = decode_npz(r.content, ("scores", "grads"), max_bytes=10**6)
    np.testing.assert_allclose(out["scores"], x.reshape(2, -1).mean(1), rtol=1e-6)
    np.testing.assert_allclose(out["grads"], np.full_like(x, 1 / 48))


def test_client_against_cli_server_splits_big_batches_in_order(cli_server: str) -> None:
    values = list(np.random.default_rng(0).permutation(256)[:10])
    with HTTPReward(cli_server, token=TOKEN, timeout_s=10) as client:
        assert client.name == "brightness" and client.differentiable and client.max_batch == 4
        np.testing.assert_allclose(
            client.score(brightness_images(values), [str(v) for v in values]), np.array(values) / 255, rtol=1e-6
        )
        x = np.random.default_rng(1).random((6, 4, 4, 3), dtype=np.float32)
        s, g = client.score_and_grad(x, list("abcdef"))
        np.testing.assert_allclose(s, x.reshape(6, -1).mean(1), rtol=1e-6)
        assert g.shape == x.shape
    with pytest.raises(RewardServerError, match="401"):
        HTTPReward(cli_server, token="wrong", retries=0)


# ----------------------------------------------------------------- batching of concurrent requests (in-process)


class SlowRecorder:
    """Brightness that takes 0.2 s per call and records every batch it is given."""

    name, differentiable = "slow", False

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        self.batches.append([int(p) for p in prompts])
        time.sleep(0.2)
        return images[:, 0, 0, 0].astype(np.float32)


def test_concurrent_requests_are_batched_and_each_keeps_its_order() -> None:
    model = SlowRecorder()
    with serve_in_thread(make_app(model, max_batch=16, batch_wait_s=0.05)) as url:
        requests = [[10 * i + k for k in range(2)] for i in range(8)]  # 8 requests of 2 images, unique values
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda vals: post(url, npz_body(
                brightness_images(vals), [str(v) for v in vals]), auth=None), requests))  # fmt: skip
        for vals, r in zip(requests, answers, strict=True):
            assert r.status_code == 200 and r.json()["scores"] == [float(v) for v in vals]
        sizes = [len(b) for b in model.batches]
        assert sum(sizes) == 16 and len(sizes) < 8, sizes  # merged: fewer model calls than requests
        assert max(sizes) > 2 and max(sizes) <= 16
        for batch in model.batches:  # each request's images stay together and in order inside a batch
            for vals in requests:
                if vals[0] in batch:
                    start = batch.index(vals[0])
                    assert batch[start : start + 2] == vals, (batch, vals)
                else:
                    assert vals[1] not in batch
        stats = httpx.get(url + "/stats", timeout=5).json()
        assert stats["requests"] == 8 and stats["images"] == 16 and stats["batches"] == len(sizes)


def test_requests_of_different_sizes_are_not_merged_but_all_answered() -> None:
    model = SlowRecorder()
    with serve_in_thread(make_app(model, max_batch=8, batch_wait_s=0.05)) as url:
        jobs = [([1, 2], 4), ([3], 6), ([4, 5], 4), ([6], 6)]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda j: post(url, npz_body(
                brightness_images(j[0], j[1]), [str(v) for v in j[0]]), auth=None), jobs))  # fmt: skip
        for (vals, _), r in zip(jobs, answers, strict=True):
            assert r.json()["scores"] == [float(v) for v in vals]
        for batch in model.batches:  # never a mix of 4x4 and 6x6 images in one call
            assert set(batch) <= {1, 2, 4, 5} or set(batch) <= {3, 6}


def test_model_errors_become_422_or_500_and_server_survives() -> None:
    class Picky(Brightness):
        def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
            if prompts[0] == "refuse":
                raise ValueError("too small")
            if prompts[0] == "crash":
                raise RuntimeError("boom")
            if prompts[0] == "nan":
                return np.full(len(images), np.nan, np.float32)
            if prompts[0] == "short":
                return np.zeros(len(images) - 1, np.float32)
            return super().score(images, prompts)

    with serve_in_thread(make_app(Picky())) as url:
        assert post(url, npz_body(brightness_images([1]), ["refuse"]), auth=None).status_code == 422
        r = post(url, npz_body(brightness_images([1]), ["crash"]), auth=None)
        assert r.status_code == 500 and "boom" in r.json()["detail"]
        r = post(url, npz_body(brightness_images([1]), ["nan"]), auth=None)
        assert r.status_code == 500 and "non-finite" in r.json()["detail"]
        r = post(url, npz_body(brightness_images([1, 2]), ["short", "x"]), auth=None)
        assert r.status_code == 500 and "for 2 images" in r.json()["detail"]
        assert post(url, npz_body(brightness_images([255]), ["ok"]), auth=None).json()["scores"] == [1.0]


def test_non_differentiable_model_refuses_score_and_grad() -> None:
    with serve_in_thread(make_app(JpegCompressibility())) as url:
        x = np.zeros((1, 4, 4, 3), np.float32)
        assert post(url, npz_body(x, ["a"]), auth=None, path="/score_and_grad").status_code == 400
        client = make_reward("http", url=url)
        assert client.name == "jpeg" and not client.differentiable
        with pytest.raises(TypeError, match="not differentiable"):
            client.score_and_grad(x, ["a"])  # type: ignore[attr-defined]
        assert client.score(brightness_images([7]), ["a"]).shape == (1,)


# -------------------------------------------------------------------------- client retries, errors, timeouts


class Fake(http.server.ThreadingHTTPServer):
    """A scripted HTTP server: each path answers from its own list of (status, body, delay_s); the last repeats."""

    daemon_threads = True

    def __init__(self, script: dict[str, list[tuple[int, bytes, float]]]) -> None:
        self.script, self.hits = script, {p: 0 for p in script}

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _answer(self) -> None:
                server: Fake = self.server  # type: ignore[assignment]
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                steps = server.script[self.path]
                status, body, delay = steps[min(server.hits[self.path], len(steps) - 1)]
                server.hits[self.path] += 1
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

            do_GET = do_POST = _answer

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


INFO = json.dumps({"model": "fake", "differentiable": True, "max_batch": 8, "max_bytes": 10**6}).encode()


@contextlib.contextmanager
def fake(script: dict[str, list[tuple[int, bytes, float]]]) -> Iterator[Fake]:
    server = Fake(script)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_client_retries_with_backoff_then_succeeds() -> None:
    scores = json.dumps({"scores": [0.5, 0.25]}).encode()
    with fake({"/info": [(503, b"busy", 0), (502, b"", 0), (200, INFO, 0)], "/score": [(200, scores, 0)]}) as srv:
        t0 = time.monotonic()
        client = HTTPReward(srv.url, retries=3, backoff_s=0.05)
        assert time.monotonic() - t0 >= 0.05 + 0.1  # slept backoff_s, then 2 * backoff_s
        assert srv.hits["/info"] == 3
        np.testing.assert_array_equal(client.score(brightness_images([1, 2]), ["a", "b"]), [0.5, 0.25])


def test_client_gives_up_after_bounded_retries() -> None:
    with fake({"/info": [(503, b"busy", 0)]}) as srv, pytest.raises(RewardServerUnreachable, match="3 attempts"):
        HTTPReward(srv.url, retries=2, backoff_s=0.01)
    assert srv.hits["/info"] == 3


def test_client_unreachable_names_url_and_never_hangs() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RewardServerUnreachable) as err:
        HTTPReward(url, retries=2, backoff_s=0.01, timeout_s=2)
    assert url in str(err.value) and "reward_servers.serve" in str(err.value)
    assert time.monotonic() - t0 < 10


def test_client_times_out_on_a_stalled_server() -> None:
    with fake({"/info": [(200, INFO, 0)], "/score": [(200, b"{}", 3.0)]}) as srv:
        client = HTTPReward(srv.url, retries=1, backoff_s=0.01, timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(RewardServerUnreachable, match="Timeout"):
            client.score(brightness_images([1]), ["a"])
        assert time.monotonic() - t0 < 2.5
        assert srv.hits["/score"] == 2


@pytest.mark.parametrize(
    ("path", "body", "match"),
    [
        ("/score", b"<html>not json</html>", "garbage"),
        ("/score", json.dumps({"scores": [1.0]}).encode(), r"\(1,\) scores for 2 images"),
        ("/score", json.dumps({"scores": ["a", "b"]}).encode(), "garbage"),
        ("/score", json.dumps({"result": [1, 2]}).encode(), "garbage"),
        ("/score_and_grad", b"PK\x03\x04 not really", "garbage"),
        ("/score_and_grad", encode_npz(scores=np.zeros(2, np.float32), grads=np.zeros((2, 1), np.float32)), "grads"),
        ("/score_and_grad", encode_npz(scores=np.zeros(2), grads=np.zeros((2, 4, 4, 3), np.float32)), "float64"),
    ],
)
def test_client_rejects_garbage_answers(path: str, body: bytes, match: str) -> None:
    with fake({"/info": [(200, INFO, 0)], path: [(200, body, 0)]}) as srv:
        client = HTTPReward(srv.url, retries=0)
        with pytest.raises(RewardServerError, match=match):
            if path == "/score":
                client.score(brightness_images([1, 2]), ["a", "b"])
            else:
                client.score_and_grad(np.zeros((2, 4, 4, 3), np.float32), ["a", "b"])


def test_client_does_not_retry_client_errors() -> None:
    with fake({"/info": [(200, INFO, 0)], "/score": [(422, b'{"detail": "bad dtype"}', 0)]}) as srv:
        client = HTTPReward(srv.url, retries=3, backoff_s=0.01)
        with pytest.raises(RewardServerError, match="422: bad dtype"):
            client.score(brightness_images([1]), ["a"])
        assert srv.hits["/score"] == 1


def test_client_rejects_non_reward_server_info() -> None:
    with fake({"/info": [(200, b'{"hello": 1}', 0)]}) as srv, pytest.raises(RewardServerError, match="/info"):
        HTTPReward(srv.url, retries=0)


def test_png_helper_roundtrip() -> None:
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(encode_png_b64(img)))))
    np.testing.assert_array_equal(back, img)
