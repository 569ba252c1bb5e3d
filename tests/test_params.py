import copy
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dd import params as P

ROOT = Path(__file__).resolve().parents[1]


def _leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,)


def _section(name, family=None, **values):
    """A complete section from params.yaml with some values replaced."""
    return P.read_section(name, family, ROOT / "params.yaml", **values)


def test_repository_params_are_valid_and_complete():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = P.load(ROOT / "params.yaml")
    for name, cls in P.SECTIONS.items():
        if isinstance(cls, dict):
            assert set(raw[name]) == set(cls), f"params.yaml section {name} lacks a family"
            for fam in cls:
                assert raw[name][fam] == P.as_dict(cfg[name][fam]), f"{name}.{fam} reads back differently"
        else:
            assert raw[name] == P.as_dict(cfg[name]), f"params.yaml section {name} reads back differently"


def test_every_field_is_required_and_documented():
    """No defaults in the dataclasses: params.yaml is the one place a value lives."""
    classes = {c for cls in P.SECTIONS.values() for c in (cls.values() if isinstance(cls, dict) else [cls])}
    classes |= {f.metadata["section"] for c in classes for f in dataclasses.fields(c) if f.metadata.get("section")}
    for cls in classes:
        for f in dataclasses.fields(cls):
            name = f"{cls.__name__}.{f.name}"
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, name
            assert f.metadata["doc"] and "\n" not in f.metadata["doc"], f"{name} has no one-line doc"


def test_deleting_any_key_is_an_error_naming_it():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    leaves = list(_leaves(raw))
    assert len(leaves) > 150
    for path in leaves:
        edited = copy.deepcopy(raw)
        node = edited
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        with pytest.raises(P.ParamsError) as e:
            P.validate(edited)
        msg, name = str(e.value), ".".join(path)
        assert msg.startswith(f"params.yaml: {name} is missing; ") and "\n" not in msg, msg


def test_missing_key_message_gives_meaning_and_allowed_values():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["train_dd1"]["llamagen"]["n_steps"]
    with pytest.raises(P.ParamsError, match=r"^params\.yaml: train_dd1\.llamagen\.n_steps is missing; training steps "
                                            r"\(an integer >= 1\)$"):
        P.validate(raw)
    del raw["sample_teacher"]
    with pytest.raises(P.ParamsError, match=r"section sample_teacher is missing; one mapping per family"):
        P.validate(raw)
    with pytest.raises(P.ParamsError, match=r"^params\.yaml: features\.lr is missing; AdamW learning rate"):
        P.parse("features", {k: v for k, v in raw["features"].items() if k != "lr"})


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
        _section(section, **{key: value})
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{section}.{key} = {value!r}" in msg and fragment in msg


def test_unknown_key_and_section():
    with pytest.raises(P.ParamsError, match=r"prepare\.datset is not a known key; known keys: dataset"):
        _section("prepare", datset="mnist5k")
    with pytest.raises(P.ParamsError, match=r"unknown section 'prepar'"):
        P.validate({**yaml.safe_load((ROOT / "params.yaml").read_text()), "prepar": {}})


def test_family_sections_and_lists():
    cfg = _section("train_tokenizer", "llamagen", ch_mult=[1, 2])
    assert cfg.ch_mult == [1, 2]
    with pytest.raises(P.ParamsError, match=r"train_tokenizer\.llamagen\.ch_mult = \[1, 0\] is not allowed; a non-"):
        _section("train_tokenizer", "llamagen", ch_mult=[1, 0])
    with pytest.raises(P.ParamsError, match="train_tokenizer has no family 'gpt'; families: llamagen"):
        P.parse("train_tokenizer", {}, "gpt")
    assert _section("train_dd1", "var", t_train=[0, 4]).t_train == [0, 4]  # AR step 0 (pure noise) allowed
    with pytest.raises(P.ParamsError, match=r"train_dd1\.var\.t_train = \[0, -1\] is not allowed; a non-empty list "
                                            r"of integers >= 0"):
        _section("train_dd1", "var", t_train=[0, -1])


