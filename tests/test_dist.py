"""Scale-out and faults: `train.fit` under torchrun (2 gloo processes) equals one process at the same global batch,
also when launched the notebooks' way (`dd.launch.call`), and so does DD2's `distill`; a run killed with SIGKILL
resumes from its last atomic checkpoint to the weights of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import sys, time, torch
    from torch import nn
    from dd import dist, train

    out, n_steps, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    dist.init("cpu")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    data = {"x": x, "y": torch.sin(x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))}
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))

    def loss(m, b):
        if sleep:
            time.sleep(sleep)  # slow steps, so that the test can kill the run in the middle
        value = ((m(b["x"]).squeeze(-1) - b["y"]) ** 2).mean()
        return value, {"mse": value.item()}

    cfg = train.FitConfig(n_steps=n_steps, batch_size=16, lr=1e-2, warmup_steps=3, ema_decay=0.9, ckpt_every=5,
                          log_every=5, seed=3)
    res = train.fit(model, loss, data, cfg, out + ".ckpt")
    if dist.is_main():
        torch.save({"model": model.state_dict(), "ema": res["ema"].state_dict(), "history": res["history"],
                    "resumed_from": res["resumed_from"], "world": dist.world()}, out + ".pt")
''')


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _script(tmp_path):
    p = tmp_path / "fit.py"
    p.write_text(SCRIPT)
    return p


def _close(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


def test_two_gloo_processes_equal_one_process_at_the_same_global_batch(tmp_path):
    script = _script(tmp_path)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "20", "0"], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two"), "20", "0"], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["world"] == 1 and b["world"] == 2
    # each process sees 8 of the 16 rows; averaged gradients equal the full batch's up to float32 summation order
    _close(a["model"], b["model"], 1e-5)
    _close(a["ema"], b["ema"], 1e-5)
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["step"] == hb["step"] and abs(ha["loss"] - hb["loss"]) < 1e-5 and abs(ha["mse"] - hb["mse"]) < 1e-5


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_weights(tmp_path):
    script = _script(tmp_path)
    ref = subprocess.run([sys.executable, str(script), str(tmp_path / "ref"), "30", "0"], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = [sys.executable, str(script), str(tmp_path / "run"), "30", "0.05"]
    proc = subprocess.Popen(run, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "run.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:  # the first checkpoint (step 5) is on disk
        time.sleep(0.02)
    time.sleep(0.3)  # a few more steps, past the checkpoint, that the kill throws away
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "run.pt").exists()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 5 <= killed_at < 30
    again = subprocess.run(run, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "run.pt")
    assert b["resumed_from"] == killed_at
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k])
    assert a["history"] == b["history"]


def _tiny_gpt(seed=0):
    from dd import llamagen

    torch.manual_seed(seed)
    return llamagen.GPT(vocab_size=16, num_classes=3, dim=32, n_layer=2, n_head=2, grid_size=3, ffn_hidden=64,
                        token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0)


def test_launch_call_trains_on_two_processes_and_hands_the_weights_back(tmp_path, monkeypatch):
    """What the notebooks do with runtime.nproc: the same `train.fit` call pickled to 2 torchrun processes
    (gloo) leaves the caller's model with the weights one process gives at the same global batch (tolerance 1e-5:
    float32 summation order), the EMA and history coming back as fit's return value."""
    from dd import launch, teachers, train

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    g = torch.Generator().manual_seed(0)
    data = {"tokens": torch.randint(16, (64, 9), generator=g), "labels": torch.randint(3, (64,), generator=g)}
    cfg = train.FitConfig(n_steps=6, batch_size=16, lr=3e-3, warmup_steps=2, ema_decay=0.9, ckpt_every=3,
                          log_every=2, seed=5)
    loss = teachers.LlamaGen.teacher_loss_fn(None)
    runs = {}
    for n in (1, 2):
        model = _tiny_gpt()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        res = launch.call(n, train.fit, model, loss, data, cfg, ckpt_path=tmp_path / f"n{n}" / "state.pt",
                          device="cpu", desc=f"{n} processes")
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not model.training  # fit's eval mode comes back with the weights
        runs[n] = (model.state_dict(), res["ema"].state_dict(), res["history"])
    assert not list((tmp_path / "n2").glob("*.job.pt")) and not list((tmp_path / "n2").glob("*.result.pt"))
    _close(runs[1][0], runs[2][0], 1e-5)
    _close(runs[1][1], runs[2][1], 1e-5)
    assert [h["step"] for h in runs[1][2]] == [h["step"] for h in runs[2][2]]
    for a, b in zip(runs[1][2], runs[2][2]):
        assert abs(a["loss"] - b["loss"]) < 1e-5


def test_launch_call_failure_names_the_job_and_keeps_it(tmp_path, monkeypatch):
    from dd import launch, teachers, train

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    data = {"tokens": torch.randint(16, (8, 9)), "labels": torch.randint(3, (8,))}
    cfg = train.FitConfig(n_steps=2, batch_size=3, lr=1e-3)  # 3 rows do not split across 2 processes
    with pytest.raises(RuntimeError, match=r"fit on 2 processes failed .* kept in .*state\.job\.pt"):
        launch.call(2, train.fit, _tiny_gpt(), teachers.LlamaGen.teacher_loss_fn(None), data, cfg,
                    ckpt_path=tmp_path / "state.pt", device="cpu")
    assert (tmp_path / "state.job.pt").is_file()


def test_distill_on_two_processes_equals_one_process(tmp_path, monkeypatch):
    """DD2's generator / guidance loop under torchrun: every process draws the global batch's labels, noise and
    (t, eps) and keeps its rows, gradients are averaged, so 2 processes give one process's weights (tolerance
    1e-4 after 3 generator and 6 guidance updates: float32 summation order)."""
    from dd import ardiff, dd2, launch, params
    from test_dd2 import distill_config

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    gpt = _tiny_gpt(1)
    torch.manual_seed(2)
    codebook = torch.randn(16, 4)
    phi = ardiff.ContinuousGPT.from_teacher(gpt, 4).eval()
    init = ardiff.ARDiffusion.from_teacher(phi, head_width=32, head_depth=1)
    sampling = params.read_section("sample_teacher", "llamagen", cfg_scale=2.0, top_k=5)
    cfg = distill_config(n_steps=3, batch_size=4, k_guide=2, ckpt_every=2, log_every=1, seed=4)
    runs = {}
    for n in (1, 2):
        gen, guide = ardiff.ARDiffusion(**init.config), ardiff.ARDiffusion(**init.config)
        gen.load_state_dict(init.state_dict()), guide.load_state_dict(init.state_dict())
        res = launch.call(n, dd2.distill, gen, guide, phi, None, codebook, sampling, 3, cfg,
                          ckpt_path=tmp_path / f"n{n}" / "distill.pt", device="cpu")
        runs[n] = (gen.state_dict(), guide.state_dict(), res["ema"].state_dict(), res["history"])
    for a, b in zip(runs[1][:3], runs[2][:3]):
        _close(a, b, 1e-4)
    for a, b in zip(runs[1][3], runs[2][3]):
        assert a["step"] == b["step"] and abs(a["csd"] - b["csd"]) < 1e-4 and abs(a["fcs"] - b["fcs"]) < 1e-4
