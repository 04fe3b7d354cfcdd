"""Load the diffusion parts a sampler or the learner needs, from a local directory only (never a hub).

`load_parts(model_cfg, lora_cfg, num_steps, dtype=..., role=...)` returns the U-Net with a LoRA (fresh: B matrices
zero, so the policy equals the frozen reference until the first update; or seeded from `lora.init_from`), a DDIM
scheduler set to the sampling grid and, for a sampler, the VAE, text encoder(s) and tokenizer(s). The learner never
decodes or encodes text (rollouts carry latents and embeddings), so `role="learner"` loads the U-Net alone.

Layouts (detected from the directory, `model.kind=auto`): **sd15** (unet, vae, text_encoder, tokenizer, scheduler;
the embedded digits model has this layout too) and **sdxl** (plus text_encoder_2 / tokenizer_2; pooled embeddings
and `add_time_ids` travel packed inside the conditioning tensor, see `rlalign/models/conditioning.py`).

Precision (docs/precision.md): base weights load in `dtype` (float32 | bfloat16 | float16); LoRA parameters are
created and kept in float32 whatever the base dtype (peft would otherwise give them the base layer's dtype, and
AdamW steps of 1e-5 round away in bf16). A float16 SDXL VAE overflows; when the VAE's config asks for it
(`force_upcast`), it stays float32.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlalign.config import LoraCfg, ModelCfg
from rlalign.models.conditioning import pack_cond, pooled_dim

PIPELINE_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_FOLDERS = ("text_encoder_2", "tokenizer_2")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights(dir) looks for first


class ModelDirError(FileNotFoundError):
    """A model directory is missing or incomplete; the message says what to put where."""


@dataclass
class DiffusionParts:
    """What a sampler (everything) or the learner (unet + scheduler; the rest None) holds."""

    unet: Any  # diffusers UNet2DConditionModel with a LoRA adapter named "default" (LoRA params float32)
    vae: Any  # diffusers AutoencoderKL (frozen); None in the learner
    text_encoder: Any  # transformers CLIPTextModel (frozen); None in the learner
    tokenizer: Any
    scheduler: Any  # diffusers DDIMScheduler, set_timesteps(num_steps) done
    device: torch.device
    dtype: torch.dtype  # base weights' dtype; maths, latents and embeddings handed out are float32
    model_dir: Path
    layout: str = "sd15"  # sd15 | sdxl
    text_encoder_2: Any = None  # SDXL: CLIPTextModelWithProjection (pooled embedding)
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True  # SDXL pipelines use zeros, not "" embeddings, as the negative

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), size, size)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def image_size(self) -> int:
        """Pixels per side of a decoded image (the SDXL time ids' original and target size)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8
        return int(self.unet.config.sample_size) * factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """prompts [B] -> packed conditioning [B, L', D] float32 on the parts' device (conditioning.py)."""
        if self.text_encoder is None:
            raise RuntimeError("these parts were loaded without text encoders (role=learner)")
        if self.layout == "sd15":
            return self.text_encoder(self._ids(self.tokenizer, prompts))[0].float()
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self._ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both encoders
            pooled = out[0]  # the second encoder's projected pooled output (what diffusers' pipeline uses)
        return self._pack(torch.cat(hidden, dim=-1).float(), pooled)

    def negative_embeds(self) -> Tensor:
        """[1, L', D] conditioning of the empty prompt (classifier-free guidance), as diffusers' pipeline makes it."""
        if self.layout == "sdxl" and self.force_zeros_for_empty_prompt:
            width = int(self.unet.config.cross_attention_dim)
            tokens = int(self.tokenizer.model_max_length)
            zeros = torch.zeros(1, tokens, width, device=self.device)
            return self._pack(zeros, torch.zeros(1, pooled_dim(self.unet.config), device=self.device))
        return self.encode_prompts([""])

    def _ids(self, tokenizer: Any, prompts: list[str]) -> Tensor:
        tokens = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return tokens.input_ids.to(self.device)

    def _pack(self, hidden: Tensor, pooled: Tensor | None) -> Tensor:
        if self.layout == "sd15":
            return hidden
        assert pooled is not None
        size = float(self.image_size)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=hidden.device)
        return pack_cond(hidden, pooled.float(), time_ids.expand(hidden.shape[0], -1))

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, C, h, w] -> images [B, 3, H, W] float in [0, 1] (differentiable; callers pick no_grad)."""
        img = self.vae.decode((latents / self.scaling_factor).to(self.vae.dtype)).sample.float()
        return (img / 2 + 0.5).clamp(0, 1)


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [0, 1] -> [B, H, W, 3] uint8 (what reward servers receive)."""
    return (images.detach().permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)


