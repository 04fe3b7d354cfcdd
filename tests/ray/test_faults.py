"""Actor deaths during a run: a sampler SIGKILLed mid-generate, a reward actor SIGKILLed mid-score (sync and async),
a sampler that keeps dying, and the learner SIGKILLed mid-save.

Deaths are real `SIGKILL`s of the actor's own process, armed from the test through `__ray_call__` (which runs a
function on the live actor instance) right after the driver spawns the actors: the armed process kills itself
inside its Nth generate (at its 2nd U-Net call) or its Nth score, so the kill lands at the same point of the run
every time. A replacement actor is a fresh process, never armed. Sync runs must end with the same LoRA as an
undisturbed run (same seeds), compared tensor by tensor.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from rich.console import Console
from safetensors.torch import load_file

import rlalign.driver
from rlalign.actors import ActorFailure
from rlalign.config import load_config
from rlalign.driver import train
from rlalign.learner import LORA_FILE
from rlalign.metrics import read_metrics

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks below run inside actors
CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
# 3 iterations with the (branch-free) Diffusion-DPO: the reward actor is called by each sampler for its final
# images (twice per iteration: 2 samplers) and by the driver for the before/after evaluations
BASE = ["algo=diffusion_dpo", "iterations=3", "sampler.num_workers=2"]


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray.init(num_cpus=6, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


# ---------------------------------------------------------------------------------------------- in-actor hooks
# Each runs inside the actor (`actor.__ray_call__.remote(hook, n)`), patching that one instance.


def _die_in_generate(sampler: Any, n: int) -> int:
    """Kill this process at the 2nd U-Net call of its n-th generate (1 = the 'before' evaluation)."""
    import os
    import signal

    # Ray calls the class's own methods, so patch what generate calls on the instance: every generate calls
    # _eps once at the first timestep, then once per further step (no branching in Diffusion-DPO)
    eps, first, calls = sampler._eps, int(sampler.parts.scheduler.timesteps[0]), {"generate": 0, "eps": 0}

    def dying_eps(x: Any, t: Any, cond: Any) -> Any:
        if int(t) == first:
            calls["generate"], calls["eps"] = calls["generate"] + 1, 0
        calls["eps"] += 1
        if calls["generate"] == n and calls["eps"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return eps(x, t, cond)

    sampler._eps = dying_eps
    return os.getpid()


def _die_in_score(server: Any, n: int) -> int:
    """Kill this process inside the model's n-th score call, after it scored and before the answer leaves (the
    'before' evaluation's 40 images take two calls of 32 + 8, each training iteration's 2 x 4 images two: one per
    sampler)."""
    import os
    import signal

    score, calls = server.model.score, [0]

    def dying_score(*args: Any, **kwargs: Any) -> Any:
        out = score(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    server.model.score = dying_score
    return os.getpid()


def _die_in_save(learner: Any, n: int) -> int:
    """Kill this process in its n-th save, after the peft LoRA file is written and before the diffusers copy."""
    import os
    import signal

    import rlalign.learner as module

    save_diffusers, calls = module.save_diffusers_lora, [0]

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_diffusers(*args, **kwargs)

    module.save_diffusers_lora = dying
    return os.getpid()


def _arm(monkeypatch: pytest.MonkeyPatch, pick: Callable[[Any], list[Any]], hook: Callable[..., int], n: int) -> None:
    """Arm `hook(instance, n)` in the actors `pick(workers)` returns, as soon as the driver has spawned them."""
    spawn = rlalign.driver.spawn_workers

    def spawn_and_arm(*args: Any, **kwargs: Any) -> Any:
        workers = spawn(*args, **kwargs)
        ray.get([a.__ray_call__.remote(hook, n) for a in pick(workers)], timeout=120)
        return workers

    monkeypatch.setattr(rlalign.driver, "spawn_workers", spawn_and_arm)


def _train_rows(run_dir: Path) -> list[dict[str, float]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/total" in r]


def _lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "ckpt" / (run_dir / "ckpt" / "latest").read_text().strip() / LORA_FILE))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def undisturbed(ray_session: None, tmp_path_factory: pytest.TempPathFactory, tiny_digits_cache: Path) -> Path:
    """The sync reference run: same config and seeds as the disturbed sync runs, nothing killed."""
    out = tmp_path_factory.mktemp("undisturbed")
    cfg = load_config(CONFIG, [*BASE, "model.size=tiny", f"model.cache_dir={tiny_digits_cache}", f"out_dir={out}"])
    return train(cfg, Console(quiet=True)).run_dir


# ---------------------------------------------------------------------------------------------- the tests


def test_sampler_killed_mid_generate_sync_same_lora(
    undisturbed: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sampler 1 dies in its 3rd generate (iteration 1's rollout, at its 2nd U-Net call): the pool spawns a
    replacement, loads it with weights v1 and re-runs the same PromptBatch; the run ends exactly as undisturbed."""
    _arm(monkeypatch, lambda w: [w.samplers[1]], _die_in_generate, 3)
    result = train(load_config(CONFIG, [*BASE, *tiny_overrides]), Console(quiet=True))
    rows, ref = _train_rows(result.run_dir), _train_rows(undisturbed)
    assert [r["iteration"] for r in rows] == [0, 1, 2]  # nothing skipped, nothing twice
    assert [r["faults/restarts"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["faults/retries"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["loss/total"] for r in rows] == [r["loss/total"] for r in ref]
    assert [r["sampler/version"] for r in rows] == [0.0, 1.0, 2.0]  # the retried rollout used v1, as planned
    assert _max_diff(_lora(result.run_dir), _lora(undisturbed)) == 0.0


def test_reward_actor_killed_mid_score_sync_same_lora(
    undisturbed: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reward actor dies scoring iteration 1's images (its model's 5th call, from one of the samplers): Ray
    restarts it, that sampler's call is sent again, and the scores and the final LoRA are those of the undisturbed
    run."""
    _arm(monkeypatch, lambda w: w.reward_actors, _die_in_score, 5)
    result = train(load_config(CONFIG, [*BASE, *tiny_overrides]), Console(quiet=True))
    rows, ref = _train_rows(result.run_dir), _train_rows(undisturbed)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["faults/restarts"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["faults/retries"] == 0.0 and rows[1]["faults/retries"] == rows[2]["faults/retries"]
    # the dying call is sent again, and so is the other sampler's if it was queued on that actor when it died
    assert rows[1]["faults/retries"] in (1.0, 2.0)
    assert [r["reward/digit_prompt/mean"] for r in rows] == [r["reward/digit_prompt/mean"] for r in ref]
    assert [r["loss/total"] for r in rows] == [r["loss/total"] for r in ref]
    assert _max_diff(_lora(result.run_dir), _lora(undisturbed)) == 0.0


@pytest.mark.parametrize("role", ["sampler", "reward"])
def test_kill_in_async_mode_finishes_every_iteration(
    role: str, ray_session: None, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Async: sampler 0 dies rendering iteration 2 (launched during iteration 1, weights v1), or the reward actor
    dies scoring iteration 1. The run finishes all iterations, lag stays within bounds, the metrics show it."""
    if role == "sampler":
        _arm(monkeypatch, lambda w: [w.samplers[0]], _die_in_generate, 4)  # before-eval, it 0, it 1, it 2
    else:
        _arm(monkeypatch, lambda w: w.reward_actors, _die_in_score, 5)  # before-eval 2 calls, it 0 2, it 1
    cfg = load_config(CONFIG, [*BASE, "ray.mode=async", "ray.max_policy_lag=1", *tiny_overrides])
    result = train(cfg, Console(quiet=True))
    rows = _train_rows(result.run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["learner/version"] for r in rows] == [1.0, 2.0, 3.0]
    assert [r["sampler/policy_lag"] for r in rows] == [0.0, 1.0, 1.0]  # the retried rollout kept its version
    assert rows[-1]["faults/restarts"] == 1.0
    # the lost request: one rollout, or one or both samplers' reward calls queued on the reward actor when it died
    assert rows[-1]["faults/retries"] == 1.0 if role == "sampler" else rows[-1]["faults/retries"] in (1.0, 2.0)


def test_sampler_that_keeps_dying_ends_the_run(
    ray_session: None, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ray.max_actor_restarts=0 the first death ends the run, naming the limit and how to resume."""
    _arm(monkeypatch, lambda w: [w.samplers[0]], _die_in_generate, 3)
    cfg = load_config(CONFIG, [*BASE, "ray.max_actor_restarts=0", *tiny_overrides])
    with pytest.raises(ActorFailure, match=r"sampler 0 died 1 times, more than ray.max_actor_restarts=0") as err:
        train(cfg, Console(quiet=True))
    assert "resume=latest" in str(err.value)


def test_learner_killed_mid_save_keeps_the_previous_checkpoint(
    ray_session: None, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The learner dies inside its 2nd save (iteration 1's checkpoint, peft file written, diffusers copy not):
    `latest` still names iter_000000, the partial one is only a `.tmp` dir, and the printed command resumes the run
    from iter_000000 to the end."""
    _arm(monkeypatch, lambda w: w.learner.actors, _die_in_save, 2)
    cfg = load_config(CONFIG, [*BASE, *tiny_overrides])
    with pytest.raises(ActorFailure, match="learner") as err:
        train(cfg, Console(quiet=True))
    run_dir = cfg.run_dir
    ckpt = run_dir / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "iter_000000"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_000000", "iter_000001.tmp", "latest"]
    line = [ln.strip() for ln in str(err.value).splitlines() if ln.strip().startswith("rlalign train")]
    assert line, str(err.value)
    args = shlex.split(line[0])
    monkeypatch.undo()  # the resumed run's learner is not armed
    resumed = train(load_config(args[2], args[3:]), Console(quiet=True))
    assert resumed.run_dir == run_dir
    rows = _train_rows(run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2]  # iteration 1's first attempt moved to metrics_discarded
    assert (ckpt / "latest").read_text().strip() == "iter_000002"
