"""What each stage of the papers' runs costs at the released teachers' true size (GPT-B + VQ-16, VAR-d16 + its
VQVAE), with random weights, on one device; and the hours per stage of `profiles/paper-<family>.yaml` projected
from it.

    python -m dd.scale --device cuda                   # -> reports/benchmarks/release_scale.json
    python -m dd.scale --thin --scale 32 --out x.json  # the same code on release.THIN's thin models (a CPU check)

Per family, with the profile's settings, after one warm-up call: teacher sampling (tokens, the profile's guidance
and truncation) and pair building (`trajectories.build_shard`, the profile's flow steps) in fp32 as the pipeline
does them, decoding to 256 px; then a step of each training (`train.fit` on DD1's loss and on DD2's GTS loss,
`dd2.distill` at K = 1 and K = k_guide) under runtime.precision at one device's share of the global batch
(batch / runtime.nproc). Figures: seconds per call or step (median), items per second, peak device memory.

References: DD1 (arXiv 2412.17153) and its release (t_list, split, batch); DD2 (arXiv 2510.21003) Tab. 3 and 8
(8-GPU hours) and Tab. 10-11 (GTS and CSD iterations, batch, K).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import ardiff, bench, dd1, dd2, io, llamagen, params as P, release, teachers, train, trajectories, var, \
    var_tokenizer


def models(family: str, thin: bool):
    """(tokenizer, teacher) of `family` at the release's size (or `release.THIN`'s), random weights, eval mode."""
    torch.manual_seed(0)
    if thin:
        tok = llamagen.VQModel(**release.THIN["vq"]) if family == "llamagen" else \
            var_tokenizer.VQVAE(**release.THIN["vae"])
        net = llamagen.GPT(**release.THIN["gpt"]) if family == "llamagen" else var.VAR(**release.THIN["var"])
    else:
        names = {"llamagen": ("vq16", "gpt-b"), "var": ("vae", "var-d16")}[family]
        tok, net = (release.build(name)[0] for name in names)
    return tok.eval(), net.eval()


def settings(profile: str | Path) -> dict:
    """params.yaml with the profile laid over it, validated (the files it names need not exist here)."""
    from . import profile as prof

    return P.validate(prof.merged(P.read_yaml(P.repository_params()), P.read_yaml(profile)))


class _Clock:
    """Times between calls (device synchronised): the training loops' on_step hooks."""

    def __init__(self, device):
        self.device, self.marks = torch.device(device), []

    def __call__(self, *_):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())

    def per_step(self) -> float:
        """Median seconds per step, the first step (warm-up) left out."""
        gaps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return statistics.median(gaps[1:] if len(gaps) > 1 else gaps)


def _timed(fn, device) -> float:
    return bench.time_call(fn, device, warmup=1, repeats=2)["median_s"]


def _peak_reset(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> int | None:
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20) if torch.device(device).type == "cuda" else None