def resolve_model_dir(model_cfg: ModelCfg, *, progress: bool = True) -> Path:
    """The local pipeline directory: the configured path, or the embedded digits model (built on first use)."""
    if model_cfg.path:
        path = Path(model_cfg.path).expanduser()
        check_pipeline_dir(path, model_cfg.kind)
        return path
    if model_cfg.kind not in ("auto", "digits"):
        raise ModelDirError(f"model.kind={model_cfg.kind} needs model.path: a local diffusers pipeline directory")
    from rlalign.models.digits import ensure_digits_model

    return Path(ensure_digits_model(model_cfg.cache_dir, progress=progress, size=model_cfg.size))  # type: ignore[arg-type]


def detect_layout(path: Path) -> str:
    """sdxl when the directory has a second text encoder (or model_index.json names an XL pipeline), else sd15."""
    index = path / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    return "sdxl" if (path / "text_encoder_2").is_dir() or "XL" in name else "sd15"


def check_pipeline_dir(path: Path, kind: str = "auto") -> str:
    """Raise ModelDirError naming what is missing; returns the layout (sd15 | sdxl)."""
    if not path.is_dir():
        raise ModelDirError(
            f"model directory {path} does not exist. Put a diffusers StableDiffusionPipeline there "
            f"(folders {', '.join(PIPELINE_FOLDERS)}), e.g. from pipe.save_pretrained(); rlalign never downloads."
        )
    layout = detect_layout(path)
    needed = PIPELINE_FOLDERS + (SDXL_FOLDERS if layout == "sdxl" else ())
    missing = [f for f in needed if not (path / f).is_dir()]
    if missing:
        raise ModelDirError(
            f"model directory {path} is incomplete: missing folder(s) {', '.join(missing)} "
            f"(a {'StableDiffusionXLPipeline' if layout == 'sdxl' else 'StableDiffusionPipeline'} directory has "
            f"{', '.join(needed)})"
        )
    expected = {"digits": "sd15", "sd15": "sd15", "sdxl": "sdxl"}.get(kind)
    if expected is not None and expected != layout:
        raise ModelDirError(
            f"model.kind={kind} but {path} holds an {layout} pipeline: set model.kind={layout} (or auto)"
        )
    return layout


def resolve_device(model_cfg: ModelCfg, num_gpus: float) -> torch.device:
    """Where an actor puts its models: its resources decide (`num_gpus > 0` -> CUDA) unless model.device says."""
    want = model_cfg.device
    if want == "auto":
        want = "cuda" if num_gpus > 0 else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"this actor was asked for CUDA (model.device={model_cfg.device}, num_gpus={num_gpus}) but "
            f"torch.cuda.is_available() is False here (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    return torch.device(want)


