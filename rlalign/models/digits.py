"""The embedded default text-to-image model, trained by our own code on scikit-learn's bundled digits.

No model hub is reachable, so rlalign builds its own small Stable-Diffusion-layout pipeline (CLIP tokenizer + tiny
CLIP text encoder, AutoencoderKL, UNet2DConditionModel with cross-attention, DDIM scheduler) on `load_digits`
upscaled to 32x32 RGB. Training stops when measured *prompt accuracy* (the digit classifier reads the digit the
prompt asked for) lands in a target band, so the base model is moderate and alignment has room to improve it.

The result is a genuine diffusers folder: `StableDiffusionPipeline.from_pretrained(dir, safety_checker=None,
requires_safety_checker=False)` loads it offline. Beside it: `digit_classifier/` (the "digit_prompt" reward) and
`build_info.json`.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reward_servers.digit_prompt import (
    DIGIT_WORDS,
    DigitPromptReward,
    load_digits_tensor,
    train_digit_classifier,
)
from reward_servers.pickscore import bytes_to_unicode  # the CLIP byte alphabet, written once

__all__ = [
    "DIGITS_MODEL_VERSION",
    "DIGIT_WORDS",
    "PROMPT_TEMPLATES",
    "SPECS",
    "DigitsModelSpec",
    "all_digit_prompts",
    "build_digits_model",
    "default_cache_dir",
    "digit_prompt",
    "ensure_digits_model",
    "load_digit_reward",
    "load_digits_pipeline",
    "measure_prompt_accuracy",
    "sample_digits",
    "sample_prompts",
    "with_spec",
]

# Bump when anything that changes the built weights or the tokenizer ids changes: the cache directory is versioned.
DIGITS_MODEL_VERSION = 1
CLASSIFIER_DIR = "digit_classifier"
BUILD_INFO = "build_info.json"

# "{word}" -> "seven", "{num}" -> "7". Used for training and by the run's prompt source.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {word}",
    "{num}",
    "the number {word}",
    "a drawing of the digit {num}",
)
# Extra words in the tokenizer vocabulary (single tokens), so nearby phrasings stay cheap to tokenize.
_EXTRA_WORDS = ("an", "image", "picture", "photo", "written", "hand", "number", "digit", "black", "white")


def digit_prompt(digit: int, template: int = 0) -> str:
    """Prompt for `digit` from PROMPT_TEMPLATES[template] (template taken modulo the number of templates)."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return PROMPT_TEMPLATES[template % len(PROMPT_TEMPLATES)].format(word=DIGIT_WORDS[digit], num=digit)


def all_digit_prompts() -> list[tuple[int, str]]:
    """Every (digit, prompt) pair the model was trained on, digit-major."""
    return [(d, digit_prompt(d, t)) for d in range(10) for t in range(len(PROMPT_TEMPLATES))]


# ----------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsModelSpec:
    """Architecture and training budget. "default" is the shipped model; "tiny" builds in seconds for tests."""

    image_size: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels -> latents at image_size / 4 (8x8)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    unet_heads: int = 4
    text_time_embedding: bool = False  # also add attention-pooled text to the time embedding (UNet addition_embed)
    norm_groups: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 12  # longest template is 6 words + bos + eos
    classifier_epochs: int = 15
    vae_steps: int = 200
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    unet_batch: int = 128
    unet_lr: float = 1e-3
    uncond_prob: float = 0.1  # empty-prompt dropout for classifier-free guidance
    # The prompt decides the digit only at high noise, where a plain epsilon loss barely sees it (there eps ~ x_t;
    # the x0 error enters scaled by snr): with it the UNet learned to ignore the text (accuracy at chance after 300
    # steps). Truncated-SNR weighting (Salimans & Ho 2022) counts the x0 error instead: eps-loss weight
    # clamp(1 / snr, 1, max_loss_weight). Still an epsilon-prediction model.
    max_loss_weight: float = 20.0
    min_snr_gamma: float | None = None  # optional min-SNR-gamma down-weighting of low-noise steps (Hang et al.)
    timestep_power: float = 1.0  # t = T * u**p, u ~ U(0, 1): p < 1 samples high-noise steps more often
    warmup_steps: int = 20
    first_eval: int = 100
    eval_every: int = 25
    min_eval_every: int = 5
    max_unet_steps: int = 2000
    fixed_unet_steps: int | None = None  # train exactly this many steps, ignore the accuracy band (tiny)
    eval_per_digit: int = 10
    final_per_digit: int = 20
    eval_inference_steps: int = 20
    guidance_scale: float = 3.0
    eta: float = 1.0


