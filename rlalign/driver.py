"""Stage (6): the loop. prompts -> samplers -> rewards -> learner -> LoRA weights back to the samplers.

Sync mode: each iteration samples with the newest weights. Async mode: samplers render iteration k+1 while the
learner trains on k, so the slower of the two sets the pace; every rollout carries the weights version it used and
the driver enforces `ray.max_policy_lag`. The driver is the only writer of metrics and checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rlalign import checkpoint as ckpt
from rlalign.actors import (
    ActorFailure,
    SamplerCall,
    Workers,
    first_images,
    gather,
    init_ray,
    placement,
    received,
    restarts_of,
    spawn_workers,
)
from rlalign.config import RunCfg, preflight, resources_line, save_config, summary, to_yaml
from rlalign.evaluation import Evaluator
from rlalign.metrics import MetricSink, plot_reward_curve, read_metrics, save_image_grid
from rlalign.models.loading import resolve_model_dir
from rlalign.monitor import AlarmRules, Monitor
from rlalign.offline.stream import PairStream, offline_scored
from rlalign.prompts import PromptSource, PromptSourceState, eval_batches
from rlalign.resources import missing_resources
from rlalign.types import Rollout, RolloutSummary, ScoredRollouts, Scores, merge_metrics


@dataclass
class RunResult:
    run_dir: Path
    iterations_done: int
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    last_checkpoint: Path | None = None
    monitor: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation (rlalign/monitor.py)
    alarms: list[tuple[int, str]] = field(default_factory=list)  # (iteration, sentence) of every monitor alarm
    stopped_on_alarm: bool = False


def prepare_run_dir(cfg: RunCfg) -> Path:
    """A fresh directory unless resuming: an existing run's files are never overwritten."""
    run_dir = cfg.run_dir
    if cfg.resume is None and run_dir.exists() and any(run_dir.iterdir()):
        n = 2
        while (run_dir.parent / f"{run_dir.name}-{n}").exists():
            n += 1
        run_dir = run_dir.parent / f"{run_dir.name}-{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: RunCfg, console: Console | None = None) -> RunResult:
    console = console or Console()
    start = time.perf_counter()
    preflight(cfg)  # every file the config names, opened before Ray starts (the CLI has already run it: cheap)
    cfg = replace(cfg, out_dir=ckpt.resolve_out_dir(cfg.out_dir))  # absolute on this machine, or a URI
    mirror = None
    if ckpt.is_remote(cfg.out_dir):  # kept in a local mirror, copied to the URI at every checkpoint (checkpoint.py)
        mirror = ckpt.RunMirror.open(cfg.out_dir, cfg.name, cfg.resume)
        cfg = replace(cfg, name=mirror.local.name, resume=mirror.resume)
        console.print(f"out_dir {mirror.url}: kept locally in {mirror.local}, copied there at every checkpoint")
    local = cfg if mirror is None else replace(cfg, out_dir=str(mirror.local.parent))
    if local.resume is not None and local.resume != ckpt.LATEST:
        ckpt.resolve_resume(local.run_dir, local.resume)  # fail before any work when the path is wrong
    run_dir = prepare_run_dir(local)
    save_config(cfg, run_dir / "config.yaml")
    console.print(startup_line(cfg, run_dir))
    if cfg.resume is not None:
        resumed = ckpt.read_state(ckpt.resolve_resume(run_dir, cfg.resume))["iteration"]
        if dropped := drop_rows_after(run_dir / "metrics.jsonl", int(resumed)):
            console.print(f"{dropped} metrics rows after iteration {resumed} moved to metrics_discarded.jsonl")
        drop_rows_after(run_dir / ALARMS_FILE, int(resumed))
    model_dir = str(resolve_model_dir(cfg.model, progress=True))
    started = init_ray(cfg)
    workers: Workers | None = None
    sink = MetricSink(
        run_dir,
        tensorboard=cfg.log.tensorboard,
        wandb=cfg.log.wandb,
        wandb_project=cfg.log.wandb_project,
        config=json.loads(json.dumps(_plain(cfg))),
    )
    try:
        missing = missing_resources(cfg, ray.cluster_resources())
        if missing and not cfg.ray.autoscaling:
            raise ActorFailure("the cluster cannot hold this run's actors: " + "; ".join(missing))
        if missing:  # an autoscaling cluster grows on demand: say what it must add, then wait (bounded)
            console.print(
                f"[yellow]waiting for nodes[/] (ray.autoscaling, up to {cfg.ray.pending_actor_timeout_s:.0f} s "
                "per role): " + "; ".join(missing)
            )
        offline = _offline_stream(cfg, model_dir, run_dir, console)  # before the actors: encoding may use every CPU
        workers = spawn_workers(cfg, model_dir)
        nodes = placement(workers, cfg.ray.call_timeout_s)
        (run_dir / "placement.json").write_text(json.dumps(nodes, indent=2))
        console.print(
            f"actors up: {len(workers.samplers)} sampler(s) on {len(set(nodes['samplers']))} node(s), "
            f"{len(workers.learner.actors)} learner(s), {len(workers.reward_actors)} reward actor(s)"
        )
        loop = Loop(cfg, workers, sink, run_dir, model_dir, console)
        loop.mirror, loop.offline = mirror, offline
        result = loop.run()
    finally:
        sink.close()
        _write_curve(run_dir)
        if workers is not None:
            workers.kill()
        if started:
            ray.shutdown()
    result.seconds = time.perf_counter() - start
    _write_report(run_dir, result, console)
    if mirror is not None:
        mirror.push()
    return result


