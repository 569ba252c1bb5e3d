"""Latency and throughput measurement: warm-up, median of repeats, device synchronisation (CUDA events on GPU).

Run alone on the pipeline's trained models (after `dvc repro`), the same figures as the evaluation stage:

    python -m dd.bench --family llamagen --method dd1 --steps 1
    python -m dd.bench --family var --method teacher --batch 64 --repeats 3
    python -m dd.bench --family llamagen --method skip --steps 48      # the teacher's first 48 AR steps
    python -m dd.bench --family llamagen --method sjd --window 16      # speculative Jacobi decoding of the teacher

References:
    PyTorch `torch.utils.benchmark` (warm-up, median, synchronisation); DD1 paper §5 (latency at batch 1 and
    throughput at large batch are reported separately).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch


def device_name(device: torch.device | str = "cpu") -> str:
    """What a figure was measured on: the GPU's name, or the CPU's model with the cores and threads torch used."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 1,
              repeats: int = 5) -> dict:
    """Median wall-clock seconds of `fn()` over `repeats` runs after `warmup` runs (all figures in seconds)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def latency_and_throughput(make: Callable[[int], Callable[[], object]], big_batch: int,
                           device: torch.device | str = "cpu", repeats: int = 5) -> dict:
    """`make(batch)` returns a zero-argument generation call for that batch size.

    Returns seconds per image at batch 1 (latency) and images per second at `big_batch` (throughput).
    """
    one = time_call(make(1), device, repeats=repeats)
    big = time_call(make(big_batch), device, repeats=max(1, repeats // 2))
    return {"latency_s": one["median_s"], "throughput_img_s": big_batch / big["median_s"], "big_batch": big_batch}


def teacher_speed(fam, tok, teacher, cfg, labels: torch.Tensor, big_batch: int, device, repeats: int = 5,
                  generator=None) -> dict:
    """Latency / throughput of a teacher family's sampling, for tokens alone and end to end with decoding."""
    def tokens(b):
        return lambda: fam.sample(tok, teacher, labels[:b], cfg, generator=generator, batch_size=b, device=device)

    def end_to_end(b):
        return lambda: fam.decode(tok, tokens(b)(), batch_size=b, device=device)

    return {"tokens": latency_and_throughput(tokens, big_batch, device, repeats),
            "end_to_end": latency_and_throughput(end_to_end, big_batch, device, repeats)}


