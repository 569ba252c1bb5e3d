"""The evaluation feature space: a small classifier trained on the dataset itself, and metrics computed in it.

Inception weights cannot be downloaded here, so Fréchet distance, precision and recall are measured in the
penultimate layer of a CNN the `features` stage trains on the training split. The numbers are therefore named
after the dataset (`fid_fmnist`, ...) and are NOT comparable with ImageNet FID; they rank methods on the same data.

- `frechet_distance`: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), matrix square root by scipy in float64.
- `precision_recall`: k-NN manifolds (k = 3): precision = share of generated features inside some real feature's
  k-NN ball, recall = share of real features inside some generated feature's ball.
- `class_accuracy`: the classifier's accuracy on class-conditional samples against their conditioning labels.

References:
    Heusel et al. 2017 (FID); Kynkäänniemi et al. 2019 (improved precision and recall, k-NN manifolds);
    mseitzer/pytorch-fid `calculate_frechet_distance` (same formula and sqrtm fallback).
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from .data import to_channels

FID_NAMES = {"fashion-mnist": "fid_fmnist", "mnist5k": "fid_mnist5k", "imagefolder": "fid_folder"}


def fid_name(dataset: str) -> str:
    """Metric key of the Fréchet distance in this dataset's own feature space (never 'fid')."""
    return FID_NAMES[dataset]


