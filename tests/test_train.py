import pytest
import torch
from torch import nn

from dd import train


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(64, generator=g)
    return {"x": x, "y": y}


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 1))


def _loss(model, batch):
    return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()


CFG = train.FitConfig(n_steps=60, batch_size=8, lr=3e-2, warmup_steps=5, ema_decay=0.9, ckpt_every=10, log_every=5)


def test_fit_learns_and_logs(tmp_path):
    data, model = _setup(), _model()
    before = _loss(model.eval(), data).item()
    out = train.fit(model, _loss, data, CFG, tmp_path / "ck.pt")
    assert _loss(model, data).item() < 0.5 * before
    assert [h["step"] for h in out["history"]] == list(range(5, 61, 5))
    assert out["ema"] is not None and out["resumed_from"] == 0


def _interrupted_and_uninterrupted(tmp_path, device="cpu"):
    """(uninterrupted model, model killed at step 33 and resumed, the resumed fit's result)."""
    data = _setup()
    ref = _model()
    train.fit(ref, _loss, data, CFG, tmp_path / "ref.pt", device=device)

    class Killed(Exception):
        pass

    def kill_at_33(model, step):
        if step == 33:
            raise Killed

    with pytest.raises(Killed):
        train.fit(_model(), _loss, data, CFG, tmp_path / "run.pt", device=device, on_step=kill_at_33)
    resumed = _model()
    return ref, resumed, train.fit(resumed, _loss, data, CFG, tmp_path / "run.pt", device=device)


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    ref, resumed, out = _interrupted_and_uninterrupted(tmp_path)
    assert out["resumed_from"] == 30
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_reported_seconds_add_up_over_resumed_runs(tmp_path, monkeypatch):
    """A resumed run reports the training time of the runs before it too (a stage that re-runs on a finished
    checkpoint, e.g. DD2 after a DD1 change, must not report a training that cost nothing)."""
    clock = [0.0]

    def tick():  # every call of the clock is one second later
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(train.time, "perf_counter", tick)
    data = _setup()
    first = train.fit(_model(), _loss, data, CFG, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)["seconds"]
    assert first["seconds"] > 0 and saved <= first["seconds"]
    again = train.fit(_model(), _loss, data, CFG, tmp_path / "ck.pt")  # finished: nothing left to train
    assert again["resumed_from"] == 60 and saved < again["seconds"] <= saved + 3  # a tick or so of its own


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_interrupted_cuda_run_resumes(tmp_path):
    """The checkpoint is read with map_location=cuda: its RNG states (CPU ByteTensors) must go back to the CPU
    (an H100 run of the GPU profile stopped here: "RNG state must be a torch.ByteTensor")."""
    ref, resumed, out = _interrupted_and_uninterrupted(tmp_path, "cuda")
    assert out["resumed_from"] == 30
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fit_probe_is_kept_across_a_resume_and_leaves_training_unchanged(tmp_path):
    """probe(step, weights) sees the EMA, its rows carry the training seconds so far, an interrupted run's rows
    survive in the checkpoint, and probing changes neither the weights nor the RNG stream of the training."""
    data, seen = _setup(), []

    def probe(step, weights):
        seen.append(weights)
        return {"step": step} if step % 20 == 0 else None

    plain = _model()
    train.fit(plain, _loss, data, CFG, tmp_path / "plain.pt")

    class Killed(Exception):
        pass

    def kill_at_33(model, step):
        if step == 33:
            raise Killed

    with pytest.raises(Killed):
        train.fit(_model(), _loss, data, CFG, tmp_path / "run.pt", on_step=kill_at_33, probe=probe)
    probed = _model()
    out = train.fit(probed, _loss, data, CFG, tmp_path / "run.pt", probe=probe)
    assert [r["step"] for r in out["records"]] == [20, 40, 60]  # step 20's row came from the killed run
    assert 0 < out["records"][0]["train_seconds"] < out["records"][-1]["train_seconds"] <= out["seconds"]
    assert seen[-1] is out["ema"] and seen[-1] is not probed
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values()):
        assert torch.equal(a, b)


