"""The "digit_prompt" reward: prompt parsing, classifier accuracy, scoring, gradients, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reward_servers.base import DifferentiableRewardModel, RewardModel
from reward_servers.digit_prompt import (
    DigitClassifier,
    DigitPromptReward,
    _split,
    digit_from_prompt,
    load_digits_tensor,
    train_digit_classifier,
)

IMAGE_SIZE = 32


@pytest.mark.parametrize(
    ("prompt", "digit"),
    [
        ("7", 7),
        ("seven", 7),
        ("a handwritten digit seven", 7),
        ("the number 7", 7),
        ("digit 7", 7),
        ("A Drawing of the digit 0", 0),
        ("  NINE ", 9),
        ("seven, 7", 7),  # consistent repeats are fine
    ],
)
def test_digit_from_prompt(prompt: str, digit: int) -> None:
    assert digit_from_prompt(prompt) == digit


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("", "names no digit"),
        ("a photo of a cat", "names no digit"),
        ("the number 12", "not a single digit"),
        ("seven or eight", "several digits"),
        ("3 and 4", "several digits"),
        (7, "must be a str"),
    ],
)
def test_digit_from_prompt_rejects(prompt: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        digit_from_prompt(prompt)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained() -> tuple[DigitClassifier, float]:
    # one thread: on the shared 2-core machine two OpenMP threads next to other jobs ran up to 10x slower
    torch.set_num_threads(1)
    return train_digit_classifier(IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def reward(trained: tuple[DigitClassifier, float]) -> DigitPromptReward:
    return DigitPromptReward(trained[0])


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    """20 held-out digits (the classifier's seed-0 test split) as float32 [B, H, W, 3] in [0, 1] and labels."""
    images, labels = load_digits_tensor(IMAGE_SIZE)
    _, test = _split(len(images), labels, seed=0, heldout=0.2)
    idx = test[:20]
    rgb = images[idx].repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)
    return rgb, labels[idx].numpy()


def _uint8(images: np.ndarray) -> np.ndarray:
    return np.round(images * 255).astype(np.uint8)


def test_classifier_heldout_accuracy(trained: tuple[DigitClassifier, float]) -> None:
    assert trained[1] >= 0.95


def test_protocols(reward: DigitPromptReward) -> None:
    assert isinstance(reward, RewardModel)
    assert isinstance(reward, DifferentiableRewardModel)
    assert reward.name == "digit_prompt" and reward.differentiable


