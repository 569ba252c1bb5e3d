"""Every generation method of one teacher family behind one call, for the evaluation stage and `dd.bench`.

    fam = methods.load("llamagen", device="cpu")     # the pipeline's stage outputs under data/
    table = methods.build(fam, skips=[16, 32])        # {name: Method}
    tokens, emb = table["dd1 1-step"].generate(labels, noise, seed=0)

A `Method` maps labels [B] and noise [B, L, D] to tokens [B, L] (nearest codes) and the per-position embeddings
[B, L, D] that are decoded (codes, or DD1's continuous head / DD2's generator output left unsnapped). Methods that
draw their own randomness (teacher, SJD, skip-n, onestep*, teacher-mixed, DD2 multi-step) derive it from `seed`,
so a call is a pure function of its arguments. `steps` counts sequential network evaluations (AR steps; CFG runs its
two halves in one batched pass); SJD's vary per image: `steps` is their most, `passes` records what each call took.

References:
    - Liu et al., "Distilled Decoding 1" (DD1), arXiv 2412.17153, Table 1 (methods, #Step, time per image).
    - Liu et al., "Distilled Decoding 2" (DD2), arXiv 2510.21003, Table 1 (one-step and multi-step DD2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import ardiff, baselines, dd1, dd2, flow, io, params, sjd, teachers
from .trajectories import load_pairs

DIRS = dict(tokenizer="data/train_tokenizer", teacher="data/train_teacher", samples="data/sample_teacher",
            pairs="data/build_trajectories", dd1="data/train_dd1", dd2="data/train_dd2",
            metrics="reports/metrics")


@dataclass
class Family:
    """One family's trained parts, loaded from the stage outputs."""
    name: str
    fam: type
    tok: torch.nn.Module
    teacher: torch.nn.Module
    codebook: torch.Tensor  # [V, D]
    ends: list[int]  # token count after each AR step
    sampling: object  # the sample_teacher section the teacher's samples (and the pairs) used
    pairs: dict  # DD1 pairs {"labels", "tokens", "noise"}: the reference sequences of onestep* / skip-n
    device: torch.device
    dd1: torch.nn.Module | None = None
    dd1_train: dict = field(default_factory=dict)  # the train_dd1 section it was trained with
    dd2: torch.nn.Module | None = None
    dd2_train: dict = field(default_factory=dict)
    train_seconds: dict = field(default_factory=dict)  # teacher / dd1 / dd2: wall seconds of their training

    @property
    def shape(self) -> tuple[int, int]:
        return self.ends[-1], self.codebook.shape[1]


@dataclass
class Method:
    name: str
    steps: int  # sequential network evaluations
    n_params: int  # parameters of the networks it runs (0: none)
    generate: Callable  # (labels [B], noise [B, L, D], seed) → (tokens [B, L], emb [B, L, D])
    train_seconds: float | None  # wall time its training took (teacher: tokenizer + AR model); None: no training
    normalize: bool = True  # decode: L2-normalise LlamaGen embeddings first (False: as they are, as the release's DD1)
    passes: list = field(default_factory=list)  # per image, sequential forward passes of every call (SJD: measured)


def _params(*models) -> int:
    return sum(p.numel() for m in models for p in m.parameters())


def _seconds(metrics_dir, name: str, key: str = "train_seconds") -> float | None:
    p = io.path(metrics_dir, f"{name}.json")
    return float(io.read_json(p)[key]) if p.is_file() else None


def load(family: str, dirs: dict | None = None, device="cpu", need_students: bool = True) -> Family:
    """Load a family's tokenizer, teacher, sampling settings, pairs and (when present) DD1 and DD2 students.

    dirs overrides `DIRS` entries (stage output folders). need_students=False tolerates missing students (the
    methods that need them are then left out); True names the missing file.
    """
    d = {**DIRS, **(dirs or {})}
    fam = teachers.family(family)
    dev = torch.device(device)
    tok = teachers.load_model(io.path(d["tokenizer"], family), "tokenizer", fam.Tokenizer).to(dev).requires_grad_(False)
    teacher = teachers.load_model(io.path(d["teacher"], family), "teacher", fam.Teacher, tok).to(dev).requires_grad_(False)
    _, smeta = io.read_checked(io.path(d["samples"], family), "samples.safetensors")
    pmeta = io.read_json(io.path(d["pairs"], family, "meta.json"))
    out = Family(family, fam, tok, teacher, fam.codebook(tok).float().to(dev), dd1.step_ends(teacher),
                 params.parse("sample_teacher", smeta["sampling"], family),
                 load_pairs(io.path(d["pairs"], family), pmeta["n_pairs"], teacher.num_classes, teacher.vocab_size),
                 dev)
    tok_s, tea_s = (_seconds(d["metrics"], f"{s}_{family}") for s in ("train_tokenizer", "train_teacher"))
    out.train_seconds["teacher"] = None if tok_s is None or tea_s is None else tok_s + tea_s
    for name, cls, folder in (("dd1", dd1.DD1Model, d["dd1"]), ("dd2", ardiff.ARDiffusion, d["dd2"])):
        path = io.path(folder, family)
        if not (path / f"{name}.safetensors").is_file():
            if need_students:
                raise FileNotFoundError(f"{path / (name + '.safetensors')} is missing: run `dvc repro train_{name}@{family}`")
            continue
        model = teachers.load_model(path, name, cls, tok).to(dev).requires_grad_(False)
        meta = io.read_json(path / "meta.json")
        setattr(out, name, model)
        setattr(out, f"{name}_train", meta["train"])
        # DD1's cost counts its pairs; DD2's is the sum of its parts (samples, adaptation, GTS, distillation)
        out.train_seconds[name] = meta["train_seconds"] + (pmeta["build_seconds"] if name == "dd1" else 0.0)
    return out


