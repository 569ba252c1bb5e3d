"""Diagnostic: continue a finished DD2 distillation under other settings, to see which one moves its plateau.

For VAR the teacher reads vectors as it is; for LlamaGen the continuous-input teacher Φ is rebuilt as the notebook
builds it (its teacher samples and input-MLP fit under base.seed, the KL fine-tuning read back from the run's
finished `adapt_state.pt`, given with --adapt_state; the train_dd2.llamagen sizes of --params). Reads a
`distill_state.pt` that `08_train_dd2` wrote (its own settings are in the checkpoint's fingerprint), starts the
generator from that run's EMA weights (G ← EMA, as a performance alignment does) and the guidance network from
its last weights, and runs `n_steps` more generator updates with fresh optimizers, the learning rates, batch size,
k_guide, teacher_prefix, CSD time range, output temperature (`out_tau`) and CSD weighting given here, no
warm-up, the distillation seed base.seed + 100 (the same for every setting, so runs differ only in the setting),
optionally after a performance alignment's guidance-only catch-up (--align_steps, then --k_after per update). A fresh
progressive EMA starts at G. The probe of `08_train_dd2` (500 one-step samples, labels i mod classes, noise seed
base.seed + 7) scores the EMA every `every` updates and the last online weights at the end; the mean distance of the
generator's vectors to their nearest code (over the codebook's median nearest-neighbour distance) is taken at the
start and the end. Writes <out>/<name>.json; compare settings at equal compute (batch × k_guide × updates).

    python scripts/dd2_continue.py --state data/train_dd2/var/distill_state.pt --name lr1e-4 --lr_gen 1e-4
    python scripts/dd2_continue.py --family llamagen --state data/train_dd2/llamagen/distill_state.pt \
        --adapt_state data/train_dd2/llamagen/adapt_state.pt --name llamagen_lr3e-5 --lr_gen 3e-5
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dd import dd1, dd2, io, metrics, params, teachers


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="var", choices=("llamagen", "var"))
    ap.add_argument("--state", required=True, help="a distill_state.pt of 08_train_dd2")
    ap.add_argument("--adapt_state", help="LlamaGen: the same run's adapt_state.pt (its continuous-input teacher)")
    ap.add_argument("--params", default="params.yaml", help="LlamaGen: train_dd2.llamagen's adaptation sizes")
    ap.add_argument("--name", required=True, help="the result file's name")
    ap.add_argument("--n_steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr_gen", type=float, default=3e-4)
    ap.add_argument("--lr_guide", type=float, default=5e-4)
    ap.add_argument("--k_guide", type=int, default=2)
    ap.add_argument("--align_steps", type=int, default=0,
                    help="performance alignment first: this many guidance-only updates against G = EMA (0: none)")
    ap.add_argument("--k_after", type=int, default=2, help="guidance updates per generator update after alignment")
    ap.add_argument("--prefix", default="continuous", choices=("continuous", "codes"), help="teacher_prefix")
    ap.add_argument("--t_min", type=float, default=0.02, help="CSD times t ~ U[t_min, t_max]")
    ap.add_argument("--t_max", type=float, default=0.98)
    ap.add_argument("--tau", type=float, default=0.0, help="the generator's output temperature (out_tau; 0: off)")
    ap.add_argument("--tau_end", type=float, default=0.0, help="out_tau at the last update (out_tau_end; 0: constant)")
    ap.add_argument("--weight", default="token", choices=("token", "sequence"), help="csd_weight")
    ap.add_argument("--every", type=int, default=100, help="probe the EMA every this many updates")
    ap.add_argument("--seed", type=int, default=0, help="base.seed of the run the checkpoint comes from")
    ap.add_argument("--data", default="data", help="the pipeline's data folder (tokenizer, teacher, features)")
    ap.add_argument("--out", default="reports/ablations/dd2_continue")
    a = ap.parse_args(argv)
    dev, family = torch.device("cpu"), a.family
    if family == "llamagen" and not a.adapt_state:
        ap.error("--family llamagen needs --adapt_state (the run's adapt_state.pt)")
    fam = teachers.family(family)
    root = Path(a.data)
    tok = teachers.load_model(io.path(root / "train_tokenizer", family), "tokenizer",
                              fam.Tokenizer).eval().requires_grad_(False)
    teacher = teachers.load_model(io.path(root / "train_teacher", family), "teacher",
                                  fam.Teacher).eval().requires_grad_(False)
    ends = dd1.step_ends(teacher)
    _, samples_meta = io.read_checked(io.path(root / "sample_teacher", family), "samples.safetensors")
    sampling = params.parse("sample_teacher", samples_meta["sampling"], family)
    net, ref, feat_meta = metrics.load_feature_space(root / "features", dev)
    num_classes = io.read_json(io.path(root / "train_tokenizer", family, "meta.json"))["num_classes"]
    codebook = fam.codebook(tok).float()
    phi = teacher
    if family == "llamagen":
        phi, _ = dd2.rebuild_phi(tok, teacher, codebook, sampling, num_classes,
                                 params.load(a.params)["train_dd2"][family], a.seed, a.adapt_state, dev)
    ck = torch.load(a.state, map_location="cpu", weights_only=False)
    config = ck["fingerprint"]["model_config"]
    gen, guide = dd2.ARDiffusion(**config), dd2.ARDiffusion(**config)
    gen.load_state_dict(ck["ema"])  # G <- EMA
    guide.load_state_dict(ck["guide"])
    labels = torch.arange(500) % num_classes
    noise = torch.randn(500, ends[-1], codebook.shape[1], generator=torch.Generator().manual_seed(a.seed + 7))
    probe = dd2.Probe(tok, net, ref, feat_meta["dataset"], feat_meta["k_nn"], labels, noise, a.every, a.n_steps,
                      250, dev)
    spacing = dd2.code_spacing(codebook)

    @torch.no_grad()
    def off_codebook(model):  # mean distance of 250 probe samples' vectors to their nearest code / code spacing
        x = dd2.generate(model.eval(), tok, noise[:250], labels[:250]).flatten(0, 1)
        return (torch.cdist(x, codebook).min(1).values.mean() / spacing).item()

    off = {"start": off_codebook(gen)}
    cfg = dd2.DistillConfig(n_steps=a.n_steps, batch_size=a.batch, lr_gen=a.lr_gen, lr_guide=a.lr_guide,
                            warmup_steps=0, k_guide=a.k_guide, align_at=0, align_steps=a.align_steps,
                            k_after=a.k_after, n_noise=ck["fingerprint"]["config"]["n_noise"],
                            teacher_prefix=a.prefix, t_min=a.t_min, t_max=a.t_max, seed=a.seed + 100,
                            out_tau=a.tau, out_tau_end=a.tau_end, csd_weight=a.weight)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = dd2.distill(gen, guide, phi, tok, codebook, sampling, num_classes, cfg, out / f"{a.name}.pt", dev,
                      desc=a.name, on_step=probe)
    seconds = time.perf_counter() - t0 - probe.seconds
    online = dd2.Probe(tok, net, ref, feat_meta["dataset"], feat_meta["k_nn"], labels, noise, 1, 1, 250, dev)
    online(1, gen.eval())
    off["online_final"] = off_codebook(gen)
    off["ema_final"] = off_codebook(res["ema"])
    result = {"args": vars(a), "from_step": ck["step"], "seconds": seconds, "s_per_update": seconds / a.n_steps,
              "probe_ema": probe.records, "online_final": online.records,
              "off_codebook": off, "history_tail": res["history"][-5:]}
    io.write_json(out / f"{a.name}.json", result)
    (out / f"{a.name}.pt").unlink()  # the continuation's own checkpoint: only the figures are kept
    print(json.dumps({k: result[k] for k in ("s_per_update", "probe_ema", "online_final", "off_codebook")}, indent=1))


if __name__ == "__main__":
    main()