def test_fit_runs_deterministic_kernels_and_restores_the_setting(tmp_path):
    seen = []

    def record_then_stop(model, step):
        seen.append(torch.are_deterministic_algorithms_enabled())
        if step == 3:
            raise KeyboardInterrupt

    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(KeyboardInterrupt):
        train.fit(_model(), _loss, _setup(), CFG, tmp_path / "ck.pt", on_step=record_then_stop)
    assert seen == [True] * 3 and not torch.are_deterministic_algorithms_enabled()  # restored on the way out
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with train.deterministic("cpu"):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()  # CPU: an op without one would stop
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    data = _setup()
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        value = _loss(model, batch)
        return value * float("nan") if calls["n"] == 13 else value

    with pytest.raises(train.TrainingDiverged, match=r"loss is nan at step 12; last good checkpoint: .*ck.pt \(step 10\)"):
        train.fit(_model(), loss, data, CFG, tmp_path / "ck.pt")
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["step"] == 10


def test_batch_indices_cover_each_epoch_once():
    rows = torch.cat([train.batch_indices(20, 5, s, seed=3) for s in range(4)])
    assert sorted(rows.tolist()) == list(range(20))
    assert not torch.equal(train.batch_indices(20, 5, 0, 3), train.batch_indices(20, 5, 4, 3))


def test_lr_schedule():
    cfg = train.FitConfig(n_steps=100, batch_size=1, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert train.lr_at(0, cfg) == pytest.approx(0.1) and train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(100, cfg) == pytest.approx(0.1) and train.lr_at(55, cfg) == pytest.approx(0.55)


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    data = _setup()
    train.fit(_model(), _loss, data, CFG, tmp_path / "ck.pt")
    other = train.FitConfig(**{**CFG.__dict__, "lr": 1e-3})
    out = train.fit(_model(), _loss, data, other, tmp_path / "ck.pt")
    assert out["resumed_from"] == 0 and out["history"][-1]["step"] == 60


def test_checkpoint_of_other_weights_or_data_is_not_resumed(tmp_path):
    """Same settings, but an upstream stage re-ran: other starting weights or other data start afresh."""
    data = _setup()
    train.fit(_model(), _loss, data, CFG, tmp_path / "ck.pt")
    assert train.fit(_model(), _loss, data, CFG, tmp_path / "ck.pt")["resumed_from"] == 60  # same inputs: resumed
    other_model = _model()
    with torch.no_grad():
        other_model[0].weight.add_(1e-3)
    assert train.fit(other_model, _loss, data, CFG, tmp_path / "ck.pt")["resumed_from"] == 0
    train.fit(_model(), _loss, data, CFG, tmp_path / "ck.pt")
    other_data = {k: v.clone() for k, v in data.items()}
    other_data["y"][-1] += 1e-3
    assert train.fit(_model(), _loss, other_data, CFG, tmp_path / "ck.pt")["resumed_from"] == 0


def test_checkpoint_whose_probe_rows_another_probe_wrote_is_not_resumed(tmp_path):
    """A finished run's probe rows come back with its checkpoint: a probe with other labels or noise (its `key`)
    starts afresh, so a curve never mixes two probes' rows."""
    class Probe:
        def __init__(self, key):
            self.key = key

        def __call__(self, step, weights):
            return {"step": step, "key": self.key} if step % 20 == 0 else None

    data = _setup()
    first = train.fit(_model(), _loss, data, CFG, tmp_path / "ck.pt", probe=Probe("a"))
    again = train.fit(_model(), _loss, data, CFG, tmp_path / "ck.pt", probe=Probe("a"))
    assert again["resumed_from"] == 60 and again["records"] == first["records"]
    other = train.fit(_model(), _loss, data, CFG, tmp_path / "ck.pt", probe=Probe("b"))
    assert other["resumed_from"] == 0 and {r["key"] for r in other["records"]} == {"b"}


def test_bf16_autocast_trains_fp32_weights_close_to_fp32(tmp_path):
    """precision "bf16": the loss runs under bf16 autocast (its matmuls in bf16), the weights, optimizer state and
    EMA stay fp32, and training lands near the fp32 run (bf16 keeps ~3 significant digits)."""
    seen = []

    def loss(model, batch):
        out = model(batch["x"]).squeeze(-1)
        seen.append(out.dtype)
        return ((out.float() - batch["y"]) ** 2).mean()

    data = _setup()
    runs = {}
    for precision in ("fp32", "bf16"):
        model = _model()
        cfg = train.FitConfig(**{**CFG.__dict__, "precision": precision})
        out = train.fit(model, loss, data, cfg, tmp_path / f"{precision}.pt")
        assert all(p.dtype == torch.float32 for p in [*model.parameters(), *out["ema"].parameters()])
        runs[precision] = model.eval()
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16
    again = _model()  # the same seed in the same precision on the same CPU: the same weights, bit for bit
    train.fit(again, loss, data, train.FitConfig(**{**CFG.__dict__, "precision": "bf16"}), tmp_path / "again.pt")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), runs["bf16"].state_dict().values()))
    fp32, bf16 = (_loss(runs[k], data).item() for k in ("fp32", "bf16"))
    assert bf16 < 2 * fp32 + 0.05 and bf16 < 0.5 * _loss(_model().eval(), data).item()
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        train.fit(_model(), loss, data, train.FitConfig(n_steps=1, batch_size=8, lr=1e-3, precision="fp16"),
                  tmp_path / "x.pt")


