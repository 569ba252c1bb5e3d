"""dd.report: the README's generated blocks come from the metrics files and the executed notebooks alone."""
import json

import pytest

from dd import report

ROW = {"steps": 1, "fid_fmnist": 12.46, "recall": 0.0773, "class_acc": 0.782, "latency_ms": 2.99, "speedup": 22.66}


def _reports(tmp_path):
    metrics = tmp_path / "reports" / "metrics"
    metrics.mkdir(parents=True)
    evaluate = {"fid_key": "fid_fmnist", "n_eval": 1000, "device": "cpu", "threads": 2, "torch": "2.x",
                "llamagen": {"teacher": {**ROW, "steps": 64, "speedup": 1.0},
                             "sjd": {**ROW, "steps": 64, "passes": 30.44, "speedup": 1.8}, "dd1 1-step": ROW,
                             "dd1 mixed 8-16": {**ROW, "steps": 10}, "dd2 2-step": {**ROW, "steps": 2}},
                "var": {"teacher": {**ROW, "steps": 6, "speedup": 1.0}},
                "sjd": {"llamagen": {"window": 16, "init": "random", "passes": 30.44, "tokens": 64, "draws": 3,
                                     "teacher": {"fid_fmnist_mean": 12.9, "fid_fmnist_sd": 0.31},
                                     "sjd": {"fid_fmnist_mean": 13.1, "fid_fmnist_sd": 0.22}}}}
    (metrics / "evaluate.json").write_text(json.dumps(evaluate))
    for name, minutes in (("01_prepare", 0.5), ("07_train_dd1_llamagen", 2.0), ("07_train_dd1_var", 3.0)):
        nb = {"cells": [], "metadata": {"papermill": {"duration": minutes * 60}}}
        (tmp_path / "reports" / f"{name}.ipynb").write_text(json.dumps(nb))
    return metrics


def _readme():
    blocks = [f"{s}\nstale\n{e}" for s, e in map(report._markers, report.BLOCKS)]
    return "# title\n\n" + "\n\ntext between\n\n".join(blocks) + "\n\ntail\n"


def test_results_table_rows_and_paper_column(tmp_path):
    lines = report.results(_reports(tmp_path))
    table = [line for line in lines if line.startswith("|")]
    assert len(table[0].split("|")) - 2 <= 8  # a screen wide
    assert "| **LlamaGen-style** |" in table[2] and any(line.startswith("| **VAR-style** |") for line in table)
    dd1 = next(line for line in table if line.startswith("| dd1 1-step |"))
    assert "| 12.5 | 0.077 | 78.2% | 3.0 | 22.7× | DD1 1-step: 11.35, 217.8× |" in dd1
    # a mixed setting is matched to the paper's row by its prefix; a method the paper lacks gets a dash
    assert "DD1 pre-trained-41-81: 6.20, 5.7×" in next(line for line in table if "dd1 mixed" in line)
    assert next(line for line in table if "dd2 2-step" in line).endswith("| – |")
    # SJD's passes vary per image: the measured mean and the most; its draws against the teacher's below
    assert next(line for line in table if line.startswith("| sjd |")).startswith("| sjd | 30.4 (≤ 64) | 12.5 |")
    assert any("30.4 forward passes per image for 64 tokens; fid_fmnist 13.1 ± 0.2 against the teacher's 12.9 ± 0.3"
               in line for line in lines)


def test_stage_times_per_family_and_total(tmp_path):
    (line,) = report.stage_times(_reports(tmp_path).parent)
    assert line == "`prepare` 0.5, `train_dd1` 2.0 / 3.0; **total 5.5** on cpu, 2 threads, torch 2.x."


def test_figures_name_the_cpu_they_ran_on(tmp_path):
    metrics = _reports(tmp_path)
    named = "AMD EPYC 9B14 (2 cores, 2 threads, torch 2.x)"
    d = json.loads((metrics / "evaluate.json").read_text())
    (metrics / "evaluate.json").write_text(json.dumps({**d, "device": named}))
    assert any(line.endswith(f"Measured on {named}.") for line in report.results(metrics))
    assert report.stage_times(metrics.parent)[0].endswith(f"**total 5.5** on {named}.")


def test_render_rewrites_every_block_and_nothing_else(tmp_path):
    metrics = _reports(tmp_path)
    new = report.render(_readme(), metrics)
    assert "stale" not in new and new.startswith("# title\n\n") and new.endswith("\n\ntail\n")
    assert new.count("text between") == len(report.BLOCKS) - 1
    assert report.render(new, metrics) == new  # idempotent: `--check` passes right after a rewrite


def test_render_names_a_missing_block(tmp_path):
    with pytest.raises(ValueError, match="stage-times"):
        report.render(_readme().replace("stage-times", "other"), _reports(tmp_path))


