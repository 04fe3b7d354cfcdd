"""GPU benchmark: the real-size SD1.5 (and SDXL) U-Net, random weights, bf16, on one CUDA device.

    .venv/bin/python benchmarks/gpu_bench.py [--models sd15,sdxl] [--budget-s 220]
    .venv/bin/python benchmarks/gpu_bench.py --cpu-smoke     # tiny configs on CPU: checks the script only

Sections (one JSON line each, as it finishes, then a table):
  * sampler: DDIM 20 steps, classifier-free guidance, 8 images per call (16 U-Net rows per step), U-Net with a
    fresh fp32 LoRA beside bf16 weights under autocast (what a sampler holds); images/s for the U-Net loop alone and
    with a random-init VAE decode (the pipeline's published vae/config.json); peak allocated memory of each.
  * learner: rlalign's Learner (learner.dtype=bfloat16: fp32 LoRA r4 on attention + AdamW) on synthetic rollouts,
    TailorPO and Diffusion-DPO, micro-batch 4 (one micro-batch per update), gradient checkpointing off and on;
    seconds per update (mean of 2 after a warm-up) and torch.cuda.max_memory_allocated. An out-of-memory case is
    recorded as such, not fatal.
  * reward: a random-init open_clip ViT-H-14 (PickScore / HPSv2 architecture) scoring 8 images, float32 as the
    reward servers run it.
SD1.5 at 64x64 latents (512 px), SDXL at 128x128 (1024 px). Fails at once without CUDA (unless --cpu-smoke); a
SIGALRM watchdog ends it at --budget-s + 60 s rather than let it hang, and sections that would start after
--budget-s are skipped (reported as skipped). Built to finish in under 4 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from typing import Any

import torch
from realsize import (
    ARCHS,
    CpuMemory,
    CudaMemory,
    attach,
    bench_learner,
    build_unet,
    build_vae,
    commit,
    hardware,
    make_scheduler,
    n_params,
    random_cond,
    rounded,
)

RESULTS: list[dict[str, Any]] = []


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> bool:
        return self.elapsed() < self.seconds


def emit(section: str, **data: Any) -> None:
    line = {"benchmark": "gpu_bench", "section": section, **data}
    RESULTS.append(line)
    print(json.dumps(rounded(line)), flush=True)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------------------------------------- sampler
@torch.no_grad()
def sample_loop(unet: Any, images: int, latent: int, steps: int, guidance: float, device: torch.device) -> Any:
    """DDIM (eta 1) with CFG: the U-Net part of a sampler call, as rlalign's sampler runs it (packed cond)."""
    from rlalign.models.conditioning import unet_eps

    sched = make_scheduler(steps)
    g = torch.Generator().manual_seed(0)
    cond = random_cond(unet.config, images, g).to(device)
    uncond = random_cond(unet.config, 1, g, zero=True).to(device).expand_as(cond)
    both = torch.cat([uncond, cond])
    x = torch.randn((images, int(unet.config.in_channels), latent, latent), generator=g).to(device)
    for t in sched.timesteps:
        e_u, e_c = unet_eps(unet, torch.cat([x, x]), t, both, dtype=torch.bfloat16).chunk(2)
        eps = e_u + guidance * (e_c - e_u)
        x = sched.step(eps, t, x, eta=1.0).prev_sample
    return x


def bench_sampler(
    unet: Any, vae: Any, name: str, images: int, latent: int, steps: int, device: torch.device, mem: Any
) -> None:
    sample_loop(unet, images, latent, 2, 3.0, device)  # warm-up: kernels, cuDNN choices
    mem.reset()
    base = mem.current_gb()
    start = time.perf_counter()
    x = sample_loop(unet, images, latent, steps, 3.0, device)
    mem.sync()
    unet_s = time.perf_counter() - start
    unet_peak = mem.peak_gb()
    with torch.no_grad():
        vae.decode((x / vae.config.scaling_factor).to(torch.bfloat16))  # warm-up at the timed shape (cuDNN choices)
        mem.sync()
        mem.reset()
        start = time.perf_counter()
        img = vae.decode((x / vae.config.scaling_factor).to(torch.bfloat16)).sample
        mem.sync()
    decode_s = time.perf_counter() - start
    emit(
        "sampler",
        model=name,
        images=images,
        latent=latent,
        pixels=int(img.shape[-1]),
        steps=steps,
        unet_rows_per_step=2 * images,
        unet_s=unet_s,
        unet_images_per_s=images / unet_s,
        unet_peak_gb=unet_peak,
        unet_act_peak_gb=unet_peak - base,
        vae_decode_s=decode_s,
        vae_decode_peak_gb=mem.peak_gb(),
        vae_decode_act_peak_gb=mem.peak_gb() - base,
        images_per_s_with_decode=images / (unet_s + decode_s),
    )


