"""Real-size smoke benchmark on CPU: the published SD1.5 (and SDXL) U-Net architecture, random weights, one
TailorPO and one Diffusion-DPO update of rlalign's Learner in bf16 at a small latent size.

    .venv/bin/python benchmarks/realsize.py [--models sd15,sdxl] [--latent 16] [--rows 2] [--rank 4]

Each model runs in its own child process (so one model's peak memory never hides the next one's) and the parent
prints one JSON line and a short table. Per model: parameters, build seconds, resident memory after the build;
per algorithm and rows-per-update (1 and --rows, one micro-batch each): seconds per update (mean of --repeats; one
warm-up update before the first case only) and the process's peak resident memory over those updates (Linux VmHWM,
reset through /proc/self/clear_refs before each case, malloc_trim first). `act_gb_per_row` = the peak difference
between the two row counts: what one more training row costs at this latent size. Memory is GiB (2**30 bytes).

The U-Net is built from the pipeline's own `unet/config.json` (benchmarks/unet_configs/, copied verbatim with its
source) with random init directly in bf16 (`torch.set_default_dtype` during construction; measured: SD1.5 peak RSS
2.4 GB this way vs 4.0 GB building fp32 and casting, SDXL 5.6 GB vs 10.9 GB). LoRA on attention (to_q/k/v/out)
through `rlalign.models.loading.attach_lora` (float32), AdamW float32, forward under autocast, as the Learner does
with `learner.dtype=bfloat16`. Numbers, never assertions. A benchmark only, not a test: on 2 shared CPU cores with
one torch thread SD1.5 took 69 s and SDXL 166 s (seconds per update move with the other jobs' load, which the JSON
line records; peak memory repeats to 0.06 GiB). Measured values and the GPU ones: docs/gpu-memory.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG_DIR = Path(__file__).resolve().parent / "unet_configs"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# DDIM schedule of SD1.5 and SDXL base (their scheduler_config.json), with rlalign's no-clipping requirement
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
GB = 2**30


@dataclass(frozen=True)
class Arch:
    """One pipeline's published component configs (files in benchmarks/unet_configs/)."""

    name: str
    unet: str
    vae: str
    text_encoders: tuple[str, ...]  # transformers CLIP text configs, in pipeline order
    tokens: int = 77  # text tokens per prompt (CLIP max length)


ARCHS = {
    "sd15": Arch("sd15", "sd15_unet.json", "sd15_vae.json", ("sd15_text_encoder.json",)),
    "sdxl": Arch("sdxl", "sdxl_unet.json", "sdxl_vae.json", ("sd15_text_encoder.json", "sdxl_text_encoder_2.json")),
}

# --cpu-smoke style shrink of the published configs (same block types and conditioning layout, tiny widths)
TINY_UNET: dict[str, dict[str, Any]] = {
    "sd15": dict(block_out_channels=[32, 64, 64, 64], layers_per_block=1, cross_attention_dim=32, sample_size=8),
    "sdxl": dict(
        block_out_channels=[32, 64, 64],
        layers_per_block=1,
        transformer_layers_per_block=[1, 1, 2],
        attention_head_dim=[2, 4, 4],
        cross_attention_dim=64,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled 32 + 6 time ids x 8
        sample_size=8,
    ),
}
TINY_VAE: dict[str, Any] = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
TINY_TEXT: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


# ---------------------------------------------------------------------------------------------- small helpers
def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def hardware() -> dict[str, Any]:
    return {
        "hardware": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),  # 2 shared cores: other jobs slow every CPU number
    }