def test_paper_costs_table_from_the_scale_file(tmp_path):
    bench = tmp_path / "reports" / "benchmarks"
    bench.mkdir(parents=True)
    fam = {"nproc": 8, "projected": {"hours": {"build_trajectories": 1.78, "train_dd2 (GTS)": None},
                                     "notes": ["pairs measured at 32 flow steps (the profile: 200)"]}}
    (bench / "release_scale.json").write_text(json.dumps({
        "device": "NVIDIA H200", "command": "python -m dd.scale --device cuda",
        "families": [{"family": "llamagen", **fam}, {"family": "var", **fam}]}))
    lines = report.paper_costs(tmp_path / "reports")
    assert lines[0] == "| stage | `paper-llamagen` (LlamaGen-B) | `paper-var` (VAR-d16) |"
    assert "| build_trajectories | 1.8 | 1.8 |" in lines and "| train_dd2 (GTS) | not measured | not measured |" in lines
    assert lines[-1].startswith("Wall-clock hours on a node of 8 × NVIDIA H200")
    assert "pairs measured at 32 flow steps" in lines[-1] and "VAR-d16: DD1 296.9" in lines[-1]


def test_figures_name_the_training_precision(tmp_path):
    """The stage line and the results table say which precision the stages trained in (their metrics files'
    top-level `precision`; nested per-method precision figures are not mistaken for it)."""
    metrics = _reports(tmp_path)
    for name in ("train_dd1_llamagen", "train_teacher_var"):
        (metrics / f"{name}.json").write_text(json.dumps({"precision": "bf16", "methods": {"x": {"precision": 0.5}}}))
    assert report.stage_times(metrics.parent)[0].endswith(
        "on cpu, 2 threads, torch 2.x, training in bf16 (`runtime.precision`).")
    assert any(line.endswith("training in bf16 (`runtime.precision`), sampling in fp32.")
               for line in report.results(metrics))


def test_cost_table_states_both_methods_at_equal_cost(tmp_path):
    metrics = _reports(tmp_path)
    assert report.costs(metrics)[0].startswith("(no DD1 / DD2 probe curves")
    d = json.loads((metrics / "evaluate.json").read_text())
    spread = {"dd1 1-step": {"mean": 13.04, "sd": 0.21, "draws": 3}, "dd2 1-step": {"mean": 25.5, "sd": 0.4, "draws": 3}}
    d["cost"] = {"llamagen": {"budget_seconds": {"dd1": 600.0, "dd2": 630.0}, "final": {"dd1": 13.6, "dd2": 24.0},
                              "equal_cost_seconds": 600.0, "at_equal_cost": {"dd1": 13.6, "dd2": 24.6},
                              "ratio_at_equal_cost": 24.6 / 13.6, "dd2_reaches_dd1_final_seconds": None,
                              "dd2_reaches_dd1_final_share": None, "probe_key": "fid_fmnist", "n_probe": 500,
                              "teacher_probe": 12.9, "final_1step": spread}}
    (metrics / "evaluate.json").write_text(json.dumps(d))
    lines = report.costs(metrics)
    assert lines[2] == ("| LlamaGen-style | 10.0 / 10.5 | 13.6 / 24.6 (1.81) at 10.0 min | 13.6 / 24.0 (12.9) | "
                        "13.0 ± 0.2 / 25.5 ± 0.4 | not within its budget |")
    assert "500 one-step samples" in lines[-1] and "over 3 noise draws" in lines[-1]


def test_t2i_table_has_the_attributes_and_falls_back_to_the_committed_run(tmp_path):
    metrics = _reports(tmp_path)
    assert report.t2i(metrics) == ["(no t2i rows yet: run `make repro-t2i`)"]
    acc = {"class_acc": 0.61, "size_acc": 0.9, "position_acc": 0.874, "brightness_acc": 0.99}
    run = {**json.loads((metrics / "evaluate.json").read_text()),
           "t2i": {"teacher": {**ROW, **acc, "steps": 64, "speedup": 1.0}, "dd1 2-step": {**ROW, **acc, "steps": 2}}}
    folder = tmp_path / "reports" / "t2i" / "run"
    (folder / "metrics").mkdir(parents=True)
    (folder / "metrics" / "evaluate.json").write_text(json.dumps(run))
    table = [line for line in report.t2i(metrics) if line.startswith("|")]
    assert table[0].startswith("| method | steps | fid_fmnist | class | size | position | brightness | ms / image |")
    assert table[2] == "| teacher | 64 | 12.5 | 61% | 90% | 87% | 99% | 3.0 | 1.0× | LlamaGen T2I, 256 steps: 25.70 |"
    assert table[3].endswith("| DD1 2-step: 28.95, 92.9× |")
    # the workspace's own t2i rows win, and the main table leaves them to this one
    (metrics / "evaluate.json").write_text(json.dumps({**run, "t2i": {"teacher": {**ROW, **acc, "fid_fmnist": 9.0}}}))
    assert "| teacher | 1 | 9.0 |" in "\n".join(report.t2i(metrics))
    assert not any("T2I" in line for line in report.results(metrics))
