"""dd.cpu_profile: every stage's unit of work is timed in both precisions and its time split into operator groups."""
import json

import pytest
import yaml

from dd import cpu_profile, params as P

from test_pipeline import TOY


def _toy_params(tmp_path):
    raw = yaml.safe_load(P.repository_params().read_text())
    for section, values in TOY.items():
        for key, value in values.items():
            if isinstance(value, dict):
                raw[section][key].update(value)
            elif key in raw[section]:
                raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_operator_groups():
    assert cpu_profile.group("aten::addmm") == "matmul" and cpu_profile.group("aten::bmm") == "matmul"
    assert cpu_profile.group("aten::mkldnn_convolution") == "conv"
    assert cpu_profile.group("aten::convolution_backward") == "conv"
    assert cpu_profile.group("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert cpu_profile.group("aten::add_") == "elementwise" and cpu_profile.group("aten::softmax") == "elementwise"


def test_units_cover_every_training_stage_of_both_families(tmp_path):
    cfg = P.validate(P.read_yaml(_toy_params(tmp_path)))
    stages = {stage for _, stage, _, _ in cpu_profile.units(cfg)}
    assert {"features", "train_tokenizer", "train_teacher", "build_trajectories", "train_dd1", "train_dd2"} <= stages
    names = [name for name, *_ in cpu_profile.units(cfg)]
    assert all(any(n.startswith(f) for n in names) for f in ("llamagen", "var"))


@pytest.mark.parametrize("unit", ["llamagen DD1 step", "var tokenizer step"])
def test_profile_rows_in_both_precisions(tmp_path, unit):
    out = tmp_path / "profile.json"
    assert cpu_profile.main(["--params", str(_toy_params(tmp_path)), "--unit", unit, "--repeats", "1",
                             "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert set(d["peak_gflops"]) == {"fp32", "bf16"} and all(v > 0 for v in d["peak_gflops"].values())
    assert [(r["unit"], r["precision"]) for r in d["rows"]] == [(unit, "fp32"), (unit, "bf16")]
    for r in d["rows"]:
        assert r["seconds"] > 0 and r["gflop"] > 0 and r["calls"] > 0
        assert set(r["shares"]) == {"attention", "matmul", "conv", "elementwise", "python"}
        assert 0.9 <= sum(r["shares"].values()) <= 1.05  # operator self times + what is left = the wall time
    assert out.with_suffix(".png").stat().st_size > 0 and d["device"] and "--unit" in d["command"]
