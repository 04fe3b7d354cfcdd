"""The only module besides driver.py that imports ray: wraps the plain classes as actors and spawns them.

Each role is wrapped once (`SamplerActor = ray.remote(Sampler)`); resources come from the config at spawn time
through `.options()`. Factories (`functools.partial(load_parts, ...)`) are small to pickle and run inside the
owning actor, so weights load where they are used.

Faults (README "Ray clusters"): a reward actor is restarted by Ray (`max_restarts`) and every call that died with
it is sent again by its caller (`RayPending`); scoring is a pure function of the images and prompts, so the retry
returns what the lost call would have. A sampler is replaced by `SamplerPool`, which re-runs the calls the dead
one had not finished, in order, after loading the LoRA version each call was first sent with: a retried rollout
is the same rollout (same prompts, seeds and weights). The learner is not restarted: its death ends the run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from reward_servers.base import RewardServer
from rlalign.config import RewardSpec, RunCfg
from rlalign.distributed import free_port
from rlalign.learner import LOAD_FILES, Learner
from rlalign.models.loading import load_parts
from rlalign.resources import RoleAsk, describe, role_asks
from rlalign.rewards import RewardSet
from rlalign.sampling.sampler import BranchCfg, Sampler

SamplerActor = ray.remote(Sampler)
LearnerActor = ray.remote(Learner)
RewardActor = ray.remote(RewardServer)


class ReceivedBytes:
    """Bytes of every result this process received through `gather` and `RayPending` (pickled size): the driver
    logs them per iteration as `driver/bytes_in`, which shows that rollouts no longer pass through it."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, values: Any) -> None:
        self.total += len(pickle.dumps(values, protocol=5))

    def take(self) -> int:
        """The bytes since the last take."""
        n, self.total = self.total, 0
        return n


received = ReceivedBytes()  # per process; only the driver's is read


class RayPending:
    """A reward call that is sent again, once, when its actor dies.

    The first send has no Ray retries, so a death surfaces here and is counted; the resend asks Ray to retry it
    (`max_task_retries=-1`), so it waits while the actor restarts and runs on the restarted one. It fails only when
    the actor is dead for good: restarted `ray.max_actor_restarts` times already.
    """

    def __init__(self, handle: RayRewardHandle, send: Callable[[int], ray.ObjectRef]) -> None:
        self.handle, self.send = handle, send
        self.ref = send(0)

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._get(timeout)
        except ray.exceptions.RayActorError:
            self.handle.retries += 1
            self.ref = self.send(-1)
        try:
            return self._get(timeout)
        except ray.exceptions.RayActorError as err:
            raise ActorFailure(
                f"reward actor {self.handle.name!r} died and was not restarted: ray.max_actor_restarts="
                f"{self.handle.max_restarts} restarts are used up (its node keeps failing): {_root_cause(err)}"
            ) from err

    def _get(self, timeout: float | None) -> Any:
        value = ray.get(self.ref, timeout=timeout)
        received.add(value)
        return value


class RaySplit:
    """One request split over a reward model's replicas: one `RayPending` per contiguous chunk of the batch; the
    result is the chunks' results concatenated in order, so it equals what a single replica would return."""

    def __init__(self, parts: list[RayPending], grad: bool) -> None:
        self.parts, self.grad = parts, grad

    def result(self, timeout: float | None = None) -> Any:
        outs = [p.result(timeout) for p in self.parts]
        if self.grad:
            return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
        return np.concatenate([np.asarray(o) for o in outs])