def load_json(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = json.loads((CONFIG_DIR / name).read_text())
    return {**cfg, **(overrides or {})}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Construct modules directly in `dtype` (no float32 copy first: half the peak memory of build-then-cast)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_unet(
    arch: Arch, device: torch.device, dtype: torch.dtype, *, tiny: bool = False, seed: int = 0
) -> tuple[Any, float]:
    """Random-init UNet2DConditionModel from the published config; returns (unet, build seconds)."""
    from diffusers import UNet2DConditionModel

    cfg = load_json(arch.unet, TINY_UNET[arch.name] if tiny else None)
    start = time.perf_counter()
    torch.manual_seed(seed)
    with default_dtype(dtype), device:
        unet = UNet2DConditionModel.from_config(cfg)
    unet.requires_grad_(False)
    return unet, time.perf_counter() - start


def build_vae(arch: Arch, device: torch.device, dtype: torch.dtype, *, tiny: bool = False) -> Any:
    from diffusers import AutoencoderKL

    cfg = load_json(arch.vae, TINY_VAE if tiny else None)
    torch.manual_seed(0)
    with default_dtype(dtype), device:
        vae = AutoencoderKL.from_config(cfg)
    return vae.requires_grad_(False).eval()


def text_encoder_params(arch: Arch) -> list[int]:
    """Parameter counts of the pipeline's text encoders (built on the meta device: no memory, no weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    counts = []
    for name in arch.text_encoders:
        raw = load_json(name)
        cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in raw["architectures"] else CLIPTextModel
        cfg = CLIPTextConfig(**{k: v for k, v in raw.items() if not k.startswith("_") and k != "architectures"})
        with torch.device("meta"):
            counts.append(sum(p.numel() for p in cls(cfg).parameters()))
    return counts


def n_params(module: Any, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def make_scheduler(steps: int) -> Any:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SD_SCHEDULE)
    sched.set_timesteps(steps)
    return sched


def lora_cfg(rank: int) -> Any:
    from rlalign.config import LoraCfg

    return LoraCfg(rank=rank, alpha=float(rank), target_modules=list(LORA_TARGETS))


def attach(unet: Any, rank: int) -> int:
    """rlalign's LoRA attacher (B = 0, float32); returns the number of LoRA parameters."""
    from rlalign.models.loading import attach_lora

    params = attach_lora(unet, lora_cfg(rank))
    return sum(p.numel() for p in params)


def reset_lora(unet: Any) -> None:
    """lora_B = 0 again: policy == reference, so a DPO-type loss must read exactly ln 2 (a wiring check)."""
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.zero_()


# ---------------------------------------------------------------------------------------------- conditioning
def cond_tokens(unet_config: Any) -> tuple[int, int]:
    """(L', D) of one packed conditioning row: 77 text tokens + SDXL's pooled/time-id tokens (conditioning.py)."""
    from rlalign.models.conditioning import extra_tokens

    return 77 + extra_tokens(unet_config), int(unet_config.cross_attention_dim)


def random_cond(unet_config: Any, b: int, generator: torch.Generator, *, zero: bool = False) -> torch.Tensor:
    """Packed conditioning [b, L', D]: random hidden states (+ SDXL pooled embedding and real 1024 px time ids)."""
    from rlalign.models.conditioning import TIME_IDS, pack_cond, pooled_dim

    d = int(unet_config.cross_attention_dim)
    hidden = torch.zeros(b, 77, d) if zero else torch.randn((b, 77, d), generator=generator)
    p = pooled_dim(unet_config)
    if p == 0:
        return hidden
    pooled = torch.zeros(b, p) if zero else torch.randn((b, p), generator=generator)
    px = float(int(unet_config.sample_size) * 8)
    time_ids = torch.tensor([[px, px, 0.0, 0.0, px, px]]).expand(b, TIME_IDS)
    return pack_cond(hidden, pooled, time_ids)


def _rollout_kwargs(**kw: Any) -> dict[str, Any]:
    """Only the Rollout fields this checkout has (eta / guidance_scale arrived later than the rest)."""
    from rlalign.types import Rollout

    names = {f.name for f in dataclasses.fields(Rollout)}
    return {k: v for k, v in kw.items() if k in names}


def synthetic_scored(algo: str, rows: int, unet_config: Any, latent_hw: int, steps: int, *, seed: int = 0) -> Any:
    """ScoredRollouts giving exactly `rows` training rows to `algo` (like tests/conftest.py make_scored).

    diffusion_dpo: `rows` groups of 2 images (one pair each). tailorpo: `rows` trajectories, each with one valid
    branched pair at the first (noisiest) step, where the DDIM std is far above tailorpo.min_std.
    """
    from rlalign.types import Rollout, ScoredRollouts, StepPairs

    g = torch.Generator().manual_seed(seed)
    per_group = 2 if algo == "diffusion_dpo" else 1
    b = rows * per_group
    c = int(unet_config.in_channels)
    latent = (c, latent_hw, latent_hw)
    timesteps = make_scheduler(steps).timesteps.clone().long()
    latents = torch.randn((b, steps + 1, *latent), generator=g)
    step_pairs = None
    if algo == "tailorpo":
        valid = torch.zeros(b, steps, dtype=torch.bool)
        valid[:, 0] = True
        step_pairs = StepPairs(
            x_t=latents[:, :-1].clone(),
            x_w=latents[:, 1:].clone(),
            x_l=torch.randn((b, steps, *latent), generator=g),
            timesteps=timesteps,
            valid=valid,
            reward_w=torch.ones(b, steps),
            reward_l=torch.zeros(b, steps),
        )
    embeds = random_cond(unet_config, rows, g).repeat_interleave(per_group, 0)
    rollout = Rollout(
        **_rollout_kwargs(
            prompts=[f"prompt {i // per_group}" for i in range(b)],
            group_ids=torch.arange(rows).repeat_interleave(per_group),
            seeds=torch.arange(b),
            images=np.zeros((b, 8, 8, 3), dtype=np.uint8),
            latents=latents,
            log_probs=torch.zeros(b, steps),
            timesteps=timesteps,
            prompt_embeds=embeds,
            negative_embeds=random_cond(unet_config, 1, g, zero=True),
            policy_version=0,
            eta=1.0,
            guidance_scale=3.0,
            step_pairs=step_pairs,
        )
    )
    scores = torch.arange(b, dtype=torch.float32)  # distinct: every group gives its pair
    return ScoredRollouts(rollout=rollout, scores=scores, components={"synthetic": scores})


# ---------------------------------------------------------------------------------------------- memory
class CpuMemory:
    """Process resident memory: current (VmRSS) and peak since `reset` (VmHWM, reset via clear_refs)."""

    kind = "cpu_rss"

    def __init__(self) -> None:
        try:
            self._libc: Any = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    @staticmethod
    def _status(key: str) -> float:
        text = Path("/proc/self/status").read_text()
        match = re.search(rf"{key}:\s+(\d+) kB", text)
        return int(match.group(1)) * 1024 / GB if match else float("nan")

    def reset(self) -> None:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)  # hand freed heap back, so the next peak counts only what that case holds
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS

    def current_gb(self) -> float:
        return self._status("VmRSS")

    def peak_gb(self) -> float:
        return self._status("VmHWM")

    def sync(self) -> None:
        pass


