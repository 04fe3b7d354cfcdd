"""Text conditioning as ONE tensor per row, for SD1.5 and SDXL alike, and the U-Net call that reads it.

Every algorithm, record and micro-batch slicer in rlalign treats conditioning as a tensor `cond [B, L', D]` whose
rows it may slice, repeat or concatenate. SD1.5 needs only the text encoder's hidden states `[B, 77, D]`. SDXL
also needs, per row, the second encoder's pooled embedding `[B, P]` (P = 1280) and the six `add_time_ids`
(original size, crop offset, target size). Rather than thread a second and third tensor through every record and
algorithm, SDXL's extras are **packed as extra tokens** at the end of `cond`:

    cond = cat([hidden [B, L, D], extra [B, n, D]], dim=1),   extra = pad(cat([pooled, time_ids]), n * D)

with `n = ceil((P + 6) / D)` (one token for SDXL: 1286 <= 2048). `split_cond(cond, unet_config)` undoes it; it reads
P and D from the U-Net's own config, so a packed tensor carries no side information. For SD1.5 (`addition_embed_type`
not "text_time") `n = 0` and `cond` is exactly the hidden states. Row operations (slice, repeat, cat, mean over
rows for CFG's unconditional row) commute with packing, which is why it is safe for every algorithm.

`unet_eps` is the single place a U-Net is called (sampler and learner): weights may be bf16/fp16 while trainable
LoRA parameters stay float32, so the forward runs under autocast in the weights' dtype and returns float32.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

TIME_IDS = 6  # SDXL add_time_ids: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)


def pooled_dim(unet_config: Any) -> int:
    """P: width of the pooled text embedding the U-Net's added conditioning expects (0 for SD1.5 layouts)."""
    if getattr(unet_config, "addition_embed_type", None) != "text_time":
        return 0
    total = int(unet_config.projection_class_embeddings_input_dim)
    return total - TIME_IDS * int(unet_config.addition_time_embed_dim)


def extra_tokens(unet_config: Any) -> int:
    """n: how many tokens the packed pooled embedding + time ids take (0 for SD1.5)."""
    p = pooled_dim(unet_config)
    return 0 if p == 0 else math.ceil((p + TIME_IDS) / int(unet_config.cross_attention_dim))


def pack_cond(hidden: Tensor, pooled: Tensor | None, time_ids: Tensor | None) -> Tensor:
    """hidden [B, L, D], pooled [B, P], time_ids [B, 6] -> cond [B, L + n, D]; SD1.5 (pooled None): hidden."""
    if pooled is None:
        return hidden
    if time_ids is None:
        raise ValueError("SDXL conditioning needs time_ids beside the pooled embedding")
    b, _, d = hidden.shape
    flat = torch.cat([pooled.to(hidden.dtype), time_ids.to(hidden.dtype)], dim=1)  # [B, P + 6]
    n = math.ceil(flat.shape[1] / d)
    flat = torch.nn.functional.pad(flat, (0, n * d - flat.shape[1]))
    return torch.cat([hidden, flat.reshape(b, n, d)], dim=1)


def split_cond(cond: Tensor, unet_config: Any) -> tuple[Tensor, dict[str, Tensor] | None]:
    """cond [B, L + n, D] -> (encoder_hidden_states [B, L, D], added_cond_kwargs or None for SD1.5)."""
    n = extra_tokens(unet_config)
    if n == 0:
        return cond, None
    p = pooled_dim(unet_config)
    hidden, extra = cond[:, :-n], cond[:, -n:].reshape(cond.shape[0], -1)
    return hidden, {"text_embeds": extra[:, :p], "time_ids": extra[:, p : p + TIME_IDS]}


def autocast_for(device: torch.device, dtype: torch.dtype) -> Any:
    """Autocast in the base weights' dtype (bf16/fp16), so fp32 LoRA layers run beside them; off for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def unet_eps(unet: Any, x: Tensor, t: Tensor, cond: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """U-Net output for x [B,C,h,w], t [] or [B], packed cond [B,L',D] -> [B,C,h,w] float32.

    `dtype` is the base weights' dtype (default: the U-Net's); inputs are cast to it and the call runs under
    autocast in it, so float32 LoRA parameters beside bf16/fp16 weights work and receive float32 gradients.
    """
    dtype = dtype or unet.dtype
    device = unet.device
    hidden, added = split_cond(cond.to(device), unet.config)
    kwargs: dict[str, Any] = {"encoder_hidden_states": hidden.to(dtype)}
    if added is not None:
        kwargs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in added.items()}
    with autocast_for(device, dtype):
        out = unet(x.to(device, dtype), t.to(device), **kwargs)
    sample = out.sample if hasattr(out, "sample") else out[0]
    return sample.float()
