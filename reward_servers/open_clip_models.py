"""open_clip-based rewards: CLIP score, LAION aesthetic score, HPS v2. Differentiable in the pixels.

Real weights load from a local directory (no hub here): open_clip's architecture is built with random init and
the checkpoint file is loaded into it with `open_clip.load_checkpoint` (handles `state_dict` wrappers and
`module.` prefixes). Tiny builds use open_clip's `CLIP` class with small tower configs and the real BPE tokenizer,
which open_clip ships. open_clip needs torchvision (torch==2.14.1 torchvision==0.29.1 here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from reward_servers.base import check_images
from reward_servers.torch_base import TorchReward, clip_preprocess
from reward_servers.weights import require_dir, require_file

# File names as open_clip's models are published (e.g. the `timm/vit_large_patch14_clip_224.openai` repo).
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HPS_FILES = {"v2.1": "HPS_v2.1_compressed.pt", "v2": "HPS_v2_compressed.pt"}


def build_open_clip(arch: str, checkpoint: Path | None, quick_gelu: bool, device: str | torch.device) -> nn.Module:
    """open_clip model `arch` with weights from `checkpoint` (None: random init; tests only)."""
    import open_clip

    model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu, device="cpu")
    if checkpoint is not None:
        open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    return model.to(device).eval()


def build_tiny_open_clip(seed: int = 0, embed_dim: int = 16) -> nn.Module:
    """A ~1.7 M-parameter open_clip CLIP (32x32 images, 1-layer towers, real 49,408-token vocabulary), seeded."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    return CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text).eval()


def open_clip_tokenizer(arch: str = "ViT-L-14") -> Any:
    """open_clip's own BPE tokenizer (shipped in the package, no download): prompts -> [B, 77] int64."""
    import open_clip

    return open_clip.get_tokenizer(arch)


