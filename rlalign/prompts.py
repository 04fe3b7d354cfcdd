"""Stage (1): prompts -> PromptBatch. A group is one prompt rendered `images_per_prompt` times with distinct seeds.

The source walks a shuffled prompt list with a cursor (saved in checkpoints, so a resumed run continues where it
stopped). Training seeds count up from the run seed; evaluation seeds start at `eval.seed`, far above anything
training reaches, so held-out images never reuse a training seed.

`prompts.sampling=adaptive` draws each group's prompt instead, more often where the policy does worst
(`PromptRewards`): a reward gets better fastest where it is lowest, and a prompt the policy already gets right
spends sampling on groups whose images all score alike. The draw for cursor position c is a pure function of
(seed, c, the running rewards), and the running rewards are checkpointed, so a resume stays exact.
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


class PromptRewards:
    """Running mean of the policy's own reward per prompt, and the sampling probabilities it implies.

    p(prompt i) = floor / N + (1 - floor) * gap_i / sum(gap), gap_i = max_j mean_j - mean_i: a prompt's share
    beyond the uniform floor is its distance below the best prompt. Differences of means, so any reward scale or
    offset gives the same draw. A prompt not yet seen counts as the largest gap seen (it gets explored), and
    before any reward, or when every mean is equal, the draw is uniform. Update: mean <- decay * mean +
    (1 - decay) * (mean of this batch's rewards for the prompt); the first observation sets it.
    """

    def __init__(self, prompts: list[str], floor: float, decay: float) -> None:
        self.prompts, self.floor, self.decay = prompts, floor, decay
        self.means: dict[str, float] = {}

    def observe(self, prompts: list[str], rewards: np.ndarray) -> None:
        """Fold one batch of (prompt, reward) into the running means (rewards of one prompt averaged first)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
        for prompt in dict.fromkeys(prompts):
            value = float(rewards[[p == prompt for p in prompts]].mean())
            old = self.means.get(prompt)
            self.means[prompt] = value if old is None else self.decay * old + (1 - self.decay) * value

    def probabilities(self) -> np.ndarray:
        """[N] sampling probability of each entry of the prompt list (a repeated line keeps its own share)."""
        n = len(self.prompts)
        uniform = np.full(n, 1.0 / n)
        if not self.means:
            return uniform
        best, worst = max(self.means.values()), min(self.means.values())
        gaps = np.array([best - self.means.get(p, worst) for p in self.prompts])  # unseen: the largest gap seen
        if gaps.sum() <= 0:
            return uniform
        return self.floor * uniform + (1 - self.floor) * gaps / gaps.sum()

    def state_dict(self) -> dict[str, float]:
        return dict(self.means)

    def load_state_dict(self, means: dict[str, float]) -> None:
        self.means = {str(k): float(v) for k, v in means.items()}


class PromptSource:
    def __init__(self, cfg: PromptsCfg, seed: int) -> None:
        self.prompts = load_prompts(cfg)
        self.seed = seed
        self.state = PromptSourceState()
        self.rewards = (
            PromptRewards(self.prompts, cfg.adaptive_floor, cfg.adaptive_decay) if cfg.sampling == "adaptive" else None
        )

    def _prompt(self, index: int, probabilities: np.ndarray | None) -> str:
        if probabilities is not None:  # adaptive: an independent draw per cursor position
            rng = np.random.default_rng([self.seed, index])
            return self.prompts[int(rng.choice(len(self.prompts), p=probabilities))]
        epoch, pos = divmod(index, len(self.prompts))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
        return self.prompts[int(order[pos])]

    def next(self, groups_per_split: int, images_per_prompt: int, splits: int) -> list[PromptBatch]:
        """`splits` batches (one per sampler), each `groups_per_split` groups of `images_per_prompt` images."""
        batches = []
        probabilities = None if self.rewards is None else self.rewards.probabilities()
        for _ in range(splits):
            prompts, gids, seeds = [], [], []
            for _ in range(groups_per_split):
                prompt = self._prompt(self.state.cursor, probabilities)
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
