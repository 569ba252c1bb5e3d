"""Diagnostic: at which AR steps does the one-step DD2 generator lose quality against its teacher?

Scores, for one family and one trained DD2 generator (a `train_dd2` output folder), the same n labels (i mod
classes) and noise (seed base.seed + 7, the notebook's probe noise) under:

- `dd2 k-step` for every k in --ks: the generator's first n_ar − k + 1 AR steps, the teacher redraws the rest
  (k = 1: the one-step generator, decoded continuously as the pipeline does; `dd2 1-step snapped`: its nearest codes);
- `teacher`, `onestep*` and `dd1 1-step`, for scale;
- per AR step of the one-step output: the distance to the nearest code over the codebook's median nearest-neighbour
  distance (how far off the codebook the generator's vectors lie), and the unguided teacher's NLL of its nearest codes
  given the prefix, beside the same NLL of the teacher's own and of DD1's samples (bits / token).

Writes <out>/dd2_where_<family>.json and .png.

    python scripts/dd2_where.py --family var --dd2 reports/ablations/.../train_dd2 --ks 2 3 4 5 6
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dd import dd1, dd2, methods, metrics, params  # noqa: E402


@torch.no_grad()
def step_stats(f, tokens, emb, labels, spacing):
    """Per AR step: teacher NLL (bits / token) of tokens and emb's relative distance to its nearest codes."""
    logits = torch.cat([f.fam.logits(f.tok, f.teacher, tokens[i:i + 250], labels[i:i + 250])
                        for i in range(0, len(tokens), 250)])
    nll = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
    off = (emb - f.codebook[tokens]).norm(dim=-1) / spacing
    bounds = [0, *f.ends]
    return [{"ar_step": s + 1, "tokens": bounds[s + 1] - bounds[s],
             "nll_bits": nll[:, bounds[s]:bounds[s + 1]].mean().item() / math.log(2),
             "off_codebook": off[:, bounds[s]:bounds[s + 1]].mean().item()} for s in range(len(f.ends))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="var", choices=params.FAMILIES)
    ap.add_argument("--dd2", default="data/train_dd2", help="a train_dd2 output folder (one sub-folder per family)")
    ap.add_argument("--ks", type=int, nargs="*", default=[2], help="k of the k-step samples")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports/benchmarks")
    a = ap.parse_args(argv)
    seed = params.load(a.params)["base"].seed
    f = methods.load(a.family, dirs={"dd2": a.dd2})
    table = methods.build(f, multistep=a.ks)
    net, ref, feat_meta = metrics.load_feature_space("data/features", f.device)
    fid_key = metrics.fid_name(feat_meta["dataset"])
    labels = torch.arange(a.n) % f.teacher.num_classes
    noise = torch.randn(a.n, *f.shape, generator=torch.Generator().manual_seed(seed + 7))
    cb = f.codebook
    spacing = dd2.code_spacing(cb).item()
    rows, steps = [], []
    n_ar = len(f.ends)
    runs = [("teacher", None), ("onestep*", None), ("dd1 1-step", None), ("dd2 1-step", 1),
            *[(f"dd2 {k}-step", k) for k in a.ks]]
    for name, k in runs:
        tokens, emb = methods.run(table[name], labels, noise, seed)
        variants = [(name, emb)] + ([("dd2 1-step snapped", cb[tokens])] if k == 1 else [])
        for vname, e in variants:
            m = metrics.sample_metrics(net, ref, dd1.decode(f.tok, e).cpu(), labels, feat_meta["dataset"],
                                       feat_meta["k_nn"], f.device)
            rows.append({"method": vname, "dd2_ar_steps": None if k is None else n_ar - k + 1, fid_key: m[fid_key],
                         "class_acc": m["class_acc"], "recall": m["recall"]})
            print(f"{vname}: {fid_key} {m[fid_key]:.2f}, class acc {m['class_acc']:.3f}")
        if name in ("teacher", "dd1 1-step", "dd2 1-step"):
            steps += [{"method": name, **r} for r in step_stats(f, tokens, emb, labels, spacing)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"family": a.family, "dd2": a.dd2, "n": a.n, "seed_noise": seed + 7, "code_spacing": spacing,
              "methods": rows, "per_step": steps}
    (out / f"dd2_where_{a.family}.json").write_text(json.dumps(result, indent=1) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    df = pd.DataFrame([r for r in rows if r["dd2_ar_steps"] is not None and r["method"] != "dd2 1-step snapped"])
    sns.lineplot(df, x="dd2_ar_steps", y=fid_key, marker="o", ax=axes[0], label="DD2 first steps, teacher after")
    for name, ls in (("teacher", ":"), ("dd1 1-step", "--"), ("onestep*", "-.")):
        axes[0].axhline(next(r[fid_key] for r in rows if r["method"] == name), ls=ls, c="gray", label=name)
    axes[0].set(xlabel="AR steps drawn by the DD2 generator", title=f"{a.family}: where DD2 loses quality")
    axes[0].legend(fontsize=8)
    sns.lineplot(pd.DataFrame(steps), x="ar_step", y="nll_bits", hue="method", marker="o", ax=axes[1])
    axes[1].set(xlabel="AR step", ylabel="teacher NLL of the tokens (bits / token)")
    plt.tight_layout()
    fig.savefig(out / f"dd2_where_{a.family}.png", dpi=120)
    print(f"wrote {out / f'dd2_where_{a.family}.json'}")


if __name__ == "__main__":
    main()