def apply_speed_settings(model_cfg: ModelCfg, device: torch.device, unet: Any, vae: Any = None) -> None:
    """Attention kernel, TF32, VAE slicing/tiling and torch.compile, as `model.*` asks."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = AttnProcessor2_0 if model_cfg.attention == "sdpa" else AttnProcessor
    for module in (unet, vae):
        if module is not None:
            module.set_attn_processor(processor())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = model_cfg.tf32
        torch.backends.cudnn.allow_tf32 = model_cfg.tf32
    if vae is not None and model_cfg.vae_slicing:
        vae.enable_slicing()
    if vae is not None and model_cfg.vae_tiling:
        vae.enable_tiling()


def attach_lora(unet: Any, lora_cfg: LoraCfg, seed: int = 0) -> list[torch.nn.Parameter]:
    """The one LoRA attacher: freeze the base, add a peft LoRA (B = 0: policy == reference bit-for-bit), keep it fp32.

    `target_modules` entries match module names or their dotted suffixes ("to_out.0"). LoRA A is drawn from a
    seeded generator, so every process builds the same version 0. Returns the trainable LoRA parameters.
    """
    from peft import LoraConfig

    names = {name for name, _ in unet.named_modules()}
    targets = [t for t in lora_cfg.target_modules if t in names or any(n.endswith("." + t) for n in names)]
    if not targets:
        raise ValueError(f"lora.target_modules {list(lora_cfg.target_modules)} match no U-Net module")
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, target_modules=targets))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()  # fp32 master weights whatever the base dtype (docs/precision.md)
        p.requires_grad_(True)
    return params


def load_parts(
    model_cfg: ModelCfg,
    lora_cfg: LoraCfg,
    num_steps: int,
    *,
    dtype: str = "float32",
    role: str = "sampler",
    num_gpus: float = 0.0,
    lora: bool = True,
    progress: bool = False,
) -> DiffusionParts:
    """Load the parts `role` needs (sampler: all; learner: unet + scheduler; encoder: VAE, text encoders and only
    the U-Net's config, for offline pairs) from the local model dir.

    Runs inside the owning actor: `num_gpus` is that actor's share, which picks the device (`resolve_device`).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars from every actor drown the run's own progress
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if role not in ("sampler", "learner", "encoder"):
        raise ValueError(f"role must be sampler, learner or encoder, got {role!r}")
    path = resolve_model_dir(model_cfg, progress=progress)
    layout = check_pipeline_dir(path, model_cfg.kind)
    device, torch_dtype = resolve_device(model_cfg, num_gpus), getattr(torch, dtype)
    kw: dict[str, Any] = {"local_files_only": True}
    if role == "encoder":  # offline pairs (rlalign/offline/encode.py): VAE and text encoders, the U-Net's config only
        unet: Any = SimpleNamespace(config=SimpleNamespace(**UNet2DConditionModel.load_config(path / "unet")))
        lora = False
    else:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype, **kw)
    scheduler = load_ddim_scheduler(path / "scheduler", num_steps)
    parts = DiffusionParts(unet, None, None, None, scheduler, device, torch_dtype, path, layout)
    if role in ("sampler", "encoder"):
        vae_dtype = torch.float32 if torch_dtype == torch.float16 and _force_upcast(path) else torch_dtype
        parts.vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=vae_dtype, **kw)
        parts.text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=torch_dtype, **kw)
        parts.tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", **kw)
        if layout == "sdxl":
            parts.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                path / "text_encoder_2", torch_dtype=torch_dtype, **kw
            )
            parts.tokenizer_2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2", **kw)
            parts.force_zeros_for_empty_prompt = _force_zeros(path)
    if role != "encoder":
        apply_speed_settings(model_cfg, device, unet, parts.vae)
    for module in (unet if role != "encoder" else None, parts.vae, parts.text_encoder, parts.text_encoder_2):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
            module.to(device)
    if lora:
        attach_lora(unet, lora_cfg)
        if lora_cfg.init_from:
            load_lora_into(unet, lora_cfg.init_from)
        unet.to(device)
    if model_cfg.compile and role != "encoder":
        unet.compile()  # in place: the module keeps its attributes (config, adapters) for every caller
    return parts


def load_ddim_scheduler(folder: Path, num_steps: int) -> Any:
    """DDIMScheduler from a pipeline's scheduler folder (SDXL ships an Euler config), checked, set to the grid.

    A non-DDIM config that does not mention `clip_sample` never clipped; DDIM's own default (True) would.
    """
    from diffusers import DDIMScheduler

    from rlalign.sampling.logprob import check_scheduler

    raw = DDIMScheduler.load_config(folder, local_files_only=True)
    overrides = {} if "clip_sample" in raw else {"clip_sample": False}
    scheduler = DDIMScheduler.from_config(raw, **overrides)
    scheduler.set_timesteps(num_steps)
    check_scheduler(scheduler)
    return scheduler


def _force_upcast(path: Path) -> bool:
    cfg = path / "vae" / "config.json"
    return bool(json.loads(cfg.read_text()).get("force_upcast", False)) if cfg.is_file() else False


def _force_zeros(path: Path) -> bool:
    index = path / "model_index.json"
    return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)) if index.is_file() else True


# ---------------------------------------------------------------------------------------------------------------
# LoRA files: what plain diffusers loads, and what seeds a run
# ---------------------------------------------------------------------------------------------------------------


