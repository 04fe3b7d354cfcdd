"""A small preference set for the embedded digits model, made from its own samples (`rlalign data digits-prefs`).

For each training prompt (rlalign/models/digits.py `all_digit_prompts`, visited in a seeded shuffled order) the
digits model renders k images with distinct seeds; the model's digit classifier scores each by the probability of
the prompted digit. One pair per group: the most confident correct image against the least likely wrong one, or,
when all k are right (or all wrong), the highest against the lowest probability; groups whose gap is below
`min_gap` are skipped (no preference worth learning). The winner's side (jpg_0 or jpg_1) is a seeded coin flip, so
a reader that ignores the labels cannot pass by taking jpg_0.

Written in the Pick-a-Pic v2 layout that rlalign/offline/prefs.py reads: `OUT/train.parquet` (caption, jpg_0,
jpg_1 as JPEG bytes at the model's native resolution, label_0, label_1, plus the prompted digit, seeds, classifier
reads and probabilities), with `OUT/summary.json` and `OUT/README.md`.

Seeds are `seed * 1_000_003 + image counter` (the online prompt source's form, rlalign/prompts.py), far below the
held-out evaluation seeds (`eval.seed`, 2**62 up, rlalign/config.py), so no evaluation image is ever trained on.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

__all__ = ["DEFAULT_SAMPLING", "choose_pair", "make_digits_prefs"]

DEFAULT_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 3.0, "eta": 1.0}  # the default build's settings
JPEG_QUALITY = 95
SEED_STRIDE = 1_000_003  # rlalign/prompts.py PromptSource: run seed * 1_000_003 + image counter
EVAL_SEED_FLOOR = 1 << 62  # rlalign/config.py EvalCfg.seed


def choose_pair(prob: np.ndarray, correct: np.ndarray, min_gap: float) -> tuple[int, int] | None:
    """One group's pair (winner index, loser index), or None when the gap is below `min_gap`.

    prob [k]: classifier probability of the prompted digit; correct [k] bool: the classifier reads that digit.
    Correct vs wrong when the group has both (the best correct, the least likely wrong), else highest vs lowest.
    """
    if correct.any() and not correct.all():
        right, wrong = np.flatnonzero(correct), np.flatnonzero(~correct)
        win, lose = int(right[np.argmax(prob[right])]), int(wrong[np.argmin(prob[wrong])])
    else:
        win, lose = int(np.argmax(prob)), int(np.argmin(prob))
    return (win, lose) if prob[win] - prob[lose] >= min_gap else None


@dataclass(frozen=True)
class _Group:
    digit: int
    prompt: str
    seeds: list[int]


def _groups(seed: int, images_per_prompt: int) -> Iterator[_Group]:
    """Training prompts in a seeded order, reshuffled each pass, each with `images_per_prompt` fresh seeds."""
    from rlalign.models.digits import all_digit_prompts

    prompts = all_digit_prompts()
    counter = 0
    for epoch in range(1 << 30):
        for index in np.random.default_rng([seed, 0, epoch]).permutation(len(prompts)):
            digit, prompt = prompts[int(index)]
            seeds = [seed * SEED_STRIDE + counter + j for j in range(images_per_prompt)]
            counter += images_per_prompt
            yield _Group(digit, prompt, seeds)


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _sampling(model_dir: Path) -> dict[str, Any]:
    """The sampling settings the model was built and measured with (build_info.json), else DEFAULT_SAMPLING."""
    info = model_dir / "build_info.json"
    stored = json.loads(info.read_text()).get("sampling", {}) if info.is_file() else {}
    return {**DEFAULT_SAMPLING, **{k: v for k, v in stored.items() if k in DEFAULT_SAMPLING}}


def _row(
    group: _Group, images: np.ndarray, prob: np.ndarray, read: np.ndarray, pair: tuple[int, int], side: int
) -> dict[str, Any]:
    """A Pick-a-Pic row with the winner at jpg_<side>."""
    order = pair if side == 0 else pair[::-1]
    return {
        "caption": group.prompt,
        "jpg_0": _jpeg(images[order[0]]),
        "jpg_1": _jpeg(images[order[1]]),
        "label_0": 1.0 if side == 0 else 0.0,
        "label_1": 0.0 if side == 0 else 1.0,
        "digit": group.digit,
        "seed_0": group.seeds[order[0]],
        "seed_1": group.seeds[order[1]],
        "classifier_digit_0": int(read[order[0]]),
        "classifier_digit_1": int(read[order[1]]),
        "classifier_prob_0": float(prob[order[0]]),
        "classifier_prob_1": float(prob[order[1]]),
    }


def _summary(rows: list[dict[str, Any]], **facts: Any) -> dict[str, Any]:
    """Pair counts and the classifier's view of winners and losers."""
    win = np.array([r["label_0"] == 0.0 for r in rows], dtype=np.int64)  # 0 or 1: the winner's side
    digit = np.array([r["digit"] for r in rows])
    read = np.array([[r["classifier_digit_0"], r["classifier_digit_1"]] for r in rows])
    prob = np.array([[r["classifier_prob_0"], r["classifier_prob_1"]] for r in rows])
    at = np.arange(len(rows))
    return {
        "pairs": len(rows),
        **facts,
        "classifier_accuracy_winners": float((read[at, win] == digit).mean()),
        "classifier_accuracy_losers": float((read[at, 1 - win] == digit).mean()),
        "mean_prob_winners": float(prob[at, win].mean()),
        "mean_prob_losers": float(prob[at, 1 - win].mean()),
        "winner_is_jpg_0": float((win == 0).mean()),
        "pairs_per_digit": np.bincount(digit, minlength=10).tolist(),
    }


