"""The digits evaluation's per-digit breakdown, with stand-in readers (no model): hand-counted expectations."""

from __future__ import annotations

import numpy as np

from rlalign.evaluation import Evaluator


class _Reader:
    def __init__(self, answers: list[int]) -> None:
        self.answers = np.array(answers)

    def predict_digits(self, images: np.ndarray) -> np.ndarray:
        return self.answers[: len(images)]

    def predict(self, features: np.ndarray) -> np.ndarray:
        assert features.shape[1] == 64  # the judge reads sklearn's 8x8 layout
        return self.answers[: len(features)]


def test_per_digit_counts_by_hand() -> None:
    evaluator = Evaluator.__new__(Evaluator)  # stand-in readers instead of the model's classifier and judge
    evaluator.classifier = _Reader([8, 8, 0, 9, 9])
    evaluator.judge = _Reader([8, 0, 0, 9, 8])
    images = np.zeros((5, 16, 16, 3), np.uint8)
    prompts = ["8", "a handwritten digit eight", "8", "9", "the number nine"]
    table = evaluator.per_digit(images, prompts)
    assert table == {
        8: {"n": 3, "classifier": 2 / 3, "judge": 1 / 3, "judged_as": [2, 0, 0, 0, 0, 0, 0, 0, 1, 0]},
        9: {"n": 2, "classifier": 1.0, "judge": 0.5, "judged_as": [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]},
    }
    assert evaluator.metrics(images, prompts) == {"eval/digit_accuracy": 0.8, "eval/judge_accuracy": 0.4}
