"""Diagnostic: the pipeline's DD2 distillation rerun from its committed AR-diffusion model with one change.

Starts from `data/train_dd2/<family>/gts_full_state.pt` (LlamaGen: its Φ rebuilt from the run's `adapt_state.pt`)
with the family's `train_dd2` settings of params.yaml and seed 0; the probe of `08_train_dd2` (500 one-step samples,
labels i mod classes, noise seed 7) scores the EMA every 50 updates. Without options the curve is the pipeline's own.

--scale: the generator's backbone reads the noise at the codes' scale. It reads the noise sequence in the place of
the data (`dd2.generate`), but the noise is N(0, I) while the code vectors are much smaller (per-dimension rms 0.35
for this LlamaGen codebook, 0.15 for VAR's), so the backbone starts far outside what it was trained on. With
--scale it reads eps · rms(codes) (the head still reads eps: q_i = eps_i + v(eps_i, 0, f_i(rms · eps_<i))), by
replacing `dd2.generate` for this process only.
--weight sequence: the CSD loss's ω per sequence (`DistillConfig.csd_weight`) instead of per token.

    python scripts/dd2_from_gts.py --family llamagen --scale --name llamagen_scaled
    python scripts/dd2_from_gts.py --family var --weight sequence --name var_wseq
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from dd import dd2, io, metrics, methods, params


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="llamagen", choices=("llamagen", "var"))
    ap.add_argument("--scale", action="store_true", help="the backbone reads eps · rms(codes)")
    ap.add_argument("--weight", default="token", choices=("token", "sequence"), help="csd_weight")
    ap.add_argument("--name", required=True, help="the result file's name")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports/ablations/dd2_from_gts")
    a = ap.parse_args(argv)
    family, dev = a.family, torch.device("cpu")
    f = methods.load(family, need_students=False)  # the pipeline's tokenizer, teacher, sampling settings
    tok, teacher, codebook, sampling, ends = f.tok, f.teacher, f.codebook, f.sampling, f.ends
    num_classes = teacher.num_classes
    net, ref, feat_meta = metrics.load_feature_space("data/features", dev)
    cfg = params.load(a.params)["train_dd2"][family]
    run = Path(methods.DIRS["dd2"]) / family
    phi = teacher
    if family == "llamagen":
        phi, _ = dd2.rebuild_phi(tok, teacher, codebook, sampling, num_classes, cfg, 0, run / "adapt_state.pt", dev)
    ardiff = dd2.ARDiffusion.from_teacher(phi, cfg.head_width, cfg.head_depth)
    ardiff.load_state_dict(torch.load(run / "gts_full_state.pt", map_location="cpu", weights_only=False)["model"])
    rms = codebook.pow(2).mean().sqrt().item() if a.scale else 1.0

    def generate(gen, tok_, eps, labels):  # dd2.generate with the backbone's noise scaled
        return eps + gen.velocity(eps, 0.0, gen.features(dd2.seq_input(tok_, eps * rms), labels))

    if a.scale:
        dd2.generate = generate  # distill and Probe look it up in dd2 at each call
    gen, guide = copy.deepcopy(ardiff), copy.deepcopy(ardiff)
    dcfg = dd2.DistillConfig(n_steps=cfg.n_steps, batch_size=cfg.batch_size, lr_gen=cfg.lr_gen, lr_guide=cfg.lr_guide,
                             warmup_steps=cfg.warmup_steps, lr_gen_decay_to=cfg.lr_gen_decay_to, k_guide=cfg.k_guide,
                             n_noise=cfg.n_noise, t_min=cfg.t_min, t_max=cfg.t_max,
                             teacher_prefix=cfg.teacher_prefix, ema_max=cfg.ema_max, seed=0, csd_weight=a.weight)
    noise = torch.randn(500, ends[-1], codebook.shape[1], generator=torch.Generator().manual_seed(7))
    probe = dd2.Probe(tok, net, ref, feat_meta["dataset"], feat_meta["k_nn"], torch.arange(500) % num_classes, noise,
                      50, cfg.n_steps, 250, dev)
    probe(0, gen)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dd2.distill(gen, guide, phi, tok, codebook, sampling, num_classes, dcfg, out / f"{a.name}.pt", dev, desc=a.name,
                on_step=probe)
    result = {"args": vars(a), "rms": rms, "seconds": time.perf_counter() - t0 - probe.seconds, "probe": probe.records}
    io.write_json(out / f"{a.name}.json", result)
    (out / f"{a.name}.pt").unlink()  # only the figures are kept
    print(json.dumps(result["probe"]))


if __name__ == "__main__":
    main()
