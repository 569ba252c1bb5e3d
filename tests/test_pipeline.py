"""Runs the DVC pipeline end to end at toy size in a temporary copy of the repository."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dd import io

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

# Toy sizes: every stage runs its real code path in seconds.
# t2i (the opt-in text-to-image family, LlamaGen's toy sizes) adds ~3 min: DD_TOY_FAMILIES=llamagen,var,t2i
FAMILIES = tuple(os.environ.get("DD_TOY_FAMILIES", "llamagen,var").split(","))
TOY = {
    "pipeline": {"families": list(FAMILIES)},
    "runtime": {"nproc": 2},  # every training stage under torchrun (2 gloo processes), as a multi-GPU run would
    "prepare": {"max_train": 1500, "max_test": 300},
    "features": {"n_steps": 40, "batch_size": 32, "width": 8, "warmup_steps": 5, "n_ref": 0},
    "train_tokenizer": {**{fam: {"n_steps": 10, "batch_size": 8, "warmup_steps": 2, "codebook_size": 64}
                           for fam in ("llamagen", "t2i")},
                        "var": {"n_steps": 10, "batch_size": 8, "warmup_steps": 2, "vocab_size": 64}},
    "train_teacher": {**{fam: {"dim": 32, "n_layer": 1, "n_head": 2, "n_steps": 20, "batch_size": 32,
                               "warmup_steps": 2} for fam in ("llamagen", "t2i")},
                      "var": {"depth": 1, "embed_dim": 32, "num_heads": 2, "n_steps": 20, "batch_size": 16,
                              "warmup_steps": 2}},
    "sample_teacher": {fam: {"n_samples": 20, "batch_size": 20, "latency_repeats": 1, "throughput_batch": 8}
                       for fam in FAMILIES},
    "build_trajectories": {fam: {"n_pairs": 40, "shard_size": 16, "build_batch": 20, "flow_steps": 8, "n_check": 20,
                                 "convergence_steps": [4, 8],
                                 # t2i: onestep* and skip-n need pairs of each (class, attributes) a caption asks for
                                 **({"n_pairs": 800, "shard_size": 400, "build_batch": 200} if fam == "t2i" else {})}
                           for fam in FAMILIES},
    # (LlamaGen reads its last AR steps from the continuous head, VAR every position from the logits: both paths run)
    # (an EMA of 0.5 over 6 steps keeps 1.6 % of the initial weights: params reject more than 5 %)
    "train_dd1": {fam: {"n_steps": 6, "batch_size": 8, "warmup_steps": 2, "ema_decay": 0.5, "eval_every": 3,
                        "n_eval": 20, "eval_batch": 10,
                        **({"split": 16, "cont_loss": "embed"} if fam == "llamagen" else {})}
                  for fam in FAMILIES},
    "train_dd2": {fam: {"n_gts_samples": 40, "sample_batch": 10, "mlp_steps": 5, "adapt_steps": 2, "head_width": 16,
                        "head_depth": 1, "gts_head_steps": 3, "gts_full_steps": 2, "gts_batch": 8, "n_noise": 2,
                        "n_euler": 2, "n_steps": 3, "batch_size": 4, "warmup_steps": 1, "k_guide": 2, "align_at": 2,
                        "align_steps": 1, "n_eval": 20, "n_eval_ardiff": 10} for fam in FAMILIES},
    "evaluate": {"n_eval": 20, "eval_batch": 10, "latency_repeats": 1, "throughput_batch": 4,
                 "llamagen": {"skip_n": [16]}, "var": {"skip_n": [1]}, "t2i": {"skip_n": [16], "sjd_window": 0}},
}


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repo")
    for item in ("dd", "notebooks"):
        shutil.copytree(ROOT / item, tmp / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TOY.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    if not FMNIST.exists():
        params["prepare"]["dataset"] = "mnist5k"
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, DD_ROOT=str(tmp), PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    dvc = [str(Path(sys.executable).parent / "dvc")]
    subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=tmp, env=env, check=True)
    r = subprocess.run(dvc + ["repro"], cwd=tmp, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, env, dvc


def test_repro_writes_reports_data_and_metrics(toy_repo):
    tmp, _, _ = toy_repo
    for stage in ("01_prepare", "02_features", "09_evaluate", *(f"{nb}_{fam}" for fam in FAMILIES for nb in
                                                  ("03_train_tokenizer", "04_train_teacher", "05_sample_teacher",
                                                   "06_build_trajectories", "07_train_dd1", "08_train_dd2"))):
        assert (tmp / f"reports/{stage}.ipynb").stat().st_size > 0
        assert (tmp / f"reports/{stage}.html").stat().st_size > 0
    x, y, meta = __import__("dd.data", fromlist=["x"]).load_split("train", tmp / "data/prepare")
    assert x.shape == (1500, 1, 32, 32) and meta["counts"] == {"train": 1500, "test": 300}
    m = io.read_json(tmp / "reports/metrics/features.json")
    s = m["sanity"]
    key = "fid_fmnist" if FMNIST.exists() else "fid_mnist5k"
    assert s["train"][key] < s["blurred_test"][key] < s["noise"][key]
    assert 0 < m["test_accuracy"] <= 1
    for fam, steps in ((f, 6 if f == "var" else 64) for f in FAMILIES):
        s = io.read_json(tmp / f"reports/metrics/sample_teacher_{fam}.json")
        assert s["ar_steps"] == steps and s["latency_s"] > 0 and 0 <= s["class_acc"] <= 1 and s["test_nll_bits"] > 0
        b = io.read_json(tmp / f"reports/metrics/build_trajectories_{fam}.json")
        n_pairs = TOY["build_trajectories"][fam]["n_pairs"]
        assert b["n_pairs"] == n_pairs and b["deterministic"] == 1.0 and b["pairs_per_s"] > 0
        assert len(list((tmp / f"data/build_trajectories/{fam}").glob("pairs_*.safetensors"))) == (3 if fam != "t2i" else 2)
        d = io.read_json(tmp / f"reports/metrics/train_dd1_{fam}.json")
        assert set(d["methods"]) >= {"teacher", "onestep*", "dd1 1-step", "dd1 2-step"}
        assert d["methods"]["dd1 1-step"]["steps"] == 1 and d["methods"]["teacher"]["steps"] == steps
        assert d["n_pairs"] == n_pairs and d["train_seconds"] > 0 and d["speedup_tokens_batch1"] > 0
        m = {k: v[key] for k, v in d["methods"].items()}
        assert d["onestep_gap_closed"] == pytest.approx((m["onestep*"] - m["dd1 1-step"]) / (m["onestep*"] - m["teacher"]))
        d2 = io.read_json(tmp / f"reports/metrics/train_dd2_{fam}.json")
        assert set(d2["methods"]) == {"teacher", "dd1 1-step", "ar-diffusion", "dd2 1-step", "dd2 2-step"}
        assert d2["methods"]["dd2 1-step"]["steps"] == 1 and d2["methods"]["dd2 2-step"]["steps"] == 2
        assert d2["cost_seconds"]["dd2"] > 0 and d2["cost_seconds"]["dd1"] > 0 and d2["speedup_tokens_batch1"] > 0
        assert (fam != "var") == ("continuous input" in d2["cost_seconds"]["dd2_parts"])
        for stage, ckpt in (("train_tokenizer", "train_state"), ("train_teacher", "train_state"),
                            ("train_dd1", "train_state"), ("train_dd2", "gts_full_state")):  # trained on 2 processes
            state = torch.load(tmp / f"data/{stage}/{fam}/{ckpt}.pt", weights_only=True)
            assert state["fingerprint"]["world"] == 2 and len(state["rng_ranks"]) == 2, (stage, fam)
        assert not list((tmp / "data").rglob("*.job.pt"))  # launch.call cleans up after itself
        ev = io.read_json(tmp / "reports/metrics/evaluate.json")[fam]
        skip = "skip-1" if fam == "var" else "skip-16"
        assert list(ev) == ["teacher", *(["sjd"] if fam == "llamagen" else []), skip, "onestep*", "dd1 1-step",
                            "dd1 2-step", next(k for k in ev if "mixed" in k), "dd2 1-step", "dd2 2-step"]
        assert ev["teacher"]["steps"] == steps and ev[skip]["steps"] == steps - (1 if fam == "var" else 16)
        assert ev["dd1 1-step"]["fid_fmnist" if FMNIST.exists() else "fid_mnist5k"] > 0
        assert all(m["latency_ms"] > 0 and m["teacher_nll_bits"] > 0 for m in ev.values())
        assert ev["onestep*"]["train_min"] is None and ev["dd1 1-step"]["train_min"] > 0
        if fam == "llamagen":  # SJD: measured passes, its draws against the teacher's
            assert 1 <= ev["sjd"]["passes"] <= ev["sjd"]["steps"] == steps and ev["teacher"]["passes"] == steps
            s = io.read_json(tmp / "reports/metrics/evaluate.json")["sjd"]["llamagen"]
            assert s["draws"] == 3 and s["sjd"]["class_acc_sd"] >= 0 and s["passes"] == ev["sjd"]["passes"]
        # both methods' probe curves (steps 0, 3, 6 / 0, 3) and both read at the smaller budget
        assert [r["step"] for r in io.read_json(tmp / f"data/train_dd1/{fam}/meta.json")["probe_curve"]] == [0, 3, 6]
        c = io.read_json(tmp / "reports/metrics/evaluate.json")["cost"][fam]
        assert c["equal_cost_seconds"] == min(c["budget_seconds"].values()) > 0 and c["n_probe"] == 20
        assert c["final_1step"]["dd2 1-step"]["draws"] == 3 and c["final_1step"]["dd1 1-step"]["sd"] > 0
        assert (tmp / "reports/quality_vs_cost.png").stat().st_size > 0
        # the evaluation reproduces the training stage's own DD1 figure (same labels, same noise)
        key = "fid_fmnist" if FMNIST.exists() else "fid_mnist5k"
        assert abs(ev["dd1 1-step"][key] - d["methods"]["dd1 1-step"][key]) < 1e-6
    if "t2i" not in FAMILIES:
        return
    # t2i: evaluated on held-out captions, every attribute measured for every method
    tok_meta = io.read_json(tmp / "data/train_tokenizer/t2i/meta.json")
    texts = json.loads((tmp / "data/train_tokenizer/t2i/captions.json").read_text())
    assert len(texts) == tok_meta["n_captions"] > tok_meta["num_classes"]  # the training captions come first
    samples = load_file(tmp / "data/sample_teacher/t2i/samples.safetensors")
    assert (samples["labels"] >= tok_meta["num_classes"]).all()
    for name, m in io.read_json(tmp / "reports/metrics/evaluate.json")["t2i"].items():
        assert all(0 <= m[f"{a}_acc"] <= 1 for a in ("class", "size", "position", "brightness")), name


def test_second_repro_is_up_to_date(toy_repo):
    tmp, env, dvc = toy_repo
    r = subprocess.run(dvc + ["status"], cwd=tmp, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "up to date" in r.stdout.lower(), r.stdout


def test_bench_entry_point_prints_the_speed_figures(toy_repo):
    tmp, env, _ = toy_repo
    run = [sys.executable, "-m", "dd.bench", "--family", "llamagen"]
    r = subprocess.run(run + ["--method", "dd1", "--steps", "1", "--batch", "4", "--repeats", "1"], cwd=tmp, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "llamagen / dd1 1-step" in r.stdout and r.stdout.count("latency") == 2 and "speed-up over the teacher" in r.stdout
    assert "per round" in r.stdout
    r = subprocess.run(run + ["--method", "skip"], cwd=tmp, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--method skip needs --steps" in r.stderr
    r = subprocess.run(run + ["--method", "sjd", "--window", "4", "--batch", "4", "--repeats", "1"], cwd=tmp, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "llamagen / sjd" in r.stdout and "forward passes per image" in r.stdout, r.stderr[-2000:]


def test_sensitivity_benchmark_reproduces_the_reported_distances(toy_repo):
    tmp, env, _ = toy_repo
    r = subprocess.run([sys.executable, "-m", "dd.sensitivity", "--out", "reports/benchmarks/fs"], cwd=tmp, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp / "reports/benchmarks/fs.json").read_text())["rows"]
    key = next(k for k in rows[0] if k.startswith("reported_"))
    # evaluate stores tokens: DD2 and (toy LlamaGen, split 16) DD1 decoded unsnapped there, snapped here
    checked = [x for x in rows if x[key] is not None and not x["method"].startswith("dd2")
               and not (x["family"] == "llamagen" and x["method"].startswith("dd1"))]
    assert {x["family"] for x in checked} == {"data", "llamagen", "var"} and len(checked) >= 10
    for x in checked:  # the raw penultimate space is the evaluation's own: same images, same figure
        assert x["fd_penultimate"] == pytest.approx(x[key], rel=1e-4, abs=1e-6), x
    assert (tmp / "reports/benchmarks/fs.png").is_file()



def test_released_dd1_models_load_in_place_of_training(toy_repo, tmp_path):
    """train_dd1.<family>.source: official: the toy's DD1 weights written in the release layouts (LlamaGen-DD
    {"ema", "model"}, VAR-DD {"trainer": {"ema_parameters", "var_wo_ddp"}}) are loaded strictly in place of training
    and handed on unchanged; a file of the other family stops before any compute. (Scoring with Inception metrics:
    tests/test_release_shapes.py, whose paper profiles set them.)"""
    tmp, env, _ = toy_repo
    repo = tmp_path / "repo"
    shutil.copytree(tmp, repo)
    env = dict(env, DD_ROOT=str(repo))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    trained = {}
    for fam in ("llamagen", "var"):
        sd = trained[fam] = load_file(repo / f"data/train_dd1/{fam}/dd1.safetensors")
        torch.save({"ema": sd, "model": sd, "steps": 6} if fam == "llamagen" else
                   {"trainer": {"ema_parameters": sd, "var_wo_ddp": sd}}, repo / f"{fam}-dd.pt")
        params["train_dd1"][fam].update(source="official", path=f"{fam}-dd.pt")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for fam in ("llamagen", "var"):
        r = subprocess.run([sys.executable, "-m", "dd.stage", "train_dd1", "--family", fam], cwd=repo, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert io.read_json(repo / f"reports/metrics/train_dd1_{fam}.json")["train_seconds"] == 0
        loaded = load_file(repo / f"data/train_dd1/{fam}/dd1.safetensors")
        assert loaded.keys() == trained[fam].keys()
        assert all(torch.equal(loaded[k], trained[fam][k]) for k in loaded), fam
    params["train_dd1"]["var"]["path"] = "llamagen-dd.pt"  # the other family's file stops before any compute
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "dd.stage", "train_dd1", "--family", "var"], cwd=repo, env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "train_dd1.var.path = 'llamagen-dd.pt' holds a LlamaGen-DD (DD1) model" in r.stderr