def test_flat_section_with_family_subsections():
    cfg = _section("evaluate", var={"skip_n": [2]})
    assert cfg.var.skip_n == [2] and cfg.llamagen.skip_n == [16, 32]
    with pytest.raises(P.ParamsError, match=r"evaluate\.var\.skip_n = \[0\] is not allowed"):
        _section("evaluate", var={"skip_n": [0]})
    with pytest.raises(P.ParamsError, match=r"evaluate\.var\.skip_n is missing; skip-n baselines"):
        _section("evaluate", var={})
    layout = P.as_parameters(cfg)  # a notebook's parameters cell: one variable, keyed by family
    assert layout["skip_n"] == {"llamagen": [16, 32], "var": [2], "t2i": [16, 32]} and "var" not in layout
    assert P.pick("evaluate", layout) == cfg


def test_csd_weight_is_a_choice():
    assert _section("train_dd2", "var").csd_weight == "token"
    assert _section("train_dd2", "var", csd_weight="sequence").csd_weight == "sequence"
    with pytest.raises(P.ParamsError, match=r"train_dd2\.var\.csd_weight = 'image' is not allowed; choose one of: "
                                            r"token, sequence"):
        _section("train_dd2", "var", csd_weight="image")


def test_dd1_ema_must_forget_the_initial_weights():
    """0.999 over 1,500 steps keeps 0.999 ** 1500 = 22 % of the teacher-copied initial weights in the evaluated EMA."""
    with pytest.raises(P.ParamsError, match=r"train_dd1\.var\.ema_decay = 0\.999 with n_steps = 1500 leaves 22% of the "
                                            r"initial weights .* ema_decay <= 0\.9980 for this n_steps"):
        _section("train_dd1", "var", ema_decay=0.999, n_steps=1500)
    assert _section("train_dd1", "var", ema_decay=0.998, n_steps=1500).ema_decay == 0.998
    assert _section("train_dd1", "var", ema_decay=0.0, n_steps=1).ema_decay == 0.0  # raw weights


def test_pick_reads_a_notebook_namespace_and_needs_every_key():
    ns = {**P.as_parameters(_section("prepare")), "dataset": "mnist5k", "unrelated": object()}
    assert P.pick("prepare", ns).dataset == "mnist5k"
    del ns["test_fraction"]
    with pytest.raises(P.ParamsError, match=r"prepare\.test_fraction is missing"):
        P.pick("prepare", ns)


def test_ints_are_accepted_as_floats():
    assert _section("features", lr=1).lr == 1.0


def test_entry_parameters_lay_out_sections_family_parts_and_keys():
    cfg = P.load(ROOT / "params.yaml")
    assert P.entry_parameters(cfg, "runtime.precision") == {"precision": cfg["runtime"].precision}
    assert P.entry_parameters(cfg, "train_dd1.var") == P.as_dict(cfg["train_dd1"]["var"])
    assert P.entry_parameters(cfg, "evaluate.var.skip_n") == {"skip_n": {"var": cfg["evaluate"].var.skip_n}}
    for bad in ("nope", "train_dd1", "base.seeds", "base.seed.x"):
        with pytest.raises(P.ParamsError, match="dvc.yaml: params entry"):
            P.entry_parameters(cfg, bad)


def _run_stage_with(tmp_path, edit, stage=("prepare",)):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dd.stage", *stage], cwd=tmp_path, capture_output=True, text=True,
                       env={"DD_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("edit, stage, expected", [
    (lambda p: p["prepare"].update(dataset="nope"), ("prepare",), "prepare.dataset = 'nope'"),
    (lambda p: p["features"].update(batch_size=-1), ("features",), "features.batch_size = -1"),
    (lambda p: p["train_dd1"]["llamagen"].pop("n_steps"), ("train_dd1", "--family", "llamagen"),
     "params.yaml: train_dd1.llamagen.n_steps is missing; training steps (an integer >= 1)"),
    (lambda p: p["evaluate"]["var"].pop("skip_n"), ("evaluate",), "params.yaml: evaluate.var.skip_n is missing"),
], ids=["invalid", "out-of-range", "missing", "missing-family-key"])
def test_stage_stops_fast_with_one_line(tmp_path, edit, stage, expected):
    r, seconds = _run_stage_with(tmp_path, edit, stage)
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
