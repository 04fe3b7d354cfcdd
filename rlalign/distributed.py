"""torch.distributed for the learner group (`learner.num_workers > 1`): join the group, shard rows, sum gradients.

No ray import: `rlalign/actors.py` finds rank 0's node address and a free port there and passes them to every
learner's `join_group`. Gloo on CPU, NCCL on CUDA.

Why the learner sums the LoRA gradients itself and does not wrap the U-Net in DDP: the trainable parameters are a
few MB of LoRA tensors inside a peft-wrapped U-Net whose frozen base is called twice per row (policy and reference,
adapters on and off), with micro-batches that may leave no graph (TailorPO's masked steps); DDP's bucket hooks expect
every registered parameter to get a gradient once per backward and would need `find_unused_parameters` and `no_sync`
around micro-batches. Summing the `.grad`s once per optimiser step is a few small messages on a flat buffer.

Exactness: every rank weights its rows by `1 / rows of the whole chunk` (the rule that makes micro-batch
accumulation exact, rlalign/algos/common.py), and the micro-batch gradients are added in the order one learner adds
them (`ordered_sum`), not by an all-reduce whose tree order differs: float32 addition is not associative, and AdamW
turns a rounding difference in a gradient near zero into a visible step difference (lr * delta / adam_eps). In that
order the group's LoRA equals one learner's bit for bit. The price: a chain of N - 1 sends of the LoRA-sized buffer
plus a broadcast per step, and each rank keeps its micro-batch gradients apart until then (LoRA-sized each).
"""

from __future__ import annotations

import datetime
import socket
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this node right now (the rendezvous binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_group(rank: int, world_size: int, address: str, port: int, device: torch.device, timeout_s: float) -> None:
    """Join the default process group: NCCL when this learner's model is on CUDA, gloo otherwise.

    `timeout_s` bounds every collective, so a rank that died makes the others fail instead of waiting forever.
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [lo, hi) of `rows` that `rank` trains on: contiguous, sizes differ by at most one (may be empty)."""
    base, extra = divmod(rows, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def broadcast_params(params: list[torch.Tensor]) -> None:
    """Every rank starts from rank 0's values (one flat broadcast)."""
    if not params:
        return
    flat = torch.cat([p.detach().flatten() for p in params])
    dist.broadcast(flat, src=0)
    with torch.no_grad():
        for p, v in zip(params, flat.split([p.numel() for p in params])):
            p.copy_(v.view_as(p))


def take_grads(params: list[torch.Tensor]) -> torch.Tensor:
    """One micro-batch's gradient, flat, then one presence flag per parameter; the `.grad`s are cleared.

    A parameter the micro-batch did not reach holds zeros with flag 0 (0 + g is exactly g, as autograd's first
    accumulation is).
    """
    device = params[0].device
    flat = torch.cat(
        [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=device) for p in params]
        + [torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)]
    )
    for p in params:
        p.grad = None
    return flat


def ordered_sum(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Set every `.grad` to the sum of all ranks' micro-batch gradients (`take_grads` vectors), added left to right
    in micro-batch order: rank r receives the running sum from r - 1, adds its own in order, passes it on; the last
    rank broadcasts it. Bit-identical to one learner accumulating the same micro-batches (module docstring).

    A parameter no micro-batch reached keeps `None`, as in one learner (AdamW then skips it: no decay, no step).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    size = sum(p.numel() for p in params) + len(params)
    device = params[0].device
    acc: torch.Tensor | None = None
    if rank > 0:
        incoming = torch.empty(size + 1, device=device)  # + 1: whether any earlier rank had a gradient at all
        dist.recv(incoming, src=rank - 1)
        acc = incoming[:-1] if incoming[-1] > 0 else None
    for g in grads:
        acc = g if acc is None else acc + g
    out = torch.zeros(size + 1, device=device)
    if acc is not None:
        out[:-1], out[-1] = acc, 1.0
    if rank < world - 1:
        dist.send(out, dst=rank + 1)
    dist.broadcast(out, src=world - 1)
    parts = out[:-1].split([p.numel() for p in params] + [len(params)])
    for p, g, seen in zip(params, parts[:-1], parts[-1].tolist()):
        p.grad = g.view_as(p).clone() if out[-1] > 0 and seen > 0 else None


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (small picklable objects: losses and metric sums), in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
