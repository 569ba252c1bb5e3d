"""The released teachers at their true size, with random weights: saved in the release's file format, read back by
dd's loaders (sizes inferred from shapes, strict), and run once — the path a user's real checkpoints take.

    python -m dd.release                       # all four; figures to reports/benchmarks/release_loaders.json
    python -m dd.release --model gpt-b         # one

For each model: build it at the release configuration, save its random weights as the release does (LlamaGen:
a training file `{"model", "optimizer", "steps", "args"}`; VAR: a raw state dict), load that file with
`dd.llamagen.load_vq / load_gpt` or `dd.var_tokenizer.load_vae / dd.var.load_var`, check every tensor came back
equal, and run one encode + decode of a 256 px image (tokenizers) or one teacher-forced forward over the whole
sequence at batch 1 (teachers). Each model runs in a process of its own, so its peak memory is its own.

References:
    FoundationVision/LlamaGen (`vq_ds16_c2i.pt`, `c2i_B_256.pt`: GPT-B, VQ-16, 256 px, 16 x 16 tokens);
    FoundationVision/VAR (`vae_ch160v4096z32.pth`, `var_d16.pth`: 680 tokens over 10 scales, 4096 x 32 codebook).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import bench, io, llamagen, var, var_tokenizer

SIZE = 256  # the release's image side


def _build(name: str):
    """(model at the release configuration, file name as released, load(path) with dd's loader)."""
    if name == "vq16":
        return llamagen.VQModel(**llamagen.VQ_CONFIGS["VQ-16"]), "vq_ds16_c2i.pt", llamagen.load_vq
    if name == "gpt-b":
        return (llamagen.GPT(**llamagen.GPT_CONFIGS["GPT-B"], grid_size=SIZE // 16), "c2i_B_256.pt",
                llamagen.load_gpt)
    if name == "vae":
        return (var_tokenizer.VQVAE(**var_tokenizer.VAE_CONFIGS["release"]), "vae_ch160v4096z32.pth",
                var_tokenizer.load_vae)
    if name == "var-d16":
        return var.VAR(**var.VAR_CONFIGS["d16"]), "var_d16.pth", var.load_var
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")


MODELS = ("vq16", "gpt-b", "vae", "var-d16")


def _save_as_released(model, path: Path) -> None:
    sd = model.state_dict()
    if isinstance(model, (llamagen.VQModel, llamagen.GPT)):  # LlamaGen's training scripts
        torch.save({"model": sd, "optimizer": {}, "steps": 0,
                    "args": argparse.Namespace(image_size=SIZE, downsample_size=16)}, path)
    else:  # VAR's release files are raw state dicts
        torch.save(sd, path)


@torch.no_grad()
def _run_once(model) -> dict:
    """One use of the loaded model at batch 1 → {what it produced: shape}."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    if isinstance(model, llamagen.VQModel):
        idx = model.encode_indices(image)                                   # [1, 16, 16]
        return {"tokens": list(idx.shape), "image": list(model.decode_indices(idx).shape)}
    if isinstance(model, var_tokenizer.VQVAE):
        scales = model.encode_scales(image)                                 # 10 x [1, pn²]
        return {"tokens": [1, sum(s.shape[1] for s in scales)], "image": list(model.decode_scales(scales).shape)}
    labels = torch.tensor([207])
    if isinstance(model, llamagen.GPT):
        n = model.grid_size ** 2
        tokens = torch.randint(model.config["vocab_size"], (1, n), generator=g)
        return {"logits": list(model.logits(tokens, labels).shape)}         # [1, 256, 16384]
    x_in = torch.randn(1, model.L - 1, model.config["z_channels"], generator=g)
    return {"logits": list(model.logits(x_in, labels).shape)}               # [1, 680, 4096]


def check(name: str, folder: str | Path) -> dict:
    """Build, save as released, load with dd's loader, compare, run once: → figures (seconds, MB, shapes)."""
    torch.manual_seed(0)
    t = [time.perf_counter()]
    model, fname, load = _build(name)
    t.append(time.perf_counter())
    path = Path(folder) / fname
    _save_as_released(model, path)
    t.append(time.perf_counter())
    loaded = load(path)
    t.append(time.perf_counter())
    want, got = model.state_dict(), loaded.state_dict()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    if differ or want.keys() != got.keys():
        raise AssertionError(f"{name}: the loaded {fname} differs from what was saved in {len(differ)} tensors "
                             f"({differ[:5]}), keys equal: {want.keys() == got.keys()}")
    del model, want
    shapes = _run_once(loaded)
    t.append(time.perf_counter())
    return {"model": name, "file": fname, "params": sum(p.numel() for p in loaded.parameters()),
            "file_mb": round(path.stat().st_size / 2 ** 20, 1), "config": loaded.config,
            "build_s": round(t[1] - t[0], 2), "save_s": round(t[2] - t[1], 2), "load_s": round(t[3] - t[2], 2),
            "run_s": round(t[4] - t[3], 2), **shapes,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _in_own_process(name: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "dd.release", "--model", name, "--json"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dd.release --model {name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dd.release", description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, help="one model, in this process (default: each in its own)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    ap.add_argument("--out", default="reports/benchmarks/release_loaders.json",
                    help="where all models' figures go (under the repository root)")
    args = ap.parse_args(argv)
    if args.model:
        with tempfile.TemporaryDirectory() as tmp:
            rec = check(args.model, tmp)
        print(json.dumps(rec) if args.json else rec)
        return 0
    rows = [_in_own_process(name) for name in MODELS]
    for r in rows:
        print(f"{r['model']:8s} {r['params'] / 1e6:7.1f}M params, file {r['file_mb']:7.1f} MB: build {r['build_s']} s,"
              f" save {r['save_s']} s, load {r['load_s']} s, run {r['run_s']} s, peak {r['peak_rss_mb']} MB")
    io.write_json(io.path(args.out), {"device": bench.device_name("cpu"), "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
