"""Latency and throughput measurement: warm-up, median of repeats, device synchronisation (CUDA events on GPU).

References:
    PyTorch `torch.utils.benchmark` (warm-up, median, synchronisation); DD1 paper §5 (latency at batch 1 and
    throughput at large batch are reported separately).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


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
