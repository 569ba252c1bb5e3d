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


def declared_sections(root: Path, stage: str, family: str | None = None) -> list[str]:
    """The params.yaml entries a stage's notebook receives, as dvc.yaml declares them (dvc.yaml is the truth):
    its `params` (what DVC tracks) and its `meta.untracked` (what DVC does not), `${item}` replaced by `family`.

    An entry is a section (`base`), one family's part of a per-family section (`train_dd1.var`) or a single key
    (`runtime.precision`, `evaluate.var.skip_n`).
    """
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {})
    if stage not in stages:
        raise ValueError(f"dvc.yaml has no stage {stage!r}; stages: {', '.join(stages)}")
    spec = stages[stage]
    if "foreach" in spec:
        if family not in spec["foreach"]:
            raise ValueError(f"stage {stage} runs per family; pass --family, one of: {', '.join(spec['foreach'])}")
        spec = spec["do"]
    entries = [*spec.get("params", []), *(spec.get("meta") or {}).get("untracked", [])]
    return [e.replace("${item}", family or "") for e in entries if isinstance(e, str)]


def stage_parameters(cfg: dict, sections: list[str], family: str | None = None) -> dict:
    """Papermill parameters of a stage: the variables of every declared entry (`declared_sections`) and `family`.

    cfg is `params.load`'s result. Two entries naming the same variable must agree (keys of different families'
    subsections merge into one {family: value}).
    """
    out = {}
    for entry in sections:
        for key, value in P.entry_parameters(cfg, entry).items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                value = {**out[key], **value}
            elif key in out and out[key] != value:
                raise ValueError(f"dvc.yaml: params {entry!r} passes {key} = {value!r}, another entry {out[key]!r}")
            out[key] = value
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
    try:
        P.load(P.repository_params())  # fail fast, before papermill or torch start (dd.io imports torch)
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
