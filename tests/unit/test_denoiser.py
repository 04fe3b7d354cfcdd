"""UNetDenoiser: adapters toggle, fp32 outputs, NCP embedding hook hygiene."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, randomize_lora

from rlalign.models.denoiser import adapters_disabled


def _inputs(n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([500] * n), torch.randn(n, 3, 8, generator=g)


def test_fresh_lora_equals_reference_bit_for_bit(tiny_model) -> None:
    x, t, c = _inputs()
    out = tiny_model.predict(x, t, c)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, tiny_model.predict(x, t, c, adapters=False))
    assert tiny_model.alphas_cumprod.dtype == torch.float64


def test_adapters_toggle_and_restore(tiny_model) -> None:
    x, t, c = _inputs()
    base = tiny_model.predict(x, t, c, adapters=False)
    randomize_lora(tiny_model)
    on = tiny_model.predict(x, t, c)
    assert not torch.allclose(on, base)
    torch.testing.assert_close(tiny_model.predict(x, t, c, adapters=False), base)
    with adapters_disabled(tiny_model.unet), adapters_disabled(tiny_model.unet):  # nesting stays disabled
        torch.testing.assert_close(tiny_model.unet(x, t, encoder_hidden_states=c).sample, base)
    torch.testing.assert_close(tiny_model.predict(x, t, c), on)  # re-enabled afterwards
    with pytest.raises(RuntimeError), adapters_disabled(tiny_model.unet):
        raise RuntimeError("boom")
    torch.testing.assert_close(tiny_model.predict(x, t, c), on)  # re-enabled after an exception too


@pytest.mark.parametrize("layer", ["mid", "down"])
def test_embed_hook_hygiene_no_up_path_input_grads_only(layer: str) -> None:
    model = make_model(layer=layer)
    randomize_lora(model)
    x, t, c = _inputs()
    before = model.predict(x, t, c)
    up_calls = []
    h = model.unet.up_blocks[0].register_forward_hook(lambda *a: up_calls.append(1))
    xin = x.clone().requires_grad_(True)
    f = model.embed(xin, t, c)
    h.remove()
    assert up_calls == []  # the up path never ran
    assert f.dtype == torch.float32 and f.shape == (2, 16, 4, 4)
    assert not model.unet.mid_block._forward_hooks and not model.unet.mid_block._forward_pre_hooks
    f.pow(2).mean().backward()
    assert xin.grad is not None and xin.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.unet.parameters())  # E gets no gradient (LoRA is off, base frozen)
    torch.testing.assert_close(model.predict(x, t, c), before)  # later policy calls are unaffected
    # E is the frozen base: independent of the LoRA
    randomize_lora(model, seed=5)
    torch.testing.assert_close(model.embed(x, t, c), f.detach())


def test_embed_removes_hook_when_forward_fails(tiny_model) -> None:
    x, t, _ = _inputs()
    with pytest.raises(Exception):  # noqa: B017 - wrong text width fails inside the U-Net, before mid_block
        tiny_model.embed(x, t, torch.randn(2, 3, 5))
    assert not tiny_model.unet.mid_block._forward_hooks and not tiny_model.unet.mid_block._forward_pre_hooks
    assert tiny_model.embed(x, t, torch.randn(2, 3, 8)).shape == (2, 16, 4, 4)


def test_bad_layer_raises(tiny_unet, tiny_scheduler) -> None:
    from rlalign.models.denoiser import UNetDenoiser

    with pytest.raises(ValueError, match="layer"):
        UNetDenoiser(tiny_unet, tiny_scheduler, layer="up")
