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


def test_config_error_exits_2_naming_key_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  lr: fast\n")
    assert main(["train", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "learner.lr" in out and "bad.yaml" in out
