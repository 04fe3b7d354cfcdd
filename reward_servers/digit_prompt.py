"""The "digit_prompt" reward: probability that an image shows the digit its prompt asks for.

A small CNN trained in seconds on scikit-learn's bundled `load_digits` (8x8 digits upscaled to the generated image
resolution). It is both the training reward of the embedded digits model and the measure of prompt accuracy.
Differentiable end to end, so `score_and_grad` returns the pixel gradient that TailorPO-G chains back.
Never imports `rlalign`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from reward_servers.base import check_images

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

_WORD_RE = re.compile(r"[a-z]+|\d+")


def digit_from_prompt(prompt: str) -> int:
    """The one digit a prompt names: "7", "seven", "a handwritten digit seven", "the number 7", "digit 7".

    Raises ValueError when the prompt names no digit, several different digits, or a multi-digit number.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    found: set[int] = set()
    for token in _WORD_RE.findall(prompt.lower()):
        if token.isdigit():
            if len(token) != 1:
                raise ValueError(f"prompt {prompt!r} names the number {token}, not a single digit 0-9")
            found.add(int(token))
        elif token in DIGIT_WORDS:
            found.add(DIGIT_WORDS.index(token))
    if not found:
        raise ValueError(f"prompt {prompt!r} names no digit (expected e.g. '7', 'seven', 'a handwritten digit seven')")
    if len(found) > 1:
        raise ValueError(f"prompt {prompt!r} names several digits {sorted(found)}; expected exactly one")
    return found.pop()


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild a DigitClassifier; saved as config.json beside the weights."""

    image_size: int = 32
    width: int = 16
    work_size: int = 16
    heldout_accuracy: float | None = None
    seed: int | None = None


class DigitClassifier(nn.Module):
    """3-conv CNN on grayscale images in [0, 1].

    `image_size` is the resolution it was trained for (the generated images'); inside, every input is resized with
    differentiable torch ops to `work_size` (16: the 8x8 originals hold no finer detail, and it is ~10x cheaper).
    """

    def __init__(self, image_size: int = 32, width: int = 16, work_size: int = 16) -> None:
        super().__init__()
        self.image_size, self.width, self.work_size = image_size, width, work_size
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # fixed 4x4 grid whatever image_size is: keeps the head size independent
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(4 * w * 16, 10),
        )

    def preprocess(self, images: Tensor) -> Tensor:
        """[B, C, H, W] (C = 1 or 3) in [0, 1] -> [B, 1, S, S] centred grayscale at the working resolution."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected [B, 1|3, H, W] images, got shape {tuple(images.shape)}")
        gray = images.mean(dim=1, keepdim=True)  # generated RGB digits are near-gray; the mean keeps gradients to all
        size = (self.work_size, self.work_size)
        if gray.shape[-2:] != size:
            # area averages when shrinking (no aliasing); bilinear when enlarging. Both are differentiable.
            mode = "area" if gray.shape[-1] > self.work_size else "bilinear"
            gray = F.interpolate(gray, size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
        return gray - 0.5

    def forward(self, images: Tensor) -> Tensor:
        """[B, C, H, W] in [0, 1] -> logits [B, 10]."""
        return self.net(self.preprocess(images))

    def save(self, path: str | Path, **extra: float | int | None) -> None:
        """Write model.safetensors + config.json into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / WEIGHTS_FILE))
        config = ClassifierConfig(image_size=self.image_size, width=self.width, work_size=self.work_size, **extra)  # type: ignore[arg-type]
        (path / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
        """Load a classifier saved by `save`; the error names any missing file."""
        path = Path(path)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"digit classifier directory {str(path)!r} is missing {name!r}")
        config = json.loads((path / CONFIG_FILE).read_text())
        model = cls(
            image_size=int(config["image_size"]), width=int(config["width"]), work_size=int(config["work_size"])
        )
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE), device=str(device)))
        return model.to(device).eval()


def load_digits_tensor(image_size: int) -> tuple[Tensor, Tensor]:
    """sklearn's 1797 bundled digits as ([N, 1, S, S] float32 in [0, 1], bilinear upscale; [N] int64 labels)."""
    from sklearn.datasets import load_digits  # deferred: sklearn import is ~1 s and only training needs it

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1), torch.tensor(data.target, dtype=torch.int64)


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Mild augmentation so the classifier also reads generated digits: small shift/scale, contrast, noise."""
    b = images.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    scale = uniform(0.9, 1.1, b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = uniform(-0.12, 0.12, b, 2)  # ±6 % of the width: about half a pixel of the 8x8 original
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out * uniform(0.7, 1.15, b, 1, 1, 1) + 0.05 * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def _split(n: int, labels: Tensor, seed: int, heldout: float) -> tuple[Tensor, Tensor]:
    """Stratified train / held-out index split, deterministic for a seed."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(np.arange(n), test_size=heldout, random_state=seed, stratify=labels.numpy())
    return torch.as_tensor(train), torch.as_tensor(test)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of `model` on [N, C, H, W] images in [0, 1]."""
    was_training = model.training
    model.eval()
    acc = float((model(images).argmax(-1) == labels).float().mean())
    model.train(was_training)
    return acc


def train_digit_classifier(
    image_size: int = 32,
    seed: int = 0,
    *,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 16,
    work_size: int = 16,
    heldout: float = 0.2,
) -> tuple[DigitClassifier, float]:
    """Train on load_digits upscaled to `image_size` -> (classifier in eval mode, held-out accuracy)."""
    images, labels = load_digits_tensor(image_size)
    train_idx, test_idx = _split(len(images), labels, seed, heldout)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        model = DigitClassifier(image_size=image_size, width=width, work_size=work_size)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * ((len(train_idx) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        model.train()
        for _ in range(epochs):
            order = train_idx[torch.randperm(len(train_idx), generator=generator)]
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(model(augment(images[idx], generator)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    return model, accuracy(model, images[test_idx], labels[test_idx])


def _to_nchw(images: np.ndarray) -> Tensor:
    """[B, H, W, 3] uint8 or float32 in [0, 1] -> float32 [B, 3, H, W] in [0, 1]."""
    x = torch.from_numpy(np.array(images, copy=True))  # Ray's object store hands out read-only arrays
    x = x.float() / 255.0 if images.dtype == np.uint8 else x.float()
    return x.permute(0, 3, 1, 2)


def _check_float_range(images: np.ndarray) -> None:
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"float images must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


class DigitPromptReward:
    """RewardModel "digit_prompt": p(prompted digit | image) from a DigitClassifier (or log p with `log_prob`)."""

    name = "digit_prompt"
    differentiable = True

    def __init__(self, classifier: DigitClassifier, *, log_prob: bool = False, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.classifier = classifier.to(self.device).eval().requires_grad_(False)
        self.log_prob = log_prob

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs: object) -> DigitPromptReward:
        """Load from a directory written by `DigitClassifier.save` (config.json + model.safetensors)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"digit classifier directory {str(path)!r} does not exist")
        device = str(kwargs.get("device", "cpu"))
        return cls(DigitClassifier.load(path, device=device), **kwargs)  # type: ignore[arg-type]

    def _targets(self, prompts: Sequence[str]) -> Tensor:
        return torch.tensor([digit_from_prompt(p) for p in prompts], dtype=torch.int64, device=self.device)

    def _reward(self, x: Tensor, targets: Tensor) -> Tensor:
        logp = torch.log_softmax(self.classifier(x), dim=-1).gather(1, targets[:, None])[:, 0]
        return logp if self.log_prob else logp.exp()

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """images [B, H, W, 3] uint8 -> [B] float32 reward."""
        check_images(images, prompts)
        targets = self._targets(prompts)
        with torch.no_grad():
            return self._reward(_to_nchw(images).to(self.device), targets).cpu().numpy().astype(np.float32)

    def score_and_grad(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """images [B, H, W, 3] float32 in [0, 1] -> (rewards [B], d reward / d images [B, H, W, 3])."""
        check_images(images, prompts, dtype=np.float32)
        _check_float_range(images)
        targets = self._targets(prompts)
        x = torch.from_numpy(np.array(images, copy=True)).to(self.device).requires_grad_(True)
        with torch.enable_grad():
            reward = self._reward(x.permute(0, 3, 1, 2), targets)
            (grad,) = torch.autograd.grad(reward.sum(), x)  # rows are independent, so the sum's grad is per-row
        return reward.detach().cpu().numpy().astype(np.float32), grad.cpu().numpy().astype(np.float32)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """images [B, H, W, 3] uint8 (or float32 in [0, 1]) -> [B, 10] class probabilities."""
        if not isinstance(images, np.ndarray):
            raise ValueError(f"images must be a numpy array, got {type(images).__name__}")
        dtype = np.float32 if images.dtype == np.float32 else np.uint8
        check_images(images, [""] * len(images), dtype=dtype)
        if dtype == np.float32:
            _check_float_range(images)
        with torch.no_grad():
            return torch.softmax(self.classifier(_to_nchw(images).to(self.device)), -1).cpu().numpy()

    def features(self, images: np.ndarray) -> np.ndarray:
        """images [B, H, W, 3] uint8 -> [B, 64 * width] float32: the classifier's penultimate activations (the
        input of its last linear layer), the space the monitor measures drift from the base model in."""
        check_images(images, [""] * len(images))
        trunk = self.classifier.net[:-1]  # everything before the final Linear (dropout is off in eval mode)
        with torch.no_grad():
            x = self.classifier.preprocess(_to_nchw(images).to(self.device))
            return trunk(x).cpu().numpy().astype(np.float32)

    def predict_digits(self, images: np.ndarray) -> np.ndarray:
        """images [B, H, W, 3] uint8 (or float32 in [0, 1]) -> [B] int64 argmax digit (for prompt accuracy)."""
        return self.probabilities(images).argmax(-1).astype(np.int64)
