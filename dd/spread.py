"""How much of a difference between two methods' `fid_fmnist` is sampling noise? A benchmark over noise seeds.

The `evaluate` stage scores every method once, on one draw of noise (and of the samplers' own randomness) for
`evaluate.n_eval` samples. Whether "DD1 2-step is at least as good as 1-step" or "DD1 beats onestep*" holds beyond
the luck of that draw needs the spread of the figures over draws. This benchmark re-runs chosen methods of every
family for `--seeds` seeds (base.seed + k, k = 0 .. seeds-1; k = 0 is the evaluation's own draw, and its figures must
reproduce `evaluate.json`), the same labels as the evaluation, and reports per method the mean and standard deviation
of the metrics, and for pairs of methods the paired differences (same seed: same noise for both) with the number of
seeds on which the first is better, and DD1 1-step's share of the onestep* → teacher distance per seed.

    python -m dd.spread            # after `dvc repro`; writes reports/benchmarks/seed_spread.{json,csv,png}
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from . import dd1, io, methods, metrics, params

METHODS = ("teacher", "onestep*", "dd1 1-step", "dd1 2-step")
PAIRS = (("dd1 2-step", "dd1 1-step"), ("dd1 1-step", "onestep*"), ("teacher", "dd1 1-step"))


@torch.no_grad()
def run(seeds: list[int], names=METHODS, n_eval: int = 1000, batch_size: int = 250, device="cpu",
        dirs: dict | None = None, families=params.DEFAULT_FAMILIES) -> list[dict]:
    """One row per (family, method, seed): {"family", "method", "seed", fid_key, "precision", "recall", "class_acc"}.

    seed s: noise = randn(generator seeded s), the samplers' randomness from s, as the evaluation stage draws them."""
    d = {"features": "data/features", "samples": "data/sample_teacher", **(dirs or {})}
    net, ref, meta = metrics.load_feature_space(d["features"], device)
    rows = []
    for family in families:
        f = methods.load(family, device=device)
        table = methods.build(f, batch_size=batch_size)
        missing = [n for n in names if n not in table]
        if missing:
            raise ValueError(f"dd.spread: {family} has no method {missing}; it has: {', '.join(table)}")
        samples, _ = io.read_checked(io.path(d["samples"], family), "samples.safetensors")
        labels = samples["labels"][:n_eval].to(device)
        for s in io.progress(seeds, desc=f"{family} seeds"):
            noise = torch.randn(len(labels), *f.shape, generator=torch.Generator().manual_seed(s)).to(device)
            for name in names:
                _, emb = methods.run(table[name], labels, noise, s, batch_size)
                images = dd1.decode(f.tok, emb, table[name].normalize).cpu()
                q = f.fam.quality(f.tok, net, ref, images, labels.cpu(), meta["dataset"], meta["k_nn"], device)
                rows.append({"family": family, "method": name, "seed": s, **q})
    return rows


