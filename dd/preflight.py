"""Checks of the files and sizes params.yaml names, before any stage computes (no torch, no tensor data read).

`python -m dd.stage` runs `check` right after validating the values, so a run pointed at released checkpoints stops
in about a second, with one line naming the key and the file, when a file

    is not given or not there      params.yaml: teacher.llamagen.teacher_path is empty; source: official needs ...
    cannot be read                 params.yaml: teacher.var.tokenizer_path = '/ckpt': is a directory, not a file
    ends early                     params.yaml: teacher.llamagen.teacher_path = 'c2i_B_256.pt': the file is truncated ...
    holds another model            params.yaml: teacher.llamagen.teacher_path = 'var_d16.pth' holds a VAR transformer ...

and when `prepare.image_size` does not match the tokenizer's downsampling and the teacher's token grid.

A checkpoint is inspected, not loaded: `checkpoint_shapes` reads a safetensors header, or the pickle of a PyTorch
zip file with every global it names replaced by an inert stand-in (nothing in the file runs, no tensor data is read),
and checks that each tensor's bytes are in the file. `state_dict_of` finds the state dict inside a checkpoint the
way `dd.io.read_state_dict` does, which uses it too.

References:
    pytorch/pytorch `torch/serialization.py` (the zip layout: `<name>/data.pkl`, `<name>/data/<key>`, persistent
    ids `("storage", storage type, key, location, numel)`) and `torch/_utils.py` (`_rebuild_tensor_v2`);
    huggingface/safetensors (8-byte header length, JSON header with `data_offsets`).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

from .params import ParamsError

# Bytes per element of the storage types torch.save names (UntypedStorage counts bytes).
_ITEMSIZE = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
             "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
             "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


class CheckpointError(ValueError):
    """A checkpoint that cannot be inspected: missing, unreadable, truncated, or not a checkpoint at all."""


class TensorInfo(tuple):
    """A tensor's shape, read from a checkpoint without its data."""


class _Storage:
    def __init__(self, key: str, numel: int, itemsize: int):
        self.key, self.nbytes = key, numel * itemsize


class _Inert:
    """Stands in for every class or function a checkpoint's pickle names besides tensors; it runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _Dict(dict):
    """collections.OrderedDict as pickled by torch (a module's state_dict carries `_metadata` as its state)."""

    def __setstate__(self, state):
        pass


def _rebuild_tensor(storage, offset, size, *rest):
    return TensorInfo(int(s) for s in size)


def _rebuild_from_type(func, new_type, args, state):  # tensor subclasses (nn.Parameter in newer torch)
    return func(*args)


class _ShapeUnpickler(pickle.Unpickler):
    def __init__(self, f, storages: list):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return lambda data, *rest: data
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type
        if module == "collections" and name == "OrderedDict":
            return _Dict
        if module == "torch" and name.endswith("Storage"):
            return name
        return type(name, (_Inert,), {})  # a fresh inert class per global: Namespace, optimiser state, Path...

    def persistent_load(self, pid):
        _, storage_type, key, _location, numel = pid
        name = storage_type if isinstance(storage_type, str) else "UntypedStorage"
        self.storages.append(_Storage(str(key), int(numel), _ITEMSIZE.get(name, 1)))
        return None


def _open(path: Path):
    """The file opened for reading, or a CheckpointError saying why it cannot be."""
    if not path.exists():
        raise CheckpointError("no such file")
    if path.is_dir():
        raise CheckpointError("is a directory, not a file")
    try:
        return path.open("rb")
    except OSError as e:
        raise CheckpointError(f"cannot be read ({e.strerror or type(e).__name__})") from None


def _safetensors_shapes(f, size: int) -> dict:
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if n is None or 8 + n > size:
        raise CheckpointError(f"the file is truncated: a safetensors header of {n} bytes in a file of {size} bytes")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError("neither a PyTorch checkpoint nor a readable safetensors file") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"the file is truncated: its tensors need {8 + n + end:,} bytes, it has {size:,}")
    return {k: TensorInfo(v["shape"]) for k, v in header.items()}


