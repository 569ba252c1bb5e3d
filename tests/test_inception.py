"""dd.inception: Inception metrics from a user's weights file, tested with random weights in the library's layout
(no weights can be downloaded here) and with closed forms."""
import math

import numpy as np
import pytest
import torch

from dd import inception, metrics


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """Random weights in torch-fidelity's layout (about 90 MB)."""
    return inception.write_random_weights(tmp_path_factory.mktemp("inception") / inception.WEIGHTS)


def test_random_weights_in_the_library_layout_run_end_to_end(weights, tmp_path):
    net = inception.load(weights)
    images = torch.rand(5, 1, 32, 32) * 2 - 1  # grey 32 px: replicated to RGB, resized to 299 inside
    pool, logits = inception.features(net, images, batch_size=2)
    assert pool.shape == (5, 2048) and logits.shape == (5, 1008) and pool.dtype == torch.float64
    assert torch.isfinite(pool).all() and torch.isfinite(logits).all()
    again, _ = inception.features(net, inception.data.to_uint8(images))  # uint8 input: the same features
    torch.testing.assert_close(again, pool)
    ref = inception.write_reference(tmp_path / "ref.npz", pool)
    m = inception.sample_metrics(net, ref, images)
    assert m["fid_inception"] == pytest.approx(0, abs=1e-6) and (m["precision"], m["recall"]) == (1.0, 1.0)
    assert m["inception_score"] >= 1 - 1e-9


def test_wrong_or_missing_weights_say_which(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"Inception weights not found: .*{inception.WEIGHTS}"):
        inception.load(tmp_path / "nope.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the Inception layout torch-fidelity expects"):
        inception.load(tmp_path / "other.pth")


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    """N(m1, diag(a)) against N(m2, diag(b)): |m1 - m2|² + Σ (a + b - 2 √(ab)); a set against itself: 0."""
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = ((m1 - m2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert metrics.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    x = torch.randn(500, 6, dtype=torch.float64)
    assert metrics.frechet_between(x, x) == pytest.approx(0, abs=1e-8)


def test_eigen_frechet_distance_equals_the_sqrtm_form():
    """dd.inception.frechet_distance (eigendecompositions) against metrics.frechet_distance (sqrtm) on full-rank
    covariances, and on the diagonal closed form."""
    g = np.random.default_rng(0)
    a, b = g.normal(size=(300, 40)), g.normal(size=(300, 40)) @ g.normal(size=(40, 40)) * 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    m1, m2 = a.mean(0), b.mean(0) + 1
    assert inception.frechet_distance(m1, s1, m2, s2) == pytest.approx(metrics.frechet_distance(m1, s1, m2, s2),
                                                                      rel=1e-8)
    d1, d2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    want = 1.0 + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
    assert inception.frechet_distance(np.zeros(3), np.diag(d1), np.eye(3)[0], np.diag(d2)) == pytest.approx(want)


def test_inception_score_closed_forms():
    """Uniform predictions: IS 1; n confident, equally used classes: IS n; ADM's consecutive splits are averaged."""
    assert inception.inception_score(torch.zeros(40, 1008)) == pytest.approx(1.0)
    onehot = torch.full((40, 1008), -1e4)
    onehot[torch.arange(40), torch.arange(40) % 8] = 0
    assert inception.inception_score(onehot) == pytest.approx(8.0, rel=1e-6)
    two = torch.cat([torch.zeros(16, 1008), onehot[:16]])  # split 1: uniform (1), split 2: 8 classes (8)
    assert inception.inception_score(two, split=16) == pytest.approx(4.5, rel=1e-6)


def test_reference_round_trip_and_adm_layout(tmp_path):
    pool = torch.randn(30, 2048, dtype=torch.float64)
    ref = inception.write_reference(tmp_path / "ref.npz", pool)
    assert np.allclose(ref["mu"], pool.mean(0).numpy()) and torch.equal(ref["feats"], pool)
    again = inception.read_reference(tmp_path / "ref.npz")
    assert np.array_equal(again["sigma"], ref["sigma"]) and again["images"] is None
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)  # ADM: arr_0 NHWC + stats
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=ref["mu"], sigma=ref["sigma"])
    adm = inception.read_reference(tmp_path / "adm.npz")
    assert adm["feats"] is None and adm["images"].shape == (3, 3, 8, 8) and adm["images"].dtype == torch.uint8
    np.savez(tmp_path / "bad.npz", arr_0=images)
    with pytest.raises(ValueError, match=r"needs arrays 'mu' and 'sigma'; it has \['arr_0'\]"):
        inception.read_reference(tmp_path / "bad.npz")
    assert math.isfinite(metrics.frechet_distance(adm["mu"], adm["sigma"], ref["mu"], ref["sigma"]))
