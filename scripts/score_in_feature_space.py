"""Score one run's evaluation samples in another run's feature space, to tell a change of the models from a change
of the metric (each run trains its own feature classifier, and fid_<dataset> is measured in it).

    python scripts/score_in_feature_space.py --samples RUN_A --features RUN_B --out scores.json

RUN_A / RUN_B: repository roots holding a finished `make repro` (`data/evaluate`, `data/train_tokenizer`,
`data/features`). Every method's stored tokens are decoded through RUN_A's tokenizer: the codes themselves, so
methods that decode unsnapped embeddings (DD2; DD1 with a continuous head) are scored on their nearest codes here,
not as `evaluate` scores them. → rows {family, method, fid_key, fid, class_acc}, printed and written to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dd import io, metrics, teachers  # noqa: E402


def score(samples: Path, features: Path) -> list[dict]:
    net, ref, meta = metrics.load_feature_space(str(features / "data/features"))
    fid_key, rows = metrics.fid_name(meta["dataset"]), []
    for family in ("llamagen", "var"):
        fam = teachers.family(family)
        tok = teachers.load_model(samples / "data/train_tokenizer" / family, "tokenizer", fam.Tokenizer).eval()
        stored, _ = io.read_checked(samples / "data/evaluate", f"{family}.safetensors")
        labels = stored.pop("labels")
        for method, tokens in stored.items():
            with torch.no_grad():
                images = fam.decode(tok, tokens)
            m = metrics.sample_metrics(net, ref, images, labels, meta["dataset"], meta["k_nn"])
            rows.append({"family": family, "method": method, "fid_key": fid_key, "fid": m[fid_key],
                         "class_acc": m["class_acc"]})
            print(f"{family:8s} {method:16s} {fid_key} {m[fid_key]:6.2f}  class acc {m['class_acc']:.3f}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", required=True, type=Path, help="the run whose samples are scored")
    ap.add_argument("--features", required=True, type=Path, help="the run whose feature space scores them")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = score(a.samples.resolve(), a.features.resolve())
    if a.out:
        a.out.write_text(json.dumps({"samples": str(a.samples), "features": str(a.features), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
