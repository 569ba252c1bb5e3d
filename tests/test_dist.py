"""Scale-out and faults: `train.fit` under torchrun (2 gloo processes) equals one process at the same global batch,
and a run killed with SIGKILL resumes from its last atomic checkpoint to the weights of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
