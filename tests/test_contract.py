"""The pipeline's contract: dvc.yaml ↔ params.yaml ↔ notebook parameters ↔ dd modules, and clean notebooks."""
import ast
import json
import re
from pathlib import Path

import papermill
import pytest
import yaml

from dd import params as P
from dd import stage as S

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
CFG = P.load(ROOT / "params.yaml")
STAGES = DVC["stages"]
PATH_PARAMS = re.compile(r".*_(dir|path)$")
EXECUTION = {"runtime.nproc", "runtime.torch_compile"}  # how a stage runs, not what it computes: never tracked


def _instances(name, stage):
    """(instance name, family or None, concrete stage dict) — expands `foreach` over every family (the opt-in ones
    too: the contract holds whichever families params.yaml runs)."""
    if "foreach" not in stage:
        return [(name, None, stage)]
    out = []
    for fam in S._items(stage, P.FAMILIES):
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


def _injected(base, family):
    """What `python -m dd.stage` passes to the stage's notebook."""
    return S.stage_parameters(CFG, S.declared_sections(ROOT, base, family), family)


def _leaves(entry):
    """params.yaml's leaf keys under a dotted entry."""
    node = PARAMS
    for part in entry.split("."):
        node = node[part]
    if not isinstance(node, dict):
        return {entry}
    return {leaf for key in node for leaf in _leaves(f"{entry}.{key}")}


@pytest.mark.parametrize("name, family, stage", CASES, ids=[c[0] for c in CASES])
def test_notebook_receives_exactly_its_parameters(name, family, stage):
    """The parameters cell holds exactly what dd.stage injects (plus paths and, in a per-family notebook, the other
    families' own keys), with params.yaml's values of its default family as defaults."""
    base = name.split("@")[0]
    nb = _notebook(name)
    rel = nb.relative_to(ROOT).as_posix()
    assert stage["cmd"] == f"python -m dd.stage {base}" + (f" --family {family}" if family else "")
    cell = {k: ast.literal_eval(v["default"]) for k, v in papermill.inspect_notebook(str(nb)).items()}
    got = _injected(base, family)
    assert not set(got) - set(cell), f"{rel}: parameters cell lacks {sorted(set(got) - set(cell))}"
    others = {k for fam in P.FAMILIES if family and fam != family for k in _injected(base, fam)}
    extra = set(cell) - set(got) - others
    assert all(PATH_PARAMS.match(k) for k in extra), f"{rel}: {sorted(extra)} are neither passed nor *_dir/*_path"
    default = _injected(base, cell["family"]) if family else got
    for key, value in default.items():
        assert cell[key] == value, f"{rel}: {key} defaults to {cell[key]!r}, params.yaml says {value!r}"


@pytest.mark.parametrize("name, family, stage", CASES, ids=[c[0] for c in CASES])
def test_stage_params_are_tracked_or_execution_settings(name, family, stage):
    base = name.split("@")[0]
    tracked = stage.get("params", [])
    untracked = (stage.get("meta") or {}).get("untracked", [])
    assert set(stage.get("meta") or {}) <= {"untracked"}, f"{name}: meta holds only `untracked`"
    assert "base" in tracked or "base.seed" in tracked
    own = f"{base}.{family}" if family else base
    assert base not in PARAMS or own in tracked, f"{name}: its own section {own} is not tracked"
    tracked_leaves = {k for e in tracked for k in _leaves(e)}
    untracked_leaves = {k for e in untracked for k in _leaves(e)}
    assert not tracked_leaves & untracked_leaves, f"{name}: both tracked and untracked"
    assert not tracked_leaves & EXECUTION, f"{name}: tracks an execution setting (see dvc.yaml's header)"
    assert all(k.startswith("runtime.") for k in untracked_leaves), f"{name}: only runtime keys may be untracked"


def test_every_params_key_reaches_a_stage():
    declared = {leaf for name, family, _ in CASES for entry in S.declared_sections(ROOT, name.split("@")[0], family)
                for leaf in _leaves(entry)}
    every = {leaf for section in PARAMS for leaf in _leaves(section)}
    assert not every - declared, f"keys no stage reads: {sorted(every - declared)}"


def _module_imports(module):
    """The dd modules a dd module imports at its top level."""
    out = set()
    for node in ast.parse((ROOT / f"dd/{module}.py").read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def _closure(modules):
    seen, todo = set(), list(modules)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += _module_imports(m)
    return seen


@pytest.mark.parametrize("name, family, stage", CASES, ids=[c[0] for c in CASES])
def test_stage_deps_are_the_modules_it_runs_and_outputs_follow_the_name(name, family, stage):
    base = name.split("@")[0]
    nb = _notebook(name)
    assert nb.relative_to(ROOT).as_posix() in stage["deps"], f"{name}: notebook not in deps"
    cells = json.loads(nb.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    imported = {m.strip() for line in re.findall(r"^from dd import (.+)$", code, flags=re.M) for m in line.split(",")}
    want = {f"dd/{m}.py" for m in _closure(imported | {"stage", "params"})}  # dd.stage runs every stage
    have = {d for d in stage["deps"] if d.startswith("dd/")}
    assert have == want, f"{name}: dd deps lack {sorted(want - have)}, list {sorted(have - want)} it does not import"
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


def test_readme_results_are_generated_from_metrics():
    from dd import report

    readme = (ROOT / "README.md").read_text()
    assert report.render(readme, ROOT / "reports/metrics") == readme, "README results are stale: python -m dd.report"