class FeatureNet(nn.Module):
    """CNN classifier: conv blocks of w, 2w, 4w, 4w channels with 2× pooling between them → global average pool →
    features [B, 4w] → logits. Small on purpose: it trains to ~90% on Fashion-MNIST in a couple of CPU minutes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width)
        chans = [in_channels, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            if i < len(chans) - 2:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [-1, 1] (C is averaged or replicated to in_channels) → [B, 4·width]."""
        return self.body(to_channels(x, self.config["in_channels"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classifier_loss(model: FeatureNet, batch: dict) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on uint8 images with light augmentation (random 2-px shifts, horizontal flips)."""
    x = batch["images"].float().div(127.5).sub(1.0)
    if model.training:
        b = x.shape[0]
        flip = torch.rand(b, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        dx, dy = torch.randint(-2, 3, (2,)).tolist()
        x = torch.roll(F.pad(x, (2, 2, 2, 2), value=-1.0), (dy, dx), (2, 3))[..., 2:-2, 2:-2]
    logits = model(x)
    loss = F.cross_entropy(logits, batch["labels"])
    return loss, {"acc": (logits.argmax(1) == batch["labels"]).float().mean().item()}


@torch.no_grad()
def run_batched(fn, images: torch.Tensor, batch_size: int = 500, device="cpu") -> torch.Tensor:
    """Apply fn to images in batches; uint8 inputs are mapped to [-1, 1] first. Returns CPU float tensors."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].to(device)
        x = x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x.float()
        out.append(fn(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def extract_features(net: FeatureNet, images: torch.Tensor, batch_size: int = 500, device="cpu") -> torch.Tensor:
    """images: [N, C, H, W] uint8 or [-1, 1] float → features [N, F] (float32, CPU)."""
    net.eval().to(device)
    return run_batched(net.features, images, batch_size, device)


def feature_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[N, F] → (μ [F], Σ [F, F]) in float64, Σ with the unbiased (N − 1) normalisation."""
    f = feats.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    with warnings.catch_warnings():  # a singular product is handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: regularise both, as pytorch-fid does
        off = np.eye(len(s1)) * eps
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real  # imaginary parts are numerical noise for PSD inputs
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_between(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [N, F] and [M, F]."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


def _knn_radii(x: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Distance of each row of x [N, F] to its k-th nearest other row."""
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i: i + chunk], x, compute_mode="use_mm_for_euclid_dist")
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])  # k + 1: the row itself is at distance 0
    return torch.cat(radii)


def _inside(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Whether each query row lies in at least one ball (ref row, radius)."""
    hits = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i: i + chunk], ref, compute_mode="use_mm_for_euclid_dist")
        hits.append((d <= radii[None]).any(1))
    return torch.cat(hits)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision and recall of fake features [M, F] against real features [N, F]."""
    real, fake = real.float(), fake.float()
    precision = _inside(fake, real, _knn_radii(real, k)).double().mean().item()
    recall = _inside(real, fake, _knn_radii(fake, k)).double().mean().item()
    return precision, recall


def class_accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size=500, device="cpu"):
    net.eval().to(device)
    pred = run_batched(lambda x: net(x).argmax(1).float(), images, batch_size, device).long()
    return (pred == labels.cpu()).double().mean().item()


def sample_metrics(net: FeatureNet, ref: dict, images: torch.Tensor, labels: torch.Tensor | None,
                   dataset: str, k: int = 3, device="cpu") -> dict:
    """All feature-space metrics of generated images against the reference (test-split) statistics.

    ref: {"mu", "sigma", "feats"} as written by the features stage.
    """
    feats = extract_features(net, images, device=device)
    mu, sigma = feature_stats(feats)
    out = {fid_name(dataset): frechet_distance(mu, sigma, ref["mu"].numpy(), ref["sigma"].numpy())}
    out["precision"], out["recall"] = precision_recall(ref["feats"], feats, k)
    if labels is not None:
        out["class_acc"] = class_accuracy(net, images, labels, device=device)
    return out


def load_feature_space(folder: str = "data/features", device="cpu"):
    """→ (FeatureNet in eval mode, ref dict, meta) from the features stage."""
    from . import io

    folder = io.path(folder)
    weights, meta = io.read_checked(folder, "classifier.safetensors")
    net = FeatureNet(**meta["config"])
    net.load_state_dict(weights)
    ref, _ = io.read_checked(folder, "reference.safetensors")
    return net.eval().to(device), ref, meta


def blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur of float images [B, C, H, W] (the sanity table's "worse" reference)."""
    r = max(1, int(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = images.shape[1]
    x = F.pad(images, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def patchwork(images: torch.Tensor, labels: torch.Tensor, patch: int, generator: torch.Generator | None = None,
              out_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class patchwork of real images: every patch × patch block of output image i is the same block of a random
    image of class out_labels[i] (default: labels), drawn independently per block. It is `onestep*` applied to
    pixels (each position from its per-class marginal, no correlation between positions), so its distance from the
    test split shows how much a metric notices lost inter-position structure. images [N, C, H, W] (H, W multiples
    of patch), labels [N] → [len(out_labels), C, H, W]."""
    out_labels = labels if out_labels is None else out_labels
    N, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"patchwork: image size {H}x{W} is not a multiple of patch {patch}")
    blocks = images.unfold(2, patch, patch).unfold(3, patch, patch)  # [N, C, H/p, W/p, p, p]
    out = torch.empty(len(out_labels), *blocks.shape[1:], dtype=images.dtype)
    for c in out_labels.unique().tolist():
        pool = (labels == c).nonzero().squeeze(1)
        rows = (out_labels == c).nonzero().squeeze(1)
        if len(pool) == 0:
            raise ValueError(f"patchwork: no image of class {c}")
        src = pool[torch.randint(len(pool), (len(rows), H // patch, W // patch), generator=generator)]
        i, j = torch.meshgrid(torch.arange(H // patch), torch.arange(W // patch), indexing="ij")
        out[rows] = blocks[src, :, i, j].permute(0, 3, 1, 2, 4, 5)  # [R, h, w, C, p, p] → [R, C, h, w, p, p]
    return out.permute(0, 1, 2, 4, 3, 5).reshape(len(out_labels), C, H, W)


def marginal_tv(tokens: torch.Tensor, ref_tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-position total variation between the token frequencies of tokens [N, L] and ref_tokens [M, L] → [L]
    (0: identical marginals; the sampling-noise floor of N draws is well above 0 for large vocabularies)."""
    def freq(t):
        counts = torch.zeros(t.shape[1], vocab_size, dtype=torch.float64)
        counts.scatter_add_(1, t.long().cpu().T, torch.ones(t.shape[1], t.shape[0], dtype=torch.float64))
        return counts / t.shape[0]
    return 0.5 * (freq(tokens) - freq(ref_tokens)).abs().sum(-1)
