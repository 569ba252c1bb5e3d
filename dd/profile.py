"""A parameter profile (a partial params.yaml) as `dvc exp run` arguments, validated first.

    dvc exp run -n gpu $(python -m dd.profile profiles/gpu.yaml)

prints one `-S section.key=value` per leaf (family sections and subsections nest one level deeper), after checking
every key and value of the profile merged over the current params.yaml, so a typo stops before any compute.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import params as P


def overrides(profile: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in profile.items():
        if isinstance(value, dict):
            out += overrides(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def merged(base: dict, profile: dict) -> dict:
    out = dict(base)
    for key, value in profile.items():
        out[key] = merged(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dd.profile", description=__doc__.splitlines()[0])
    ap.add_argument("profile", help="a YAML file of overrides, e.g. profiles/gpu.yaml")
    args = ap.parse_args(argv)
    try:
        profile = P.read_yaml(args.profile)
        base = P.read_yaml(P.repository_params())
        P.validate(merged(base, profile))
    except P.ParamsError as e:
        print(f"error: {args.profile}: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"-S {k}={json.dumps(v, separators=(',', ':'))}" for k, v in overrides(profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