def _readme(summary: dict[str, Any]) -> str:
    return (
        "# Digits preference pairs\n\n"
        f"{summary['pairs']} pairs made by `rlalign data digits-prefs` from the embedded digits model's own samples "
        f"({summary['model_dir']}, seed {summary['seed']}, {summary['images_per_prompt']} images per prompt, "
        f"{summary['groups_sampled']} prompt groups sampled, {summary['groups_skipped']} skipped with a probability "
        f"gap below {summary['min_gap']}).\n\n"
        "`train.parquet` has Pick-a-Pic v2's columns: `caption`, `jpg_0`, `jpg_1` (JPEG bytes, "
        f"{summary['resolution']} px), `label_0`, `label_1` (1 marks the preferred image), plus `digit`, `seed_0/1`, "
        "`classifier_digit_0/1` and `classifier_prob_0/1` (the classifier's read and its probability of the "
        "prompted digit).\n\n"
        f"The classifier reads the prompted digit in {summary['classifier_accuracy_winners']:.1%} of winners and "
        f"{summary['classifier_accuracy_losers']:.1%} of losers (mean probability {summary['mean_prob_winners']:.3f} "
        f"vs {summary['mean_prob_losers']:.3f}). `summary.json` holds these numbers.\n"
    )


@dataclass(frozen=True)
class _Plan:
    pairs: int
    seed: int
    images_per_prompt: int
    min_gap: float
    prompts_per_call: int
    max_groups: int


