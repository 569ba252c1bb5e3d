"""Every stage at the released files' interface shapes, through `python -m dd.stage --all` as a user without DVC
runs it: thin random-weight checkpoints in the release formats (1,000 classes, VQ-16's 16,384 x 8 codebook and
16 x 16 tokens, VAR's 10 scales / 680 tokens and 4,096 x 32 codebook), 256 px images, the paper profiles' settings
with their counts scaled down (`dd.release.TINY_COUNTS`). A profile that drifts out of what the code accepts fails
here. Each stage's wall time and peak memory: `python -m dd.release --pipeline` (reports/benchmarks/). Both
profiles are laid one over the other (each sets its own family's sections) and both families run, so the
stages every family shares run once."""
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from dd import release

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# family -> (tokens per image, code dimension, codebook size, AR steps)
SHAPES = {"llamagen": (256, 8, 16384, 256), "var": (680, 32, 4096, 10)}


def _shapes(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    repo = tmp_path_factory.mktemp("release")
    record = repo / "record.json"
    return repo, release.run_release_shapes(repo, record), record


def test_every_stage_runs_and_is_recorded(run):
    repo, status, record = run
    assert status == 0
    stages = [r["stage"] for r in json.loads(record.read_text())["stages"]]
    per_family = ["train_tokenizer", "train_teacher", "sample_teacher", "build_trajectories", "train_dd1",
                  "train_dd2"]
    assert stages == ["prepare", "features", *(f"{s}@{f}" for s in per_family for f in SHAPES), "evaluate"]
    assert all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in json.loads(record.read_text())["stages"])


@pytest.mark.parametrize("family", SHAPES)
def test_outputs_have_the_release_shapes(run, family):
    repo, status, _ = run
    assert status == 0
    length, dim, vocab, _ = SHAPES[family]
    pairs = sorted((repo / "data" / "build_trajectories" / family).glob("*.safetensors"))
    assert pairs
    got = _shapes(pairs[0])
    assert got["tokens"][1:] == (length,) and got["noise"][1:] == (length, dim)
    samples = _shapes(repo / "data" / "sample_teacher" / family / "samples.safetensors")
    assert samples["tokens"][1:] == (length,)
    dd1 = _shapes(repo / "data" / "train_dd1" / family / "dd1.safetensors")
    head = "output.weight" if family == "llamagen" else "head.weight"
    assert dd1[head][0] == vocab  # the logits head over the released codebook
    meta = json.loads((repo / "data" / "prepare" / "meta.json").read_text())
    assert meta["image_size"] == 256


@pytest.mark.parametrize("family", SHAPES)
def test_evaluate_scores_every_method_of_the_family(run, family):
    repo, status, _ = run
    assert status == 0
    methods = json.loads((repo / "reports" / "metrics" / "evaluate.json").read_text())[family]
    assert {"teacher", "onestep*", "dd1 1-step", "dd1 2-step", "dd2 1-step"} <= set(methods)
    skip = {"llamagen": "skip-106", "var": "skip-1"}[family]  # the profile's paper baselines
    assert skip in methods
    for name, m in methods.items():
        assert m["latency_ms"] > 0 and 0 <= m["class_acc"] <= 1, name
        assert m["fid_inception"] >= 0 and m["inception_score"] >= 1 - 1e-9, name  # the profiles' Inception metrics
    assert (repo / "reports" / "09_evaluate.html").is_file()
    assert json.loads((repo / "reports" / "metrics" / "evaluate.json").read_text())["fid_key"] == "fid_inception"
