"""The command line: help for newcomers, config printing, errors as exit codes with messages."""

from __future__ import annotations

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
    assert "algo=tailorpo" in head and "images_per_iteration=64" in head and "gpus" not in head
    assert resources == "asks Ray for 4 CPUs, 2 GPUs (GPUs: samplers 2 x 0.5 + learner 1 + rewards 0)"