def _offline_stream(cfg: RunCfg, model_dir: str, run_dir: Path, console: Console) -> PairStream | None:
    """data.preferences: the pairs, encoded with Ray Data now or read from the cache (rlalign/offline/encode.py);
    the bad-row summary is printed and kept in offline_bad_rows.json."""
    if not cfg.data.preferences:
        return None
    from rlalign.offline.encode import encode_preferences

    cache_root = Path(cfg.data.cache_dir or run_dir.parent / "prefs_cache").expanduser()
    console.print(f"offline pairs: {cfg.data.preferences} (latent cache under {cache_root})")
    with Progress(TextColumn("encoding pairs"), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("encode", total=None)
        model = replace(cfg.model, path=model_dir)
        cache = encode_preferences(cfg.data, model, cache_root, progress=lambda rows: bar.update(task, completed=rows))
    (run_dir / "offline_bad_rows.json").write_text(json.dumps(cache.bad, indent=2))
    how = f"encoded in {cache.seconds:.1f} s" if cache.seconds else "read from the cache"
    kept, read = cache.bad.get("pairs_kept", len(cache)), cache.bad.get("rows_read", len(cache))
    console.print(f"offline pairs: {len(cache)} pairs ({how}); {read} rows read, {kept} pairs kept")
    for reason, count in sorted(cache.bad.get("counts", {}).items()):
        rows = ", ".join(map(str, cache.bad.get("examples", {}).get(reason, [])))
        console.print(f"  skipped {count} row(s): {reason} (rows {rows})")
    return PairStream(cache, cfg.data.pairs_per_iteration, seed=cfg.seed)


ALARMS_FILE = "alarms.jsonl"  # one {"iteration", "alarm"} row per monitor alarm; `rlalign report` reads it


def _write_report(run_dir: Path, result: RunResult, console: Console) -> None:
    """report.html at the end of a run; a failure here costs only the page, never the run (it warns instead)."""
    import warnings

    from rich.markup import escape

    try:
        from rlalign.report import write_report

        path = write_report(run_dir, wall_s=result.seconds, alarms=getattr(result, "alarms", ()))
    except Exception as err:  # the run's files are complete; the page can be written again later
        msg = f"report.html not written ({type(err).__name__}: {err}); write it with: rlalign report {run_dir}"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        console.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False)
        return
    console.print(f"report        : {path}")


def _unet_rows_logged(metrics_path: Path) -> float:
    """U-Net rows the run's metrics.jsonl already accounts for (0 for a fresh run): a resumed run's budget counts
    them, since resuming dropped the rows logged after its checkpoint."""
    return float(sum(r.get("cost/unet_rows", 0.0) for r in read_metrics(metrics_path)))


def resume_hint(run_dir: Path) -> str:
    """What a stopped run prints last: its newest complete checkpoint and the exact command that resumes it."""
    try:
        path = ckpt.resolve_resume(run_dir, ckpt.LATEST)
    except FileNotFoundError:
        return f"no checkpoint was completed in {run_dir}: the run has to start again"
    cmd = ["rlalign", "train", str(run_dir / "config.yaml"), f"out_dir={run_dir.parent}", f"name={run_dir.name}"]
    return f"the last complete checkpoint is {path}; resume with:\n  {shlex.join([*cmd, 'resume=latest'])}"


def drop_rows_after(metrics_path: Path, iteration: int) -> int:
    """On resume: move metrics.jsonl (or alarms.jsonl) rows logged after the resumed checkpoint's iteration (work
    that checkpoint does not hold, done again now) to <name>_discarded.jsonl, so no iteration appears twice.
    Returns the count."""
    rows = read_metrics(metrics_path)
    later = [r for r in rows if r["iteration"] > iteration]
    if later:
        with (metrics_path.parent / f"{metrics_path.stem}_discarded.jsonl").open("a") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in later)
        tmp = metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows if r["iteration"] <= iteration))
        os.replace(tmp, metrics_path)
    return len(later)


def startup_line(cfg: RunCfg, run_dir: Path) -> str:
    """What a run prints first: where it writes, derived sizes, then the CPUs and GPUs it asks Ray for."""
    sizes = {k: v for k, v in summary(cfg).items() if k not in ("cpus", "gpus")}
    head = f"[bold]rlalign[/] run [cyan]{run_dir}[/]  algo={cfg.algo}  mode={cfg.ray.mode}  "
    return head + "  ".join(f"{k}={v}" for k, v in sizes.items()) + "\n" + resources_line(cfg)


def _plain(cfg: RunCfg) -> Any:
    from omegaconf import OmegaConf

    from rlalign.config import redacted  # the wandb config: secrets hidden as in config.yaml

    return OmegaConf.to_container(OmegaConf.structured(redacted(cfg)))


def _write_curve(run_dir: Path) -> None:
    rows = read_metrics(run_dir / "metrics.jsonl")
    plot_reward_curve(rows, run_dir / "reward_curve.png")


@dataclass
class SampleRequest:
    """One iteration's rollouts in flight: a `generate_scored` call per sampler, the prompt cursor after their
    batches (what a checkpoint records once they are trained on) and when they were sent (`time/sample_s`)."""

    calls: list[SamplerCall]
    drawn: PromptSourceState
    sent_at: float


