"""The reward HTTP server under a bounded fuzz: thousands of malformed and valid requests, concurrent, on loopback.

`python -m reward_servers.serve --model brightness` runs as a subprocess (so its memory is its own) with a token,
max batch 8 and max body 200 kB. A seeded generator mixes valid requests (npz and JSON-PNG /score, npz
/score_and_grad, /health /info /stats), whose answers are checked exactly against the brightness formula, with
malformed ones, each with the statuses it may get: garbage and truncated or bit-flipped archives, wrong members,
dtypes, shapes and prompt counts, pickled object arrays, headers that declare more data than they hold (a billion
`<U0` prompts, shapes that overflow int64), zip bombs, zero-pixel images, NaN floats, oversized bodies and batches,
JSON that is not a batch, not PNG or a PNG declaring a huge canvas, bad tokens, wrong content types, paths and
methods, and raw-socket HTTP garbage (bad request lines and lengths, bodies cut off, clients that leave early).

Bounded: REQUESTS requests after WARMUP, 16 threads, 10 s per request, the whole test under a minute on 2 cores.
After the run the server is alive and serving, and its RSS grew by less than RSS_GROWTH_MIB over the fuzz
(measured from /proc/<pid>/status after the warm-up, so imports and allocator pools are already paid for).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import subprocess
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import reward_server_process
from PIL import Image

from reward_servers.codec import NPZ, decode_npz, encode_npz, encode_png_b64

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BATCH, MAX_BYTES = 8, 200_000
WARMUP, REQUESTS, THREADS = 500, 5000, 16
RSS_GROWTH_MIB = 16.0  # over REQUESTS: catches anything that keeps >= ~3 kB per request (measured growth ~1 MiB)
DEADLINE_S = 90.0  # hard stop for the fuzz phase (measured ~13 s for 5000 requests on the 2-core dev machine)


# --------------------------------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    args = ["--model", "brightness", "--token", TOKEN, "--max-batch", str(MAX_BATCH), "--max-bytes", str(MAX_BYTES)]
    with reward_server_process(args, tmp_path_factory.mktemp("fuzz") / "server.log") as running:
        yield running


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# ------------------------------------------------------------------------------------------------- requests


@dataclass
class Case:
    """One request and what a correct server answers: a status in `ok`, and `check(response)` for 200s."""

    kind: str
    method: str = "POST"
    path: str = "/score"
    body: bytes = b""
    headers: dict[str, str | bytes] | None = None  # over the defaults: npz content type and the bearer token
    auth: bool = True  # False: no default token (the case's headers may bring a wrong one)
    ok: tuple[int, ...] = (200,)
    check: Callable[[httpx.Response], None] | None = None
    raw: bytes | None = None  # sent as-is over a socket instead (HTTP-level garbage)


def npy(shape: tuple[int, ...], descr: str, data: bytes = b"") -> bytes:
    """A .npy member with any header we like (it may lie about the data that follows)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def npz_of(members: dict[str, bytes], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name + ".npy", data)
    return buf.getvalue()


def batch(images: np.ndarray, prompts: list[str] | np.ndarray) -> bytes:
    return encode_npz(images=images, prompts=np.asarray(prompts))


