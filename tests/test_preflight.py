"""dd.preflight: checkpoints inspected without torch.load, and the one-line errors before any stage computes."""
import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import save_file

from dd import io, preflight, stage
from dd.params import ParamsError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sd(**shapes):
    return {k: torch.zeros(s) for k, s in shapes.items()}


# Signature keys of the four released models, at toy sizes (preflight reads keys and shapes only).
VQ16 = _sd(**{f"encoder.conv_blocks.{i}.res.0.conv1.weight": (4, 4, 3, 3) for i in range(5)},
           **{"quantize.embedding.weight": (16, 8), "encoder.conv_in.weight": (4, 3, 3, 3)})
GPT = _sd(**{"tok_embeddings.weight": (16, 8), "cls_embedding.embedding_table.weight": (11, 8),
             "layers.0.attention.wqkv.weight": (24, 8)})
VAE = _sd(**{f"encoder.down.{i}.block.0.conv1.weight": (4, 4, 3, 3) for i in range(5)},
          **{"quantize.embedding.weight": (32, 4)})
VAR = _sd(**{"word_embed.weight": (8, 4), "pos_1LC": (1, 680, 8), "class_emb.weight": (11, 8)})


def training_file(path, sd):
    """The way LlamaGen's train scripts write: {"model", "optimizer", "steps", "args": Namespace}."""
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "steps": 3,
                "args": argparse.Namespace(data_path=pathlib.PurePosixPath("/data"), image_size=256)}, path)
    return path


def test_shapes_equal_what_torch_loads(tmp_path):
    sd = {"module.a.weight": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.zeros(2, dtype=torch.bfloat16),
          "c": torch.arange(5), "d": torch.ones(1, 2, 3, dtype=torch.bool), "e": torch.randn(6, 7)[:, 2],
          "f": torch.randn(()), "layers.0.kv_cache.k": torch.zeros(2), "freqs_cis": torch.zeros(4, 2)}
    want = {k: tuple(v.shape) for k, v in io.read_state_dict(training_file(tmp_path / "t.pt", sd),
                                                               trusted=True)[0].items()}
    assert want.keys() == {"a.weight", "b", "c", "d", "e", "f"}
    assert preflight.checkpoint_shapes(tmp_path / "t.pt") == want
    torch.save({k: v.detach() for k, v in sd.items()}, tmp_path / "raw.pth")
    assert preflight.checkpoint_shapes(tmp_path / "raw.pth") == want
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, tmp_path / "s.safetensors")
    assert preflight.checkpoint_shapes(tmp_path / "s.safetensors") == want
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))  # an OrderedDict with _metadata
    torch.save({"model": module.state_dict()}, tmp_path / "module.pt")
    assert preflight.checkpoint_shapes(tmp_path / "module.pt") == {k: tuple(v.shape) for k, v in
                                                                  module.state_dict().items()}
    torch.save({"ema": sd}, tmp_path / "ema.pt")
    assert preflight.checkpoint_shapes(tmp_path / "ema.pt", which="ema") == want
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert preflight.checkpoint_shapes(tmp_path / "legacy.pt") is None  # left to the loaders


