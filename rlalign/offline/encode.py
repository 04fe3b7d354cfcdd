"""Offline preference pairs -> cached latents and text embeddings, with Ray Data (docs/offline.md).

`encode_preferences` reads the table (rlalign/offline/prefs.py), then one Ray Data pipeline decodes and crops the
images (`decode_batch`) and VAE-encodes them plus the captions on `data.encode_workers` actors (`PairEncoder`, CPU
or GPU; Ray Data fuses the decode step into them when their resources allow), and the driver writes the result as
safetensors shards. A later run with the same
table, model and settings opens the cache and skips the VAE entirely (`cache_key`).

This module imports ray (Ray Data): a deliberate exception to "only actors.py and driver.py import ray". The rule
keeps Ray out of the maths; this module is Ray glue itself, and the functions the pipeline runs (decode_batch,
PairEncoder's maths) are Ray-free.

Choices (unconfirmed in the papers' code, chosen here):
- Latents are the VAE posterior's mode times the scaling factor, not a sample: the cache is reused every epoch, so
  a sample would freeze one draw anyway, and the mode makes the cache reproducible. The online sampler's x0 lives in
  the same space (rlalign/models/loading.py `DiffusionParts.decode` divides by the same factor).
- Rows are kept in table order (Ray Data `preserve_order`): the cache, and so a seeded run, does not depend on
  which worker finished first.
- Text embeddings are stored once per distinct caption (Pick-a-Pic repeats captions across pairs); each pair keeps
  an index into them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from rlalign.config import DataCfg, LoraCfg, ModelCfg
from rlalign.offline.prefs import BadRowSummary, PrefColumns, _check_names, dataset_base_dir, read_preference_table

CACHE_FORMAT = 1  # bump when the shard layout changes: old caches are then rebuilt, never misread
SHARD_PAIRS = 2048  # pairs per safetensors shard
_SHARD_KEYS = ("latent_w", "latent_l", "caption", "tie", "row")


def columns_of(data: DataCfg) -> PrefColumns:
    c = data.columns
    return PrefColumns(c.caption, c.image_0, c.image_1, c.label_0, c.label_1)


def check_preferences(data: DataCfg) -> None:
    """Before Ray starts (config preflight): the table exists and has the mapped columns; reads the parquet schema
    or the first JSON line only. Raises FileNotFoundError / ValueError naming the path and what is missing."""
    import pyarrow.parquet as pq

    path = Path(str(data.preferences)).expanduser()
    if "://" not in str(data.preferences) and not path.exists():
        raise FileNotFoundError(f"{data.preferences} does not exist")
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))
        if not shards:
            raise ValueError(f"{path} is a directory without *.parquet shards")
        names = pq.read_schema(shards[0]).names
    elif path.suffix.lower() == ".parquet":
        names = pq.read_schema(path).names
    elif path.suffix.lower() in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "{}")
        names = list(json.loads(first))
    else:
        return  # a URI or an unknown extension: read_preference_table says what is wrong when the run reads it
    _check_names(names, columns_of(data), str(data.preferences))


def model_resolution(model_dir: str | Path) -> int:
    """Pixels per side the model renders: U-Net sample size x the VAE's downsampling (from the config files)."""
    unet = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    vae = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _fingerprint(path: str) -> list[Any]:
    """Name, size and mtime of the table file(s): a changed table gets a new cache."""
    p = Path(path).expanduser()
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    if not p.exists():  # a URI: its string is the fingerprint
        return [path]
    return [[str(f.relative_to(p.parent)), f.stat().st_size, int(f.stat().st_mtime)] for f in files if f.is_file()]


