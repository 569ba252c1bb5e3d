"""Running pipeline stages: validate params.yaml, execute a stage's notebook with papermill, shape the report.

    python -m dd.stage prepare
    python -m dd.stage train_teacher --family llamagen
    python -m dd.stage --all [--from train_dd1@var] [--profile profiles/gpu.yaml] [--record times.json]

The whole params file is validated first (no kernel, no torch), and the files it names are checked
(`dd.preflight`), so a bad value or a missing, truncated or wrong checkpoint stops `dvc repro` in about a second
with one line naming the key. The stage's notebook `notebooks/NN_<stage>.ipynb` then runs from the repository
root with the params keys its dvc.yaml entry names injected as papermill parameters (Python values, so YAML
booleans stay booleans). The executed notebook is reshaped into the stage's report (`reports/`, .ipynb and .html): the
cells tagged `result` (computed last, from this run's values) move up under the title, and the source
`parameters` cell goes, so the values appear once, in papermill's injected cell.

`--all` is for a machine without DVC: every stage, and every family instance of a per-family stage, in
`dvc.yaml`'s order, each in a process of its own, stopping at the first failure (`--record`: each stage's wall
time and peak memory to a JSON file). Re-running resumes: training stages continue from the checkpoints in their
data folders, and `--from STAGE[@FAMILY]` skips the stages that finished before.

References:
    nteract/papermill (execute_notebook), jupyter/nbconvert (HTMLExporter), DVC's `stage@item` names of
    foreach stages.
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
        if family not in _items(spec, P.FAMILIES):
            raise ValueError(f"stage {stage} runs per family; pass --family, one of: "
                             f"{', '.join(_items(spec, P.FAMILIES))}")
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


def shape_report(nb):
    """The executed notebook as a report: `result` cells under the title, the source `parameters` cell dropped.

    The result cells run last (they read this run's values) but are what a reader wants first; papermill's
    `injected-parameters` cell, which holds this run's values, stays where it was. The title is the first cell
    when it is markdown. Returns a new notebook; `nb` is left as it was."""
    import copy

    def tagged(cell, tag):
        return tag in cell.get("metadata", {}).get("tags", [])

    nb = copy.deepcopy(nb)
    cells = [c for c in nb.cells if not tagged(c, "parameters")]
    result = [c for c in cells if tagged(c, "result")]
    rest = [c for c in cells if not tagged(c, "result")]
    head = 1 if rest and rest[0].cell_type == "markdown" else 0
    nb.cells = rest[:head] + result + rest[head:]
    return nb


def config(root: Path, profiles=()) -> dict:
    """params.yaml with each profile (a partial params file, e.g. profiles/gpu.yaml) laid over it, validated, and
    the files and sizes it names checked (`dd.preflight`)."""
    from . import preflight, profile

    raw = P.read_yaml(root / "params.yaml")
    for f in profiles:
        raw = profile.merged(raw, P.read_yaml(f))
    cfg = P.validate(raw)
    preflight.check(cfg, root)
    return cfg


def run(stage: str, family: str | None = None, root: Path | None = None, cfg: dict | None = None) -> Path:
    """Execute one stage's notebook; write its report reports/NN_<stage>[_<family>].{ipynb,html}. cfg: the
    validated params (default: params.yaml)."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    from . import io

    root = Path(root or io.root())
    cfg = cfg if cfg is not None else P.load(root / "params.yaml")
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
                                       log_output=True, report_mode=False, language="python",
                                       # ipykernel copies whatever reaches the kernel's file descriptors 1 and 2
                                       # into the notebook; without this the bars io.progress sends to the
                                       # terminal (and launch.call's relayed ones) land in the report as well
                                       extra_arguments=["--IPKernelApp.capture_fd_output=False"])
            report = shape_report(nbformat.read(tmp, as_version=4))
            nbformat.write(report, tmp)
    finally:
        if env_root is None:
            os.environ.pop("DD_ROOT", None)
        else:
            os.environ["DD_ROOT"] = env_root
    html, _ = HTMLExporter().from_notebook_node(report)
    with io.atomic_path(out.with_suffix(".html")) as tmp:
        tmp.write_text(html)
    return out


FAMILIES_VAR = "${pipeline.families}"  # dvc.yaml's foreach of the per-family stages: params.yaml's families


def _items(spec: dict, families=P.DEFAULT_FAMILIES) -> list:
    """The items of a dvc.yaml stage: a foreach list, params.yaml's `families` for `${pipeline.families}`, else
    [None] (a stage that runs once)."""
    if "foreach" not in spec:
        return [None]
    return list(families) if spec["foreach"] == FAMILIES_VAR else list(spec["foreach"])


def pipeline(root: Path, families=P.DEFAULT_FAMILIES) -> list[tuple[str, str | None]]:
    """Every stage instance of dvc.yaml in its order: [(stage, family or None)], a foreach stage once per item
    (`families`: pipeline.families of the params in use)."""
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {})
    return [(name, item) for name, spec in stages.items() for item in _items(spec, families)]


