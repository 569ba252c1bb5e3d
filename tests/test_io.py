import os

import pytest
import torch

from dd import io


def test_root_from_env_and_from_ancestor(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.delenv("DD_ROOT", raising=False)
    monkeypatch.chdir(tmp_path / "notebooks")
    assert io.root() == tmp_path.resolve()
    assert io.path("data/x") == tmp_path.resolve() / "data/x"
    monkeypatch.setenv("DD_ROOT", str(tmp_path / "elsewhere"))
    assert io.root() == (tmp_path / "elsewhere").resolve()


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    dest = tmp_path / "a.json"
    io.write_json(dest, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert io.read_json(dest) == {"v": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_meta_roundtrip_and_mismatch(tmp_path):
    t = {"x": torch.arange(6, dtype=torch.uint8).view(2, 3), "y": torch.zeros(2, dtype=torch.int64)}
    io.save_tensors(tmp_path / "train.safetensors", t)
    io.write_meta(tmp_path, "prepare", {"train.safetensors": t}, counts={"train": 2})
    got, meta = io.read_checked(tmp_path, "train.safetensors")
    assert torch.equal(got["x"], t["x"]) and meta["counts"] == {"train": 2}
    io.save_tensors(tmp_path / "train.safetensors", {"x": torch.zeros(3, 3, dtype=torch.uint8), "y": t["y"]})
    with pytest.raises(ValueError, match=r"train.safetensors does not match .*meta.json: x: meta .*\[2, 3\].* vs file .*\[3, 3\]"):
        io.read_checked(tmp_path, "train.safetensors")


def test_corrupt_safetensors_and_checkpoint_name_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00garbage")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        io.load_tensors(bad)
    ck = tmp_path / "ck.pt"
    io.save_checkpoint(ck, {"w": torch.ones(3), "step": 4})
    ck.write_bytes(ck.read_bytes()[:50])
    with pytest.raises(ValueError, match="ck.pt: cannot load checkpoint"):
        io.load_checkpoint(ck)


def test_resolve_device():
    assert io.resolve_device("cpu").type == "cpu"
    assert io.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_read_state_dict_unwraps_and_cleans(tmp_path):
    w = torch.randn(2, 3)
    torch.save({"module": {"module._orig_mod.lin.weight": w, "freqs_cis": torch.ones(4),
                           "layers.0.attention.kv_cache.k_cache": torch.ones(1)},
                "config": {"dim": 3}, "step": 7}, tmp_path / "ck.pt")
    sd, config = io.read_state_dict(tmp_path / "ck.pt")
    assert list(sd) == ["lin.weight"] and torch.equal(sd["lin.weight"], w) and config == {"dim": 3}
    with pytest.raises(ValueError, match="no 'ema' state dict"):
        io.read_state_dict(tmp_path / "ck.pt", which="ema")


def test_load_strict_lists_mis_shaped_keys_and_loads_meta_models(tmp_path):
    with torch.device("meta"):
        lin = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"(?s)x\.pt: .*mis-shaped: 1 \['weight: file \(3, 3\) vs model \(2, 3\)'\]"):
        io.load_strict(lin, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "x.pt")
    sd = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    got = io.load_strict(lin.train(), sd, "x.pt")
    assert not got.training and torch.equal(got.weight, sd["weight"]) and torch.equal(got.bias, sd["bias"])
    assert io.count_indices({"l.0.a": 0, "l.0.b": 0, "l.3.a": 0, "m.1": 0}, r"l\.(\d+)\.") == 2
