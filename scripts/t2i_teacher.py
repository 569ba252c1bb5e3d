"""Does the text-to-image teacher follow its captions, and what makes it? A study of the `t2i` family's teacher,
built with the family's own code (`dd.teachers.T2I`: captioned data, tokenizer, teacher, held-out captions, metrics)
and the params.yaml t2i sections, with a few keys overridden from the command line.

    python scripts/t2i_teacher.py NAME [--data data] [--steps N] [--standardize] [--dim D] [--n-layer L] [--lr LR]
        # after `dvc repro features` (the prepare stage's splits and the feature classifier);
        # writes reports/t2i/NAME.json

The tokenizer is trained once per seed on the rendered training images (train_tokenizer.t2i) and cached with its
tokens in data/t2i_study/ (not in git), as are the teachers' resumable training states. Evaluation: N_EVAL
samples on held-out captions (`T2I.eval_labels`) at the sampling params' CFG scale and without CFG; the class
accuracy of the feature classifier on `captions.canonical` images (chance 10 %) and each attribute's measured
accuracy (chance 50 %); the same for the rendered test images and for their tokenizer reconstructions (the
ceilings of the measurement and of the tokenizer).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dd import bench, io, metrics, params, teachers, train  # noqa: E402

N_EVAL, SEED = 500, 0
OUT = ROOT / "reports" / "t2i"
CACHE = ROOT / "data" / "t2i_study"
FAM = teachers.T2I


def standardize(feats: torch.Tensor, mask: torch.Tensor, n_ref: int, eps: float = 1e-2) -> torch.Tensor:
    """--standardize: every feature dimension shifted and scaled to mean 0, std 1 over the real tokens of the first
    n_ref captions (the training captions); padding stays zero; eps floors the std of dimensions that barely vary."""
    ref = feats[:n_ref][mask[:n_ref]]
    return (feats - ref.mean(0)) / (ref.std(0) + eps) * mask[..., None]


def tokenizer(folder: Path, tcfg, seed: int, std: bool):
    """The family's tokenizer trained on the rendered training images (cached), its caption bank, and the tokens."""
    train_split, test_split, meta, cond = FAM.dataset(folder, tcfg, seed)
    if std:
        cond["captions"] = standardize(cond["captions"], cond["caption_mask"], cond["n_train"])
    cfg = params.read_section("train_tokenizer", "t2i")
    torch.manual_seed(seed)  # as the train_tokenizer stage
    tok = FAM.build_tokenizer(cfg, cond)
    path = CACHE / f"tokenizer_seed{seed}.safetensors"
    if path.exists():
        tok.load_state_dict(io.load_tensors(path), strict=False)
    else:
        train.fit(tok, FAM.tokenizer_loss, {"images": train_split["images"]},
                  train.FitConfig.from_section(cfg, betas=(0.9, 0.99), seed=seed, precision="auto"),
                  ckpt_path=CACHE / f"tokenizer_state_seed{seed}.pt", desc="t2i tokenizer")
        io.save_tensors(path, {k: v for k, v in tok.state_dict().items() if not k.startswith("caption")})
    tok.set_conditions(cond).eval()
    tokens = FAM.encode(tok, train_split["images"])
    return tok, tokens, train_split, test_split, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name")
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--standardize", action="store_true", help="standardize the caption bank's features")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--lr", type=float)
    args = ap.parse_args()
    over = {k: v for k, v in (("n_steps", args.steps), ("dim", args.dim), ("n_layer", args.n_layer),
                              ("lr", args.lr)) if v is not None}
    tcfg = params.read_section("teacher", "t2i")
    cfg = params.read_section("train_teacher", "t2i", **over)
    scfg = params.read_section("sample_teacher", "t2i")
    tok, tokens, train_split, test_split, meta = tokenizer(args.data / "prepare", tcfg, SEED, args.standardize)

    torch.manual_seed(SEED)
    gpt = FAM.build_teacher(cfg, tok, meta["num_classes"], meta["image_size"])
    fit = train.fit(gpt, FAM.teacher_loss_fn(tok), {"tokens": tokens, "labels": train_split["labels"]},
                    train.FitConfig.from_section(cfg, seed=SEED, precision="auto"),
                    ckpt_path=CACHE / f"teacher_{args.name}.pt", desc=f"t2i teacher {args.name}")
    gpt.eval()

    net, ref, _ = metrics.load_feature_space(args.data / "features")
    labels = FAM.eval_labels(tok, N_EVAL, meta["num_classes"], SEED)
    rows = {}
    for name, scale in ((f"cfg {scfg.cfg_scale}", scfg.cfg_scale), ("no cfg", 1.0)):
        s = params.read_section("sample_teacher", "t2i", cfg_scale=scale)
        out = FAM.sample(tok, gpt, labels, s, generator=torch.Generator().manual_seed(SEED))
        rows[name] = FAM.quality(tok, net, ref, FAM.decode(tok, out), labels, meta["dataset"])
    images, ids = test_split["images"][:N_EVAL], test_split["labels"][:N_EVAL]
    rows["rendered test images"] = FAM.quality(tok, net, ref, images, ids, meta["dataset"])
    rows["their reconstructions"] = FAM.quality(tok, net, ref, FAM.decode(tok, FAM.encode(tok, images)), ids,
                                                meta["dataset"])
    result = {"device": bench.device_name("cpu"), "precision": train.resolve_precision("auto", "cpu"),
              "standardized_captions": args.standardize, "train_teacher": params.as_dict(cfg),
              "train_seconds": fit["seconds"], "final_loss": fit["history"][-1]["loss"], "n_eval": N_EVAL,
              "rows": rows}
    io.write_json(OUT / f"{args.name}.json", result)
    for k, v in rows.items():
        print(f"{k:>24}: " + "  ".join(f"{m} {x:.3f}" for m, x in v.items()))


if __name__ == "__main__":
    main()