def label(stage: str, family: str | None) -> str:
    """DVC's name of a stage instance: `prepare`, `train_dd1@var`."""
    return stage if family is None else f"{stage}@{family}"


def starting_at(order: list[tuple[str, str | None]], first: str | None) -> list[tuple[str, str | None]]:
    """`order` from the instance named `first` on (`train_dd1@var`; a bare `train_dd1` starts at its first family)."""
    if first is None:
        return order
    for i, (stage, family) in enumerate(order):
        if first in (label(stage, family), stage):
            return order[i:]
    raise ValueError(f"--from {first}: no such stage in dvc.yaml; stages: {', '.join(label(*s) for s in order)}")


def _failure(what: str, e: Exception) -> str:
    msg = str(e).strip()
    return f"error: stage {what} failed: {type(e).__name__}: {msg.splitlines()[-1][:500] if msg else ''}"


class StageFailed(RuntimeError):
    """A stage run by `run_child` failed; it has printed its error."""


def run_child(stage: str, family: str | None, root: Path, profiles=()) -> dict:
    """One stage instance in a process of its own (`python -m dd.stage`), so that its figures are its own:
    → {"seconds", "peak_mb"}, the peak resident memory over the stage's processes (papermill's kernel, torchrun's
    workers: Linux folds a reaped child's peak into its parent's). Raises when the stage fails; it has printed why."""
    import subprocess
    import time

    cmd = [sys.executable, "-m", "dd.stage", stage, *(["--family", family] if family else []),
           *(a for f in profiles for a in ("--profile", str(f)))]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "DD_ROOT": str(root)})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if proc.returncode != 0:
        raise StageFailed(f"exit status {proc.returncode}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_mb": round(usage.ru_maxrss / 1024)}


def run_all(root: Path, first: str | None = None, profiles=(), runner=None, record: Path | None = None) -> int:
    """Every stage instance in dvc.yaml's order from `first` on; stop at the first failure with one line that
    says how to resume. runner(stage, family, root, cfg) executes one (default: `run_child`). record: a JSON file
    that gets each finished stage's wall time and peak memory, and the device. → exit status."""
    runner = runner or (lambda stage, family, root, cfg: run_child(stage, family, root, profiles))
    cfg = config(root, profiles)
    todo = starting_at(pipeline(root, cfg["pipeline"].families), first)
    rows = []
    for n, (stage, family) in enumerate(todo, 1):
        print(f"[{n}/{len(todo)}] {label(stage, family)}", file=sys.stderr, flush=True)
        try:
            figures = runner(stage, family, root, cfg)
        except Exception as e:  # papermill's error already printed the cell; end with one clear line
            again = " ".join(["python -m dd.stage --all --from", label(stage, family),
                              *(f"--profile {f}" for f in profiles)])
            said = f"error: stage {label(stage, family)} failed" if isinstance(e, StageFailed) else \
                _failure(label(stage, family), e)
            print(f"{said}; resume with: {again}", file=sys.stderr)
            return 1
        rows.append({"stage": label(stage, family), **(figures or {})})
        if record:
            _record(Path(record), rows, cfg)
    return 0


def _record(path: Path, rows: list[dict], cfg: dict) -> None:
    from . import bench, io

    io.write_json(path, {"device": bench.device_name(io.resolve_device(cfg["base"].device)),
                         "minutes": round(sum(r.get("seconds", 0) for r in rows) / 60, 2), "stages": rows})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dd.stage", description=__doc__.splitlines()[0])
    ap.add_argument("stage", nargs="?", help="the dvc.yaml stage to run (or --all)")
    ap.add_argument("--family", default=None, help="teacher family of a per-family stage (llamagen | var)")
    ap.add_argument("--all", action="store_true", help="every stage in dvc.yaml's order (no DVC needed)")
    ap.add_argument("--from", dest="first", default=None, metavar="STAGE[@FAMILY]",
                    help="with --all: start at this stage, skipping those before it")
    ap.add_argument("--profile", action="append", default=[], metavar="YAML",
                    help="a partial params file laid over params.yaml (e.g. profiles/gpu.yaml); repeatable")
    ap.add_argument("--record", default=None, metavar="JSON",
                    help="with --all: write each stage's wall time and peak memory to this file")
    args = ap.parse_args(argv)
    if args.all == (args.stage is not None) or ((args.first or args.record) and not args.all):
        ap.error("give one stage, or --all [--from STAGE[@FAMILY]] [--record JSON]")
    try:
        root = P.repository_params().parent  # (not dd.io.root: dd.io imports torch, validation must not wait)
        cfg = config(root, args.profile)  # fail fast, before papermill or torch start
        if args.all:
            starting_at(pipeline(root, cfg["pipeline"].families), args.first)
    except (P.ParamsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.all:
        return run_all(root, args.first, args.profile, record=args.record)
    try:
        run(args.stage, args.family, root, cfg)
    except Exception as e:  # papermill's error already printed the cell; end with one clear line
        print(_failure(args.stage, e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
