"""The released teachers at their true size, with random weights: saved in the release's file format, read back by
dd's loaders (sizes inferred from shapes, strict), and run once — the path a user's real checkpoints take.

    python -m dd.release                       # all four; figures to reports/benchmarks/release_loaders.json
    python -m dd.release --model gpt-b         # one
    python -m dd.release --pipeline            # every stage at the release's shapes, the paper profiles' settings

For each model: build it at the release configuration, save its random weights as the release does (LlamaGen:
a training file `{"model", "optimizer", "steps", "args"}`; VAR: a raw state dict), load that file with
`dd.llamagen.load_vq / load_gpt` or `dd.var_tokenizer.load_vae / dd.var.load_var`, check every tensor came back
equal, and run one encode + decode of a 256 px image (tokenizers) or one teacher-forced forward over the whole
sequence at batch 1 (teachers). Each model runs in a process of its own, so its peak memory is its own.

`--pipeline` runs every stage, DD1 and DD2 included, on thin random-weight files that have the released files'
interface shapes (1,000 classes, VQ-16's 16,384 x 8 codebook and 16 x 16 tokens, VAR's 10 scales / 680 tokens and
4,096 x 32 codebook, 256 px images), both families with the paper profiles' settings (`profiles/paper-*.yaml`, their
counts scaled down to `TINY_COUNTS`), each stage's wall time and peak memory -> release_shapes.json.

References:
    FoundationVision/LlamaGen (`vq_ds16_c2i.pt`, `c2i_B_256.pt`: GPT-B, VQ-16, 256 px, 16 x 16 tokens);
    FoundationVision/VAR (`vae_ch160v4096z32.pth`, `var_d16.pth`: 680 tokens over 10 scales, 4096 x 32 codebook).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import bench, io, llamagen, teachers, var, var_tokenizer

SIZE = 256  # the release's image side


def build(name: str):
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
    model, fname, load = build(name)
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


# ---------------------------------------------------------------------------------------------------------------
# The whole pipeline at the release's interface shapes
# ---------------------------------------------------------------------------------------------------------------

# What the released files look like from outside (classes + null row, codebooks, tokens per image, 16x downsampling,
# 256 px), thin inside so that 2 CPU cores run every stage on them in minutes; the loaders infer all of it.
THIN = {
    "vq": dict(ch=32, ch_mult=[1, 1, 1, 1, 1], num_res_blocks=1, z_channels=32, codebook_size=16384,
               codebook_embed_dim=8),                                       # 256 px -> 16 x 16 tokens
    "gpt": dict(vocab_size=16384, num_classes=1000, dim=64, n_layer=1, n_head=1, grid_size=16),
    "vae": dict(vocab_size=4096, z_channels=32, ch=32, ch_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
                patch_nums=list(var_tokenizer.RELEASE_PATCH_NUMS)),          # 256 px -> 10 scales, 680 tokens
    "var": dict(vocab_size=4096, z_channels=32, num_classes=1000, depth=1, embed_dim=64, num_heads=1,
                patch_nums=list(var_tokenizer.RELEASE_PATCH_NUMS)),
}

# Each family's paper settings: laid one over the other they set both families, and the counts below go on top.
PAPER_PROFILES = ("profiles/paper-llamagen.yaml", "profiles/paper-var.yaml")

# The counts of every stage, tiny; every other value comes from params.yaml and the profiles laid under this.
TINY_COUNTS = {
    "pipeline": {"families": ["llamagen", "var"]},
    "base": {"device": "cpu"},
    "runtime": {"nproc": 1, "precision": "fp32", "torch_compile": False},
    "prepare": {"max_train": 0, "max_test": 0, "test_fraction": 0.25},
    "features": {"n_steps": 40, "batch_size": 8, "width": 8, "warmup_steps": 1, "n_ref": 0},
    "sample_teacher": {f: {"n_samples": 10, "batch_size": 10, "latency_repeats": 1, "throughput_batch": 2}
                       for f in ("llamagen", "var")},
    "build_trajectories": {f: {"n_pairs": 20, "shard_size": 10, "build_batch": 10, "flow_steps": 4, "n_check": 10,
                               "convergence_steps": [2, 4]} for f in ("llamagen", "var")},
    "train_dd1": {f: {"n_steps": 2, "batch_size": 2, "warmup_steps": 1, "ema_decay": 0.0, "eval_every": 1,
                      "n_eval": 10, "eval_batch": 5} for f in ("llamagen", "var")},
    "train_dd2": {f: {"n_gts_samples": 10, "sample_batch": 5, "mlp_steps": 3, "adapt_steps": 1, "head_width": 16,
                      "head_depth": 1, "gts_head_steps": 2, "gts_full_steps": 1, "gts_batch": 2, "n_noise": 1,
                      "n_euler": 2, "n_steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 1, "n_eval": 10,
                      "n_eval_ardiff": 10} for f in ("llamagen", "var")},
    # (one draw: the spread's extra draws are the toy pipeline's to test; one of the two skip-n of the profile)
    "evaluate": {"n_eval": 10, "eval_batch": 5, "latency_repeats": 1, "throughput_batch": 2, "spread_draws": 1,
                 "llamagen": {"skip_n": [106]}},
}


def write_thin_release(folder: str | Path, n_classes: int = 3, per_class: int = 12) -> dict:
    """The four released files (`THIN` sizes, random weights, release formats) and an image folder of 256 px PNGs
    (`n_classes` sub-folders) under `folder`; → the params overlay that points the pipeline at them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    images, labels = _image_folder(folder / "images", n_classes, per_class)
    teacher = {}
    for fam, (tok_file, tok), (net_file, net) in (
            (teachers.LlamaGen, ("vq_ds16_c2i.pt", llamagen.VQModel(**THIN["vq"])),
             ("c2i_B_256.pt", llamagen.GPT(**THIN["gpt"]))),
            (teachers.VAR, ("vae_ch160v4096z32.pth", var_tokenizer.VQVAE(**THIN["vae"])),
             ("var_d16.pth", var.VAR(**THIN["var"])))):
        _nudge(net, fam.teacher_loss_fn(tok), fam.encode(tok, images), labels)
        _save_as_released(tok, folder / tok_file)
        _save_as_released(net, folder / net_file)
        teacher[fam.name] = {"source": "official", "tokenizer_path": str(folder / tok_file),
                             "teacher_path": str(folder / net_file)}
    teacher["llamagen"]["grid_size"] = SIZE // 16
    return {"prepare": {"dataset": "imagefolder", "image_size": SIZE, "imagefolder_path": str(folder / "images")},
            "teacher": teacher, "evaluate": _inception_files(folder, images)}


