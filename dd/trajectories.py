"""Trajectory construction (DD1 §2): the teacher's AR loop with the flow map in place of sampling.

For a label y and a noise sequence E = (eps_1 .. eps_L), eps_i ~ N(0, I_D), the teacher runs its ordinary AR loop
(KV cache, CFG, top-k / top-p as configured) but every position's token is q_i = flow_map(eps_i, log p_i), the
deterministic ODE map from Gaussian noise to the teacher's distribution over codebook vectors (`dd.flow`).
LlamaGen: one position per step; VAR: the pn² positions of a scale in one step, each with its own noise and its own
distribution. The map (y, E) → q is deterministic, and because the flow preserves marginals, q is distributed
exactly as an ordinary teacher sample. Only (label, noise, tokens) are stored: the trajectory point after t steps is
the first positions' code vectors followed by the original noise (`perturb`).

Pairs are written in shards (`pairs_00000.safetensors`, ...) that are each built from their own seeded generator,
so a shard is the same whichever process builds it: the build resumes shard by shard, and `rank`/`world`
split the shards across processes.

References:
    Liu et al., "Distilled Decoding 1" (DD1), arXiv 2412.17153, §3 (noise → data pairs by AR flow matching);
    microsoft/distilled_decoding `LlamaGen/autoregressive/sample/eval_fewstep.py` (`perturb_data`: re-noising with
    the original noise).
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import dist, flow, io, train

SHARD = "pairs_{:05d}.safetensors"


def step_ends(teacher) -> list[int]:
    """Positions generated after each AR step: LlamaGen [1, 2, .., grid²]; VAR cumulative pn² per scale."""
    if hasattr(teacher, "patch_nums"):
        return np.cumsum([p * p for p in teacher.patch_nums]).tolist()
    return list(range(1, teacher.grid_size ** 2 + 1))


def perturb(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """Trajectory point X^t [B, L, D]: the first ends[t-1] positions from `data`, the rest the original `noise`.

    t: LongTensor [B], the number of AR steps already taken (0 = pure noise).
    """
    bounds = torch.tensor([0, *ends], device=data.device)[t]  # [B] positions given as data
    is_data = torch.arange(data.shape[1], device=data.device)[None] < bounds[:, None]  # [B, L]
    return torch.where(is_data[..., None], data, noise)


@torch.no_grad()
def flow_tokens(fam, tok, teacher, labels: torch.Tensor, noise: torch.Tensor, sampling, n_steps: int,
                device="cpu") -> torch.Tensor:
    """Tokens [B, L] of the teacher's AR loop with `flow.flow_map(noise)` replacing sampling at every position."""
    codebook = fam.codebook(tok).to(device).float()
    ends = step_ends(teacher)
    starts = [0, *ends[:-1]]
    noise = noise.to(device)
    truncate = fam.sampler(sampling).filter  # the distribution ordinary sampling would draw from

    def step_fn(step: int, logits: torch.Tensor) -> torch.Tensor:  # guided logits [B, V] or [B, pn², V]
        logits = truncate(logits)
        eps = noise[:, starts[step]:ends[step]].reshape(-1, noise.shape[-1])
        logp = logits.float().reshape(-1, logits.shape[-1]).log_softmax(-1)
        return flow.flow_map(eps, logp, codebook, n_steps).view(logits.shape[:-1])

    return fam.sample(tok, teacher, labels, sampling, batch_size=len(labels), device=device, step_fn=step_fn)