# ---------------------------------------------------------------------------------------------- reward
def bench_reward(arch: str, images: int, device: torch.device, mem: Any) -> None:
    import open_clip

    mem.reset()
    start = time.perf_counter()
    with device:
        model = open_clip.create_model(arch, pretrained=None, device=device).eval()
    build_s = time.perf_counter() - start
    weights = mem.current_gb()
    tok = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    pixels = torch.rand(images, 3, size, size, device=device)
    text = tok([f"a photo number {i}" for i in range(images)]).to(device)
    with torch.no_grad():
        model.encode_image(pixels), model.encode_text(text)  # warm-up
        mem.sync()
        mem.reset()
        start = time.perf_counter()
        (model.encode_image(pixels) * model.encode_text(text)).sum(-1)
        mem.sync()
    emit(
        "reward",
        arch=arch,
        dtype="float32",
        params_m=n_params(model) / 1e6,
        build_s=build_s,
        weights_gb=weights,
        images=images,
        score_s=time.perf_counter() - start,
        peak_gb=mem.peak_gb(),
    )
    del model


# ---------------------------------------------------------------------------------------------- per model
def bench_model(name: str, args: argparse.Namespace, device: torch.device, mem: Any, budget: Budget) -> None:
    arch = ARCHS[name]
    latent = args.smoke_latent if args.cpu_smoke else (64 if name == "sd15" else 128)
    mem.reset()
    unet, build_s = build_unet(arch, device, torch.bfloat16, tiny=args.cpu_smoke)
    lora = attach(unet, args.rank)
    mem.sync()
    weights = mem.current_gb()
    emit(
        "build",
        model=name,
        unet_params_m=(n_params(unet) - lora) / 1e6,
        lora_params_m=lora / 1e6,
        build_s=build_s,
        weights_gb=weights,
        latent=latent,
    )
    if budget.left():
        vae = build_vae(arch, device, torch.bfloat16, tiny=args.cpu_smoke)
        bench_sampler(unet, vae, name, args.images, latent, args.steps, device, mem)
        del vae
    else:
        emit("skipped", model=name, what="sampler", elapsed_s=budget.elapsed())
    layout = "sdxl" if name == "sdxl" else "sd15"
    cases = [(algo, mb, ckpt) for algo in ("tailorpo", "diffusion_dpo") for ckpt in (False, True) for mb in [args.mb]]
    # second points at a larger micro-batch: activation memory per row as a slope, without the fixed part
    if name == "sd15":
        cases += [("diffusion_dpo", 2 * args.mb, False), ("diffusion_dpo", 4 * args.mb, True)]
    else:
        cases = [("diffusion_dpo", 1, False), ("tailorpo", 1, False), *cases, ("diffusion_dpo", 2 * args.mb, True)]
    for algo, mb, ckpt in cases:
        if not budget.left():
            emit("skipped", model=name, what=f"learner {algo} mb={mb} ckpt={ckpt}", elapsed_s=budget.elapsed())
            continue
        try:
            case = bench_learner(
                unet,
                algo,
                mb,
                mb,
                rank=args.rank,
                latent_hw=latent,
                device=device,
                mem=mem,
                repeats=args.repeats,
                checkpointing=ckpt,
                steps=args.steps,
                layout=layout,
            )
            case["act_gb_per_row"] = (case["peak_gb"] - weights) / mb
            if isinstance(mem, CudaMemory):
                case["reserved_peak_gb"] = mem.reserved_peak_gb()
            emit("learner", model=name, **case)
        except Exception as err:
            if not is_oom(err):
                raise
            emit("learner", model=name, algo=algo, micro_batch=mb, checkpointing=ckpt, oom=True)
        finally:
            for p in unet.parameters():
                p.grad = None
    del unet


