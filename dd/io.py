"""Files between stages: root-anchored paths, safetensors + `meta.json`, atomic writes, strict checkpoints.

Every stage hands on pickle-free files: tensors in one safetensors file per split, a `meta.json` per stage folder
(format version, tensor names, shapes, dtypes, counts), checkpoints of plain types that load with
`torch.load(weights_only=True)`. Each write goes to a temporary file first and is renamed into place, so a killed
process never leaves a half-written file under the final name.

Paths are anchored at the repository root, never at the working directory: `root()` is `$DD_ROOT` when set,
otherwise the nearest ancestor of the working directory holding `dvc.yaml` (so a notebook behaves the same under
papermill from the root and under Jupyter started in `notebooks/`).

Checkpoints of the released teachers (LlamaGen training files, VAR raw state dicts, .safetensors, our own
`{"model", "config"}` files) are read by `read_state_dict` into a clean name -> tensor dict and copied into a
model by `load_strict`, which refuses any difference in keys or shapes and lists all of them; the modules that
own the architectures infer their sizes from shapes with `require_key` and `count_indices`.

References:
    huggingface/safetensors (format); cookiecutter-data-science (immutable hand-offs between stages);
    FoundationVision/LlamaGen `autoregressive/sample/sample_c2i.py` (the "model" / "module" / "state_dict"
    lookup order of release checkpoints).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import preflight

FORMAT_VERSION = 1
# Set by `dd.stage` for the kernels it runs: progress bars go to the terminal, never into the executed report.
PROGRESS_ENV = "DD_PROGRESS"


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


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm progress bar for the package's long loops (same arguments as `tqdm`).

    Under `dd.stage` ($DD_PROGRESS = terminal) the bar writes to the process's own stderr (the terminal that runs
    `dvc repro`) instead of the kernel's, so an executed notebook keeps no wall of progress lines; in an interactive
    notebook or a plain script it behaves like tqdm. `dd.launch` relays its workers' bars the same way.
    """
    if os.environ.get(PROGRESS_ENV) == "terminal" and sys.__stderr__ is not None:
        kwargs.setdefault("file", sys.__stderr__)
    kwargs.setdefault("mininterval", 2.0)
    return tqdm(iterable, **kwargs)


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


def save_tensors(dest: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a dict of tensors to one safetensors file, atomically (metadata: strings in the file's header)."""
    with atomic_path(dest) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def tensor_metadata(src: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header ({} if none)."""
    with safe_open(str(src), framework="pt") as f:
        return dict(f.metadata() or {})


def load_tensors(src: str | Path) -> dict[str, torch.Tensor]:
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: file not found (has the stage that writes it run? try `dvc repro`)")
    try:
        return load_file(str(src))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{src}: not a readable safetensors file ({e})") from None


def digest(src: str | Path) -> str:
    """SHA-256 of a file's bytes (hex): identifies the exact weights a derived artefact was built from."""
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def read_state_dict(path: str | Path, which: str = "model",
                    trusted: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a model checkpoint -> (state dict name -> tensor, config stored in the file or {}).

    Accepts .safetensors (config from the metadata key "config", JSON), a raw state dict, or a wrapper holding
    the state dict under "model", "module" or "state_dict" (or under `which` when it is not "model", e.g. "ema")
    with an optional dict "config" beside it. `module.` / `_orig_mod.` prefixes are stripped; `freqs_cis`,
    `*.kv_cache.*` and non-tensor entries are dropped. Unless `trusted`, only tensors, plain types and
    `argparse.Namespace` (official LlamaGen training files) are unpickled. Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config = {}
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                obj = {k: f.get_tensor(k) for k in f.keys()}
                config = json.loads((f.metadata() or {}).get("config", "{}"))
        elif trusted:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            # Official training files store their argparse.Namespace under "args": plain data, safe to rebuild.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        try:  # why torch could not read it: a file that ends early says so (dd.preflight inspects without torch)
            preflight.checkpoint_contents(path)
        except preflight.CheckpointError as why:
            raise ValueError(f"{path}: cannot read checkpoint: {why}") from e
        if "Weights only load failed" in str(e):
            raise ValueError(f"{path}: the file holds Python objects besides tensors; pass trusted=True only "
                             f"if you trust its source") from None
        raise ValueError(f"{path}: cannot read checkpoint (corrupt file?): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    sd, stored = preflight.state_dict_of(obj, which, path, lambda v: isinstance(v, torch.Tensor))
    return sd, {**config, **stored}


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """Copy `state_dict` into `model` only if keys and shapes match exactly, else list every missing, unexpected
    and mis-shaped key. A model built on the meta device is materialised on CPU first. Returns it in eval mode."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    shaped = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(state_dict) & set(own) if state_dict[k].shape != own[k].shape)
    if missing or unexpected or shaped:
        def show(xs):
            return f"{len(xs)} {xs[:20]}{' ...' if len(xs) > 20 else ''}"

        raise ValueError(f"{path}: checkpoint does not match {type(model).__name__}({getattr(model, 'config', '')}):"
                         f"\n  missing: {show(missing)}\n  unexpected: {show(unexpected)}\n"
                         f"  mis-shaped: {show(shaped)}")
    if any(t.is_meta for t in own.values()):
        model = model.to_empty(device="cpu")  # built on meta to skip the random init; every tensor comes from the file
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def require_key(sd: dict[str, torch.Tensor], key: str, path: str | Path, what: str) -> torch.Size:
    """The shape of `sd[key]`; a missing key means the file is not a `what` checkpoint (the error says so)."""
    if key not in sd:
        raise ValueError(f"{path}: not a {what} checkpoint: key {key!r} missing (first keys: {sorted(sd)[:8]})")
    return sd[key].shape


def count_indices(sd: dict[str, torch.Tensor], pattern: str) -> int:
    """How many distinct values the first group of `pattern` takes over the keys (layers from `layers.<i>.`)."""
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def resolve_device(name: str) -> torch.device:
    """`base.device`: auto → cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)