class _OpenClipReward(TorchReward):
    """Holds an open_clip model + tokenizer; embeds images (in torch, differentiable) and prompts."""

    def __init__(self, model: nn.Module, tokenizer: Any, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        self.model, self.tokenizer = model, tokenizer
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.to(self.device)
        self._freeze()

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def embed_images(self, pixels: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, D] unit-norm image embeddings."""
        feats = self.model.encode_image(clip_preprocess(pixels, self.image_size))
        return feats / feats.norm(dim=-1, keepdim=True)

    def features(self, images: np.ndarray) -> np.ndarray:
        """[B, H, W, 3] uint8 -> [B, D] float32 unit-norm CLIP image embeddings (the monitor's feature space)."""
        check_images(images, [""] * len(images))
        with torch.no_grad():
            return self.embed_images(self._pixels(images)).float().cpu().numpy()

    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """B prompts -> [B, D] unit-norm text embeddings (no gradient needed: prompts are discrete)."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        feats = self.model.encode_text(tokens).to(self.dtype)
        return feats / feats.norm(dim=-1, keepdim=True)


class ClipScore(_OpenClipReward):
    """Cosine similarity between the open_clip image and prompt embeddings, in [-1, 1].

    Real weights: `<dir>/open_clip_pytorch_model.bin` (or `open_clip_model.safetensors`) for `arch`
    (default OpenAI ViT-L/14, which needs quick_gelu=True; LAION checkpoints need quick_gelu=False).
    """

    name = "clip_score"

    def forward(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        return (self.embed_images(pixels) * self.embed_prompts(prompts)).sum(dim=-1)

    @classmethod
    def from_dir(
        cls, path: str | Path | None, device: str = "cpu", arch: str = "ViT-L-14", quick_gelu: bool = True
    ) -> ClipScore:
        d = require_dir(path, "clip_score", f"{OPEN_CLIP_FILES[1]!r} (open_clip {arch} checkpoint)")
        ckpt = require_file(d, OPEN_CLIP_FILES, "clip_score", f"the open_clip {arch} checkpoint")
        return cls(build_open_clip(arch, ckpt, quick_gelu, device), open_clip_tokenizer(arch), device)

    @classmethod
    def build_tiny(cls, device: str = "cpu", seed: int = 0) -> ClipScore:
        return cls(build_tiny_open_clip(seed), open_clip_tokenizer(), device)


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head; layer indices match `sac+logos+ava1-l14-linearMSE.pth`."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: Tensor) -> Tensor:
        return self.layers(embed)


class AestheticScore(_OpenClipReward):
    """LAION aesthetic score (about 1-10): MLP head on the unit-norm CLIP ViT-L/14 image embedding. Ignores prompts.

    Real weights: `<dir>/open_clip_pytorch_model.bin` (open_clip ViT-L-14, OpenAI weights) and
    `<dir>/sac+logos+ava1-l14-linearMSE.pth` (the improved-aesthetic-predictor head).
    """

    name = "aesthetic"

    def __init__(self, model: nn.Module, head: AestheticMLP, device: str | torch.device = "cpu") -> None:
        self.head = head
        super().__init__(model, tokenizer=None, device=device)

    def modules(self) -> list[nn.Module]:
        return [self.model, self.head]

    def forward(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.head(self.embed_images(pixels))[:, 0]

    @classmethod
    def from_dir(
        cls, path: str | Path | None, device: str = "cpu", arch: str = "ViT-L-14", quick_gelu: bool = True
    ) -> AestheticScore:
        """The head was trained on OpenAI ViT-L/14 embeddings: keep the defaults except in tests."""
        needs = f"{OPEN_CLIP_FILES[1]!r} (open_clip {arch}, OpenAI weights) and {AESTHETIC_HEAD_FILE!r}"
        d = require_dir(path, "aesthetic", needs)
        ckpt = require_file(d, OPEN_CLIP_FILES, "aesthetic", f"the open_clip {arch} checkpoint (OpenAI weights)")
        head_file = require_file(d, [AESTHETIC_HEAD_FILE], "aesthetic", "the LAION aesthetic predictor head")
        model = build_open_clip(arch, ckpt, quick_gelu, device)
        head = AestheticMLP(model.visual.output_dim)
        head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
        return cls(model, head, device)

    @classmethod
    def build_tiny(cls, device: str = "cpu", seed: int = 0) -> AestheticScore:
        model = build_tiny_open_clip(seed)
        torch.manual_seed(seed + 1)
        return cls(model, AestheticMLP(model.visual.output_dim), device)


class HPSv2(_OpenClipReward):
    """Human Preference Score v2 / v2.1: cosine of open_clip ViT-H-14 image and prompt embeddings (about 0.2-0.35).

    Real weights: `<dir>/HPS_v2.1_compressed.pt` or `<dir>/HPS_v2_compressed.pt` (full ViT-H-14 state dicts).
    """

    name = "hpsv2"

    def forward(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        return (self.embed_images(pixels) * self.embed_prompts(prompts)).sum(dim=-1)

    @classmethod
    def from_dir(
        cls, path: str | Path | None, device: str = "cpu", version: str | None = None, arch: str = "ViT-H-14"
    ) -> HPSv2:
        """version: "v2.1" / "v2" picks the file (default: v2.1 when both exist). HPS v2 is ViT-H-14 (arch: tests)."""
        if version is not None and version not in HPS_FILES:
            raise ValueError(f"hpsv2 version must be one of {sorted(HPS_FILES)}, got {version!r}")
        files = [HPS_FILES[version]] if version else list(HPS_FILES.values())  # v2.1 first when both exist
        d = require_dir(path, "hpsv2", " or ".join(repr(f) for f in files))
        ckpt = require_file(d, files, "hpsv2", "the HPS v2 checkpoint (open_clip ViT-H-14 state dict)")
        return cls(build_open_clip(arch, ckpt, False, device), open_clip_tokenizer(arch), device)

    @classmethod
    def build_tiny(cls, device: str = "cpu", seed: int = 0) -> HPSv2:
        return cls(build_tiny_open_clip(seed), open_clip_tokenizer("ViT-H-14"), device)