def build_shard(fam, tok, teacher, sampling, index: int, size: int, num_classes: int, seed: int,
                n_steps: int, batch_size: int, device="cpu") -> dict[str, torch.Tensor]:
    """One shard of `size` pairs, a pure function of (seed, index): uniform labels, Gaussian noise, flow tokens.

    Its tokens are reproducible given the batching: on GPU the kernels depend on the batch shape, so rebuilding a
    pair in another batch can flip a near-tied token (deterministic kernels make the same batch bit-identical)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    dim, length = fam.codebook(tok).shape[1], step_ends(teacher)[-1]
    labels = torch.randint(num_classes, (size,), generator=g)
    noise = torch.randn(size, length, dim, generator=g)
    with train.deterministic(device):
        tokens = torch.cat([flow_tokens(fam, tok, teacher, labels[i:i + batch_size], noise[i:i + batch_size],
                                        sampling, n_steps, device).cpu() for i in range(0, size, batch_size)])
    return {"labels": labels, "tokens": tokens, "noise": noise}


def build(folder: str | Path, fam, tok, teacher, sampling, n_pairs: int, shard_size: int, num_classes: int,
          seed: int, n_steps: int, batch_size: int, device="cpu", rank: int | None = None, world: int | None = None,
          fingerprint: dict | None = None) -> dict:
    """Write the shards of this rank (index ≡ rank mod world) that are not on disk yet. rank / world default to the
    process group's (`dd.dist`: under torchrun / `dd.launch` every process builds its share, then waits for all).

    Returns {"shards": every shard path of the build, "built_pairs": pairs built by this call on all processes
    (0 when all were on disk), "build_seconds": what building every shard took, also those built by an earlier,
    interrupted call (each shard records its seconds and process count in its header; a shard's share of the wall
    time is seconds / processes); None if a shard has no record}.

    fingerprint: what the shards depend on (settings, teacher checksum); shards left by a build with another
    fingerprint (`build.json`) are deleted first, so a resumed build never mixes two configurations.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rank = dist.rank() if rank is None else rank
    world = dist.world() if world is None else world
    stamp = folder / "build.json"
    if fingerprint is not None:
        fingerprint = json.loads(json.dumps(fingerprint))  # the form it has once read back
        if stamp.is_file() and io.read_json(stamp) != fingerprint and rank == 0:
            stale = sorted(folder.glob("pairs_*.safetensors"))
            print(f"{folder}: {len(stale)} shards from a build with other settings; deleting them")
            for f in stale:
                f.unlink()
        if rank == 0:
            io.write_json(stamp, fingerprint)
    dist.barrier()  # (stale shards gone before any process looks for its own)
    n_shards = -(-n_pairs // shard_size)
    mine = list(range(rank, n_shards, world))
    built = 0
    for k in io.progress(mine, desc=f"pairs (rank {rank})"):
        path = folder / SHARD.format(k)
        if path.is_file():
            continue  # resume: each shard is written atomically, so an existing one is complete
        size = min(shard_size, n_pairs - k * shard_size)
        t0 = time.perf_counter()
        shard = build_shard(fam, tok, teacher, sampling, k, size, num_classes, seed, n_steps, batch_size, device)
        io.save_tensors(path, shard, metadata={"seconds": f"{time.perf_counter() - t0:.3f}", "processes": str(world)})
        built += size
    dist.barrier()
    shards = [folder / SHARD.format(k) for k in range(n_shards)]
    return {"shards": shards, "built_pairs": sum(dist.gather(built)), "build_seconds": build_seconds(shards)}


def build_seconds(shards) -> float | None:
    """Wall time the shards took to build, from their headers (seconds / processes each); None if one is missing
    or has no record."""
    total = 0.0
    for path in shards:
        meta = io.tensor_metadata(path) if Path(path).is_file() else {}
        if "seconds" not in meta:
            return None
        total += float(meta["seconds"]) / int(meta.get("processes", 1))
    return total


def load_pairs(folder: str | Path, n_pairs: int | None = None, num_classes: int | None = None,
               vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The shards of a folder, in shard order, concatenated: {"labels" [N], "tokens" [N, L], "noise" [N, L, D]};
    all consecutive shards, or the first n_pairs pairs (an error if fewer are on disk). With num_classes /
    vocab_size, a label or token out of range is an error naming the shard."""
    folder = io.path(folder)
    shards, have = [], 0
    for k in itertools.count():
        if not (folder / SHARD.format(k)).is_file() or (n_pairs is not None and have >= n_pairs):
            break
        shards.append(io.read_checked(folder, SHARD.format(k))[0] if (folder / "meta.json").is_file()
                      else io.load_tensors(folder / SHARD.format(k)))
        have += len(shards[-1]["labels"])
        for key, top in (("labels", num_classes), ("tokens", vocab_size)):
            t = shards[-1][key]
            if top is not None and len(t) and (t.min() < 0 or t.max() >= top):
                raise ValueError(f"{folder / SHARD.format(k)}: {key} out of range: found {int(t.min())} .. "
                                 f"{int(t.max())}, the teacher takes 0 .. {top - 1} (pairs of another teacher?)")
    if not shards or (n_pairs is not None and have < n_pairs):
        raise FileNotFoundError(f"{folder}: {have} pairs on disk, {n_pairs or 'some'} needed "
                                f"(has build_trajectories run? `dvc repro build_trajectories`)")
    return {key: torch.cat([s[key] for s in shards])[:n_pairs] for key in shards[0]}
