"""dd.scale's projection: a paper profile's hours per stage from unit costs, against hand arithmetic."""
from pathlib import Path

import pytest

from dd import scale

ROOT = Path(__file__).resolve().parents[1]


def _row(seconds, batch, **more):
    return {"seconds": seconds, "per_s": batch / seconds, "batch": batch, **more}


@pytest.fixture(scope="module")
def var_cfg():
    return scale.settings(ROOT / "profiles" / "paper-var.yaml")


def test_projection_of_the_var_profile(var_cfg):
    d2 = var_cfg["train_dd2"]["var"]
    n = var_cfg["runtime"].nproc
    rows = {"teacher sampling": _row(2.0, 100), "pair building": _row(4.0, 100, flow_steps=200),
            "decode to 256 px": _row(1.0, 100), "DD1 training step": _row(0.5, 8), "GTS step": _row(1.0, 64),
            "DD2 generator step, K = 1": _row(3.0, 64), "DD2 generator step, K = 5": _row(7.0, 64)}
    got = scale.project("var", var_cfg, rows)
    assert got["notes"] == []
    h = got["hours"]
    assert h["sample_teacher"] == round(50000 * (0.02 + 0.01) / 3600, 2)
    assert h["build_trajectories"] == round(1_200_000 * 0.04 / n / 3600, 2)
    assert h["train_dd1"] == round(100000 * 0.5 * (64 / n) / 8 / 3600, 2)
    assert h["train_dd2 (GTS)"] == round(330000 * 1.0 * (512 / n) / 64 / 3600, 2)
    # one guidance update costs (7 - 3) / 4 = 1 s, the generator's part 2 s: K = 5 before the alignment at 8,000,
    # 8,000 guidance-only updates, then K = 2 (per-device batch 512 / 8 = 64, as measured)
    assert (d2.align_at, d2.align_steps, d2.k_after, d2.n_steps) == (8000, 8000, 2, 15500)
    assert h["train_dd2 (CSD)"] == round((8000 * (2 + 5) + 8000 * 1 + 7500 * (2 + 2)) / 3600, 2)
    assert h["evaluate (teacher and skip-n)"] == round(50000 * 3 * 0.03 / 3600, 2)


def test_a_cost_not_measured_leaves_its_stage_open_and_a_different_setting_is_named(var_cfg):
    rows = {"teacher sampling": _row(2.0, 100), "pair building": _row(1.0, 100, flow_steps=32),
            "DD2 generator step, K = 5": _row(7.0, 64)}
    got = scale.project("var", var_cfg, rows)
    assert got["hours"]["train_dd2 (GTS)"] is None and got["hours"]["sample_teacher"] is None  # no decoding figure
    assert got["hours"]["train_dd2 (CSD)"] == round(15500 * 7.0 / 3600, 2)
    assert got["notes"] == ["pairs measured at 32 flow steps (the profile: 200)",
                            "CSD at K = 5 throughout (K = 1 not measured: alignment and k_after left out)"]
