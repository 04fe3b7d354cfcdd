"""Stage (1): prompts -> PromptBatch. A group is one prompt rendered `images_per_prompt` times with distinct seeds.

The source walks a shuffled prompt list with a cursor (saved in checkpoints, so a resumed run continues where it
stopped). Training seeds count up from the run seed; evaluation seeds start at `eval.seed`, far above anything
training reaches, so held-out images never reuse a training seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlalign.config import PromptsCfg
from rlalign.types import PromptBatch


def load_prompts(cfg: PromptsCfg, *, eval_split: bool = False) -> list[str]:
    """The prompt list; ValueError naming the file when it is missing, unreadable or holds no prompt.

    `rlalign.config.preflight` calls this on the driver, so a bad file stops a run before any actor starts.
    """
    if cfg.source == "digits":
        from rlalign.models.digits import PROMPT_TEMPLATES, digit_prompt

        return [digit_prompt(d, t) for t in range(len(PROMPT_TEMPLATES)) for d in range(10)]
    path = cfg.eval_path if (eval_split and cfg.eval_path) else cfg.path
    if path is None:
        raise ValueError("prompts.source=file needs prompts.path")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"prompt file {path} cannot be read: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text: {err}") from err
    lines = [line.strip() for line in text.splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one per line; '#' lines are comments)")
    return prompts


@dataclass
class PromptSourceState:
    cursor: int = 0  # prompts handed out so far
    images: int = 0  # training images handed out so far (seed counter)
    groups: int = 0  # groups handed out so far (group-id counter)


class PromptSource:
    def __init__(self, cfg: PromptsCfg, seed: int) -> None:
        self.prompts = load_prompts(cfg)
        self.seed = seed
        self.state = PromptSourceState()

    def _prompt(self, index: int) -> str:
        epoch, pos = divmod(index, len(self.prompts))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
        return self.prompts[int(order[pos])]

    def next(self, groups_per_split: int, images_per_prompt: int, splits: int) -> list[PromptBatch]:
        """`splits` batches (one per sampler), each `groups_per_split` groups of `images_per_prompt` images."""
        batches = []
        for _ in range(splits):
            prompts, gids, seeds = [], [], []
            for _ in range(groups_per_split):
                prompt = self._prompt(self.state.cursor)
                for _ in range(images_per_prompt):
                    prompts.append(prompt)
                    gids.append(self.state.groups)
                    seeds.append(self.seed * 1_000_003 + self.state.images)
                    self.state.images += 1
                self.state.cursor += 1
                self.state.groups += 1
            batches.append(PromptBatch(prompts, torch.tensor(gids), torch.tensor(seeds)))
        return batches


def eval_batches(cfg: PromptsCfg, images_per_prompt: int, seed: int, splits: int) -> list[PromptBatch]:
    """The fixed held-out set: every eval prompt x `images_per_prompt` seeds from `seed` up, split across samplers."""
    prompts = load_prompts(cfg, eval_split=True)
    rows = [(p, g, seed + g * images_per_prompt + j) for g, p in enumerate(prompts) for j in range(images_per_prompt)]
    parts = np.array_split(np.arange(len(rows)), max(1, splits))
    return [
        PromptBatch(
            [rows[i][0] for i in part],
            torch.tensor([rows[i][1] for i in part], dtype=torch.int64),
            torch.tensor([rows[i][2] for i in part], dtype=torch.int64),
        )
        for part in parts
        if len(part)
    ]