def _inception_files(folder: Path, images: torch.Tensor) -> dict:
    """The paper profiles' Inception metrics on stand-ins: random weights in torch-fidelity's layout and a
    reference batch in ADM's layout (`arr_0`: a few of the images, NHWC; mu / sigma of their random-weight pool
    features) → the evaluate keys that name them."""
    import numpy as np

    from . import inception

    weights = inception.write_random_weights(folder / inception.WEIGHTS)
    pool = inception.features(inception.load(weights), images[:8])[0]
    mu, sigma = pool.mean(0).numpy(), np.cov(pool.numpy(), rowvar=False)
    np.savez(folder / "VIRTUAL_imagenet256_labeled.npz", arr_0=images[:8].permute(0, 2, 3, 1).numpy(), mu=mu,
             sigma=sigma)
    return {"inception_weights": str(weights), "inception_reference": str(folder / "VIRTUAL_imagenet256_labeled.npz")}


def _image_folder(folder: Path, n_classes: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_classes` sub-folders of 256 px PNGs, a class being a colour on one part of the image, the rest noise;
    → (uint8 images [N, 3, S, S], labels [N])."""
    from PIL import Image

    g, images, labels = torch.Generator().manual_seed(0), [], []
    for c in range(n_classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = torch.rand(SIZE, SIZE, 3, generator=g) * 80
            img[:, (c * SIZE) // n_classes:((c + 1) * SIZE) // n_classes, c % 3] += 150
            img = img.to(torch.uint8)
            Image.fromarray(img.numpy()).save(folder / f"class{c}" / f"{i}.png")
            images.append(img.permute(2, 0, 1))
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def _nudge(model, loss_fn, tokens: torch.Tensor, labels: torch.Tensor, steps: int = 20, batch: int = 8) -> None:
    """A few Adam steps toward the image folder's codes: random weights still, but a teacher that is better than a
    uniform distribution over codes, which train_teacher checks of every teacher, released ones included."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(tokens), (batch,), generator=g)
        opt.zero_grad()
        loss_fn(model, {"tokens": tokens[pick], "labels": labels[pick]}).backward()
        opt.step()
    model.eval()


def run_release_shapes(repo: str | Path, record: str | Path, profiles=PAPER_PROFILES) -> int:
    """Every stage of the pipeline, both families, on `write_thin_release`'s files at `TINY_COUNTS`, in a copy of the
    repository's code and params at `repo` (`python -m dd.stage --all`, as a user without DVC runs it), with
    `profiles` (paths under the repository root, or absolute) laid under the counts: the paper profiles' settings,
    their counts scaled down. Each stage's wall time and peak memory go to `record`. → exit status."""
    import shutil

    import yaml

    src, repo = io.root(), Path(repo)
    for item in ("dd", "notebooks"):
        shutil.copytree(src / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    for item in ("dvc.yaml", "params.yaml"):
        shutil.copy(src / item, repo / item)
    overlay = write_thin_release(repo / "release")
    profiles = [src / f for f in profiles]  # (an absolute path stays itself)
    layers = [*profiles, repo / "release" / "tiny.yaml"]
    for key, value in TINY_COUNTS.items():
        overlay[key] = {**overlay.get(key, {}), **value}
    for f in profiles:  # a profile's performance alignment, scaled down with the rest: at the first generator step
        for fam, dd2 in (yaml.safe_load(Path(f).read_text()).get("train_dd2") or {}).items():
            if dd2.get("align_steps"):
                overlay["train_dd2"][fam] = {**overlay["train_dd2"][fam], "align_at": 1, "align_steps": 1}
    layers[-1].write_text(yaml.safe_dump(overlay, sort_keys=False))
    cmd = [sys.executable, "-m", "dd.stage", "--all", *(a for f in layers for a in ("--profile", str(f))),
           "--record", str(Path(record).resolve())]
    return subprocess.run(cmd, cwd=repo, env={**os.environ, "DD_ROOT": str(repo)}).returncode


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
    ap.add_argument("--pipeline", action="store_true",
                    help="instead: every stage on thin random-weight files at the release's interface shapes")
    ap.add_argument("--profile", action="append", default=[], metavar="YAML",
                    help="with --pipeline: profiles laid under the tiny counts (default: both paper profiles)")
    ap.add_argument("--out", default=None, help="the figures' file under the repository root (default: "
                    "reports/benchmarks/release_loaders.json, with --pipeline release_shapes.json)")
    args = ap.parse_args(argv)
    if args.pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            return run_release_shapes(tmp, io.path(args.out or "reports/benchmarks/release_shapes.json"),
                                      args.profile or PAPER_PROFILES)
    if args.model:
        with tempfile.TemporaryDirectory() as tmp:
            rec = check(args.model, tmp)
        print(json.dumps(rec) if args.json else rec)
        return 0
    rows = [_in_own_process(name) for name in MODELS]
    for r in rows:
        print(f"{r['model']:8s} {r['params'] / 1e6:7.1f}M params, file {r['file_mb']:7.1f} MB: build {r['build_s']} s,"
              f" save {r['save_s']} s, load {r['load_s']} s, run {r['run_s']} s, peak {r['peak_rss_mb']} MB")
    io.write_json(io.path(args.out or "reports/benchmarks/release_loaders.json"),
                  {"device": bench.device_name("cpu"), "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
