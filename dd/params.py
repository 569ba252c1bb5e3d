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
    return field(default=default, metadata=dict(doc=doc, choices=choices, lo=lo, hi=hi, lo_open=lo_open))


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


SECTIONS: dict[str, type] = {"base": Base, "prepare": Prepare, "features": Features}


# ---------------------------------------------------------------------------------------------- checks


def _describe(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices"):
        return "choose one of: " + ", ".join(m["choices"])
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[_type(f)]
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if m.get('lo_open') else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{kind} {'>' if m.get('lo_open') else '>='} {lo}"
    return kind


def _type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]


def _check(section: str, f: dataclasses.Field, value: Any) -> Any:
    key, t, m = f"{section}.{f.name}", _type(f), f.metadata
    bad = ParamsError(f"params.yaml: {key} = {value!r} is not allowed; {_describe(f)}")
    if t is bool:
        if not isinstance(value, bool):
            raise bad
        return value
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


def parse(section: str, values: dict | None):
    """Validate one section's mapping and return its dataclass (missing keys take their defaults)."""
    cls = SECTIONS[section]
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ParamsError(f"params.yaml: {section}.{key} is not a known key; known keys: {', '.join(known)}")
    return cls(**{k: _check(section, known[k], v) for k, v in values.items()})


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
    raw = read_yaml(path)
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ParamsError(f"params.yaml: unknown section '{name}'; known sections: {', '.join(SECTIONS)}")
        if values is not None and not isinstance(values, dict):
            raise ParamsError(f"params.yaml: section '{name}' must be a mapping of key: value")
    return {name: parse(name, raw.get(name)) for name in SECTIONS}


def as_dict(section_obj) -> dict:
    return dataclasses.asdict(section_obj)