class RayRewardHandle:
    """A reward model's actors (its `replicas`) seen through the `RewardHandle` protocol (picklable: it travels
    into sampler actors). A batch is split into one contiguous chunk per replica, scored in parallel; a request too
    small to split goes whole to the next replica in turn, so many small requests (samplers' branch scoring) also
    spread over the replicas instead of queueing on one actor.

    `retries` counts calls this copy of the handle sent again after a death (the driver's copy: the driver's calls).
    """

    def __init__(self, name: str, actors: Sequence[Any], differentiable: bool, max_restarts: int = 0) -> None:
        self.name, self.actors, self.differentiable = name, list(actors), differentiable
        self.max_restarts, self.retries = max_restarts, 0
        self._turn = 0  # next replica for a request smaller than the replica count

    def submit(self, images: np.ndarray, prompts: list[str]) -> RayPending | RaySplit:
        return self._send(images, prompts, "score")

    def submit_grad(self, images: np.ndarray, prompts: list[str]) -> RayPending | RaySplit:
        return self._send(images, prompts, "score_and_grad")

    def _send(self, images: np.ndarray, prompts: list[str], method: str) -> RayPending | RaySplit:
        n = min(len(self.actors), len(images))
        if n <= 1:
            actor = self.actors[self._turn % len(self.actors)]
            self._turn += 1
            call = getattr(actor, method)
            return RayPending(self, lambda r: call.options(max_task_retries=r).remote(images, prompts))
        parts = []
        for actor, rows in zip(self.actors, np.array_split(np.arange(len(images)), n)):
            chunk, chunk_prompts = images[rows[0] : rows[-1] + 1], prompts[rows[0] : rows[-1] + 1]
            call = getattr(actor, method)
            parts.append(
                RayPending(self, lambda r, c=call, x=chunk, p=chunk_prompts: c.options(max_task_retries=r).remote(x, p))
            )
        return RaySplit(parts, grad=method == "score_and_grad")


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


@dataclass(eq=False)
class SamplerCall:
    """One call sent to a sampler slot. `ref` is replaced when the call is re-run on a replacement actor."""

    slot: int
    send: Callable[[Any], ray.ObjectRef]  # actor -> ref, e.g. lambda a: a.generate.remote(batch)
    weights: Any  # ref of the WeightsUpdate the slot holds when this call runs (None: as spawned)
    loads: Any = None  # load_weights calls: the WeightsUpdate ref it installs
    request: bool = False  # a rollout request: counted in `retries` when re-run
    ref: Any = None


