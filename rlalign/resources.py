"""What the run's actors ask Ray for, against what a cluster offers: `missing_resources(cfg, available)`.

Pure (no ray import): `available` is a `ray.cluster_resources()`-style dict, e.g. {"CPU": 8.0, "GPU": 2.0,
"memory": 3.2e10, "node2": 1.0}, so the driver calls this after `ray.init` and before spawning, and tests call it
with plain dicts. The asks are exactly what `rlalign/actors.py` passes to `.options()`: per sampler `num_cpus`,
`num_gpus` and `resources`; each of the `learner.num_workers` learners the same; `replicas` actors per reward
model, each with its `num_cpus`/`num_gpus`.

Ray places each actor on one node (and a fractional GPU share on one GPU), so cluster totals are a necessary
condition, not a sufficient one: two 2-GPU nodes pass a 4-GPU total and still cannot hold one 4-GPU actor. An
actor still pending after `ray.pending_actor_timeout_s` is reported with `describe(ask)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlalign.config import RunCfg

_BYTES = ("memory", "object_store_memory")  # Ray reports these in bytes; printed in GiB


@dataclass(frozen=True)
class RoleAsk:
    """`count` actors of one role, each asking `per_actor` (Ray resource name -> quantity)."""

    role: str  # samplers | learner | rewards (one RoleAsk per reward model, all with role "rewards")
    count: int
    per_actor: dict[str, float]


def role_asks(cfg: RunCfg) -> list[RoleAsk]:
    """What `rlalign/actors.py` requests, role by role (zero quantities left out)."""
    s, lc = cfg.sampler, cfg.learner

    def ask(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
        out = {"CPU": float(cpus), "GPU": float(gpus), **{k: float(v) for k, v in custom.items()}}
        return {k: v for k, v in out.items() if v > 0}

    asks = [RoleAsk("samplers", s.num_workers, ask(s.num_cpus, s.num_gpus, s.resources))]
    asks.append(RoleAsk("learner", lc.num_workers, ask(lc.num_cpus, lc.num_gpus, lc.resources)))
    asks += [RoleAsk("rewards", m.replicas, ask(m.num_cpus, m.num_gpus, {})) for m in cfg.reward.models]
    return asks


def missing_resources(cfg: RunCfg, available: dict[str, float]) -> list[str]:
    """One line per resource the roles ask more of than `available` holds; [] when the totals fit.

    e.g. "samplers ask 3 x 1 CPU + learner 1 + rewards 1 = 5 CPUs; the cluster has 2". Also checks that
    fractional GPU shares can be packed onto whole GPUs (each share must fit on one GPU).
    """
    asks = role_asks(cfg)
    names = sorted({name for a in asks for name in a.per_actor}, key=lambda n: (n not in ("CPU", "GPU"), n))
    lines, short = [], set()
    for name in names:
        total = sum(a.count * a.per_actor.get(name, 0.0) for a in asks)
        have = float(available.get(name, 0.0))
        if total > have + 1e-9:
            terms = _terms(asks, name)
            if len(terms) == 1 and terms[0][0] != "samplers ask":  # "learner asks 2 GPUs", no "= 2 GPUs"
                said = f"{terms[0][0]} {_amount(name, total, plural=True)}"
            else:
                said = (
                    " + ".join(f"{label} {value}" for label, value in terms) + f" = {_amount(name, total, plural=True)}"
                )
            lines.append(f"{said}; the cluster has {_have(name, have)}")
            short.add(name)
    if "GPU" not in short:
        lines += _gpu_packing(asks, float(available.get("GPU", 0.0)))
    return lines


def describe(ask: RoleAsk) -> str:
    """`each sampler asks 1 CPU, 0.5 GPU, 1 node2` (for the report on an actor that stays pending)."""
    role = {"samplers": "sampler", "rewards": "reward actor"}.get(ask.role, ask.role)
    parts = ", ".join(_amount(k, v, plural=True) for k, v in ask.per_actor.items()) or "nothing"
    return f"{'each ' if ask.count > 1 else ''}{role} asks {parts}"


def _terms(asks: list[RoleAsk], name: str) -> list[tuple[str, str]]:
    """[("samplers ask", "3 x 1 CPU"), ("learner", "1"), ("rewards", "1")]; roles asking none of `name` left out."""
    terms: list[tuple[str, str]] = []
    samplers = next(a for a in asks if a.role == "samplers")
    if samplers.per_actor.get(name):
        terms.append(("samplers ask", f"{samplers.count} x {_amount(name, samplers.per_actor[name], plural=False)}"))
    learner = next(a for a in asks if a.role == "learner")
    if learner.per_actor.get(name):
        each = learner.per_actor[name]
        value = f"{learner.count} x {_amount(name, each, plural=False)}" if learner.count > 1 else _number(name, each)
        terms.append(("learner asks" if not terms else "learner", value))
    rewards = sum(a.count * a.per_actor.get(name, 0.0) for a in asks if a.role == "rewards")
    if rewards:
        terms.append(("rewards ask" if not terms else "rewards", _number(name, rewards)))
    return terms


def _gpu_packing(asks: list[RoleAsk], gpus: float) -> list[str]:
    """Fractional shares go first-fit-decreasing onto the whole GPUs that whole-GPU actors leave free."""
    whole = sum(a.count * a.per_actor.get("GPU", 0.0) for a in asks if a.per_actor.get("GPU", 0.0) >= 1)
    shares = sorted(
        (a.per_actor["GPU"] for a in asks for _ in range(a.count) if 0 < a.per_actor.get("GPU", 0.0) < 1),
        reverse=True,
    )
    free = [1.0] * max(0, int(gpus + 1e-9) - round(whole))
    for share in shares:
        slot = next((i for i, f in enumerate(free) if f >= share - 1e-9), None)
        if slot is None:
            listed = " + ".join(_number("GPU", s) for s in shares)
            return [
                f"GPU shares {listed} do not fit on the {len(free)} GPU(s) left after whole-GPU actors (each share "
                f"must fit on one GPU); the cluster has {_have('GPU', gpus)}"
            ]
        free[slot] -= share
    return []


def _count(x: float) -> int | float:
    """Whole numbers print as ints (2, not 2.0); fractions keep up to 3 decimals."""
    return round(x) if abs(x - round(x)) < 1e-9 else round(x, 3)


def _number(name: str, value: float) -> str:
    return f"{_count(value / 2**30)} GiB" if name in _BYTES else str(_count(value))


def _amount(name: str, value: float, *, plural: bool) -> str:
    """`1 CPU`, `5 CPUs`, `0.5 GPU`, `2 node2`, `16 GiB memory`."""
    if name in _BYTES:
        return f"{_number(name, value)} {name}"
    unit = name + ("s" if plural and name in ("CPU", "GPU") and value > 1 else "")
    return f"{_count(value)} {unit}"


def _have(name: str, value: float) -> str:
    return _number(name, value) if value > 0 else "none"
