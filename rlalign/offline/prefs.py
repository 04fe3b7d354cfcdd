"""Read and decode offline preference pairs in the Pick-a-Pic v2 layout: a caption, two images, the people's choice.

Rows come from parquet (one file or a directory of `*.parquet` shards) or JSONL (one JSON object per line), on a
local path, a `file://` URI or any URI whose fsspec package is installed. Images are bytes in the row (Pick-a-Pic
keeps JPEG bytes in `jpg_0` / `jpg_1`) or paths, relative to the dataset's directory or absolute.

`decode_batch` turns one batch of raw rows into fixed-size uint8 image pairs, preferred image first. A bad row
(undecodable image, missing caption, no preference, dropped tie, missing file) is returned as a row too, with its
reason in the `bad` column and zero images: a Ray Data batch must stay columnar with one length, and one bad row must
never stop a run. The consumer filters on `bad == ""` and counts reasons with `BadRowSummary`.

Plain functions over numpy, pyarrow and PIL, no ray import: they pickle into Ray Data's `map_batches` workers.
`load_decoded` runs the same code over a whole table in-process (tests, small sets).
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

__all__ = [
    "TIES",
    "BadRowSummary",
    "PrefColumns",
    "check_columns",
    "dataset_base_dir",
    "decode_batch",
    "load_decoded",
    "read_preference_table",
    "resize_center_crop",
]

TIES = ("drop", "keep")
ROW = "row"  # optional column with each row's index in the source; added by read_preference_table when absent
MAX_EXAMPLES = 5  # row indices kept per bad-row reason
_JSON_EXTENSIONS = (".jsonl", ".json")


@dataclass(frozen=True)
class PrefColumns:
    """The table column holding each field. Defaults are Pick-a-Pic v2's; config `data.columns.<field>` maps others."""

    caption: str = "caption"
    image_0: str = "jpg_0"
    image_1: str = "jpg_1"
    label_0: str = "label_0"  # 1 when image_0 was preferred, 0.5 on a tie
    label_1: str = "label_1"

    def mapping(self) -> dict[str, str]:
        """Field -> column name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def _filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a local path, a file:// URI or a URI with an installed fsspec package."""
    import fsspec  # installed with torch and huggingface_hub

    try:
        return fsspec.core.url_to_fs(os.path.expanduser(path) if "://" not in path else path)
    except (ImportError, ValueError) as err:
        raise ValueError(
            f"preference data {path}: cannot open this URI ({err}); install the fsspec package for its scheme "
            "(e.g. s3fs for s3://) or use a local path"
        ) from err


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def dataset_base_dir(path: str) -> str:
    """Where relative image paths in the dataset at `path` start: the file's directory, or the shard directory."""
    fs, inner = _filesystem(str(path))
    directory = inner if fs.isdir(inner) else posixpath.dirname(inner)
    return directory if _is_local(fs) else str(fs.unstrip_protocol(directory))


def check_columns(table: pa.Table, columns: PrefColumns, *, source: str = "preference table") -> None:
    """ValueError naming each missing column with the config key that maps it, and the columns that are present."""
    _check_names(table.column_names, columns, source)


def _check_names(present: Sequence[str], columns: PrefColumns, source: str) -> None:
    missing = {key: name for key, name in columns.mapping().items() if name not in present}
    if missing:
        wanted = ", ".join(f"{name!r} (data.columns.{key})" for key, name in missing.items())
        raise ValueError(
            f"{source}: missing column(s) {wanted}; columns present: {', '.join(present) or 'none'}. "
            f"Map yours with data.columns.<field>=<column> (fields: {', '.join(columns.mapping())})"
        )


