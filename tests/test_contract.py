"""The pipeline's contract: dvc.yaml ↔ params.yaml ↔ notebook parameters ↔ dd modules, and clean notebooks."""
import ast
import json
import re
from pathlib import Path

import papermill
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC["stages"]
PATH_PARAMS = re.compile(r".*_(dir|path)$")


def _instances(name, stage):
    """(instance name, family or None, concrete stage dict) — expands `foreach` over families."""
    if "foreach" not in stage:
        return [(name, None, stage)]
    out = []
    for fam in stage["foreach"]:
        text = json.dumps(stage["do"]).replace("${item}", fam)
        out.append((f"{name}@{fam}", fam, json.loads(text)))
    return out


CASES = [c for n, s in STAGES.items() for c in _instances(n, s)]


def _notebook(name):
    found = sorted((ROOT / "notebooks").glob(f"[0-9][0-9]_{name.split('@')[0]}.ipynb"))
    assert len(found) == 1, f"stage {name}: expected one notebooks/NN_{name}.ipynb, found {found}"
    return found[0]


def _outs(stage):
    return [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]


@pytest.mark.parametrize("name, family, stage", CASES, ids=[c[0] for c in CASES])
def test_stage_runs_its_notebook_with_declared_params(name, family, stage):
    base = name.split("@")[0]
    nb = _notebook(name)
    rel = nb.relative_to(ROOT).as_posix()
    assert stage["cmd"] == f"python -m dd.stage {base}" + (f" --family {family}" if family else "")
    assert rel in stage["deps"], f"{name}: notebook not in deps"
    declared = [p.replace("${item}", family or "") for p in stage.get("params", [])]
    own = f"{base}.{family}" if family else base
    assert "base" in declared and (base not in PARAMS or own in declared)
    nb_params = papermill.inspect_notebook(str(nb))
    expected = {}
    for section, _, fam in (d.partition(".") for d in declared):
        values = PARAMS[section][fam] if fam else PARAMS[section]
        clash = set(values) & set(expected)
        assert not clash, f"{name}: declared sections share keys {clash}"
        expected.update(values)
    if family:
        expected["family"] = family
    # A per-family notebook's defaults are those of its default family; other families' own keys keep theirs.
    nb_family = ast.literal_eval(nb_params["family"]["default"]) if "family" in nb_params else None
    default_family_keys = set()
    if family and family != nb_family:
        for section, _, fam in (d.partition(".") for d in stage.get("params", [])):
            if fam:
                default_family_keys |= set(PARAMS[section][nb_family])
    for key, value in expected.items():
        assert key in nb_params, f"{rel}: parameter {key} missing from the parameters cell"
        default = ast.literal_eval(nb_params[key]["default"])
        if key != "family" and key not in default_family_keys:
            assert default == value, f"{rel}: {key} defaults to {default!r}, params.yaml says {value!r}"
    every_family = set(expected)
    for section, _, fam in (d.partition(".") for d in stage.get("params", [])):
        if fam:
            every_family |= {k for values in PARAMS[section].values() for k in values}
    for key in set(nb_params) - every_family:
        assert PATH_PARAMS.match(key), f"{rel}: parameter {key} is neither in params.yaml nor a *_dir/*_path"


@pytest.mark.parametrize("name, family, stage", CASES, ids=[c[0] for c in CASES])
def test_stage_deps_cover_imported_modules_and_outputs_follow_the_name(name, family, stage):
    base = name.split("@")[0]
    nb = _notebook(name)
    cells = json.loads(nb.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for line in re.findall(r"^from dd import (.+)$", code, flags=re.M):
        for mod in (m.strip() for m in line.split(",")):
            assert f"dd/{mod}.py" in stage["deps"], f"{name}: imports dd.{mod} but dd/{mod}.py is not a dep"
    suffix = f"_{family}" if family else ""
    outs = _outs(stage)
    assert f"reports/{nb.stem}{suffix}.ipynb" in outs and f"reports/{nb.stem}{suffix}.html" in outs
    assert any(o.startswith(f"data/{base}") for o in outs)
    metrics = [next(iter(m)) for m in stage.get("metrics", [])]
    assert f"reports/metrics/{base}{suffix}.json" in metrics


@pytest.mark.parametrize("nb", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_source_notebooks_are_clean_and_thin(nb):
    cells = json.loads(nb.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), f"{nb.name} has outputs"
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in code) == 1
    src = "\n".join("".join(c["source"]) for c in code)
    assert not re.search(r"^\s*(def|class) ", src, flags=re.M), f"{nb.name} defines functions: they belong in dd/"
    assert "os.chdir" not in src and not re.search(r"^\s*!", src, flags=re.M)
    assert len(code) <= 20
    assert cells[0]["cell_type"] == "markdown" and cells[0]["source"][0].startswith("# ")


def test_every_params_section_is_declared_by_a_stage():
    declared = {p.split(".")[0] for _, _, st in CASES for p in st.get("params", [])}
    assert set(PARAMS) <= declared


def test_readme_results_are_generated_from_metrics():
    from dd import report

    readme = (ROOT / "README.md").read_text()
    assert report.render(readme, ROOT / "reports/metrics") == readme, "README results are stale: python -m dd.report"