class CudaMemory:
    """torch.cuda allocator: current = memory_allocated, peak = max_memory_allocated since `reset`."""

    kind = "cuda_allocated"

    def reset(self) -> None:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def current_gb(self) -> float:
        return torch.cuda.memory_allocated() / GB

    def peak_gb(self) -> float:
        return torch.cuda.max_memory_allocated() / GB

    def reserved_peak_gb(self) -> float:
        return torch.cuda.max_memory_reserved() / GB

    def sync(self) -> None:
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- the learner
def learner_run_cfg(
    algo: str, micro_batch: int, rank: int, *, steps: int, device: str, checkpointing: bool = False
) -> Any:
    from rlalign.config import load_config

    cfg = load_config(
        None,
        [
            f"algo={algo}",
            "learner.dtype=bfloat16",
            f"learner.micro_batch_size={micro_batch}",
            "learner.optimizer_steps=1",
            "learner.epochs=1",
            f"learner.gradient_checkpointing={str(checkpointing).lower()}",
            f"lora.rank={rank}",
            f"lora.alpha={float(rank)}",
            f"sampler.num_steps={steps}",
            f"model.device={device}",
        ],
    )
    cfg.lora.target_modules = list(LORA_TARGETS)
    return cfg


def make_parts_fn(
    unet: Any, scheduler: Any, device: torch.device, dtype: torch.dtype, layout: str
) -> Callable[[], Any]:
    """The learner's parts (unet + scheduler; the rest None), filled for whatever fields this checkout's
    DiffusionParts has."""
    from rlalign.models.loading import DiffusionParts

    given = dict(unet=unet, scheduler=scheduler, device=device, dtype=dtype, model_dir=CONFIG_DIR, layout=layout)
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(DiffusionParts):
        if f.name in given:
            kw[f.name] = given[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw[f.name] = None
    return lambda: DiffusionParts(**kw)


def bench_learner(
    unet: Any,
    algo: str,
    rows: int,
    micro_batch: int,
    *,
    rank: int,
    latent_hw: int,
    device: torch.device,
    mem: Any,
    repeats: int = 2,
    warmup: bool = True,
    checkpointing: bool = False,
    steps: int = 20,
    layout: str = "sd15",
) -> dict[str, Any]:
    """One Learner on the shared U-Net: [warm-up update +] `repeats` timed ones; seconds per update, peak memory.

    The U-Net is shared between cases (built once); its LoRA is zeroed and gradient checkpointing switched off
    first, so every case starts from policy == reference (first loss exactly ln 2: checked, `ln2_ok`).
    """
    from rlalign.learner import Learner

    reset_lora(unet)
    if hasattr(unet, "disable_gradient_checkpointing"):
        unet.disable_gradient_checkpointing()  # the Learner turns it on when the config asks
    scheduler = make_scheduler(steps)
    cfg = learner_run_cfg(algo, micro_batch, rank, steps=steps, device=device.type, checkpointing=checkpointing)
    scored = synthetic_scored(algo, rows, unet.config, latent_hw, steps)
    mem.reset()
    before = mem.current_gb()
    learner = Learner(cfg, make_parts_fn(unet, scheduler, device, torch.bfloat16, layout))
    times, first, metrics = [], None, {}
    for i in range(int(warmup) + repeats):
        start = time.perf_counter()
        metrics = learner.update(scored)
        mem.sync()
        first = first or metrics
        if i >= int(warmup):
            times.append(time.perf_counter() - start)
    peak = mem.peak_gb()
    out = {
        "algo": algo,
        "rows": rows,
        "micro_batch": micro_batch,
        "checkpointing": checkpointing,
        "latent": latent_hw,
        "s_per_update": float(np.mean(times)) if times else float("nan"),
        "peak_gb": peak,
        "before_gb": before,
        "update_extra_gb": peak - before,
        "loss_first": float(first["loss/first"]),  # ln 2 = 0.693 with B = 0
        "loss_last": float(metrics["loss/total"]),
        "ln2_ok": abs(float(first["loss/first"]) - math.log(2)) < 1e-3,
        "loadavg_1m": os.getloadavg()[0],  # other jobs on a shared CPU make these seconds noisy
    }
    del learner
    for p in unet.parameters():
        p.grad = None
    return out


# ---------------------------------------------------------------------------------------------- CPU benchmark
def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything for one model in this process (the parent runs one child per model)."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    arch = ARCHS[name]
    mem = CpuMemory()
    device = torch.device("cpu")
    mem.reset()
    base = mem.current_gb()  # interpreter + torch/diffusers imports
    unet, build_s = build_unet(arch, device, torch.bfloat16)
    lora = attach(unet, args.rank)
    built_peak = mem.peak_gb()
    params = n_params(unet) - lora
    result: dict[str, Any] = {
        "model": name,
        "unet_params_m": params / 1e6,
        "lora_params_m": lora / 1e6,
        "lora_rank": args.rank,
        "build_s": build_s,
        "import_rss_gb": base,
        "build_peak_rss_gb": built_peak,
        "weights_gb": sum(p.numel() * p.element_size() for p in unet.parameters()) / GB,
        "text_encoder_params_m": [n / 1e6 for n in text_encoder_params(arch)],
        "cases": [],
    }
    vae = build_vae(arch, torch.device("meta"), torch.bfloat16)
    result["vae_params_m"] = n_params(vae) / 1e6
    del vae
    layout = "sdxl" if name == "sdxl" else "sd15"
    for algo in args.algos.split(","):
        for rows in sorted({1, args.rows}):
            warm = not result["cases"]  # kernels and allocator warm up once per process, in the first case
            case = bench_learner(
                unet,
                algo,
                rows,
                rows,
                rank=args.rank,
                latent_hw=args.latent,
                device=device,
                mem=mem,
                repeats=args.repeats,
                warmup=warm,
                layout=layout,
            )
            msg = f"  {name} {algo} rows={rows}: {case['s_per_update']:.2f} s/update, peak {case['peak_gb']:.2f} GiB"
            print(msg, file=sys.stderr, flush=True)
            result["cases"].append(case)
    by = {(c["algo"], c["rows"]): c for c in result["cases"]}
    for algo in args.algos.split(","):
        if args.rows > 1:
            hi, lo = by[(algo, args.rows)], by[(algo, 1)]
            result[f"{algo}_act_gb_per_row"] = (hi["peak_gb"] - lo["peak_gb"]) / (args.rows - 1)
    result["peak_rss_gb"] = max([built_peak] + [c["peak_gb"] for c in result["cases"]])
    return result


def rounded(obj: Any, digits: int = 4) -> Any:
    """Floats rounded for the JSON line, recursively."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'model':6s} {'algo':14s} {'rows':>4s} {'s/update':>9s} {'peak GiB':>8s} {'+GiB':>6s} {'ln2':>4s}"]
    for r in results:
        lines.append(
            f"{r['model']:6s} {'(build)':14s} {'':>4s} {r['build_s']:9.1f} {r['build_peak_rss_gb']:8.2f} "
            f"{'':>6s} {'':>4s}   {r['unet_params_m']:.0f} M params, LoRA {r['lora_params_m']:.2f} M"
        )
        for c in r["cases"]:
            lines.append(
                f"{r['model']:6s} {c['algo']:14s} {c['rows']:4d} {c['s_per_update']:9.2f} {c['peak_gb']:8.2f} "
                f"{c['update_extra_gb']:6.2f} {'ok' if c['ln2_ok'] else 'NO':>4s}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl", help="comma list of sd15, sdxl")
    parser.add_argument("--algos", default="tailorpo,diffusion_dpo")
    parser.add_argument("--latent", type=int, default=16, help="latent side (16 = 128 px)")
    parser.add_argument("--rows", type=int, default=2, help="training rows per update (also measured at 1)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="timed updates after the warm-up one")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadiest on shared CPUs; 0: torch default)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_model(args.child, args)))
        return
    results = []
    start = time.perf_counter()
    for name in args.models.split(","):
        if name not in ARCHS:
            sys.exit(f"unknown model {name!r}; choose from {', '.join(ARCHS)}")
        argv = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            sys.exit(f"realsize: {name} failed (exit {proc.returncode}); see its stderr above")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    line = {
        "benchmark": "realsize",
        "commit": commit(),
        **hardware(),
        "torch_threads": args.threads or torch.get_num_threads(),  # what the children used
        "dtype": "bfloat16 base, float32 LoRA + AdamW, autocast",
        "latent": args.latent,
        "total_s": round(time.perf_counter() - start, 1),
        "models": results,
    }
    print(json.dumps(rounded(line)))
    print(table(results))


if __name__ == "__main__":
    main()