class InFlight:
    """Rollout requests sent and not yet trained on, oldest first: the async loop's only state between iterations.

    Depth 1 is what `ray.max_policy_lag` <= 1 needs (config validation refuses more): async mode sends iteration
    k+1's request while k trains; sync mode sends and takes it in the same step.
    """

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._queue: deque[SampleRequest] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, request: SampleRequest) -> None:
        if len(self._queue) >= self.max_depth:
            raise RuntimeError(f"{len(self._queue)} rollout requests already in flight (max {self.max_depth})")
        self._queue.append(request)

    def pop(self) -> SampleRequest:
        return self._queue.popleft()


class Loop:
    def __init__(
        self, cfg: RunCfg, workers: Workers, sink: MetricSink, run_dir: Path, model_dir: str, console: Console
    ) -> None:
        self.cfg, self.w, self.sink, self.run_dir, self.console = cfg, workers, sink, run_dir, console
        self.timeout = cfg.ray.call_timeout_s
        self.prompts = PromptSource(cfg.prompts, seed=cfg.seed)
        self.evaluator = Evaluator(model_dir) if (Path(model_dir) / "digit_classifier").is_dir() else None
        self.audits = _make_audits(cfg, model_dir)
        self.features = _make_feature_model(cfg, model_dir)
        self._last_eval: tuple[int, str, dict[str, float]] | None = None  # (weights version, grid file, metrics)
        e = cfg.eval
        rules = AlarmRules(e.alarm_audit_drop, e.alarm_window, e.alarm_diversity_below, e.alarm_drift_above)
        self.monitor = Monitor(rules)
        self.start_iter = 0
        self.version = 0  # learner's weights version, as last reported
        self.sampler_version = 0
        self.last_ckpt: Path | None = None
        # what a checkpoint may hold: the state after the last completed iteration, never work in flight
        self.inflight = InFlight(max_depth=1)  # rollout requests sent and not yet trained on (async: at most one)
        self._trained = PromptSourceState()  # prompt cursor after the last batch trained on
        # (iteration, weights version, reward stats, running reward per prompt) of the last completed iteration
        self._done: tuple[int, int, dict[str, Any], dict[str, float]] = (-1, 0, {}, {})
        self._weights: list[Any] = []  # WeightsUpdate refs of the last two broadcasts
        self._resume_sampler_weights: Any = None  # async resume: the LoRA the next in-flight batch was rendered with
        self._reward_retries = 0  # reward calls the samplers sent again while scoring final images (run total)
        self.mirror: ckpt.RunMirror | None = None  # out_dir is a URI: copy the run there after every checkpoint
        self.offline: PairStream | None = None  # data.preferences: the encoded pairs (rlalign/offline/)
        self._reward_busy: dict[tuple[str, int], float] = {}  # (reward, replica) -> busy seconds last read

    # ------------------------------------------------------------------ set-up
    def _resume(self) -> None:
        if self.cfg.resume is None:
            return
        path = ckpt.resolve_resume(self.run_dir, self.cfg.resume)
        state = ckpt.read_state(path)
        self.version = self.w.learner.load(path)
        self.prompts.state = PromptSourceState(**state["prompts"])
        if self.prompts.rewards is not None:
            self.prompts.rewards.load_state_dict(state.get("prompt_rewards", {}))
        if self.offline is not None and "offline" in state:
            self.offline.load_state_dict(state["offline"])
        self.w.rewards.load_state_dict(state.get("reward_stats", {}))
        self.start_iter = int(state["iteration"]) + 1
        if self._overlaps() and (path / SAMPLER_LORA).is_file():
            self._resume_sampler_weights = _read_weights(path / SAMPLER_LORA)
        self.console.print(f"resumed from {path} (iteration {state['iteration']}, weights v{self.version})")

    def _broadcast(self) -> None:
        """One object-store copy of the learner's LoRA, read by every sampler; all must confirm the version."""
        t0 = time.perf_counter()
        ref = self.w.learner.export_weights()
        self._weights = [*self._weights[-1:], ref]
        versions = self.w.samplers.get(self.w.samplers.load(ref), "sampler weight load")
        if len(set(versions)) != 1:
            raise ActorFailure(f"samplers hold different weight versions after a broadcast: {versions}")
        self.sampler_version = versions[0]
        self._sync_s = time.perf_counter() - t0
        self._broadcast_versions = versions

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, iteration: int, tag: str) -> dict[str, float]:
        """Held-out evaluation of the current weights. The "after" evaluation of weights already evaluated (a run
        stopped by an alarm or its time budget right after a mid-run evaluation) reuses that one: rendering the
        same prompts and seeds again would give the same images and log the same monitor row (and alarm) twice."""
        cfg = self.cfg
        if tag == "after" and self._last_eval is not None and self._last_eval[0] == self.version:
            _, grid, out = self._last_eval
            shutil.copyfile(grid, self.run_dir / "images" / f"eval_after_iter_{iteration:06d}.png")
            return {**out, "eval/reused": 1.0}
        batches = eval_batches(cfg.prompts, cfg.eval.images_per_prompt, cfg.eval.seed, len(self.w.samplers))
        rollouts = self.w.samplers.get(self.w.samplers.generate(batches, branch=False), "sampler (evaluation)")
        if stale := sorted({r.policy_version for r in rollouts} - {self.version}):  # never the in-flight weights
            raise ActorFailure(f"evaluation rendered with weights v{stale}, not the learner's newest v{self.version}")
        images = np.concatenate([r.images for r in rollouts])
        prompts = [p for r in rollouts for p in r.prompts]
        comps = self.w.rewards.components(images, prompts)
        out = {f"eval/{k}/mean": float(v.mean()) for k, v in comps.items()}
        out["eval/weighted/mean"] = float(self.w.rewards.weighted(comps).mean())
        if self.evaluator is not None:
            out.update(self.evaluator.metrics(images, prompts))
            out["audit/judge/mean"] = out["eval/judge_accuracy"]  # never trained on: the digits model's audit
        for name, model in self.audits.items():
            out[f"audit/{name}/mean"] = float(np.asarray(model.score(images, list(prompts)), dtype=np.float64).mean())
        features = None
        if self.features is not None:
            features = torch.from_numpy(np.asarray(self.features.features(images), dtype=np.float32))
        out.update(self._monitor(iteration, tag, rollouts, out, features))
        grid = self.run_dir / "images" / f"eval_{tag}_iter_{iteration:06d}.png"
        save_image_grid(images[:40], prompts[:40], grid)
        self._last_eval = (self.version, str(grid), dict(out))
        return out

    def _monitor(
        self, iteration: int, tag: str, rollouts: list[Rollout], out: dict[str, float], features: torch.Tensor | None
    ) -> dict[str, float]:
        """Drift and diversity against the base model's render of the same prompts and seeds, and the alarms.
        A fresh run's "before" evaluation is the base (cached on the driver and in monitor_base.pt for resumes)."""
        seeds = torch.cat([r.seeds for r in rollouts])
        groups = torch.cat([r.group_ids for r in rollouts])
        final = torch.cat([r.latents[:, -1] for r in rollouts]).float()  # [B, C, h, w]
        base_file = self.run_dir / "monitor_base.pt"
        if tag == "before" and self.monitor.base_latents is None:
            if self.cfg.resume is None:
                self.monitor.set_base(seeds, groups, final, features)
                torch.save(self.monitor.base_state(), base_file)
            elif base_file.is_file():
                self.monitor.load_base_state(torch.load(base_file, weights_only=True))
        metrics = self.monitor.observe(iteration, seeds, groups, final, out["eval/weighted/mean"], out, features)
        for msg in self.monitor.fired(iteration):
            self.console.print(f"[bold red]ALARM[/] (monitor, iteration {iteration}): {msg}")
            with (self.run_dir / ALARMS_FILE).open("a") as f:  # kept for `rlalign report` on a later day
                f.write(json.dumps({"iteration": iteration, "alarm": msg}) + "\n")
        return metrics

    # ------------------------------------------------------------------ main loop
    def run(self) -> RunResult:
        cfg = self.cfg
        self._resume()
        self._trained = replace(self.prompts.state)
        self._done = (self.start_iter - 1, self.version, self.w.rewards.state_dict(), self._prompt_rewards())
        self._broadcast()
        result = RunResult(self.run_dir, self.start_iter)
        result.before = self.evaluate(self.start_iter, "before")
        self.sink.log(self.start_iter, result.before)
        if self._resume_sampler_weights is not None and self.start_iter < cfg.iterations:
            # async resume, exactly as the uninterrupted run: the first batch is rendered with the weights the
            # samplers held when it was first sent out (one version behind), then the newest weights follow it
            self.w.samplers.get(self.w.samplers.load(ray.put(self._resume_sampler_weights)), "sampler weight load")
            self._weights = []
            self.inflight.submit(self._request())
            self._broadcast()
        self.console.print("before: " + _fmt(result.before))
        self._reward_load(1.0)  # the reward actors' totals so far (start-up, the "before" evaluation): the baseline
        it = self.start_iter
        budget_s, t_start = cfg.time_budget_min * 60.0, time.perf_counter()
        rows_spent = _unet_rows_logged(self.run_dir / "metrics.jsonl")  # a resume carries on from what it spent
        try:
            with _progress(self.console) as progress:
                task = progress.add_task("training", total=cfg.iterations, completed=self.start_iter, stats="")
                online = not self._offline_only()  # offline-only runs sample nothing to train on
                while it < cfg.iterations:
                    metrics = self.step(it) if online else self._offline_step(it)
                    if cfg.eval.every and (it + 1) % cfg.eval.every == 0 and it + 1 < cfg.iterations:
                        # an in-flight batch is kept, not thrown away: each sampler runs its calls in order, so the
                        # evaluation renders after that batch and after the newest weights' load (_broadcast)
                        metrics.update(self.evaluate(it, "mid"))
                    self.sink.log(it, metrics)
                    if cfg.log.save_every and (it + 1) % cfg.log.save_every == 0:
                        self._save(it)
                    progress.update(task, advance=1, stats=_progress_stats(metrics))
                    it += 1
                    result.iterations_done = it
                    if budget_s and time.perf_counter() - t_start > budget_s and it < cfg.iterations:
                        self.console.print(f"time budget of {cfg.time_budget_min:g} min reached after {it} iterations")
                        self._drain()
                        break
                    rows_spent += metrics.get("cost/unet_rows", 0.0)
                    if cfg.unet_rows_budget and rows_spent >= cfg.unet_rows_budget and it < cfg.iterations:
                        self.console.print(
                            f"U-Net rows budget of {cfg.unet_rows_budget:,} reached after {it} iterations "
                            f"({rows_spent:,.0f} rows)"
                        )
                        self._drain()
                        break
                    if cfg.eval.stop_on_alarm and metrics.get("monitor/alarm") == 1.0 and it < cfg.iterations:
                        self.console.print(
                            f"[bold red]stopping after {it} iterations: monitor alarm[/] (eval.stop_on_alarm)"
                        )
                        result.stopped_on_alarm = True
                        self._drain()
                        break
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted: saving a checkpoint before stopping[/]")
            self._save_quietly()
            raise
        except ActorFailure as err:
            self._save_quietly()
            raise ActorFailure(f"{err}\n{resume_hint(self.run_dir)}") from err
        if it > self.start_iter and (self.last_ckpt is None or self.last_ckpt.name != ckpt.checkpoint_name(it - 1)):
            self._save(it - 1)
        result.last_checkpoint = self.last_ckpt
        result.after = self.evaluate(it, "after")
        if "eval/reused" not in result.after:  # a reused evaluation is already in metrics.jsonl
            self.sink.log(it, result.after)
        result.after.pop("eval/reused", None)
        self.console.print("after:  " + _fmt(result.after))
        result.monitor, result.alarms = self.monitor.history, self.monitor.alarms
        return result

    # ------------------------------------------------------------------ one iteration: sample -> learn -> sync
    def step(self, it: int) -> dict[str, float]:
        """Iteration `it` as explicit stages, each timed: sample (`time/sample_s`: the oldest request's summaries;
        async: the next request sent at once, so the samplers render it during the rest of this step), reward
        (`time/reward_s`: the samplers' scoring of their final images plus the normalisation here), learn
        (`time/learn_s`: the learners read the rollouts by reference) and sync (`time/sync_s`: the new weights to
        every sampler). `driver/bytes_in` is what the driver received meanwhile: summaries and metrics, no rollout."""
        received.take()
        t0 = time.perf_counter()
        request, summaries, lag = self._sample(it)
        t1 = time.perf_counter()
        scores = self._score(summaries)
        t_reward = time.perf_counter() - t1 + max(s.reward_s for s in summaries)
        t2 = time.perf_counter()
        refs = [self.w.samplers.rollout_ref(c) for c in request.calls]
        offline = None  # data.online_fraction > 0: human pairs join the samplers' own in this update
        if self.offline is not None:
            offline = self._offline_batch(self.cfg.sampler.prompts_per_worker * len(self.w.samplers))
        metrics = self.w.learner.update_refs(scores, refs, offline)
        t_learn = time.perf_counter() - t2
        self.version = int(metrics.get("learner/version", self.version))
        self._broadcast()  # in async mode this queues behind the in-flight generate on each sampler
        elapsed = time.perf_counter() - t0
        t_sample = t1 - request.sent_at - max(s.reward_s for s in summaries)
        times = {"sample": t_sample, "reward": t_reward, "learn": t_learn, "sync": self._sync_s, "iteration": elapsed}
        metrics.update(self._step_metrics(it, summaries, scores, lag, times))
        metrics.update(self._prompt_metrics())
        if offline is not None:
            metrics.update(offline.metrics)
        # one cost axis for every algorithm: U-Net rows of this iteration's sampling (branches and plain images
        # included) plus its training (policy, reference and embedding forwards); evaluation is not counted
        sampled, trained_rows = metrics.get("cost/sampler_unet_rows", 0.0), metrics.get("cost/learner_unet_rows", 0.0)
        metrics["cost/unet_rows"] = sampled + trained_rows
        if self.cfg.log.image_every and it % self.cfg.log.image_every == 0:
            self._train_grid(it, summaries, scores, refs)
        self._trained = request.drawn
        self._done = (it, self.version, self.w.rewards.state_dict(), self._prompt_rewards())
        metrics["driver/bytes_in"] = float(received.take())
        return metrics

    def _request(self) -> SampleRequest:
        """Draw the next batches and send them, one per sampler, each rendered and scored there."""
        batches = self.prompts.next(
            self.cfg.sampler.prompts_per_worker, self.cfg.sampler.images_per_prompt, len(self.w.samplers)
        )
        drawn, sent_at = replace(self.prompts.state), time.perf_counter()
        return SampleRequest(self.w.samplers.generate_scored(batches), drawn, sent_at)

    def _sample(self, it: int) -> tuple[SampleRequest, list[RolloutSummary], int]:
        """The oldest request's summaries (sync: sent now); async: the next request goes out before we learn."""
        if not self.inflight:
            self.inflight.submit(self._request())
        request = self.inflight.pop()
        summaries: list[RolloutSummary] = self.w.samplers.get(request.calls, "sampler")
        lag = self.version - min(s.policy_version for s in summaries)
        if lag > self.cfg.ray.max_policy_lag:
            raise ActorFailure(f"policy lag {lag} exceeds ray.max_policy_lag={self.cfg.ray.max_policy_lag}")
        self._observe_prompts(summaries)  # before the next draw, in sync and async mode alike: resumes are exact
        if self._overlaps() and it + 1 < self.cfg.iterations:
            self.inflight.submit(self._request())  # samplers render k+1 while we score and learn k
        self._reward_retries += sum(s.reward_retries for s in summaries)
        return request, summaries, lag

    def _observe_prompts(self, summaries: list[RolloutSummary]) -> None:
        """prompts.sampling=adaptive: the policy's own reward per prompt: the plain renders of a branching sampler
        (its final images are searches), else the final images' raw weighted reward."""
        if self.prompts.rewards is None:
            return
        for s in summaries:
            if s.plain is not None:
                self.prompts.rewards.observe(s.plain.prompts, s.plain.rewards)
            elif s.step_valid is None:
                self.prompts.rewards.observe(s.prompts, self.w.rewards.weighted(s.components))

    def _prompt_metrics(self) -> dict[str, float]:
        """adaptive: how far the draw leans (the likeliest prompt's probability over uniform's) and the spread of
        the running rewards it leans by."""
        tracker = self.prompts.rewards
        if tracker is None or not tracker.means:
            return {}
        means = list(tracker.means.values())
        return {
            "prompts/max_over_uniform": float(tracker.probabilities().max() * len(tracker.prompts)),
            "prompts/reward_min": min(means),
            "prompts/reward_max": max(means),
        }

    def _prompt_rewards(self) -> dict[str, float]:
        return {} if self.prompts.rewards is None else self.prompts.rewards.state_dict()

    def _score(self, summaries: list[RolloutSummary]) -> Scores:
        """The learning signal from the samplers' raw components, normalised here: the running statistics are the
        driver's (checkpointed), and the result equals scoring the concatenated rollout (`RewardSet.score_rollout`)."""
        comps = {n: np.concatenate([s.components[n] for s in summaries]) for n in self.w.rewards.names}
        group_ids = torch.cat([s.group_ids for s in summaries])
        plain = any(s.step_valid is None for s in summaries)  # as concat_rollouts: step pairs only if all have them
        return self.w.rewards.score_components(comps, group_ids, plain)

    def _drain(self) -> None:
        """Finish in-flight rollouts without training on them; their prompts are handed out again next time."""
        while self.inflight:
            self.w.samplers.get(self.inflight.pop().calls, "sampler")
        self.prompts.state = replace(self._trained)

    def _overlaps(self) -> bool:
        """Samplers render the next batch while the learner trains (async); never in offline-only runs, which
        sample nothing to train on."""
        return self.cfg.ray.mode == "async" and self.cfg.ray.max_policy_lag >= 1 and not self._offline_only()

    def _step_metrics(
        self, it: int, summaries: list[RolloutSummary], scores: Scores, lag: int, times: dict[str, float]
    ) -> dict[str, float]:
        """Everything an iteration logs besides the learner's metrics (the same keys and values as when the driver
        received whole rollouts)."""
        sampler_metrics = merge_metrics([s.metrics for s in summaries])
        images = sum(len(s) for s in summaries)
        version = min(s.policy_version for s in summaries)
        metrics = dict(scores.metrics)
        metrics.update(
            {k: v for k, v in sampler_metrics.items() if not k.startswith("sampler/std/")}
            if it > 0
            else sampler_metrics
        )
        metrics.update(
            {
                "sampler/policy_lag": float(lag),
                "sampler/version": float(version),
                "sampler/min_loaded_version": float(min(self._broadcast_versions)),
                "sampler/max_loaded_version": float(max(self._broadcast_versions)),
                **{f"time/{k}_s": v for k, v in times.items()},
                "throughput/images_per_s": images / max(times["iteration"], 1e-9),
                **self._faults(),
                **self._reward_load(times["iteration"]),
            }
        )
        if all(s.step_valid is not None for s in summaries):
            metrics["tailorpo/valid_pair_frac"] = float(torch.cat([s.step_valid for s in summaries]).float().mean())
            metrics["tailorpo/step_reward_gap"] = float(torch.cat([s.step_reward_gap for s in summaries]).mean())
        return metrics

    def _train_grid(self, it: int, summaries: list[RolloutSummary], scores: Scores, refs: list[Any]) -> None:
        """The first (up to 32) training images with prompt and score: only those images come to the driver."""
        n = min(32, sum(len(s) for s in summaries))
        images = first_images(refs, [len(s) for s in summaries], n, self.timeout)
        prompts = [p for s in summaries for p in s.prompts][:n]
        caps = [f"{p[:18]} {v:.2f}" for p, v in zip(prompts, scores.scores[:n].tolist())]
        save_image_grid(images, caps, self.run_dir / "images" / f"train_iter_{it:06d}.png")

    # ------------------------------------------------------------------ offline pairs (docs/offline.md)
    def _offline_only(self) -> bool:
        return self.offline is not None and self.cfg.data.online_fraction == 0.0

    def _offline_batch(self, online_groups: int) -> ScoredRollouts:
        """The next offline pairs as a scored batch: `data.pairs_per_iteration` alone, or with `online_groups`
        online pairs so that they make `data.online_fraction` of the update."""
        assert self.offline is not None
        f = self.cfg.data.online_fraction
        n = self.cfg.data.pairs_per_iteration if f == 0 else max(1, round(online_groups * (1 - f) / f))
        s = self.cfg.sampler
        scored = offline_scored(self.offline.next(n), eta=s.eta, guidance_scale=s.guidance_scale)
        st = self.offline.state
        scored.metrics.update({"offline/epoch": float(st.epoch), "offline/pairs_seen": float(st.pairs_seen)})
        return scored

    def _offline_step(self, it: int) -> dict[str, float]:
        """An offline-only iteration: read pairs from the cache (`time/sample_s`), learn, send the weights to the
        samplers (which render only the held-out evaluation)."""
        t0 = time.perf_counter()
        scored = self._offline_batch(0)
        t1 = time.perf_counter()
        metrics = self.w.learner.update(scored)
        t_learn = time.perf_counter() - t1
        self.version = int(metrics.get("learner/version", self.version))
        self._broadcast()
        elapsed = time.perf_counter() - t0
        metrics.update(scored.metrics)
        times = {"sample": t1 - t0, "reward": 0.0, "learn": t_learn, "sync": self._sync_s, "iteration": elapsed}
        metrics.update({f"time/{k}_s": v for k, v in times.items()})
        metrics["throughput/pairs_per_s"] = metrics["offline/pairs"] / max(elapsed, 1e-9)
        metrics["cost/unet_rows"] = metrics.get("cost/learner_unet_rows", 0.0)  # nothing is sampled
        metrics["sampler/min_loaded_version"] = float(min(self._broadcast_versions))
        metrics.update(self._faults())
        self._done = (it, self.version, self.w.rewards.state_dict(), self._prompt_rewards())
        return metrics

    def _reward_load(self, seconds: float) -> dict[str, float]:
        """Per reward model since the last call: seconds its replicas spent scoring, summed (`time/reward_busy/<name>`,
        the driver's and the samplers' requests alike), and utilisation = busy / (replicas x `seconds`)
        (`reward_util/<name>`): near 1, that model is the bottleneck and wants more `replicas`. Read from each
        actor's running totals (RewardServer.stats); a restarted actor counts from 0 again. A reward actor that
        cannot answer (restarting) costs this iteration its figures, never the run."""
        out: dict[str, float] = {}
        for handle in self.w.rewards.handles:
            actors = getattr(handle, "actors", [])
            try:
                stats = gather([a.stats.remote() for a in actors], self.timeout, f"reward {handle.name!r} stats")
            except ActorFailure:
                continue
            busy = 0.0
            for i, st in enumerate(stats):
                before = self._reward_busy.get((handle.name, i), 0.0)
                busy += st["busy_s"] - before if st["busy_s"] >= before else st["busy_s"]
                self._reward_busy[(handle.name, i)] = st["busy_s"]
            if actors:
                out[f"time/reward_busy/{handle.name}"] = busy
                out[f"reward_util/{handle.name}"] = busy / (len(actors) * max(seconds, 1e-9))
        return out

    def _faults(self) -> dict[str, float]:
        """Run totals: actors restarted (samplers replaced + reward actors restarted by Ray) and requests re-run
        (rollout requests, the samplers' final-image reward calls as their summaries report them, the driver's own
        evaluation reward calls; reward calls a TailorPO sampler re-sends while branching are not counted)."""
        pool = self.w.samplers
        return {
            "faults/restarts": float(pool.restarts + restarts_of(self.w.reward_actors)),
            "faults/retries": float(pool.retries + self.w.rewards.retries + self._reward_retries),
        }

    # ------------------------------------------------------------------ checkpoints
    def _save(self, iteration: int) -> Path:
        """Checkpoint the state after completed iteration `iteration`: the learner, the prompt cursor of the batches
        trained on (not of those in flight), reward statistics; in async mode also the LoRA the samplers held while
        the learner trained on it, which the next batch is rendered with (so a resumed async run is exact)."""
        done_it, done_version, reward_stats, prompt_rewards = self._done
        if (iteration, self.version) != (done_it, done_version):
            raise RuntimeError(f"checkpoint of iteration {iteration} asked for, but {done_it} is the last completed")
        staged = ckpt.staging_dir(self.run_dir, iteration)
        ckpt.write_tree(staged, self.w.learner.save())  # the learner's files, through the object store
        if self._overlaps() and len(self._weights) == 2:
            _write_weights(staged / SAMPLER_LORA, ray.get(self._weights[0], timeout=self.timeout))
        state = {
            "iteration": iteration,
            "weights_version": self.version,
            "prompts": vars(self._trained).copy(),
            # prompts.sampling=adaptive: the running rewards the next batch is drawn with (rlalign/prompts.py)
            **({"prompt_rewards": prompt_rewards} if self.prompts.rewards is not None else {}),
            "reward_stats": reward_stats,
            "seed": self.cfg.seed,
            # offline pairs: the stream's position after the last batch trained on (drawn at learn time, so never
            # ahead of the completed iterations)
            **({"offline": self.offline.state_dict()} if self.offline is not None else {}),
        }
        self.last_ckpt = ckpt.commit(self.run_dir, staged, iteration, state, to_yaml(self.cfg), self.cfg.log.keep_last)
        if self.mirror is not None:
            self.mirror.push()
        return self.last_ckpt

    def _save_quietly(self) -> None:
        """After a failure: checkpoint the last completed iteration, if no checkpoint holds it yet and the learner
        has not moved past it (an update whose iteration did not complete must not be saved as part of it)."""
        iteration, version, *_ = self._done
        if iteration < self.start_iter or (self.last_ckpt and self.last_ckpt.name == ckpt.checkpoint_name(iteration)):
            return
        if self.version != version:
            self.console.print(f"[red]no checkpoint of iteration {iteration}: the learner has moved past it[/]")
            return
        try:
            path = self._save(iteration)
            self.console.print(f"checkpoint saved to {path}")
        except Exception as err:  # the learner may be the actor that died; earlier checkpoints stay intact
            self.console.print(f"[red]could not save a final checkpoint ({err}); earlier checkpoints are intact[/]")