def build(f: Family, skips: list[int] = (), multistep: list[int] | None = None, batch_size: int = 250,
          sjd_window: int = 0, sjd_init: str = "random") -> dict:
    """{name: Method} for every method the family's parts allow, in the evaluation's order: teacher, speculative
    Jacobi decoding of the teacher (LlamaGen, sjd_window > 0), skip-n for each n in `skips`, onestep*, DD1 1-step /
    2-step / teacher-mixed (its train_dd1 settings), DD2 1-step and k-step for k in `multistep` (default: its
    train_dd2 settings)."""
    dev, cb, ends, N = f.device, f.codebook, f.ends, len(f.ends)
    n_teacher = _params(f.teacher)

    def gens(seed):
        return torch.Generator(device=dev).manual_seed(seed), torch.Generator().manual_seed(seed)

    def teacher_fn(labels, noise, seed):
        tokens = f.fam.sample(f.tok, f.teacher, labels, f.sampling, gens(seed)[0], batch_size, dev).to(dev)
        return tokens, cb[tokens]

    def skip_fn(n):
        def fn(labels, noise, seed):
            g, g_cpu = gens(seed)
            tokens = baselines.skip_n(f.fam, f.tok, f.teacher, labels, n, f.sampling, f.pairs["tokens"], g,
                                      f.pairs["labels"], g_cpu, batch_size, dev).to(dev)
            return tokens, cb[tokens]
        return fn

    def onestep_fn(labels, noise, seed):
        tokens = baselines.onestep_star(f.pairs["tokens"], len(labels), gens(seed)[1],
                                        f.fam.groups(f.tok, f.pairs["labels"]), f.fam.groups(f.tok, labels),
                                        len(cb)).to(dev)
        return tokens, cb[tokens]

    def sjd_fn(labels, noise, seed):
        c = f.sampling
        tokens, passes = sjd.generate(f.teacher.eval(), labels, c.cfg_scale, c.cfg_interval, c.temperature, c.top_k,
                                      c.top_p, sjd_window, sjd_init, gens(seed)[0])
        out["sjd"].passes.extend(passes.tolist())
        return tokens, cb[tokens]

    out = {"teacher": Method("teacher", N, n_teacher, teacher_fn, f.train_seconds.get("teacher"))}
    if sjd_window > 0 and f.name != "var":  # (VAR already decodes a scale in one pass)
        out["sjd"] = Method("sjd", N, n_teacher, sjd_fn, f.train_seconds.get("teacher"))
    for n in skips:
        if not 0 < n < N:
            raise ValueError(f"skip-n: n must be in [1, {N - 1}] for the {f.name} teacher ({N} AR steps), got {n}")
        out[f"skip-{n}"] = Method(f"skip-{n}", N - n, n_teacher, skip_fn(n), f.train_seconds.get("teacher"))
    out["onestep*"] = Method("onestep*", 1, 0, onestep_fn, None)
    if f.dd1 is not None:
        c = f.dd1_train
        n1, secs = _params(f.dd1), f.train_seconds.get("dd1")

        def dd1_fn(t_list):
            return lambda labels, noise, seed: dd1.sample(f.dd1, noise, labels, cb, ends, t_list, c["split"])

        def mixed_fn(labels, noise, seed):
            return dd1.sample_mixed(f.dd1, f.teacher, f.tok, noise, labels, cb, c["t2"], c["mixed_start"],
                                    f.sampling, c["split"], gens(seed)[0])

        norm = c.get("source", "train") != "official"  # a released DD1 model is decoded as the release does
        out["dd1 1-step"] = Method("dd1 1-step", 1, n1, dd1_fn((0,)), secs, norm)
        out["dd1 2-step"] = Method("dd1 2-step", 2, n1, dd1_fn((0, c["t2"])), secs, norm)
        name = f"dd1 mixed {c['mixed_start']}-{c['t2']}"
        steps = (1 if c["mixed_start"] > 0 else 0) + (c["t2"] - c["mixed_start"]) + 1
        out[name] = Method(name, steps, n1 + n_teacher, mixed_fn, secs, norm)
    if f.dd2 is not None:
        n2, secs = _params(f.dd2), f.train_seconds.get("dd2")

        def dd2_one(labels, noise, seed):
            x = dd2.generate(f.dd2, f.tok, noise, labels)
            return flow.nearest_code(x.reshape(-1, x.shape[-1]), cb).view(x.shape[:2]), x

        def dd2_k(k):
            return lambda labels, noise, seed: dd2.sample_multistep(f.dd2, f.teacher, f.tok, noise, labels, cb, k,
                                                                     f.sampling, gens(seed)[0])

        out["dd2 1-step"] = Method("dd2 1-step", 1, n2, dd2_one, secs)
        for k in (f.dd2_train.get("multistep", []) if multistep is None else multistep):
            if not 1 < k <= N:
                raise ValueError(f"DD2 k-step: k must be in [2, {N}] for the {f.name} teacher, got {k}")
            out[f"dd2 {k}-step"] = Method(f"dd2 {k}-step", k, n2 + n_teacher, dd2_k(k), secs)
    return out


@torch.no_grad()
def run(method: Method, labels: torch.Tensor, noise: torch.Tensor, seed: int, batch_size: int = 250):
    """`method.generate` over labels [N] / noise [N, L, D] in batches (batch b uses seed + b) → (tokens, emb)."""
    toks, embs = [], []
    for b, i in enumerate(range(0, len(labels), batch_size)):
        t, e = method.generate(labels[i:i + batch_size], noise[i:i + batch_size], seed + b)
        toks.append(t)
        embs.append(e)
    return torch.cat(toks), torch.cat(embs)
