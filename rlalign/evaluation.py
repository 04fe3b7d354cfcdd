"""Held-out evaluation metrics for the embedded digits model.

Prompt accuracy is read by the same digits classifier the `digit_prompt` reward uses. Because a policy can learn
to please one classifier without drawing better digits, an independent judge (an RBF-SVC trained on scikit-learn's
original 8x8 digits, reading images averaged down to 8x8) is logged beside it (docs/algorithms/digits-calibration.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Evaluator:
    def __init__(self, model_dir: str | Path) -> None:
        from reward_servers.digit_prompt import DigitPromptReward

        self.classifier = DigitPromptReward.from_dir(Path(model_dir) / "digit_classifier")
        self.judge = _train_judge()

    def metrics(self, images: np.ndarray, prompts: list[str]) -> dict[str, float]:
        wanted, read, judged = self._reads(images, prompts)
        return {
            "eval/digit_accuracy": float((read == wanted).mean()),
            "eval/judge_accuracy": float((judged == wanted).mean()),
        }

    def per_digit(self, images: np.ndarray, prompts: list[str]) -> dict[int, dict[str, object]]:
        """Per prompted digit: how many images, the classifier's and the judge's accuracy on them, and what the judge
        read them as ([10] counts): where a run's remaining errors are (docs/benchmarks.md, the weak digit)."""
        wanted, read, judged = self._reads(images, prompts)
        out: dict[int, dict[str, object]] = {}
        for digit in sorted(set(wanted.tolist())):
            rows = wanted == digit
            out[digit] = {
                "n": int(rows.sum()),
                "classifier": float((read[rows] == digit).mean()),
                "judge": float((judged[rows] == digit).mean()),
                "judged_as": np.bincount(judged[rows], minlength=10).tolist(),
            }
        return out

    def _reads(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompted digit, classifier's argmax, judge's prediction), each [B] int64."""
        from reward_servers.digit_prompt import digit_from_prompt

        wanted = np.array([digit_from_prompt(p) for p in prompts], dtype=np.int64)
        read = np.asarray(self.classifier.predict_digits(images), dtype=np.int64)
        judged = np.asarray(self.judge.predict(_to_8x8(images)), dtype=np.int64)
        return wanted, read, judged


def _train_judge():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(kernel="rbf", gamma=0.001, C=10.0).fit(digits.data, digits.target)


def _to_8x8(images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] uint8 -> [B, 64] in sklearn's 0..16 ink scale (white digit on black, as load_digits)."""
    gray = images.astype(np.float64).mean(axis=-1) / 255.0
    b, h, w = gray.shape
    fh, fw = h // 8, w // 8
    small = gray[:, : fh * 8, : fw * 8].reshape(b, 8, fh, 8, fw).mean(axis=(2, 4))
    return (small * 16.0).reshape(b, 64)