class SamplerPool:
    """Sampler actors whose deaths cost a retried request, not the run.

    A sampler's only state is the LoRA version it holds, and its rollouts depend only on (prompts, seeds, weights)
    (rlalign/sampling/sampler.py). So when a call fails because its actor died, the pool spawns a replacement in
    the same slot (same resources and placement bundle), loads the weights each unfinished call was sent with, and
    re-runs those calls in their original order; their `ref`s now point at the replacement. `get` returns exactly
    what the dead actor would have returned. A slot that dies more than `max_restarts` times ends the run.
    """

    def __init__(self, spawn: Callable[[int], Any], size: int, max_restarts: int, timeout_s: float) -> None:
        self.spawn, self.max_restarts, self.timeout_s = spawn, max_restarts, timeout_s
        self.actors = [spawn(i) for i in range(size)]
        self.deaths = [0] * size
        self.restarts = 0  # replacement actors spawned
        self.retries = 0  # rollout requests re-run on a replacement
        self._held: list[Any] = [None] * size  # WeightsUpdate ref of the newest load sent to each slot
        self._open: list[list[SamplerCall]] = [[] for _ in range(size)]  # sent, result not yet fetched

    def __len__(self) -> int:
        return len(self.actors)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.actors)

    def __getitem__(self, i: int) -> Any:
        return self.actors[i]

    def generate(self, batches: Sequence[Any], **kwargs: Any) -> list[SamplerCall]:
        """One `generate(batch)` per slot (batches[i] -> slot i)."""
        return [
            self._send(i, lambda a, b=b: a.generate.remote(b, **kwargs), request=True) for i, b in enumerate(batches)
        ]

    def generate_scored(self, batches: Sequence[Any]) -> list[SamplerCall]:
        """One `generate_scored(batch)` per slot, returned as two objects: `get` reads the summary, `rollout_ref`
        names the rollout, which stays in the object store (rlalign/sampling/sampler.py)."""
        return [
            self._send(i, lambda a, b=b: a.generate_scored.options(num_returns=2).remote(b), request=True)
            for i, b in enumerate(batches)
        ]

    @staticmethod
    def rollout_ref(call: SamplerCall) -> Any:
        """The rollout of a `generate_scored` call; read it after `get` (a re-run call has a new ref)."""
        return call.ref[1]

    def load(self, weights: Any) -> list[SamplerCall]:
        """`load_weights(weights)` on every slot; `weights` is one object ref, read by all."""
        return [self._send(i, lambda a: a.load_weights.remote(weights), loads=weights) for i in range(len(self))]

    def _send(self, i: int, send: Callable[[Any], ray.ObjectRef], *, loads: Any = None, request: bool = False) -> Any:
        call = SamplerCall(i, send, self._held[i], loads, request)
        call.ref = send(self.actors[i])
        self._open[i].append(call)
        if loads is not None:
            self._held[i] = loads
        return call

    def get(self, calls: Sequence[SamplerCall], role: str) -> list[Any]:
        """Results in order; a call whose actor died is re-run on a replacement (see the class docstring)."""
        out = []
        for call in calls:
            while True:
                try:
                    first = call.ref[0] if isinstance(call.ref, list) else call.ref  # generate_scored: the summary
                    value = gather([first], self.timeout_s, role, pass_deaths=True)[0]
                    break
                except ray.exceptions.RayActorError as err:
                    self._replace(call.slot, err)
            self._open[call.slot].remove(call)
            out.append(value)
        return out

    def _replace(self, i: int, err: BaseException) -> None:
        """Spawn slot i's replacement, bring it to the weights of its first unfinished call, re-send the calls."""
        while True:
            self.deaths[i] += 1
            if self.deaths[i] > self.max_restarts:
                raise ActorFailure(
                    f"sampler {i} died {self.deaths[i]} times, more than ray.max_actor_restarts={self.max_restarts} "
                    f"allows (its node keeps failing): {_root_cause(err)}"
                ) from err
            with contextlib.suppress(Exception):  # already dead: nothing left to stop
                ray.kill(self.actors[i])
            actor = self.actors[i] = self.spawn(i)
            self.restarts += 1
            try:
                held, loads = None, []
                for call in self._open[i]:
                    if call.loads is None and call.weights is not held:
                        loads.append(actor.load_weights.remote(call.weights))
                        held = call.weights
                    call.ref = call.send(actor)
                    held = call.loads if call.loads is not None else held
                    self.retries += call.request
                # the replacement holds its first call's weights before it serves (the calls queue behind this)
                gather(loads[:1], self.timeout_s, f"sampler {i} (replacement)", pass_deaths=True)
                return
            except ray.exceptions.RayActorError as again:
                err = again


