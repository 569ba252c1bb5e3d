"""Diagnostic: how much does a DD1 student lose when its evaluated weights still hold a share of the initial ones?

An EMA of decay d started at the initial weights keeps d ** n_steps of them after n_steps updates (0.999 over
800 steps: 45 %). This reads a finished `07_train_dd1` stage (its EMA weights θ), rebuilds the initial student
exactly as the notebook does (teacher-copied, seed base.seed), and scores one-step samples of s·θ0 + (1 − s)·θ for
each share s with the notebook's own evaluation (the first n_eval teacher-sample labels, noise seed base.seed,
`fid_fmnist`). Writes <out>/dd1_ema_init_share_<family>.json.

    python scripts/dd1_ema_init_share.py --family var --shares 0 0.22 0.45
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dd import dd1, io, metrics, params, teachers, trajectories


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="var", choices=("llamagen", "var"))
    ap.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.22, 0.45])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data", help="the pipeline's data folder")
    ap.add_argument("--out", default="reports/benchmarks")
    a = ap.parse_args(argv)
    P = params.load(a.params)
    seed, cfg, fam = P["base"].seed, P["train_dd1"][a.family], teachers.family(a.family)
    d = Path(a.data)
    tok = teachers.load_model(d / "train_tokenizer" / a.family, "tokenizer", fam.Tokenizer).requires_grad_(False)
    teacher = teachers.load_model(d / "train_teacher" / a.family, "teacher", fam.Teacher).requires_grad_(False)
    student = teachers.load_model(d / "train_dd1" / a.family, "dd1", dd1.DD1Model).requires_grad_(False)
    codebook = fam.codebook(tok).float()
    ends = trajectories.step_ends(teacher)
    torch.manual_seed(seed)  # as 07_train_dd1 builds its student before training
    init = dd1.DD1Model.from_teacher(teacher, codebook.shape[1]).eval().requires_grad_(False)
    samples, _ = io.read_checked(d / "sample_teacher" / a.family, "samples.safetensors")
    labels = samples["labels"][:cfg.n_eval]
    noise = torch.randn(len(labels), ends[-1], codebook.shape[1], generator=torch.Generator().manual_seed(seed))
    net, ref, feat_meta = metrics.load_feature_space(d / "features", "cpu")
    fid_key = metrics.fid_name(feat_meta["dataset"])
    trained = {k: v.clone() for k, v in student.state_dict().items()}
    start = dict(init.named_parameters())  # (parameters only: buffers such as -inf attention masks stay as they are)
    rows = {}
    for s in a.shares:
        mixed = {k: s * start[k] + (1 - s) * v if k in start else v for k, v in trained.items()}
        student.load_state_dict(mixed)
        emb = dd1.in_batches(lambda e, y: dd1.sample(student, e, y, codebook, ends, (0,), cfg.split)[1],
                             noise, labels, cfg.eval_batch)
        m = metrics.sample_metrics(net, ref, dd1.decode(tok, emb), labels, feat_meta["dataset"], feat_meta["k_nn"],
                                   "cpu")
        rows[str(s)] = m
        print(f"{a.family}: initial-weight share {s:.2f}: {fid_key} {m[fid_key]:.2f}, class acc {m['class_acc']:.3f}")
    out = Path(a.out) / f"dd1_ema_init_share_{a.family}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"family": a.family, "n_eval": len(labels), "shares": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