def png_b64(image: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def expect_scores(want: np.ndarray) -> Callable[[httpx.Response], None]:
    def check(r: httpx.Response) -> None:
        assert r.json()["scores"] == [float(x) for x in want], (r.json(), want)

    return check


def brightness(images: np.ndarray) -> np.ndarray:
    """What the server's Brightness model answers, computed the same way (float64 mean, float32 result)."""
    return (images.reshape(len(images), -1).mean(axis=1, dtype=np.float64) / 255.0).astype(np.float32)


class Generator:
    """Seeded request factory: `valid()` and `malformed()` draw one case of a random kind."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def images(self, b: int | None = None, dtype: type = np.uint8) -> np.ndarray:
        rng = self.rng
        b = b if b is not None else int(rng.integers(1, MAX_BATCH + 1))
        h, w = (int(x) for x in rng.integers(1, 13, 2))
        if dtype is np.uint8:
            return rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
        return rng.random((b, h, w, 3), dtype=np.float32)

    def prompts(self, n: int) -> list[str]:
        pool = ["a cat", "", "ü ñ 数字 🙂", "x" * 200, "line\nbreak", "null\x00byte"]
        return [pool[int(i)] for i in self.rng.integers(0, len(pool), n)]

    def valid(self) -> Case:
        kind = int(self.rng.integers(0, 10))
        if kind < 5:
            x = self.images()
            return Case("npz /score", body=batch(x, self.prompts(len(x))), check=expect_scores(brightness(x)))
        if kind < 7:
            x = self.images()
            body = json.dumps({"prompts": self.prompts(len(x)), "images_png": [encode_png_b64(i) for i in x]})
            return Case("json /score", body=body.encode(), headers={"Content-Type": "application/json"},
                        check=expect_scores(brightness(x)))  # fmt: skip
        if kind < 9:
            x = self.images(dtype=np.float32)

            def check(r: httpx.Response, x: np.ndarray = x) -> None:
                out = decode_npz(r.content, ("scores", "grads"), max_bytes=10**7)
                want = x.reshape(len(x), -1).mean(axis=1, dtype=np.float64).astype(np.float32)
                np.testing.assert_array_equal(out["scores"], want)
                np.testing.assert_array_equal(out["grads"], np.full_like(x, 1.0 / x[0].size))

            return Case("npz /score_and_grad", path="/score_and_grad", body=batch(x, self.prompts(len(x))), check=check)
        path = ["/health", "/info", "/stats"][int(self.rng.integers(0, 3))]
        return Case(f"GET {path}", method="GET", path=path, check=lambda r: r.json())

    def malformed(self) -> Case:  # one branch per kind of bad input, on purpose
        rng = self.rng
        kind = int(rng.integers(0, 34))
        x = self.images()
        good = batch(x, self.prompts(len(x)))
        one = npy((1,), "<U1", b"a\x00\x00\x00")
        img = npy((1, 4, 4, 3), "|u1", bytes(48))
        if kind == 0:
            return Case("random bytes", body=rng.bytes(int(rng.integers(0, 2000))), ok=(400,))
        if kind == 1:
            return Case("truncated npz", body=good[: int(rng.integers(0, len(good) - 1))], ok=(400,))
        if kind == 2:
            flipped = bytearray(good)
            for i in rng.integers(0, len(flipped), int(rng.integers(1, 4))):
                flipped[int(i)] ^= 1 << int(rng.integers(0, 8))
            # a flip in pixel data may still decode (zip CRCs usually catch it): then any finite answer will do
            return Case("bit-flipped npz", body=bytes(flipped), ok=(200, 400, 413, 422), check=finite_scores)
        if kind == 3:
            return Case("npz missing prompts", body=encode_npz(images=x), ok=(400,))
        if kind == 4:
            return Case("npz extra member", body=encode_npz(images=x, prompts=np.asarray(self.prompts(len(x))),
                                                            extra=np.zeros(3)), ok=(400,))  # fmt: skip
        if kind == 5:
            obj = np.array([{"x": 1}] * len(x), dtype=object)
            return Case("pickled object prompts", body=encode_npz(images=x, prompts=obj), ok=(422,))
        if kind == 6:
            return Case("int16 images", body=batch(x.astype(np.int16), self.prompts(len(x))), ok=(422,))
        if kind == 7:
            return Case("float images to /score", body=batch(x.astype(np.float32), self.prompts(len(x))), ok=(422,))
        if kind == 8:
            return Case("no channel axis", body=batch(x[..., 0], self.prompts(len(x))), ok=(422,))
        if kind == 9:
            return Case("5 channels", body=batch(np.concatenate([x, x[..., :2]], -1), self.prompts(len(x))), ok=(422,))
        if kind == 10:
            return Case("prompt count", body=batch(x, self.prompts(len(x) + 1)), ok=(422,))
        if kind == 11:
            return Case("int prompts", body=encode_npz(images=x, prompts=np.arange(len(x))), ok=(422,))
        if kind == 12:
            return Case("2-D prompts", body=batch(x, np.asarray([self.prompts(len(x))] * 2)), ok=(422,))
        if kind == 13:  # a 100-byte header declaring 10**9 empty prompts: a server that believed it would hang
            return Case("billion <U0 prompts", body=npz_of({"images": img, "prompts": npy((10**9,), "<U0")}), ok=(400,))
        if kind == 14:  # 2**32 x 2**32 x ... wraps to 0 in int64 arithmetic
            lie = npy((2**32, 2**32, 1, 3), "|u1", bytes(48))
            return Case("int64-overflow shape", body=npz_of({"images": lie, "prompts": one}), ok=(400,))
        if kind == 15:
            lie = npy((8, 512, 512, 3), "|u1", bytes(48))
            return Case("header lies about size", body=npz_of({"images": lie, "prompts": one}), ok=(400,))
        if kind == 16:  # 1 MB of zeros deflates to ~1 kB: the unpacked size is refused before reading
            bomb = npy((1, 1024, 342, 3), "|u1", bytes(1024 * 342 * 3))
            return Case("zip bomb", body=npz_of({"images": bomb, "prompts": one}, compress=True), ok=(413,))
        if kind == 17:
            zero = npy((1, 0, 0, 3), "|u1")
            return Case("0x0 image", body=npz_of({"images": zero, "prompts": one}), ok=(422,))
        if kind == 18:
            empty = batch(np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0, dtype="<U1"))
            return Case("empty batch", body=empty, ok=(422,))
        if kind == 19:
            big = self.images(b=MAX_BATCH + int(rng.integers(1, 5)))
            return Case("batch over max_batch", body=batch(big, self.prompts(len(big))), ok=(413,))
        if kind == 20:
            huge = np.zeros((4, 160, 160, 3), np.uint8)  # 307 kB > max_bytes
            return Case("body over max_bytes", body=batch(huge, self.prompts(4)), ok=(413,))
        if kind == 21:
            f = self.images(dtype=np.float32)
            f[0, 0, 0, int(rng.integers(0, 3))] = [np.nan, np.inf, -np.inf][int(rng.integers(0, 3))]
            return Case("NaN float images", path="/score_and_grad", body=batch(f, self.prompts(len(f))), ok=(422,))
        if kind == 22:
            return Case("uint8 to /score_and_grad", path="/score_and_grad", body=good, ok=(422,))
        json_ct = {"Content-Type": "application/json"}
        if kind == 23:
            text = json.dumps({"prompts": ["a"], "images_png": [encode_png_b64(x[0])]})
            return Case("malformed JSON", body=text[: int(rng.integers(0, len(text) - 1))].encode(), headers=json_ct,
                        ok=(400,))  # fmt: skip
        if kind == 24:
            shape = [[1, 2], "str", None, {"prompts": "a", "images_png": "b"}, {"prompts": []}][int(rng.integers(0, 5))]
            return Case("JSON not a batch", body=json.dumps(shape).encode(), headers=json_ct, ok=(400,))
        if kind == 25:
            body = json.dumps({"prompts": [1], "images_png": [encode_png_b64(x[0])]}).encode()
            return Case("JSON non-string prompt", body=body, headers=json_ct, ok=(422,))
        if kind == 26:
            bad = ["@@@", 17, None, "aGVsbG8=", base64.b64encode(rng.bytes(50)).decode()][int(rng.integers(0, 5))]
            body = json.dumps({"prompts": ["a"], "images_png": [bad]}).encode()
            return Case("JSON bad base64/PNG", body=body, headers=json_ct, ok=(400,))
        if kind == 27:
            fmt = ["BMP", "GIF", "TIFF", "JPEG"][int(rng.integers(0, 4))]
            body = json.dumps({"prompts": ["a"], "images_png": [png_b64(x[0], fmt)]}).encode()
            return Case("JSON not PNG", body=body, headers=json_ct, ok=(400,))
        if kind == 28:  # a few kB of PNG declaring a 1000 x 1000 canvas (over max_pixels = max_bytes / 3)
            canvas = png_b64(np.zeros((1000, 1000, 3), np.uint8))
            n = int(rng.integers(1, 4))
            body = json.dumps({"prompts": ["a"] * n, "images_png": [canvas] * n}).encode()
            return Case("JSON huge PNG canvas", body=body, headers=json_ct, ok=(413,))
        if kind == 29:  # more images than max_batch: refused before any is decoded
            tiny = encode_png_b64(x[0])
            n = MAX_BATCH + int(rng.integers(1, 100))
            body = json.dumps({"prompts": ["a"] * n, "images_png": [tiny] * n}).encode()
            return Case("JSON too many images", body=body, headers=json_ct, ok=(413,))
        if kind == 30:
            a, b = np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)
            body = json.dumps({"prompts": ["a", "b"], "images_png": [encode_png_b64(a), encode_png_b64(b)]}).encode()
            return Case("JSON mixed sizes", body=body, headers=json_ct, ok=(422,))
        if kind == 31:
            headers = [{"Content-Type": "text/plain"}, {"Content-Type": ""}, {"Content-Type": "application/x-npz"}]
            pick = int(rng.integers(0, 3))
            path = "/score_and_grad" if pick == 2 else "/score"
            body = json.dumps({"prompts": [], "images_png": []}).encode() if pick == 2 else good
            headers_pick = {"Content-Type": "application/json"} if pick == 2 else headers[pick]
            return Case("content type", path=path, body=body, headers=headers_pick, ok=(415,))
        if kind == 32:
            auth = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"bearer {TOKEN}"},
                    {"Authorization": ("Bearer " + "ü" * 50).encode("latin-1")}][int(rng.integers(0, 4))]  # fmt: skip
            path = ["/score", "/info", "/stats", "/score_and_grad"][int(rng.integers(0, 4))]
            return Case("auth", method="GET" if path in ("/info", "/stats") else "POST", path=path, body=good,
                        headers=auth, auth=False, ok=(401,))  # fmt: skip
        return self.raw()

    def raw(self) -> Case:
        """HTTP-level garbage over a socket: the server may answer 4xx or close; it must neither crash nor hang."""
        rng = self.rng
        good = batch(np.zeros((1, 2, 2, 3), np.uint8), ["a"])
        head = f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: {NPZ}\r\n"
        options = [
            rng.bytes(int(rng.integers(1, 300))),  # not HTTP at all
            b"GET /health HTTP/9.9\r\n\r\n",
            b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            (head + "Content-Length: 5000\r\n\r\n").encode() + good[:100],  # body cut off, then the client leaves
            (head + f"Content-Length: {len(good)}\r\n\r\n").encode() + good,  # valid, but nobody reads the answer
            (head + "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n").encode(),  # bad chunk size
            b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Fill: " + b"a" * 70_000 + b"\r\n\r\n",  # header flood
            b"\r\n\r\n\r\n",
        ]
        return Case("raw socket", raw=options[int(rng.integers(0, len(options)))], ok=())


def finite_scores(r: httpx.Response) -> None:
    scores = r.json()["scores"]
    assert scores and all(isinstance(s, float) and np.isfinite(s) for s in scores)


# ------------------------------------------------------------------------------------------------------ run


def send(client: httpx.Client, url: str, case: Case) -> tuple[Case, int, str]:
    """Send one case; returns (case, status or -1 for raw sockets, problem description or "")."""
    if case.raw is not None:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s, contextlib.suppress(OSError):
            s.sendall(case.raw)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            while s.recv(65536):
                pass
        return case, -1, ""
    headers = {"Content-Type": NPZ, **(AUTH if case.auth else {}), **(case.headers or {})}
    try:
        r = client.request(case.method, url + case.path, content=case.body or None, headers=headers, timeout=10)
    except httpx.HTTPError as err:
        return case, 0, f"{case.kind}: no answer ({type(err).__name__}: {err})"
    if r.status_code not in case.ok:
        return case, r.status_code, f"{case.kind}: got {r.status_code}, expected {case.ok}: {r.text[:200]}"
    if r.status_code == 200 and case.check is not None:
        try:
            case.check(r)
        except Exception as err:  # a wrong answer to a valid request is the worst failure here
            return case, r.status_code, f"{case.kind}: wrong answer: {err}"
    elif r.status_code != 200:
        detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else None
        if not detail:
            return case, r.status_code, f"{case.kind}: {r.status_code} without a detail message"
    return case, r.status_code, ""


def run_mix(url: str, cases: list[Case]) -> tuple[Counter[str], list[str]]:
    statuses: Counter[str] = Counter()
    problems: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + DEADLINE_S
    limits = httpx.Limits(max_connections=THREADS, max_keepalive_connections=THREADS)
    with httpx.Client(limits=limits) as client, ThreadPoolExecutor(THREADS) as pool:

        def one(case: Case) -> None:
            if time.monotonic() > deadline:
                with lock:
                    statuses["skipped (deadline)"] += 1
                return
            case, status, problem = send(client, url, case)
            with lock:
                statuses[f"{'valid' if case.ok == (200,) else 'malformed'} {status}"] += 1
                if problem:
                    problems.append(problem)

        list(pool.map(one, cases))
    return statuses, problems


def mix(gen: Generator, n: int) -> list[Case]:
    """About one valid request in three; the rest malformed (a few percent of them raw-socket garbage)."""
    return [gen.valid() if gen.rng.random() < 0.35 else gen.malformed() for _ in range(n)]


def test_fuzz_leaves_server_alive_memory_flat_and_valid_answers_correct(
    server: tuple[str, subprocess.Popen[str]],
) -> None:
    url, proc = server
    gen = Generator(seed=12)
    _, problems = run_mix(url, mix(gen, WARMUP))  # imports, allocator pools, keep-alive connections
    assert not problems, problems[:10]
    rss_before = rss_mib(proc.pid)
    cases = mix(gen, REQUESTS)
    t0 = time.monotonic()
    statuses, problems = run_mix(url, cases)
    seconds = time.monotonic() - t0
    rss_after = rss_mib(proc.pid)
    valid = sum(v for k, v in statuses.items() if k.startswith("valid"))
    kinds = Counter(c.kind for c in cases)
    print(f"\nfuzz: {len(cases)} requests in {seconds:.1f} s ({valid} valid) with {THREADS} threads; "
          f"server RSS {rss_before:.1f} -> {rss_after:.1f} MiB\nstatuses: {dict(sorted(statuses.items()))}\n"
          f"kinds: {dict(sorted(kinds.items()))}")  # fmt: skip
    assert not problems, f"{len(problems)} bad answers, e.g. {problems[:10]}"
    assert statuses.get("skipped (deadline)", 0) == 0, f"did not finish within {DEADLINE_S} s"
    assert proc.poll() is None, "server process died"
    assert rss_after - rss_before < RSS_GROWTH_MIB, f"RSS grew {rss_before:.1f} -> {rss_after:.1f} MiB"
    assert len(kinds) >= 40, kinds  # every kind of case was drawn
    # still serving, and still right
    x = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    r = httpx.post(url + "/score", content=batch(x, ["a", "b"]), headers={"Content-Type": NPZ, **AUTH}, timeout=10)
    assert r.status_code == 200 and r.json()["scores"] == [float(s) for s in brightness(x)]
    stats = httpx.get(url + "/stats", headers=AUTH, timeout=10).json()
    scoring = sum(1 for c in cases if c.ok == (200,) and c.method == "POST")
    assert stats["requests"] >= scoring  # every valid scoring request reached the model
