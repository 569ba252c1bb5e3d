"""Running one pipeline stage: validate params.yaml, execute the stage's notebook with papermill, export HTML.

    python -m dd.stage prepare
    python -m dd.stage train_teacher --family llamagen

The whole params file is validated first (no kernel, no torch), so a bad value stops `dvc repro` in well under
a second with one line naming the key. The stage's notebook `notebooks/NN_<stage>.ipynb` then runs with its
section and `base` injected as papermill parameters (Python values, so YAML booleans stay booleans), from the
repository root; the executed notebook and its HTML land in `reports/` as the stage's report.

References:
    nteract/papermill (execute_notebook), jupyter/nbconvert (HTMLExporter).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import params as P


def notebook_for(root: Path, stage: str) -> Path:
    found = sorted((root / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected exactly one notebooks/NN_{stage}.ipynb, found {[p.name for p in found]}")
    return found[0]


def declared_sections(root: Path, stage: str, family: str | None = None) -> list[tuple[str, str | None]]:
    """The params sections a stage declares in dvc.yaml: [(section, family or None)] (dvc.yaml is the truth)."""
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {})
    if stage not in stages:
        raise ValueError(f"dvc.yaml has no stage {stage!r}; stages: {', '.join(stages)}")
    spec = stages[stage]
    if "foreach" in spec:
        if family not in spec["foreach"]:
            raise ValueError(f"stage {stage} runs per family; pass --family, one of: {', '.join(spec['foreach'])}")
        spec = spec["do"]
    out = []
    for entry in spec.get("params", []):
        name = entry.replace("${item}", family or "") if isinstance(entry, str) else None
        if name is None:
            continue
        section, _, fam = name.partition(".")
        out.append((section, fam or None))
    return out


def stage_parameters(cfg: dict, sections: list[tuple[str, str | None]], family: str | None = None) -> dict:
    """Papermill parameters of a stage: the keys of every declared section (and `family`)."""
    out = {}
    for section, fam in sections:
        values = cfg[section][fam] if fam else cfg[section]
        out.update(P.as_dict(values))
    if family is not None:
        out["family"] = family
    return out


def run(stage: str, family: str | None = None, root: Path | None = None) -> Path:
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    from . import io

    root = Path(root or io.root())
    cfg = P.load(root / "params.yaml")
    src = notebook_for(root, stage)
    name = src.stem + (f"_{family}" if family else "")
    out = root / "reports" / f"{name}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    env_root = os.environ.get("DD_ROOT")
    os.environ["DD_ROOT"] = str(root)  # the kernel inherits it: paths resolve against this root
    os.environ[io.PROGRESS_ENV] = "terminal"  # progress bars on the terminal, not in the report (io.progress)
    # deterministic cuBLAS (train.deterministic) needs this before the kernel's first cuBLAS call
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        with io.atomic_path(out) as tmp:
            papermill.execute_notebook(str(src), str(tmp), parameters=stage_parameters(cfg, declared_sections(root, stage, family), family),
                                       cwd=str(root), kernel_name="python3", progress_bar=False,
                                       log_output=True, report_mode=False, language="python")
    finally:
        if env_root is None:
            os.environ.pop("DD_ROOT", None)
        else:
            os.environ["DD_ROOT"] = env_root
    html, _ = HTMLExporter().from_notebook_node(nbformat.read(out, as_version=4))
    with io.atomic_path(out.with_suffix(".html")) as tmp:
        tmp.write_text(html)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dd.stage", description=__doc__.splitlines()[0])
    ap.add_argument("stage")
    ap.add_argument("--family", default=None, help="teacher family of a per-family stage (llamagen | var)")
    args = ap.parse_args(argv)
    from . import io

    try:
        P.load(io.root() / "params.yaml")  # fail fast, before papermill or torch start
    except (P.ParamsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(args.stage, args.family)
    except Exception as e:  # papermill's error already printed the cell; end with one clear line
        print(f"error: stage {args.stage} failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:500] if str(e).strip() else ''}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
