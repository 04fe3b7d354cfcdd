"""NCP-DPO / CPO / SFT: embedding-space preference losses through the frozen base U-Net's mid block."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ZeroDataOracle,
    adam_step,
    lora_params,
    make_model,
    make_scored,
    microbatch_mean,
    randomize_lora,
    run_algo,
)

from rlalign.algos import get_algorithm
from rlalign.algos.ncp import (
    NCPCfg,
    build_batch,
    feature_distance,
    ncp_cpo_loss,
    ncp_dpo_loss,
    ncp_sft_loss,
)
from rlalign.sampling.logprob import add_noise, ddpm_step

DPO, CPO, SFT = get_algorithm("ncp_dpo"), get_algorithm("ncp_cpo"), get_algorithm("ncp_sft")


def _batch(cfg: NCPCfg, seed: int = 0, **kw):
    return build_batch(make_scored(**kw), cfg, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["prev", "x0", "uniform"])
def test_ncp_dpo_is_ln2_on_fresh_lora(tiny_model, mode: str) -> None:
    cfg = NCPCfg(target_mode=mode)
    out = run_algo(DPO, tiny_model, _batch(cfg), cfg)
    assert abs(float(out.loss.detach()) - math.log(2)) < 1e-6
    assert float(out.metrics["pref/logit_abs_mean"]) < 1e-6


def test_hand_computed_cases_and_gradient_signs() -> None:
    # DPO: beta=10, ref gap 0, policy gap 0.4 - 0.5 = -0.1 -> logits 0.1 -> loss -log sigmoid(1)
    same = torch.tensor([0.5])
    out = ncp_dpo_loss(torch.tensor([0.4]), same, same, same, beta=10.0)
    torch.testing.assert_close(out.loss, -F.logsigmoid(torch.tensor(1.0)))
    # CPO: -log sigmoid(beta (d_l - d_w)) + lam * beta * d_w = -log sigmoid(1) + 2 * 10 * 0.4
    out = ncp_cpo_loss(torch.tensor([0.4]), same, beta=10.0, nll_weight=2.0)
    torch.testing.assert_close(out.loss, -F.logsigmoid(torch.tensor(1.0)) + 8.0)
    torch.testing.assert_close(ncp_sft_loss(torch.tensor([0.2, 0.4])).loss, torch.tensor(0.3))
    dw, dl = torch.rand(4, requires_grad=True), torch.rand(4, requires_grad=True)
    ncp_dpo_loss(dw, dl, torch.rand(4), torch.rand(4), beta=5.0).loss.backward()
    assert torch.all(dw.grad > 0) and torch.all(dl.grad < 0)
    dw.grad = dl.grad = None
    ncp_cpo_loss(dw, dl, beta=5.0, nll_weight=0.0).loss.backward()
    assert torch.all(dw.grad > 0) and torch.all(dl.grad < 0)


def test_swap_flips_accuracy_and_microbatch_mean() -> None:
    g = torch.Generator().manual_seed(0)
    d = [torch.rand(16, generator=g) for _ in range(4)]
    a = ncp_dpo_loss(d[0], d[1], d[2], d[3], beta=3.0).metrics["pref/implicit_acc"]
    b = ncp_dpo_loss(d[1], d[0], d[3], d[2], beta=3.0).metrics["pref/implicit_acc"]
    assert 0 < float(a) < 1
    torch.testing.assert_close(a + b, torch.tensor(1.0))
    for chunks in (2, 4):
        parts = [ncp_dpo_loss(*(x.chunk(chunks)[i] for x in d), beta=3.0).loss for i in range(chunks)]
        torch.testing.assert_close(torch.stack(parts).mean(), ncp_dpo_loss(*d, beta=3.0).loss)


def test_zero_distance_when_prediction_equals_target(tiny_model) -> None:
    g = torch.Generator().manual_seed(1)
    x0, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    c = torch.randn(2, 3, 8, generator=g)
    t = torch.tensor([500, 20])
    ac = tiny_model.alphas_cumprod
    x_t = add_noise(ac, x0, eps, t)
    pred, tgt = ddpm_step(ac, eps, t, x_t, z), ddpm_step(ac, eps, t, x_t, z)
    assert torch.equal(pred, tgt)
    d = feature_distance(tiny_model.embed(pred, t - 1, c), tiny_model.embed(tgt, t - 1, c))
    assert torch.equal(d, torch.zeros(2))
    other = feature_distance(tiny_model.embed(pred + 0.1, t - 1, c), tiny_model.embed(tgt, t - 1, c), "channel_rms")
    assert torch.all(other > 0)


def test_embedding_network_gets_no_gradient_and_step_improves() -> None:
    model = make_model()
    cfg = NCPCfg(beta=2500.0)
    b = _batch(cfg)
    base = {n: p.detach().clone() for n, p in model.unet.named_parameters() if "lora_" not in n}
    before = adam_step(model, lambda: run_algo(DPO, model, b, cfg).loss, lr=1e-2)
    for n, p in model.unet.named_parameters():
        if "lora_" not in n:
            assert p.grad is None, n  # E (the frozen base) and the reference receive nothing
            assert torch.equal(p, base[n])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params(model))
    after = run_algo(DPO, model, b, cfg)
    assert before == pytest.approx(math.log(2), abs=1e-6)
    assert float(after.metrics["pref/logit_mean"]) > 0 and float(after.loss.detach()) < before
    torch.testing.assert_close(microbatch_mean(DPO, model, b, cfg, 2), after.loss.detach())


@pytest.mark.parametrize("algo", [CPO, SFT])
def test_cpo_and_sft_step_lower_winner_distance(algo) -> None:
    model = make_model()
    randomize_lora(model, scale=0.05)
    cfg = NCPCfg(beta=2500.0, cpo_nll_weight=10.0)
    b = _batch(cfg)
    d_before = algo.forward(model, b, cfg).d_pol_w.detach()
    adam_step(model, lambda: run_algo(algo, model, b, cfg).loss, lr=1e-3)
    assert float(algo.forward(model, b, cfg).d_pol_w.detach().mean()) < float(d_before.mean())


class _Counting:
    """Wraps a model and counts predict/embed rows and reference calls (NCP-SFT economy)."""

    def __init__(self, model) -> None:
        self.m, self.scheduler, self.alphas_cumprod = model, model.scheduler, model.alphas_cumprod
        self.predict_rows: list[int] = []
        self.embed_rows: list[int] = []
        self.ref_calls = 0

    def predict(self, x_t, t, cond, *, adapters=True):
        self.predict_rows.append(x_t.shape[0])
        self.ref_calls += not adapters
        return self.m.predict(x_t, t, cond, adapters=adapters)

    def embed(self, x, t, cond):
        self.embed_rows.append(x.shape[0])
        return self.m.embed(x, t, cond)


def test_sft_economy_and_dpo_call_counts(tiny_model) -> None:
    cfg = NCPCfg()
    b = _batch(cfg, groups=3)
    sft = _Counting(tiny_model)
    SFT.loss(SFT.forward(sft, b, cfg), cfg)
    assert sft.predict_rows == [3] and sft.embed_rows == [3, 3] and sft.ref_calls == 0
    dpo = _Counting(tiny_model)
    DPO.loss(DPO.forward(dpo, b, cfg), cfg)
    assert dpo.predict_rows == [6, 6] and dpo.ref_calls == 1 and dpo.embed_rows == [6, 6, 6]


def test_build_batch_t_range_and_shared_noise() -> None:
    cfg = NCPCfg(t_min=1, t_max=3)
    b = build_batch(make_scored(groups=6, per_group=2), cfg, torch.Generator().manual_seed(0))
    assert int(b.t.min()) >= 1 and int(b.t.max()) <= 3
    assert b.eps.shape == b.x0_w.shape == b.z.shape  # one eps, z per pair: shared by winner and loser
    with pytest.raises(ValueError):
        NCPCfg(t_min=0)  # prev mode: t = 0 gives no signal
    with pytest.raises(ValueError):
        NCPCfg(target_mode="next")


@pytest.mark.parametrize("algo", [DPO, CPO])
def test_forward_keeps_winner_and_loser_halves_apart(tiny_scheduler, algo) -> None:
    from conftest import WinnerFirstProbe, winner_first_batch

    cfg = NCPCfg(t_min=100)
    batch = winner_first_batch(_batch(cfg))
    fwd = algo.forward(WinnerFirstProbe(tiny_scheduler), batch, cfg)
    assert torch.all(fwd.d_pol_w < fwd.d_pol_l)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("mode", ["prev", "x0"])
def test_oracle_output_hits_the_target_for_every_prediction_type(prediction_type: str, mode: str) -> None:
    from conftest import make_scheduler

    model = ZeroDataOracle(make_scheduler(10, prediction_type=prediction_type))
    cfg = NCPCfg(target_mode=mode, t_min=100)
    b = _batch(cfg)
    b = b._replace(x0_w=torch.zeros_like(b.x0_w), x0_l=torch.zeros_like(b.x0_l))
    fwd = DPO.forward(model, b, cfg)
    # the exact target gives (numerically) zero distance; the zero reference output does not
    assert torch.all(fwd.d_ref_w > 0) and torch.all(fwd.d_ref_l > 0)
    assert torch.all(fwd.d_pol_w <= 1e-6 * fwd.d_ref_w) and torch.all(fwd.d_pol_l <= 1e-6 * fwd.d_ref_l)
