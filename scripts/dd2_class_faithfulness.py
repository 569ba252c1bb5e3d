"""Where does DD2's one-step generator lose class faithfulness? Two questions, on the pipeline's own models (after
`dvc repro`), the evaluation's labels and noise:

1. Is the feature classifier confidently wrong or unsure on the samples it misclassifies? Per method: accuracy, the
   mean top probability on the misclassified samples, the share of those above 0.9, the probability left on the true
   class, and the mean entropy.
2. Do the teacher's conditionals on the method's tokens (DD2: the nearest codes of its vectors) depend on the label?
   Per position, KL(p(· | prefix, true label) ‖ p(· | prefix, another label)) of the unguided teacher, averaged over
   samples, for the method's prefixes against the teacher's own; and for the misclassified samples, the share whose
   tokens the teacher finds more likely under the class the classifier sees than under the label they were drawn for
   (the sequence has drifted to that class, rather than being an unrecognisable image of the right one).

    python scripts/dd2_class_faithfulness.py [--n 1000]   # → reports/benchmarks/dd2_class_faithfulness.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dd import dd1, io, methods, metrics, params  # noqa: E402

METHODS = ("teacher", "dd1 1-step", "dd2 1-step", "dd2 2-step")


@torch.no_grad()
def classifier_view(net, images: torch.Tensor, labels: torch.Tensor) -> dict:
    probs = torch.cat([F.softmax(net(images[i:i + 500]), -1) for i in range(0, len(images), 500)])
    top, pred = probs.max(-1)
    wrong = pred != labels
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return {"accuracy": float((~wrong).float().mean()), "n_wrong": int(wrong.sum()),
            "wrong_top_prob": float(top[wrong].mean()) if wrong.any() else None,
            "wrong_confident_share": float((top[wrong] > 0.9).float().mean()) if wrong.any() else None,
            "wrong_true_prob": float(probs[wrong, labels[wrong]].mean()) if wrong.any() else None,
            "right_top_prob": float(top[~wrong].mean()) if (~wrong).any() else None,
            "entropy_nats": float(entropy.mean())}, pred


@torch.no_grad()
def label_sensitivity(f, tokens: torch.Tensor, labels: torch.Tensor, pred: torch.Tensor, num_classes: int,
                      generator: torch.Generator, batch: int = 250) -> dict:
    """Per-position KL between the teacher's conditionals under the true label and a random other one; the NLL of
    the misclassified sequences under the true label and under the classifier's class."""
    other = (labels + torch.randint(1, num_classes, labels.shape, generator=generator)) % num_classes
    kl, nll_true, nll_pred = [], [], []
    for i in range(0, len(tokens), batch):
        t, y, o, p = (v[i:i + batch].to(f.device) for v in (tokens, labels, other, pred))
        lt = F.log_softmax(f.fam.logits(f.tok, f.teacher, t, y).float(), -1)
        lo = F.log_softmax(f.fam.logits(f.tok, f.teacher, t, o).float(), -1)
        kl.append((lt.exp() * (lt - lo)).sum(-1).cpu())  # [b, L]
        lp = F.log_softmax(f.fam.logits(f.tok, f.teacher, t, p).float(), -1)
        nll_true.append(-lt.gather(-1, t[..., None]).squeeze(-1).sum(-1).cpu())
        nll_pred.append(-lp.gather(-1, t[..., None]).squeeze(-1).sum(-1).cpu())
    kl, nll_true, nll_pred = torch.cat(kl), torch.cat(nll_true), torch.cat(nll_pred)
    wrong = pred.cpu() != labels.cpu()
    ends = [0, *f.ends]
    per_step = [float(kl[:, a:b].mean()) for a, b in zip(ends, ends[1:])]  # mean KL per position, per AR step
    return {"kl_per_position_nats": float(kl.mean()), "kl_per_ar_step_nats": per_step,
            "wrong_drifted_share": float((nll_pred[wrong] < nll_true[wrong]).float().mean()) if wrong.any() else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="samples per method (the evaluation's first labels)")
    ap.add_argument("--out", default="reports/benchmarks/dd2_class_faithfulness.json")
    args = ap.parse_args(argv)
    seed = int(params.read_yaml(params.repository_params())["base"]["seed"])
    net, _, _ = metrics.load_feature_space("data/features")
    out = {"command": "python scripts/dd2_class_faithfulness.py" + (f" --n {args.n}" if args.n != 1000 else ""),
           "families": {}}
    for family in params.FAMILIES:
        f = methods.load(family)
        table = methods.build(f, multistep=[2])
        samples, _ = io.read_checked(io.path("data/sample_teacher", family), "samples.safetensors")
        labels = samples["labels"][:args.n]
        num_classes = int(samples["labels"].max()) + 1
        noise = torch.randn(len(labels), *f.shape, generator=torch.Generator().manual_seed(seed))
        rows = {}
        for name in METHODS:
            tokens, emb = methods.run(table[name], labels, noise, seed, 250)
            images = dd1.decode(f.tok, emb, table[name].normalize).cpu()
            view, pred = classifier_view(net, images, labels)
            sens = label_sensitivity(f, tokens.cpu(), labels, pred, num_classes, torch.Generator().manual_seed(seed))
            rows[name] = {**view, **sens}
            print(f"{family} {name}: {json.dumps(rows[name])}")
        out["families"][family] = rows
    io.write_json(io.path(args.out), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