def cache_key(data: DataCfg, model_dir: str | Path, resolution: int) -> str:
    """What decides the cache's contents: the table, the model's VAE and text encoders, the decode settings."""
    model_files = []
    for sub in ("vae", "text_encoder", "text_encoder_2"):
        for f in sorted((Path(model_dir) / sub).glob("*")) if (Path(model_dir) / sub).is_dir() else []:
            model_files.append([sub, f.name, f.stat().st_size, int(f.stat().st_mtime)])
    blob = {
        "format": CACHE_FORMAT,
        "table": _fingerprint(str(data.preferences)),
        "model": [str(Path(model_dir).resolve()), model_files],
        "columns": columns_of(data).mapping(),
        "ties": data.ties,
        "resolution": resolution,
        "max_pairs": data.max_pairs,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


class PairEncoder:
    """A Ray Data actor: VAE latents of both images and the caption's text embedding, for every good row."""

    def __init__(self, model: ModelCfg, num_gpus: float) -> None:
        from rlalign.models.loading import load_parts

        self.parts = load_parts(model, LoraCfg(), num_steps=1, role="encoder", num_gpus=num_gpus)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.flatnonzero(batch["bad"] == "")
        c, h, w = self.parts.latent_shape
        n = len(batch["bad"])
        out = {k: batch[k] for k in ("caption", "tie", "row", "bad")}
        out["latent_w"] = np.zeros((n, c, h, w), np.float32)
        out["latent_l"] = np.zeros((n, c, h, w), np.float32)
        if len(good):
            out["latent_w"][good] = self._encode(batch["image_w"][good])
            out["latent_l"][good] = self._encode(batch["image_l"][good])
            embeds = self.parts.encode_prompts([str(x) for x in batch["caption"][good]]).cpu().numpy()
            out["embeds"] = np.zeros((n, *embeds.shape[1:]), np.float32)
            out["embeds"][good] = embeds
        else:
            out["embeds"] = np.zeros((n, 1, 1), np.float32)  # no good row: the consumer never reads these
        return out

    def _encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [n,H,W,3] -> latents [n,C,h,w] float32: mode of the posterior x scaling factor (module docstring)."""
        vae = self.parts.vae
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        dist = vae.encode(x.to(self.parts.device, vae.dtype)).latent_dist
        return (dist.mode().float() * self.parts.scaling_factor).cpu().numpy()


# ------------------------------------------------------------------------------------------------- the cache
@dataclass(frozen=True)
class PrefCache:
    """Encoded pairs on disk: shards of (latent_w, latent_l, caption index, tie, row) + one embedding per caption."""

    directory: Path
    shard_sizes: list[int]
    captions: list[str]
    embeds: Tensor  # [U, L, D] one per distinct caption
    bad: dict[str, Any]  # BadRowSummary.to_dict() of the encode pass
    seconds: float  # the encode pass's wall time (0 when opened from an earlier run's cache)

    def __len__(self) -> int:
        return sum(self.shard_sizes)

    @staticmethod
    def open(directory: Path, seconds: float = 0.0) -> PrefCache:
        meta = json.loads((directory / "meta.json").read_text())
        with safe_open(str(directory / "captions.safetensors"), framework="pt") as f:
            embeds = f.get_tensor("embeds")
        return PrefCache(directory, meta["shard_sizes"], meta["captions"], embeds, meta["bad_rows"], seconds)

    def take(self, index: np.ndarray) -> dict[str, Tensor]:
        """Pairs at global positions `index` (any order): x0_w, x0_l [P,C,h,w], cond [P,L,D], tie [P], row [P]."""
        starts = np.cumsum([0, *self.shard_sizes])
        shards = np.searchsorted(starts, index, side="right") - 1
        rows: dict[int, dict[str, Tensor]] = {}  # position in `index` -> that pair's tensors
        for shard in np.unique(shards).tolist():  # each shard opened once per batch
            with safe_open(str(self.directory / f"shard_{shard:05d}.safetensors"), framework="pt") as f:
                for pos in np.flatnonzero(shards == shard).tolist():
                    j = int(index[pos]) - int(starts[shard])
                    rows[pos] = {k: f.get_slice(k)[j : j + 1] for k in _SHARD_KEYS}
        out = {k: torch.cat([rows[pos][k] for pos in range(len(index))]) for k in _SHARD_KEYS}
        return {
            "x0_w": out["latent_w"],
            "x0_l": out["latent_l"],
            "cond": self.embeds[out["caption"]],
            "tie": out["tie"].bool(),
            "row": out["row"],
        }


class _ShardWriter:
    def __init__(self, directory: Path) -> None:
        self.directory, self.sizes, self.captions = directory, [], {}
        self.embeds: list[np.ndarray] = []
        self._buf: dict[str, list[np.ndarray]] = {k: [] for k in _SHARD_KEYS}
        self._n = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        good = np.flatnonzero(batch["bad"] == "")
        for i in good:
            caption = str(batch["caption"][i])
            if caption not in self.captions:
                self.captions[caption] = len(self.captions)
                self.embeds.append(batch["embeds"][i])
            self._buf["caption"].append(np.asarray([self.captions[caption]], np.int64))
        for k in ("latent_w", "latent_l"):
            self._buf[k].append(batch[k][good])
        self._buf["tie"].append(batch["tie"][good].astype(np.uint8))
        self._buf["row"].append(batch["row"][good].astype(np.int64))
        self._n += len(good)
        while self._n >= SHARD_PAIRS:
            self._flush(SHARD_PAIRS)

    def _flush(self, n: int) -> None:
        cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self._buf.items()}
        head = {k: torch.from_numpy(np.ascontiguousarray(v[:n])) for k, v in cat.items()}
        save_file(head, str(self.directory / f"shard_{len(self.sizes):05d}.safetensors"))
        self.sizes.append(n)
        self._buf = {k: [v[n:]] for k, v in cat.items()}
        self._n -= n

    def close(self, bad: BadRowSummary) -> None:
        if self._n:
            self._flush(self._n)
        if not self.embeds:
            raise ValueError(f"no usable preference pair: {bad.summary()}")
        save_file({"embeds": torch.from_numpy(np.stack(self.embeds))}, str(self.directory / "captions.safetensors"))
        meta = {"shard_sizes": self.sizes, "captions": list(self.captions), "bad_rows": bad.to_dict()}
        (self.directory / "meta.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------------------------------- the pipeline
def encode_preferences(data: DataCfg, model: ModelCfg, cache_root: Path, *, progress: Any = None) -> PrefCache:
    """The encoded pairs of `data.preferences` for `model` (its path resolved): from the cache, or encoded now.

    Needs a running Ray (the driver's). Bad rows are counted and skipped (their summary is in the cache's meta and
    `PrefCache.bad`); a table with no usable row is an error naming the reasons.
    """
    resolution = model_resolution(str(model.path))
    directory = cache_root / cache_key(data, str(model.path), resolution)
    if (directory / "meta.json").is_file():
        return PrefCache.open(directory)
    start = time.perf_counter()
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer, bad = _ShardWriter(tmp), BadRowSummary()
    for batch in _pipeline(data, model, resolution):
        bad.add(batch["bad"], batch["row"])
        writer.add(batch)
        if progress is not None:
            progress(bad.rows_read)
    writer.close(bad)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)  # a cache is complete or absent: an interrupted encode never looks finished
    return PrefCache.open(directory, seconds=time.perf_counter() - start)


def _pipeline(data: DataCfg, model: ModelCfg, resolution: int) -> Iterator[dict[str, np.ndarray]]:
    import ray
    import ray.data

    from rlalign.offline.prefs import decode_batch

    path = str(data.preferences)
    columns = columns_of(data)
    table = read_preference_table(path, columns)  # only the mapped columns, plus the source row index
    if data.max_pairs:
        table = table.slice(0, data.max_pairs)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # the run's own rich progress reports rows
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines drown the run's output
    # one block per `encode_batch_size` rows: a single block would feed a single encode actor, whatever
    # data.encode_workers says
    step = data.encode_batch_size
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(table), step)] or [table])
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"columns": columns, "base_dir": dataset_base_dir(path), "resolution": resolution, "ties": data.ties},
        batch_format="numpy",
        batch_size=data.encode_batch_size,
        num_cpus=1,
    )
    ds = ds.map_batches(
        PairEncoder,
        fn_constructor_kwargs={"model": replace(model), "num_gpus": data.encode_num_gpus},
        batch_format="numpy",
        batch_size=data.encode_batch_size,
        compute=ray.data.ActorPoolStrategy(size=data.encode_workers),
        num_cpus=0 if data.encode_num_gpus else 1,
        num_gpus=data.encode_num_gpus,
    )
    yield from ds.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=1)