def lora_metadata(unet: Any, adapter: str = "default") -> dict[str, Any]:
    """The peft LoraConfig fields diffusers needs to rebuild the adapter exactly (rank, alpha, targets)."""
    cfg = unet.peft_config[adapter]
    return {
        "r": int(cfg.r),
        "lora_alpha": float(cfg.lora_alpha),
        "target_modules": sorted(cfg.target_modules),
        "rank_pattern": dict(cfg.rank_pattern or {}),
        "alpha_pattern": dict(cfg.alpha_pattern or {}),
    }


def save_peft_lora(path: Path, lora_state: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Our own checkpoint file (bare peft keys) with the LoraConfig in the header, as diffusers writes it."""
    from safetensors.torch import save_file

    header = {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in metadata.items()})}
    save_file({k: v.contiguous() for k, v in lora_state.items()}, str(path), metadata=header)
    return path


def save_diffusers_lora(directory: Path, lora_state: dict[str, Tensor], metadata: dict[str, Any], layout: str) -> Path:
    """Write `pipe.load_lora_weights(directory)`'s format: peft keys under `unet.`, plus the LoraConfig as metadata.

    diffusers' older key format (`convert_state_dict_to_diffusers`) made `load_lora_weights` drop every attention
    LoRA (to_q/k/v/out) of our U-Nets with only a warning; peft keys with the adapter metadata load every module
    with its exact alpha/rank scale (tests/component/test_lora_export.py compares U-Net outputs).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if layout == "sdxl" else StableDiffusionPipeline
    pipeline.save_lora_weights(
        directory,
        unet_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in lora_state.items()},
        unet_lora_adapter_metadata=metadata,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return directory


def lora_file(path: Path) -> Path:
    """The LoRA file a path names: itself, or in a directory (a checkpoint's diffusers_lora/ first)."""
    if path.is_file():
        return path
    for candidate in (path / "diffusers_lora" / LORA_WEIGHT_NAME, path / LORA_WEIGHT_NAME):
        if candidate.is_file():
            return candidate
    found = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no LoRA .safetensors file at {path}")
    return found[0]


def read_lora_file(source: str | Path) -> tuple[dict[str, Tensor], dict[str, float]]:
    """(U-Net LoRA state in peft key form, LoRA scale alpha/r per module prefix) from a file or directory.

    Reads through diffusers' own `lora_state_dict`, so whatever `pipe.load_lora_weights` accepts works here: our
    exports, diffusers/peft training scripts' `pytorch_lora_weights.safetensors`, older diffusers and kohya keys.
    The scale comes from the LoRA metadata, from kohya-style network alphas, or is 1 (diffusers' default).
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    path = lora_file(Path(source).expanduser())
    state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
        str(path.parent), weight_name=path.name, return_lora_metadata=True
    )
    if not any(k.startswith(("unet.", "text_encoder")) for k in state):
        state = {f"unet.{k}": v for k, v in state.items()}  # a bare peft U-Net file (our adapter_model.safetensors)
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise ValueError(f"{source} holds no U-Net LoRA tensors (keys like {list(state)[:2]})")
    unet_state = convert_unet_state_dict_to_peft(unet_state)
    ranks = {k.rsplit(".lora_A.", 1)[0]: v.shape[0] for k, v in unet_state.items() if ".lora_A." in k}
    meta = {k.removeprefix("unet."): v for k, v in (metadata or {}).items()}
    if "lora_alpha" in meta and "r" in meta:
        scales = {m: float(meta["lora_alpha"]) / float(meta["r"]) for m in ranks}
    else:
        alpha_of = {k.removeprefix("unet.").removesuffix(".alpha"): float(v) for k, v in (alphas or {}).items()}
        scales = {m: alpha_of.get(m, float(r)) / float(r) for m, r in ranks.items()}
    return unet_state, scales


def load_lora_into(unet: Any, source: str | Path) -> None:
    """Seed the U-Net's LoRA from a file trained elsewhere, rescaled so its effect equals the file's exactly.

    Every adapter tensor must be present with this run's rank; B is multiplied by (file scale / our scale) so a
    LoRA saved with another alpha gives the same U-Net output here.
    """
    from peft import set_peft_model_state_dict

    state, scales = read_lora_file(source)
    cfg = unet.peft_config["default"]
    ours = float(cfg.lora_alpha) / float(cfg.r)
    for key in list(state):
        if ".lora_B." in key:
            state[key] = state[key].float() * (scales[key.rsplit(".lora_B.", 1)[0]] / ours)
    try:
        result = set_peft_model_state_dict(unet, state)
    except RuntimeError as err:  # size mismatch: another rank
        raise ValueError(f"lora.init_from={source} does not fit lora.rank={cfg.r}: {str(err).splitlines()[0]}") from err
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"lora.init_from={source} does not fit this U-Net's LoRA (rank {cfg.r}, targets "
            f"{sorted(cfg.target_modules)}): {len(missing)} adapter tensors missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for name, p in unet.named_parameters():  # the file may be bf16: keep fp32 master weights
        if "lora_" in name:
            p.data = p.data.float()


# ---------------------------------------------------------------------------------------------------------------
# Checks on the driver, before Ray starts (rlalign.config.preflight): read headers only, never the U-Net
# ---------------------------------------------------------------------------------------------------------------

# a LoRA tensor's name: peft lora_A/lora_B, diffusers' older lora.down/lora.up, kohya lora_down/lora_up
_LORA_KEY = re.compile(r"lora[._](?:A|B|down|up)\b")
_LORA_DOWN = re.compile(r"lora[._](?:A|down)\b")
_TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")  # diffusers / kohya text-encoder LoRA keys


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from a .safetensors header; ValueError when it is not one, or truncated.

    safetensors checks that the header's offsets cover the file exactly, so a cut-off download fails here, with no
    tensor read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a complete .safetensors file (truncated or corrupt): {err}") from err


def check_lora_file(source: str | Path, rank: int | None = None) -> Path:
    """The LoRA file `source` names (file or directory, as `lora_file`), checked without loading any model.

    Raises FileNotFoundError when there is none, ValueError when it is truncated or corrupt, holds no U-Net LoRA
    tensors (e.g. a full U-Net or a text-encoder-only LoRA), or, with `rank`, adapters of another rank. Whether
    its modules match the U-Net is checked where the U-Net loads (`load_lora_into`).
    """
    path = lora_file(Path(source).expanduser())
    shapes = safetensors_shapes(path)
    lora = {k: v for k, v in shapes.items() if _LORA_KEY.search(k) and not k.startswith(_TEXT_ENCODER_PREFIXES)}
    if not lora:
        raise ValueError(
            f"{path} holds no U-Net LoRA tensors (no lora_A/lora_B or lora_down/lora_up keys; keys like "
            f"{sorted(shapes)[:3]}): not a LoRA, or a text-encoder-only one"
        )
    ranks = sorted({v[0] for k, v in lora.items() if _LORA_DOWN.search(k) and v})
    if rank is not None and ranks and ranks != [rank]:
        raise ValueError(f"{path} holds LoRA adapters of rank {', '.join(map(str, ranks))}; lora.rank is {rank}")
    return path


def check_checkpoint(path: Path, rank: int | None = None) -> None:
    """A resume checkpoint is complete and readable: JSON state, LoRA file and optimizer state (no pickle code).

    optimizer.pt is opened with `torch.load(weights_only=True)`, as the learner does, so a checkpoint holding
    pickled objects is refused here, before any actor starts, and nothing in it runs.
    """
    import pickle

    from rlalign.learner import LORA_FILE

    files = ("state.json", "learner.json", LORA_FILE, "optimizer.pt")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    for name in ("state.json", "learner.json"):
        try:
            state = json.loads((path / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"checkpoint {path}: {name} is not valid JSON (truncated or corrupt): {err}") from err
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint {path}: {name} must hold a JSON object, got {type(state).__name__}")
    try:
        check_lora_file(path / LORA_FILE, rank)
    except ValueError as err:
        raise ValueError(f"checkpoint {path}: {err}") from err
    try:
        torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"checkpoint {path}: optimizer.pt holds pickled Python objects besides tensors; refused without running "
            f"them ({_first_line(err)})"
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ValueError(f"checkpoint {path}: optimizer.pt is truncated or corrupt: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    """The useful line of a long library message: torch's unpickler puts its verdict last, behind advice."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    verdict = [line for line in lines if line.startswith(("WeightsUnpickler error", "Unsupported global"))]
    line = (verdict or lines or [type(err).__name__])[0]
    return line.split(" Please use", 1)[0][:300]  # not the advice to allowlist the global
