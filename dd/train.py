"""The one training loop: AdamW, warm-up + cosine schedule, EMA, atomic checkpoints, exact resume, NaN guard.

`fit()` trains any `nn.Module` given a `loss_fn(model, batch) -> loss | (loss, {name: float})` and in-memory
tensors that share their first dimension. Batches are drawn from a per-epoch permutation seeded by
`(seed, epoch)`, and the checkpoint carries model, EMA, optimizer, step, history and RNG state, so a run killed at
any point and started again continues exactly where its last checkpoint left it.
The loop runs with deterministic kernels (`deterministic`): the same seed on the same device gives the same
weights from run to run (at the same thread count).

`Run` is that machinery on its own (fingerprint, resume, NaN guard, timing, progress bar, atomic checkpoint), so a
loop with another shape (`dd.dd2.distill`: two networks, two optimizers) resumes, times and stops the same way:

    run = Run(ckpt_path, n_steps, fingerprint(cfg, [model], data), {"model": model, "optimizer": opt})
    run.resume()                      # the checkpoint's state, step, history and RNG, if it is this run's
    with run.loop():                  # deterministic kernels, the progress bar
        while run.step < n_steps:
            loss = ...
            run.check_finite(loss)    # TrainingDiverged naming the step and the last good checkpoint
            step_optimizer(opt, loss, params, grad_clip)
            run.step += 1
            if run.due(ckpt_every):
                run.save()
            run.bar.update(1)

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
import dataclasses
import functools
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import dist, io


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the message names the step and the last good checkpoint (kept on disk)."""


