"""Baselines of the DD1 paper: onestep* (independent per-position marginals) and skip-n (a truncated teacher).

onestep*: by DD1's Prop. 3.1, a one-step model that predicts every token without seeing the randomness that
decides it is at best the per-position marginal p(q_i) (the cross-entropy optimum averages the teacher's
conditionals); sampling each position independently from it keeps the marginals and loses every correlation
between tokens. It needs no network: the marginals are counted on reference token sequences.

skip-n: the teacher runs its first N − n AR steps as usual; the positions of the n skipped steps are filled from
the per-position marginals, as onestep* does (the papers do not say how they were filled).

References:
    - Liu et al., "Distilled Decoding 1" (DD1), arXiv 2412.17153: Prop. 3.1, Table 1 (onestep*, skip-n rows).
    - Liu et al., "Distilled Decoding 2" (DD2), arXiv 2510.21003, App. E.5 (onestep* evaluated without training).
"""
from __future__ import annotations

import itertools

import torch

from .dd1 import step_ends


def marginals(tokens_ref: torch.Tensor, vocab_size: int, labels_ref: torch.Tensor | None = None,
              num_classes: int | None = None) -> torch.Tensor:
    """Per-position token frequencies of reference sequences tokens_ref [N, L] → [L, V], or per class [K, L, V]
    when labels_ref [N] is given (K = num_classes, else max label + 1). A class without references is all zero."""
    N, L = tokens_ref.shape
    pos = torch.arange(L, device=tokens_ref.device).expand(N, L)
    cls = torch.zeros_like(tokens_ref) if labels_ref is None else labels_ref[:, None].expand(N, L)
    K = 1 if labels_ref is None else (num_classes or int(labels_ref.max()) + 1)
    flat = (cls * L + pos) * vocab_size + tokens_ref  # one bin per (class, position, token)
    counts = torch.bincount(flat.flatten(), minlength=K * L * vocab_size).view(K, L, vocab_size).double()
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return p[0] if labels_ref is None else p


def onestep_star(tokens_ref: torch.Tensor, n: int, generator: torch.Generator | None = None,
                 labels_ref: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 vocab_size: int | None = None) -> torch.Tensor:
    """n sequences [n, L], each position drawn independently from its marginal in tokens_ref [N, L].

    Per class: give labels_ref [N] (the references' classes) and labels [n] (the classes to draw for); every
    requested class needs at least one reference. vocab_size defaults to max token + 1.
    """
    V = vocab_size or int(tokens_ref.max()) + 1
    if (labels_ref is None) != (labels is None):
        raise ValueError("onestep_star: give both labels_ref and labels (per-class marginals), or neither")
    if labels is None:
        p = marginals(tokens_ref, V)  # [L, V]
        return torch.multinomial(p, n, replacement=True, generator=generator).T.contiguous()
    if len(labels) != n:
        raise ValueError(f"onestep_star: labels has {len(labels)} entries, n = {n}")
    p = marginals(tokens_ref, V, labels_ref, int(max(labels_ref.max(), labels.max())) + 1)[labels]  # [n, L, V]
    if (p.sum(-1) == 0).any():
        missing = sorted(set(labels.tolist()) - set(labels_ref.tolist()))
        raise ValueError(f"onestep_star: no reference sequences for classes {missing}")
    return torch.multinomial(p.flatten(0, 1), 1, generator=generator).view(n, -1)


@torch.no_grad()
def skip_n(fam, tok, teacher, labels: torch.Tensor, n_skip: int, cfg, tokens_ref: torch.Tensor,
           generator: torch.Generator | None = None, labels_ref: torch.Tensor | None = None,
           marginal_generator: torch.Generator | None = None, batch_size: int = 250, device="cpu") -> torch.Tensor:
    """The teacher's first N − n_skip AR steps (its KV-cached sampler `fam.steps`, `cfg` = the sample_teacher
    section), the last n_skip steps' positions drawn from the marginals of tokens_ref [M, L] (per class with
    labels_ref, grouped by `fam.groups`). labels [B] → tokens [B, L] on the CPU. `generator` drives the teacher (on `device`),
    `marginal_generator` the marginal draws (CPU)."""
    ends = step_ends(teacher)
    N = len(ends)
    if not 0 <= n_skip <= N:
        raise ValueError(f"skip_n: n_skip must be in [0, {N}], got {n_skip}")
    per_class = labels_ref is not None
    y = labels.cpu()
    filled = onestep_star(tokens_ref.cpu(), len(y), marginal_generator,  # per condition group (t2i: what a caption asks)
                          fam.groups(tok, labels_ref.cpu()) if per_class else None,
                          fam.groups(tok, y) if per_class else None, teacher.vocab_size)
    step_fn = fam.sampler(cfg, generator)  # one generator through the batches, as `fam.sample` draws
    for i in range(0, len(y), batch_size):
        steps = fam.steps(tok, teacher, labels[i:i + batch_size].to(device), cfg, step_fn)
        kept = list(itertools.islice(steps, N - n_skip))  # the skipped steps are never run
        if kept:
            filled[i:i + batch_size, :ends[len(kept) - 1]] = torch.cat(kept, 1).cpu()
    return filled
