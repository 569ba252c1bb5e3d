import statistics

import pytest

from dd import spread


def _rows(values: dict) -> list[dict]:
    """values: {(family, method): [fid per seed]} → rows as `spread.run` returns them."""
    return [{"family": fam, "method": m, "seed": s, "fid_fmnist": v, "precision": 0.5, "recall": 0.1,
             "class_acc": 0.8} for (fam, m), vs in values.items() for s, v in enumerate(vs)]


def test_summary_pairs_differences_by_seed_and_counts_wins():
    teacher, onestep, one, two = [10.0, 11.0, 12.0], [16.0, 15.0, 17.0], [13.0, 13.5, 14.0], [13.2, 13.0, 13.9]
    s = spread.summarise(_rows({("var", "teacher"): teacher, ("var", "onestep*"): onestep,
                                ("var", "dd1 1-step"): one, ("var", "dd1 2-step"): two}), "fid_fmnist")["var"]
    assert s["seeds"] == [0, 1, 2]
    m = s["methods"]["dd1 1-step"]["fid_fmnist"]
    assert m["mean"] == pytest.approx(13.5) and m["sd"] == pytest.approx(0.5) and (m["min"], m["max"]) == (13.0, 14.0)
    p = s["pairs"]["dd1 2-step - dd1 1-step"]
    diff = [b - a for a, b in zip(one, two)]  # +0.2, -0.5, -0.1: 2-step better on two seeds
    assert p["per_seed"] == pytest.approx(diff) and p["first_better"] == 2 and p["seeds"] == 3
    assert p["sd"] == pytest.approx(statistics.stdev(diff))
    share = [(o - d) / (o - t) for t, o, d in zip(teacher, onestep, one)]
    assert s["gap_closed"]["per_seed"] == pytest.approx(share)
    assert s["gap_closed"]["mean"] == pytest.approx(sum(share) / 3)


def test_summary_keeps_families_apart_and_skips_pairs_it_cannot_form():
    s = spread.summarise(_rows({("llamagen", "teacher"): [1.0, 2.0], ("var", "teacher"): [5.0, 7.0],
                                ("var", "onestep*"): [9.0, 9.0]}), "fid_fmnist")
    assert list(s) == ["llamagen", "var"]
    assert s["llamagen"]["methods"]["teacher"]["fid_fmnist"]["mean"] == 1.5
    assert s["var"]["pairs"] == {} and "gap_closed" not in s["var"]
