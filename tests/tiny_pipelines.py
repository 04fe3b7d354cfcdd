"""Tiny SD1.5-layout and SDXL-layout diffusers pipelines, random-init and saved offline (seconds, a few MB).

They have the real folder layouts (`save_pretrained`), the real component classes (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel / CLIPTextModelWithProjection, CLIPTokenizer) and the real conditioning paths: SD1.5
with conv `proj_in` (use_linear_projection False), SDXL with two text encoders, pooled embeddings, `add_time_ids`
and an Euler scheduler config as Stability ships it. The tokenizer is the digits model's own BPE vocabulary, so
nothing downloads. Used by component, e2e and GPU tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TEXT_WIDTH = 32  # hidden size of each tiny CLIP text encoder
MAX_TOKENS = 16  # tokenizer max length (SD uses 77; shorter keeps tests fast)
SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)


def _tokenizer() -> Any:
    from rlalign.models.digits import make_tokenizer

    return make_tokenizer(MAX_TOKENS)


def _text_config(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        projection_dim=TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def build_sd15(out_dir: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline directory: 8x8 latents, 16x16 images, conv proj_in like SD1.5."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def build_sdxl(out_dir: Path, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline directory: two text encoders (32 + 32 wide), pooled 32, time ids, Euler config."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_WIDTH,  # both encoders' hidden states side by side
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TEXT_WIDTH,  # time ids + pooled text embedding
    )
    # Stability ships an Euler config (no clip_sample key): rlalign reads it as DDIM without clipping
    scheduler = EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer)),
        tokenizer=tokenizer,
        tokenizer_2=_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out_dir)
    return out_dir