def test_score_reads_the_prompted_digit(reward: DigitPromptReward, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = heldout
    right = reward.score(_uint8(images), [str(d) for d in labels])
    wrong = reward.score(_uint8(images), [str((d + 1) % 10) for d in labels])
    assert right.dtype == np.float32 and right.shape == (len(images),)
    assert ((right >= 0) & (right <= 1)).all()
    assert right.mean() > 0.8 and wrong.mean() < 0.2
    assert (reward.predict_digits(_uint8(images)) == labels).mean() >= 0.9


def test_score_order_preserved(reward: DigitPromptReward, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = heldout
    prompts = [f"a handwritten digit {d}" for d in labels]
    forward = reward.score(_uint8(images), prompts)
    backward = reward.score(_uint8(images[::-1]), prompts[::-1])
    np.testing.assert_allclose(backward, forward[::-1], rtol=1e-5, atol=1e-6)
    singles = np.concatenate([reward.score(_uint8(images[i : i + 1]), prompts[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(singles, forward[:3], rtol=1e-5, atol=1e-6)


def test_score_and_grad_matches_finite_differences(
    reward: DigitPromptReward, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = heldout
    x = (0.1 + 0.8 * images[:2]).astype(np.float32)  # stay inside [0, 1] under ± eps
    prompts = [str(d) for d in labels[:2]]
    scores, grads = reward.score_and_grad(x, prompts)
    assert grads.shape == x.shape and grads.dtype == np.float32
    np.testing.assert_allclose(scores, reward.score_and_grad(x, prompts)[0])
    eps = 1e-3
    for b in range(2):
        # the two pixels with the largest gradient carry a clear signal above float32 noise
        flat = np.argsort(np.abs(grads[b]).ravel())[-2:]
        for i in flat:
            pos = np.unravel_index(i, grads[b].shape)
            up, down = x.copy(), x.copy()
            up[(b, *pos)] += eps
            down[(b, *pos)] -= eps
            fd = (reward.score_and_grad(up, prompts)[0][b] - reward.score_and_grad(down, prompts)[0][b]) / (2 * eps)
            assert fd == pytest.approx(float(grads[(b, *pos)]), rel=0.1, abs=1e-4)
    # and along a random direction (all pixels at once), on blends of two digits: p is far from 0 and 1 there, so
    # the gradient stands well above float32 rounding
    blend = (0.1 + 0.8 * (0.5 * images[:4] + 0.5 * images[4:8])).astype(np.float32)
    prompts = [str(d) for d in labels[:4]]
    scores, grads = reward.score_and_grad(blend, prompts)
    d = np.random.default_rng(0).standard_normal(blend.shape).astype(np.float32) * 0.05
    eps = 2e-3  # small: the CNN is piecewise linear (ReLU, max-pool), a long step crosses kinks
    plus = reward.score_and_grad(blend + eps * d, prompts)[0]
    minus = reward.score_and_grad(blend - eps * d, prompts)[0]
    fd, analytic = (plus - minus) / (2 * eps), (grads * d).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(fd, analytic, rtol=0.1, atol=0.05 * np.abs(analytic).max())


def test_other_resolutions_are_resized(reward: DigitPromptReward, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = heldout
    small = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(16, 16), mode="area")
    small_np = small.permute(0, 2, 3, 1).contiguous().numpy()
    assert (reward.predict_digits(_uint8(small_np)) == labels).mean() >= 0.85
    _, grads = reward.score_and_grad(small_np.astype(np.float32), [str(d) for d in labels])
    assert grads.shape == small_np.shape and np.abs(grads).sum() > 0


@pytest.mark.parametrize(
    ("make", "prompts", "match"),
    [
        (lambda: np.zeros((2, 32, 32, 3), np.float32), ["1", "2"], "must be uint8"),
        (lambda: np.zeros((2, 32, 32), np.uint8), ["1", "2"], r"\[B, H, W, 3\]"),
        (lambda: np.zeros((2, 32, 32, 4), np.uint8), ["1", "2"], r"\[B, H, W, 3\]"),
        (lambda: np.zeros((2, 3, 32, 32), np.uint8), ["1", "2"], r"\[B, H, W, 3\]"),
        (lambda: np.zeros((2, 32, 32, 3), np.uint8), ["1"], "one prompt per image"),
        (lambda: [[0]], ["1"], "numpy array"),
        (lambda: np.zeros((1, 32, 32, 3), np.uint8), ["a cat"], "names no digit"),
    ],
)
def test_score_rejects_bad_batches(reward: DigitPromptReward, make, prompts: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reward.score(make(), prompts)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (np.zeros((1, 32, 32, 3), np.uint8), "must be float32"),
        (np.full((1, 32, 32, 3), 255.0, np.float32), r"in \[0, 1\]"),
        (np.full((1, 32, 32, 3), np.nan, np.float32), "NaN"),
        (np.zeros((1, 32, 32, 3), np.float64), "must be float32"),
    ],
)
def test_score_and_grad_rejects_bad_batches(reward: DigitPromptReward, images: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reward.score_and_grad(images, ["3"])


def test_save_load_round_trip(tmp_path, trained, heldout) -> None:
    model, acc = trained
    model.save(tmp_path / "clf", heldout_accuracy=acc, seed=0)
    loaded = DigitPromptReward.from_dir(tmp_path / "clf")
    images, labels = heldout
    prompts = [str(d) for d in labels]
    np.testing.assert_array_equal(
        loaded.score(_uint8(images), prompts), DigitPromptReward(model).score(_uint8(images), prompts)
    )
    assert loaded.classifier.image_size == IMAGE_SIZE


def test_from_dir_names_missing_file(tmp_path, trained) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DigitPromptReward.from_dir(tmp_path / "nowhere")
    trained[0].save(tmp_path / "clf")
    (tmp_path / "clf" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        DigitPromptReward.from_dir(tmp_path / "clf")
    (tmp_path / "clf" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        DigitPromptReward.from_dir(tmp_path / "clf")


def test_log_prob_variant(trained, heldout) -> None:
    images, labels = heldout
    prompts = [str(d) for d in labels]
    p = DigitPromptReward(trained[0]).score(_uint8(images), prompts)
    logp = DigitPromptReward(trained[0], log_prob=True).score(_uint8(images), prompts)
    np.testing.assert_allclose(np.exp(logp), p, rtol=1e-4, atol=1e-6)
