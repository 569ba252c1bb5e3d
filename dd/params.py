"""Reading and validating `params.yaml`: one frozen dataclass per section, checked when read.

`params.yaml` is the one place a value lives. The dataclasses here hold what a value may be (type, bounds, allowed
choices, a one-line meaning) and no defaults: every key is required, so a key deleted from `params.yaml` stops a
stage instead of bringing back a value from somewhere else. Every value is checked as soon as it is read, so that a
typo stops a stage before any compute, with one line that names the key and what is allowed:

    params.yaml: prepare.dataset = 'nope' is not allowed; choose one of: fashion-mnist, mnist5k, imagefolder
    params.yaml: train_dd1.llamagen.n_steps is missing; training steps (an integer >= 1)

Sections are flat (`features.lr`) or per teacher family (`train_dd1.llamagen.lr`); a flat section may hold family
subsections for the keys that differ by family (`evaluate.var.skip_n`). A notebook's parameters cell holds a
section's keys as variables; a family subsection's keys arrive there as {family: value} (`as_parameters`, `pick`).

This module imports no torch, so `python -m dd.stage` can validate in well under a second.

References:
    iterative/example-get-started (one section per stage, flat scalars).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """An invalid, unknown or missing value in params.yaml; the message is one line."""


def _spec(doc: str, **meta):
    return field(metadata={"doc": doc, **meta})


def choice(allowed: tuple[str, ...], doc: str):
    return _spec(doc, choices=allowed)


def num(doc: str, lo=None, hi=None, lo_open=False):
    return _spec(doc, lo=lo, hi=hi, lo_open=lo_open)


def text(doc: str):
    return _spec(doc)


def flag(doc: str):
    return _spec(doc)


def ints(doc: str, lo=None):
    """A non-empty list of integers, each >= lo (default 1)."""
    return _spec(doc, lo=lo)


def names(allowed: tuple[str, ...], doc: str):
    """A non-empty list of distinct names, each one of `allowed`."""
    return _spec(doc, choices=allowed)


def family_keys(cls: type, doc: str):
    """A family subsection of a flat section: one family's own keys, validated as `cls`."""
    return _spec(doc, section=cls)


# ---------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Pipeline:
    families: list = names(("llamagen", "var", "t2i"), "the teacher families every per-family stage runs for "
                           "(dvc.yaml's foreach) and evaluate compares (t2i: opt-in, README)")


@dataclass(frozen=True)
class Base:
    seed: int = num("seed of every random draw in the pipeline", lo=0)
    device: str = choice(("auto", "cpu", "cuda"), "auto = cuda when available, else cpu")


@dataclass(frozen=True)
class Runtime:
    nproc: int = num("processes the training stages run on (> 1: torchrun on this machine, gloo on CPU, one GPU "
                     "per process with NCCL; every batch size must split evenly)", lo=1)
    precision: str = choice(("auto", "fp32", "bf16"), "autocast of every training (feature classifier, tokenizers, "
                            "teachers, DD1, DD2); auto = bf16 where the device has native bf16 (a CUDA GPU, a CPU with "
                            "avx512_bf16 / amx_bf16), else fp32. Sampling, pair building, vector quantisation and "
                            "the closed-form flow stay fp32")
    torch_compile: bool = flag("torch.compile the loss of every stage's train.fit (DD2's distillation loop runs "
                               "eagerly)")


@dataclass(frozen=True)
class Prepare:
    dataset: str = choice(("fashion-mnist", "mnist5k", "imagefolder"), "which dataset")
    image_size: int = num("side of the stored square images (MNIST-like data is padded to it)", lo=8, hi=1024)
    max_train: int = num("keep at most this many training images (0 = all)", lo=0)
    max_test: int = num("keep at most this many test images (0 = all)", lo=0)
    imagefolder_path: str = text("imagefolder: root folder with one sub-folder of images per class")
    test_fraction: float = num("imagefolder / mnist5k: share of images held out as the test split",
                               lo=0.0, hi=0.9, lo_open=True)