class LearnerGroup:
    """`learner.num_workers` learner actors forming one torch.distributed group; what the driver calls.

    One actor (the default) forms no group and runs exactly as a lone learner. With more, every rank runs its share
    of each chunk's micro-batches and gradients are summed in order (rlalign/learner.py, rlalign/distributed.py).
    `update` and `load` run on every rank, `save` and `export_weights` on rank 0 only (all ranks hold the same LoRA
    and optimiser state).
    Calls return their results, except `export_weights`: rank 0's ObjectRef, read by every sampler. A rank that
    fails is named; the others then fail their next collective within ray.call_timeout_s.
    """

    def __init__(self, actors: list[Any], timeout_s: float) -> None:
        self.actors, self.timeout_s = actors, timeout_s

    def form_group(self) -> None:
        """Rendezvous at rank 0's node IP and a port free there; each rank starts from rank 0's LoRA."""
        if len(self.actors) == 1:
            return
        address, port = gather([self.actors[0].__ray_call__.remote(_rendezvous)], self.timeout_s, "learner 0")[0]
        n = len(self.actors)
        self._on_all([a.join_group.remote(r, n, address, port) for r, a in enumerate(self.actors)], "group start-up")

    def update(self, scored: Any) -> dict[str, float]:
        """One update on every rank; the metrics (whole-group values, the same on every rank) of rank 0."""
        if len(self.actors) > 1:
            scored = ray.put(scored)  # one object-store copy, read by every rank
        metrics: dict[str, float] = self._on_all([a.update.remote(scored) for a in self.actors], "update")[0]
        return metrics

    def update_refs(self, scores: Any, rollouts: Sequence[Any], offline: Any = None) -> dict[str, float]:
        """`update` on rollouts held as object references: each is one argument of the call, so Ray resolves it
        inside every rank (a ref inside a list would arrive unresolved) and the driver never reads a rollout.
        `offline`: preference pairs mixed into the same update (one object-store copy for every rank)."""
        if offline is not None and len(self.actors) > 1:
            offline = ray.put(offline)
        refs = [a.update_from.remote(scores, *rollouts, offline=offline) for a in self.actors]
        metrics: dict[str, float] = self._on_all(refs, "update")[0]
        return metrics

    def export_weights(self) -> Any:
        return self.actors[0].export_weights.remote()

    def save(self) -> dict[str, bytes]:
        """Rank 0's checkpoint files (relative path -> bytes); the driver writes them (rlalign/checkpoint.py)."""
        files: dict[str, bytes] = gather([self.actors[0].save_files.remote()], self.timeout_s, "learner (checkpoint)")[
            0
        ]
        return files

    def load(self, directory: Path) -> int:
        """Every rank loads checkpoint `directory`, read here on the driver (one object-store copy of its bytes);
        returns the weights version."""
        files = ray.put({name: (directory / name).read_bytes() for name in LOAD_FILES if (directory / name).is_file()})
        return int(self._on_all([a.load_files.remote(files, str(directory)) for a in self.actors], "load")[0])

    def info(self) -> dict[str, Any]:
        return {**gather([self.actors[0].info.remote()], self.timeout_s, "learner")[0], "workers": len(self.actors)}

    def _on_all(self, refs: list[Any], what: str) -> list[Any]:
        """Results in rank order; the first rank to fail is raised at once (its peers would only time out)."""
        if len(refs) == 1:
            return gather(refs, self.timeout_s, "learner")
        rank = {ref: i for i, ref in enumerate(refs)}
        pending, deadline = list(refs), time.monotonic() + self.timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ActorFailure(f"learner group {what} did not answer within {self.timeout_s:.0f} s")
            gather(ready, self.timeout_s, f"learner {rank[ready[0]]} ({what})")
        return gather(refs, self.timeout_s, "learner")


@ray.remote(num_cpus=0)
def _first_images(n: int, *rollouts: Any) -> np.ndarray:
    """Runs where Ray places it, not in the driver: the first n images of these rollouts, in order."""
    return np.concatenate([r.images for r in rollouts])[:n]


def first_images(refs: Sequence[Any], lengths: Sequence[int], n: int, timeout_s: float) -> np.ndarray:
    """[n, H, W, 3] uint8: the first n images of an iteration's rollouts, held by reference, without bringing the
    rollouts to the driver (the train image grid). Only the rollouts that hold those images are read."""
    need = next((i + 1 for i, total in enumerate(np.cumsum(lengths)) if total >= n), len(refs))
    images: np.ndarray = gather([_first_images.remote(n, *refs[:need])], timeout_s, "train image grid")[0]
    return images


def _rendezvous(_learner: Any) -> tuple[str, int]:
    """Runs inside rank 0: the address its peers reach it at."""
    return str(ray.util.get_node_ip_address()), free_port()


@dataclass
class Workers:
    samplers: SamplerPool
    learner: LearnerGroup
    reward_actors: list[Any]
    rewards: RewardSet
    placement_groups: list[PlacementGroup]

    def kill(self) -> None:
        for actor in [*self.samplers, *self.learner.actors, *self.reward_actors]:
            with contextlib.suppress(Exception):  # already dead: nothing left to stop
                ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)