def table() -> str:
    out = [f"{'model':6s} {'section':9s} {'case':28s} {'seconds':>8s} {'peak GiB':>8s}  note"]
    for r in RESULTS:
        s, m = r["section"], r.get("model", "")
        if s == "build":
            out.append(
                f"{m:6s} {s:9s} {'':28s} {r['build_s']:8.1f} {r['weights_gb']:8.2f}  "
                f"{r['unet_params_m']:.0f} M params, latent {r['latent']}"
            )
        elif s == "sampler":
            out.append(
                f"{m:6s} {s:9s} {'unet x' + str(r['steps']) + ' steps':28s} {r['unet_s']:8.2f} "
                f"{r['unet_peak_gb']:8.2f}  {r['unet_images_per_s']:.2f} img/s ({r['images']} per call)"
            )
            out.append(
                f"{m:6s} {s:9s} {'+ vae decode':28s} {r['vae_decode_s']:8.2f} {r['vae_decode_peak_gb']:8.2f}  "
                f"{r['images_per_s_with_decode']:.2f} img/s with decode"
            )
        elif s == "learner":
            case = f"{r['algo']} mb={r['micro_batch']}{' ckpt' if r['checkpointing'] else ''}"
            if r.get("oom"):
                out.append(f"{m:6s} {s:9s} {case:28s} {'OOM':>8s}")
            else:
                out.append(
                    f"{m:6s} {s:9s} {case:28s} {r['s_per_update']:8.2f} {r['peak_gb']:8.2f}  "
                    f"{r['act_gb_per_row']:.2f} GiB/row, ln2 {'ok' if r['ln2_ok'] else 'NO'}"
                )
        elif s == "reward":
            out.append(
                f"{'':6s} {s:9s} {r['arch'] + ' x' + str(r['images']):28s} {r['score_s']:8.2f} "
                f"{r['peak_gb']:8.2f}  {r['params_m']:.0f} M params fp32"
            )
        elif s == "skipped":
            out.append(f"{m:6s} {s:9s} {r['what']:28s}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--budget-s", type=float, default=200.0, help="start no section after this many seconds")
    parser.add_argument("--images", type=int, default=8, help="images per sampler call")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mb", type=int, default=4, help="learner micro-batch (= rows per update)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reward", default="ViT-H-14", help="open_clip arch for the reward section ('' skips)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny configs on CPU: checks the script only")
    parser.add_argument("--smoke-latent", type=int, default=8)
    args = parser.parse_args()
    if args.cpu_smoke:
        device, mem = torch.device("cpu"), CpuMemory()
        args.images, args.steps, args.mb, args.repeats = 2, 3, 2, 1
        torch.set_num_threads(1)  # tiny models: threads only fight the other jobs on a shared CPU
        args.reward = args.reward and "ViT-B-32"
    elif not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA device (torch.cuda.is_available() is False); --cpu-smoke checks it on CPU")
    else:
        device, mem = torch.device("cuda"), CudaMemory()
        torch.backends.cudnn.benchmark = True

    def watchdog(_sig: int, _frame: Any) -> None:
        raise TimeoutError(f"gpu_bench.py ran past --budget-s + 60 = {args.budget_s + 60:.0f} s")

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(math.ceil(args.budget_s + 60))
    budget = Budget(args.budget_s)
    emit("env", commit=commit(), **hardware(), smoke=args.cpu_smoke, device=str(device))
    try:
        names = args.models.split(",")
        for name in names:
            if name not in ARCHS:
                sys.exit(f"unknown model {name!r}; choose from {', '.join(ARCHS)}")
        for i, name in enumerate(names):
            if budget.left():
                bench_model(name, args, device, mem, budget)
            else:
                emit("skipped", model=name, what="everything", elapsed_s=budget.elapsed())
            if i == 0 and args.reward and budget.left():  # cheap: before the big SDXL section
                bench_reward(args.reward, args.images, device, mem)
    finally:
        signal.alarm(0)
        emit("done", total_s=budget.elapsed())
        print(table())


if __name__ == "__main__":
    main()
