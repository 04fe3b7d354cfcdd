"""Finding weight files in a user-named local directory, with errors that say what to put where.

Nothing here downloads: the project's machines have no model hub, so every real-weights model loads from a
directory the user names (`make_reward(name, path=DIR)` / `serve --path DIR`). Never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class MissingWeightsError(FileNotFoundError):
    """A reward model's weights directory, or a file in it, is missing. The message names the file and its source."""


def require_dir(path: str | Path | None, reward: str, needs: str, has_tiny: bool = True) -> Path:
    """Return `path` as a Path, or raise MissingWeightsError saying which directory `reward` needs and what goes in.

    needs: human-readable list of the files, e.g. "open_clip_pytorch_model.bin (OpenAI CLIP ViT-L/14) and ...".
    """
    if path is None:
        raise MissingWeightsError(
            f"reward {reward!r} loads real weights from a local directory; pass path=DIR (serve: --path DIR) "
            f"holding {needs}."
            + (" For a random-weights test build pass tiny=True (serve: --tiny)." if has_tiny else "")
        )
    p = Path(path).expanduser()
    if not p.is_dir():
        raise MissingWeightsError(
            f"reward {reward!r}: weights directory {str(p)!r} does not exist; it must hold {needs}"
        )
    return p


def require_file(directory: Path, candidates: Sequence[str], reward: str, what: str) -> Path:
    """Return the first of `candidates` present in `directory`, or raise naming the file(s) and what they are."""
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    names = " or ".join(repr(c) for c in candidates)
    present = sorted(p.name for p in directory.iterdir())[:20]
    raise MissingWeightsError(
        f"reward {reward!r}: missing file {names} in {str(directory)!r}: put {what} there "
        f"(directory holds: {present or 'nothing'})"
    )
