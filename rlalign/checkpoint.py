"""Checkpoint layout, `latest` pointer, keep-last-k rotation, resume lookup.

    runs/<name>/ckpt/iter_000010/
        adapter_model.safetensors   peft LoRA state (what the learner reloads)
        diffusers_lora/             the same LoRA in diffusers format: pipe.load_lora_weights(this_dir)
        optimizer.pt, learner.json  optimiser, learner RNG, weights version
        state.json                  iteration, weights version, prompt cursor, reward normaliser state
        config.yaml                 the resolved run config
    runs/<name>/ckpt/latest         text file naming the newest complete checkpoint

A checkpoint is written into `iter_XXXXXX.tmp` and renamed when complete, and `latest` is replaced atomically,
so an interrupted save never leaves a broken `latest`. Every file and directory is fsynced before the rename that
makes it visible (the learner syncs what it wrote, `commit` the rest), so a crash or power loss right after the
rename cannot expose a renamed-but-empty file. Rotation deletes only older complete checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

CKPT_DIR = "ckpt"
LATEST = "latest"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CKPT_DIR


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def staging_dir(run_dir: Path, iteration: int) -> Path:
    """Where a checkpoint is written before `commit` makes it visible."""
    path = checkpoint_root(run_dir) / (checkpoint_name(iteration) + ".tmp")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (and `path`): their bytes and names are on disk."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def commit(
    run_dir: Path, staged: Path, iteration: int, state: dict[str, Any], config_yaml: str, keep_last: int
) -> Path:
    """Write state.json + config.yaml, rename the staged dir into place, point `latest` at it, rotate.

    The learner has fsynced its files; state.json (the marker `list_checkpoints` and `resolve_resume` look for)
    is written last, then the directory is synced, renamed, and `latest` replaced, each step synced first.
    """
    root = checkpoint_root(run_dir)
    _write_synced(staged / "config.yaml", config_yaml)
    _write_synced(staged / "state.json", json.dumps(state, indent=2, sort_keys=True))
    _fsync(staged)
    final = root / checkpoint_name(iteration)
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)
    _fsync(root)
    tmp = root / (LATEST + ".tmp")
    _write_synced(tmp, final.name + "\n")
    os.replace(tmp, root / LATEST)
    _fsync(root)
    rotate(run_dir, keep_last, protect=final)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("iter_") and not p.name.endswith(".tmp") and (p / "state.json").is_file()
    )


def rotate(run_dir: Path, keep_last: int, protect: Path | None = None) -> None:
    """Keep the newest `keep_last` checkpoints by iteration, and always `protect` (the one `latest` names: after
    resuming from an older checkpoint, the newest by name is not the newest written)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """`latest` -> the checkpoint the pointer names; otherwise `resume` is a checkpoint directory."""
    if resume == LATEST:
        pointer = checkpoint_root(run_dir) / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"resume=latest but {pointer} does not exist: no checkpoint was saved in {run_dir}")
        path = checkpoint_root(run_dir) / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"checkpoint {path} is missing or incomplete (no state.json)")
    return path


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())