def test_inspection_runs_nothing_from_the_file(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    torch.save({"model": {"w": torch.zeros(2)}, "payload": Boom()}, tmp_path / "evil.pt")
    assert preflight.checkpoint_shapes(tmp_path / "evil.pt") == {"w": (2,)}
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_file_cut_short_is_called_truncated(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    if suffix == ".pt":
        training_file(path, GPT)
    else:
        save_file(GPT, path)
    full = path.read_bytes()
    for keep in (len(full) // 2, len(full) - 30, 12):
        path.write_bytes(full[:keep])
        with pytest.raises(preflight.CheckpointError, match="truncated"):
            preflight.checkpoint_contents(path)
    # and the loaders say so too (they used to call a cut LlamaGen file "Python objects besides tensors")
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=rf"cut{suffix}: cannot read checkpoint: the file is truncated"):
        io.read_state_dict(path)


# ------------------------------------------------------------------------------------ params.yaml, one line each

def _params(**teacher):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for family, values in teacher.items():
        raw["teacher"][family].update(values)
    return raw


def _check(tmp_path, raw):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    preflight.check(stage.config(tmp_path), tmp_path)


@pytest.fixture
def released(tmp_path):
    """The four released files, in their release formats, with a 256 px image size."""
    training_file(tmp_path / "vq_ds16_c2i.pt", VQ16)
    training_file(tmp_path / "c2i_B_256.pt", GPT)
    torch.save(VAE, tmp_path / "vae_ch160v4096z32.pth")
    torch.save(VAR, tmp_path / "var_d16.pth")
    return tmp_path


def _official(llamagen=None, var=None):
    out = {"llamagen": {"source": "official", "tokenizer_path": "vq_ds16_c2i.pt", "teacher_path": "c2i_B_256.pt",
                        **(llamagen or {})},
           "var": {"source": "official", "tokenizer_path": "vae_ch160v4096z32.pth", "teacher_path": "var_d16.pth",
                   **(var or {})}}
    raw = _params(**out)
    raw["prepare"]["image_size"] = 256
    return raw


def test_the_embedded_default_and_the_released_files_pass(released):
    _check(released, _params())
    _check(released, _official())
    raw = _official()  # absolute paths work as well as paths under the repository root
    raw["teacher"]["var"]["teacher_path"] = str(released / "var_d16.pth")
    _check(released, raw)


@pytest.mark.parametrize("change, message", [
    ({"llamagen": {"teacher_path": ""}},
     r"^params.yaml: teacher.llamagen.teacher_path is empty; source: official needs the released LlamaGen GPT "
     r"\(c2i_B_256.pt\)$"),
    ({"var": {"tokenizer_path": "nowhere.pth"}},
     r"^params.yaml: teacher.var.tokenizer_path = 'nowhere.pth': no such file$"),
    ({"var": {"teacher_path": "."}}, r"^params.yaml: teacher.var.teacher_path = '.': is a directory, not a file$"),
    ({"llamagen": {"teacher_path": "notes.txt"}},
     r"^params.yaml: teacher.llamagen.teacher_path = 'notes.txt': neither a PyTorch checkpoint nor"),
    ({"llamagen": {"tokenizer_path": "cut.pt"}},
     r"^params.yaml: teacher.llamagen.tokenizer_path = 'cut.pt': the file is truncated"),
    ({"llamagen": {"teacher_path": "var_d16.pth"}},
     r"^params.yaml: teacher.llamagen.teacher_path = 'var_d16.pth' holds a VAR transformer, not a LlamaGen GPT"),
    ({"var": {"tokenizer_path": "vq_ds16_c2i.pt"}},
     r"^params.yaml: teacher.var.tokenizer_path = 'vq_ds16_c2i.pt' holds a LlamaGen VQ tokenizer, not a VAR"),
    ({"llamagen": {"tokenizer_path": "c2i_B_256.pt"}}, r"holds a LlamaGen GPT, not a LlamaGen VQ tokenizer"),
    ({"llamagen": {"grid_size": 24}},
     r"^params.yaml: prepare.image_size = 256 does not match the VQ tokenizer's downsampling by 16 and "
     r"teacher.llamagen.grid_size = 24: it must be 384$"),
])
def test_each_bad_file_stops_with_one_line(released, change, message):
    (released / "notes.txt").write_text("not a checkpoint\n" * 10)
    cut = (released / "vq_ds16_c2i.pt").read_bytes()
    (released / "cut.pt").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(ParamsError, match=message) as err:
        _check(released, _official(**change))
    assert "\n" not in str(err.value)


def test_image_size_against_the_tokenizers(released):
    raw = _official()
    raw["teacher"]["llamagen"]["source"] = "train"  # only VAR is official: its 16 x 16 last scale at 16 px per token
    raw["prepare"]["image_size"] = 128
    raw["train_tokenizer"]["llamagen"]["ch_mult"] = [1, 1, 2, 2, 4]
    with pytest.raises(ParamsError, match=r"prepare.image_size = 128 .* VQVAE's downsampling by 16 and the "
                                          r"release's last scale of 16 x 16 tokens: it must be 256$"):
        _check(released, raw)
    raw = _params()
    raw["prepare"]["image_size"] = 30
    with pytest.raises(ParamsError, match=r"image_size = 30 .* train_tokenizer.llamagen.ch_mult's downsampling by "
                                          r"4: it must be 28$"):
        _check(released, raw)
    raw["prepare"]["image_size"] = 64
    with pytest.raises(ParamsError, match=r"image_size = 64 .* downsampling by 4 and the last of "
                                          r"train_tokenizer.var.patch_nums, 8: it must be 32$"):
        _check(released, raw)


def test_only_the_families_the_pipeline_runs_are_checked(released):
    raw = _official(var={"teacher_path": "nowhere.pth"})  # a one-family paper profile: VAR is not run
    raw["pipeline"] = {"families": ["llamagen"]}
    _check(released, raw)
    raw["pipeline"] = {"families": ["var"]}
    with pytest.raises(ParamsError, match="teacher.var.teacher_path = 'nowhere.pth': no such file"):
        _check(released, raw)


def test_dd_stage_stops_before_any_compute(released):
    """Through the command a user (and dvc repro) runs: exit 2, one line, well under 10 s."""
    shutil.copy(ROOT / "dvc.yaml", released / "dvc.yaml")
    (released / "params.yaml").write_text(yaml.safe_dump(_official(var={"teacher_path": "c2i_B_256.pt"})))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dd.stage", "prepare"], capture_output=True, text=True,
                          env={**os.environ, "DD_ROOT": str(released), "PYTHONPATH": str(ROOT)}, cwd=released)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml: teacher.var.teacher_path = 'c2i_B_256.pt' holds a LlamaGen GPT, not a VAR transformer "
        "(needs key 'word_embed.weight')"]
    assert seconds < 10


