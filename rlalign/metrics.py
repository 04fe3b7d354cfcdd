"""Run outputs: metrics.jsonl (always), TensorBoard, optional wandb, captioned image grids, the reward curve.

The driver is the only writer and the iteration is the one step counter. Every line of metrics.jsonl is flushed
as it is written, so a crash never loses the iterations already done.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class MetricSink:
    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        self._wandb = None
        if wandb:
            import wandb as wandb_module  # optional dependency

            self._wandb = wandb_module.init(project=wandb_project, dir=str(run_dir), config=config or {})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        self._file.write(json.dumps({"iteration": step, **clean}, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grid_tile_size(h: int, w: int, target: int = 128) -> tuple[int, int]:
    """Displayed tile size: small images (digits' 32 px) upscaled by an integer factor to about `target` px, large
    ones (SD's 512+) shrunk to `target` px wide, so a 40-image grid stays a few hundred kB whatever the model."""
    if w <= target:
        scale = max(1, target // w)
        return h * scale, w * scale
    return max(1, round(h * target / w)), target


def save_image_grid(
    images: np.ndarray, captions: Sequence[str], path: Path, *, columns: int = 8, tile: int = 128
) -> Path:
    """[B, H, W, 3] uint8 -> a PNG grid, each tile resized to about `tile` px (grid_tile_size) with its caption
    beneath, plus `<name>.json` beside it: each tile's box in the PNG and its full caption, so a page (the run report)
    can show tiles with captions in real text instead of the PNG's 6-px bitmap font."""
    from PIL import Image, ImageDraw

    b, h, w, _ = images.shape
    columns = max(1, min(columns, b))
    rows = math.ceil(b / columns)
    tile_h, tile_w = grid_tile_size(h, w, tile)
    text_h = 12
    cell_w = max(tile_w, 6 * max((len(c) for c in captions), default=1) // 2)
    # captions wrap at spaces (a word is split only when it alone is wider than the cell): at least two lines
    lines = [textwrap.wrap(c, width=max(1, cell_w // 6)) or [""] for c in captions]
    n_lines = max(2, *(len(ls) for ls in lines)) if lines else 2
    grid = Image.new("RGB", (columns * cell_w, rows * (tile_h + text_h * n_lines)), "white")
    draw = ImageDraw.Draw(grid)
    boxes = []
    for i, (img, cap_lines) in enumerate(zip(images, lines)):
        r, c = divmod(i, columns)
        x0, y0 = c * cell_w, r * (tile_h + text_h * n_lines)
        left = x0 + (cell_w - tile_w) // 2
        resample = Image.NEAREST if tile_w >= w else Image.LANCZOS  # crisp pixels up, no aliasing down
        grid.paste(Image.fromarray(img).resize((tile_w, tile_h), resample), (left, y0))
        boxes.append([left, y0, left + tile_w, y0 + tile_h])
        for j, line in enumerate(cap_lines):
            draw.text((x0 + 1, y0 + tile_h + j * text_h), line, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    sidecar = {"captions": list(captions[: len(boxes)]), "boxes": boxes}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def plot_reward_curve(rows: list[dict[str, float]], path: Path, *, keys: Sequence[str] | None = None) -> Path | None:
    """Reward (and eval accuracy) against iteration, one line per metric key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(
        keys
        or sorted(
            k
            for k in {k for r in rows for k in r}
            if k.startswith(("reward/", "plain/", "eval/"))
            and k.endswith(("/mean", "accuracy"))
            and "group_std" not in k
        )
    )
    if not rows or not keys:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("value")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
