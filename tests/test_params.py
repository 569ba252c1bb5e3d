import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dd import params as P

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid_and_complete():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = P.load(ROOT / "params.yaml")
    for name, cls in P.SECTIONS.items():
        if isinstance(cls, dict):
            assert set(raw[name]) == set(cls), f"params.yaml section {name} lacks a family"
            for fam in cls:
                assert set(raw[name][fam]) == set(P.as_dict(cfg[name][fam])), f"{name}.{fam} is incomplete"
        else:
            assert set(raw[name]) == set(P.as_dict(cfg[name])), f"params.yaml section {name} is incomplete"


@pytest.mark.parametrize("section, key, value, fragment", [
    ("prepare", "dataset", "nope", "choose one of: fashion-mnist, mnist5k, imagefolder"),
    ("features", "batch_size", -4, "an integer >= 1"),
    ("features", "batch_size", 2.5, "an integer >= 1"),
    ("features", "lr", 0, "a number in (0.0, 1.0]"),
    ("features", "lr", "fast", "a number"),
    ("base", "device", "tpu", "choose one of: auto, cpu, cuda"),
    ("base", "seed", True, "an integer >= 0"),
])
def test_invalid_value_names_key_value_and_allowed(section, key, value, fragment):
    with pytest.raises(P.ParamsError) as e:
        P.parse(section, {key: value})
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{section}.{key} = {value!r}" in msg and fragment in msg


def test_unknown_key_and_section():
    with pytest.raises(P.ParamsError, match=r"prepare\.datset is not a known key; known keys: dataset"):
        P.parse("prepare", {"datset": "mnist5k"})


def test_family_sections_and_lists():
    cfg = P.parse("train_tokenizer", {"ch_mult": [1, 2]}, "llamagen")
    assert cfg.ch_mult == [1, 2]
    with pytest.raises(P.ParamsError, match=r"train_tokenizer\.llamagen\.ch_mult = \[1, 0\] is not allowed; a non-empty"):
        P.parse("train_tokenizer", {"ch_mult": [1, 0]}, "llamagen")
    with pytest.raises(P.ParamsError, match="train_tokenizer has no family 'gpt'; families: llamagen"):
        P.parse("train_tokenizer", {}, "gpt")
    assert P.parse("train_dd1", {"t_train": [0, 4]}, "var").t_train == [0, 4]  # AR step 0 (pure noise) allowed
    with pytest.raises(P.ParamsError, match=r"train_dd1\.var\.t_train = \[0, -1\] is not allowed; a non-empty list "
                                            r"of integers >= 0"):
        P.parse("train_dd1", {"t_train": [0, -1]}, "var")


def test_dd1_ema_must_forget_the_initial_weights():
    """0.999 over 1,500 steps keeps 0.999 ** 1500 = 22 % of the teacher-copied initial weights in the evaluated EMA
    (it happened on the GPU: a VAR DD1 of 800 steps at 0.999, 45 % left, scored worse than onestep*)."""
    with pytest.raises(P.ParamsError, match=r"train_dd1\.var\.ema_decay = 0\.999 with n_steps = 1500 leaves 22% of the "
                                            r"initial weights .* ema_decay <= 0\.9980 for this n_steps"):
        P.parse("train_dd1", {"ema_decay": 0.999, "n_steps": 1500}, "var")
    assert P.parse("train_dd1", {"ema_decay": 0.998, "n_steps": 1500}, "var").ema_decay == 0.998
    assert P.parse("train_dd1", {"ema_decay": 0.0, "n_steps": 1}, "var").ema_decay == 0.0  # raw weights


def test_pick_reads_a_notebook_namespace():
    ns = {"dataset": "mnist5k", "image_size": 32, "unrelated": object()}
    assert P.pick("prepare", ns).dataset == "mnist5k"


def test_ints_are_accepted_as_floats():
    assert P.parse("features", {"lr": 1}).lr == 1.0


def _run_stage_with(tmp_path, edit):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dd.stage", "prepare"], cwd=tmp_path, capture_output=True, text=True,
                       env={"DD_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p["prepare"].update(dataset="nope"), "prepare.dataset = 'nope'"),
    (lambda p: p["features"].update(batch_size=-1), "features.batch_size = -1"),
])
def test_stage_stops_fast_with_one_line(tmp_path, edit, expected):
    r, seconds = _run_stage_with(tmp_path, edit)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert seconds < 10
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def test_gpu_profile_is_valid_and_becomes_dvc_set_params(tmp_path, capsys):
    from dd import profile

    assert profile.main([str(ROOT / "profiles/gpu.yaml")]) == 0
    args = capsys.readouterr().out.split()
    assert "train_dd1.llamagen.n_steps=10000" in args and args.count("-S") == len(args) // 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_dd1:\n  llamagen: {lr: 5}\n")
    assert profile.main([str(bad)]) == 2
    assert "train_dd1.llamagen.lr = 5 is not allowed" in capsys.readouterr().err
