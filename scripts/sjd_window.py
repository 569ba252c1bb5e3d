"""SJD's window and draft start on the pipeline's LlamaGen teacher: forward passes per image and batch-1 latency.

    python scripts/sjd_window.py            # after `dvc repro` (reads data/); writes reports/benchmarks/sjd_window.json

For each window in WINDOWS and each start (random / repeat): the mean passes per image over N_PASSES samples (the
labels of the teacher samples), and the median batch-1 token latency over ROUNDS rounds interleaved with the
teacher's own sampler, so that the ratio is not biased by when a setting ran (dd.bench's practice).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dd import bench, io, methods, sjd  # noqa: E402

WINDOWS, INITS, N_PASSES, ROUNDS, SEED = (4, 8, 16, 32), sjd.INITS, 500, 15, 0


def main() -> None:
    torch.manual_seed(SEED)
    f = methods.load("llamagen", need_students=False)
    c = f.sampling
    samples, _ = io.read_checked(io.path(methods.DIRS["samples"], "llamagen"), "samples.safetensors")
    labels = samples["labels"][:N_PASSES]
    opts = dict(cfg_scale=c.cfg_scale, cfg_interval=c.cfg_interval, temperature=c.temperature, top_k=c.top_k,
                top_p=c.top_p)
    settings = [(w, i) for w in WINDOWS for i in INITS]
    passes = {}
    for w, init in settings:
        g = torch.Generator().manual_seed(SEED)
        n = torch.cat([sjd.generate(f.teacher, labels[k:k + 250], **opts, window=w, init=init, generator=g)[1]
                       for k in range(0, len(labels), 250)])
        passes[(w, init)] = n.float().mean().item()

    def teacher_one(y, g):
        return f.teacher.generate(y, c.cfg_scale, c.cfg_interval, c.temperature, c.top_k, c.top_p, generator=g)

    calls = {"teacher": teacher_one}
    for w, init in settings:
        calls[(w, init)] = (lambda w, init: lambda y, g: sjd.generate(f.teacher, y, **opts, window=w, init=init,
                                                                      generator=g))(w, init)
    times = {k: [] for k in calls}
    for r in range(ROUNDS + 1):  # round 0: warm-up
        y = labels[r:r + 1]
        for k, fn in calls.items():
            g = torch.Generator().manual_seed(SEED + r)
            t0 = time.perf_counter()
            fn(y, g)
            if r:
                times[k].append(time.perf_counter() - t0)
    teacher_ms = statistics.median(times["teacher"]) * 1e3
    rows = [{"window": w, "init": init, "passes": passes[(w, init)], "tokens": f.shape[0],
             "latency_ms": statistics.median(times[(w, init)]) * 1e3,
             "speedup": teacher_ms / (statistics.median(times[(w, init)]) * 1e3)} for w, init in settings]
    out = {"device": bench.device_name("cpu"), "torch": torch.__version__, "n_passes": N_PASSES, "rounds": ROUNDS,
           "sampling": {k: getattr(c, k) for k in ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")},
           "teacher_latency_ms": teacher_ms, "rows": rows}
    io.write_json(io.path("reports/benchmarks/sjd_window.json"), out)
    print(f"teacher {teacher_ms:.1f} ms per image at batch 1 ({f.shape[0]} passes)")
    for row in rows:
        print(f"window {row['window']:>2} {row['init']:<6} {row['passes']:5.1f} passes  {row['latency_ms']:6.1f} ms  "
              f"{row['speedup']:.2f}×")


if __name__ == "__main__":
    main()