def _sd(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def summarise(rows: list[dict], fid_key: str, pairs=PAIRS) -> dict:
    """{family: {"methods": {name: {mean, sd of every metric}}, "pairs": {"a - b": {...}}, "gap_closed": {...}}}."""
    out = {}
    for family in sorted({r["family"] for r in rows}, key=list(params.FAMILIES).index):
        by = {}
        for r in rows:
            if r["family"] == family:
                by.setdefault(r["method"], {})[r["seed"]] = r
        seeds = sorted(next(iter(by.values())))
        ms = {}
        for name, per in by.items():
            ms[name] = {}
            for k in (fid_key, "precision", "recall", "class_acc"):
                v = [per[s][k] for s in seeds]
                ms[name][k] = {"mean": statistics.fmean(v), "sd": _sd(v),
                               "min": min(v), "max": max(v)}
        ps = {}
        for a, b in pairs:
            if a in by and b in by:
                diff = [by[a][s][fid_key] - by[b][s][fid_key] for s in seeds]
                ps[f"{a} - {b}"] = {"mean": statistics.fmean(diff), "sd": _sd(diff),
                                    "first_better": sum(x < 0 for x in diff), "seeds": len(diff), "per_seed": diff}
        fam = {"methods": ms, "pairs": ps, "seeds": seeds}
        if all(n in by for n in ("teacher", "onestep*", "dd1 1-step")):
            share = [(by["onestep*"][s][fid_key] - by["dd1 1-step"][s][fid_key])
                     / (by["onestep*"][s][fid_key] - by["teacher"][s][fid_key]) for s in seeds]
            fam["gap_closed"] = {"mean": statistics.fmean(share), "sd": _sd(share), "per_seed": share}
        out[family] = fam
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dd.spread", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", help="the pipeline's params (base.seed, evaluate)")
    ap.add_argument("--seeds", type=int, default=6, help="noise draws per method (the first is the evaluation's)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names of `dd.methods`")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="reports/benchmarks/seed_spread")
    a = ap.parse_args(argv)
    cfg = params.load(a.params)
    seed, ev = cfg["base"].seed, cfg["evaluate"]
    if a.seeds < 2:
        ap.error(f"--seeds must be at least 2 (a spread needs two draws), got {a.seeds}")
    names = [n.strip() for n in a.methods.split(",") if n.strip()]
    import pandas as pd
    import seaborn as sns

    dev = io.resolve_device(a.device)
    rows = run([seed + k for k in range(a.seeds)], names, ev.n_eval, ev.eval_batch, dev,
               families=cfg["pipeline"].families)
    # the first seed is the evaluation's own draw: its figures must be the stage's
    reported = io.read_json(io.path("reports/metrics/evaluate.json"))
    fid_key = reported["fid_key"]
    check = {f"{r['family']} {r['method']}": (r[fid_key], reported[r["family"]][r["method"]][fid_key])
             for r in rows if r["seed"] == seed}
    summary = summarise(rows, fid_key)
    df = pd.DataFrame(rows)
    out = io.path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    io.write_csv(out.with_suffix(".csv"), df)
    io.write_json(out.with_suffix(".json"), {"summary": summary, "rows": rows, "fid_key": fid_key,
                                             "n_eval": ev.n_eval, "device": str(dev), "torch": torch.__version__,
                                             "evaluate_check": check})
    for k, (mine, theirs) in check.items():
        if abs(mine - theirs) > 1e-3 * max(1.0, abs(theirs)):
            print(f"WARNING: {k}: {fid_key} {mine:.4f} at the evaluation's seed, evaluate.json says {theirs:.4f} "
                  "(is `dvc repro` up to date?)", file=sys.stderr)
    for family, s in summary.items():
        print(f"\n{family} ({len(s['seeds'])} seeds, {ev.n_eval} samples each): {fid_key} mean ± sd")
        for name, m in s["methods"].items():
            print(f"  {name:12s} {m[fid_key]['mean']:7.3f} ± {m[fid_key]['sd']:.3f}  "
                  f"[{m[fid_key]['min']:.3f}, {m[fid_key]['max']:.3f}]")
        for name, p in s["pairs"].items():
            print(f"  {name:24s} {p['mean']:+.3f} ± {p['sd']:.3f}  (first better on {p['first_better']} of "
                  f"{p['seeds']} seeds)")
        if "gap_closed" in s:
            print(f"  DD1 1-step closes {s['gap_closed']['mean']:.1%} ± {s['gap_closed']['sd']:.1%} of the "
                  "onestep* → teacher distance")
    g = sns.catplot(df, x=fid_key, y="method", col="family", kind="strip", sharex=False, height=3.2, aspect=1.3)
    g.map_dataframe(sns.pointplot, x=fid_key, y="method", errorbar="sd", linestyle="none", color="k", marker="|",
                    markersize=12)
    g.savefig(out.with_suffix(".png"), dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