# the released DD1 files' signature keys, in their layouts (LlamaGen-DD: "ema"; VAR-DD: ["trainer"]["ema_parameters"])
LLAMAGEN_DD = {**GPT, **_sd(**{"n_d_embed.weight": (2, 8), "tok_embeddings.bias": (8,)})}
VAR_DD = {**VAR, **_sd(**{"n_d_embed.weight": (2, 8), "layerwise_n_d_embed.0.weight": (8, 8)})}


@pytest.mark.parametrize("family, value, message", [
    ("llamagen", "", r"^params.yaml: train_dd1.llamagen.path is empty; train_dd1.llamagen.source: official needs "
                     r"the released LlamaGen-DD \(DD1\) model \(LlamaGen-DD/llamagen-B.pt\)$"),
    ("var", "nowhere.pth", r"^params.yaml: train_dd1.var.path = 'nowhere.pth': no such file$"),
    ("var", "llamagen-B.pt", r"^params.yaml: train_dd1.var.path = 'llamagen-B.pt' holds a LlamaGen-DD \(DD1\) "
                             r"model, not a VAR-DD \(DD1\) model"),
    ("llamagen", "c2i_B_256.pt", r"holds a LlamaGen GPT, not a LlamaGen-DD \(DD1\) model"),
    ("llamagen", "var-d16.pth", r"^params.yaml: train_dd1.llamagen.path = 'var-d16.pth' holds a VAR-DD \(DD1\) "
                                r"model, not a LlamaGen-DD \(DD1\) model"),
])
def test_released_dd1_files_are_checked(released, family, value, message):
    torch.save({"ema": LLAMAGEN_DD, "model": LLAMAGEN_DD, "steps": 1}, released / "llamagen-B.pt")
    torch.save({"trainer": {"ema_parameters": VAR_DD, "var_wo_ddp": VAR_DD}}, released / "var-d16.pth")
    raw = _official()
    for fam, path in (("llamagen", "llamagen-B.pt"), ("var", "var-d16.pth")):
        raw["train_dd1"][fam].update(source="official", path=path)
    _check(released, raw)  # both released files pass
    raw["train_dd1"][family]["path"] = value
    with pytest.raises(ParamsError, match=message) as err:
        _check(released, raw)
    assert "\n" not in str(err.value)
    with pytest.raises(ParamsError, match="teacher.llamagen.teacher_path = 'llamagen-B.pt' holds a LlamaGen-DD"):
        _check(released, _official(llamagen={"teacher_path": "llamagen-B.pt"}))  # a DD1 file is not a teacher


def test_inception_metrics_need_their_files(released):
    raw = _params()
    raw["evaluate"]["metric_space"] = "inception"
    with pytest.raises(ParamsError, match=r"^params.yaml: evaluate.inception_weights is empty; evaluate.metric_space: "
                                          r"inception needs the 2015-12-05 Inception weights .*"
                                          r"weights-inception-2015-12-05-6726825d.pth"):
        _check(released, raw)
    raw["evaluate"]["inception_weights"] = "inception.pth"
    with pytest.raises(ParamsError, match=r"evaluate.inception_weights = 'inception.pth': no such file; expected "):
        _check(released, raw)
    (released / "inception.pth").write_bytes(b"x")
    _check(released, raw)  # (the weights are checked when evaluate loads them); the test split is the reference
    raw["evaluate"]["inception_reference"] = "VIRTUAL_imagenet256_labeled.npz"
    with pytest.raises(ParamsError, match=r"inception_reference = 'VIRTUAL_imagenet256_labeled.npz': no such file; "
                                          r"expected a reference batch .npz with mu and sigma"):
        _check(released, raw)