SPECS: dict[str, DigitsModelSpec] = {
    "default": DigitsModelSpec(),
    "tiny": DigitsModelSpec(
        image_size=16,
        vae_channels=(8, 16),
        unet_channels=(16, 32),
        unet_heads=2,
        text_width=32,
        text_layers=1,
        text_heads=2,
        classifier_epochs=2,
        vae_steps=10,
        vae_batch=32,
        unet_batch=32,
        warmup_steps=2,
        fixed_unet_steps=10,
        eval_per_digit=1,
        final_per_digit=1,
        eval_inference_steps=4,
    ),
}

# ----------------------------------------------------------------------------------------------------------------
# Tokenizer: a CLIP BPE vocabulary of our own (byte alphabet + the merges that make each known word one token)
# ----------------------------------------------------------------------------------------------------------------


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _train_bpe(words: Sequence[str]) -> list[tuple[str, str]]:
    """Greedy BPE until every word is one symbol. Replaying merges by rank (what CLIP BPE does) reproduces this.

    Ties break lexicographically, so the merge list (hence every token id) is a pure function of the word list.
    """
    segments = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted(set(words)) if len(w) > 1}
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in segments.values():
            counts.update(itertools.pairwise(symbols))
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        segments = {w: _merge_pair(s, pair) for w, s in segments.items()}


def tokenizer_words() -> list[str]:
    """The words that are single tokens: everything in the templates plus a few neighbours."""
    words = {w for t in PROMPT_TEMPLATES for w in t.split() if "{" not in w}
    return sorted(words | set(DIGIT_WORDS) | set(_EXTRA_WORDS))


