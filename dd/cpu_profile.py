"""Where the embedded default's time goes: each stage's unit of heavy work at the default's sizes, timed and
profiled in fp32 and in bf16 autocast, on the machine it runs on.

    python -m dd.cpu_profile                       # -> reports/benchmarks/cpu_profile.json and .png
    python -m dd.cpu_profile --unit "DD1 step"     # units whose name contains the text only

The units (random weights at the default's shapes: cost does not depend on what the weights learned): a training
step of the feature classifier, each tokenizer, teacher, DD1 model, GTS model and DD2 generator (with its k_guide
guidance updates), tokenising, teacher sampling, pair building (the teacher's forward under the precision, the
flow map in fp32), DD1 sampling and decoding, and the evaluation's feature extraction. Each unit is timed (median
of `--repeats` calls after a warm-up), profiled once with `torch.profiler` (self time per operator, grouped into
matmul / conv / attention / elementwise and other operators; what is left of the wall time is Python and
framework overhead) and counted once with `torch.utils.flop_counter` (matmul, conv and attention FLOPs, backward included),
so each row gives achieved GFLOP/s beside the CPU's measured matmul peak in the same precision. `stage_minutes`
multiplies a unit's time by how often the default's stage runs it (`calls`).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from . import ardiff, bench, dd1, dd2, io, metrics, params as P, teachers, train, trajectories

GROUPS = {  # operator-name fragments per group, checked in this order
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation", "linear"),
    "conv": ("convolution", "conv2d", "conv_transpose"),
}  # everything else: "elementwise" (pointwise, reductions, norms, softmax, copies, indexing, the optimizer's updates)


def group(name: str) -> str:
    """The group of a profiler operator name: attention | matmul | conv | elementwise."""
    low = name.lower()
    for g, frags in GROUPS.items():
        if any(f.lower() in low for f in frags):
            return g
    return "elementwise"


def matmul_peak(precision: str, n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of an n x n x n matmul in fp32 or with bf16 operands (the CPU's practical peak for the precision)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    s = bench.time_call(lambda: a @ b, "cpu", warmup=2, repeats=repeats)["median_s"]
    return 2 * n ** 3 / s / 1e9


def _shares(fn) -> tuple[dict, float]:
    """Run fn once under the profiler → ({group: seconds of operator self time}, wall seconds)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    out = {g: 0.0 for g in (*GROUPS, "elementwise")}
    for e in prof.key_averages():
        if e.key.startswith("aten::") or e.key.startswith("mkldnn") or "attention" in e.key:
            out[group(e.key)] += e.self_cpu_time_total / 1e6
    return out, wall


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _step(model, loss_fn, batch_fn, precision: str, lr: float = 1e-4):
    """One `train.fit`-like step: forward under the precision, backward, gradient clipping, AdamW, EMA."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ema = copy.deepcopy(model).requires_grad_(False)
    model.train()

    def step():
        with train.autocast(torch.device("cpu"), precision):
            out = loss_fn(model, batch_fn())
        loss = out[0] if isinstance(out, tuple) else out
        train.step_optimizer(opt, loss, params, 1.0)
        train.ema_update(ema, model, 0.99)
    return step


def units(cfg: dict, families=("llamagen", "var"), seed: int = 0) -> list[tuple[str, str, int, object]]:
    """[(unit, stage, calls per stage run, make(precision) → zero-argument call)] at the default's sizes in `cfg`
    (validated params). Models get random weights; data is random at the stored shapes."""
    g = torch.Generator().manual_seed(seed)
    side, nc = cfg["prepare"].image_size, 10
    images = torch.randint(0, 256, (512, 1, side, side), dtype=torch.uint8, generator=g)
    labels = torch.randint(nc, (512,), generator=g)
    fc = cfg["features"]
    out = []

    def classifier_step(precision):
        torch.manual_seed(seed)
        net = metrics.FeatureNet(in_channels=1, num_classes=nc, width=fc.width)
        return _step(net, metrics.classifier_loss, lambda: {"images": images[:fc.batch_size],
                                                            "labels": labels[:fc.batch_size]}, precision)
    out.append(("features: classifier step", "features", fc.n_steps, classifier_step))
    ev = cfg["evaluate"]
    net_eval = metrics.FeatureNet(in_channels=1, num_classes=nc, width=fc.width).eval()
    fake = torch.rand(250, 3, side, side) * 2 - 1

    def features(precision):
        def call():
            with torch.no_grad(), train.autocast(torch.device("cpu"), precision):
                metrics.extract_features(net_eval, fake, batch_size=250)
        return call
    n_methods = 12  # evaluate scores about this many sample sets per family
    out.append(("evaluate: features of 250 images", "evaluate", 2 * n_methods * ev.n_eval // 250, features))

    for family in families:
        fam = teachers.family(family)
        tcfg, mcfg = cfg["train_tokenizer"][family], cfg["train_teacher"][family]
        sampling, bt = cfg["sample_teacher"][family], cfg["build_trajectories"][family]
        d1, d2 = cfg["train_dd1"][family], cfg["train_dd2"][family]
        torch.manual_seed(seed)
        tok = fam.build_tokenizer(tcfg)
        teacher = fam.build_teacher(mcfg, tok, nc, side).eval()
        tok.eval()
        tokens = fam.encode(tok, images[:256])
        codebook = fam.codebook(tok).float()
        ends = trajectories.step_ends(teacher)

        def tok_step(precision, fam=fam, tcfg=tcfg):
            torch.manual_seed(seed)
            return _step(fam.build_tokenizer(tcfg), fam.tokenizer_loss,
                         lambda: {"images": images[:tcfg.batch_size]}, precision)
        out.append((f"{family} tokenizer step", "train_tokenizer", tcfg.n_steps, tok_step))

        def encode(precision, fam=fam, tok=tok):
            def call():
                with train.autocast(torch.device("cpu"), precision):
                    fam.encode(tok, images[:500])
            return call
        n_images = (cfg["prepare"].max_train or 60000) + (cfg["prepare"].max_test or 10000)  # Fashion-MNIST's
        out.append((f"{family} tokenising 500 images", "train_tokenizer", n_images // 500, encode))

        def teacher_step(precision, fam=fam, tok=tok, mcfg=mcfg, tokens=tokens):
            torch.manual_seed(seed)
            model = fam.build_teacher(mcfg, tok, nc, side)
            n = min(mcfg.batch_size, len(tokens))
            return _step(model, fam.teacher_loss_fn(tok),
                         lambda: {"tokens": tokens[:n], "labels": labels[:n]}, precision)
        out.append((f"{family} teacher step", "train_teacher", mcfg.n_steps, teacher_step))

        def sample(precision, fam=fam, tok=tok, teacher=teacher, sampling=sampling):
            def call():
                with train.autocast(torch.device("cpu"), precision):
                    fam.sample(tok, teacher, labels[:250], sampling, torch.Generator().manual_seed(seed), 250)
            return call
        out.append((f"{family} teacher sampling, 250", "sample_teacher + evaluate",
                    (sampling.n_samples + ev.n_eval * 4 + d2.n_gts_samples) // 250, sample))

        shard_size = 125

        def pairs(precision, fam=fam, tok=tok, teacher=teacher, sampling=sampling, bt=bt):
            def call():
                with train.autocast(torch.device("cpu"), precision):
                    trajectories.build_shard(fam, tok, teacher, sampling, 0, shard_size, nc, seed, bt.flow_steps,
                                             shard_size)
            return call
        out.append((f"{family} pair building, {shard_size}", "build_trajectories", bt.n_pairs // shard_size, pairs))
        shard = trajectories.build_shard(fam, tok, teacher, sampling, 0, d1.batch_size, nc, seed, 2, d1.batch_size)

        def dd1_step(precision, teacher=teacher, codebook=codebook, ends=ends, d1=d1, shard=shard):
            torch.manual_seed(seed)
            model = dd1.DD1Model.from_teacher(teacher, codebook.shape[1])
            return _step(model, dd1.loss_fn(codebook, ends, t_set=d1.t_train, split=d1.split, cont_loss=d1.cont_loss),
                         lambda: shard, precision)
        out.append((f"{family} DD1 step", "train_dd1", d1.n_steps, dd1_step))

        student = dd1.DD1Model.from_teacher(teacher, codebook.shape[1]).eval()

        def dd1_sample(precision, student=student, codebook=codebook, ends=ends, tok=tok):
            noise = torch.randn(250, ends[-1], codebook.shape[1], generator=torch.Generator().manual_seed(seed))

            def call():
                with torch.no_grad(), train.autocast(torch.device("cpu"), precision):
                    dd1.decode(tok, dd1.sample(student, noise, labels[:250], codebook, ends)[1])
            return call
        out.append((f"{family} DD1 1-step sampling + decoding, 250", "train_dd1 + evaluate",
                    (d1.n_eval + 2 * ev.n_eval) // 250, dd1_sample))

        phi = ardiff.ContinuousGPT.from_teacher(teacher, codebook.shape[1]).eval().requires_grad_(False) \
            if family == "llamagen" else teacher.requires_grad_(False)
        gen0 = ardiff.ARDiffusion.from_teacher(phi, d2.head_width, d2.head_depth)

        def gts_step(precision, phi=phi, gen0=gen0, tok=tok, codebook=codebook, sampling=sampling, d2=d2,
                     shard=shard):
            n = d2.gts_batch
            return _step(copy.deepcopy(gen0), ardiff.gts_loss(phi, tok, codebook, sampling, d2.n_noise),
                         lambda: {k: v[:n] for k, v in shard.items()}, precision)
        out.append((f"{family} GTS step", "train_dd2", d2.gts_head_steps + d2.gts_full_steps, gts_step))

        def dd2_step(precision, phi=phi, gen0=gen0, tok=tok, codebook=codebook, sampling=sampling, d2=d2):
            import tempfile

            def call():
                with tempfile.TemporaryDirectory() as tmp:
                    dcfg = dd2.DistillConfig.from_section(d2, seed=seed, precision=precision, n_steps=1,
                                                          align_steps=0, warmup_steps=1, ckpt_every=10 ** 9,
                                                          log_every=10 ** 9)
                    dd2.distill(copy.deepcopy(gen0), copy.deepcopy(gen0), phi, tok, codebook, sampling, nc, dcfg,
                                Path(tmp) / "dd2.pt", "cpu", desc="dd2 step")
            return call
        out.append((f"{family} DD2 generator step (K = {d2.k_guide})", "train_dd2", d2.n_steps, dd2_step))
    return out


def measure(cfg: dict, families=("llamagen", "var"), precisions=("fp32", "bf16"), repeats: int = 5,
            only: str | None = None) -> dict:
    """Every unit of `units(cfg)` in each precision → {"device", "peak_gflops", "rows": [...]}."""
    peak = {p: round(matmul_peak(p), 1) for p in precisions}
    rows = []
    for name, stage, calls, make in io.progress(units(cfg, families), desc="units"):
        if only and only.lower() not in name.lower():
            continue
        for precision in precisions:
            call = make(precision)
            timing = bench.time_call(call, "cpu", warmup=1, repeats=repeats)
            seconds = timing["median_s"]
            shares, wall = _shares(call)
            flops = _flops(call)
            overhead = max(0.0, wall - sum(shares.values()))
            rows.append({"unit": name, "stage": stage, "precision": precision, "seconds": round(seconds, 4),
                         "min_seconds": round(timing["min_s"], 4),
                         "calls": calls, "stage_minutes": round(seconds * calls / 60, 2),
                         "gflop": round(flops / 1e9, 3), "gflops_per_s": round(flops / 1e9 / seconds, 1),
                         "share_of_peak": round(flops / 1e9 / seconds / peak[precision], 3),
                         "shares": {g: round(s / wall, 3) for g, s in {**shares, "python": overhead}.items()}})
            print(f"{name:45s} {precision}  {seconds:8.3f} s  {rows[-1]['gflops_per_s']:7.1f} GFLOP/s  "
                  + " ".join(f"{g} {v:.0%}" for g, v in rows[-1]["shares"].items()), flush=True)
    return {"device": bench.device_name("cpu"), "peak_gflops": peak, "rows": rows}


def plot(result: dict, path: Path) -> None:
    """Per unit and precision: stacked seconds by group (a reader compares the bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows = [{"unit": f"{r['unit']} [{r['precision']}]", "group": g, "seconds": r["seconds"] * share}
            for r in result["rows"] for g, share in r["shares"].items()]
    df = pd.DataFrame(rows).pivot_table(index="unit", columns="group", values="seconds", aggfunc="sum", sort=False)
    sns.set_theme(style="whitegrid")
    ax = df.plot.barh(stacked=True, figsize=(10, 0.32 * len(df) + 1.5), width=0.8,
                      color=sns.color_palette("tab10", len(df.columns)))
    ax.invert_yaxis()
    ax.set(xlabel="seconds per call (share of wall time by operator group)", ylabel="",
           title=f"Unit costs of the embedded default, fp32 against bf16 autocast\n{result['device']}")
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dd.cpu_profile", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="params file (default: the repository's params.yaml)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per unit and precision (median)")
    ap.add_argument("--unit", default=None, help="only the units whose name contains this text")
    ap.add_argument("--precision", action="append", choices=("fp32", "bf16"))
    ap.add_argument("--out", default="reports/benchmarks/cpu_profile.json")
    a = ap.parse_args(argv)
    cfg = P.validate(P.read_yaml(a.params or P.repository_params()))
    result = measure(cfg, tuple(cfg["pipeline"].families), tuple(a.precision or ("fp32", "bf16")), a.repeats, a.unit)
    result["command"] = " ".join(["python -m dd.cpu_profile", *(argv if argv is not None else sys.argv[1:])])
    out = io.path(a.out)
    io.write_json(out, result)
    plot(result, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
