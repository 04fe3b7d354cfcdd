"""The only module besides driver.py that imports ray: wraps the plain classes as actors and spawns them.

Each role is wrapped once (`SamplerActor = ray.remote(Sampler)`); resources come from the config at spawn time
through `.options()`. Factories (`functools.partial(load_parts, ...)`) are small to pickle and run inside the
owning actor, so weights load where they are used.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from reward_servers.base import RewardServer
from rlalign.config import RewardSpec, RunCfg
from rlalign.learner import Learner
from rlalign.models.loading import load_parts
from rlalign.rewards import RewardSet
from rlalign.sampling.sampler import BranchCfg, Sampler

SamplerActor = ray.remote(Sampler)
LearnerActor = ray.remote(Learner)
RewardActor = ray.remote(RewardServer)


class RayPending:
    def __init__(self, ref: ray.ObjectRef) -> None:
        self.ref = ref

    def result(self, timeout: float | None = None) -> Any:
        return ray.get(self.ref, timeout=timeout)


class RayRewardHandle:
    """A reward actor seen through the `RewardHandle` protocol (picklable: it travels into sampler actors)."""

    def __init__(self, name: str, actor: Any, differentiable: bool) -> None:
        self.name, self.actor, self.differentiable = name, actor, differentiable

    def submit(self, images: np.ndarray, prompts: list[str]) -> RayPending:
        return RayPending(self.actor.score.remote(images, prompts))

    def submit_grad(self, images: np.ndarray, prompts: list[str]) -> RayPending:
        return RayPending(self.actor.score_and_grad.remote(images, prompts))


def reward_device(spec: RewardSpec) -> str:
    """Inside a reward actor: cuda when its resources hold a GPU (checked), else cpu; `options.device` may pin it."""
    import torch

    want = str(spec.options.get("device", "cuda" if spec.num_gpus > 0 else "cpu"))
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"reward {spec.name!r} needs a GPU (num_gpus={spec.num_gpus}, device={want}) but none is visible to its "
            f"actor (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); give it num_gpus > 0 on a "
            "node with a GPU, or num_gpus: 0 to score on CPU"
        )
    return want


def make_reward_model(spec: RewardSpec, model_dir: str | None) -> Any:
    """Runs inside the reward actor: build the registered model on its device from local weights or a URL."""
    from reward_servers.registry import make_reward

    options = {k: v for k, v in spec.options.items() if k != "device"}
    if spec.name != "http":
        options["device"] = reward_device(spec)
    if spec.name == "http":
        options.update(url=spec.url, token=spec.token)
    path = spec.path
    if spec.name == "digit_prompt" and path is None and model_dir is not None:
        path = str(Path(model_dir) / "digit_classifier")  # the embedded model ships its own classifier
    return make_reward(spec.name, path=path, **options)


@dataclass
class Workers:
    samplers: list[Any]
    learner: Any
    reward_actors: list[Any]
    rewards: RewardSet
    placement_groups: list[PlacementGroup]

    def kill(self) -> None:
        for actor in [*self.samplers, self.learner, *self.reward_actors]:
            with contextlib.suppress(Exception):  # already dead: nothing left to stop
                ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)


def spawn_rewards(cfg: RunCfg, model_dir: str | None) -> tuple[RewardSet, list[Any]]:
    actors = [
        RewardActor.options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_concurrency=1).remote(
            functools.partial(make_reward_model, spec, model_dir)
        )
        for spec in cfg.reward.models
    ]
    # one round-trip each: surfaces a bad weights dir now, with the model's own error message
    infos = gather([a.info.remote() for a in actors], cfg.ray.call_timeout_s, "reward actor start-up")
    names = RewardSet.component_names(list(cfg.reward.models))
    handles = [RayRewardHandle(n, a, bool(i["differentiable"])) for n, a, i in zip(names, actors, infos)]
    reward_set = RewardSet(list(cfg.reward.models), handles, timeout_s=cfg.reward.timeout_s)
    return reward_set, actors


def branch_cfg(cfg: RunCfg) -> BranchCfg | None:
    from rlalign.algos import get_algorithm

    algo = get_algorithm(cfg.algo)
    if not algo.needs_step_pairs:
        return None
    t = cfg.tailorpo
    return BranchCfg(
        num_candidates=t.k,
        tie_eps=t.tie_eps,
        target=cfg.reward.target,
        guide=algo.needs_gradient_guidance,
        guidance_step=t.eta_g,
        guidance_norm=t.guidance_norm,
        guidance_mode=t.guidance_grad,
        guide_loser=t.guide_loser,
    )


def spawn_samplers(cfg: RunCfg, model_dir: str, rewards: RewardSet) -> tuple[list[Any], list[PlacementGroup]]:
    s = cfg.sampler
    model = replace(cfg.model, path=model_dir)
    make_parts = functools.partial(
        load_parts, model, cfg.lora, s.num_steps, dtype=s.dtype, role="sampler", num_gpus=s.num_gpus
    )
    bundle = {"CPU": s.num_cpus, **({"GPU": s.num_gpus} if s.num_gpus else {}), **s.resources}
    pgs: list[PlacementGroup] = []
    options: list[dict[str, Any]] = [{} for _ in range(s.num_workers)]
    if s.num_workers > 1 and cfg.ray.placement_strategy != "PACK":
        pg = placement_group([bundle] * s.num_workers, strategy=cfg.ray.placement_strategy)
        ray.get(pg.ready(), timeout=cfg.ray.call_timeout_s)
        pgs.append(pg)
        options = [
            {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)}
            for i in range(s.num_workers)
        ]
    branch = branch_cfg(cfg)
    samplers = [
        SamplerActor.options(
            num_cpus=s.num_cpus, num_gpus=s.num_gpus, resources=dict(s.resources) or None, **options[i]
        ).remote(s, make_parts, branch=branch, scorer=rewards if branch else None, worker_index=i)
        for i in range(s.num_workers)
    ]
    return samplers, pgs


def spawn_learner(cfg: RunCfg, model_dir: str) -> Any:
    lc = cfg.learner
    model = replace(cfg.model, path=model_dir)
    make_parts = functools.partial(
        load_parts, model, cfg.lora, cfg.sampler.num_steps, dtype=lc.dtype, role="learner", num_gpus=lc.num_gpus
    )
    return LearnerActor.options(
        num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, resources=dict(lc.resources) or None
    ).remote(cfg, make_parts, seed=cfg.seed)


def spawn_workers(cfg: RunCfg, model_dir: str) -> Workers:
    rewards, reward_actors = spawn_rewards(cfg, model_dir)
    samplers, pgs = spawn_samplers(cfg, model_dir, rewards)
    learner = spawn_learner(cfg, model_dir)
    return Workers(samplers, learner, reward_actors, rewards, pgs)


def init_ray(cfg: RunCfg) -> bool:
    """Join `ray.address` or start an embedded local Ray sized to the machine. Returns True if we started it."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 token auth breaks local job submits otherwise
    if ray.is_initialized():
        return False
    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env=env, log_to_driver=True)
        return True
    want = (
        cfg.sampler.num_workers * cfg.sampler.num_cpus
        + cfg.learner.num_cpus
        + sum(m.num_cpus for m in cfg.reward.models)
    )
    cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(np.ceil(want)))  # logical CPUs: may exceed cores
    ray.init(
        num_cpus=cpus,
        num_gpus=None,
        include_dashboard=cfg.ray.include_dashboard,
        runtime_env=env,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    return True


def gather(refs: Sequence[Any], timeout_s: float, role: str) -> list[Any]:
    """ray.get with a timeout and an error that names the role (dead actor, hung call, exception inside)."""
    try:
        return list(ray.get(list(refs), timeout=timeout_s))
    except ray.exceptions.GetTimeoutError as err:
        raise ActorFailure(f"{role} did not answer within {timeout_s:.0f} s (ray.call_timeout_s)") from err
    except ray.exceptions.RayActorError as err:
        raise ActorFailure(f"{role} actor died: {_root_cause(err)}") from err
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if getattr(err, "cause", None) is not None else err
        raise ActorFailure(f"{role} raised {type(cause).__name__}: {cause}") from err


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXC_LINE = re.compile(r"^\s*(?:\w+\.)*\w*(?:Error|Exception|Unreachable|Failure)\w*: .+")


def _root_cause(err: BaseException) -> str:
    """The innermost exception line of a Ray error (e.g. the reward model's own message), else the first line."""
    lines = [_ANSI.sub("", line) for line in str(err).splitlines()]
    causes = [line.strip() for line in lines if _EXC_LINE.match(line)]
    return causes[-1] if causes else (lines[0] if lines else type(err).__name__)


def _node_of(_actor: Any) -> str:
    return str(ray.get_runtime_context().get_node_id())


def placement(workers: Workers, timeout_s: float) -> dict[str, Any]:
    """Node id and device of every actor, by role (written to the run's placement.json; multi-node tests read it)."""
    roles = {"samplers": workers.samplers, "learner": [workers.learner], "rewards": workers.reward_actors}
    out: dict[str, Any] = {
        role: gather([a.__ray_call__.remote(_node_of) for a in actors], timeout_s, f"{role} placement")
        for role, actors in roles.items()
    }
    out["devices"] = {
        role: [str(i.get("device", "?")) for i in gather([a.info.remote() for a in actors], timeout_s, f"{role} info")]
        for role, actors in roles.items()
    }
    return out


class ActorFailure(RuntimeError):
    """An actor died, hung or raised; the message names its role."""
