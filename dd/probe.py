"""One quality probe for every one-step student while it trains, so that DD1 and DD2 are measured on one footing.

`Probe` is the training loops' reporting hook (`train.fit(..., probe=)`, `dd2.distill(..., on_step=)`): every
`every` steps (and at the last) it samples the evaluated weights (the EMA) in one step for a fixed set of labels and
noise, and scores the samples in the pipeline's feature space (`metrics.sample_metrics`: fid_<dataset>, class
accuracy) and by the teacher (its unguided NLL of the tokens, bits per token, as `evaluate` reports it). Both DD1's
and DD2's stages build it from `fixed_inputs` (the same labels and noise for both), and the loops add each row's
training seconds, so a row turns into a point of quality against cumulative cost (`curve`).
"""
from __future__ import annotations

import math
import time

import torch

from . import dd1, metrics, teachers, train

NOISE_SEED_OFFSET = 7  # the probe's noise: base.seed + 7, apart from the evaluation's draws (base.seed + k, k < 7)


def fixed_inputs(n: int, fam, tok, num_classes: int, shape: tuple[int, int], seed: int, device="cpu"):
    """The probe set: the evaluation's first n labels (`fam.eval_labels`: the classes in turn; t2i: held-out captions,
    classes in turn) and noise [n, L, D] from base.seed + NOISE_SEED_OFFSET."""
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET))
    return fam.eval_labels(tok, n, num_classes, seed).to(device), noise.to(device)


class Probe:
    """sample(weights, noise [B, L, D], labels [B]) → (tokens [B, L], embeddings [B, L, D]): the student's one-step
    sampler. Called as probe(step, weights): every `every` steps and at `last` (step 0 too, by the notebook, for the
    initial weights) the row {"step", <fid name>, "class_acc", "teacher_nll_bits", "n"}, else None; `seconds` sums the
    probes' own time (the loops leave it out of the training's)."""

    def __init__(self, sample, fam, tok, teacher, net, ref, dataset: str, k_nn: int, labels, noise, every: int,
                 last: int, batch_size: int = 250, device="cpu", normalize: bool = True):
        self.sample, self.fam, self.tok, self.teacher = sample, fam, tok, teacher
        self.net, self.ref, self.dataset, self.k_nn = net, ref, dataset, k_nn
        self.labels, self.noise, self.every, self.last = labels, noise, every, last
        self.batch_size, self.device, self.normalize = batch_size, device, normalize
        self.seconds = 0.0
        # part of the training's resume fingerprint: a checkpoint whose rows another probe wrote is not resumed
        self.key = f"{train.inputs_digest([], {'labels': labels, 'noise': noise})}/{every}/{dataset}"

    @torch.no_grad()
    def __call__(self, step: int, weights) -> dict | None:
        if step % self.every and step != self.last and step != 0:
            return None
        t0 = time.perf_counter()
        was_training = weights.training
        weights.eval()
        tokens, emb = [], []
        for i in range(0, len(self.labels), self.batch_size):
            t, e = self.sample(weights, self.noise[i:i + self.batch_size], self.labels[i:i + self.batch_size])
            tokens.append(t), emb.append(e)
        weights.train(was_training)
        tokens, emb = torch.cat(tokens), torch.cat(emb)
        m = self.fam.quality(self.tok, self.net, self.ref, dd1.decode(self.tok, emb, self.normalize).cpu(),
                             self.labels.cpu(), self.dataset, self.k_nn, self.device)
        nll = teachers.nll(self.fam, self.tok, self.teacher, tokens, self.labels, self.batch_size, self.device)
        fid = metrics.fid_name(self.dataset)
        self.seconds += time.perf_counter() - t0
        return {"step": step, fid: m[fid], "class_acc": m["class_acc"], "teacher_nll_bits": nll / math.log(2),
                "n": len(self.labels)}


def curve(rows: list[dict], cost_before: float, batch_size: int) -> list[dict]:
    """The probe rows as points of a quality-against-cost curve: each row with "sequences" (step × batch_size, the
    sequences the student has trained on) and "cost_seconds" (cost_before, what the method spent before its training
    loop — DD1: its pairs; DD2: its teacher samples, adaptation and GTS — plus the row's training seconds)."""
    return [{**r, "sequences": r["step"] * batch_size, "cost_seconds": cost_before + r.get("train_seconds", 0.0)}
            for r in rows]


def at_cost(points: list[dict], cost: float, key: str) -> float | None:
    """points[key] linearly interpolated in cost_seconds at `cost`; None outside the points' cost range."""
    pts = sorted((p["cost_seconds"], p[key]) for p in points)
    if not pts or not pts[0][0] <= cost <= pts[-1][0]:
        return None
    for (c0, v0), (c1, v1) in zip(pts, pts[1:]):
        if c0 <= cost <= c1:
            return v0 if c1 == c0 else v0 + (v1 - v0) * (cost - c0) / (c1 - c0)
    return pts[-1][1]


def compare(dd1_points: list[dict], dd2_points: list[dict], key: str) -> dict:
    """DD2 against DD1 on their probe curves (lower `key` is better): each method's budget (its last point's cost) and
    final value; both at the smaller budget ("equal_cost_seconds", interpolated) and their ratio DD2 / DD1 there;
    the cost of DD2's first point at or below DD1's final value ("dd2_reaches_dd1_final_seconds", None: not within
    DD2's budget) and that cost over DD1's budget."""
    final = {name: max(pts, key=lambda p: p["cost_seconds"]) for name, pts in (("dd1", dd1_points), ("dd2", dd2_points))}
    equal = min(final["dd1"]["cost_seconds"], final["dd2"]["cost_seconds"])
    at = {name: at_cost(pts, equal, key) for name, pts in (("dd1", dd1_points), ("dd2", dd2_points))}
    reach = next((p["cost_seconds"] for p in sorted(dd2_points, key=lambda p: p["cost_seconds"])
                  if p[key] <= final["dd1"][key]), None)
    return {"budget_seconds": {n: f["cost_seconds"] for n, f in final.items()},
            "final": {n: f[key] for n, f in final.items()},
            "equal_cost_seconds": equal, "at_equal_cost": at,
            "ratio_at_equal_cost": None if None in at.values() else at["dd2"] / at["dd1"],
            "dd2_reaches_dd1_final_seconds": reach,
            "dd2_reaches_dd1_final_share": None if reach is None else reach / final["dd1"]["cost_seconds"]}
