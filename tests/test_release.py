"""dd.release: the four released teachers at their true size, random weights, through dd's loaders and once through
each model. About a minute and ~4 GB on 2 cores, so it runs only when asked: DD_RELEASE_SIZE=1 make test (or
pytest tests/test_release.py with it set); `python -m dd.release` records the same run's time and memory."""
import os

import pytest

from dd import release

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("DD_RELEASE_SIZE") != "1",
                                 reason="release-size models: set DD_RELEASE_SIZE=1 (about a minute, ~4 GB)")]

WANT = {
    "vq16": ({"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "codebook_size": 16384, "codebook_embed_dim": 8},
             {"tokens": [1, 16, 16], "image": [1, 3, 256, 256]}, 71_883_403),
    "gpt-b": ({"dim": 768, "n_layer": 12, "n_head": 12, "vocab_size": 16384, "num_classes": 1000, "grid_size": 16},
              {"logits": [1, 256, 16384]}, 110_888_448),
    "vae": ({"ch": 160, "ch_mult": [1, 1, 2, 2, 4], "vocab_size": 4096, "z_channels": 32},
            {"tokens": [1, 680], "image": [1, 3, 256, 256]}, None),
    "var-d16": ({"depth": 16, "embed_dim": 1024, "num_heads": 16, "vocab_size": 4096, "num_classes": 1000,
                 "patch_nums": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]}, {"logits": [1, 680, 4096]}, None),
}


@pytest.mark.parametrize("name", release.MODELS)
def test_release_size_model_loads_strictly_and_runs(name, tmp_path):
    config, outputs, n_params = WANT[name]
    rec = release.check(name, tmp_path)  # raises if any tensor came back different
    assert {k: rec["config"][k] for k in config} == config  # sizes inferred from the file's shapes
    assert {k: rec[k] for k in outputs} == outputs
    assert n_params is None or rec["params"] == n_params