def methods_speed(f, table: dict, big_batch: int, repeats: int = 5, seed: int = 0) -> dict:
    """Latency (seconds per image at batch 1) and throughput (images/s at big_batch) of every `dd.methods.Method` in
    table (name → method) of family f (`dd.methods.Family`), for token generation alone ("tokens") and end to end
    with decoding ("end_to_end"): {name: {"tokens": {...}, "end_to_end": {...}}} as `latency_and_throughput`, plus
    "latency_rounds_s" (every batch-1 round's seconds, for the spread).

    Two phases, each interleaved across methods. Batch 1 first: one warm-up call of every (method, part), then
    `repeats` rounds that time each of them once — the second of two back-to-back calls, so that the weights are in
    cache, as when one model serves one request after another — and the median. Then the large batch:
    max(1, repeats // 10) interleaved rounds, without a warm-up call (the batch-1 phase has already run every code
    path; these calls are compute-bound and slow, and a warm-up doubled the phase's cost). On a shared CPU the speed of
    the same call drifts by tens of percent over seconds: interleaving spreads every method's samples over the same
    window, so that ratios (speed-ups) are not biased by when a method happened to run, and keeping the large-batch
    calls out of the batch-1 rounds keeps their after-effects (thread pools, caches) out of the latencies."""
    from .dd1 import decode

    L, D = f.shape
    labels = (torch.arange(big_batch) % f.teacher.num_classes).to(f.device)
    noise = torch.randn(big_batch, L, D, generator=torch.Generator().manual_seed(seed)).to(f.device)

    def calls(b):
        out = {}
        for name, m in table.items():
            out[name, "tokens"] = lambda m=m: m.generate(labels[:b], noise[:b], seed)
            out[name, "end_to_end"] = lambda m=m: decode(f.tok, m.generate(labels[:b], noise[:b], seed)[1], m.normalize)
        return out

    def rounds(cs: dict, n: int, warm: int, prime: bool) -> dict:
        times = {k: [] for k in cs}
        for fn in cs.values() if prime else ():
            fn()
        for _ in range(n):
            for k, fn in cs.items():
                times[k].append(time_call(fn, f.device, warmup=warm, repeats=1)["median_s"])
        return times

    with torch.no_grad():
        one = rounds(calls(1), repeats, warm=1, prime=True)
        big = rounds(calls(big_batch), max(1, repeats // 10), warm=0, prime=False)
    return {name: {part: {"latency_s": statistics.median(one[name, part]),
                          "latency_rounds_s": one[name, part],
                          "throughput_img_s": big_batch / statistics.median(big[name, part]),
                          "big_batch": big_batch} for part in ("tokens", "end_to_end")} for name in table}


def paired_speedups(base: dict, other: dict) -> list[float]:
    """Per-round batch-1 speed-ups of `other` over `base`, two entries of `methods_speed` for the same part (e.g.
    `speed["teacher"]["tokens"]`, `speed[name]["tokens"]`): base's round r seconds / other's round r seconds."""
    return [b / o for b, o in zip(base["latency_rounds_s"], other["latency_rounds_s"])]


def _method_name(method: str, steps: int | None, n_ar: int, table) -> str | None:
    if method == "mixed":
        return next((k for k in table if k.startswith("dd1 mixed")), None)
    return {"teacher": "teacher", "onestep": "onestep*", "skip": f"skip-{n_ar - (steps or 0)}", "sjd": "sjd"}.get(
        method, f"{method} {steps or 1}-step")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dd.bench", description="Latency and throughput of one method "
                                 "on the pipeline's trained models (run `dvc repro` first).")
    ap.add_argument("--family", default="llamagen", choices=("llamagen", "var", "t2i"))
    ap.add_argument("--method", default="dd1", choices=("teacher", "sjd", "skip", "onestep", "dd1", "mixed",
                                                                "dd2"))
    ap.add_argument("--steps", type=int, default=None, help="dd1: 1 or 2; dd2: k; skip: AR steps kept")
    ap.add_argument("--window", type=int, default=None, help="sjd: draft tokens per pass (default: params.yaml's "
                    "evaluate.llamagen.sjd_window)")
    ap.add_argument("--init", default=None, choices=("random", "repeat"), help="sjd: new drafts' start (default: "
                    "params.yaml's)")
    ap.add_argument("--batch", type=int, default=256, help="batch size of the throughput measurement")
    ap.add_argument("--repeats", type=int, default=10, help="timed batch-1 rounds (median; the large batch: "
                    "repeats // 10, without a warm-up); one warm-up before the batch-1 rounds")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from . import io, methods, params

    dev = io.resolve_device(args.device)
    try:
        f = methods.load(args.family, device=dev, need_students=args.method in ("dd1", "mixed", "dd2"))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_ar = len(f.ends)
    if args.method == "skip" and args.steps is None:
        print("error: --method skip needs --steps (the AR steps the teacher keeps)", file=sys.stderr)
        return 2
    skips = [n_ar - args.steps] if args.method == "skip" else []
    multistep = [args.steps] if args.method == "dd2" and (args.steps or 1) > 1 else []
    try:
        sjd = {}
        if args.method == "sjd":
            ev = getattr(params.read_section("evaluate"), args.family, None)
            sjd = {"sjd_window": args.window if args.window is not None else getattr(ev, "sjd_window", 16),
                   "sjd_init": args.init or getattr(ev, "sjd_init", "random")}
        table = methods.build(f, skips=skips, multistep=multistep, **sjd)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = _method_name(args.method, args.steps, n_ar, table)
    if name not in table:
        print(f"error: no method {name!r} for {args.family}; available: {', '.join(table)}", file=sys.stderr)
        return 2
    m = table[name]
    both = methods_speed(f, {"teacher": table["teacher"], name: m}, args.batch, args.repeats, args.seed)
    speed, base = both[name], both["teacher"]
    print(f"{args.family} / {name}: {m.steps} sequential network evaluations, {m.n_params / 1e6:.2f}M parameters, "
          f"device {dev}" + (f"; {statistics.mean(m.passes):.1f} forward passes per image (mean of {len(m.passes)})"
                             if m.passes else ""))
    for part in ("tokens", "end_to_end"):
        s, b = speed[part], base[part]
        paired = paired_speedups(b, s)
        print(f"  {part:<10} latency {s['latency_s'] * 1e3:8.2f} ms/image (batch 1, median of {args.repeats}),"
              f" throughput {s['throughput_img_s']:8.1f} images/s (batch {args.batch}),"
              f" speed-up over the teacher {b['latency_s'] / s['latency_s']:.1f}× (batch 1; per round"
              f" {min(paired):.1f}–{max(paired):.1f}×),"
              f" {s['throughput_img_s'] / b['throughput_img_s']:.1f}× (batch {args.batch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
