"""Bad input found on the driver before Ray starts (`rlalign.config.preflight`), and checkpoints that hold pickles.

Each test is a row of docs/bad-input.md: the file a config names is opened and checked, and the error is one
ConfigError `<key>: <why>`. Files are built here (prompt files, tiny safetensors, fake checkpoints); only
`test_learner_refuses_a_pickled_optimizer_state` builds a model (the tiny digits U-Net, seconds).
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rlalign.config import ConfigError, RunCfg, load_config, preflight
from rlalign.learner import LORA_FILE, Learner
from rlalign.models.loading import PIPELINE_FOLDERS, load_parts, resolve_model_dir

REPO = Path(__file__).resolve().parents[2]
RANK = 4
LORA_KEYS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in")


def checked(*overrides: str) -> RunCfg:
    """load_config (values) then preflight (files): what `rlalign train` does before Ray starts."""
    cfg = load_config(None, ["model.size=tiny", f"lora.rank={RANK}", *overrides])
    preflight(cfg)
    return cfg


def preflight_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        checked(*overrides)
    return str(err.value)


def write_lora(path: Path, rank: int = RANK, prefix: str = "") -> Path:
    """A peft-format U-Net LoRA file (bare module keys, as the learner's adapter_model.safetensors)."""
    tensors = {}
    for module in LORA_KEYS:
        tensors[f"{prefix}{module}.lora_A.weight"] = torch.zeros(rank, 8)
        tensors[f"{prefix}{module}.lora_B.weight"] = torch.zeros(8, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_checkpoint(path: Path) -> Path:
    """The files `Learner.save` + `checkpoint.commit` write, with tiny contents (no model needed)."""
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"iteration": 3, "version": 3}))
    (path / "learner.json").write_text(json.dumps({"version": 3, "updates": 3}))
    write_lora(path / LORA_FILE)
    blob = {"optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "torch": torch.get_rng_state()}
    torch.save(blob, path / "optimizer.pt")
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class WritesAFile:
    """A pickled object that, when unpickled, opens (creates) `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


# ------------------------------------------------------------------------------------------------ prompt files


def test_missing_prompt_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^prompts\.path: prompts\.source=file needs an existing prompt file"):
        load_config(None, ["prompts.source=file", f"prompts.path={tmp_path / 'nope.txt'}"])
    with pytest.raises(ConfigError, match=r"^prompts\.eval_path: file .*held_out\.txt does not exist"):
        load_config(None, ["prompts.source=file", f"prompts.path={REPO / 'README.md'}",
                           f"prompts.eval_path={tmp_path / 'held_out.txt'}"])  # fmt: skip


@pytest.mark.parametrize("content", [b"", b"# only comments\n\n   \n"], ids=["empty", "comments-only"])
def test_empty_prompt_file_is_found_before_ray(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    assert preflight_error("prompts.source=file", f"prompts.path={path}").startswith(
        f"prompts.path: prompt file {path} holds no prompts"
    )
    good = tmp_path / "good.txt"
    good.write_text("a cat\n")
    msg = preflight_error("prompts.source=file", f"prompts.path={good}", f"prompts.eval_path={path}")
    assert msg.startswith("prompts.eval_path: prompt file") and "holds no prompts" in msg


def test_prompt_file_that_is_not_text_is_named(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xff\xfe\x00binary")
    assert "is not UTF-8 text" in preflight_error("prompts.source=file", f"prompts.path={path}")


# ---------------------------------------------------------------------------------------- model directory


def test_incomplete_model_dir_is_found_before_ray(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    msg = preflight_error(f"model.path={tmp_path}", "reward.models=[{name: jpeg}]")
    assert msg.startswith("model.path: model directory") and "incomplete: missing folder(s) vae, text_encoder" in msg


def test_scheduler_with_clip_sample_is_found_before_ray(tmp_path: Path) -> None:
    for folder in PIPELINE_FOLDERS:
        (tmp_path / folder).mkdir()
    schedule = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "set_alpha_to_one": False}  # fmt: skip
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**schedule, "clip_sample": True}))
    msg = preflight_error(f"model.path={tmp_path}", "reward.models=[{name: jpeg}]")
    assert msg.startswith("model.path: ") and "clip_sample=True" in msg
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**schedule, "clip_sample": False}))
    checked(f"model.path={tmp_path}", "reward.models=[{name: jpeg}]")  # the same directory without clipping passes


# -------------------------------------------------------------------------------------- reward weights


def test_missing_or_empty_reward_weights_dir_is_found_before_ray(tmp_path: Path) -> None:
    missing = tmp_path / "aesthetic-weights"
    msg = preflight_error(f"reward.models=[{{name: aesthetic, path: {missing}}}]")
    assert msg.startswith(f"reward.models.0.path: weights directory {missing} does not exist; reward 'aesthetic' needs")
    assert "sac+logos+ava1-l14-linearMSE.pth" in msg  # says what to put there
    missing.mkdir()
    assert "is empty" in preflight_error(f"reward.models=[{{name: aesthetic, path: {missing}}}]")
    msg = preflight_error("reward.models=[{name: jpeg}, {name: pickscore}]")  # real weights, no path, no tiny
    assert msg.startswith("reward.models.1.path: reward 'pickscore' loads its weights from a local directory")


# ------------------------------------------------------------------------------------------ lora.init_from


def test_good_lora_file_passes(tmp_path: Path) -> None:
    checked(f"lora.init_from={write_lora(tmp_path / 'lora.safetensors')}")
    checked(f"lora.init_from={tmp_path}")  # a directory holding one .safetensors


def test_corrupt_lora_file_is_found_before_ray(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3 + b"not a tensor file" * 10)
    assert preflight_error(f"lora.init_from={garbage}").startswith(
        f"lora.init_from: {garbage} is not a complete .safetensors file (truncated or corrupt)"
    )


def test_truncated_lora_file_is_found_before_ray(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "lora.safetensors")
    truncate(path, 0.8)  # header intact, tensor data cut off: a broken download
    assert "is not a complete .safetensors file" in preflight_error(f"lora.init_from={path}")


def test_foreign_lora_file_is_found_before_ray(tmp_path: Path) -> None:
    unet = tmp_path / "unet.safetensors"  # a full weights file, not a LoRA
    save_file({"conv_in.weight": torch.zeros(8, 4, 3, 3), "conv_in.bias": torch.zeros(8)}, str(unet))
    msg = preflight_error(f"lora.init_from={unet}")
    assert msg.startswith(f"lora.init_from: {unet} holds no U-Net LoRA tensors") and "conv_in.bias" in msg
    text_only = write_lora(tmp_path / "te" / "lora.safetensors", prefix="text_encoder.")
    assert "holds no U-Net LoRA tensors" in preflight_error(f"lora.init_from={text_only}")
    other_rank = write_lora(tmp_path / "r8" / "lora.safetensors", rank=8)
    assert preflight_error(f"lora.init_from={other_rank}").endswith("holds LoRA adapters of rank 8; lora.rank is 4")
    (tmp_path / "empty").mkdir()
    assert "no LoRA .safetensors file at" in preflight_error(f"lora.init_from={tmp_path / 'empty'}")


# -------------------------------------------------------------------------------------------- checkpoints


def test_good_checkpoint_passes(tmp_path: Path) -> None:
    checked(f"resume={write_checkpoint(tmp_path / 'iter_000003')}")


def test_checkpoint_without_state_or_adapter_is_found_before_ray(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert preflight_error(f"resume={empty}") == f"resume: checkpoint {empty} is missing or incomplete (no state.json)"
    ckpt = write_checkpoint(tmp_path / "iter_000003")
    (ckpt / LORA_FILE).unlink()
    assert preflight_error(f"resume={ckpt}") == f"resume: checkpoint {ckpt} is incomplete: missing {LORA_FILE}"
    assert preflight_error("resume=latest", f"out_dir={tmp_path}").startswith("resume: resume=latest but ")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("state.json", "state.json is not valid JSON (truncated or corrupt)"),
        ("learner.json", "learner.json is not valid JSON (truncated or corrupt)"),
        (LORA_FILE, "is not a complete .safetensors file (truncated or corrupt)"),
        ("optimizer.pt", "optimizer.pt is truncated or corrupt"),
    ],
    ids=["state.json", "learner.json", "adapter", "optimizer.pt"],
)
def test_truncated_checkpoint_file_is_found_before_ray(tmp_path: Path, name: str, message: str) -> None:
    ckpt = write_checkpoint(tmp_path / "iter_000003")
    truncate(ckpt / name)
    msg = preflight_error(f"resume={ckpt}")
    assert msg.startswith(f"resume: checkpoint {ckpt}") and message in msg, msg


def test_checkpoint_holding_a_pickle_is_refused_before_ray(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "iter_000003")
    marker = tmp_path / "pwned"
    torch.save({"optimizer": WritesAFile(marker)}, ckpt / "optimizer.pt")
    msg = preflight_error(f"resume={ckpt}")
    assert msg.startswith(f"resume: checkpoint {ckpt}: optimizer.pt holds pickled Python objects besides tensors")
    assert "Unsupported global" in msg and "io.open" in msg and "\n" not in msg
    assert not marker.exists()


# ----------------------------------------------------------------------- the learner itself: no pickle on load


def test_learner_refuses_a_pickled_optimizer_state(tiny_overrides: list[str], tmp_path: Path) -> None:
    """A checkpoint someone hands over whose optimizer.pt holds a pickled object that would write a file.

    `Learner.load` reads optimizer.pt with `torch.load(weights_only=True)`: the unpickler refuses the global
    (`io.open`) instead of calling it, so the file is never written. The same bytes loaded with
    weights_only=False do write it, which shows the payload is live.
    """
    cfg = load_config(REPO / "configs" / "tiny.yaml", tiny_overrides)
    model_dir = str(resolve_model_dir(cfg.model, progress=False))
    make_parts = functools.partial(
        load_parts, replace(cfg.model, path=model_dir), cfg.lora, cfg.sampler.num_steps, role="learner"
    )
    learner = Learner(cfg, make_parts)
    ckpt = learner.save(tmp_path / "ckpt")
    assert learner.load(ckpt) == 0  # the untouched checkpoint loads
    marker = tmp_path / "written-by-pickle"
    blob = torch.load(ckpt / "optimizer.pt", weights_only=True)
    blob["optimizer"]["param_groups"][0]["payload"] = WritesAFile(marker)
    torch.save(blob, ckpt / "optimizer.pt")

    before = {k: v.clone() for k, v in learner.lora_state().items()}
    with pytest.raises(ValueError, match=r"optimizer.pt holds pickled Python objects .* refused without running them"):
        learner.load(ckpt)
    assert all(torch.equal(v, learner.lora_state()[k]) for k, v in before.items())  # nothing half-applied
    assert not marker.exists(), "unpickling ran the payload"

    shutil.copy(ckpt / "optimizer.pt", tmp_path / "copy.pt")
    torch.load(tmp_path / "copy.pt", weights_only=False)  # what weights_only=True prevents
    assert marker.exists()


# ------------------------------------------------------------------------------------------ offline preference data
def test_missing_preference_table_is_named(tmp_path: Path) -> None:
    msg = preflight_error("algo=diffusion_dpo", f"data.preferences={tmp_path / 'prefs.parquet'}")
    assert msg == f"data.preferences: {tmp_path / 'prefs.parquet'} does not exist"


def test_preference_table_without_the_mapped_columns_lists_what_it_has(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prefs.parquet"
    pq.write_table(
        pa.table({"prompt": ["a"], "jpg_0": [b""], "jpg_1": [b""], "label_0": [1.0], "label_1": [0.0]}), path
    )
    msg = preflight_error("algo=diffusion_dpo", f"data.preferences={path}")
    assert msg.startswith("data.preferences: ") and "'caption' (data.columns.caption)" in msg and "prompt" in msg
    checked("algo=diffusion_dpo", f"data.preferences={path}", "data.columns.caption=prompt")  # mapped: accepted


def test_preference_data_refused_for_an_algorithm_that_needs_its_own_samples(tmp_path: Path) -> None:
    msg = preflight_error("algo=tailorpo", f"data.preferences={tmp_path}")
    assert msg.startswith("data.preferences: algo=tailorpo cannot train on offline pairs; one of: dde_stepwise")
    msg = preflight_error("algo=dde_stepwise", "dde.state_source=trajectory", f"data.preferences={tmp_path}")
    assert msg.startswith("dde.state_source: offline pairs have no sampler trajectory")
    assert preflight_error("algo=ncp_dpo", "data.online_fraction=1", f"data.preferences={tmp_path}").startswith(
        "data.online_fraction: must be in [0, 1)"
    )
