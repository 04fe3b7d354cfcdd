"""Checkpoint layout, `latest` pointer, keep-last-k rotation, resume lookup.

    runs/<name>/ckpt/iter_000010/
        adapter_model.safetensors   peft LoRA state (what the learner reloads)
        diffusers_lora/             the same LoRA in diffusers format: pipe.load_lora_weights(this_dir)
        optimizer.pt, learner.json  optimiser, learner RNG, weights version
        state.json                  iteration, weights version, prompt cursor, running prompt rewards, normaliser state
        config.yaml                 the resolved run config
    runs/<name>/ckpt/latest         text file naming the newest complete checkpoint

A checkpoint is written into `iter_XXXXXX.tmp` and renamed when complete, and `latest` is replaced atomically,
so an interrupted save never leaves a broken `latest`. Every file and directory is fsynced before the rename that
makes it visible, so a crash or power loss right after the rename cannot expose a renamed-but-empty file. Rotation
deletes only older complete checkpoints.

Who writes (docs/cluster.md, "Storage"): only the driver. The learner may run on a node that does not see the
driver's disk, so it writes its files into a temporary directory of its own node and returns their bytes
(`read_tree`, a few MB for a LoRA), which travel through Ray's object store; the driver writes them into the
staging directory (`write_tree`) and commits. Resume goes the other way: the driver reads the checkpoint and sends
the bytes to every learner. No two processes ever write the same relative path.

`out_dir` is a local path (made absolute on the driver at start, `resolve_out_dir`), a `file://` URI (the same), or
any other fsspec URI (`s3://`, `gs://` with s3fs/gcsfs installed, `memory://` in tests): then the driver keeps the
run in a local mirror directory and `RunMirror` copies it to the URI after every checkpoint and at the end (files
first, the checkpoint's state.json after its other files, `latest` last), and fetches it back to resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

CKPT_DIR = "ckpt"
LATEST = "latest"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CKPT_DIR


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def staging_dir(run_dir: Path, iteration: int) -> Path:
    """Where a checkpoint is written before `commit` makes it visible."""
    path = checkpoint_root(run_dir) / (checkpoint_name(iteration) + ".tmp")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (and `path`): their bytes and names are on disk."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def commit(
    run_dir: Path, staged: Path, iteration: int, state: dict[str, Any], config_yaml: str, keep_last: int
) -> Path:
    """Write state.json + config.yaml, rename the staged dir into place, point `latest` at it, rotate.

    The learner has fsynced its files; state.json (the marker `list_checkpoints` and `resolve_resume` look for)
    is written last, then the directory is synced, renamed, and `latest` replaced, each step synced first.
    """
    root = checkpoint_root(run_dir)
    _write_synced(staged / "config.yaml", config_yaml)
    _write_synced(staged / "state.json", json.dumps(state, indent=2, sort_keys=True))
    _fsync(staged)
    final = root / checkpoint_name(iteration)
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)
    _fsync(root)
    tmp = root / (LATEST + ".tmp")
    _write_synced(tmp, final.name + "\n")
    os.replace(tmp, root / LATEST)
    _fsync(root)
    rotate(run_dir, keep_last, protect=final)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("iter_") and not p.name.endswith(".tmp") and (p / "state.json").is_file()
    )


def rotate(run_dir: Path, keep_last: int, protect: Path | None = None) -> None:
    """Keep the newest `keep_last` checkpoints by iteration, and always `protect` (the one `latest` names: after
    resuming from an older checkpoint, the newest by name is not the newest written)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """`latest` -> the checkpoint the pointer names; otherwise `resume` is a checkpoint directory."""
    if resume == LATEST:
        pointer = checkpoint_root(run_dir) / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"resume=latest but {pointer} does not exist: no checkpoint was saved in {run_dir}")
        path = checkpoint_root(run_dir) / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"checkpoint {path} is missing or incomplete (no state.json)")
    return path


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# checkpoint bytes between processes
# ---------------------------------------------------------------------------------------------------------------


