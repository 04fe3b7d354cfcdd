"""Stage (5): the learner owns the LoRA U-Net and the optimiser; the algorithm owns the maths.

A plain class: `rlalign/actors.py` makes it an actor. `update(scored)` builds the algorithm's batch, cuts it into
micro-batches (each loss weighted by its share of rows, so accumulation gives exactly the full-batch mean), takes
`optimizer_steps` AdamW steps, and bumps the weights version. The reference model is the same U-Net with the
adapter disabled, so no second copy is held.

Precision (docs/precision.md): the base U-Net may be bf16/fp16 (`learner.dtype`); the LoRA parameters, their
gradients and AdamW's state are float32 and the forward runs under autocast. float16 adds a GradScaler. A step
whose gradient norm is not finite is skipped (never written into the LoRA) and counted in `learner/skipped_steps`.

Learner group (`learner.num_workers > 1`, docs/cluster.md): after `join_group` every rank builds the same batch and
chunks (same seed, same generator) and runs its contiguous share of each chunk's micro-batches, every row weighted by
1 / rows of the whole chunk; the LoRA gradients are summed over ranks in micro-batch order before clipping and the
AdamW step (rlalign/distributed.py). Every rank then holds the gradient one learner would, bit for bit, and takes the
same step. Rank 0 exports weights and writes checkpoints; every rank loads them.
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from rlalign import distributed
from rlalign.algos import get_algorithm
from rlalign.algos.common import num_rows, slice_rows
from rlalign.checkpoint import fsync_tree, read_tree, write_tree
from rlalign.config import LearnerCfg, RunCfg
from rlalign.models.denoiser import UNetDenoiser
from rlalign.models.loading import DiffusionParts, lora_metadata, save_diffusers_lora, save_peft_lora
from rlalign.offline.stream import mix
from rlalign.types import Rollout, ScoredRollouts, Scores, WeightsUpdate, concat_rollouts

LORA_FILE = "adapter_model.safetensors"
LOAD_FILES = (LORA_FILE, "optimizer.pt", "learner.json")  # what `load` reads from a checkpoint


class Learner:
    def __init__(self, cfg: RunCfg, make_parts: Callable[[], DiffusionParts], *, seed: int = 0) -> None:
        self.run_cfg, self.cfg = cfg, cfg.learner
        self.algo = get_algorithm(cfg.algo)
        self.algo_cfg = getattr(cfg, self.algo.cfg_key)
        self.parts = make_parts()
        unet = self.parts.unet
        unet.train()
        if self.cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.model = UNetDenoiser(unet, self.parts.scheduler, dtype=self.parts.dtype, **self._denoiser_kwargs())
        self.params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in self.params:
            if p.dtype != torch.float32:
                raise TypeError(f"LoRA parameters must be float32 master weights, got {p.dtype} (attach_lora)")
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(
            self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, eps=self.cfg.adam_eps
        )
        # float16 gradients underflow without loss scaling; bf16 has float32's exponent range and needs none
        self.scaler = torch.amp.GradScaler(self.parts.device.type, enabled=self.parts.dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0
        self.updates = 0
        self.rank, self.world_size = 0, 1

    def join_group(self, rank: int, world_size: int, address: str, port: int) -> int:
        """Become `rank` of a learner group of `world_size` (rendezvous at rank 0's address:port); every rank starts
        from rank 0's LoRA. Collectives time out after ray.call_timeout_s, so a dead rank fails the others."""
        distributed.init_group(rank, world_size, address, port, self.parts.device, self.run_cfg.ray.call_timeout_s)
        self.rank, self.world_size = rank, world_size
        distributed.broadcast_params(self.params)
        return rank

    def _denoiser_kwargs(self) -> dict[str, Any]:
        layer = getattr(self.run_cfg.ncp, "layer", None)
        return {"layer": layer} if layer else {}

    # ------------------------------------------------------------------ training
    def update_from(
        self, scores: Scores, *rollouts: Rollout, offline: ScoredRollouts | None = None
    ) -> dict[str, float]:
        """`update` on the samplers' rollouts, concatenated in sampler order, and the driver's scores. The driver
        passes the rollouts as object references, one argument each, so Ray resolves them here, in this process:
        they reach the learners straight from the object store, never through the driver (rlalign/actors.py
        `LearnerGroup.update_refs`). `offline`: preference pairs trained in the same update (data.online_fraction,
        rlalign/offline/stream.py `mix`)."""
        scored = scores.with_rollout(concat_rollouts(list(rollouts)))
        return self.update(scored if offline is None else mix(scored, offline))

    def update(self, scored: ScoredRollouts) -> dict[str, float]:
        """One learning step on an iteration's scored rollouts; returns detached float metrics."""
        start, rows_before, grad_rows_before = time.perf_counter(), self.model.rows, self.model.grad_rows
        batch = self.algo.build_batch(scored, self.algo_cfg, self.generator)
        rows = num_rows(batch) if batch is not None else 0
        metrics: dict[str, float] = {"learner/rows": float(rows)}
        if rows == 0:  # every group tied: nothing to learn from, weights stay as they are
            metrics["learner/skipped"] = 1.0
            return metrics
        lr = scheduled_lr(self.updates, self.cfg, self.run_cfg.iterations)
        for group in self.opt.param_groups:
            group["lr"] = lr
        metrics["learner/lr"] = lr
        steps = max(1, min(self.cfg.optimizer_steps, rows))
        bounds = np.linspace(0, rows, steps + 1).round().astype(int)
        sums: dict[str, float] = {}
        losses: list[float] = []
        grad_norms: list[float] = []
        skipped = 0
        for _ in range(self.cfg.epochs):
            order = torch.randperm(rows, generator=self.generator) if steps > 1 else None
            for lo, hi in itertools.pairwise(bounds):
                chunk = _take(batch, order[lo:hi]) if order is not None else batch
                loss, chunk_metrics = self._accumulate(chunk)
                grad_norm = self._step()
                if grad_norm is None:
                    skipped += 1
                else:
                    grad_norms.append(grad_norm)
                losses.append(loss)
                for k, v in chunk_metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
        n = len(losses)
        metrics.update({k: v / n for k, v in sums.items()})
        finite = [x for x in losses if math.isfinite(x)]
        metrics["loss/total"] = float(np.mean(finite)) if finite else float("nan")
        metrics["loss/first"] = losses[0]  # before any step this iteration: ln 2 at iteration 0 for DPO losses
        metrics["learner/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else float("nan")
        metrics["learner/skipped_steps"] = float(skipped)
        if self.scaler.is_enabled():
            metrics["learner/grad_scale"] = float(self.scaler.get_scale())
        cost = (self.model.rows - rows_before, self.model.grad_rows - grad_rows_before)
        if self.world_size > 1:  # U-Net rows of the whole group
            cost = tuple(map(sum, zip(*distributed.gather_objects(cost))))
        metrics["cost/learner_unet_rows"] = float(cost[0])
        metrics["cost/learner_unet_grad_rows"] = float(cost[1])
        metrics["time/learn_s"] = time.perf_counter() - start
        self.version += 1
        self.updates += 1
        metrics["learner/version"] = float(self.version)
        return metrics

    def _step(self) -> float | None:
        """Clip and apply the accumulated gradient; None (and no change to the LoRA) when its norm is not finite."""
        self.scaler.unscale_(self.opt)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        ok = math.isfinite(grad_norm)
        if ok:
            self.scaler.step(self.opt)
        self.scaler.update()  # float16: a non-finite step halves the loss scale
        self.opt.zero_grad(set_to_none=True)
        return grad_norm if ok else None

    def _accumulate(self, batch: Any) -> tuple[float, dict[str, float]]:
        """Forward/backward over micro-batches; returns the chunk's mean loss and row-weighted metrics.

        In a group each rank runs its contiguous share of the micro-batches one learner would cut, keeps each one's
        gradient apart, and `distributed.ordered_sum` adds them over ranks in micro-batch order, as autograd adds
        them in one learner: the sum, the loss and the metrics are bit-for-bit the lone learner's (float addition is
        not associative; any other order drifts by rounding, which AdamW magnifies where a gradient is near 0).
        """
        rows = num_rows(batch)
        size = self.cfg.micro_batch_size
        cuts = list(range(0, rows, size))
        group = self.world_size > 1
        terms: list[tuple[float, dict[str, float]]] = []  # per micro-batch: loss and metrics, weighted by share
        grads: list[torch.Tensor] = []  # group only: per micro-batch flat gradients of this rank
        for lo in cuts[slice(*distributed.shard(len(cuts), self.rank, self.world_size))]:
            mb = slice_rows(batch, lo, min(lo + size, rows))
            share = num_rows(mb) / rows
            out = self.algo.loss(self.algo.forward(self.model, mb, self.algo_cfg), self.algo_cfg)
            if out.loss.requires_grad:  # rows the algorithm masks out (TailorPO std < min_std) leave no graph
                self.scaler.scale(out.loss * share).backward()
                if group:
                    grads.append(distributed.take_grads(self.params))
            terms.append((float(out.loss.detach()) * share, {k: float(v) * share for k, v in out.metrics.items()}))
        if group:
            distributed.ordered_sum(self.params, grads)
            terms = [term for part in distributed.gather_objects(terms) for term in part]
        total, metrics = 0.0, {}
        for loss, parts in terms:
            total += loss
            for k, v in parts.items():
                metrics[k] = metrics.get(k, 0.0) + v
        return total, metrics

    # ------------------------------------------------------------------ weights
    def lora_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(self.parts.unet).items()}

    def info(self) -> dict[str, object]:
        """Where the learner's model lives (device, dtypes), for the run's placement.json."""
        return {
            "device": str(self.parts.device),
            "dtype": str(self.parts.dtype).removeprefix("torch."),
            "lora_dtype": str(self.params[0].dtype).removeprefix("torch.") if self.params else "none",
            "layout": self.parts.layout,
        }

    def export_weights(self) -> WeightsUpdate:
        """CPU copy of the LoRA tensors with the current version (one object-store copy serves all samplers)."""
        return WeightsUpdate(self.version, self.lora_state())

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | Path, extra_state: dict[str, Any] | None = None) -> Path:
        """Write LoRA (peft + diffusers-loadable), optimiser, RNG state and version into `directory`.

        `diffusers_lora/` loads in plain diffusers with `pipe.load_lora_weights(dir)` and reproduces this U-Net
        (every adapted module, alpha/rank scale kept; tests/component/test_lora_export.py compares outputs).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        lora = self.lora_state()
        meta = lora_metadata(self.parts.unet)
        save_peft_lora(out / LORA_FILE, lora, meta)
        save_diffusers_lora(out / "diffusers_lora", lora, meta, self.parts.layout)
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        torch.save(
            {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), **rng}, out / "optimizer.pt"
        )
        state = {"version": self.version, "updates": self.updates}
        state.update(extra_state or {})
        (out / "learner.json").write_text(json.dumps(state, indent=2))
        fsync_tree(out)  # on disk before a rename makes a checkpoint visible (rlalign/checkpoint.py)
        return out

    def save_files(self, extra_state: dict[str, Any] | None = None) -> dict[str, bytes]:
        """`save` into a temporary directory of this node; its files' bytes (relative path -> bytes), for the driver
        to write where the run lives (this node may not see that disk: rlalign/checkpoint.py)."""
        with tempfile.TemporaryDirectory(prefix="rlalign-save-") as tmp:
            self.save(tmp, extra_state)
            return read_tree(Path(tmp))

    def load_files(self, files: dict[str, bytes], source: str) -> int:
        """`load` from `save_files`'s bytes, which the driver read from checkpoint `source` (named in errors)."""
        with tempfile.TemporaryDirectory(prefix="rlalign-load-") as tmp:
            write_tree(Path(tmp), files)
            try:
                return self.load(tmp)
            except (OSError, ValueError) as err:
                raise type(err)(str(err).replace(tmp, source)) from err

    def load(self, directory: str | Path) -> int:
        """Restore what `save` wrote; returns the weights version."""
        src = Path(directory)
        missing = [f for f in LOAD_FILES if not (src / f).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {src} is incomplete: missing {', '.join(missing)}")
        # read and check every file before changing anything, so a refused checkpoint leaves the learner as it was
        lora = load_file(str(src / LORA_FILE))
        state = json.loads((src / "learner.json").read_text())
        try:
            blob = torch.load(src / "optimizer.pt", map_location="cpu", weights_only=True)  # no pickle code runs
        except pickle.UnpicklingError as err:
            cause = next((ln for ln in str(err).splitlines() if "Unsupported" in ln or "GLOBAL" in ln), "")
            raise ValueError(
                f"checkpoint {src}: optimizer.pt holds pickled Python objects besides tensors; refused without "
                f"running them ({cause.strip() or type(err).__name__})"
            ) from err
        set_peft_model_state_dict(self.parts.unet, lora)
        self.opt.load_state_dict(blob["optimizer"])
        if blob.get("scaler"):
            self.scaler.load_state_dict(blob["scaler"])
        self.generator.set_state(blob["generator"])
        torch.set_rng_state(blob["torch"])
        self.version, self.updates = int(state["version"]), int(state["updates"])
        return self.version


def scheduled_lr(update: int, cfg: LearnerCfg, iterations: int) -> float:
    """The AdamW lr of the run's `update`-th learner update (0-based; one per iteration, except iterations that
    had nothing to learn from).

    Linear warm-up over the first `warmup_iterations` updates ((u + 1) / warmup of the peak), then `constant`: lr,
    or `cosine`: lr_min + (lr - lr_min) (1 + cos(pi p)) / 2 with p = (u - warmup) / (iterations - 1 - warmup), from
    lr at the first update after warm-up to lr_min = lr * lr_min_frac at the last planned iteration, held there
    after (a resumed run given more iterations). Depends only on the update count, so a resume is exact.
    """
    if update < cfg.warmup_iterations:
        return cfg.lr * (update + 1) / cfg.warmup_iterations
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = iterations - 1 - cfg.warmup_iterations
    since = update - cfg.warmup_iterations
    progress = min(1.0, since / span) if span > 0 else float(since > 0)  # one planned update: it gets the peak
    low = cfg.lr * cfg.lr_min_frac
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _take(batch: Any, index: torch.Tensor) -> Any:
    """Rows `index` of every per-row field (same rule as slice_rows)."""
    n = num_rows(batch)
    out = []
    for value in batch:
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
            out.append(value[index])
        elif isinstance(value, list):
            out.append([value[int(i)] for i in index])
        else:
            out.append(value)
    return type(batch)(*out)