def write_tokenizer_files(directory: Path) -> None:
    """Write vocab.json + merges.txt (CLIP format) into `directory`."""
    merges = _train_bpe(tokenizer_words())
    base = list(bytes_to_unicode().values())
    tokens = [*base, *(b + "</w>" for b in base), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def make_tokenizer(max_length: int) -> Any:
    """A CLIPTokenizer over our vocabulary.

    Loaded with `from_pretrained(dir)`: in transformers 5, `CLIPTokenizer(vocab_file=..., merges_file=...)` is
    silently ignored (a 3-token vocabulary).
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


# ----------------------------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------------------------


def make_text_encoder(spec: DigitsModelSpec, tokenizer: Any) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_width,
        intermediate_size=2 * spec.text_width,
        projection_dim=spec.text_width,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # != 2, so pooling finds the real eos id (not the legacy argmax)
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config)
    # CLIP's default init (std 0.02) makes every prompt's hidden states nearly identical after the layer norms, and
    # the UNet learned to ignore the text before the text encoder separated the prompts (no accuracy gain in 300
    # steps, while a free per-prompt embedding table did learn). Unit-scale token embeddings separate them from step 0.
    nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    return model


def make_vae(spec: DigitsModelSpec) -> nn.Module:
    from diffusers import AutoencoderKL

    n = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.norm_groups,
        sample_size=spec.image_size,
    )


def latent_size(spec: DigitsModelSpec) -> int:
    return spec.image_size // 2 ** (len(spec.vae_channels) - 1)


def make_unet(spec: DigitsModelSpec) -> nn.Module:
    from diffusers import UNet2DConditionModel

    n = len(spec.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent_size(spec),
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        # cross-attention at full latent resolution and in the mid block; the lowest level is plain resnets
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=spec.unet_channels,
        layers_per_block=1,
        cross_attention_dim=spec.text_width,
        attention_head_dim=spec.unet_heads,  # diffusers' historical name: this is the number of heads
        norm_num_groups=spec.norm_groups,
        addition_embed_type="text" if spec.text_time_embedding else None,
    )


_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def make_scheduler() -> Any:
    """The inference scheduler saved with the pipeline (DDIM, leading spacing, steps_offset=1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_SCHEDULE, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def make_pipeline(vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, unet: nn.Module) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_digits_pipeline(path: str | Path) -> Any:
    """Load a built digits model directory as a StableDiffusionPipeline (offline, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a digits model directory (no model_index.json)")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_digit_reward(path: str | Path, **kwargs: Any) -> DigitPromptReward:
    """The "digit_prompt" reward shipped with a built digits model directory."""
    return DigitPromptReward.from_dir(Path(path) / CLASSIFIER_DIR, **kwargs)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Sampling and prompt accuracy
# ----------------------------------------------------------------------------------------------------------------


def sample_prompts(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
    batch_size: int = 128,
) -> np.ndarray:
    """Plain diffusers DDIM sampling, one seeded generator per image -> uint8 [B, H, W, 3].

    Per-image generators make image i depend only on (prompt i, seed i), not on the batch it was drawn in.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        images = pipe(
            list(prompts[chunk]),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds[chunk]],
            output_type="np",
        ).images
        out.append(np.round(np.asarray(images) * 255).clip(0, 255).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def sample_digits(
    pipe_or_dir: Any,
    digits: Sequence[int],
    seeds: Sequence[int],
    *,
    templates: Sequence[int] | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Sample one image per (digit, seed); prompt template i % len(PROMPT_TEMPLATES) unless `templates` is given."""
    pipe = load_digits_pipeline(pipe_or_dir) if isinstance(pipe_or_dir, (str, Path)) else pipe_or_dir
    templates = range(len(digits)) if templates is None else templates
    if len(templates) != len(digits):
        raise ValueError(f"need one template per digit: {len(digits)} digits, {len(templates)} templates")
    prompts = [digit_prompt(d, t) for d, t in zip(digits, templates, strict=True)]
    return sample_prompts(pipe, prompts, seeds, **kwargs)


def measure_prompt_accuracy(
    pipe: Any,
    reward: DigitPromptReward,
    *,
    per_digit: int = 10,
    seed_offset: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """Sample `per_digit` images of every digit (templates cycling) and return the classifier's accuracy.

    Seeds are `seed_offset + i` over the 10 * per_digit images: use disjoint offsets for stopping checks and for the
    reported accuracy.
    """
    digits = [d for d in range(10) for _ in range(per_digit)]
    templates = [i for _ in range(10) for i in range(per_digit)]
    seeds = [seed_offset + i for i in range(len(digits))]
    images = sample_digits(pipe, digits, seeds, templates=templates, **kwargs)
    correct = reward.predict_digits(images) == np.asarray(digits)
    per = correct.reshape(10, per_digit).mean(1)
    return {"accuracy": float(correct.mean()), "per_digit": [round(float(a), 3) for a in per], "n": len(digits)}


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def _digits_rgb(image_size: int) -> tuple[Tensor, Tensor]:
    """Digits as [N, 3, S, S] in [-1, 1] (grayscale replicated: the VAE is a standard 3-channel RGB one)."""
    images, labels = load_digits_tensor(image_size)
    return (images * 2 - 1).repeat(1, 3, 1, 1), labels


def train_vae(
    spec: DigitsModelSpec, images: Tensor, generator: torch.Generator, advance: Callable[[], None]
) -> tuple[nn.Module, dict[str, float]]:
    """Brief KL-regularised autoencoder training; sets `scaling_factor` = 1 / std of the latents."""
    vae = make_vae(spec)
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.vae_steps, eta_min=spec.vae_lr * 0.05)
    vae.train()
    rec = torch.tensor(0.0)
    for _ in range(spec.vae_steps):
        batch = images[torch.randint(0, len(images), (spec.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        rec = F.mse_loss(vae.decode(z).sample, batch)
        loss = rec + spec.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        advance()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        std = float(posterior.mean.std())  # the UNet trains on posterior means (see _UNetTrainer)
        rec_all = float(F.mse_loss(vae.decode(posterior.mean).sample, images))
        posterior_std = float(posterior.std.mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, {
        "final_batch_mse": float(rec.detach()),
        "recon_mse": rec_all,
        "latent_std": std,
        "posterior_std": posterior_std,
        "scaling_factor": 1.0 / std,
    }


@dataclass
class _Snapshot:
    step: int
    unet: dict[str, Tensor]
    text_encoder: dict[str, Tensor]
    optimizer: dict[str, Any]
    generator: Tensor


class _UNetTrainer:
    """Joint UNet + text-encoder denoising training on cached VAE latents, with exact snapshot/restore."""

    def __init__(
        self, spec: DigitsModelSpec, vae: nn.Module, tokenizer: Any, images: Tensor, labels: Tensor, seed: int
    ) -> None:
        from diffusers import DDPMScheduler

        self.spec = spec
        self.unet, self.text_encoder = make_unet(spec), make_text_encoder(spec, tokenizer)
        self.noise_schedule = DDPMScheduler(**_SCHEDULE)
        self.alphas_cumprod = self.noise_schedule.alphas_cumprod
        self.generator = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            # Posterior means, not samples: this small VAE keeps a large posterior std (~0.5 of the latent std), and
            # sampled latents buried the prompt signal (accuracy stayed at chance for 300+ steps). The decoder was
            # trained on sampled latents, so it decodes the means and nearby points well.
            self.latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        self.labels = labels
        # Every training prompt (10 digits x templates) plus "" (row 0): the text encoder runs once per step on these
        # few rows and the batch gathers from them; same gradients as encoding each sample, far cheaper.
        prompts = [""] + [digit_prompt(d, t) for d in range(10) for t in range(len(PROMPT_TEMPLATES))]
        self.token_ids = tokenizer(
            prompts, padding="max_length", max_length=spec.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=spec.unet_lr, weight_decay=1e-4)
        self.step = 0

    def _lr(self) -> float:
        return self.spec.unet_lr * min(1.0, (self.step + 1) / max(1, self.spec.warmup_steps))

    def train_step(self) -> float:
        spec, g = self.spec, self.generator
        idx = torch.randint(0, len(self.labels), (spec.unet_batch,), generator=g)
        x0 = self.latents[idx]
        templates = torch.randint(0, len(PROMPT_TEMPLATES), (len(idx),), generator=g)
        rows = 1 + self.labels[idx] * len(PROMPT_TEMPLATES) + templates
        rows = torch.where(torch.rand(len(idx), generator=g) < spec.uncond_prob, 0, rows)
        noise = torch.randn(x0.shape, generator=g)
        n_t = self.noise_schedule.config.num_train_timesteps
        u = torch.rand(len(idx), generator=g) ** spec.timestep_power
        t = (u * n_t).long().clamp(0, n_t - 1)
        noisy = self.noise_schedule.add_noise(x0, noise, t)
        context = self.text_encoder(self.token_ids)[0][rows]  # last_hidden_state, exactly what the pipeline uses
        per_sample = (self.unet(noisy, t, context).sample - noise).pow(2).mean(dim=(1, 2, 3))
        snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
        if spec.max_loss_weight > 1:
            per_sample = per_sample * (1 / snr).clamp(1.0, spec.max_loss_weight)
        if spec.min_snr_gamma is not None:
            per_sample = per_sample * snr.clamp(max=spec.min_snr_gamma) / snr
        loss = per_sample.mean()
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        return float(loss.detach())

    def snapshot(self) -> _Snapshot:
        return _Snapshot(
            self.step,
            copy.deepcopy(self.unet.state_dict()),
            copy.deepcopy(self.text_encoder.state_dict()),
            copy.deepcopy(self.opt.state_dict()),
            self.generator.get_state(),
        )

    def restore(self, snap: _Snapshot) -> None:
        self.step = snap.step
        self.unet.load_state_dict(snap.unet)
        self.text_encoder.load_state_dict(snap.text_encoder)
        self.opt.load_state_dict(snap.optimizer)
        self.generator.set_state(snap.generator)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, s in zip(modules, states, strict=True):
            m.train(s)


def _train_to_band(
    trainer: _UNetTrainer,
    measure: Callable[[], float],
    band: tuple[float, float],
    deadline: float,
    on_step: Callable[[float], None],
    on_eval: Callable[[int, float], None],
) -> dict[str, Any]:
    """Train until measured accuracy is inside `band`.

    Accuracy moves fast with steps (docs/algorithms/digits-calibration.md: 53 % at 150 steps, 98 % at 300), so a
    check that lands
    above the band restores the last snapshot below it and replays (bit-identically) with checks twice as often.
    """
    spec, lo, hi = trainer.spec, band[0], band[1]
    history: list[dict[str, float]] = []
    interval, next_eval, snap = spec.eval_every, spec.first_eval, trainer.snapshot()
    stop_reason, acc = "max_steps", float("nan")
    while trainer.step < spec.max_unet_steps:
        on_step(trainer.train_step())
        if time.monotonic() > deadline:
            stop_reason = "max_seconds"
            break
        if trainer.step != next_eval:
            continue
        acc = measure()
        history.append({"step": trainer.step, "accuracy": acc})
        on_eval(trainer.step, acc)
        if lo <= acc <= hi:
            stop_reason = "in_band"
            break
        if acc > hi and interval > spec.min_eval_every:
            interval = max(spec.min_eval_every, interval // 2)
            trainer.restore(snap)
            next_eval = snap.step + interval
            continue
        if acc > hi:
            stop_reason = "overshot"  # jumped across the whole band within min_eval_every steps
            break
        snap, next_eval = trainer.snapshot(), trainer.step + interval
    return {"stop_reason": stop_reason, "stop_accuracy": acc, "history": history, "steps": trainer.step}


def build_digits_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    target_accuracy: tuple[float, float] = (0.45, 0.65),
    max_seconds: float = 330.0,
    size: Literal["default", "tiny"] = "default",
    progress: bool = True,
    spec: DigitsModelSpec | None = None,
    num_threads: int | None = 1,
) -> dict[str, Any]:
    """Train classifier, VAE, then UNet + text encoder; write the pipeline into `out_dir`; return build info.

    Deterministic for a seed (on one machine; the thread count is pinned by `num_threads`). `max_seconds` bounds
    the whole build; if it runs out before accuracy reaches the band the model is still written and
    `build_info["in_band"]` is False. `size="tiny"` trains a fixed handful of steps (seconds; band not enforced).

    One thread by default: these small ops gain almost nothing from a second thread, and on a shared 2-core
    machine two OpenMP threads competing with other processes ran ~10x slower (3.9 s vs 0.33 s per UNet step).
    """
    spec = spec or SPECS[size]
    out_dir = Path(out_dir)
    start = time.monotonic()
    seconds: dict[str, float] = {}
    with _torch_threads(num_threads), torch.random.fork_rng(devices=[]), _progress(progress) as bar:
        torch.manual_seed(seed)  # module initialisation draws from the global RNG; fork_rng keeps the caller's

        t0 = time.monotonic()
        task = bar.add_task("digit classifier", total=1)
        classifier, clf_acc = train_digit_classifier(spec.image_size, seed, epochs=spec.classifier_epochs)
        bar.update(task, advance=1, description=f"digit classifier (held-out {clf_acc:.1%})")
        reward = DigitPromptReward(classifier)
        seconds["classifier"] = time.monotonic() - t0

        t0 = time.monotonic()
        images, labels = _digits_rgb(spec.image_size)
        generator = torch.Generator().manual_seed(seed + 1)
        task = bar.add_task("VAE", total=spec.vae_steps)
        vae, vae_stats = train_vae(spec, images, generator, lambda: bar.advance(task))
        seconds["vae"] = time.monotonic() - t0

        t0 = time.monotonic()
        tokenizer = make_tokenizer(spec.max_length)
        trainer = _UNetTrainer(spec, vae, tokenizer, images, labels, seed)
        pipe = make_pipeline(vae, trainer.text_encoder, tokenizer, trainer.unet)
        sample_kw = {
            "num_inference_steps": spec.eval_inference_steps,
            "guidance_scale": spec.guidance_scale,
            "eta": spec.eta,
        }

        def measure(per_digit: int = spec.eval_per_digit, seed_offset: int = 0) -> float:
            with _eval_mode(trainer.unet, trainer.text_encoder):
                return measure_prompt_accuracy(pipe, reward, per_digit=per_digit, seed_offset=seed_offset, **sample_kw)[
                    "accuracy"
                ]

        total = spec.fixed_unet_steps or spec.max_unet_steps
        task = bar.add_task("UNet + text encoder", total=total)
        loss_ema: list[float] = []

        def on_step(loss: float) -> None:
            loss_ema.append(loss if not loss_ema else 0.95 * loss_ema[-1] + 0.05 * loss)
            bar.update(task, completed=trainer.step)

        def on_eval(step: int, acc: float) -> None:
            bar.update(task, completed=step, description=f"UNet + text encoder (step {step}: accuracy {acc:.0%})")

        if spec.fixed_unet_steps is not None:
            for _ in range(spec.fixed_unet_steps):
                on_step(trainer.train_step())
            run = {"stop_reason": "fixed_steps", "stop_accuracy": measure(), "history": [], "steps": trainer.step}
        else:
            deadline = start + max_seconds
            run = _train_to_band(trainer, measure, target_accuracy, deadline, on_step, on_eval)
        seconds["unet"] = time.monotonic() - t0

        # Report accuracy on seeds the stopping checks never saw (the checks can select a lucky draw).
        t0 = time.monotonic()
        final = measure_prompt_accuracy(
            pipe, reward, per_digit=spec.final_per_digit, seed_offset=1_000_000, **sample_kw
        )
        seconds["final_eval"] = time.monotonic() - t0

    t0 = time.monotonic()
    trainer.unet.eval().requires_grad_(False)
    trainer.text_encoder.eval().requires_grad_(False)
    pipe.save_pretrained(out_dir)
    classifier.save(out_dir / CLASSIFIER_DIR, heldout_accuracy=clf_acc, seed=seed)
    seconds["save"] = time.monotonic() - t0
    seconds["total"] = time.monotonic() - start
    info = {
        "version": DIGITS_MODEL_VERSION,
        "size": size,
        "seed": seed,
        "target_accuracy": list(target_accuracy),
        "in_band": None if spec.fixed_unet_steps is not None else run["stop_reason"] == "in_band",
        "stop_reason": run["stop_reason"],
        "unet_steps": run["steps"],
        "stop_accuracy": run["stop_accuracy"],
        "accuracy_history": run["history"],
        "base_accuracy": final["accuracy"],
        "base_accuracy_per_digit": final["per_digit"],
        "base_accuracy_n": final["n"],
        "final_loss_ema": loss_ema[-1] if loss_ema else None,
        "classifier_heldout_accuracy": clf_acc,
        "vae": vae_stats,
        "params": {
            "unet": n_params(trainer.unet),
            "vae": n_params(vae),
            "text_encoder": n_params(trainer.text_encoder),
            "classifier": n_params(classifier),
        },
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "sampling": sample_kw,
        "spec": asdict(spec),
        "torch_threads": num_threads or torch.get_num_threads(),
    }
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")  # written last: marks a complete build
    return info


# ----------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$RLALIGN_CACHE`, else `~/.cache/rlalign`."""
    env = os.environ.get("RLALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlalign"


def cached_model_dir(cache_dir: str | Path | None = None, seed: int = 0, size: str = "default") -> Path:
    """Where `ensure_digits_model` keeps a build: <cache>/digits-v<version>-<size>-seed<seed>."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"digits-v{DIGITS_MODEL_VERSION}-{size}-seed{seed}"


def ensure_digits_model(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    size: Literal["default", "tiny"] = "default",
    **build_kwargs: Any,
) -> Path:
    """Path of a built digits model, building it on first use.

    The build goes into a temporary sibling directory that is renamed into place only when complete, so an
    interrupted build never leaves a half model (and a leftover temporary directory is removed). If another
    process finished the same build first, its copy wins and ours is discarded.
    """
    final = cached_model_dir(cache_dir, seed, size)
    if (final / BUILD_INFO).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:
        build_digits_model(tmp, seed=seed, size=size, progress=progress, **build_kwargs)
        try:
            os.rename(tmp, final)  # atomic on one filesystem
        except OSError:
            if not (final / BUILD_INFO).is_file():
                raise  # not a lost race: something else is in the way
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def with_spec(size: str = "default", **changes: Any) -> DigitsModelSpec:
    """A named spec with some fields changed (e.g. a shorter budget for experiments)."""
    return replace(SPECS[size], **changes)
