"""Diagnostic: how good are the samples of LlamaGen's continuous-input teacher Φ, the distribution DD2 distils?

DD2's targets for LlamaGen are Φ's conditionals (the teacher with its token table swapped for an MLP on codebook
vectors, fitted and KL-tuned), not the teacher's. This rebuilds Φ as `08_train_dd2` does (teacher samples and input-MLP
fit under base.seed, the KL tuning read back from a run's finished adapt_state.pt), samples it autoregressively with
the teacher's sampling settings (`dd2.teacher_logp`: guidance, top-k / top-p), feeding each drawn code's vector
back, and scores n samples (labels i mod classes) in the evaluation feature space beside n ordinary teacher samples.
Writes <out>/<name>.json. With --params naming other train_dd2.llamagen sizes (adapt_steps, n_gts_samples) and
a new --adapt_state path, it builds that Φ (and writes its adapt_state.pt there) instead of reading a run's back.

    python scripts/dd2_phi_samples.py --adapt_state data/train_dd2/llamagen/adapt_state.pt
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from dd import dd1, dd2, io, metrics, params, teachers


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapt_state", required=True, help="a finished adapt_state.pt of 08_train_dd2 (LlamaGen)")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data", help="the pipeline's data folder")
    ap.add_argument("--out", default="reports/benchmarks")
    ap.add_argument("--name", default="dd2_phi_samples", help="the result file's name")
    a = ap.parse_args(argv)
    P = params.load(a.params)
    seed, cfg, family = P["base"].seed, P["train_dd2"]["llamagen"], "llamagen"
    fam, root, dev = teachers.family(family), Path(a.data), torch.device("cpu")
    tok = teachers.load_model(root / "train_tokenizer" / family, "tokenizer", fam.Tokenizer).requires_grad_(False)
    teacher = teachers.load_model(root / "train_teacher" / family, "teacher", fam.Teacher).requires_grad_(False)
    _, samples_meta = io.read_checked(root / "sample_teacher" / family, "samples.safetensors")
    sampling = params.parse("sample_teacher", samples_meta["sampling"], family)
    num_classes = io.read_json(root / "train_tokenizer" / family / "meta.json")["num_classes"]
    codebook = fam.codebook(tok).float()
    phi, adapt = dd2.rebuild_phi(tok, teacher, codebook, sampling, num_classes, cfg, seed, a.adapt_state, dev)
    labels = torch.arange(a.n) % num_classes
    gen = torch.Generator().manual_seed(seed + 11)
    length = dd1.step_ends(teacher)[-1]
    x = torch.zeros(a.n, length, codebook.shape[1])
    with torch.no_grad():
        for i in tqdm(range(length), desc="Φ, AR sampling"):  # (no KV cache: a full forward per token)
            logp = dd2.teacher_logp(phi, tok, x[:, :i + 1], labels, sampling)[:, i]
            x[:, i] = codebook[torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]]
        phi_images = dd1.decode(tok, x)
        teacher_images = dd1.decode(tok, codebook[fam.sample(tok, teacher, labels, sampling,
                                                               torch.Generator().manual_seed(seed + 11), 250, dev)])
    net, ref, feat_meta = metrics.load_feature_space(root / "features", dev)
    rows = {name: metrics.sample_metrics(net, ref, imgs, labels, feat_meta["dataset"], feat_meta["k_nn"], dev)
            for name, imgs in (("teacher", teacher_images), ("phi", phi_images))}
    fid_key = metrics.fid_name(feat_meta["dataset"])
    for name, m in rows.items():
        print(f"{name}: {fid_key} {m[fid_key]:.2f}, class acc {m['class_acc']:.3f}")
    out = Path(a.out) / f"{a.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": a.n, "adapt_steps": cfg.adapt_steps, "n_gts_samples": cfg.n_gts_samples,
                               **{k: adapt[k] for k in ("kl_after_fit", "kl_after_tuning", "kept")},
                               "methods": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
