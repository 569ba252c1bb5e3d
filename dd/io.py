"""Files between stages: root-anchored paths, safetensors + `meta.json`, atomic writes, strict checkpoints.

Every stage hands on pickle-free files: tensors in one safetensors file per split, a `meta.json` per stage folder
(format version, tensor names, shapes, dtypes, counts), checkpoints of plain types that load with
`torch.load(weights_only=True)`. Each write goes to a temporary file first and is renamed into place, so a killed
process never leaves a half-written file under the final name.

Paths are anchored at the repository root, never at the working directory: `root()` is `$DD_ROOT` when set,
otherwise the nearest ancestor of the working directory holding `dvc.yaml` (so a notebook behaves the same under
papermill from the root and under Jupyter started in `notebooks/`).

References:
    huggingface/safetensors (format); cookiecutter-data-science (immutable hand-offs between stages).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


def root() -> Path:
    """The repository root: `$DD_ROOT`, else the nearest ancestor of the cwd that holds `dvc.yaml`."""
    env = os.environ.get("DD_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file():
            return d
    raise FileNotFoundError(f"no dvc.yaml in {here} or its parents; run inside the repository or set DD_ROOT")


def path(*parts: str | Path) -> Path:
    """`root() / parts`; absolute parts pass through unchanged."""
    p = Path(*parts)
    return p if p.is_absolute() else root() / p


@contextlib.contextmanager
def atomic_path(dest: str | Path):
    """Yield a temporary path beside `dest`; on success rename it onto `dest` (atomic on POSIX)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the final file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, dest)  # load-bearing: the only moment `dest` changes
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(dest: str | Path, obj: Any) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(dest: str | Path, frame) -> None:
    """A pandas DataFrame to CSV (DVC plots), atomically, creating the folder."""
    with atomic_path(dest) as tmp:
        frame.to_csv(tmp, index=False)


def read_json(src: str | Path) -> Any:
    return json.loads(Path(src).read_text())


def save_tensors(dest: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a dict of tensors to one safetensors file, atomically."""
    with atomic_path(dest) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def load_tensors(src: str | Path) -> dict[str, torch.Tensor]:
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: file not found (has the stage that writes it run? try `dvc repro`)")
    try:
        return load_file(str(src))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{src}: not a readable safetensors file ({e})") from None


def describe(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()}


def write_meta(folder: str | Path, stage: str, files: dict[str, dict[str, torch.Tensor]], **extra) -> dict:
    """Record in `folder/meta.json` each safetensors file written by `stage` (name → tensors) and `extra` keys.

    Merges into an existing meta.json of the same stage, so a stage may write its files one by one.
    """
    path = Path(folder) / "meta.json"
    old = read_json(path) if path.is_file() else {}
    if old.get("stage") != stage:
        old = {}
    meta = {**old, "format_version": FORMAT_VERSION, "stage": stage,
            "files": {**old.get("files", {}), **{name: describe(t) for name, t in files.items()}}}
    for key, value in extra.items():
        meta[key] = {**meta[key], **value} if isinstance(value, dict) and isinstance(meta.get(key), dict) else value
    write_json(path, meta)
    return meta


def read_checked(folder: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load `folder/name` and check it against `folder/meta.json`; a mismatch names the file and the tensor."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (has the stage that writes {folder} run? try `dvc repro`)")
    meta = read_json(meta_path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    if name not in meta.get("files", {}):
        raise ValueError(f"{meta_path}: does not list {name}")
    tensors = load_tensors(folder / name)
    want, got = meta["files"][name], describe(tensors)
    if want != got:
        diff = [f"{k}: meta {want.get(k)} vs file {got.get(k)}" for k in sorted(set(want) | set(got))
                if want.get(k) != got.get(k)]
        raise ValueError(f"{folder / name} does not match {meta_path}: " + "; ".join(diff))
    return tensors, meta


def save_checkpoint(dest: str | Path, obj: dict) -> None:
    """torch.save of plain types and tensors only, atomically (loads with weights_only=True)."""
    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(src: str | Path, map_location="cpu") -> dict:
    src = Path(src)
    try:
        return torch.load(src, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, wrong format, pickled classes
        raise ValueError(f"{src}: cannot load checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def resolve_device(name: str) -> torch.device:
    """`base.device`: auto → cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)
