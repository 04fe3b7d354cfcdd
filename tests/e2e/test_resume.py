"""Resume equality: N iterations in one go == N/2, then `resume=latest` up to N, in both modes.

Sync: the losses and the final LoRA are identical (compared exactly). Async: also exact (tolerance 0), because an
async checkpoint holds the prompt cursor of the batches trained on (not of the batch in flight) and the LoRA the
samplers held while the learner trained on its iteration, so the resumed run renders its first batch one version
behind with the same prompts and seeds, as the uninterrupted run did. The async case also draws its prompts
adaptively (`prompts.sampling=adaptive`): the checkpoint's running reward per prompt makes that draw exact too.
The resumed run's metrics.jsonl holds every training iteration once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from rlalign.config import load_config
from rlalign.driver import train
from rlalign.learner import LORA_FILE
from rlalign.metrics import read_metrics

CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
N = 4


def _train_rows(run_dir: Path) -> list[dict[str, float]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/total" in r]


def _latest(run_dir: Path) -> Path:
    return run_dir / "ckpt" / (run_dir / "ckpt" / "latest").read_text().strip()


def _final_lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(_latest(run_dir) / LORA_FILE))


@pytest.mark.parametrize(("mode", "sampling"), [("sync", "uniform"), ("async", "adaptive")])
def test_resumed_run_equals_uninterrupted(
    mode: str, sampling: str, ray_session: None, tiny_overrides: list[str]
) -> None:
    base = ["algo=diffusion_dpo", "sampler.num_workers=2", f"ray.mode={mode}", f"prompts.sampling={sampling}"]
    base += tiny_overrides
    full = train(load_config(CONFIG, [*base, f"iterations={N}", "name=full"]), Console(quiet=True)).run_dir
    train(load_config(CONFIG, [*base, f"iterations={N // 2}", "name=half"]), Console(quiet=True))
    resumed = train(
        load_config(CONFIG, [*base, f"iterations={N}", "name=half", "resume=latest"]), Console(quiet=True)
    ).run_dir

    rows, ref = _train_rows(resumed), _train_rows(full)
    assert [r["iteration"] for r in rows] == list(range(N))  # continues, nothing duplicated
    assert [r["loss/total"] for r in rows] == [r["loss/total"] for r in ref]
    assert [r["sampler/policy_lag"] for r in rows] == [r["sampler/policy_lag"] for r in ref]
    state = json.loads((_latest(resumed) / "state.json").read_text())
    assert ("prompt_rewards" in state) == (sampling == "adaptive")
    if sampling == "adaptive":  # every prompt trained on so far has a running reward
        assert len(state["prompt_rewards"]) >= 2
    a, b = _final_lora(resumed), _final_lora(full)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
