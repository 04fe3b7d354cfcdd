"""Launching: a two-node cluster on this machine, `ray job submit` against a `ray start --head` cluster, the
embedded local Ray of `rlalign train` (started and stopped by the command itself), and failing actors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from rich.console import Console
from safetensors.torch import load_file

from rlalign.actors import ActorFailure, spawn_workers
from rlalign.config import load_config
from rlalign.driver import Loop, prepare_run_dir, train
from rlalign.metrics import MetricSink, read_metrics
from rlalign.models.loading import resolve_model_dir

REPO = Path(__file__).parents[2]
CONFIG = str(REPO / "configs" / "tiny.yaml")
BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_three_node_cluster_places_every_role_and_checkpoints_without_a_shared_cwd(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray cluster of 3 nodes on this machine: 2 samplers spread over two nodes (STRICT_SPREAD, on the two nodes
    with a `samplers` resource), a group of 2 learners on a third (a custom resource only it has), a reward model with
    2 replicas. Every actor's process runs
    in Ray's unpacked copy of a working_dir package, not the driver's cwd; the checkpoints are still complete where
    the driver resolved the relative out_dir, because the learner's files travel through the object store."""
    from ray.cluster_utils import Cluster

    driver_cwd, package = tmp_path / "driver", tmp_path / "package"
    driver_cwd.mkdir()
    package.mkdir()
    (package / "README").write_text("the actors' working directory\n")
    monkeypatch.chdir(driver_cwd)
    # custom resources pin each role: without them the scheduler may put a sampler beside the learners and leave a
    # node empty (seen in CI), which is a valid placement but not the one this test checks
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"samplers": 1}})
    node2 = cluster.add_node(num_cpus=2, resources={"samplers": 1})
    node3 = cluster.add_node(num_cpus=3, resources={"learners": 2})
    # node ids read now: after cluster.shutdown() a node object's id is no longer reliable
    head_id, node2_id, node3_id = cluster.head_node.node_id, node2.node_id, node3.node_id
    try:
        ray.init(address=cluster.address, logging_level="ERROR", runtime_env={"working_dir": str(package)})
        overrides = [
            "sampler.num_workers=2",
            "ray.placement_strategy=STRICT_SPREAD",
            "sampler.resources={samplers: 1}",
            "learner.num_workers=2",
            "learner.resources={learners: 1}",
            "reward.models=[{name: digit_prompt, replicas: 2, num_cpus: 0.5}]",
            "algo=tailorpo",
            *[o for o in tiny_overrides if not o.startswith("out_dir=")],
            "out_dir=runs",  # relative: resolved on the driver, never in an actor's working directory
        ]
        result = train(load_config(CONFIG, overrides), Console(quiet=True))
        # a lambda travels by value (a function of this test module would need the module on the workers)
        actor_cwd = ray.get(ray.remote(num_cpus=0)(lambda: os.getcwd()).remote(), timeout=60)
    finally:
        ray.shutdown()
        cluster.shutdown()
    nodes = json.loads((result.run_dir / "placement.json").read_text())
    print("placement:", json.dumps({k: v for k, v in nodes.items() if k != "devices"}), nodes["devices"])
    assert sorted(nodes["samplers"]) == sorted([head_id, node2_id])  # one on each
    assert nodes["learner"] == [node3_id] * 2  # both learners where the custom resource is
    assert len(nodes["rewards"]) == 2
    assert Path(actor_cwd).resolve() != driver_cwd.resolve() and (Path(actor_cwd) / "README").is_file()
    assert result.run_dir == driver_cwd / "runs" / "tiny" and not (Path(actor_cwd) / "runs").exists()
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss/total" in r]
    assert [r["learner/version"] for r in rows] == [1.0, 2.0] and rows[-1]["sampler/min_loaded_version"] == 2.0
    for r in rows:  # the reward model's load, summed over its replicas (samplers' branch scoring included)
        assert r["time/reward_busy/digit_prompt"] > 0.0 and 0.0 < r["reward_util/digit_prompt"] <= 1.0
    for it in ("iter_000000", "iter_000001"):
        ckpt = result.run_dir / "ckpt" / it
        files = {p.name for p in ckpt.iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "state.json", "config.yaml", "diffusers_lora"} <= files
        lora = load_file(str(ckpt / "adapter_model.safetensors"))
        assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in lora.items())  # trained by the group


