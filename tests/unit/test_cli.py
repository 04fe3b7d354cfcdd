"""The command line: help for newcomers, config printing, errors as exit codes with messages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rlalign.cli import main


def test_help_lists_commands_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(word in out for word in ("train", "config", "base", "examples:"))


@pytest.mark.parametrize("command", ["train", "config", "base"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: rlalign " + command in capsys.readouterr().out


def test_config_prints_resolved_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "algo=ddpo", "sampler.num_workers=3"]) == 0
    out = capsys.readouterr().out
    assert "algo: ddpo" in out and "num_workers: 3" in out and "images_per_iteration" in out
    assert "asks Ray for 5 CPUs, 0 GPUs" in out  # the digits demo: 3 samplers + learner + reward, all on CPU


def test_config_error_exits_2_naming_key_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  lr: fast\n")
    assert main(["train", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "learner.lr" in out and "bad.yaml" in out


def test_config_prints_the_cpus_and_gpus_a_gpu_config_asks_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).parents[2])  # the config names its prompt file relative to the repo root
    assert main(["config", "configs/ddpo_sdxl.yaml", f"model.path={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "kind: sdxl" in out and "'gpus': 5.5" in out
    assert "asks Ray for 21 CPUs, 5.5 GPUs (GPUs: samplers 4 x 1 + learner 1 + rewards 0.5)" in out


def test_train_startup_lines_show_sizes_and_gpus() -> None:
    from rlalign.config import load_config
    from rlalign.driver import startup_line

    cfg = load_config(None, ["sampler.num_workers=2", "sampler.num_gpus=0.5", "learner.num_gpus=1"])
    head, resources = startup_line(cfg, Path("runs/x")).splitlines()
    assert "algo=tailorpo_g" in head and "images_per_iteration=32" in head and "gpus" not in head
    assert resources == "asks Ray for 4 CPUs, 2 GPUs (GPUs: samplers 2 x 0.5 + learner 1 + rewards 0)"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["tailorpo.k=1"], "config error: tailorpo.k: must be >= 2, got 1"),
        (["learner.lr=-1"], "config error: learner.lr: must be > 0, got -1.0"),
        (["sampler.num_wrokers=2"], "config error: sampler.num_wrokers: Key 'num_wrokers' not in 'SamplerCfg'"),
        (["learner.lr=fast"], "config error: learner.lr: Value 'fast' of type 'str' could not be converted"),
    ],
    ids=["k-below-2", "negative-lr", "unknown-key", "wrong-type"],
)
def test_bad_value_is_one_line_and_exit_2_before_ray(
    args: list[str], line: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal must not wrap the message onto a second line
    assert main(["train", *args]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(line), out


def test_empty_prompt_file_stops_train_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # found on the driver by preflight, not after every actor started (no traceback, no Ray)
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    assert main(["train", "prompts.source=file", f"prompts.path={empty}"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"config error: prompts.path: prompt file {empty} holds no prompts (one per line; '#' lines are comments)"
    ]
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_config_check_files_opens_what_train_opens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing_weights = ["reward.models=[{name: aesthetic, path: " + str(tmp_path / "nope") + "}]"]
    assert main(["config", *missing_weights]) == 0  # values alone are fine
    capsys.readouterr()
    assert main(["config", "--check-files", *missing_weights]) == 2
    assert "config error: reward.models.0.path: weights directory" in capsys.readouterr().out
