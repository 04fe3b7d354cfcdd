"""The learner's model: a diffusers `UNet2DConditionModel` with a peft LoRA, behind the `DiffusionModel` protocol.

Policy = LoRA on; reference = the same module with adapters disabled (no deep copy); NCP's embedding network =
the reference stopped at the mid block (docs/algorithms/ncp.md 5.1). This module may import diffusers/peft;
`rlalign.algos`
reaches it only through `rlalign.algos.common.DiffusionModel`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import Tensor, nn

from rlalign.models.conditioning import unet_eps


class _StopAtMid(Exception):
    """Raised by the mid-block hook to skip the up path; caught inside `UNetDenoiser.embed` only."""


def _tuner_layers(unet: nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(unet: Any) -> Iterator[None]:
    """Run the frozen base: `disable_adapters()` ... `enable_adapters()` in try/finally.

    A no-op without adapters, or when they are already disabled (nesting never re-enables them early).
    """
    layers = _tuner_layers(unet) if getattr(unet, "_hf_peft_config_loaded", False) else []
    if not layers or any(getattr(m, "disable_adapters", False) for m in layers):
        yield
        return
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


class UNetDenoiser:
    """`DiffusionModel` around a diffusers UNet2DConditionModel (+ LoRA) and a DDIMScheduler.

    unet: the U-Net, LoRA already added (`rlalign.models.loading.attach_lora`); scheduler: a DDIMScheduler with
    `set_timesteps(T)` called (the sampling grid); layer: "mid" (output of mid_block) or "down" (its input) for NCP;
    dtype: the base weights' dtype (bf16/fp16 run under autocast beside the fp32 LoRA; None: the U-Net's).
    `cond` is the packed conditioning of `rlalign/models/conditioning.py` (SD1.5 and SDXL alike).
    """

    def __init__(self, unet: Any, scheduler: Any, *, layer: str = "mid", dtype: torch.dtype | None = None) -> None:
        if layer not in ("mid", "down"):
            raise ValueError(f"layer must be 'mid' or 'down', got {layer!r}")
        self.unet = unet
        self.scheduler = scheduler
        self.layer = layer
        self.dtype = dtype or unet.dtype
        self.rows = 0  # U-Net forward rows so far (policy, reference and NCP's E alike): the learner's cost
        self.grad_rows = 0  # of which ran with autograd on (a backward follows)
        device = next(unet.parameters()).device
        self.alphas_cumprod: Tensor = torch.as_tensor(scheduler.alphas_cumprod).to(device, torch.float64)

    @property
    def device(self) -> torch.device:
        return torch.device(next(self.unet.parameters()).device)

    def _call(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        self.rows += x.shape[0]
        self.grad_rows += x.shape[0] if torch.is_grad_enabled() else 0
        return unet_eps(self.unet, x, t, cond, dtype=self.dtype)

    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor, *, adapters: bool = True) -> Tensor:
        """U-Net output (eps or v: the scheduler's prediction type), x_t [B,C,h,w], t [B], cond [B,L',D] -> float32.

        adapters=False is the frozen reference (wrap the call in torch.no_grad() yourself).
        """
        if adapters:
            return self._call(x_t, t, cond)
        with adapters_disabled(self.unet):
            return self._call(x_t, t, cond)

    def embed(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """NCP's E(x, t, c): frozen base U-Net features at the mid block, fp32 (docs/algorithms/ncp.md 1.2, 5.1).

        x [n,C,h,w], t [n] or [], cond [n,L,D] -> [n,C_mid,h',w']. Adapters off, autocast off, the up path never
        runs (a hook raises `_StopAtMid`; it is removed in `finally`). Gradients flow to `x` only: `attach_lora`
        freezes every base weight. Refuses low-precision weights: E compares two close latents, and in bf16 most
        elements of the two embeddings round to the same value (docs/precision.md; config validation refuses
        ncp_* with learner.dtype != float32 before any actor starts).
        """
        if self.dtype != torch.float32:
            raise ValueError(f"NCP's embedding needs float32 U-Net weights, got {self.dtype} (learner.dtype)")
        mid = self.unet.mid_block
        if mid is None:
            raise ValueError("NCP needs a U-Net with a mid_block")
        box: dict[str, Tensor] = {}

        def on_mid(_m: nn.Module, _args: Any, output: Any) -> None:
            box["f"] = output[0] if isinstance(output, tuple) else output
            raise _StopAtMid

        def before_mid(_m: nn.Module, args: Any, kwargs: Any) -> None:
            box["f"] = args[0] if args else kwargs["hidden_states"]
            raise _StopAtMid

        if self.layer == "mid":
            handle = mid.register_forward_hook(on_mid)
        else:
            handle = mid.register_forward_pre_hook(before_mid, with_kwargs=True)
        try:
            autocast_off = torch.autocast(device_type=self.device.type, enabled=False)
            # _StopAtMid is raised by the hook: the up path is skipped
            with adapters_disabled(self.unet), autocast_off, suppress(_StopAtMid):
                self._call(x, t, cond)
        finally:
            handle.remove()
        if "f" not in box:
            raise RuntimeError("the mid-block hook did not fire: U-Net forward never reached mid_block")
        return box.pop("f").float()
