"""ImageNet-standard metrics from Inception weights a user supplies: Inception FID, Inception Score, precision and
recall, comparable with ADM's evaluator and the papers' tables.

The network is torch-fidelity's port of the 2015-12-05 TensorFlow Inception graph (`FeatureExtractorInceptionV3`,
the graph ADM's evaluator runs; TF-compatible bilinear resize to 299 px inside), with its weights read from a file:
torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` or pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(the same layout). Nothing is downloaded. torch-fidelity's package `__init__` imports torchvision (for CLIP), which
this project does not install, so the feature extractor's module is imported without running it (`network_class`).

    net = inception.load("weights-inception-2015-12-05-6726825d.pth")
    pool, logits = inception.features(net, images)          # images [N, C, S, S] in [-1, 1] → [N, 2048], [N, 1008]
    ref = inception.read_reference("VIRTUAL_imagenet256_labeled.npz")   # ADM's reference batch (mu, sigma, arr_0)
    inception.sample_metrics(net, ref, images)               # {"fid_inception", "inception_score", "precision", ...}

Figures as ADM computes them: FID against the reference batch's stored mu / sigma (`frechet_distance`: the same
closed form through eigendecompositions, fast at 2,048 dimensions); IS from the unbiased logits, softmax over 1,008 classes, mean over consecutive splits
of 5,000 (one split for fewer samples); precision / recall on pool features with k = 3 (`metrics.precision_recall`).

References:
    Heusel et al. 2017 (FID); Salimans et al. 2016 (IS); Kynkäänniemi et al. 2019 (precision / recall);
    Dhariwal & Nichol 2021, openai/guided-diffusion `evaluations/evaluator.py` (reference batches, IS splits);
    toshas/torch-fidelity 0.4.0 (`feature_extractor_inceptionv3.py`).
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

from . import data, io, metrics
from .preflight import INCEPTION_WEIGHTS as WEIGHTS, INCEPTION_WHERE as WHERE, REFERENCE_WHERE

IS_SPLIT = 5000  # ADM: consecutive splits of this many samples, mean of their scores
FEATURES = ("2048", "logits_unbiased")


def network_class():
    """torch-fidelity's FeatureExtractorInceptionV3, imported without running torch_fidelity/__init__.py."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            raise ModuleNotFoundError("torch-fidelity is not installed: `make setup` installs it (pip install "
                                      "--no-deps -r requirements-nodeps.txt)")
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = pkg
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def write_random_weights(path, seed: int = 0) -> Path:
    """Random weights in the layout `load` reads (torch-fidelity's network built without loading any, then saved;
    about 90 MB): the metrics' plumbing runs end to end without the real file (the figures mean nothing)."""

    class Unloaded(network_class()):
        def load_state_dict(self, *args, **kwargs):  # the constructor's load of the empty file below is skipped
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({}, path)
    torch.manual_seed(seed)
    net = Unloaded("inception-v3-compat", list(FEATURES), feature_extractor_weights_path=str(path))
    torch.save(net.state_dict(), path)
    return path


def load(path, device="cpu") -> torch.nn.Module:
    """The Inception network with the weights in `path`, strictly; eval mode on `device`. The file is read with
    weights_only first (a file that needs arbitrary unpickling is refused); a wrong layout names its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}; expected {WHERE}")
    io.read_state_dict(path)  # tensors only, or a clear error: torch-fidelity then loads it with weights_only=False
    try:
        net = network_class()("inception-v3-compat", list(FEATURES), feature_extractor_weights_path=str(path))
    except RuntimeError as e:
        raise ValueError(f"{path}: not the Inception layout torch-fidelity expects ({WHERE}): "
                         f"{str(e).splitlines()[0]} {' '.join(str(e).split()[1:40])} ...") from None
    return net.to(device).eval()


@torch.no_grad()
def features(net, images: torch.Tensor, batch_size: int = 100, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, C, S, S] ([-1, 1] floats, or uint8) → (pool features [N, 2048], unbiased logits [N, 1008]),
    float64 on the CPU."""
    pools, logits = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = data.to_channels(x if x.dtype == torch.uint8 else data.to_uint8(x), 3)  # as an image file stores it
        p, lg = net(x.to(device))
        pools.append(p.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(pools), torch.cat(logits)


def inception_score(logits: torch.Tensor, split: int = IS_SPLIT) -> float:
    """exp E_x KL(p(y|x) || p(y)) over consecutive splits of `split` samples (ADM), averaged."""
    scores = []
    for chunk in logits.double().split(split):
        p = chunk.softmax(1)
        kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, p.mean(0, keepdim=True))).sum(1)  # 0 log 0 = 0
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores))


def read_reference(path) -> dict:
    """A reference .npz → {"mu" [2048], "sigma" [2048, 2048], "feats" [M, 2048] or None, "images" uint8 or None}:
    ADM's reference batch (mu / sigma of the whole training set, `arr_0` images NHWC for precision / recall) or a
    file `write_reference` made (`feats` stored). Errors name the file and what it lacks."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception reference not found: {path}; expected {REFERENCE_WHERE}")
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path}: a reference batch needs arrays 'mu' and 'sigma'; it has {sorted(z.files)}")
        out = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64),
               "feats": torch.from_numpy(z["feats"]).double() if "feats" in z else None,
               "images": torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).contiguous() if "arr_0" in z else None}
    if out["mu"].shape != (2048,) or out["sigma"].shape != (2048, 2048):
        raise ValueError(f"{path}: mu {out['mu'].shape} / sigma {out['sigma'].shape} are not Inception pool "
                         f"statistics ((2048,) / (2048, 2048))")
    return out


def write_reference(path, pool: torch.Tensor) -> dict:
    """Reference statistics of real pool features [M, 2048] → `path` (.npz: mu, sigma, feats); returns them as
    `read_reference` does."""
    mu, sigma = metrics.feature_stats(pool)
    io.path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, feats=pool.double().numpy())
    return read_reference(path)


def reference_features(net, ref: dict, batch_size: int = 100, device="cpu") -> torch.Tensor | None:
    """The reference's pool features for precision / recall: stored, or computed from its images (ADM's arr_0)."""
    if ref["feats"] is None and ref["images"] is not None:
        ref["feats"] = features(net, ref["images"], batch_size, device)[0]
    return ref["feats"]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance of `metrics.frechet_distance` for symmetric PSD covariances, through eigendecompositions
    instead of scipy's sqrtm: tr (Σ1 Σ2)^½ = Σ √λ(Σ2^½ Σ1 Σ2^½). At 2,048 dimensions that is about a second where
    sqrtm takes tens (twice when a covariance is singular); the two agree to ~1e-9 relative on full-rank ones."""
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(s2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root @ s1 @ root)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def sample_metrics(net, ref: dict, images: torch.Tensor, k: int = 3, batch_size: int = 100, device="cpu") -> dict:
    """{"fid_inception", "inception_score", "precision", "recall"} of generated images [N, C, S, S] in [-1, 1]
    against a reference (`read_reference` / `write_reference`); precision / recall are None when the reference has
    neither features nor images."""
    pool, logits = features(net, images, batch_size, device)
    mu, sigma = metrics.feature_stats(pool)
    out = {"fid_inception": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
           "inception_score": inception_score(logits)}
    real = reference_features(net, ref, batch_size, device)
    out["precision"], out["recall"] = (None, None) if real is None else \
        metrics.precision_recall(real.float(), pool.float(), k)
    return out