def read_preference_table(path: str, columns: PrefColumns | None = None) -> pa.Table:
    """The whole dataset at `path` as one table (in memory: for small sets; Ray Data streams large ones).

    `path`: a `.parquet` file, a directory of `*.parquet` shards, or a `.jsonl` / `.json` file with one JSON object
    per line. With `columns`, parquet reads only the mapped columns (Pick-a-Pic carries a dozen more) and a missing
    one is a ValueError naming it. A `row` column (the source row index) is added when the data has none, so
    bad-row examples point at real rows whatever the batching. Errors name the path and what was wrong.
    """
    path = str(path)
    fs, inner = _filesystem(path)
    if not fs.exists(inner):
        raise FileNotFoundError(f"preference data {path} does not exist")
    if fs.isdir(inner):
        shards = sorted(fs.glob(posixpath.join(inner, "*.parquet")))
        if not shards:
            raise ValueError(f"preference data {path} is a directory without *.parquet shards")
        table = _read_parquet(fs, shards, columns, path)
    elif inner.lower().endswith(".parquet"):
        table = _read_parquet(fs, [inner], columns, path)
    elif inner.lower().endswith(_JSON_EXTENSIONS):
        table = _read_jsonl(fs, inner, path)
    else:
        ext = posixpath.splitext(inner)[1] or "(none)"
        raise ValueError(
            f"preference data {path}: unknown extension {ext}; expected .parquet, .jsonl or .json "
            "(one JSON object per line), or a directory of .parquet shards"
        )
    if table.num_rows == 0:
        raise ValueError(f"preference data {path} holds no rows")
    if columns is not None:
        check_columns(table, columns, source=f"preference data {path}")
    if ROW not in table.column_names:
        table = table.append_column(ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return table


def _read_parquet(fs: Any, files: list[str], columns: PrefColumns | None, source: str) -> pa.Table:
    tables = []
    for file in files:
        try:
            schema = pq.read_schema(file, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"preference data {source}: {file} is not a readable parquet file ({err})") from err
        wanted = None
        if columns is not None:
            _check_names(schema.names, columns, f"preference data {source} ({file})")
            wanted = list(dict.fromkeys([*columns.mapping().values(), *([ROW] if ROW in schema.names else [])]))
        tables.append(pq.read_table(file, columns=wanted, filesystem=fs))
    try:
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"preference data {source}: shards with incompatible columns ({err})") from err


def _read_jsonl(fs: Any, inner: str, source: str) -> pa.Table:
    with fs.open(inner, "rt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"preference data {source}: line {number} is not JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"preference data {source}: line {number} is not a JSON object (one object per line)")
        records.append(record)
    try:
        return pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"preference data {source}: a column holds values of different types ({err})") from err


# ----------------------------------------------------------------------------------------------------------------
# Decoding one batch
# ----------------------------------------------------------------------------------------------------------------


class _BadRow(Exception):
    """Why one row gives no pair. Raised by the per-row helpers, caught per row in decode_batch, never escapes."""


