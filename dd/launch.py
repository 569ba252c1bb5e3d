"""Run one training call on N local processes under `torchrun` and hand its results back to the caller.

The notebooks build their models, losses and data as usual and then train through

    result = launch.call(nproc, train.fit, model, loss_fn, data, fit_cfg, ckpt_path=..., device=dev)

With nproc = 1 this is the plain call. With nproc > 1 the call is pickled to `<ckpt_path stem>.job.pt` beside the
checkpoint, `torchrun --standalone --nproc_per_node N -m dd.launch <job>` runs it on every process (`dd.dist`:
gloo on CPU, NCCL with one GPU per process), and rank 0 pickles back its return value and its copies of the
arguments: the caller's modules receive the trained weights (and train / eval modes), other `dd` objects passed
in (e.g. a `dd.probe.Probe`) their state. The training functions (`train.fit`, `dd2.distill`,
`ardiff.adapt_continuous_input`, `trajectories.build`) split each global batch across the processes themselves.

The stages launch on one machine; across machines, scripts call the training functions under torchrun's
rendezvous themselves (README "GPU profile and multiple processes").

References:
    PyTorch `torch.distributed.run` (torchrun: --standalone, --nproc_per_node, RANK / LOCAL_RANK / WORLD_SIZE).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from io import TextIOWrapper
from pathlib import Path

import torch
from torch import nn

from . import dist, io


def call(nproc: int, fn, *args, job_dir: str | Path | None = None, **kwargs):
    """fn(*args, **kwargs) on `nproc` processes (1: in this process); → rank 0's return value.

    job_dir: where the pickled call and its result go (default: beside kwargs["ckpt_path"]); they are removed after
    a successful run and kept for inspection after a failed one."""
    if nproc < 1:
        raise ValueError(f"launch.call: nproc must be >= 1, got {nproc}")
    if nproc == 1:
        return fn(*args, **kwargs)
    ckpt = kwargs.get("ckpt_path")
    folder = Path(job_dir if job_dir is not None else Path(ckpt).parent if ckpt else ".")
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(ckpt).stem if ckpt else getattr(fn, "__name__", "job")
    job, out = folder / f"{name}.job.pt", folder / f"{name}.result.pt"
    out.unlink(missing_ok=True)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    _save(job, {"fn": fn, "args": args, "kwargs": kwargs, "rng": rng})  # the workers start from this RNG state
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dd.launch", str(job), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, _cores() // nproc)))}
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        to_terminal = os.environ.get(io.PROGRESS_ENV) == "terminal" and sys.__stderr__ is not None
        # the workers' output where the caller's goes, progress bars as io.progress sends them. newline="" splits
        # at "\r" and keeps it (text=True would turn every "\r" into "\n" and the bars into plain lines)
        after_redraw = False
        for line in TextIOWrapper(proc.stdout, errors="replace", newline=""):
            is_bar = line.endswith("\r") or after_redraw  # a bar's redraw, or the line that closes the bar
            print(line, end="", flush=True, file=sys.__stderr__ if to_terminal and is_bar else sys.stdout)
            after_redraw = line.endswith("\r")
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"launch.call: {getattr(fn, '__name__', fn)} on {nproc} processes failed (exit "
                           f"{proc.returncode}; the workers' messages are above); the call is kept in {job}, "
                           f"checkpoints in {folder}: re-running resumes from them")
    back = torch.load(out, map_location=_on(kwargs.get("device", "cpu")), weights_only=False)
    _copy_back(args, back["args"])
    _copy_back(kwargs, back["kwargs"])
    job.unlink()
    out.unlink()
    return back["result"]


def _save(dest: Path, obj) -> None:
    with io.atomic_path(dest) as tmp:  # pickled code and objects: read back only by this module
        torch.save(obj, tmp)


def _on(device):
    """torch.load map_location: CUDA tensors onto `device` (the caller's or this rank's GPU), CPU ones stay."""
    device = torch.device(device)
    return lambda storage, location: storage.to(device) if location.startswith("cuda") else storage


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _copy_back(mine, theirs) -> None:
    """Give the caller's objects rank 0's state: modules their weights and modes, containers recursively, other
    objects of this package their attributes. Tensors and plain values are left as they were."""
    if isinstance(mine, nn.Module):
        device = next(iter(mine.state_dict().values()), torch.empty(0)).device
        mine.load_state_dict({k: v.to(device) for k, v in theirs.state_dict().items()})
        for a, b in zip(mine.modules(), theirs.modules()):
            a.training = b.training
    elif isinstance(mine, (list, tuple)):
        for a, b in zip(mine, theirs):
            _copy_back(a, b)
    elif isinstance(mine, dict):
        for k in mine:
            _copy_back(mine[k], theirs[k])
    elif type(mine).__module__.startswith("dd.") and hasattr(mine, "__dict__"):
        mine.__dict__.update(theirs.__dict__)


def _worker(job_path: str, out_path: str) -> None:
    """One torchrun process: join the group, run the pickled call, rank 0 writes the result."""
    device = dist.local_device("cuda" if torch.cuda.is_available() else "cpu")
    job = torch.load(job_path, map_location=_on(device), weights_only=False)
    kwargs = job["kwargs"]
    if "device" in kwargs:
        kwargs["device"] = dist.local_device(kwargs["device"])
    dist.init(kwargs.get("device", "cpu"))
    torch.set_rng_state(job["rng"]["cpu"])
    if job["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(job["rng"]["cuda"], device)
    result = job["fn"](*job["args"], **kwargs)
    dist.barrier()
    if dist.is_main():
        _save(Path(out_path), {"args": job["args"], "kwargs": kwargs, "result": result})
    dist.barrier()
    if dist.world() > 1:
        torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dd.launch", description=(
        "Worker side of dd.launch.call (started by it under torchrun): run a pickled training call on this process."))
    p.add_argument("job", help="the pickled call (written by launch.call)")
    p.add_argument("out", help="where rank 0 writes the result")
    a = p.parse_args(argv)
    _worker(a.job, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