def test_auto_precision_follows_the_cpu_flags(monkeypatch, tmp_path):
    """runtime.precision "auto": bf16 on a CPU whose /proc/cpuinfo flags include avx512_bf16 or amx_bf16, fp32 on
    one without (or without /proc/cpuinfo); "fp32" / "bf16" are taken as given; autocast follows the resolution."""
    import builtins

    real_open = builtins.open

    def cpuinfo(flags):
        def fake(path, *a, **kw):
            if str(path) == "/proc/cpuinfo":
                import io
                return io.StringIO(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n")
            return real_open(path, *a, **kw)
        return fake

    cpu = torch.device("cpu")
    for flags, want in (("avx512f avx512_bf16", "bf16"), ("amx_tile amx_bf16", "bf16"), ("avx512f", "fp32")):
        monkeypatch.setattr(builtins, "open", cpuinfo(flags))
        train._cpu_flags.cache_clear()  # (read once per process)
        assert train.native_bf16(cpu) == (want == "bf16")
        assert train.resolve_precision("auto", cpu) == want
        assert train.resolve_precision("fp32", cpu) == "fp32" and train.resolve_precision("bf16", cpu) == "bf16"
        with train.autocast(cpu, "auto"):
            assert torch.is_autocast_enabled("cpu") == (want == "bf16")

    def missing(path, *a, **kw):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *a, **kw)
    monkeypatch.setattr(builtins, "open", missing)
    train._cpu_flags.cache_clear()
    assert train.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(builtins, "open", real_open)
    train._cpu_flags.cache_clear()
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        train.resolve_precision("fp16", cpu)


def test_torch_compile_of_the_loss_matches_eager(tmp_path):
    """torch_compile: the loss function (model calls included) is compiled; the weights match the eager run's up to
    the compiler's float reassociation."""
    data, runs = _setup(), {}
    for flag in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))  # (no dropout: same draws either way)
        cfg = train.FitConfig(n_steps=10, batch_size=8, lr=1e-2, seed=2, torch_compile=flag)
        train.fit(model, _loss, data, cfg, tmp_path / f"{flag}.pt")
        runs[flag] = model.state_dict()
    for k in runs[False]:
        assert torch.allclose(runs[False][k], runs[True][k], atol=1e-5), k
