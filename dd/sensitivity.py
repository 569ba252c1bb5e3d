"""Does the evaluation feature space see lost inter-position structure? A benchmark behind DD1's margin over onestep*.

`fid_fmnist` is the Fréchet distance in the 128-d penultimate layer of the classifier the `features` stage trains,
a layer built to ignore within-class variation: a per-class patchwork of real images (every block from a different
image of the class, onestep* applied to pixels) scores about as well as the one-step methods there. This benchmark
scores the same images in a second space of the same network, training nothing: the global-average-pooled
activations of all four conv blocks, concatenated (`fd_multiscale`; 352-d at width 32). Like Inception's pooled
features it keeps the early blocks' edge and texture statistics, which block seams and incoherent neighbours change.
Every dimension is standardised by the reference (test split) mean and standard deviation first, so that no block
dominates by its scale; the penultimate space is scored both raw (exactly `fid_fmnist`) and standardised.

Scored: the features stage's controls (train split, blurred test split, per-class patchworks of 8- and 4-px blocks)
and the tokens the `evaluate` stage generated for every method of every family (the same labels and noise),
decoded from their codes through the family's tokenizer (`evaluate` stores tokens only: DD2's unsnapped outputs, and
DD1's continuous-head positions when `train_dd1.split` reads any, are snapped here, so those rows can differ slightly
from `evaluate`'s). Column `reported_fid_fmnist` holds the figure the pipeline reported for the same
images (`features.json`, `evaluate.json`): `fd_penultimate` must reproduce it.

    python -m dd.sensitivity        # after `dvc repro`; writes reports/benchmarks/feature_space.{json,csv,png}
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from . import data, dd1, io, metrics, params, teachers


@torch.no_grad()
def block_features(net: metrics.FeatureNet, images: torch.Tensor, batch_size: int = 500,
                   device="cpu") -> list[torch.Tensor]:
    """images [N, C, H, W] (uint8 or [-1, 1]) → one [N, channels] tensor per conv block: its ReLU output averaged
    over the spatial positions (the last one is `net.features`)."""
    net.eval().to(device)
    n_blocks = sum(isinstance(m, nn.ReLU) for m in net.body)

    def fn(x):
        x, out = data.to_channels(x, net.config["in_channels"]), []
        for m in net.body:
            x = m(x)
            if isinstance(m, nn.ReLU):
                out.append(x.mean((2, 3)))
        return torch.cat(out, 1)

    feats = metrics.run_batched(fn, images, batch_size, device)
    widths = [m.num_features for m in net.body if isinstance(m, nn.BatchNorm2d)]
    assert len(widths) == n_blocks and sum(widths) == feats.shape[1]
    return list(feats.split(widths, 1))


class Spaces:
    """Reference statistics of the spaces, from the reference images' block features."""

    def __init__(self, ref_blocks: list[torch.Tensor]):
        self.ref = {"penultimate": ref_blocks[-1], "penultimate_std": ref_blocks[-1],
                    "multiscale": torch.cat(ref_blocks, 1)}
        self.scale = {k: (v.mean(0), v.std(0).clamp_min(1e-6)) if k != "penultimate" else None
                      for k, v in self.ref.items()}
        self.stats = {k: metrics.feature_stats(self._z(k, v)) for k, v in self.ref.items()}

    def _z(self, key: str, f: torch.Tensor) -> torch.Tensor:
        s = self.scale[key]
        return f if s is None else (f - s[0]) / s[1]

    def distances(self, blocks: list[torch.Tensor]) -> dict:
        feats = {"penultimate": blocks[-1], "penultimate_std": blocks[-1], "multiscale": torch.cat(blocks, 1)}
        return {f"fd_{k}": metrics.frechet_distance(*metrics.feature_stats(self._z(k, f)), *self.stats[k])
                for k, f in feats.items()}


def controls(x_train, y_train, ref_x, ref_y, seed: int) -> dict:
    """The features stage's sanity images (same draws in the same order: same seed, same generator)."""
    g = torch.Generator().manual_seed(seed)
    out = {"train split": x_train[torch.randperm(len(x_train), generator=g)[: len(ref_x)]],
           "blurred test split": metrics.blur(data.to_float(ref_x))}
    torch.rand(ref_x.shape, generator=g)  # the features stage's noise row (skipped here, it keeps the draws aligned)
    for p in [p for p in (8, 4) if x_train.shape[-1] % p == 0]:
        out[f"patchwork {p} px"] = metrics.patchwork(x_train, y_train, p, g, out_labels=ref_y)
    return out


