"""Shared fixtures: tiny seeded U-Net (~50k params, 8x8 latents), SD-like DDIM scheduler, fresh-LoRA denoiser,
and a synthetic `ScoredRollouts` builder. Nothing downloads (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rlalign.types import Rollout, ScoredRollouts, StepPairs

# Tiny models gain nothing from intra-op threads, and on 2 shared cores two threads fighting another busy
# process made the unit suite ~15x slower (measured); one thread keeps tests in milliseconds.
torch.set_num_threads(1)

SD_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def make_scheduler(steps: int = 10, **overrides: Any) -> Any:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**{**SD_SCHEDULE, **overrides})
    sched.set_timesteps(steps)
    return sched


def make_unet() -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def make_model(steps: int = 10, rank: int = 4, layer: str = "mid") -> Any:
    from rlalign.config import LoraCfg
    from rlalign.models.denoiser import UNetDenoiser
    from rlalign.models.loading import attach_lora

    unet = make_unet()
    attach_lora(unet, LoraCfg(rank=rank, alpha=float(rank), target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return UNetDenoiser(unet, make_scheduler(steps), layer=layer)


@pytest.fixture
def tiny_unet() -> Any:
    return make_unet()


@pytest.fixture
def tiny_scheduler() -> Any:
    return make_scheduler(10)


@pytest.fixture
def tiny_model() -> Any:
    """UNetDenoiser with a fresh LoRA (lora_B = 0: policy == reference bit-for-bit)."""
    return make_model()


def randomize_lora(model: Any, scale: float = 0.3, seed: int = 1) -> None:
    """Give every LoRA B a random value so the policy differs from the reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def make_scored(
    groups: int = 3,
    per_group: int = 4,
    steps: int = 10,
    *,
    seed: int = 0,
    with_step_pairs: bool = False,
    latent: tuple[int, int, int] = (4, 8, 8),
    text: tuple[int, int] = (3, 8),
) -> ScoredRollouts:
    """Synthetic scored rollouts with distinct scores per row (no ties), SD-like timesteps 10 steps."""
    g = torch.Generator().manual_seed(seed)
    b = groups * per_group
    sched = make_scheduler(steps)
    timesteps = sched.timesteps.clone().long()
    latents = torch.randn((b, steps + 1, *latent), generator=g)
    step_pairs = None
    if with_step_pairs:
        step_pairs = StepPairs(
            x_t=latents[:, :-1].clone(),
            x_w=latents[:, 1:].clone(),
            x_l=torch.randn((b, steps, *latent), generator=g),
            timesteps=timesteps,
            valid=torch.ones(b, steps, dtype=torch.bool),
            reward_w=torch.ones(b, steps),
            reward_l=torch.zeros(b, steps),
        )
    embeds = torch.randn((groups, *text), generator=g).repeat_interleave(per_group, 0)
    rollout = Rollout(
        prompts=[f"prompt {i // per_group}" for i in range(b)],
        group_ids=torch.arange(groups).repeat_interleave(per_group),
        seeds=torch.arange(b),
        images=np.zeros((b, 8, 8, 3), dtype=np.uint8),
        latents=latents,
        log_probs=torch.randn((b, steps), generator=g),
        timesteps=timesteps,
        prompt_embeds=embeds,
        negative_embeds=torch.zeros((1, *text)),
        policy_version=0,
        eta=1.0,
        guidance_scale=3.0,
        step_pairs=step_pairs,
    )
    scores = torch.randperm(b, generator=g).float()
    return ScoredRollouts(rollout=rollout, scores=scores, components={"fake": scores})


def lora_params(model: Any) -> list[torch.nn.Parameter]:
    return [p for n, p in model.unet.named_parameters() if "lora_" in n]


def adam_step(model: Any, loss_fn: Any, lr: float = 1e-3) -> float:
    """One Adam step on the LoRA parameters for the scalar `loss_fn()`; returns the loss before the step."""
    opt = torch.optim.Adam(lora_params(model), lr=lr)
    loss = loss_fn()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def run_algo(algo: Any, model: Any, batch: Any, cfg: Any) -> Any:
    """LossOutput of one registered algorithm on `batch`."""
    return algo.loss(algo.forward(model, batch, cfg), cfg)