def _torch_zip_contents(f, size: int):
    try:
        archive = zipfile.ZipFile(f)
    except zipfile.BadZipFile:
        raise CheckpointError(f"the file is truncated: a PyTorch zip checkpoint without its end record "
                              f"({size:,} bytes)") from None
    names = {i.filename: i.file_size for i in archive.infolist()}
    pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
        raise CheckpointError("a zip file, but not a PyTorch checkpoint (no data.pkl)")
    storages: list[_Storage] = []
    try:
        obj = _ShapeUnpickler(archive.open(pkl), storages).load()
    except Exception as e:  # a damaged pickle: whatever it raises, the file cannot be used
        raise CheckpointError(f"unreadable pickle in the checkpoint ({type(e).__name__}: {e})") from None
    folder = pkl[: -len("data.pkl")]
    for s in storages:
        have = names.get(f"{folder}data/{s.key}")
        if have is None or have < s.nbytes:
            raise CheckpointError(f"the file is truncated or corrupt: tensor storage {s.key} needs {s.nbytes:,} "
                                  f"bytes, the file holds {have or 0:,}")
    return obj


def checkpoint_contents(path: str | Path):
    """What a checkpoint holds, with every tensor as its shape (`TensorInfo`): a safetensors file's {name: shape},
    or the object a PyTorch zip checkpoint pickles (dicts, lists, plain values; other objects inert). Legacy
    (pre-zip) PyTorch files cannot be inspected without torch: → None. Raises CheckpointError."""
    path = Path(path)
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(9)
        f.seek(0)
        if magic[:2] == b"PK":
            return _torch_zip_contents(f, size)
        if magic[:1] == b"\x80":  # a legacy (pre-1.6) torch.save pickle
            return None
        if path.suffix == ".safetensors" or magic[8:9] == b"{":  # 8-byte header length, then the JSON header
            return _safetensors_shapes(f, size)
    raise CheckpointError("neither a PyTorch checkpoint nor a safetensors file")


