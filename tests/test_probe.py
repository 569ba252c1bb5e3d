from types import SimpleNamespace

import pytest
import torch

from dd import probe, teachers


def _pts(costs, values):
    return [{"cost_seconds": c, "fid": v} for c, v in zip(costs, values)]


def test_at_cost_interpolates_inside_the_curve_only():
    pts = _pts([10, 20, 40], [30.0, 20.0, 10.0])
    assert probe.at_cost(pts, 15, "fid") == pytest.approx(25.0)
    assert probe.at_cost(pts, 30, "fid") == pytest.approx(15.0)
    assert probe.at_cost(pts, 40, "fid") == 10.0 and probe.at_cost(pts, 10, "fid") == 30.0
    assert probe.at_cost(pts, 5, "fid") is None and probe.at_cost(pts, 41, "fid") is None


def test_compare_reads_both_methods_at_the_smaller_budget():
    dd1 = _pts([100, 400, 700, 1000], [40.0, 20.0, 14.0, 12.0])  # budget 1000 s, final 12
    dd2 = _pts([50, 250, 450, 600], [80.0, 30.0, 16.0, 11.0])   # budget 600 s, final 11
    c = probe.compare(dd1, dd2, "fid")
    assert c["budget_seconds"] == {"dd1": 1000, "dd2": 600} and c["final"] == {"dd1": 12.0, "dd2": 11.0}
    assert c["equal_cost_seconds"] == 600
    assert c["at_equal_cost"]["dd1"] == pytest.approx(16.0) and c["at_equal_cost"]["dd2"] == 11.0
    assert c["ratio_at_equal_cost"] == pytest.approx(11.0 / 16.0)
    assert c["dd2_reaches_dd1_final_seconds"] == 600 and c["dd2_reaches_dd1_final_share"] == pytest.approx(0.6)
    never = probe.compare(dd1, _pts([50, 600], [80.0, 30.0]), "fid")
    assert never["dd2_reaches_dd1_final_seconds"] is None and never["dd2_reaches_dd1_final_share"] is None


def test_curve_adds_sequences_and_cumulative_cost():
    rows = [{"step": 0, "train_seconds": 0.0, "fid": 50.0}, {"step": 100, "train_seconds": 30.0, "fid": 20.0}]
    c = probe.curve(rows, cost_before=90.0, batch_size=16)
    assert [(r["sequences"], r["cost_seconds"]) for r in c] == [(0, 90.0), (1600, 120.0)]


def test_dd1_and_dd2_probe_the_same_labels_and_noise():
    fam = teachers.LlamaGen
    (y1, e1), (y2, e2) = (probe.fixed_inputs(30, fam, None, 10, (6, 4), 0) for _ in range(2))
    assert (y1 == y2).all() and (e1 == e2).all() and y1.tolist()[:12] == [*range(10), 0, 1]


def test_probe_labels_are_the_evaluations_first_ones():
    """t2i: the probe reads held-out captions, classes in turn, as the evaluation does (not the first caption ids,
    which all ask for the first classes)."""
    ids = torch.arange(60)  # 40 training captions, 20 held-out; caption i asks for class i % 10
    tok = SimpleNamespace(n_train=40, captions=torch.zeros(60, 2, 3),
                          caption_info=torch.stack([ids % 10, ids % 2, ids // 2 % 2, ids // 4 % 2], 1))
    y, _ = probe.fixed_inputs(10, teachers.T2I, tok, 40, (6, 4), 3)
    assert (y == teachers.T2I.eval_labels(tok, 30, 40, 3)[:10]).all() and (y >= 40).all()
    assert sorted(teachers.T2I.classes(tok, y).tolist()) == list(range(10))