def _make_feature_model(cfg: RunCfg, model_dir: str) -> Any:
    """eval.features: the image-feature model of the monitor's feature drift, in the driver's process on CPU."""
    from rlalign.actors import make_reward_model

    spec = cfg.eval.features
    if spec is None:
        return None
    cpu = replace(spec, num_gpus=0.0, options={k: v for k, v in spec.options.items() if k != "device"})
    return make_reward_model(cpu, model_dir)


def _make_audits(cfg: RunCfg, model_dir: str) -> dict[str, Any]:
    """eval.audit models, built in the driver's process on CPU (audits score a few hundred held-out images per
    evaluation: meant for cheap rewards). A name used twice gets its index: audit/jpeg/mean, audit/jpeg_1/mean."""
    from rlalign.actors import make_reward_model

    out: dict[str, Any] = {}
    for i, spec in enumerate(cfg.eval.audit):
        cpu = replace(spec, num_gpus=0.0, options={k: v for k, v in spec.options.items() if k != "device"})
        out[spec.name if spec.name not in out else f"{spec.name}_{i}"] = make_reward_model(cpu, model_dir)
    return out


SAMPLER_LORA = "sampler_lora.safetensors"  # async checkpoints: the LoRA the samplers render the next batch with


def _write_weights(path: Path, update: Any) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in update.tensors.items()}, str(path), {"version": str(update.version)})