def spawn_rewards(cfg: RunCfg, model_dir: str | None) -> tuple[RewardSet, list[Any]]:
    """`replicas` actors per reward model (each with the spec's resources); one handle per model spreads over them."""
    groups = [
        [
            RewardActor.options(
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus,
                max_concurrency=1,
                max_restarts=cfg.ray.max_actor_restarts,  # Ray restarts it; RayPending sends the lost call again
            ).remote(functools.partial(make_reward_model, spec, model_dir))
            for _ in range(spec.replicas)
        ]
        for spec in cfg.reward.models
    ]
    asks = [a for a in role_asks(cfg) if a.role == "rewards"]
    for actors, ask in zip(groups, asks):
        wait_placed(actors, ask, cfg.ray.pending_actor_timeout_s, autoscaling=cfg.ray.autoscaling)
    # one round-trip each: surfaces a bad weights dir now, with the model's own error message
    flat = [a for g in groups for a in g]
    infos = gather([a.info.remote() for a in flat], cfg.ray.call_timeout_s, "reward actor start-up")
    names = RewardSet.component_names(list(cfg.reward.models))
    handles, first = [], 0  # the first replica of each model says whether it is differentiable (all are alike)
    for name, actors in zip(names, groups):
        differentiable = bool(infos[first]["differentiable"])
        handles.append(RayRewardHandle(name, actors, differentiable, cfg.ray.max_actor_restarts))
        first += len(actors)
    reward_set = RewardSet(list(cfg.reward.models), handles, timeout_s=cfg.reward.timeout_s)
    return reward_set, flat


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


def spawn_samplers(cfg: RunCfg, model_dir: str, rewards: RewardSet) -> tuple[SamplerPool, list[PlacementGroup]]:
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

    def spawn(i: int) -> Any:  # also spawns replacements: same resources, same placement bundle
        return SamplerActor.options(
            num_cpus=s.num_cpus, num_gpus=s.num_gpus, resources=dict(s.resources) or None, **options[i]
        ).remote(s, make_parts, branch=branch, scorer=rewards if branch else None, rewards=rewards, worker_index=i)

    return SamplerPool(spawn, s.num_workers, cfg.ray.max_actor_restarts, cfg.ray.call_timeout_s), pgs


def spawn_learner(cfg: RunCfg, model_dir: str) -> LearnerGroup:
    """`learner.num_workers` learner actors, placed and joined into one group (same seed: same batches)."""
    lc = cfg.learner
    model = replace(cfg.model, path=model_dir)
    make_parts = functools.partial(
        load_parts, model, cfg.lora, cfg.sampler.num_steps, dtype=lc.dtype, role="learner", num_gpus=lc.num_gpus
    )
    actors = [
        LearnerActor.options(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, resources=dict(lc.resources) or None).remote(
            cfg, make_parts, seed=cfg.seed
        )
        for _ in range(lc.num_workers)
    ]
    group = LearnerGroup(actors, cfg.ray.call_timeout_s)
    ask = next(a for a in role_asks(cfg) if a.role == "learner")
    try:
        wait_placed(actors, ask, cfg.ray.pending_actor_timeout_s, autoscaling=cfg.ray.autoscaling)
        group.form_group()
    except ActorFailure:
        for actor in actors:
            with contextlib.suppress(Exception):  # already dead: nothing left to stop
                ray.kill(actor)
        raise
    return group


def spawn_workers(cfg: RunCfg, model_dir: str) -> Workers:
    rewards, reward_actors = spawn_rewards(cfg, model_dir)
    samplers, pgs = spawn_samplers(cfg, model_dir, rewards)
    workers = Workers(samplers, LearnerGroup([], cfg.ray.call_timeout_s), reward_actors, rewards, pgs)
    asks = {a.role: a for a in role_asks(cfg)}
    try:
        workers.learner = spawn_learner(cfg, model_dir)
        wait_placed(list(samplers), asks["samplers"], cfg.ray.pending_actor_timeout_s, autoscaling=cfg.ray.autoscaling)
    except ActorFailure:
        workers.kill()
        raise
    return workers


