"""Data parallelism across processes: `torchrun` (or any launcher that sets RANK / WORLD_SIZE) runs the same code
on every process; one process is the ordinary single-process case.

    torchrun --nproc_per_node 2 script.py             # one machine (NCCL on GPUs, gloo on CPU)
    torchrun --nnodes 2 --node_rank 0 --rdzv_endpoint host:29500 --nproc_per_node 8 script.py

`init()` joins the process group the launcher describes (no-op without one). `train.fit` splits each global batch
across ranks and averages the gradients with one all-reduce per step (the DistributedDataParallel rule, done by
hand because the training losses call model methods other than `forward`, which DDP's hooks do not see).

References:
    PyTorch `torch.distributed` (init_process_group, all_reduce) and `torch.distributed.run` (torchrun's
    environment: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device | str) -> torch.device:
    """CUDA: this process's GPU (LOCAL_RANK); CPU as given."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init(device: torch.device | str = "cpu") -> bool:
    """Join the process group described by torchrun's environment (NCCL for CUDA, gloo otherwise). Returns True
    when running distributed. Without WORLD_SIZE > 1 in the environment: nothing to do, False."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return world() > 1
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace every parameter's gradient by its mean over the ranks (a missing gradient counts as zero)."""
    if world() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (a copy; the same tensor's values on one process)."""
    if world() == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out / world()


def gather(obj) -> list:
    """Every rank's picklable object, in rank order, on every rank ([obj] on one process)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_module(model: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP does when it wraps a model)."""
    if world() == 1:
        return
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, 0)
