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
        from reward_servers.digit_prompt import digit_from_prompt

        wanted = np.array([digit_from_prompt(p) for p in prompts])
        read = np.asarray(self.classifier.predict_digits(images))
        judged = self.judge.predict(_to_8x8(images))
        return {
            "eval/digit_accuracy": float((read == wanted).mean()),
            "eval/judge_accuracy": float((judged == wanted).mean()),
        }


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