def wait_placed(actors: Sequence[Any], ask: RoleAsk, timeout_s: float, *, autoscaling: bool = False) -> None:
    """Wait until the actors have a node; one still unplaced after `timeout_s` ends the run, saying what its role
    asks and what the cluster has free. Placed actors may go on loading weights (ray.call_timeout_s bounds that)."""
    waiting = [a.__ray_ready__.remote() for a in actors]
    _ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=timeout_s)
    from ray._private import state  # the GCS table: the public state API needs the dashboard

    unplaced = 0
    for actor in actors:
        with contextlib.suppress(Exception):
            info = state.actors(actor._actor_id.hex())
            unplaced += info["State"] in ("DEPENDENCIES_UNREADY", "PENDING_CREATION") and not info["Pid"]
    if waiting and unplaced:
        free = ", ".join(f"{k} {v:g}" for k, v in sorted(ray.available_resources().items()) if "node:" not in k)
        waited = "for the autoscaler to add nodes" if autoscaling else "for a node"
        raise ActorFailure(
            f"{unplaced} {ask.role} actor(s) still waiting {waited} after {timeout_s:.0f} s "
            f"(ray.pending_actor_timeout_s): {describe(ask)}; free in the cluster now: {free or 'nothing'}"
        )


def init_ray(cfg: RunCfg) -> bool:
    """Join `ray.address` (or RAY_ADDRESS) or start an embedded local Ray sized to the machine. True if we called
    ray.init.

    Auth: only the embedded local Ray turns Ray's token auth off (RAY_AUTH_MODE=disabled unless the environment
    already says otherwise), because Ray 2.60 enables it for new local clusters and `ray job submit` to them then
    fails. Joining a cluster leaves RAY_AUTH_MODE and the token alone: that cluster's owner decides.
    RAY_ADDRESS (set by `ray job submit` for its entrypoint) means joining, as it does for ray.init itself.
    """
    if ray.is_initialized():
        return False
    env_vars = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        import json

        # a submitted job's own runtime_env may set these too: Ray refuses to merge a variable set twice, and the
        # job's value wins
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        taken = (job.get("runtime_env") or {}).get("env_vars") or {}
        env = {"env_vars": {k: v for k, v in env_vars.items() if k not in taken}}
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 token auth breaks local job submits otherwise
    # Ray starts worker processes at nice 15 by default: on a busy machine the samplers and the learner then lose
    # the CPU to anything else (benchmarks/throughput.py measured +40 % Ray overhead at 15, none at 0)
    os.environ.setdefault("RAY_worker_niceness", "0")
    want = (
        cfg.sampler.num_workers * cfg.sampler.num_cpus
        + cfg.learner.num_workers * cfg.learner.num_cpus
        + sum(m.replicas * m.num_cpus for m in cfg.reward.models)
    )
    cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(np.ceil(want)))  # logical CPUs: may exceed cores
    ray.init(
        num_cpus=cpus,
        num_gpus=None,
        include_dashboard=cfg.ray.include_dashboard,
        runtime_env={"env_vars": env_vars},
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    return True


def gather(refs: Sequence[Any], timeout_s: float, role: str, *, pass_deaths: bool = False) -> list[Any]:
    """ray.get with a timeout and an error that names the role (dead actor, hung call, exception inside).

    pass_deaths: let RayActorError through (the caller replaces the actor and re-runs the call).
    """
    try:
        values = list(ray.get(list(refs), timeout=timeout_s))
        received.add(values)
        return values
    except ray.exceptions.GetTimeoutError as err:
        raise ActorFailure(f"{role} did not answer within {timeout_s:.0f} s (ray.call_timeout_s)") from err
    except ray.exceptions.RayActorError as err:
        if pass_deaths:
            raise
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


def restarts_of(actors: Sequence[Any]) -> int:
    """Restarts Ray made of these actors, read from the GCS actor table (the public state API needs the dashboard,
    which is off by default); an actor Ray cannot report on (e.g. through a ray:// client) counts 0."""
    from ray._private import state

    total = 0
    for actor in actors:
        with contextlib.suppress(Exception):
            total += int(state.actors(actor._actor_id.hex())["NumRestarts"])
    return total


def _node_of(_actor: Any) -> str:
    return str(ray.get_runtime_context().get_node_id())


def placement(workers: Workers, timeout_s: float) -> dict[str, Any]:
    """Node id and device of every actor, by role (written to the run's placement.json; multi-node tests read it)."""
    roles = {"samplers": workers.samplers, "learner": workers.learner.actors, "rewards": workers.reward_actors}
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
