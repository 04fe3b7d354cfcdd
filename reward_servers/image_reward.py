"""ImageReward (Xu et al. 2023): BLIP ViT-L + BERT cross-encoder + MLP, trained on human rankings. Differentiable.

Runs ONLY in its own venv (`scripts/setup_image_reward_env.sh` -> `.venv-imagereward`): `image-reward` 1.5 needs
transformers<=4.55.4, which cannot share the main environment (transformers 5). The main env reaches it over HTTP:

    .venv-imagereward/bin/python -m reward_servers.serve --model image_reward --path DIR --port 8910
    make_reward("http", url="http://127.0.0.1:8910")

Offline build: BLIP's `init_tokenizer` downloads `bert-base-uncased`; while the model is constructed we point the
name `init_tokenizer` inside `ImageReward.models.BLIP.blip_pretrain` at a local `BertTokenizer.from_pretrained(dir)`
(a runtime rebinding, restored afterwards; no installed file is changed). `med_config.json` comes from the directory.
Images are preprocessed in torch (resize 224 bicubic, centre crop, CLIP normalisation, as ImageReward's `_transform`)
and scored with ImageReward's batched `score_gard`, so gradients reach pixels.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reward_servers.torch_base import TorchReward, clip_preprocess
from reward_servers.weights import require_dir, require_file

NEEDS = (
    "'ImageReward.pt' (THUDM/ImageReward weights), 'med_config.json' (BLIP's BERT config) and the "
    "bert-base-uncased tokenizer 'vocab.txt' (beside them or in a 'bert-base-uncased/' subfolder)"
)

# BLIP's med_config.json: BERT-base with cross-attention to the ViT, vocabulary 30522 + [DEC] + [ENC].
MED_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}


@contextlib.contextmanager
def _local_bert_tokenizer(tokenizer_dir: Path) -> Iterator[None]:
    """While active, BLIP builds its tokenizer from `tokenizer_dir` instead of downloading bert-base-uncased."""
    from ImageReward.models.BLIP import blip_pretrain
    from transformers import BertTokenizer

    def init_tokenizer() -> Any:  # same steps as ImageReward.models.BLIP.blip.init_tokenizer, local files only
        tok = BertTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
        return tok

    original = blip_pretrain.init_tokenizer
    blip_pretrain.init_tokenizer = init_tokenizer
    try:
        yield
    finally:
        blip_pretrain.init_tokenizer = original


class ImageRewardModel(TorchReward):
    """ImageReward score (normalised by its training mean/std, roughly -2..2) for (image, prompt) pairs."""

    name = "image_reward"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        self.model = model
        self.to(self.device)
        self.model.device = self.device  # score_gard builds its attention mask on model.device
        self._freeze()

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def forward(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        tok = self.model.blip.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        )
        x = clip_preprocess(pixels, 224)
        rewards = self.model.score_gard(tok.input_ids.to(self.device), tok.attention_mask.to(self.device), x)
        return rewards[:, 0]

    @classmethod
    def from_dir(cls, path: str | Path | None, device: str = "cpu") -> ImageRewardModel:
        d = require_dir(path, "image_reward", NEEDS)
        weights = require_file(d, ["ImageReward.pt"], "image_reward", "the THUDM/ImageReward checkpoint")
        med = require_file(d, ["med_config.json"], "image_reward", "BLIP's med_config.json (THUDM/ImageReward)")
        tok_dir = d / "bert-base-uncased" if (d / "bert-base-uncased").is_dir() else d
        require_file(tok_dir, ["vocab.txt"], "image_reward", "the bert-base-uncased tokenizer vocab.txt")
        import ImageReward as RM  # after the file checks: a missing file is named even where the import is slow

        with _local_bert_tokenizer(tok_dir):
            model = RM.load(str(weights), device=str(device), med_config=str(med))
        return cls(model, device)

    @classmethod
    def build_random(cls, directory: str | Path, device: str = "cpu", seed: int = 0, text_layers: int = 12) -> Any:
        """Random-weights ImageReward (real architecture; `text_layers` BERT layers) built offline; tests only.

        Writes med_config.json and a small BERT vocab.txt into `directory`. ~450 M parameters with 12 layers,
        ~10 s to build; ~7 s per 224x224 image on CPU.
        """
        import ImageReward as RM

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "med_config.json").write_text(json.dumps({**MED_CONFIG, "num_hidden_layers": text_layers}, indent=2))
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789"]
        words += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + ["a", "photo", "of", "cat", "dog"]
        (d / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n")
        torch.manual_seed(seed)
        with _local_bert_tokenizer(d):
            model = RM.ImageReward(med_config=str(d / "med_config.json"), device=str(device))
        # ImageReward's own head init (std 1/769, five linear layers, no activations) shrinks the output to ~1e-8,
        # below float32 resolution next to its -0.16 offset: every image would score the same. Re-init so random
        # builds tell images apart (tests check order).
        for layer in model.mlp.layers:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
        return cls(model.eval(), device)
