import numpy as np
import pytest
import torch

from dd import metrics


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rotation_invariant_and_zero_on_self():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    s = a @ a.T + np.eye(6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    mu = rng.normal(size=6)
    assert metrics.frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-8)
    d = metrics.frechet_distance(mu, s, 0 * mu, np.eye(6))
    assert metrics.frechet_distance(q @ mu, q @ s @ q.T, 0 * mu, np.eye(6)) == pytest.approx(d, rel=1e-8)


def test_feature_stats_unbiased():
    f = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    mu, s = metrics.feature_stats(f)
    assert np.allclose(s, np.cov(f.numpy().astype(np.float64).T)) and np.allclose(mu, f.double().mean(0).numpy())


def test_precision_recall_identical_disjoint_and_mode_dropping():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 4, generator=g)
    assert metrics.precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    far = real + 100
    assert metrics.precision_recall(real, far, k=3) == (0.0, 0.0)
    # generated samples covering only half of the real distribution: precise but recall ~ 1/2
    half = real[real[:, 0] > 0]
    p, r = metrics.precision_recall(real, half, k=3)
    assert p == 1.0 and 0.35 < r < 0.65


def test_feature_net_shapes_and_channel_mapping():
    net = metrics.FeatureNet(in_channels=1, num_classes=7, width=8).eval()
    x1, x3 = torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32)
    assert net.features(x1).shape == (2, 32) and net(x1).shape == (2, 7)
    assert torch.allclose(net(x3.mean(1, keepdim=True)), net(x3), atol=1e-6)


def test_class_accuracy_and_sample_metrics():
    torch.manual_seed(0)
    net = metrics.FeatureNet(in_channels=1, num_classes=2, width=8).eval()
    imgs = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8)
    pred = net(imgs.float() / 127.5 - 1).argmax(1)
    assert metrics.class_accuracy(net, imgs, pred) == 1.0
    assert metrics.class_accuracy(net, imgs, 1 - pred) == 0.0
    feats = metrics.extract_features(net, imgs)
    mu, sigma = metrics.feature_stats(feats)
    ref = {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma), "feats": feats}
    out = metrics.sample_metrics(net, ref, imgs, pred, "fashion-mnist")
    assert out["fid_fmnist"] == pytest.approx(0, abs=1e-6) and out["class_acc"] == 1.0 and out["precision"] == 1.0


def test_blur_preserves_constants_and_smooths():
    c = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(metrics.blur(c), c, atol=1e-6)
    x = torch.zeros(1, 1, 9, 9)
    x[..., 4, 4] = 1
    y = metrics.blur(x, 1.0)
    assert y.max() < 0.2 and y.sum() == pytest.approx(1.0, abs=1e-5)


def test_frechet_between_is_the_squared_mean_shift_for_equal_covariances():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, generator=g, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0], dtype=torch.float64)
    assert abs(metrics.frechet_between(a, a + shift) - shift.pow(2).sum().item()) < 1e-6
    assert abs(metrics.frechet_between(a, a)) < 1e-6


def test_marginal_tv_closed_form():
    a = torch.tensor([[0, 1], [0, 1], [2, 1], [2, 3]])
    assert torch.equal(metrics.marginal_tv(a, a, 4), torch.zeros(2, dtype=torch.float64))
    b = torch.tensor([[1, 0], [1, 0]])  # position 0: {0: .5, 2: .5} vs {1: 1} → 1; position 1: {1: .75, 3: .25} vs {0: 1}
    assert torch.allclose(metrics.marginal_tv(a, b, 4), torch.tensor([1.0, 1.0], dtype=torch.float64))
    c = torch.tensor([[0, 1]])  # position 0: {0: .5, 2: .5} vs {0: 1} → .5; position 1: {1: .75, 3: .25} vs {1: 1} → .25
    assert torch.allclose(metrics.marginal_tv(a, c, 4), torch.tensor([0.5, 0.25], dtype=torch.float64))


def test_patchwork_takes_every_block_from_an_image_of_the_same_class():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    assert torch.equal(metrics.patchwork(x, torch.tensor([0, 1]), 4), x)  # one image per class: itself
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 8, 12, generator=g), torch.randint(3, (40,), generator=g)
    want = torch.tensor([2, 0, 1, 1])
    out = metrics.patchwork(x, y, 4, g, out_labels=want)
    assert out.shape == (4, 3, 8, 12)
    sources = set()
    for n in range(4):
        for i in range(2):
            for j in range(3):
                block = out[n, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
                src = [m for m in range(40) if torch.equal(x[m, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4], block)]
                assert src and all(y[m] == want[n] for m in src)
                sources.update(src)
    assert len(sources) > 6  # blocks come from many different images
    with pytest.raises(ValueError, match="multiple of patch"):
        metrics.patchwork(x, y, 5)