@dataclass(frozen=True)
class Features:
    width: int = num("channels of the first conv block of the feature classifier", lo=8, hi=512)
    n_steps: int = num("classifier training steps", lo=1)
    batch_size: int = num("classifier batch size", lo=1)
    lr: float = num("AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    weight_decay: float = num("AdamW weight decay", lo=0.0)
    warmup_steps: int = num("linear learning-rate warm-up steps", lo=0)
    n_ref: int = num("test images used for the reference statistics (0 = all)", lo=0)
    k_nn: int = num("k of the k-NN manifolds for precision / recall", lo=1, hi=50)


@dataclass(frozen=True)
class Teacher:
    source: str = choice(("train", "official"), "train the tokenizer and teacher here, or load released files")
    tokenizer_path: str = text("official: the released tokenizer (vq_ds16_c2i.pt / vae_ch160v4096z32.pth)")
    teacher_path: str = text("official: the released teacher (c2i_B_256.pt / var_d16.pth)")
    grid_size: int = num("official LlamaGen: tokens per side of the released GPT (16 for *_256.pt)", lo=1)


@dataclass(frozen=True)
class TrainTokenizerLlamaGen:
    ch: int = num("base channels of encoder / decoder (a multiple of 32: GroupNorm(32))", lo=32)
    ch_mult: list = ints("channel multipliers per level; len - 1 downsamplings (32 px -> 8x8)")
    num_res_blocks: int = num("residual blocks per level", lo=1)
    z_channels: int = num("latent channels before the 1x1 quant_conv", lo=1)
    codebook_size: int = num("number of codes V", lo=2)
    codebook_dim: int = num("code dimension D (L2-normalised codebook)", lo=1)
    dead_code_steps: int = num("restart codes unused for this many steps (0: never)", lo=0)
    n_steps: int = num("training steps", lo=1)
    batch_size: int = num("batch size", lo=1)
    lr: float = num("AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    warmup_steps: int = num("linear warm-up steps", lo=0)


@dataclass(frozen=True)
class TrainTeacherLlamaGen:
    dim: int = num("GPT width", lo=8)
    n_layer: int = num("GPT layers", lo=1)
    n_head: int = num("attention heads (head_dim = dim / n_head, a multiple of 4 for 2-D RoPE)", lo=1)
    class_dropout: float = num("label dropout for classifier-free guidance", lo=0.0, hi=0.9)
    dropout: float = num("token / residual / FFN dropout (release: 0.1)", lo=0.0, hi=0.9)
    n_steps: int = num("training steps", lo=1)
    batch_size: int = num("batch size", lo=1)
    lr: float = num("AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    weight_decay: float = num("AdamW weight decay", lo=0.0)
    warmup_steps: int = num("linear warm-up steps", lo=0)


@dataclass(frozen=True)
class SampleTeacherLlamaGen:
    cfg_scale: float = num("classifier-free guidance u + s(c - u); <= 1 is off", lo=0.0)
    cfg_interval: int = num("guide tokens up to this step only (-1: all)", lo=-1)
    temperature: float = num("softmax temperature", lo=0.0, lo_open=True)
    top_k: int = num("keep the k most likely tokens (0: off)", lo=0)
    top_p: float = num("nucleus sampling mass (1.0: off)", lo=0.0, lo_open=True, hi=1.0)
    n_samples: int = num("samples for the metrics (labels uniform over classes)", lo=10)
    batch_size: int = num("sampling batch size", lo=1)
    latency_repeats: int = num("timed repeats of batch-1 and batch-N generation (median)", lo=1)
    throughput_batch: int = num("batch size of the throughput measurement", lo=1)


@dataclass(frozen=True)
class TeacherVar:
    source: str = choice(("train", "official"), "train the tokenizer and teacher here, or load released files")
    tokenizer_path: str = text("official: the released VQVAE (vae_ch160v4096z32.pth)")
    teacher_path: str = text("official: the released VAR (var_d16.pth)")


@dataclass(frozen=True)
class TeacherT2I:
    source: str = choice(("train",), "the t2i tokenizer and teacher are trained here (a released LlamaGen T2I model "
                         "reads FLAN-T5 features of its own captions: dd.llamagen.load_gpt)")
    caption_tokens: int = num("text-encoder tokens of the caption prefix (cls_token_num; captions left-padded)",
                              lo=2, hi=512)


@dataclass(frozen=True)
class TrainTokenizerVar:
    ch: int = num("base channels of encoder / decoder (a multiple of 32: GroupNorm(32))", lo=32)
    ch_mult: list = ints("channel multipliers per level; len - 1 downsamplings (32 px -> 8x8)")
    num_res_blocks: int = num("residual blocks per level", lo=1)
    vocab_size: int = num("number of codes V (raw codebook)", lo=2)
    z_channels: int = num("code dimension Cvae", lo=1)
    patch_nums: list = ints("side of each scale's token map, coarse to fine (last = latent side)")
    n_steps: int = num("training steps", lo=1)
    batch_size: int = num("batch size", lo=1)
    lr: float = num("AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    warmup_steps: int = num("linear warm-up steps", lo=0)


@dataclass(frozen=True)
class TrainTeacherVar:
    depth: int = num("transformer blocks", lo=1)
    embed_dim: int = num("width C (release: 64 * depth)", lo=8)
    num_heads: int = num("attention heads (release: depth)", lo=1)
    class_dropout: float = num("label dropout for classifier-free guidance", lo=0.0, hi=0.9)
    n_steps: int = num("training steps", lo=1)
    batch_size: int = num("batch size", lo=1)
    lr: float = num("AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    weight_decay: float = num("AdamW weight decay", lo=0.0)
    warmup_steps: int = num("linear warm-up steps", lo=0)


@dataclass(frozen=True)
class SampleTeacherVar:
    cfg: float = num("VAR's CFG ramp: scale si uses (1 + r) c - r u, r = cfg * si / (SN - 1)", lo=0.0)
    top_k: int = num("keep the k most likely tokens (0: off)", lo=0)
    top_p: float = num("nucleus sampling mass (0.0: off, VAR's convention)", lo=0.0, hi=1.0)
    n_samples: int = num("samples for the metrics (labels uniform over classes)", lo=10)
    batch_size: int = num("sampling batch size", lo=1)
    latency_repeats: int = num("timed repeats of batch-1 and batch-N generation (median)", lo=1)
    throughput_batch: int = num("batch size of the throughput measurement", lo=1)


@dataclass(frozen=True)
class BuildTrajectories:
    n_pairs: int = num("noise -> token pairs to build (labels uniform over classes)", lo=1)
    shard_size: int = num("pairs per shard: the unit of resume and of the split across ranks", lo=1)
    build_batch: int = num("sequences per teacher batch while building", lo=1)
    flow_steps: int = num("ODE steps of the flow map that replaces sampling (dd.flow.flow_map)", lo=1)
    n_check: int = num("pairs decoded for the check against ordinary teacher samples", lo=10)
    convergence_steps: list = ints("flow steps the report compares with a solve of 8 x the most of them")


@dataclass(frozen=True)
class TrainDD1:
    source: str = choice(("train", "official"), "train DD1 here, or evaluate a released DD1 model (`path`; the "
                         "training knobs are then unused)")
    path: str = text("official: the released DD1 file (LlamaGen-DD/llamagen-B.pt, VAR-DD/var-d16.pth)")
    t_train: list = ints("AR steps t of the training points X^t (0 = pure noise; the 2-step t2 belongs here)",
                         lo=0)
    t2: int = num("AR steps given as data in the second step of 2-step and teacher-mixed sampling", lo=1)
    split: int = num("AR steps read from the logits head (argmax codes); later positions from the continuous head "
                     "(all AR steps: the logits head everywhere)", lo=0)
    mixed_start: int = num("teacher-mixed: the teacher redraws AR steps mixed_start .. t2-1", lo=0)
    cont_loss: str = choice(("embed", "decoded", "none"),
                            "continuous-head loss: MSE to the code vectors, pixel MSE through the decoder, or none")
    cont_weight: float = num("weight of the continuous-head loss beside the cross-entropy", lo=0.0)
    n_steps: int = num("training steps", lo=1)
    batch_size: int = num("batch size", lo=1)
    lr: float = num("AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    weight_decay: float = num("AdamW weight decay", lo=0.0)
    warmup_steps: int = num("linear warm-up steps", lo=0)
    ema_decay: float = num("EMA decay of the evaluated weights (0: evaluate the raw weights; ema_decay ** n_steps "
                           "must be <= 0.05)", lo=0.0, hi=0.99999)
    eval_every: int = num("training steps between probe evaluations of the EMA weights (min(500, n_eval) one-step "
                          "samples, the same labels and noise as DD2's probe)", lo=1)
    n_eval: int = num("samples per method for the metrics (the teacher samples' labels)", lo=10)
    eval_batch: int = num("sampling batch size", lo=1)

    def check(self, section: str) -> None:
        """The EMA starts at the initial (teacher-copied) weights and keeps ema_decay ** n_steps of them at the end:
        evaluating an EMA that still holds more than 5 % of them measures a half-trained mixture, not the model."""
        left = self.ema_decay ** self.n_steps
        if left > 0.05:
            raise ParamsError(
                f"params.yaml: {section}.ema_decay = {self.ema_decay} with n_steps = {self.n_steps} leaves "
                f"{left:.0%} of the initial weights in the evaluated EMA; allowed: ema_decay <= "
                f"{0.05 ** (1 / self.n_steps):.4f} for this n_steps (ema_decay ** n_steps <= 0.05), or 0 (raw weights)")


@dataclass(frozen=True)
class TrainDD2:
    n_gts_samples: int = num("teacher samples (ordinary sampler, sample_teacher settings) the GTS stage fits", lo=10)
    sample_batch: int = num("batch size of that sampling and of the evaluation samplers", lo=1)
    mlp_steps: int = num("LlamaGen: full-batch Adam steps fitting the input MLP to the token table", lo=0)
    adapt_steps: int = num("LlamaGen: KL fine-tuning steps of the continuous-input teacher (0: none)", lo=0)
    adapt_lr: float = num("LlamaGen: learning rate of that fine-tuning", lo=0.0, lo_open=True, hi=1.0)
    head_width: int = num("width of the MLP flow head", lo=8)
    head_depth: int = num("residual AdaLN blocks of the flow head", lo=1)
    gts_head_steps: int = num("GTS steps training the new head with the backbone frozen", lo=0)
    gts_full_steps: int = num("GTS steps training everything after that", lo=0)
    gts_batch: int = num("GTS batch size (teacher sequences)", lo=1)
    gts_lr: float = num("GTS learning rate of the head-only phase", lo=0.0, lo_open=True, hi=1.0)
    gts_full_lr: float = num("GTS learning rate of the full phase", lo=0.0, lo_open=True, hi=1.0)
    n_noise: int = num("(t, eps) draws per sequence in the GTS and FCS losses (shared backbone pass)", lo=1)
    n_euler: int = num("Euler steps per AR step when sampling the AR-diffusion model (report only)", lo=1)
    n_steps: int = num("generator (CSD) updates", lo=1)
    batch_size: int = num("batch size of the generator and guidance updates", lo=1)
    lr_gen: float = num("Adam learning rate of the generator", lo=0.0, lo_open=True, hi=1.0)
    lr_guide: float = num("Adam learning rate of the guidance network", lo=0.0, lo_open=True, hi=1.0)
    warmup_steps: int = num("linear warm-up (generator updates; the guidance network: its own updates)", lo=0)
    lr_gen_decay_to: float = num("the generator's learning rate at its last update as a fraction of lr_gen, "
                                 "reached by a cosine decay after the warm-up (1: constant)", lo=0.0, hi=1.0)
    teacher_prefix: str = choice(("continuous", "codes"), "the teacher's conditionals (the CSD target) "
                                 "given the generator's prefix as it is, or snapped to the nearest codes (what the "
                                 "discrete teacher was trained on; free: the prefix carries no gradient)")
    csd_weight: str = choice(("token", "sequence"), "the CSD loss's normalisation per token (DD2) or per sequence "
                             "(SiD's per-image form)")
    k_guide: int = num("guidance updates per generator update", lo=1)
    align_at: int = num("generator step of the performance alignment (0: before the first update)", lo=0)
    align_steps: int = num("guidance-only updates of the alignment (0: no alignment)", lo=0)
    k_after: int = num("guidance updates per generator update after the alignment", lo=1)
    t_min: float = num("CSD times t ~ U[t_min, t_max] (t = 0 noise, t = 1 data)", lo=0.0, hi=1.0, lo_open=True)
    t_max: float = num("upper end of the CSD times", lo=0.0, hi=1.0, lo_open=True)
    ema_max: float = num("cap of the progressive EMA min(ema_max, (i + 1) / (i + 10))", lo=0.0, hi=0.99999)
    multistep: list = ints("k of the multi-step samples (the teacher redraws the last k - 1 AR steps)", lo=2)
    eval_every: int = num("generator steps between probe evaluations (min(500, n_eval) one-step samples) of the "
                          "EMA", lo=1)
    n_eval: int = num("samples per method for the metrics (the teacher samples' labels)", lo=10)
    n_eval_ardiff: int = num("samples of the AR-diffusion model's metrics (n_euler × AR steps per image; the "
                             "first of the n_eval labels)", lo=10)


@dataclass(frozen=True)
class EvaluateFamily:
    skip_n: list = ints("skip-n baselines, one per n: the teacher's AR loop with n AR steps (LlamaGen: tokens, VAR: "
                        "scales) left out", lo=1)


@dataclass(frozen=True)
class EvaluateLlamaGen(EvaluateFamily):
    sjd_window: int = num("speculative Jacobi decoding (the `sjd` row): draft tokens verified per forward pass "
                          "(0: no SJD row)", lo=0)
    sjd_init: str = choice(("random", "repeat"), "SJD: a new draft token starts uniform at random, or as the token "
                           "to its left in the grid")


@dataclass(frozen=True)
class Evaluate:
    n_eval: int = num("samples per method (the teacher samples' labels; at most sample_teacher.F.n_samples)",
                      lo=10)
    eval_batch: int = num("sampling batch size", lo=1)
    latency_repeats: int = num("rounds of interleaved batch-1 timed calls (median), after one warm-up; the "
                               "large batch is timed in max(1, repeats // 10) rounds", lo=1)
    throughput_batch: int = num("batch size of the throughput measurement", lo=1)
    spread_draws: int = num("noise draws behind the spread of DD1's and DD2's one-step figures (the evaluation's "
                            "own draw and base.seed + 1, ...)", lo=1)
    metric_space: str = choice(("features", "inception"), "quality metrics: the feature space the pipeline trains "
                          "(fid_<dataset>), or Inception from the files below (fid_inception, inception_score, "
                          "Inception precision / recall: ImageNet-comparable)")
    inception_weights: str = text("inception: the Inception weights (weights-inception-2015-12-05-6726825d.pth)")
    inception_reference: str = text("inception: a reference batch .npz with mu and sigma (ADM's "
                                     "VIRTUAL_imagenet256_labeled.npz); empty: the prepared test split's statistics")
    llamagen: EvaluateLlamaGen = family_keys(EvaluateLlamaGen, "the LlamaGen family's own keys")
    var: EvaluateFamily = family_keys(EvaluateFamily, "the VAR family's own keys")
    t2i: EvaluateLlamaGen = family_keys(EvaluateLlamaGen, "the text-to-image family's own keys")


SECTIONS: dict[str, type | dict] = {
    "pipeline": Pipeline, "base": Base, "runtime": Runtime, "prepare": Prepare, "features": Features,
    "teacher": {"llamagen": Teacher, "var": TeacherVar, "t2i": TeacherT2I},
    "train_tokenizer": {"llamagen": TrainTokenizerLlamaGen, "var": TrainTokenizerVar, "t2i": TrainTokenizerLlamaGen},
    "train_teacher": {"llamagen": TrainTeacherLlamaGen, "var": TrainTeacherVar, "t2i": TrainTeacherLlamaGen},
    "sample_teacher": {"llamagen": SampleTeacherLlamaGen, "var": SampleTeacherVar, "t2i": SampleTeacherLlamaGen},
    "build_trajectories": {"llamagen": BuildTrajectories, "var": BuildTrajectories, "t2i": BuildTrajectories},
    "train_dd1": {"llamagen": TrainDD1, "var": TrainDD1, "t2i": TrainDD1},
    "train_dd2": {"llamagen": TrainDD2, "var": TrainDD2, "t2i": TrainDD2},
    "evaluate": Evaluate,
}
FAMILIES = ("llamagen", "var", "t2i")
DEFAULT_FAMILIES = ("llamagen", "var")  # params.yaml's pipeline.families (t2i: opt-in)


# ---------------------------------------------------------------------------------------------- checks


def _describe(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("section"):
        return "a mapping of: " + ", ".join(g.name for g in dataclasses.fields(m["section"]))
    if m.get("choices"):
        many = _type(f) is list
        return ("a non-empty list of distinct names, each" if many else "choose") + " one of: " + ", ".join(m["choices"])
    lo, hi = m.get("lo"), m.get("hi")
    if _type(f) is list:
        return f"a non-empty list of integers >= {1 if lo is None else lo}"
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[_type(f)]
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if m.get('lo_open') else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{kind} {'>' if m.get('lo_open') else '>='} {lo}"
    return kind


def _type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool, "list": list}[str(f.type)]


def _check(section: str, f: dataclasses.Field, value: Any) -> Any:
    key, t, m = f"{section}.{f.name}", _type(f), f.metadata
    bad = ParamsError(f"params.yaml: {key} = {value!r} is not allowed; {_describe(f)}")
    if t is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if t is list and m.get("choices"):
        if not isinstance(value, list) or not value or len(set(map(str, value))) < len(value) or \
                not all(isinstance(v, str) and v in m["choices"] for v in value):
            raise bad
        return list(value)
    if t is list:
        least = 1 if m.get("lo") is None else m["lo"]
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in value):
            raise bad
        return list(value)
    if t is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    if t is str and not isinstance(value, str):
        raise bad
    if m.get("choices") and value not in m["choices"]:
        raise bad
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and (value < lo or (m.get("lo_open") and value == lo)):
        raise bad
    if hi is not None and value > hi:
        raise bad
    return value


def _build(cls: type, section: str, values: Any):
    """Validate a complete mapping of `cls`'s keys (the keys of `section`) into a `cls`."""
    if not isinstance(values, dict):
        raise ParamsError(f"params.yaml: {section} must be a mapping of key: value")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ParamsError(f"params.yaml: {section}.{key} is not a known key; known keys: {', '.join(known)}")
    for key, f in known.items():
        if key not in values:  # no defaults: params.yaml holds every value
            raise ParamsError(f"params.yaml: {section}.{key} is missing; {f.metadata['doc']} ({_describe(f)})")
    obj = cls(**{k: _build(f.metadata["section"], f"{section}.{k}", values[k]) if f.metadata.get("section")
                 else _check(section, f, values[k]) for k, f in known.items()})
    if hasattr(obj, "check"):  # constraints between keys
        obj.check(section)
    return obj


def _section_class(section: str, family: str | None) -> tuple[type, str]:
    """(dataclass, dotted name) of a section, or of one family's part of a per-family section."""
    if section not in SECTIONS:
        raise ParamsError(f"params.yaml: unknown section '{section}'; known sections: {', '.join(SECTIONS)}")
    cls = SECTIONS[section]
    if not isinstance(cls, dict):
        return cls, section
    if family not in cls:
        raise ParamsError(f"params.yaml: {section} has no family {family!r}; families: {', '.join(cls)}")
    return cls[family], f"{section}.{family}"


def parse(section: str, values: dict, family: str | None = None):
    """Validate one section's complete mapping (of one family, for per-family sections) and return its dataclass.

    A key the dataclass does not know, or one it needs that `values` lacks, is a ParamsError naming it.
    """
    cls, name = _section_class(section, family)
    return _build(cls, name, values)


def read_yaml(path: str | Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"params file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections")
    return raw


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate every section of a params file: {section: dataclass}."""
    return validate(read_yaml(path))


def repository_params() -> Path:
    """The repository's params.yaml: under `$DD_ROOT`, else in the nearest ancestor of the cwd that holds dvc.yaml
    (`dd.io.root`'s rule, without importing torch: validation must not wait for it)."""
    env = os.environ.get("DD_ROOT")
    if env:
        return Path(env).resolve() / "params.yaml"
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file():
            return d / "params.yaml"
    raise ParamsError(f"no dvc.yaml in {here} or its parents; run inside the repository or set DD_ROOT")


def read_section(section: str, family: str | None = None, path: str | Path | None = None, **values):
    """One section (of one family) of a params file, validated, with `values` in place of some of its keys:
    `read_section("train_dd1", "var", n_steps=10)`, for tests and hand-run code (path: the repository's)."""
    base = read_yaml(path or repository_params()).get(section)
    if family is not None and isinstance(base, dict):
        base = base.get(family)
    return parse(section, {**(base if isinstance(base, dict) else {}), **values}, family)


def validate(raw: dict) -> dict[str, Any]:
    """Validate every section of a complete params mapping: {section: dataclass, or {family: dataclass}}."""
    for name in raw:
        if name not in SECTIONS:
            raise ParamsError(f"params.yaml: unknown section '{name}'; known sections: {', '.join(SECTIONS)}")
    out = {}
    for name, cls in SECTIONS.items():
        if name not in raw:
            what = f"one mapping per family: {', '.join(cls)}" if isinstance(cls, dict) else \
                "a mapping of: " + ", ".join(f.name for f in dataclasses.fields(cls))
            raise ParamsError(f"params.yaml: section {name} is missing; {what}")
        if not isinstance(cls, dict):
            out[name] = parse(name, raw[name])
            continue
        fams = raw[name]
        if not isinstance(fams, dict):
            raise ParamsError(f"params.yaml: {name} must be a mapping of family: keys; families: {', '.join(cls)}")
        for fam in fams:
            if fam not in cls:
                raise ParamsError(f"params.yaml: {name}.{fam} is not a teacher family; families: {', '.join(cls)}")
        for fam in cls:
            if fam not in fams:
                raise ParamsError(f"params.yaml: {name}.{fam} is missing; the {fam} family's keys of {name}")
        out[name] = {fam: parse(name, fams[fam], fam) for fam in cls}
    return out


def as_dict(section_obj) -> dict:
    """A section as the plain mapping params.yaml holds (family subsections nested)."""
    return dataclasses.asdict(section_obj)


def as_parameters(section_obj) -> dict:
    """A section as a notebook's parameters cell holds it: one variable per key, the keys of a family subsection
    as {family: value} (`evaluate.var.skip_n` -> skip_n = {"llamagen": ..., "var": ...}); `pick` reads it back."""
    out = {}
    for f in dataclasses.fields(section_obj):
        value = getattr(section_obj, f.name)
        if f.metadata.get("section"):
            for key, v in dataclasses.asdict(value).items():
                out.setdefault(key, {})[f.name] = v
        else:
            out[f.name] = value
    return out


def pick(section: str, namespace: dict, family: str | None = None):
    """Validate a section from the variables of a notebook's parameters cell (`pick("features", globals())`).

    Every key must be there: a variable the cell lacks is a ParamsError naming the key.
    """
    cls, _ = _section_class(section, family)
    values = {}
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("section")
        if sub is None:
            if f.name in namespace:
                values[f.name] = namespace[f.name]
            continue
        values[f.name] = {g.name: namespace[g.name][f.name] for g in dataclasses.fields(sub)
                          if isinstance(namespace.get(g.name), dict) and f.name in namespace[g.name]}
    return parse(section, values, family)


def entry_parameters(cfg: dict, entry: str) -> dict:
    """The notebook variables of one dvc.yaml params entry, from `load`'s result: a section's or a family part's
    keys (`as_parameters`), or the one key named; a key under a flat section's family subsection arrives as
    {family: value} (`evaluate.var.skip_n` -> {"skip_n": {"var": [1, 2]}})."""
    section, *rest = entry.split(".")
    node, family = cfg.get(section), None
    for part in rest:
        if isinstance(node, dict):  # a per-family section: the family's part
            node = node.get(part)
            continue
        f = {f.name: f for f in dataclasses.fields(node)}.get(part) if dataclasses.is_dataclass(node) else None
        family = part if f is not None and f.metadata.get("section") else family
        node = getattr(node, part) if f is not None else None
    if node is None or isinstance(node, dict):
        raise ParamsError(f"dvc.yaml: params entry {entry!r} names no section, family part or key of params.yaml")
    values = as_parameters(node) if dataclasses.is_dataclass(node) else {rest[-1]: node}
    return {k: {family: v} for k, v in values.items()} if family else values