def state_dict_of(obj, which: str, path, is_tensor) -> tuple[dict, dict]:
    """(name → tensor, config) inside a loaded checkpoint: a raw state dict, or a wrapper holding it under "model",
    "module" or "state_dict" (LlamaGen's sampler order), or under `which` when it is not "model" (a dotted path
    such as "trainer.ema_parameters" descends into nested dicts), with an optional dict "config" beside it.
    `module.` / `_orig_mod.` prefixes are stripped; `freqs_cis`, `*.kv_cache.*` and entries that are not tensors
    are dropped. is_tensor(value) says what a tensor is. Errors name the file."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    config = {}
    if all(is_tensor(v) for v in obj.values()):
        if which != "model":
            raise ValueError(f"{path}: a raw state dict has no {which!r} entry; use which='model'")
    else:
        if isinstance(obj.get("config"), dict):
            config = obj["config"]
        *outer, which = which.split(".")  # "trainer.ema_parameters": a state dict nested in dicts (VAR-DD)
        for k in outer:
            if not isinstance(obj.get(k), dict):
                raise ValueError(f"{path}: no {k!r} entry in checkpoint (keys there: {sorted(obj)})")
            obj = obj[k]
        keys = [which] if which != "model" else ["model", "module", "state_dict"]
        found = next((k for k in keys if isinstance(obj.get(k), dict)), None)
        if found is None:
            raise ValueError(f"{path}: no {which!r} state dict in checkpoint (keys there: {sorted(obj)})")
        obj = obj[found]
    sd = {}
    for k, v in obj.items():
        while k.startswith(PREFIXES):
            k = k.split(".", 1)[1]
        if k == "freqs_cis" or ".kv_cache." in k or not is_tensor(v):
            continue  # sampling-time state that upstream sometimes saved
        sd[k] = v
    return sd, config


def checkpoint_shapes(path: str | Path, which: str = "model") -> dict[str, tuple] | None:
    """{state-dict key: shape} of a model checkpoint, as `dd.io.read_state_dict` would find it, without reading
    tensor data (None for a legacy pickle). Raises CheckpointError, or ValueError when no state dict is found."""
    obj = checkpoint_contents(path)
    return None if obj is None else state_dict_of(obj, which, path, lambda v: isinstance(v, TensorInfo))[0]


# ------------------------------------------------------------------------------------------ the released models

# (family, role) -> (what it is, keys only that model has); `teacher.<family>.<role>_path` names the file.
KINDS = {  # (the DD1 models first: they hold their teacher's keys too)
    ("llamagen", "dd1"): ("LlamaGen-DD (DD1) model", ("n_d_embed.weight", "tok_embeddings.bias",
                                                      "layers.0.attention.wqkv.weight")),
    ("var", "dd1"): ("VAR-DD (DD1) model", ("n_d_embed.weight", "layerwise_n_d_embed.0.weight", "pos_1LC")),
    ("llamagen", "tokenizer"): ("LlamaGen VQ tokenizer", ("encoder.conv_blocks.0.res.0.conv1.weight",
                                                          "quantize.embedding.weight")),
    ("llamagen", "teacher"): ("LlamaGen GPT", ("tok_embeddings.weight", "cls_embedding.embedding_table.weight")),
    ("var", "tokenizer"): ("VAR multi-scale VQVAE", ("encoder.down.0.block.0.conv1.weight",
                                                     "quantize.embedding.weight")),
    ("var", "teacher"): ("VAR transformer", ("word_embed.weight", "pos_1LC", "class_emb.weight")),
}
RELEASE_FILES = {("llamagen", "tokenizer"): "vq_ds16_c2i.pt", ("llamagen", "teacher"): "c2i_B_256.pt",
                 ("var", "tokenizer"): "vae_ch160v4096z32.pth", ("var", "teacher"): "var_d16.pth",
                 ("llamagen", "dd1"): "LlamaGen-DD/llamagen-B.pt", ("var", "dd1"): "VAR-DD/var-d16.pth"}
DD1_ENTRIES = ("ema", "trainer.ema_parameters", "model")  # where the released DD1 files keep their weights


def _kind_of(shapes: dict) -> str | None:
    return next((what for what, keys in KINDS.values() if all(k in shapes for k in keys)), None)


def _levels(shapes: dict, prefix: str) -> int:
    """How many distinct indices follow `prefix` in the keys (`encoder.down.` → levels of the encoder)."""
    return len({k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)})


def official_shapes(family: str, role: str, value: str, root: Path) -> dict | None:
    """The key shapes of `teacher.<family>.<role>_path`, checked to be there, complete and the right model."""
    key = f"teacher.{family}.{role}_path"
    what, needed = KINDS[family, role]
    if not value:
        raise ParamsError(f"params.yaml: {key} is empty; source: official needs the released {what} "
                          f"({RELEASE_FILES[family, role]})")
    path = Path(value) if Path(value).is_absolute() else root / value
    try:
        shapes = checkpoint_shapes(path)
    except ValueError as e:  # CheckpointError, or no state dict in the file
        raise ParamsError(f"params.yaml: {key} = {value!r}: {str(e).replace(f'{path}: ', '')}") from None
    if shapes is not None and (not all(k in shapes for k in needed) or _kind_of(shapes) != what):
        other = _kind_of(shapes)
        holds = f"holds a {other}" if other else f"holds no known model (first keys: {sorted(shapes)[:5]})"
        raise ParamsError(f"params.yaml: {key} = {value!r} {holds}, not a {what} (needs key {needed[0]!r})")
    return shapes


def official_dd1_shapes(family: str, value: str, root: Path) -> dict | None:
    """The key shapes of `train_dd1.<family>.path` (source: official), checked to be there and a DD1 model of the
    family; the weights are looked up where the release keeps them (`DD1_ENTRIES`)."""
    key, (what, needed) = f"train_dd1.{family}.path", KINDS[family, "dd1"]
    if not value:
        raise ParamsError(f"params.yaml: {key} is empty; train_dd1.{family}.source: official needs the released "
                          f"{what} ({RELEASE_FILES[family, 'dd1']})")
    path = Path(value) if Path(value).is_absolute() else root / value
    shapes, why = None, None
    for entry in DD1_ENTRIES:
        try:
            shapes = checkpoint_shapes(path, entry)
            break
        except CheckpointError as e:
            raise ParamsError(f"params.yaml: {key} = {value!r}: {str(e).replace(f'{path}: ', '')}") from None
        except ValueError as e:  # no such entry: the next one
            why = why or str(e).replace(f"{path}: ", "")
    else:
        raise ParamsError(f"params.yaml: {key} = {value!r}: {why}")
    if shapes is not None and _kind_of(shapes) != what:
        other = _kind_of(shapes)
        holds = f"holds a {other}" if other else f"holds no known model (first keys: {sorted(shapes)[:5]})"
        raise ParamsError(f"params.yaml: {key} = {value!r} {holds}, not a {what} (needs keys {list(needed)})")
    return shapes


INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WHERE = (f"the 2015-12-05 Inception weights in PyTorch layout: torch-fidelity's {INCEPTION_WEIGHTS} (its "
                   f"GitHub release assets) or pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
REFERENCE_WHERE = ("a reference batch .npz with mu and sigma, e.g. ADM's VIRTUAL_imagenet256_labeled.npz (the "
                   "reference batches of openai/guided-diffusion's evaluations), or empty for the test split's")


def inception_files(ev, root: Path) -> None:
    """evaluate.metric_space: inception needs a weights file, and a reference file where one is named."""
    if ev.metric_space != "inception":
        return
    if not ev.inception_weights:
        raise ParamsError(f"params.yaml: evaluate.inception_weights is empty; evaluate.metric_space: inception "
                          f"needs {INCEPTION_WHERE}")
    for key, value, where in (("inception_weights", ev.inception_weights, INCEPTION_WHERE),
                              ("inception_reference", ev.inception_reference, REFERENCE_WHERE)):
        path = Path(value) if Path(value).is_absolute() else root / value
        if value and not path.is_file():
            raise ParamsError(f"params.yaml: evaluate.{key} = {value!r}: no such file; expected {where}")


def _size_error(image_size: int, need: int, why: str) -> ParamsError:
    return ParamsError(f"params.yaml: prepare.image_size = {image_size} does not match {why}: it must be {need}")


def check(cfg: dict, root: Path) -> None:
    """Every check of this module on validated params (`dd.params.load`'s result), for the families the pipeline
    runs (pipeline.families); raises ParamsError."""
    size = cfg["prepare"].image_size
    inception_files(cfg["evaluate"], root)
    for family in cfg["pipeline"].families:
        teacher = cfg["teacher"][family]
        if cfg["train_dd1"][family].source == "official":
            official_dd1_shapes(family, cfg["train_dd1"][family].path, root)
        if teacher.source == "official":
            tok = official_shapes(family, "tokenizer", teacher.tokenizer_path, root)
            net = official_shapes(family, "teacher", teacher.teacher_path, root)
            if tok is None or net is None:  # legacy pickles: the loaders check them
                continue
            if family == "llamagen":
                down = 2 ** (_levels(tok, "encoder.conv_blocks.") - 1)
                if size != down * teacher.grid_size:
                    raise _size_error(size, down * teacher.grid_size, f"the VQ tokenizer's downsampling by {down} "
                                      f"and teacher.llamagen.grid_size = {teacher.grid_size}")
            else:
                from .var_tokenizer import RELEASE_PATCH_NUMS  # (imports torch: only for released VAR files)

                down, side = 2 ** (_levels(tok, "encoder.down.") - 1), RELEASE_PATCH_NUMS[-1]
                if size != down * side:
                    raise _size_error(size, down * side, f"the VQVAE's downsampling by {down} and the release's "
                                      f"last scale of {side} x {side} tokens")
        else:
            tok = cfg["train_tokenizer"][family]
            down = 2 ** (len(tok.ch_mult) - 1)
            side = tok.patch_nums[-1] if family == "var" else size // down
            if size != down * side:
                raise _size_error(size, down * side, f"train_tokenizer.{family}.ch_mult's downsampling by {down}"
                                  + (f" and the last of train_tokenizer.var.patch_nums, {side}"
                                     if family == "var" else ""))
