"""The one training loop: AdamW, warm-up + cosine schedule, EMA, atomic checkpoints, exact resume, NaN guard.

`fit()` trains any `nn.Module` given a `loss_fn(model, batch) -> loss | (loss, {name: float})` and in-memory
tensors that share their first dimension. Batches are drawn from a per-epoch permutation seeded by
`(seed, epoch)`, and the checkpoint carries model, EMA, optimizer, step, history and RNG state, so a run killed at
any point and started again continues exactly where its last checkpoint left it.
The loop runs with deterministic kernels (`deterministic`): the same seed on the same device gives the same
weights from run to run (at the same thread count).

Under `torchrun` (`dd.dist.init()` first), every process runs the same call: each takes its share of the same global
batch (`batch_size` rows, split evenly by rank), gradients are averaged across processes before each optimizer
step, and rank 0 writes the checkpoints (with every rank's RNG state). The result equals the single-process run at
the same global batch up to floating-point summation order (for losses without randomness of their own).

References:
    karpathy/nanoGPT `train.py` (flat loop, warm-up + cosine, checkpoint with its config);
    facebookresearch/DiT `train.py` (EMA of the weights, evaluated instead of the raw weights).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import dist, io


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the message names the step and the last good checkpoint (kept on disk)."""


@dataclass
class FitConfig:
    n_steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1     # cosine decays to lr·min_lr_ratio
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0        # 0 = off
    ema_decay: float = 0.0        # 0 = no EMA
    ckpt_every: int = 100         # steps between checkpoints (and one at the end)
    log_every: int = 10
    seed: int = 0
    precision: str = "fp32"       # "bf16": the loss runs under bf16 autocast (weights, optimizer and EMA stay fp32)
    torch_compile: bool = False   # torch.compile the loss function (model calls included)


