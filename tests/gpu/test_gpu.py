"""GPU tests (opt-in: `make test-gpu`, i.e. `pytest -m gpu tests/gpu`): skipped on machines without CUDA.

On one GPU, with bf16 base weights: the tiny SD1.5- and SDXL-layout pipelines train end to end through Ray with
sampler, learner and reward actors each holding a share of the GPU (placement.json must say cuda for every role),
the learner keeps float32 LoRA on the GPU, and the exported LoRA reproduces the learner's U-Net in plain diffusers
on the GPU. Each test prints the figures a closing note reports.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
ALL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@pytest.fixture(scope="module")
def ray_gpu() -> Iterator[None]:
    import ray

    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def gpu_overrides(model_dir: Path, classifier: Path, out: Path) -> list[str]:
    return [
        f"model.path={model_dir}",
        f"out_dir={out}",
        "sampler.dtype=bfloat16",
        "sampler.num_gpus=0.3",
        "learner.num_gpus=0.3",
        f"reward.models=[{{name: digit_prompt, path: {classifier}, num_gpus: 0.2}}]",
        "eval.images_per_prompt=1",
    ]


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
@pytest.mark.parametrize("algo", ["tailorpo_g", "diffusion_dpo"])
def test_end_to_end_on_one_gpu_in_bf16(
    layout: str, algo: str, ray_gpu: None, tiny_sd15_dir: Path, tiny_sdxl_dir: Path, tiny_digits_dir: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from rich.console import Console

    from rlalign.algos import ALGORITHMS
    from rlalign.config import load_config
    from rlalign.driver import train
    from rlalign.metrics import read_metrics

    model_dir = tiny_sd15_dir if layout == "sd15" else tiny_sdxl_dir
    overrides = gpu_overrides(model_dir, tiny_digits_dir / "digit_classifier", tmp_path / "runs")
    cfg = load_config(CONFIG, [f"algo={algo}", "learner.dtype=bfloat16", *overrides])
    result = train(cfg, Console(quiet=True))
    placed = json.loads((result.run_dir / "placement.json").read_text())
    assert all(d.startswith("cuda") for devices in placed["devices"].values() for d in devices), placed["devices"]
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss/total" in r]
    assert [r["iteration"] for r in rows] == [0, 1] and all(math.isfinite(r["loss/total"]) for r in rows)
    if ALGORITHMS[algo].is_preference:
        assert rows[0]["loss/first"] == pytest.approx(math.log(2.0), abs=1e-6)
    with capsys.disabled():
        print(
            f"\n[gpu e2e {layout} {algo}] devices {placed['devices']} loss {[round(r['loss/total'], 4) for r in rows]}"
        )


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_export_reproduces_the_gpu_learner(
    layout: str, tiny_sd15_dir: Path, tiny_sdxl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import randomize_lora
    from diffusers import DiffusionPipeline

    from rlalign.config import LoraCfg, ModelCfg, RunCfg
    from rlalign.learner import Learner
    from rlalign.models.conditioning import split_cond
    from rlalign.models.loading import load_parts

    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 to float32, not TF32 rounding
    torch.backends.cudnn.allow_tf32 = False
    model_dir = tiny_sd15_dir if layout == "sd15" else tiny_sdxl_dir
    lora = LoraCfg(rank=4, alpha=8.0, target_modules=ALL_TARGETS)
    model = ModelCfg(path=str(model_dir), device="cuda", tf32=False)
    cfg = RunCfg(algo="diffusion_dpo", model=model, lora=lora)
    learner = Learner(cfg, functools.partial(load_parts, model, lora, 4, role="learner"))
    assert learner.parts.device.type == "cuda" and all(p.is_cuda and p.dtype == torch.float32 for p in learner.params)
    randomize_lora(learner.model, scale=0.2, seed=1)
    g = torch.Generator().manual_seed(1)
    learner.save(tmp_path / "ckpt")
    sampler_parts = load_parts(model, lora, 4, lora=False)
    cond = sampler_parts.encode_prompts(["a photo of a 3", "seven"])
    x = torch.randn((2, *sampler_parts.latent_shape), generator=g).cuda()
    t = torch.tensor([700, 50], device="cuda")
    pipe = DiffusionPipeline.from_pretrained(model_dir).to("cuda")
    pipe.load_lora_weights(tmp_path / "ckpt" / "diffusers_lora")
    hidden, added = split_cond(cond, pipe.unet.config)
    with torch.no_grad():
        ours = learner.model.predict(x, t, cond)
        theirs = pipe.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample.float()
    diff = (ours - theirs).abs().max().item()
    with capsys.disabled():
        print(f"\n[gpu export {layout}] max|diffusers - learner| on cuda = {diff:.2e}")
    assert diff <= 1e-4