def of_section(cls, section, **overrides):
    """`cls` (a config dataclass) from the fields of a params section (`dd.params`) that share its field names,
    then `overrides` (values that live in another section, such as base.seed or runtime.precision)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in names}
    return cls(**{**values, **overrides})


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
    precision: str = "fp32"       # "bf16" (or "auto" resolving to it): the loss runs under bf16 autocast (weights,
                                  # optimizer and EMA stay fp32)
    torch_compile: bool = False   # torch.compile the loss function (model calls included)

    @classmethod
    def from_section(cls, section, **overrides) -> "FitConfig":
        """From a params section's n_steps, batch_size, lr, weight_decay, warmup_steps, ema_decay (those it has;
        `of_section`) and the overrides: `FitConfig.from_section(cfg, seed=seed, precision=rt.precision)`."""
        return of_section(cls, section, **overrides)


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


PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> tuple[str, ...]:
    """The CPU's feature flags from /proc/cpuinfo (none where it cannot be read); read once per process."""
    try:
        with open("/proc/cpuinfo") as f:
            return tuple(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return ()


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` does bf16 arithmetic natively: a CUDA GPU that supports it, or a CPU whose flags include
    avx512_bf16 or amx_bf16 (elsewhere bf16 is emulated and slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(f in _cpu_flags() for f in BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """runtime.precision on `device`: "auto" → "bf16" where `native_bf16`, else "fp32"; fp32 / bf16 as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast where `precision` resolves to "bf16" on `device` (weights and optimizer state stay fp32), a
    no-op for "fp32"."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=resolve_precision(precision, device) == "bf16")


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


def fingerprint(cfg, modules: list[nn.Module], data: dict[str, torch.Tensor] | None = None, probe=None,
                **more) -> dict:
    """What a checkpoint must match to be resumed: the run's settings (a config dataclass), the config of the
    network it trains (modules[0]), the digest of every network's initial weights and of the data, the probe's
    `key` when it has one (`dd.probe.Probe`: its labels and noise; its rows come back with the checkpoint), and
    `more`."""
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    return {"config": settings, "model_config": copy.deepcopy(getattr(modules[0], "config", None)),
            "inputs": inputs_digest(modules, data), **({"probe": probe.key} if hasattr(probe, "key") else {}),
            **more}


class Run:
    """The bookkeeping of one resumable training run, shared by every loop in `dd` (see the module docstring).

    ckpt_path: the checkpoint (written atomically by rank 0); n_steps: the run's length (`due` is true at the last
    step); fingerprint: what a checkpoint must match to be resumed (`fingerprint`); objects: {name: module or
    optimizer} saved by state_dict (None: absent from this run); values: {name: plain value} saved and restored
    as they are (counters, records), read and changed through `run.values`; unit: how messages name a step.
    `step` and `history` (the logged rows) are the loop's to advance and extend; `seconds()` is the training's
    wall time, summed over every run that built the checkpoint, without the time spent in `untimed()` blocks.
    """

    def __init__(self, ckpt_path: str | Path, n_steps: int, fingerprint: dict, objects: dict,
                 values: dict | None = None, desc: str = "train", device: torch.device | str = "cpu",
                 unit: str = "step"):
        self.path, self.n_steps, self.fingerprint = Path(ckpt_path), n_steps, fingerprint
        self.objects, self.values = objects, dict(values or {})
        self.desc, self.device, self.unit = desc, torch.device(device), unit
        self.step, self.history, self.resumed_from, self.bar = 0, [], 0, None
        self._spent, self._start, self._untimed = 0.0, time.perf_counter(), 0.0

    def resume(self) -> bool:
        """Load the checkpoint if it is this run's (same fingerprint) and start the clock; → whether it did."""
        ck = io.load_checkpoint(self.path, map_location=self.device) if self.path.is_file() else None
        if ck is not None and ck.get("fingerprint") != self.fingerprint:  # another run's state: never resume it
            print(f"{self.path}: written by a run with other settings, weights or data; starting afresh")
            ck = None
        if ck is not None:
            for name, obj in self.objects.items():
                if obj is not None:
                    obj.load_state_dict(ck[name])
            self.values.update({k: ck[k] for k in self.values})
            self.step, self.history, self._spent = ck["step"], ck["history"], ck["seconds"]
            ranks = ck.get("rng_ranks")  # every rank's own state, when the run had as many processes as this one
            _set_rng_state(ranks[dist.rank()] if ranks and len(ranks) == dist.world() else ck["rng"])
        self.resumed_from = self.step
        self._start = time.perf_counter()
        return ck is not None

    def seconds(self) -> float:
        return self._spent + time.perf_counter() - self._start - self._untimed

    @contextlib.contextmanager
    def untimed(self):
        """A block whose wall time `seconds()` leaves out (reporting inside the loop, not training)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._untimed += time.perf_counter() - t0

    def record(self, probe: Callable, weights: nn.Module) -> None:
        """probe(step, weights), untimed; a row it returns goes to values["records"] with the training seconds so
        far ("train_seconds", the clock before the probe ran)."""
        seconds = self.seconds()
        with self.untimed():
            row = probe(self.step, weights)
        if row is not None:
            self.values.setdefault("records", []).append({**row, "train_seconds": seconds})

    def save(self) -> None:
        """The checkpoint of the current step; every rank takes part (RNG states gathered), rank 0 writes."""
        rng = dist.gather(_rng_state())
        if dist.is_main():
            io.save_checkpoint(self.path, {
                **{k: o.state_dict() if o is not None else None for k, o in self.objects.items()}, **self.values,
                "step": self.step, "history": self.history, "seconds": self.seconds(), "rng": rng[0],
                **({"rng_ranks": rng} if len(rng) > 1 else {}), "fingerprint": self.fingerprint})
        dist.barrier()

    def due(self, every: int) -> bool:
        """Whether the current step ends a period of `every` steps (or the run)."""
        return self.step % every == 0 or self.step == self.n_steps

    @contextlib.contextmanager
    def loop(self):
        """The loop's context: deterministic kernels and the progress bar `run.bar` (on rank 0)."""
        with deterministic(self.device):
            self.bar = io.progress(total=self.n_steps, initial=self.step, desc=self.desc, disable=not dist.is_main())
            try:
                yield self
            finally:
                self.bar.close()

    def log(self, row: dict, *shown: str) -> None:
        """Append a history row; the values named in `shown` go onto the progress bar."""
        self.history.append(row)
        self.bar.set_postfix({k: f"{row[k]:.4f}" for k in shown})

    def check_finite(self, loss: torch.Tensor, what: str = "loss") -> None:
        """Raise `TrainingDiverged` (naming the step and the last good checkpoint) unless loss is finite on
        every rank."""
        finite = torch.isfinite(loss) if dist.world() == 1 else dist.mean(torch.isfinite(loss).float()) == 1
        if not finite:
            last = f"{self.path} (step {io.load_checkpoint(self.path)['step']})" if self.path.is_file() \
                else "none written yet"
            raise TrainingDiverged(f"{self.desc}: {what} is {loss.item()} at {self.unit} {self.step}; "
                                   f"last good checkpoint: {last}")


def mean_over_ranks(values: dict) -> dict:
    """{name: float} averaged over the processes (float64; the values themselves on one process)."""
    if dist.world() == 1:
        return {k: float(v) for k, v in values.items()}
    means = dist.mean(torch.tensor([float(v) for v in values.values()], dtype=torch.float64)).tolist()
    return dict(zip(values, means))


def step_optimizer(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[nn.Parameter], grad_clip: float,
                   zero_non_finite: bool = False) -> None:
    """One update of `params` from `loss`: backward, (non-finite gradient entries set to 0), gradients averaged
    over the processes, their norm clipped to grad_clip (0: off), the optimizer's step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if zero_non_finite:
        for p in params:
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    dist.average_gradients(params)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def fit(model: nn.Module, loss_fn: Callable, data: dict[str, torch.Tensor], cfg: FitConfig,
        ckpt_path: str | Path, device: torch.device | str = "cpu", desc: str = "train",
        on_step: Callable | None = None, probe: Callable | None = None) -> dict:
    """Train `model` in place; return {"history": [...], "ema": module | None, "resumed_from": step, "seconds": s,
    "records": [...]}.

    seconds: wall time of the training, summed over every run that built the checkpoint (a resumed run adds the
    time its predecessors spent, so a stage that resumes a finished checkpoint still reports what the training cost).

    data: tensors `[N, ...]` sharing N; each step passes `{k: v[rows].to(device)}` to `loss_fn(model, batch)`.
    on_step(model, step): optional hook after each optimizer step (e.g. codebook restarts); part of the training.
    probe(step, weights): optional reporting after each step on rank 0, given the evaluated weights (the EMA, or the
    model without one); not timed and must not draw from the global RNG. What it returns other than None is kept,
    with the training seconds up to that step as "train_seconds", in the checkpoint and in "records", so a resumed
    run's curve is whole.
    """
    n = {len(v) for v in data.values()}
    if len(n) != 1:
        raise ValueError(f"fit: data tensors differ in length: { {k: len(v) for k, v in data.items()} }")
    n, device, world, rank = n.pop(), torch.device(device), dist.world(), dist.rank()
    if cfg.batch_size % world:
        raise ValueError(f"fit: batch_size {cfg.batch_size} does not split evenly across {world} processes")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"fit: precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    torch.manual_seed(cfg.seed + rank)  # (ranks draw different dropout masks)
    model.to(device).train()
    dist.broadcast_module(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas)
    world_key = {"world": world} if world > 1 else {}
    run = Run(ckpt_path, cfg.n_steps, fingerprint(cfg, [model], data, probe, n=n, **world_key),
              {"model": model, "ema": ema, "optimizer": opt}, {"records": []}, desc=desc, device=device)
    run.resume()
    compute = torch.compile(loss_fn) if cfg.torch_compile else loss_fn
    with run.loop():
        while run.step < cfg.n_steps:
            rows = batch_indices(n, cfg.batch_size, run.step, cfg.seed)[rank::world]  # this rank's share
            batch = {k: v[rows].to(device, non_blocking=True) for k, v in data.items()}
            lr = lr_at(run.step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast(device, cfg.precision):
                out = compute(model, batch)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            run.check_finite(loss)
            step_optimizer(opt, loss, params, cfg.grad_clip)
            if ema is not None:
                ema_update(ema, model, cfg.ema_decay)
            run.step += 1
            if on_step is not None:
                on_step(model, run.step)
            if probe is not None and dist.is_main():  # before the checkpoint, which keeps what it returns
                run.record(probe, ema if ema is not None else model)
            if run.due(cfg.log_every):
                means = mean_over_ranks({"loss": loss.item(), **logs})
                run.log({"step": run.step, "loss": means.pop("loss"), "lr": lr, **means}, "loss")
            if run.due(cfg.ckpt_every):
                run.save()
            run.bar.update(1)
    model.eval()
    return {"history": run.history, "ema": ema, "resumed_from": run.resumed_from, "seconds": run.seconds(),
            "records": run.values["records"]}