def resize_center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """PIL image -> uint8 [R, R, 3]: shorter side resized to R (bicubic), then the centre R x R.

    The deterministic form of Diffusion-DPO's training transform (shorter-side resize + crop), without its random
    crop and flip: the same row always gives the same pixels, so encoded latents can be cached and reused.
    """
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != (width, height):
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def _number(value: Any) -> float | None:
    """A label as a float; None when absent, NaN or not a number."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _winner(label_0: Any, label_1: Any) -> int | None:
    """0 or 1: the preferred image; None: a tie (Pick-a-Pic writes 0.5 / 0.5)."""
    l0, l1 = _number(label_0), _number(label_1)
    if l0 is None or l1 is None:
        raise _BadRow("missing label")
    if not (0 <= l0 <= 1 and 0 <= l1 <= 1):
        raise _BadRow("label outside [0, 1]")
    if l0 == l1 == 0:
        raise _BadRow("no preference (both labels 0)")
    if l0 == l1:
        return None
    return 0 if l0 > l1 else 1


def _caption(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str) or not value.strip():
        raise _BadRow("missing caption")
    return str(value)


def _read_image_file(path: str, name: str, base_dir: str) -> bytes:
    """Bytes of an image file named in the row: a URI, an absolute path, or a path relative to `base_dir`."""
    if "://" not in path:
        path = posixpath.join(base_dir, path) if "://" in base_dir else os.path.join(base_dir, path)
    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as handle:
                return bytes(handle.read())
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as err:
        raise _BadRow(f"missing {name} file") from err
    except OSError as err:  # a directory, no permission
        raise _BadRow(f"unreadable {name} file") from err


def _load_image(value: Any, name: str, base_dir: str, resolution: int) -> np.ndarray:
    if isinstance(value, Mapping):  # Hugging Face datasets' Image feature stores {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value):
        raise _BadRow(f"missing {name}")
    if isinstance(value, str):
        data = _read_image_file(value, name, base_dir)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise _BadRow(f"undecodable {name}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale still >= R (much faster)
            return resize_center_crop(image, resolution)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... on bad data
        raise _BadRow(f"undecodable {name}") from err


def _row_pairs(
    values: dict[str, Any], base_dir: str, resolution: int, ties: str
) -> tuple[str, list[tuple[np.ndarray, np.ndarray, bool]]]:
    """One row -> (caption, [(image_w, image_l, tie)]): one pair, or a kept tie in both orders. Raises _BadRow."""
    caption = _caption(values["caption"])
    winner = _winner(values["label_0"], values["label_1"])
    if winner is None and ties == "drop":
        raise _BadRow("tie (dropped)")  # checked before decoding: a dropped row costs no image decode
    image_0 = _load_image(values["image_0"], "image_0", base_dir, resolution)
    image_1 = _load_image(values["image_1"], "image_1", base_dir, resolution)
    if winner is None:
        return caption, [(image_0, image_1, True), (image_1, image_0, True)]
    return caption, [(image_0, image_1, False)] if winner == 0 else [(image_1, image_0, False)]


def decode_batch(
    batch: Mapping[str, np.ndarray | list[Any]], columns: PrefColumns, base_dir: str, resolution: int, ties: str
) -> dict[str, np.ndarray]:
    """Raw rows (column -> values, as Ray Data's batch_format="numpy" gives) -> decoded pairs, preferred first.

    Returns, per output row: "caption" str [N], "image_w" / "image_l" uint8 [N, R, R, 3], "tie" bool [N], "row"
    int64 [N] (the batch's `row` column when present, else the position in the batch) and "bad" str [N] ("" for a
    pair, else the reason; its images are zeros). Labels: label_0 > label_1 prefers image_0, the reverse image_1;
    equal non-zero labels are a tie, dropped as a bad row ("tie (dropped)") or, with ties="keep", emitted in both
    orders (adjacent, same row, tie=True): a DPO-style loss then pulls the pair's implicit reward margin towards 0
    from both sides, which is what "equally good" means to it. Both labels 0, or a missing label, is a bad row.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    names = columns.mapping()
    n = len(batch[columns.caption])
    rows = np.asarray(batch[ROW], dtype=np.int64) if ROW in batch else np.arange(n, dtype=np.int64)
    blank = np.zeros((resolution, resolution, 3), dtype=np.uint8)
    captions: list[str] = []
    reasons: list[str] = []
    out_rows: list[int] = []
    tie_flags: list[bool] = []
    images_w: list[np.ndarray] = []
    images_l: list[np.ndarray] = []
    for i in range(n):
        values = {key: batch[column][i] for key, column in names.items()}
        try:
            (caption, pairs), reason = _row_pairs(values, base_dir, resolution, ties), ""
        except _BadRow as bad:
            pairs, reason = [(blank, blank, False)], str(bad)
            caption = values["caption"] if isinstance(values["caption"], str) else ""
        for image_w, image_l, tie in pairs:
            captions.append(caption)
            reasons.append(reason)
            out_rows.append(int(rows[i]))
            tie_flags.append(tie)
            images_w.append(image_w)
            images_l.append(image_l)
    empty = np.zeros((0, resolution, resolution, 3), dtype=np.uint8)
    return {
        "caption": np.asarray(captions, dtype=str),
        "image_w": np.stack(images_w) if images_w else empty,
        "image_l": np.stack(images_l) if images_l else empty.copy(),
        "tie": np.asarray(tie_flags, dtype=bool),
        "row": np.asarray(out_rows, dtype=np.int64),
        "bad": np.asarray(reasons, dtype=str),
    }


# ----------------------------------------------------------------------------------------------------------------
# Counting bad rows
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BadRowSummary:
    """Counts of skipped rows by reason, with example row indices, accumulated batch by batch."""

    counts: dict[str, int] = field(default_factory=dict)  # reason -> input rows skipped
    examples: dict[str, list[int]] = field(default_factory=dict)  # reason -> first MAX_EXAMPLES row indices
    rows_read: int = 0  # input rows seen
    pairs_kept: int = 0  # pairs emitted (a kept tie counts twice: both orders)

    @property
    def bad_rows(self) -> int:
        return sum(self.counts.values())

    def add(self, bad: np.ndarray, rows: np.ndarray) -> None:
        """Count one decoded batch from its "bad" and "row" columns.

        decode_batch emits a kept tie's two orders next to each other with the same row index, so an input row is
        a run of equal row values: runs are counted, not output rows.
        """
        reasons = np.asarray(bad).astype(str)
        indices = np.asarray(rows, dtype=np.int64)
        if len(reasons) != len(indices):
            raise ValueError(f"bad and rows differ in length: {len(reasons)} vs {len(indices)}")
        if len(reasons) == 0:
            return
        self.rows_read += 1 + int(np.count_nonzero(indices[1:] != indices[:-1]))
        self.pairs_kept += int(np.count_nonzero(reasons == ""))
        for reason, row in zip(reasons.tolist(), indices.tolist()):
            if reason:
                self.counts[reason] = self.counts.get(reason, 0) + 1
                examples = self.examples.setdefault(reason, [])
                if len(examples) < MAX_EXAMPLES:
                    examples.append(int(row))

    def summary(self) -> str:
        """A headline, then one line per reason (most frequent first) with example rows."""
        lines = [f"{self.rows_read} rows read: {self.pairs_kept} pairs kept, {self.bad_rows} bad rows skipped"]
        for reason, count in sorted(self.counts.items(), key=lambda item: (-item[1], item[0])):
            rows = ", ".join(str(r) for r in self.examples.get(reason, []))
            more = ", ..." if count > len(self.examples.get(reason, [])) else ""
            lines.append(f"  {reason}: {count} (rows {rows}{more})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: rows_read, pairs_kept, bad_rows, counts, examples."""
        return {
            "rows_read": self.rows_read,
            "pairs_kept": self.pairs_kept,
            "bad_rows": self.bad_rows,
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }


def load_decoded(
    path: str,
    columns: PrefColumns | None = None,
    resolution: int = 512,
    ties: str = "drop",
    *,
    batch_size: int = 256,
) -> tuple[dict[str, np.ndarray], BadRowSummary]:
    """Read and decode the whole dataset in this process (no Ray): (good pairs as decode_batch's columns without
    "bad", summary of the skipped rows). For tests and small sets; large ones go through Ray Data."""
    columns = columns or PrefColumns()
    table = read_preference_table(path, columns)
    base_dir = dataset_base_dir(path)
    wanted = [*dict.fromkeys(columns.mapping().values()), ROW]
    summary = BadRowSummary()
    parts: list[dict[str, np.ndarray]] = []
    for record_batch in table.select(wanted).to_batches(max_chunksize=batch_size):
        batch = {name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in wanted}
        decoded = decode_batch(batch, columns, base_dir, resolution, ties)
        summary.add(decoded["bad"], decoded["row"])
        keep = decoded.pop("bad") == ""
        parts.append({key: value[keep] for key, value in decoded.items()})
    pairs = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return pairs, summary
