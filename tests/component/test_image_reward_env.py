"""ImageReward in its own venv, served over HTTP and scored from the main env (random weights, one small batch).

The venv is `RLALIGN_IMAGE_REWARD_VENV` if set, else `<repo>/.venv-imagereward`, made by
`bash scripts/setup_image_reward_env.sh` (CI runs it). A missing venv FAILS these tests with that command:
skipping would hide that the ImageReward path is untested. Cost: ~15 s to build the random model (ViT-L + 2 BERT
layers), ~4 s per image forward on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from reward_servers.client import HTTPReward

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("RLALIGN_IMAGE_REWARD_VENV") or ROOT / ".venv-imagereward")
PYTHON = VENV / "bin" / "python"


def _require_venv() -> None:
    if not PYTHON.is_file():
        pytest.fail(
            f"ImageReward venv not found at {VENV}: create it with `bash scripts/setup_image_reward_env.sh` "
            "(or point RLALIGN_IMAGE_REWARD_VENV at an existing one)",
            pytrace=False,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(*args: str) -> list[str]:
    return [str(PYTHON), "-m", "reward_servers.serve", "--model", "image_reward", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def image_reward_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    _require_venv()
    port = _free_port()
    workdir = tmp_path_factory.mktemp("image_reward")  # the random build writes med_config.json + vocab.txt here
    log = (workdir / "server.log").open("w")
    cmd = _serve("--tiny", "--path", str(workdir), "--option", "text_layers=2", "--port", str(port), "--max-batch", "2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ImageReward server exited {proc.returncode}:\n{(workdir / 'server.log').read_text()}")
            assert time.monotonic() < deadline, "ImageReward server did not come up in 240 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_image_reward_scores_a_batch_over_http(image_reward_url: str) -> None:
    client = HTTPReward(image_reward_url, timeout_s=120, retries=1)
    assert client.name == "image_reward" and client.differentiable
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    scores = client.score(images, ["a photo of a cat", "a dog"])
    assert scores.shape == (2,) and scores.dtype == np.float32 and np.isfinite(scores).all()
    assert scores[0] != scores[1]
    s, g = client.score_and_grad(images[:1].astype(np.float32) / 255.0, ["a photo of a cat"])
    np.testing.assert_allclose(s, scores[:1], rtol=1e-3, atol=1e-4)  # same image, same prompt
    assert g.shape == (1, 64, 64, 3) and np.isfinite(g).all() and np.abs(g).sum() > 0


def test_image_reward_missing_weights_names_the_file(tmp_path: Path) -> None:
    _require_venv()
    out = subprocess.run(_serve("--path", str(tmp_path), "--port", str(_free_port())), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0
    assert "ImageReward.pt" in out.stderr and str(tmp_path) in out.stderr, out.stderr[-2000:]