def run(seed: int = 0, n_ref: int = 10000, device="cpu", dirs: dict | None = None) -> list[dict]:
    d = {"prepare": "data/prepare", "features": "data/features", "tokenizer": "data/train_tokenizer",
         "evaluate": "data/evaluate", "metrics": "reports/metrics", **(dirs or {})}
    net, ref, meta = metrics.load_feature_space(d["features"], device)
    x_train, y_train, _ = data.load_split("train", d["prepare"])
    x_test, y_test, _ = data.load_split("test", d["prepare"])
    ref_x, ref_y = (x_test, y_test) if n_ref == 0 else (x_test[:n_ref], y_test[:n_ref])
    spaces = Spaces(block_features(net, ref_x, device=device))
    # the raw penultimate space must be the evaluation's own: same reference statistics as the features stage
    if not torch.allclose(torch.from_numpy(spaces.stats["penultimate"][0]).float(), ref["mu"].float(), atol=1e-4):
        raise RuntimeError("the penultimate features differ from data/features/reference.safetensors: "
                           "run `dvc repro` first (params.yaml's features section must be the one it ran with)")
    evaluated = io.read_json(io.path(d["metrics"], "evaluate.json"))
    fid_key = metrics.fid_name(meta["dataset"])
    rows = []
    sanity = io.read_json(io.path(d["metrics"], "features.json"))["sanity"]
    keys = {"train split": "train", "blurred test split": "blurred_test", "patchwork 8 px": "patchwork_8px",
            "patchwork 4 px": "patchwork_4px"}
    for name, imgs in controls(x_train, y_train, ref_x, ref_y, seed).items():
        rows.append({"family": "data", "method": name, **spaces.distances(block_features(net, imgs, device=device)),
                     "reported_" + fid_key: sanity.get(keys[name], {}).get(fid_key)})
    for family in ("llamagen", "var"):
        path = io.path(d["evaluate"], f"{family}.safetensors")
        if not path.is_file():
            continue
        fam = teachers.family(family)
        tok = teachers.load_model(io.path(d["tokenizer"], family), "tokenizer", fam.Tokenizer).to(device)
        cb = fam.codebook(tok).float().to(device)
        generated, _ = io.read_checked(io.path(d["evaluate"]), f"{family}.safetensors")
        for name, tokens in io.progress([(k, v) for k, v in generated.items() if k != "labels"], desc=f"{family} methods"):
            with torch.no_grad():
                images = torch.cat([dd1.decode(tok, cb[t.to(device)]).cpu() for t in tokens.split(250)])
            r = {"family": family, "method": name, **spaces.distances(block_features(net, images, device=device))}
            r["reported_" + fid_key] = evaluated[family][name][fid_key]
            rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dd.sensitivity", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", help="the pipeline's params (base.seed, features.n_ref)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="reports/benchmarks/feature_space")
    a = ap.parse_args(argv)
    cfg = params.load(a.params)
    a.seed, a.n_ref = cfg["base"].seed, cfg["features"].n_ref
    import pandas as pd
    import seaborn as sns

    rows = run(a.seed, a.n_ref, a.device)
    df = pd.DataFrame(rows)
    out = io.path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    io.write_csv(out.with_suffix(".csv"), df)
    io.write_json(out.with_suffix(".json"), {"rows": rows, "seed": a.seed, "n_ref": a.n_ref, "device": a.device,
                                             "torch": torch.__version__})
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.round(3).to_string(index=False))
    long = df.melt(id_vars=["family", "method"], value_vars=["fd_penultimate_std", "fd_multiscale"],
                   var_name="space", value_name="Fréchet distance (standardised)")
    g = sns.catplot(long, x="Fréchet distance (standardised)", y="method", hue="space", col="family", kind="bar",
                    sharey=False, height=3.6, aspect=1.2)
    g.set(xscale="log")
    g.savefig(out.with_suffix(".png"), dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