@pytest.fixture
def head_node() -> Iterator[str]:
    """A `ray start --head` cluster of its own; stopped by killing only its processes (`ray stop` would kill every
    Ray on the machine, a developer's training run included)."""
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rlj", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        check=True,
        env=ENV,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_cluster(temp_dir: str) -> None:
    """Kill the processes whose command line names `temp_dir` (GCS, raylet, dashboard) and all their descendants
    (agents and workers rename themselves to `ray::...`, so they are found through their parents)."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    procs = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
    for proc in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(list(procs.values()), timeout=30)


def test_ray_job_submit_runs_two_iterations(head_node: str, tiny_overrides: list[str], tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides if not o.startswith("out_dir=")] + [f"out_dir={tmp_path}/runs"]
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head_node,
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        "-m",
        "rlalign.cli",
        "train",
        "configs/tiny.yaml",
        "ray.address=auto",
        "name=job",
        *overrides,
    ]
    deadline = time.monotonic() + 120
    while True:  # a freshly started head's job agent can take a while on a loaded machine: retry only that case
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=500)
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    rows = [r for r in read_metrics(tmp_path / "runs" / "job" / "metrics.jsonl") if "loss/total" in r]
    assert [r["iteration"] for r in rows] == [0, 1]


def test_cli_starts_and_stops_its_own_ray(tiny_overrides: list[str], tmp_path: Path) -> None:
    import psutil

    ray_tmp = tempfile.mkdtemp(prefix="rlc", dir="/tmp")  # this run's cluster lives here (short: socket paths)
    proc = subprocess.run(
        [str(BIN / "rlalign"), "train", CONFIG, "algo=diffusion_dpo", *tiny_overrides],
        env={**ENV, "RAY_TMPDIR": ray_tmp},
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "eval/digit_accuracy" in proc.stdout and "reward curve" in proc.stdout
    assert list(Path(ray_tmp).glob("ray/session_*")), "the embedded cluster did not run under RAY_TMPDIR"
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if ray_tmp in " ".join(p.info["cmdline"] or [])]
    assert not left, f"processes of the embedded cluster outlived the command: {left}"  # raylet, GCS, dashboard
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_bad_config_exits_with_a_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler:\n  num_wrokers: 2\n")
    proc = subprocess.run(
        [str(BIN / "rlalign"), "train", str(bad)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "num_wrokers" in proc.stdout and str(bad) in proc.stdout


def test_dead_sampler_is_named_and_checkpoints_survive(tiny_overrides: list[str]) -> None:
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        # no restarts allowed: the first death ends the run (tests/ray/test_faults.py covers restarts)
        cfg = load_config(CONFIG, ["algo=diffusion_dpo", "iterations=4", "ray.max_actor_restarts=0", *tiny_overrides])
        run_dir = prepare_run_dir(cfg)
        workers = spawn_workers(cfg, str(resolve_model_dir(cfg.model)))
        sink = MetricSink(run_dir, tensorboard=False)
        loop = Loop(cfg, workers, sink, run_dir, str(resolve_model_dir(cfg.model)), Console(quiet=True))
        loop._broadcast()
        metrics = loop.step(0)
        sink.log(0, metrics)
        saved = loop._save(0)
        ray.kill(workers.samplers[0])
        with pytest.raises(ActorFailure, match="sampler 0 died 1 times"):
            loop.step(1)
        sink.close()
        assert (saved / "adapter_model.safetensors").is_file()  # the earlier checkpoint is intact
        assert read_metrics(run_dir / "metrics.jsonl")[0]["iteration"] == 0  # and so is the log
        workers.kill()
    finally:
        ray.shutdown()


def test_unreachable_reward_server_is_named(tiny_overrides: list[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        cfg = load_config(CONFIG, [*tiny_overrides])
        cfg.reward.models[0].name, cfg.reward.models[0].url = "http", url
        with pytest.raises(ActorFailure, match=r"127\.0\.0\.1"):
            train(cfg, Console(quiet=True))
    finally:
        ray.shutdown()


@pytest.mark.parametrize("autoscaling", [False, True])
def test_a_request_the_cluster_cannot_meet_is_named(tiny_overrides: list[str], autoscaling: bool) -> None:
    """5 CPUs asked of a 2-CPU cluster: refused at once, or (autoscaling) waited for and then named, never silent."""
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    try:
        overrides = ["sampler.num_workers=3", f"ray.autoscaling={autoscaling}", "ray.pending_actor_timeout_s=3"]
        cfg = load_config(CONFIG, [*overrides, *tiny_overrides])
        console = Console(record=True, width=200)
        start = time.perf_counter()
        with pytest.raises(ActorFailure) as info:
            train(cfg, console)
        message, printed = str(info.value), console.export_text()
        assert "samplers ask 3 x 1 CPU" in (message + printed) and "the cluster has 2" in (message + printed)
        if autoscaling:
            assert "waiting for nodes" in printed
            assert "still waiting for the autoscaler to add nodes after 3 s (ray.pending_actor_timeout_s)" in message
        else:
            assert "the cluster cannot hold this run's actors" in message
            assert time.perf_counter() - start < 30  # refused before any actor is spawned
        assert (cfg.run_dir / "config.yaml").is_file()  # the run's files are kept
    finally:
        ray.shutdown()