def measure(family: str, cfg: dict, device="cpu", batch: int = 128, steps: int = 3, thin: bool = False,
            scale: int = 1) -> dict:
    """Unit costs of `family` at its release size on `device` with the settings of `cfg` (a profile's validated
    params; see the module's docstring). Training steps run at each global batch / runtime.nproc (one GPU's share
    of a data-parallel step); `scale` divides every batch (a quick check on CPU). → figures."""
    device, nproc = torch.device(device), cfg["runtime"].nproc
    precision = cfg["runtime"].precision
    fam = teachers.family(family)
    tok, teacher = (m.to(device) for m in models(family, thin))
    sampling = cfg["sample_teacher"][family]
    d1, d2, bt = cfg["train_dd1"][family], cfg["train_dd2"][family], cfg["build_trajectories"][family]
    batch = max(1, batch // scale)
    ends = trajectories.step_ends(teacher)
    codebook = fam.codebook(tok).to(device).float()
    labels = torch.arange(batch, device=device) % 1000
    out = {"family": family, "tokens": ends[-1], "codebook": list(codebook.shape), "nproc": nproc,
           "precision": precision, "teacher_params": sum(p.numel() for p in teacher.parameters())}
    rows = {}

    def row(what, seconds, items, unit, **more):
        rows[what] = {"seconds": round(seconds, 4), "per_s": round(items / seconds, 2), "unit": unit,
                      "peak_mb": _peak_mb(device), **more}

    with torch.no_grad():  # as the pipeline does: sampling, pairs and decoding in fp32, training under `precision`
        _peak_reset(device)
        s = _timed(lambda: fam.sample(tok, teacher, labels, sampling, batch_size=batch, device=device), device)
        row("teacher sampling", s, batch, "images (tokens)", batch=batch)
        _peak_reset(device)
        shard = {}
        s = _timed(lambda: shard.update(trajectories.build_shard(fam, tok, teacher, sampling, 0, batch, 1000, 0,
                                                                 bt.flow_steps, batch, device)), device)
        row("pair building", s, batch, "pairs", batch=batch, flow_steps=bt.flow_steps)
        _peak_reset(device)
        s = _timed(lambda: fam.decode(tok, shard["tokens"], batch_size=batch, device=device), device)
        row("decode to 256 px", s, batch, "images", batch=batch)

    def fit(model, loss, n):  # seconds per step at n rows
        data = {k: v.repeat_interleave(-(-2 * n // len(v)), 0)[:2 * n] for k, v in shard.items()}
        clock = _Clock(device)
        train.fit(model, loss, data, train.FitConfig(n_steps=steps + 1, batch_size=n, lr=1e-4, ema_decay=0.9999,
                                                     ckpt_every=10 ** 9, log_every=10 ** 9, precision=precision),
                  Path(tmp) / "fit.pt", device, desc=f"{family} step", on_step=clock)
        (Path(tmp) / "fit.pt").unlink(missing_ok=True)
        return clock.per_step()

    with tempfile.TemporaryDirectory() as tmp:
        n = max(1, d1.batch_size // nproc // scale)
        _peak_reset(device)
        s = fit(dd1.DD1Model.from_teacher(teacher, codebook.shape[1]),
                dd1.loss_fn(codebook, ends, t_set=d1.t_train, split=d1.split, cont_loss=d1.cont_loss), n)
        row("DD1 training step", s, n, "sequences", batch=n, t_train=d1.t_train, split=d1.split)

        phi = ardiff.ContinuousGPT.from_teacher(teacher, codebook.shape[1]).eval().requires_grad_(False) \
            if family == "llamagen" else teacher.requires_grad_(False)
        gen = ardiff.ARDiffusion.from_teacher(phi, d2.head_width, d2.head_depth)
        n = max(1, d2.gts_batch // nproc // scale)
        _peak_reset(device)
        s = fit(copy.deepcopy(gen), ardiff.gts_loss(phi, tok, codebook, sampling, d2.n_noise), n)
        row("GTS step", s, n, "sequences", batch=n)

        n = max(1, d2.batch_size // nproc // scale)
        for k in sorted({1, d2.k_guide}):
            _peak_reset(device)
            dcfg = dd2.DistillConfig.from_section(d2, seed=0, precision=precision, n_steps=steps + 1, batch_size=n,
                                                  k_guide=k, align_steps=0, warmup_steps=1, ckpt_every=10 ** 9,
                                                  log_every=10 ** 9)
            clock = _Clock(device)
            dd2.distill(copy.deepcopy(gen), copy.deepcopy(gen), phi, tok, codebook, sampling, 1000, dcfg,
                        Path(tmp) / f"dd2_{k}.pt", device, desc=f"{family} DD2 step", on_step=clock)
            row(f"DD2 generator step, K = {k}", clock.per_step(), n, "sequences", batch=n, k_guide=k)
    out["rows"] = rows
    out["projected"] = project(family, cfg, rows)
    return out


def project(family: str, cfg: dict, rows: dict) -> dict:
    """Hours per stage of the profile's run on `runtime.nproc` devices of the kind measured, from the unit costs in
    `rows`: training data-parallel and ideal, a step costing one device's share of the global batch (scaled linearly
    from the batch measured); pairs split over the processes; sampling in one process, as the stages do it
    (sample_teacher, DD2's GTS samples, evaluate's teacher-like methods). A stage whose unit cost was not measured
    is None; where a setting measured differs from the profile's, `notes` says so. → {"hours", "notes"}."""
    nproc, d1, d2 = cfg["runtime"].nproc, cfg["train_dd1"][family], cfg["train_dd2"][family]
    st, bt, ev = cfg["sample_teacher"][family], cfg["build_trajectories"][family], cfg["evaluate"]
    notes = []

    def item(what):  # seconds per item
        return 1 / rows[what]["per_s"] if what in rows else None

    def step(what, global_batch):  # seconds per step at one device's share of the global batch
        return rows[what]["seconds"] * (global_batch / nproc) / rows[what]["batch"] if what in rows else None

    def times(n, *costs):
        return None if any(c is None for c in costs) else n * sum(costs)

    flow = rows.get("pair building", {}).get("flow_steps")
    if flow is not None and flow != bt.flow_steps:
        notes.append(f"pairs measured at {flow} flow steps (the profile: {bt.flow_steps})")
    k = d2.k_guide
    one, many = (step(f"DD2 generator step, K = {n}", d2.batch_size) for n in (1, k))
    if one is not None and many is not None and k > 1:  # one guidance update, and the generator's part
        guide = (many - one) / (k - 1)
        gen = one - guide
        before = min(d2.n_steps, d2.align_at) if d2.align_steps else d2.n_steps
        csd = before * (gen + k * guide) + d2.align_steps * guide + (d2.n_steps - before) * (gen + d2.k_after * guide)
    else:
        csd = times(d2.n_steps, many)
        if csd is not None and (d2.align_steps or d2.k_after != k):
            notes.append(f"CSD at K = {k} throughout (K = 1 not measured: alignment and k_after left out)")
    decode = item("decode to 256 px")
    hours = {
        "sample_teacher": times(st.n_samples, item("teacher sampling"), decode),
        "build_trajectories": None if item("pair building") is None else bt.n_pairs * item("pair building") / nproc,
        "train_dd1": times(d1.n_steps, step("DD1 training step", d1.batch_size)),
        "train_dd2 (teacher samples)": times(d2.n_gts_samples, item("teacher sampling")),
        "train_dd2 (GTS)": times(d2.gts_head_steps + d2.gts_full_steps, step("GTS step", d2.gts_batch)),
        "train_dd2 (CSD)": csd,
        "evaluate (teacher and skip-n)": times(ev.n_eval * (1 + len(getattr(ev, family).skip_n)),
                                               item("teacher sampling"), decode),
    }
    return {"hours": {k: None if v is None else round(v / 3600, 2) for k, v in hours.items()}, "notes": notes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dd.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--family", choices=("llamagen", "var"), action="append")
    ap.add_argument("--thin", action="store_true", help="release.THIN's thin models (a quick check on CPU)")
    ap.add_argument("--scale", type=int, default=1, help="divide every batch by this (a quick check on CPU)")
    ap.add_argument("--batch", type=int, default=128, help="batch of the sampling, pair and decoding calls")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up step")
    ap.add_argument("--out", default="reports/benchmarks/release_scale.json")
    a = ap.parse_args(argv)
    found = []
    for family in a.family or ("llamagen", "var"):
        cfg = settings(io.root() / "profiles" / f"paper-{family}.yaml")
        found.append(measure(family, cfg, a.device, a.batch, a.steps, a.thin, a.scale))
        for what, r in found[-1]["rows"].items():
            print(f"{family:8s} {what:28s} {r['seconds']:8.3f} s  {r['per_s']:9.1f} {r['unit']}/s"
                  f"  peak {r['peak_mb']} MB", flush=True)
        print(f"{family:8s} projected hours on {found[-1]['nproc']}: {found[-1]['projected']}", flush=True)
    io.write_json(io.path(a.out), {"device": bench.device_name(a.device), "command": " ".join(["python -m dd.scale",
                                                                                             *(argv or sys.argv[1:])]),
                                   "thin": a.thin, "families": found})
    return 0


if __name__ == "__main__":
    sys.exit(main())
