"""Reading and validating `params.yaml`: one frozen dataclass per section, checked when read.

Every value is checked for type, range and allowed choices as soon as it is read, so that a typo stops a stage
before any compute, with one line that names the key, the value and what is allowed:

    params.yaml: prepare.dataset = 'nope' is not allowed; choose one of: fashion-mnist, mnist5k, imagefolder

This module imports no torch, so `python -m dd.stage` can validate in well under a second.

References:
    iterative/example-get-started (one section per stage, flat scalars).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """An invalid or unknown value in params.yaml; the message is one line."""


def _spec(default, doc: str, *, choices=None, lo=None, hi=None, lo_open=False):
    meta = dict(doc=doc, choices=choices, lo=lo, hi=hi, lo_open=lo_open)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def choice(default: str, allowed: tuple[str, ...], doc: str):
    return _spec(default, doc, choices=allowed)


def num(default, doc: str, lo=None, hi=None, lo_open=False):
    return _spec(default, doc, lo=lo, hi=hi, lo_open=lo_open)


# ---------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Base:
    seed: int = num(0, "seed of every random draw in the pipeline", lo=0)
    device: str = choice("auto", ("auto", "cpu", "cuda"), "auto = cuda when available, else cpu")


@dataclass(frozen=True)
class Runtime:
    nproc: int = num(1, "processes the training stages run on (> 1: torchrun on this machine, gloo on CPU, one GPU "
                        "per process with NCCL; every batch size must split evenly)", lo=1)
    precision: str = choice("fp32", ("fp32", "bf16"), "autocast of the AR networks' training (teachers, DD1, DD2); "
                            "tokenizers, the feature classifier and the closed-form flow stay fp32")
    torch_compile: bool = _spec(False, "torch.compile the loss of every stage's train.fit (DD2's distillation loop "
                                       "runs eagerly)")


@dataclass(frozen=True)
class Prepare:
    dataset: str = choice("fashion-mnist", ("fashion-mnist", "mnist5k", "imagefolder"), "which dataset")
    image_size: int = num(32, "side of the stored square images (MNIST-like data is padded to it)", lo=8, hi=1024)
    max_train: int = num(0, "keep at most this many training images (0 = all)", lo=0)
    max_test: int = num(0, "keep at most this many test images (0 = all)", lo=0)
    imagefolder_path: str = _spec("", "imagefolder: root folder with one sub-folder of images per class")
    test_fraction: float = num(0.1, "imagefolder / mnist5k: share of images held out as the test split",
                               lo=0.0, hi=0.9, lo_open=True)


@dataclass(frozen=True)
class Features:
    width: int = num(32, "channels of the first conv block of the feature classifier", lo=8, hi=512)
    n_steps: int = num(600, "classifier training steps", lo=1)
    batch_size: int = num(128, "classifier batch size", lo=1)
    lr: float = num(2e-3, "AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    weight_decay: float = num(1e-4, "AdamW weight decay", lo=0.0)
    warmup_steps: int = num(50, "linear learning-rate warm-up steps", lo=0)
    n_ref: int = num(10000, "test images used for the reference statistics (0 = all)", lo=0)
    k_nn: int = num(3, "k of the k-NN manifolds for precision / recall", lo=1, hi=50)


@dataclass(frozen=True)
class Teacher:
    source: str = choice("train", ("train", "official"), "train the tokenizer and teacher here, or load released files")
    tokenizer_path: str = _spec("", "official: the released tokenizer (vq_ds16_c2i.pt / vae_ch160v4096z32.pth)")
    teacher_path: str = _spec("", "official: the released teacher (c2i_B_256.pt / var_d16.pth)")
    grid_size: int = num(16, "official LlamaGen: tokens per side of the released GPT (16 for *_256.pt)", lo=1)


@dataclass(frozen=True)
class TrainTokenizerLlamaGen:
    ch: int = num(32, "base channels of encoder / decoder (a multiple of 32: GroupNorm(32))", lo=32)
    ch_mult: list = _spec([1, 2, 2], "channel multipliers per level; len - 1 downsamplings (32 px -> 8x8)")
    num_res_blocks: int = num(1, "residual blocks per level", lo=1)
    z_channels: int = num(64, "latent channels before the 1x1 quant_conv", lo=1)
    codebook_size: int = num(512, "number of codes V", lo=2)
    codebook_dim: int = num(8, "code dimension D (L2-normalised codebook)", lo=1)
    dead_code_steps: int = num(50, "restart codes unused for this many steps (0: never)", lo=0)
    n_steps: int = num(600, "training steps", lo=1)
    batch_size: int = num(64, "batch size", lo=1)
    lr: float = num(1e-3, "AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    warmup_steps: int = num(50, "linear warm-up steps", lo=0)


@dataclass(frozen=True)
class TrainTeacherLlamaGen:
    dim: int = num(192, "GPT width", lo=8)
    n_layer: int = num(4, "GPT layers", lo=1)
    n_head: int = num(4, "attention heads (head_dim = dim / n_head, a multiple of 4 for 2-D RoPE)", lo=1)
    class_dropout: float = num(0.1, "label dropout for classifier-free guidance", lo=0.0, hi=0.9)
    dropout: float = num(0.0, "token / residual / FFN dropout (release: 0.1)", lo=0.0, hi=0.9)
    n_steps: int = num(600, "training steps", lo=1)
    batch_size: int = num(128, "batch size", lo=1)
    lr: float = num(1e-3, "AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    weight_decay: float = num(0.05, "AdamW weight decay", lo=0.0)
    warmup_steps: int = num(50, "linear warm-up steps", lo=0)


@dataclass(frozen=True)
class SampleTeacherLlamaGen:
    cfg_scale: float = num(2.0, "classifier-free guidance u + s(c - u); <= 1 is off", lo=0.0)
    cfg_interval: int = num(-1, "guide tokens up to this step only (-1: all)", lo=-1)
    temperature: float = num(1.0, "softmax temperature", lo=0.0, lo_open=True)
    top_k: int = num(0, "keep the k most likely tokens (0: off)", lo=0)
    top_p: float = num(1.0, "nucleus sampling mass (1.0: off)", lo=0.0, lo_open=True, hi=1.0)
    n_samples: int = num(1000, "samples for the metrics (labels uniform over classes)", lo=10)
    batch_size: int = num(250, "sampling batch size", lo=1)
    latency_repeats: int = num(5, "timed repeats of batch-1 and batch-N generation (median)", lo=1)
    throughput_batch: int = num(256, "batch size of the throughput measurement", lo=1)


@dataclass(frozen=True)
class TeacherVar:
    source: str = choice("train", ("train", "official"), "train the tokenizer and teacher here, or load released files")
    tokenizer_path: str = _spec("", "official: the released VQVAE (vae_ch160v4096z32.pth)")
    teacher_path: str = _spec("", "official: the released VAR (var_d16.pth)")


@dataclass(frozen=True)
class TrainTokenizerVar:
    ch: int = num(32, "base channels of encoder / decoder (a multiple of 32: GroupNorm(32))", lo=32)
    ch_mult: list = _spec([1, 2, 2], "channel multipliers per level; len - 1 downsamplings (32 px -> 8x8)")
    num_res_blocks: int = num(1, "residual blocks per level", lo=1)
    vocab_size: int = num(512, "number of codes V (raw codebook)", lo=2)
    z_channels: int = num(16, "code dimension Cvae", lo=1)
    patch_nums: list = _spec([1, 2, 3, 4, 6, 8], "side of each scale's token map, coarse to fine (last = latent side)")
    n_steps: int = num(600, "training steps", lo=1)
    batch_size: int = num(32, "batch size", lo=1)
    lr: float = num(1e-3, "AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    warmup_steps: int = num(50, "linear warm-up steps", lo=0)


@dataclass(frozen=True)
class TrainTeacherVar:
    depth: int = num(4, "transformer blocks", lo=1)
    embed_dim: int = num(192, "width C (release: 64 * depth)", lo=8)
    num_heads: int = num(4, "attention heads (release: depth)", lo=1)
    class_dropout: float = num(0.1, "label dropout for classifier-free guidance", lo=0.0, hi=0.9)
    n_steps: int = num(600, "training steps", lo=1)
    batch_size: int = num(64, "batch size", lo=1)
    lr: float = num(1e-3, "AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    weight_decay: float = num(0.05, "AdamW weight decay", lo=0.0)
    warmup_steps: int = num(50, "linear warm-up steps", lo=0)


@dataclass(frozen=True)
class SampleTeacherVar:
    cfg: float = num(2.0, "VAR's CFG ramp: scale si uses (1 + r) c - r u, r = cfg * si / (SN - 1)", lo=0.0)
    top_k: int = num(0, "keep the k most likely tokens (0: off)", lo=0)
    top_p: float = num(0.0, "nucleus sampling mass (0.0: off, VAR's convention)", lo=0.0, hi=1.0)
    n_samples: int = num(1000, "samples for the metrics (labels uniform over classes)", lo=10)
    batch_size: int = num(250, "sampling batch size", lo=1)
    latency_repeats: int = num(5, "timed repeats of batch-1 and batch-N generation (median)", lo=1)
    throughput_batch: int = num(256, "batch size of the throughput measurement", lo=1)


@dataclass(frozen=True)
class BuildTrajectories:
    n_pairs: int = num(10000, "noise -> token pairs to build (labels uniform over classes)", lo=1)
    shard_size: int = num(1000, "pairs per shard: the unit of resume and of the split across ranks", lo=1)
    build_batch: int = num(500, "sequences per teacher batch while building", lo=1)
    flow_steps: int = num(64, "ODE steps of the flow map that replaces sampling (dd.flow.flow_map)", lo=1)
    n_check: int = num(1000, "pairs decoded for the check against ordinary teacher samples", lo=10)
    convergence_steps: list = _spec([8, 16, 32, 64, 128], "flow steps compared with a 1024-step solve in the report")


@dataclass(frozen=True)
class TrainDD1:
    t_train: list = _spec([0, 16], "AR steps t of the training points X^t (0 = pure noise; the 2-step t2 belongs here)",
                          lo=0)
    t2: int = num(16, "AR steps given as data in the second step of 2-step and teacher-mixed sampling", lo=1)
    split: int = num(16, "AR steps read from the logits head (argmax codes); later positions from the continuous head "
                     "(all AR steps: the logits head everywhere)", lo=0)
    mixed_start: int = num(8, "teacher-mixed: the teacher redraws AR steps mixed_start .. t2-1", lo=0)
    cont_loss: str = choice("embed", ("embed", "decoded", "none"),
                            "continuous-head loss: MSE to the code vectors, pixel MSE through the decoder, or none")
    cont_weight: float = num(1.0, "weight of the continuous-head loss beside the cross-entropy", lo=0.0)
    n_steps: int = num(400, "training steps", lo=1)
    batch_size: int = num(128, "batch size", lo=1)
    lr: float = num(5e-4, "AdamW learning rate", lo=0.0, lo_open=True, hi=1.0)
    weight_decay: float = num(0.05, "AdamW weight decay", lo=0.0)
    warmup_steps: int = num(50, "linear warm-up steps", lo=0)
    ema_decay: float = num(0.99, "EMA decay of the evaluated weights (0: evaluate the raw weights; ema_decay ** n_steps "
                           "must be <= 0.05)", lo=0.0, hi=0.99999)
    n_eval: int = num(1000, "samples per method for the metrics (the teacher samples' labels)", lo=10)
    eval_batch: int = num(250, "sampling batch size", lo=1)

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
    n_gts_samples: int = num(4000, "teacher samples (ordinary sampler, sample_teacher settings) the GTS stage fits", lo=10)
    sample_batch: int = num(250, "batch size of that sampling and of the evaluation samplers", lo=1)
    mlp_steps: int = num(500, "LlamaGen: full-batch Adam steps fitting the input MLP to the token table", lo=0)
    adapt_steps: int = num(100, "LlamaGen: KL fine-tuning steps of the continuous-input teacher (0: none)", lo=0)
    adapt_lr: float = num(2e-4, "LlamaGen: learning rate of that fine-tuning", lo=0.0, lo_open=True, hi=1.0)
    head_width: int = num(256, "width of the MLP flow head", lo=8)
    head_depth: int = num(3, "residual AdaLN blocks of the flow head", lo=1)
    gts_head_steps: int = num(200, "GTS steps training the new head with the backbone frozen", lo=0)
    gts_full_steps: int = num(100, "GTS steps training everything after that", lo=0)
    gts_batch: int = num(64, "GTS batch size (teacher sequences)", lo=1)
    gts_lr: float = num(1e-3, "GTS learning rate of the head-only phase", lo=0.0, lo_open=True, hi=1.0)
    gts_full_lr: float = num(2e-4, "GTS learning rate of the full phase", lo=0.0, lo_open=True, hi=1.0)
    n_noise: int = num(4, "(t, eps) draws per sequence in the GTS and FCS losses (shared backbone pass)", lo=1)
    n_euler: int = num(10, "Euler steps per AR step when sampling the AR-diffusion model (report only)", lo=1)
    n_steps: int = num(100, "generator (CSD) updates", lo=1)
    batch_size: int = num(64, "batch size of the generator and guidance updates", lo=1)
    lr_gen: float = num(1e-4, "Adam learning rate of the generator", lo=0.0, lo_open=True, hi=1.0)
    lr_guide: float = num(2e-4, "Adam learning rate of the guidance network", lo=0.0, lo_open=True, hi=1.0)
    warmup_steps: int = num(20, "linear warm-up (generator updates; the guidance network: its own updates)", lo=0)
    lr_gen_decay_to: float = num(1.0, "the generator's learning rate at its last update as a fraction of lr_gen, "
                                 "reached by a cosine decay after the warm-up (1: constant)", lo=0.0, hi=1.0)
    teacher_prefix: str = choice("continuous", ("continuous", "codes"), "the teacher's conditionals (the CSD target) "
                                 "given the generator's prefix as it is, or snapped to the nearest codes (what the "
                                 "discrete teacher was trained on; free: the prefix carries no gradient)")
    k_guide: int = num(5, "guidance updates per generator update", lo=1)
    align_at: int = num(0, "generator step of the performance alignment (0: before the first update)", lo=0)
    align_steps: int = num(0, "guidance-only updates of the alignment (0: no alignment)", lo=0)
    k_after: int = num(2, "guidance updates per generator update after the alignment", lo=1)
    t_min: float = num(0.02, "CSD times t ~ U[t_min, t_max] (t = 0 noise, t = 1 data)", lo=0.0, hi=1.0, lo_open=True)
    t_max: float = num(0.98, "upper end of the CSD times", lo=0.0, hi=1.0, lo_open=True)
    ema_max: float = num(0.9999, "cap of the progressive EMA min(ema_max, (i + 1) / (i + 10))", lo=0.0, hi=0.99999)
    multistep: list = _spec([2], "k of the multi-step samples (the teacher redraws the last k - 1 AR steps)", lo=2)
    eval_every: int = num(25, "generator steps between probe evaluations (500 one-step samples) of the EMA", lo=1)
    n_eval: int = num(1000, "samples per method for the metrics (the teacher samples' labels)", lo=10)
    n_eval_ardiff: int = num(250, "samples of the AR-diffusion model's metrics (n_euler × AR steps per image; the "
                             "first of the n_eval labels)", lo=10)


@dataclass(frozen=True)
class Evaluate:
    n_eval: int = num(1000, "samples per method (the teacher samples' labels; at most sample_teacher.F.n_samples)",
                      lo=10)
    eval_batch: int = num(250, "sampling batch size", lo=1)
    skip_llamagen: list = _spec([16, 32], "skip-n baselines of the LlamaGen family: AR steps (tokens) dropped", lo=1)
    skip_var: list = _spec([1, 2], "skip-n baselines of the VAR family: AR steps (scales) dropped", lo=1)
    latency_repeats: int = num(10, "rounds of interleaved batch-1 timed calls (median), after one warm-up; the "
                               "large batch is timed in max(1, repeats // 10) rounds", lo=1)
    throughput_batch: int = num(256, "batch size of the throughput measurement", lo=1)


SECTIONS: dict[str, type | dict] = {
    "base": Base, "runtime": Runtime, "prepare": Prepare, "features": Features,
    "teacher": {"llamagen": Teacher, "var": TeacherVar},
    "train_tokenizer": {"llamagen": TrainTokenizerLlamaGen, "var": TrainTokenizerVar},
    "train_teacher": {"llamagen": TrainTeacherLlamaGen, "var": TrainTeacherVar},
    "sample_teacher": {"llamagen": SampleTeacherLlamaGen, "var": SampleTeacherVar},
    "build_trajectories": {"llamagen": BuildTrajectories, "var": BuildTrajectories},
    "train_dd1": {"llamagen": TrainDD1, "var": TrainDD1},
    "train_dd2": {"llamagen": TrainDD2, "var": TrainDD2},
    "evaluate": Evaluate,
}
FAMILIES = ("llamagen", "var")


# ---------------------------------------------------------------------------------------------- checks


def _describe(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices"):
        return "choose one of: " + ", ".join(m["choices"])
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


def parse(section: str, values: dict | None, family: str | None = None):
    """Validate one section's mapping (of one family, for per-family sections) and return its dataclass.

    Missing keys take their defaults.
    """
    cls = SECTIONS[section]
    if isinstance(cls, dict):
        if family not in cls:
            raise ParamsError(f"params.yaml: {section} has no family {family!r}; families: {', '.join(cls)}")
        cls, section = cls[family], f"{section}.{family}"
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ParamsError(f"params.yaml: {section}.{key} is not a known key; known keys: {', '.join(known)}")
    obj = cls(**{k: _check(section, known[k], v) for k, v in values.items()})
    if hasattr(obj, "check"):  # constraints between keys
        obj.check(section)
    return obj


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
    """Read and validate every known section of a params file: {section: dataclass}."""
    return validate(read_yaml(path))


def validate(raw: dict) -> dict[str, Any]:
    """Validate every known section of a params mapping: {section: dataclass}."""
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ParamsError(f"params.yaml: unknown section '{name}'; known sections: {', '.join(SECTIONS)}")
        if values is not None and not isinstance(values, dict):
            raise ParamsError(f"params.yaml: section '{name}' must be a mapping of key: value")
    out = {}
    for name, cls in SECTIONS.items():
        if isinstance(cls, dict):
            fams = raw.get(name) or {}
            for fam in fams:
                if fam not in cls:
                    raise ParamsError(f"params.yaml: {name}.{fam} is not a teacher family; families: {', '.join(cls)}")
            out[name] = {fam: parse(name, fams.get(fam), fam) for fam in cls}
        else:
            out[name] = parse(name, raw.get(name))
    return out


def as_dict(section_obj) -> dict:
    return dataclasses.asdict(section_obj)


def pick(section: str, namespace: dict, family: str | None = None):
    """Validate a section from the variables of a notebook's parameters cell (`pick("features", globals())`)."""
    cls = SECTIONS[section]
    cls = cls[family] if isinstance(cls, dict) and family in cls else cls
    names = [f.name for f in dataclasses.fields(cls)] if not isinstance(cls, dict) else []
    return parse(section, {k: namespace[k] for k in names if k in namespace}, family)