def _collect(
    pipe: Any, reward: Any, sampling: dict[str, Any], plan: _Plan, progress: bool
) -> tuple[list[dict[str, Any]], int, int]:
    """Sample groups until `plan.pairs` pairs (or `plan.max_groups` groups): (rows, groups used, images sampled).

    Groups and seeds do not depend on `prompts_per_call` (one generator per image), so neither do the pairs.
    """
    from rlalign.models.digits import _progress, sample_prompts  # the digits build's own progress bar

    k = plan.images_per_prompt
    groups, sides = _groups(plan.seed, k), np.random.default_rng([plan.seed, 1])
    rows: list[dict[str, Any]] = []
    seen = images_sampled = 0
    with _progress(progress) as bar:
        task = bar.add_task("digits preference pairs", total=plan.pairs)
        while len(rows) < plan.pairs and seen < plan.max_groups:
            chunk = [next(groups) for _ in range(min(plan.prompts_per_call, plan.max_groups - seen))]
            prompts = [g.prompt for g in chunk for _ in g.seeds]
            images = sample_prompts(pipe, prompts, [s for g in chunk for s in g.seeds], **sampling)
            probs = reward.probabilities(images)  # [len(chunk) * k, 10]
            images_sampled += len(images)
            for i, group in enumerate(chunk):
                if len(rows) == plan.pairs:
                    break
                seen += 1
                prob, read = probs[i * k : (i + 1) * k, group.digit], probs[i * k : (i + 1) * k].argmax(-1)
                pair = choose_pair(prob, read == group.digit, plan.min_gap)
                if pair is not None:
                    side = int(sides.integers(2))
                    rows.append(_row(group, images[i * k : (i + 1) * k], prob, read, pair, side))
            skipped = seen - len(rows)
            bar.update(task, completed=len(rows), description=f"digits preference pairs ({skipped} groups skipped)")
    return rows, seen, images_sampled


def make_digits_prefs(
    out_dir: str | Path,
    pairs: int,
    *,
    model_dir: str | Path | None = None,
    seed: int = 0,
    images_per_prompt: int = 8,
    min_gap: float = 0.1,
    prompts_per_call: int = 8,
    max_groups: int | None = None,
    progress: bool = True,
    num_threads: int | None = 1,
) -> dict[str, Any]:
    """Write `pairs` preference pairs to `out_dir` (train.parquet, summary.json, README.md); returns the summary.

    `model_dir`: a built digits model (default: the cached embedded model, built on first use). Deterministic for
    a seed on one machine: each image has its own seeded generator, and torch runs on `num_threads` threads (one
    by default: these small ops gain nothing from more, and the thread count can change float results).
    `max_groups` (default 20 x pairs + 40) stops a model whose groups never show a gap of `min_gap`.
    """
    import torch

    from rlalign.models.digits import ensure_digits_model, load_digit_reward, load_digits_pipeline

    if pairs < 1 or images_per_prompt < 2:
        raise ValueError(f"need pairs >= 1 and images_per_prompt >= 2, got {pairs} and {images_per_prompt}")
    if not 0 <= seed < 2**31:  # seed * SEED_STRIDE + counter then stays far below EVAL_SEED_FLOOR
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    start = time.monotonic()
    model_path = Path(model_dir) if model_dir is not None else ensure_digits_model(progress=progress)
    pipe, reward, sampling = load_digits_pipeline(model_path), load_digit_reward(model_path), _sampling(model_path)
    plan = _Plan(pairs, seed, images_per_prompt, min_gap, prompts_per_call, max_groups or 20 * pairs + 40)
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        rows, groups_seen, images_sampled = _collect(pipe, reward, sampling, plan, progress)
    finally:
        torch.set_num_threads(threads_before)
    if len(rows) < pairs:
        raise RuntimeError(
            f"only {len(rows)} of {pairs} pairs after {groups_seen} prompt groups: too few groups show a probability "
            f"gap >= {min_gap}; lower min_gap or raise images_per_prompt"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "train.parquet")
    resolution = Image.open(io.BytesIO(rows[0]["jpg_0"])).size[0]
    summary = _summary(
        rows,
        seed=seed,
        model_dir=str(model_path),
        images_per_prompt=images_per_prompt,
        min_gap=min_gap,
        groups_sampled=groups_seen,
        groups_skipped=groups_seen - len(rows),
        images_sampled=images_sampled,
        resolution=resolution,
        sampling=sampling,
        seconds=round(time.monotonic() - start, 2),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(_readme(summary))
    return summary
