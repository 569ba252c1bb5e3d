"""dd.stage without a kernel: the report's shape, the --all order, --from, --record and the stop at the first
failure."""
import json
from types import SimpleNamespace

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from dd import stage

FAMILIES = SimpleNamespace(families=["llamagen", "var"])
DVC = """
stages:
  prepare:
    cmd: python -m dd.stage prepare
  train:
    foreach: [llamagen, var]
    do:
      cmd: python -m dd.stage train --family ${item}
  evaluate:
    cmd: python -m dd.stage evaluate
"""


def _cell(kind, source, *tags):
    cell = (new_markdown_cell if kind == "md" else new_code_cell)(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def _notebook():
    return new_notebook(cells=[
        _cell("md", "# title"), _cell("code", "import dd"), _cell("code", "n = 1", "parameters"),
        _cell("code", "n = 2", "injected-parameters"), _cell("code", "x = n"), _cell("code", "assert x"),
        _cell("md", "## Result", "result"), _cell("code", "x", "result")])


def test_report_opens_on_its_result_and_shows_parameters_once():
    nb = _notebook()
    report = stage.shape_report(nb)
    assert [c.source for c in report.cells] == ["# title", "## Result", "x", "import dd", "n = 2", "x = n", "assert x"]
    assert len(nb.cells) == 8  # the executed notebook itself is left as it was
    nbformat.validate(report)


def test_report_without_a_markdown_title_starts_with_the_result():
    nb = new_notebook(cells=[_cell("code", "a"), _cell("code", "b", "result")])
    assert [c.source for c in stage.shape_report(nb).cells] == ["b", "a"]


@pytest.fixture
def root(tmp_path):
    (tmp_path / "dvc.yaml").write_text(DVC)
    return tmp_path


def test_pipeline_follows_dvc_yaml_with_every_family(root):
    assert stage.pipeline(root) == [("prepare", None), ("train", "llamagen"), ("train", "var"), ("evaluate", None)]


def test_per_family_stages_follow_the_families_in_params(root):
    (root / "dvc.yaml").write_text(DVC.replace("[llamagen, var]", '"${pipeline.families}"'))
    assert stage.pipeline(root, ["var"]) == [("prepare", None), ("train", "var"), ("evaluate", None)]
    assert stage.declared_sections(root, "train", "llamagen") == []  # any family's keys can be asked for
    with pytest.raises(ValueError, match="one of: llamagen, var"):
        stage.declared_sections(root, "train")


def test_from_skips_the_stages_before(root):
    order = stage.pipeline(root)
    assert stage.starting_at(order, "train@var") == order[2:]
    assert stage.starting_at(order, "train") == order[1:]
    assert stage.starting_at(order, None) == order
    with pytest.raises(ValueError, match="no such stage"):
        stage.starting_at(order, "trian")


def test_run_all_stops_at_the_first_failure_and_says_how_to_resume(root, monkeypatch, capsys):
    monkeypatch.setattr(stage, "config", lambda root, profiles=(): {"pipeline": FAMILIES})
    ran = []

    def runner(name, family, root, cfg):
        ran.append(stage.label(name, family))
        if (name, family) == ("train", "var"):
            raise RuntimeError("cell 5 failed\nValueError: boom")

    assert stage.run_all(root, runner=runner) == 1
    assert ran == ["prepare", "train@llamagen", "train@var"]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("error: stage train@var failed: RuntimeError: ValueError: boom; "
                    "resume with: python -m dd.stage --all --from train@var")
    ran.clear()
    assert stage.run_all(root, first="train@var", runner=lambda *a: ran.append(stage.label(*a[:2]))) == 0
    assert ran == ["train@var", "evaluate"]


def test_run_all_records_each_finished_stage(root, monkeypatch, tmp_path):
    monkeypatch.setattr(stage, "config", lambda root, profiles=(): {"pipeline": FAMILIES,
                                                                   "base": SimpleNamespace(device="cpu")})
    figures = {"prepare": 30.0, "train@llamagen": 60.0, "train@var": 90.0}

    def runner(name, family, root, cfg):
        if name == "evaluate":
            raise RuntimeError("boom")
        return {"seconds": figures[stage.label(name, family)], "peak_mb": 100}

    out = tmp_path / "times.json"
    assert stage.run_all(root, runner=runner, record=out) == 1
    got = json.loads(out.read_text())
    assert [r["stage"] for r in got["stages"]] == list(figures)  # the failed stage is not recorded
    assert got["minutes"] == 3.0 and got["stages"][0] == {"stage": "prepare", "seconds": 30.0, "peak_mb": 100}
    assert got["device"]


def test_main_rejects_a_stage_together_with_all(capsys):
    with pytest.raises(SystemExit):
        stage.main(["prepare", "--all"])
    with pytest.raises(SystemExit):
        stage.main(["prepare", "--from", "train"])
    with pytest.raises(SystemExit):
        stage.main(["prepare", "--record", "times.json"])


def test_the_repository_pipeline_runs_every_notebook_once_in_order():
    from dd import io

    order = stage.pipeline(io.root())
    assert order[0] == ("prepare", None) and order[-1] == ("evaluate", None)
    numbers = [stage.notebook_for(io.root(), name).name[:2] for name, _ in order]
    assert numbers == sorted(numbers)  # the notebooks' reading order is the run order
    assert len(set(stage.notebook_for(io.root(), name) for name, _ in order)) == 9