def _read_weights(path: Path) -> Any:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from rlalign.types import WeightsUpdate

    with safe_open(str(path), "pt") as f:
        version = int(f.metadata()["version"])
    return WeightsUpdate(version, load_file(str(path)))


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        transient=False,
    )


def _progress_stats(m: dict[str, float]) -> str:
    if "offline/pairs" in m and "reward/weighted/mean" not in m:  # offline only: no images, no reward
        return f"pairs/s {m.get('throughput/pairs_per_s', float('nan')):.1f}  epoch {int(m['offline/epoch'])}  " + (
            f"loss {m.get('loss/total', float('nan')):.4f}"
        )
    parts = [
        f"img/s {m.get('throughput/images_per_s', float('nan')):.1f}",
        f"reward {m.get('reward/weighted/mean', float('nan')):.3f}",
        f"loss {m.get('loss/total', float('nan')):.4f}",
        f"lag {int(m.get('sampler/policy_lag', 0))}",
    ]
    return "  ".join(parts)


def _fmt(m: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in sorted(m.items()) if math.isfinite(v))


def summary_table(result: RunResult) -> RenderableType:
    """The before/after table, then the monitor's table (one row per evaluation) and its alarms."""
    parts: list[RenderableType] = [_before_after_table(result)]
    if result.monitor:
        parts.append(monitor_table(result.monitor))
    for it, msg in result.alarms:
        parts.append(f"[bold red]ALARM[/] at iteration {it}: {msg}")
    if result.stopped_on_alarm:
        parts.append("[bold red]the run stopped on a monitor alarm (eval.stop_on_alarm)[/]")
    return Group(*parts)