def read_tree(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative POSIX path (the learner's checkpoint files: a few MB for a LoRA)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_tree(directory: Path, files: dict[str, bytes]) -> None:
    """Write `read_tree`'s output under `directory` (paths checked to stay inside), every file and dir fsynced."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = directory / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise ValueError(f"checkpoint file name {name!r} leaves its directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            f.write(data)
    fsync_tree(directory)


# ---------------------------------------------------------------------------------------------------------------
# out_dir: local path or URI
# ---------------------------------------------------------------------------------------------------------------


def is_remote(out_dir: str) -> bool:
    """A URI whose filesystem is not this machine's (`file://` is local)."""
    return "://" in out_dir and not out_dir.startswith("file://")


def ray_job_working_dir() -> str | None:
    """Under `ray job submit --working-dir`, the job's working_dir (the driver's cwd is then Ray's unpacked copy)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("runtime_env", {}).get("working_dir") or None
    except (json.JSONDecodeError, AttributeError):
        return None


def resolve_out_dir(out_dir: str) -> str:
    """`out_dir` as the driver will use it: a remote URI unchanged, a local path or file:// URI absolute.

    A relative path under `ray job submit --working-dir` would land in Ray's temporary copy of the working dir
    (deleted with the job), so it is refused with a ValueError saying what to pass instead.
    """
    if is_remote(out_dir):
        return out_dir.rstrip("/")
    path = Path(out_dir.removeprefix("file://")).expanduser()
    if not path.is_absolute() and (wd := ray_job_working_dir()):
        raise ValueError(
            f"out_dir={out_dir!r} is relative, and this driver runs under `ray job submit` with working_dir={wd!r}: "
            f"it would land in Ray's temporary copy of that directory ({Path.cwd()}), deleted after the job. "
            "Pass an absolute path on shared storage or a URI (s3://bucket/runs, gs://bucket/runs)."
        )
    return str(path.resolve())


def mirror_dir(url: str) -> Path:
    """Local directory where the driver keeps a remote run (`RLALIGN_MIRROR_DIR`, default ~/.cache/rlalign/mirror)."""
    base = Path(os.environ.get("RLALIGN_MIRROR_DIR", Path.home() / ".cache" / "rlalign" / "mirror"))
    return base / hashlib.sha1(url.encode()).hexdigest()[:12]


class RunMirror:
    """A run directory kept locally by the driver and copied to a fsspec URI (`out_dir` = s3://..., gs://...).

    `push` after every checkpoint and at the end: files that changed since the last push, a new checkpoint's
    state.json after its other files, then `latest`; checkpoints rotation removed locally are removed there. `pull`
    before a resume: the run's files and the checkpoint to resume from.
    """

    def __init__(self, url: str, local: Path) -> None:
        import fsspec

        self.url, self.local = url.rstrip("/"), local
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last pushed
        self.resume: str | None = None  # `resume` as the driver uses it: latest, or the pulled checkpoint's path

    @classmethod
    def open(cls, out_dir: str, name: str, resume: str | None) -> RunMirror:
        """The run `out_dir/name` (a fresh `name-N` when that holds files already and this is no resume, as for
        local directories), with an empty local mirror, or on resume one holding the run's files and checkpoint."""
        url = f"{out_dir.rstrip('/')}/{name}"
        n = 2
        while resume is None and cls(url, Path()).exists():
            url, n = f"{out_dir.rstrip('/')}/{name}-{n}", n + 1
        run = url.rsplit("/", 1)[-1]
        mirror = cls(url, mirror_dir(out_dir) / run)
        shutil.rmtree(mirror.local, ignore_errors=True)  # a copy left by an earlier run on this machine
        mirror.local.mkdir(parents=True)
        if resume is not None:
            name = mirror.pull(resume)
            mirror.resume = LATEST if resume == LATEST else str(mirror.local / CKPT_DIR / name)
        return mirror

    def exists(self) -> bool:
        return bool(self.fs.exists(self.root) and self.fs.ls(self.root))

    def push(self) -> None:
        files = sorted(p for p in self.local.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
        rel = {p: p.relative_to(self.local).as_posix() for p in files}
        ckpt_files = [p for p in files if rel[p].startswith(CKPT_DIR + "/") and rel[p].count("/") >= 2]
        markers = [p for p in ckpt_files if p.name == "state.json"]
        pointer = [p for p in files if rel[p] == f"{CKPT_DIR}/{LATEST}"]
        rest = [p for p in files if p not in markers and p not in pointer]
        for p in [*rest, *markers, *pointer]:  # a checkpoint is visible (state.json) only once its files are there
            st = p.stat()
            if p in pointer or self._pushed.get(rel[p]) != (st.st_size, st.st_mtime_ns):
                self.fs.makedirs(f"{self.root}/{rel[p]}".rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(p), f"{self.root}/{rel[p]}")
                self._pushed[rel[p]] = (st.st_size, st.st_mtime_ns)
        kept = {p.name for p in list_checkpoints(self.local)}
        remote_root = f"{self.root}/{CKPT_DIR}"
        if self.fs.exists(remote_root):
            for entry in self.fs.ls(remote_root, detail=False):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith("iter_") and name not in kept:
                    self.fs.rm(entry, recursive=True)

    def pull(self, resume: str) -> str:
        """Copy the run's own files and the checkpoint `resume` names (latest, or a checkpoint's URI or name) into
        `local`; returns the checkpoint's name."""
        if not self.fs.exists(self.root):
            raise FileNotFoundError(f"resume={resume} but {self.url} does not exist")
        remote_ckpt = f"{self.root}/{CKPT_DIR}"
        if resume == LATEST:
            pointer = f"{remote_ckpt}/{LATEST}"
            if not self.fs.exists(pointer):
                raise FileNotFoundError(f"resume=latest but {self.url}/{CKPT_DIR}/{LATEST} does not exist")
            name = self.fs.cat_file(pointer).decode().strip()
        else:
            name = resume.rstrip("/").rsplit("/", 1)[-1]
        for entry in self.fs.find(self.root):
            rel = entry[len(self.root) :].lstrip("/")
            in_ckpt = rel.startswith(CKPT_DIR + "/")
            if not in_ckpt or rel == f"{CKPT_DIR}/{LATEST}" or rel.startswith(f"{CKPT_DIR}/{name}/"):
                target = self.local / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(entry, str(target))
                st = target.stat()
                self._pushed[rel] = (st.st_size, st.st_mtime_ns)  # already there: not pushed back
        return name