def lr_at(step: int, cfg: FitConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.n_steps - cfg.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Rows of step `step`: slices of a permutation of range(n) drawn anew each epoch from (seed, epoch)."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch_size: (i + 1) * batch_size]


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    # RNG states are CPU ByteTensors; a checkpoint loaded with map_location=cuda moved them onto the GPU
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


@contextlib.contextmanager
def deterministic(device: torch.device | str):
    """Deterministic kernels for the duration of a training loop, the previous setting restored after.

    On CPU, some backward kernels accumulate in a thread-dependent order with more than one thread (measured: the
    LlamaGen tokenizer's training drifted between two runs from the same seed after a few steps with 2 threads, and
    was identical with this on; about 2 % slower). On CUDA, cuBLAS needs a fixed workspace (CUBLAS_WORKSPACE_CONFIG,
    set here unless already set, which only takes effect if no cuBLAS handle exists yet), and an op without a
    deterministic kernel warns instead of stopping the run.
    """
    cuda = torch.device(device).type == "cuda"
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=cuda)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@torch.no_grad()
def inputs_digest(modules, data: dict[str, torch.Tensor] | None = None) -> str:
    """A checksum of what a run starts from: its networks' initial weights and its data.

    Part of every resume fingerprint, so a checkpoint left by a run that started from other weights or other data
    (an upstream stage re-ran: a new teacher, new pairs) is never resumed. Per weight tensor its float64 sum and
    absolute sum; per data tensor its shape, dtype and up to 1,024 evenly spaced rows (cheap at any scale).
    """
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            t = t.detach().double()
            h.update(f"{i}.{name}{tuple(t.shape)}{t.sum().item():.12e}{t.abs().sum().item():.12e}".encode())
    for k, v in sorted((data or {}).items()):
        rows = v[torch.linspace(0, len(v) - 1, min(len(v), 1024)).long()] if len(v) else v
        h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
        h.update(rows.detach().cpu().double().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def fit(model: nn.Module, loss_fn: Callable, data: dict[str, torch.Tensor], cfg: FitConfig,
        ckpt_path: str | Path, device: torch.device | str = "cpu", desc: str = "train",
        on_step: Callable | None = None) -> dict:
    """Train `model` in place; return {"history": [...], "ema": module | None, "resumed_from": step, "seconds": s}.

    seconds: wall time of the training, summed over every run that built the checkpoint (a resumed run adds the
    time its predecessors spent, so a stage that resumes a finished checkpoint still reports what the training cost).

    data: tensors `[N, ...]` sharing N; each step passes `{k: v[rows].to(device)}` to `loss_fn(model, batch)`.
    on_step(model, step): optional hook after each optimizer step (e.g. codebook restarts).
    """
    n = {len(v) for v in data.values()}
    if len(n) != 1:
        raise ValueError(f"fit: data tensors differ in length: { {k: len(v) for k, v in data.items()} }")
    n = n.pop()
    device = torch.device(device)
    ckpt_path = Path(ckpt_path)
    world, rank = dist.world(), dist.rank()
    if cfg.batch_size % world:
        raise ValueError(f"fit: batch_size {cfg.batch_size} does not split evenly across {world} processes")
    torch.manual_seed(cfg.seed + rank)  # (ranks draw different dropout masks)
    model.to(device).train()
    dist.broadcast_module(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    step, history, spent = 0, [], 0.0
    fingerprint = {"fit_config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
                   "model_config": getattr(model, "config", None), "n": n, "inputs": inputs_digest([model], data)}
    if world > 1:
        fingerprint["world"] = world
    ck = io.load_checkpoint(ckpt_path, map_location=device) if ckpt_path.is_file() else None
    if ck is not None and ck.get("fingerprint") != fingerprint:  # another run's state: never resume from it
        print(f"{ckpt_path}: written by a run with other settings, weights or data; starting afresh")
        ck = None
    if ck is not None:
        model.load_state_dict(ck["model"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        step, history, spent = ck["step"], ck["history"], ck.get("seconds", 0.0)
        _set_rng_state(ck["rng_ranks"][rank] if world > 1 else ck["rng"])
    resumed_from = step

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"fit: precision must be fp32 or bf16, got {cfg.precision!r}")
    compute = torch.compile(loss_fn) if cfg.torch_compile else loss_fn
    t_start = time.perf_counter()

    def save():
        rng = dist.gather(_rng_state())  # every rank takes part; rank 0 writes
        if dist.is_main():
            io.save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(), "step": step, "history": history, "rng": rng[0],
                "seconds": spent + time.perf_counter() - t_start,
                **({"rng_ranks": rng} if world > 1 else {}), "fingerprint": fingerprint})
        dist.barrier()

    with deterministic(device):
        bar = io.progress(total=cfg.n_steps, initial=step, desc=desc, disable=not dist.is_main())
        while step < cfg.n_steps:
            rows = batch_indices(n, cfg.batch_size, step, cfg.seed)[rank::world]  # this rank's share
            batch = {k: v[rows].to(device, non_blocking=True) for k, v in data.items()}
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                out = compute(model, batch)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            if not (torch.isfinite(loss) if world == 1 else dist.mean(torch.isfinite(loss).float()) == 1):
                last = f"{ckpt_path} (step {torch.load(ckpt_path, weights_only=True)['step']})" \
                    if ckpt_path.is_file() else "none written yet"
                raise TrainingDiverged(f"{desc}: loss is {loss.item()} at step {step}; last good checkpoint: {last}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(params)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema_update(ema, model, cfg.ema_decay)
            step += 1
            if on_step is not None:
                on_step(model, step)
            if step % cfg.log_every == 0 or step == cfg.n_steps:
                keys = list(logs)
                vals = dist.mean(torch.tensor([loss.item(), *(float(logs[k]) for k in keys)], dtype=torch.float64))
                history.append({"step": step, "loss": vals[0].item(), "lr": lr,
                                **{k: v.item() for k, v in zip(keys, vals[1:])}})
                bar.set_postfix(loss=f"{vals[0].item():.4f}")
            if step % cfg.ckpt_every == 0 or step == cfg.n_steps:
                save()
            bar.update(1)
        bar.close()
    model.eval()
    return {"history": history, "ema": ema, "resumed_from": resumed_from,
            "seconds": spent + time.perf_counter() - t_start}
