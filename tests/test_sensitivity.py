import pytest
import torch

from dd import metrics, sensitivity


@pytest.fixture
def net():
    torch.manual_seed(0)
    return metrics.FeatureNet(in_channels=1, num_classes=3, width=4).eval()


def test_block_features_end_with_the_evaluation_features(net):
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    blocks = sensitivity.block_features(net, x, batch_size=4)
    assert [b.shape for b in blocks] == [(6, 4), (6, 8), (6, 16), (6, 16)]
    assert torch.allclose(blocks[-1], metrics.extract_features(net, x), atol=1e-6)


def test_spaces_zero_on_the_reference_raw_space_is_fid_and_standardising_removes_scale(net):
    g = torch.Generator().manual_seed(1)
    ref = sensitivity.block_features(net, torch.rand(300, 1, 16, 16, generator=g) * 2 - 1)
    other = sensitivity.block_features(net, torch.rand(200, 1, 16, 16, generator=g) * 1.6 - 0.8)
    spaces = sensitivity.Spaces(ref)
    assert all(abs(v) < 1e-6 for v in spaces.distances(ref).values())
    d = spaces.distances(other)
    assert d["fd_penultimate"] == pytest.approx(metrics.frechet_between(other[-1], ref[-1]), rel=1e-9)
    assert d["fd_multiscale"] > 0 and d["fd_penultimate_std"] > 0
    # a per-dimension rescaling of every feature (reference and sample alike) leaves the standardised spaces alone
    s = [torch.rand(b.shape[1], generator=g) + 0.5 for b in ref]
    scaled = sensitivity.Spaces([b * k for b, k in zip(ref, s)]).distances([b * k for b, k in zip(other, s)])
    for key in ("fd_penultimate_std", "fd_multiscale"):
        assert scaled[key] == pytest.approx(d[key], rel=1e-6)