def monitor_table(rows: list[dict[str, float]]) -> Table:
    """Per evaluation: trained reward, audits, latent drift from the base model (mean/p50/p90), diversity vs base."""
    audits = sorted({k for r in rows for k in r if k.startswith("audit/")})
    cols = [
        ("trained", "trained reward"),
        *((k, k) for k in audits),
        ("monitor/drift_latent_mean", "drift mean"),
        ("monitor/drift_latent_p50", "drift p50"),
        ("monitor/drift_latent_p90", "drift p90"),
        ("monitor/diversity_ratio", "diversity / base"),
    ]
    if any("monitor/drift_feature_mean" in r for r in rows):
        cols.insert(-1, ("monitor/drift_feature_mean", "feature drift"))
    table = Table(title="monitor (held-out evaluations; drift = RMS latent distance from the base model)")
    table.add_column("iteration", justify="right")
    for _, title in cols:
        table.add_column(title, justify="right")
    table.add_column("alarm")
    for r in rows:
        cells = [f"{r[k]:.4f}" if math.isfinite(r.get(k, math.nan)) else "-" for k, _ in cols]
        table.add_row(str(int(r["iteration"])), *cells, "[bold red]ALARM[/]" if r.get("monitor/alarm") else "")
    return table


def _before_after_table(result: RunResult) -> Table:
    table = Table(title=f"rlalign run {result.run_dir}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for key in sorted(set(result.before) | set(result.after)):
        b, a = result.before.get(key, float("nan")), result.after.get(key, float("nan"))
        pct = key.endswith("accuracy")
        fmt = (lambda v: f"{100 * v:.1f} %") if pct else (lambda v: f"{v:.4f}")
        change = f"{100 * (a - b):+.1f} pts" if pct else f"{a - b:+.4f}"
        table.add_row(key, fmt(b), fmt(a), change)
    return table
