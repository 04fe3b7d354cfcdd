"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences. Differentiable.

Loaded with plain transformers `CLIPModel` from a local directory in the PickScore layout (no hub here). The
image side is preprocessed in torch from the values in `preprocessor_config.json`, so gradients reach pixels;
the processor's own PIL path is not used. Projections are applied explicitly (`visual_projection(vision_model(...)
.pooler_output)`), which reads the same in transformers 4 and 5 (where `get_image_features` returns an output
object whose `.pooler_output` is already projected).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from reward_servers.base import check_images
from reward_servers.torch_base import CLIP_MEAN, CLIP_STD, TorchReward, clip_preprocess
from reward_servers.weights import require_dir, require_file

MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
NEEDS = (
    "the PickScore_v1 model files (config.json, model.safetensors or pytorch_model.bin) and the CLIP-ViT-H-14 "
    "processor files (preprocessor_config.json, tokenizer.json or vocab.json + merges.txt, tokenizer_config.json), "
    "either beside them or in a 'processor/' subfolder"
)


class PickScore(TorchReward):
    """logit_scale.exp() * cosine(image, prompt) with the PickScore CLIP (about 18-23 for real images)."""

    name = "pickscore"

    def __init__(
        self, model: nn.Module, tokenizer: Any, image_size: int, mean: Sequence[float], std: Sequence[float],
        device: str | torch.device = "cpu",
    ) -> None:  # fmt: skip
        super().__init__(device)
        self.model, self.tokenizer = model, tokenizer
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.to(self.device)
        self._freeze()

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def embed_images(self, pixels: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, D] PickScore image embeddings (not normalised)."""
        x = clip_preprocess(pixels, self.image_size, self.mean, self.std)
        return self.model.visual_projection(self.model.vision_model(pixel_values=x).pooler_output)

    def features(self, images: np.ndarray) -> np.ndarray:
        """[B, H, W, 3] uint8 -> [B, D] float32 unit-norm image embeddings (the monitor's feature space)."""
        check_images(images, [""] * len(images))
        with torch.no_grad():
            img = self.embed_images(self._pixels(images))
            return (img / img.norm(dim=-1, keepdim=True)).float().cpu().numpy()

    def forward(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        img = self.embed_images(pixels)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))  # fmt: skip
        txt = self.model.text_projection(out.pooler_output)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (img * txt).sum(dim=-1)

    @classmethod
    def from_dir(cls, path: str | Path | None, device: str = "cpu") -> PickScore:
        from transformers import AutoTokenizer, CLIPModel

        d = require_dir(path, "pickscore", NEEDS)
        require_file(d, ["config.json"], "pickscore", "the PickScore_v1 config.json")
        require_file(d, MODEL_FILES, "pickscore", "the PickScore_v1 weights")
        proc = d / "processor" if (d / "processor").is_dir() else d
        pre = require_file(proc, ["preprocessor_config.json"], "pickscore", "the CLIP-ViT-H-14 image processor config")
        require_file(proc, TOKENIZER_FILES, "pickscore", "the CLIP-ViT-H-14 tokenizer files")
        cfg = json.loads(pre.read_text())
        crop = cfg.get("crop_size", 224)
        size = int(crop["height"] if isinstance(crop, dict) else crop)
        model = CLIPModel.from_pretrained(str(d), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(proc), local_files_only=True)
        return cls(model, tokenizer, size, cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD), device)

    @classmethod
    def build_tiny(cls, directory: str | Path, device: str = "cpu", seed: int = 0) -> PickScore:
        """Write a tiny random PickScore-layout directory (1-layer towers, byte-level BPE) and load it via from_dir."""
        save_tiny(directory, seed)
        return cls.from_dir(directory, device)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def save_tiny(directory: str | Path, seed: int = 0) -> Path:
    """Random-init CLIPModel (32x32 images) + byte-level CLIP tokenizer (no merges) saved in the PickScore layout.

    The vocabulary is CLIP's 512 byte tokens, then <|startoftext|>, then <|endoftext|> last: CLIP's text pooling
    (eos_token_id 2, the legacy setting PickScore's config also has) takes the argmax id as the end token.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tokenizer.save_pretrained(str(d))
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **small,
            "vocab_size": len(tokens),
            "max_position_embeddings": 77,
            "bos_token_id": len(tokens) - 2,
            "eos_token_id": len(tokens) - 1,
            "pad_token_id": len(tokens) - 1,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(d))
    pre = {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}, "image_mean": list(CLIP_MEAN),
           "image_std": list(CLIP_STD), "image_processor_type": "CLIPImageProcessor"}  # fmt: skip
    (d / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return d
