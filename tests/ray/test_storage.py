"""Storage without a shared disk: the learner never writes the run directory (its checkpoint bytes travel through
the object store to the driver), so actors in another working directory still give complete checkpoints where the
user asked (the 3-node test in tests/ray/test_cluster.py runs every actor in a runtime_env working_dir); `out_dir`
may be a fsspec URI (memory:// here) that a run and its resume go through; a relative
`out_dir` under `ray job submit --working-dir` is refused."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from rich.console import Console
from safetensors.torch import load_file

from rlalign import checkpoint as ckpt
from rlalign.config import load_config
from rlalign.driver import train
from rlalign.learner import LORA_FILE
from rlalign.metrics import read_metrics

CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
LEARNER_FILES = {LORA_FILE, "optimizer.pt", "learner.json", "state.json", "config.yaml"}


def _complete(path: Path) -> None:
    names = {p.name for p in path.iterdir()}
    assert names >= LEARNER_FILES and (path / "diffusers_lora").is_dir(), names
    lora = load_file(str(path / LORA_FILE))
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in lora.items())  # trained, not the fresh LoRA


def test_memory_uri_out_dir_round_trips_a_run_and_its_resume(
    tmp_path: Path, tiny_digits_cache: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLALIGN_MIRROR_DIR", str(tmp_path / "mirror"))
    fs = fsspec.filesystem("memory")
    url = f"memory://rlalign-test-{tmp_path.name}/runs"
    base = ["model.size=tiny", f"model.cache_dir={tiny_digits_cache}", f"out_dir={url}", "algo=diffusion_dpo"]
    first = train(load_config(CONFIG, base), Console(quiet=True))
    root = url.removeprefix("memory://") + "/tiny"
    assert fs.cat_file(f"{root}/ckpt/latest").decode().strip() == "iter_000001"
    for name in (LORA_FILE, "optimizer.pt", "learner.json", "state.json", "config.yaml", "diffusers_lora"):
        assert fs.exists(f"{root}/ckpt/iter_000001/{name}"), name
    assert fs.exists(f"{root}/metrics.jsonl") and fs.exists(f"{root}/report.html")
    saved_state = json.loads(fs.cat_file(f"{root}/ckpt/iter_000001/state.json"))
    assert saved_state["iteration"] == 1

    # a resume on a machine without the local copy: everything comes back from the URI
    import shutil

    shutil.rmtree(tmp_path / "mirror")
    resumed = train(load_config(CONFIG, [*base, "iterations=3", "resume=latest"]), Console(quiet=True))
    assert resumed.run_dir.name == "tiny" and first.run_dir.name == "tiny"
    assert fs.cat_file(f"{root}/ckpt/latest").decode().strip() == "iter_000002"
    with fs.open(f"{root}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f.read().decode().splitlines()]
    versions = [r["learner/version"] for r in rows if "loss/total" in r]
    assert versions == [1.0, 2.0, 3.0]  # iterations 0, 1 from the first run, 2 after resuming from weights v2
    assert read_metrics(resumed.run_dir / "metrics.jsonl")  # the local mirror holds the run too
    # a fresh run of the same name goes to name-2 there, as with a local out_dir
    assert ckpt.RunMirror.open(url, "tiny", None).local.name == "tiny-2"


def test_relative_out_dir_under_ray_job_working_dir_is_refused(
    monkeypatch: pytest.MonkeyPatch, tiny_overrides: list[str]
) -> None:
    from rlalign.config import ConfigError, preflight

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "."}}))
    with pytest.raises(ConfigError, match=r"^out_dir: out_dir='runs' is relative.*absolute path .* or a URI"):
        preflight(load_config(CONFIG, [*tiny_overrides, "out_dir=runs"]))
    assert ckpt.resolve_out_dir("/data/runs") == "/data/runs"
    assert ckpt.resolve_out_dir("s3://bucket/runs/") == "s3://bucket/runs"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert ckpt.resolve_out_dir("runs") == str(Path.cwd() / "runs")
    assert ckpt.resolve_out_dir("file:///data/runs") == "/data/runs"