def microbatch_mean(algo: Any, model: Any, batch: Any, cfg: Any, size: int) -> torch.Tensor:
    """Row-weighted mean of micro-batch losses (what the learner accumulates)."""
    from rlalign.algos.common import num_rows, slice_rows

    n = num_rows(batch)
    parts = []
    for lo in range(0, n, size):
        mb = slice_rows(batch, lo, min(lo + size, n))
        parts.append(run_algo(algo, model, mb, cfg).loss * (num_rows(mb) / n))
    return torch.stack(parts).sum()


# ---------------------------------------------------------------------------------------------------------------
# The tiny embedded digits model (a real StableDiffusionPipeline layout with a trained-for-seconds classifier),
# built once per test session into a temporary cache and shared by component, ray and e2e tests.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache directory holding the tiny digits model (`model.size=tiny model.cache_dir=<this>`)."""
    from rlalign.models.digits import ensure_digits_model

    cache = tmp_path_factory.mktemp("rlalign-cache")
    ensure_digits_model(cache, seed=0, progress=False, size="tiny")
    return cache


@pytest.fixture(scope="session")
def tiny_digits_dir(tiny_digits_cache: Path) -> Path:
    from rlalign.models.digits import cached_model_dir

    return cached_model_dir(tiny_digits_cache, 0, "tiny")


@pytest.fixture
def tiny_overrides(tiny_digits_cache: Path, tmp_path: Path) -> list[str]:
    """Config overrides that point a run at the tiny model and a per-test output directory."""
    return ["model.size=tiny", f"model.cache_dir={tiny_digits_cache}", f"out_dir={tmp_path / 'runs'}"]


class WinnerFirstProbe:
    """Stand-in DiffusionModel: policy eps = x_t, reference eps = 0, embed = identity.

    With winner x0 = 0 and loser x0 = 10, every policy error/distance of the winner is far smaller than the
    loser's, so a forward that swaps the winner/loser halves is caught.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).double()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *, adapters: bool = True) -> torch.Tensor:
        return x_t.float() if adapters else torch.zeros_like(x_t, dtype=torch.float32)

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x.float()


class ZeroDataOracle:
    """Stand-in DiffusionModel for data x0 = 0 (x_t = sqrt(1 - abar) noise): the policy outputs the exact
    regression target of the scheduler's prediction type (noise, or v = sqrt(abar) noise), the reference 0;
    E is the identity."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).double()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *, adapters: bool = True) -> torch.Tensor:
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = x_t.double() / (1 - abar).sqrt()
        v = self.scheduler.config.prediction_type == "v_prediction"
        out = abar.sqrt() * noise if v else noise
        return out.float() if adapters else torch.zeros_like(x_t, dtype=torch.float32)

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x.float()


def winner_first_batch(batch: Any) -> Any:
    """The same batch with winner x0 = 0 and loser x0 = 10."""
    return batch._replace(x0_w=torch.zeros_like(batch.x0_w), x0_l=torch.full_like(batch.x0_l, 10.0))


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init StableDiffusionPipeline directory (SD1.5 layout), built offline once per session."""
    from tiny_pipelines import build_sd15

    return build_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init StableDiffusionXLPipeline directory (SDXL layout), built offline once per session."""
    from tiny_pipelines import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


# ---------------------------------------------------------------------------------------------------------------
# A reward server process (`python -m reward_servers.serve`) on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def reward_server_process(args: list[str], log: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`python -m reward_servers.serve ARGS --port P` on a free port, yielded once /health answers; stopped after.

    Its output goes to `log`: a pipe nobody reads fills up and blocks the server's event loop.
    """
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "reward_servers.serve", *args, "--port", str(port)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()}"
            assert time.monotonic() < deadline, "server did not answer /health within 60 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One embedded Ray per test module (e2e): logical CPUs for 2 samplers + learner + reward actor on 2 cores.

    It lives here, not in tests/e2e/conftest.py: a second conftest module would shadow this one for every
    `from conftest import ...` collected after it.
    """
    import ray

    ray.init(num_cpus=6, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()
