"""Tests for dd.dd2 (DD2: the generator, CSD distillation, its config, sampling).

Tiny random teachers of both families (tests/test_ardiff.py) check the wiring (causality, the CSD loss's fixed
point, exact resume, the NaN guard); the acceptance test distils the enumerable toy LlamaGen teacher of
tests/test_dd1.py and compares the one-step generator with onestep*.
"""
import copy
import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn as nn

from dd import ardiff, baselines, dd2, flow, llamagen, params, train
from test_ardiff import SAMPLING, tiny_setup

# the train_dd2 knobs of a DistillConfig at the values these tests were written for
DISTILL = dict(lr_gen=1e-4, lr_guide=2e-4, warmup_steps=0, lr_gen_decay_to=1.0, teacher_prefix="continuous", k_guide=5,
               align_at=0, align_steps=0, k_after=2, n_noise=4, t_min=0.02, t_max=0.98, ema_max=0.9999,
               csd_weight="token", seed=0, precision="fp32")


def distill_config(n_steps, batch_size, **kw) -> dd2.DistillConfig:
    return dd2.DistillConfig(n_steps=n_steps, batch_size=batch_size, **{**DISTILL, **kw})


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_generator_is_causal_in_the_noise(family):
    """q_i depends on eps_i and the noise of EARLIER AR steps only (Jacobian blocks), and on all of those."""
    tok, gpt, phi, codebook = tiny_setup(family)
    gen = ardiff.ARDiffusion.from_teacher(phi, head_width=32, head_depth=2)
    for p in gen.head.parameters():  # a head that is not zero, so the noise reaches the output
        nn.init.normal_(p, std=0.3)
    L, D = gen.L, gen.D
    eps = torch.randn(1, L, D)
    jac = torch.autograd.functional.jacobian(lambda e: dd2.generate(gen, tok, e, torch.tensor([1])), eps)
    dep = jac[0, :, :, 0].abs().sum((1, 3)) > 0  # [L out, L in]
    step = torch.tensor([i for i, (a, b) in enumerate(zip([0, *gen.ends], gen.ends)) for _ in range(a, b)])
    allowed = (step[None, :] < step[:, None]) | torch.eye(L, dtype=torch.bool)
    assert not (dep & ~allowed).any()
    assert dep.diagonal().all() and dep[step >= 1][:, 0].all()  # every later position reads the first noise


def test_csd_loss_and_gradient_vanish_when_the_guidance_is_exact():
    """If ψ's conditional score equals the teacher's, the SiD loss and its gradient are zero; otherwise not."""
    torch.manual_seed(0)
    B, L, V, D = 3, 5, 7, 2
    codebook, logp = torch.randn(V, D), torch.randn(B, L, V).log_softmax(-1)

    class Exact(nn.Module):  # a guidance network whose velocity is the teacher's closed form
        def __init__(self, lp):
            super().__init__()
            self.lp = lp

        def velocity(self, x, t, f):
            return flow.velocity(x.reshape(-1, D), t.reshape(-1), self.lp.reshape(-1, V), codebook).view(x.shape)

    z = torch.randn(B, L, D, requires_grad=True)
    loss, _ = dd2.csd_loss(z, logp, Exact(logp), None, codebook)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and z.grad.abs().max() < 1e-5
    z.grad = None
    loss, logs = dd2.csd_loss(z, logp, Exact(torch.randn(B, L, V)), None, codebook)
    loss.backward()
    assert logs["gap"] > 1e-3 and z.grad.abs().max() > 1e-3


def test_csd_weight_normalises_per_token_or_per_sequence():
    """ω = 1 / mean |z − m_Φ| over D (per token) or over L and D (per sequence); the same draws otherwise."""
    torch.manual_seed(0)
    B, L, V, D = 3, 5, 7, 2
    codebook, logp, z = torch.randn(V, D), torch.randn(B, L, V).log_softmax(-1), torch.randn(B, L, D)

    class Zero(nn.Module):  # ψ's velocity 0: m_ψ = x_t + 0
        def velocity(self, x, t, f):
            return torch.zeros_like(x)

    def manual(dims):
        torch.manual_seed(1)
        t, _, x = ardiff.noised(z, 0.02, 0.98)
        m_real = flow.posterior_mean(x.reshape(-1, D), t.reshape(-1), logp.reshape(-1, V), codebook).view(B, L, D)
        w = 1 / (z - m_real).abs().mean(dims, keepdim=True)
        return (w * (m_real - x) * (x - z)).sum(-1).mean()

    losses = {}
    for weight, dims in (("token", (-1,)), ("sequence", (-2, -1))):
        torch.manual_seed(1)
        losses[weight], _ = dd2.csd_loss(z, logp, Zero(), None, codebook, weight=weight)
        torch.testing.assert_close(losses[weight], manual(dims))
    assert abs(losses["token"] - losses["sequence"]) > 1e-3


def test_generator_lr_warms_up_then_decays_to_its_final_fraction(tmp_path):
    """lr_gen_decay_to = 1 keeps the rate constant after the warm-up; below 1 a cosine takes it from lr_gen (first
    update after the warm-up) down to lr_gen · lr_gen_decay_to (last update), never rising; distill applies it."""
    const = distill_config(n_steps=20, batch_size=4, lr_gen=1e-3, warmup_steps=4)
    assert [dd2.gen_lr(const, s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(dd2.gen_lr(const, s) == 1e-3 for s in range(4, 20))
    decay = distill_config(n_steps=20, batch_size=4, lr_gen=1e-3, warmup_steps=4, lr_gen_decay_to=0.1)
    lrs = [dd2.gen_lr(decay, s) for s in range(20)]
    assert lrs[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3]) and lrs[-1] == pytest.approx(1e-4)
    assert lrs[11] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    tok, gpt, phi, codebook = tiny_setup("llamagen")
    gen, guide = (ardiff.ARDiffusion.from_teacher(phi, head_width=16, head_depth=1) for _ in range(2))
    cfg = distill_config(n_steps=3, batch_size=2, k_guide=1, lr_gen=1e-3, lr_gen_decay_to=0.25, log_every=1)
    out = dd2.distill(gen, guide, phi, tok, codebook, SAMPLING["llamagen"], 3, cfg, tmp_path / "d.pt")
    assert [h["lr_gen"] for h in out["history"]] == pytest.approx([1e-3, 6.25e-4, 2.5e-4])


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_teacher_prefix_codes_gives_the_teacher_snapped_prefixes(family, tmp_path, monkeypatch):
    """teacher_prefix = "codes": the CSD target is the teacher's conditional given the generator's samples snapped to
    their nearest codes (and "continuous": given the samples themselves); the guidance network still reads them as
    they are."""
    tok, gpt, phi, codebook = tiny_setup(family)
    seen, real = [], ardiff.teacher_logp

    def spy(teacher, tok_, x, labels, sampling):
        seen.append(x.clone())
        return real(teacher, tok_, x, labels, sampling)

    monkeypatch.setattr(ardiff, "teacher_logp", spy)
    for prefix in ("codes", "continuous"):
        seen.clear()
        gen, guide = (ardiff.ARDiffusion.from_teacher(phi, head_width=16, head_depth=1) for _ in range(2))
        cfg = distill_config(n_steps=2, batch_size=3, k_guide=1, teacher_prefix=prefix)
        dd2.distill(gen, guide, phi, tok, codebook, SAMPLING[family], 3, cfg, tmp_path / f"{prefix}.pt")
        x = torch.cat(seen).reshape(-1, 1, codebook.shape[1])
        off_code = (x - codebook).abs().amax(-1).min(1).values  # 0: x is a code exactly
        assert len(seen) == 2 and ((off_code == 0).all() if prefix == "codes" else (off_code > 1e-4).all())
    with pytest.raises(ValueError, match="teacher_prefix"):
        dd2.distill(gen, guide, phi, tok, codebook, SAMPLING[family], 3,
                    distill_config(n_steps=1, batch_size=3, teacher_prefix="code"), tmp_path / "bad.pt")


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_distill_resumes_exactly_and_stops_on_nan(family, tmp_path, monkeypatch):
    """A run interrupted after its step-2 checkpoint (across the performance alignment) and started again ends with
    the same weights and history as an uninterrupted one; a NaN stops it with the step and the checkpoint."""
    tok, gpt, phi, codebook = tiny_setup(family)
    init = ardiff.ARDiffusion.from_teacher(phi, head_width=32, head_depth=1)
    cfg = distill_config(n_steps=4, batch_size=4, k_guide=2, align_at=2, align_steps=2, k_after=1,
                            ckpt_every=2, log_every=1)

    def fresh():
        gen, guide = ardiff.ARDiffusion(**init.config), ardiff.ARDiffusion(**init.config)
        gen.load_state_dict(init.state_dict()), guide.load_state_dict(init.state_dict())
        return gen, guide

    def run(path):
        gen, guide = fresh()
        out = dd2.distill(gen, guide, phi, tok, codebook, SAMPLING[family], 3, cfg, path,
                          on_step=lambda step, ema: {"step": step} if step % 2 else None)
        return (out["ema"].state_dict(), guide.state_dict(), [h["csd"] for h in out["history"]], out["aligned"],
                out["records"], out["seconds"])

    full = run(tmp_path / "full.pt")
    calls, csd = [0], dd2.csd_loss

    def killed_at_step_3(*a, **kw):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return csd(*a, **kw)

    monkeypatch.setattr(dd2, "csd_loss", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt")
    monkeypatch.setattr(dd2, "csd_loss", csd)
    cut = torch.load(tmp_path / "cut.pt", weights_only=True)
    assert cut["step"] == 2
    resumed = run(tmp_path / "cut.pt")
    assert full[3] and resumed[3] and full[2] == resumed[2]
    steps = [[r["step"] for r in out[4]] for out in (full, resumed)]
    assert steps == [[1, 3], [1, 3]]  # on_step's records before the cut survive it
    assert 0 < resumed[4][0]["train_seconds"] < resumed[4][1]["train_seconds"] <= resumed[5]
    assert resumed[5] > cut["seconds"] > 0  # the time before the cut counts
    for a, b in ((full[0], resumed[0]), (full[1], resumed[1])):
        assert all(torch.equal(a[k], b[k]) for k in a)

    gen, guide = ardiff.ARDiffusion.from_teacher(phi, 32, 1), ardiff.ARDiffusion.from_teacher(phi, 32, 1)
    with torch.no_grad():
        gen.head.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(train.TrainingDiverged, match=r"loss is nan at generator step 0; last good checkpoint"):
        dd2.distill(gen, guide, phi, tok, codebook, SAMPLING[family], 3, cfg, tmp_path / "nan.pt")


def test_alignment_before_the_first_update(tmp_path):
    """align_at 0 with align_steps > 0 aligns before the first generator update (how a converged run is aligned,
    paper App. C.3): ψ alone takes align_steps updates, then k_after per generator update; align_steps 0: none."""
    tok, gpt, phi, codebook = tiny_setup("var")
    counts = {}
    for align_steps in (0, 3):
        gen, guide = ardiff.ARDiffusion.from_teacher(phi, 32, 1), ardiff.ARDiffusion.from_teacher(phi, 32, 1)
        cfg = distill_config(n_steps=2, batch_size=3, k_guide=2, align_at=0, align_steps=align_steps, k_after=1,
                                log_every=1)
        out = dd2.distill(gen, guide, phi, tok, codebook, SAMPLING["var"], 3, cfg, tmp_path / f"a{align_steps}.pt")
        counts[align_steps] = ([h["guide_updates"] for h in out["history"]], out["aligned"])
    assert counts == {0: ([2, 4], False), 3: ([4, 5], True)}


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_multistep_sampling_keeps_the_generator_prefix(family):
    tok, gpt, phi, codebook = tiny_setup(family)
    gen = ardiff.ARDiffusion.from_teacher(phi, 32, 1).eval()
    eps, labels = torch.randn(6, gen.L, gen.D), torch.randint(3, (6,))
    one_tok, one = dd2.sample_multistep(gen, gpt, tok, eps, labels, codebook, 1, SAMPLING[family])
    torch.testing.assert_close(one, dd2.generate(gen, tok, eps, labels))
    assert torch.equal(one_tok, flow.nearest_code(one.reshape(-1, gen.D), codebook).view(6, -1))
    k = 2
    toks, emb = dd2.sample_multistep(gen, gpt, tok, eps, labels, codebook, k, SAMPLING[family],
                                     torch.Generator().manual_seed(0))
    first = ([0, *gen.ends])[len(gen.ends) - (k - 1)]
    torch.testing.assert_close(emb[:, :first], one[:, :first])
    assert torch.equal(toks[:, :first], one_tok[:, :first])
    torch.testing.assert_close(emb[:, first:], codebook[toks[:, first:]])
    with pytest.raises(ValueError, match="k must be in"):
        dd2.sample_multistep(gen, gpt, tok, eps, labels, codebook, len(gen.ends) + 1, SAMPLING[family])


# ---- acceptance: the one-step generator on an enumerable teacher ------------------------------------------------

def test_dd2_generator_beats_onestep_star_on_enumerable_teacher(tmp_path):
    """The toy teacher of tests/test_dd1.py (L = 4 tokens, V = 4 codes on the unit circle, 2 classes, 512 outcomes
    with exact probabilities). The whole DD2 recipe at toy size: continuous input (MLP fit), GTS tuning on teacher
    samples, CSD distillation; then TV of the one-step generator's snapped samples to the exact joint, against
    onestep* (at best the product of the per-class marginals, ~0.44 away) and the AR-diffusion initialiser used
    as a one-step generator (one Euler jump: the conditional means, ~0.85 away)."""
    V, K, L, D = 4, 2, 4, 2
    torch.manual_seed(0)
    teacher = llamagen.GPT(vocab_size=V, num_classes=K, dim=32, n_layer=2, n_head=2, grid_size=2)
    with torch.no_grad():
        for p in teacher.parameters():
            if p.dim() >= 2:
                p.normal_(0, 2.0 / math.sqrt(p.shape[-1]) if p.shape[-1] > V else 2.0)
    teacher.eval().requires_grad_(False)
    ang = torch.arange(V) * 2 * math.pi / V
    codebook = torch.stack([ang.cos(), ang.sin()], 1)
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    with torch.no_grad():
        joint = torch.stack([teacher.logits(seqs, torch.full((len(seqs),), y)).log_softmax(-1)
                             .gather(-1, seqs[..., None]).sum((1, 2)).exp() for y in range(K)])  # [K, 256]
    place = V ** torch.arange(L - 1, -1, -1)

    def tv(tokens, labels):  # mean over classes of TV(empirical joint, exact joint)
        h = torch.zeros(K, V ** L).index_put_((labels, (tokens * place).sum(1)), torch.ones(len(labels)),
                                              accumulate=True)
        return (0.5 * (h / h.sum(1, keepdim=True) - joint).abs().sum(1)).mean().item()

    def snapped(x):
        return flow.nearest_code(x.reshape(-1, D), codebook).view(len(x), L)

    sampling = params.read_section("sample_teacher", "llamagen", cfg_scale=1.0)
    g = torch.Generator().manual_seed(1)
    N, M = 4000, 4000
    labels = torch.randint(K, (N,), generator=g)
    tokens = teacher.generate(labels, generator=g)
    phi = ardiff.ContinuousGPT.from_teacher(teacher, D, 64)
    ardiff.fit_input_mlp(phi, teacher.tok_embeddings.weight, codebook, 300, lr=1e-2)
    phi.eval().requires_grad_(False)
    data = {"tokens": tokens, "labels": labels}
    assert ardiff.kl_to_teacher(teacher, codebook)(phi, data)[0] < 1e-3

    ar = ardiff.ARDiffusion.from_teacher(phi, 64, 2)
    loss = ardiff.gts_loss(phi, None, codebook, sampling, 4)
    ar.backbone.requires_grad_(False)
    train.fit(ar, loss, data, train.FitConfig(n_steps=300, batch_size=256, lr=3e-3, ckpt_every=10 ** 9),
              tmp_path / "head.pt")
    ar.backbone.requires_grad_(True)
    train.fit(ar, loss, data, train.FitConfig(n_steps=100, batch_size=256, lr=1e-3, ckpt_every=10 ** 9, seed=1),
              tmp_path / "full.pt")
    ar.eval()
    y = torch.randint(K, (M,), generator=g)
    tv_ardiff = tv(snapped(ardiff.sample(ar, None, y, 10, g)), y)  # the multi-step AR-diffusion sampler

    gen, guide = copy.deepcopy(ar), copy.deepcopy(ar)
    cfg = distill_config(n_steps=200, batch_size=256, lr_gen=1e-3, lr_guide=2e-3, warmup_steps=20, k_guide=3,
                            ckpt_every=10 ** 9)
    out = dd2.distill(gen, guide, phi, None, codebook, sampling, K, cfg, tmp_path / "distill.pt")
    eps = torch.randn(M, L, D, generator=g)
    with torch.no_grad():
        tv_init = tv(snapped(dd2.generate(ar, None, eps, y)), y)
        tv_dd2 = tv(snapped(dd2.generate(out["ema"], None, eps, y)), y)
    tv_star = tv(baselines.onestep_star(tokens, M, g, labels, y, V), y)
    exact = torch.stack([torch.multinomial(joint[c], 1, generator=g)[0] for c in y.tolist()])
    tv_floor = tv(seqs[exact], y)  # a perfect sampler with M samples (~0.05)
    assert tv_ardiff < tv_floor + 0.1, (tv_ardiff, tv_floor)  # GTS learnt the teacher's conditionals
    assert tv_init > 0.7 and tv_star > 0.3, (tv_init, tv_star)
    # distillation took the generator from the conditional means (~0.85) past onestep*'s product of marginals
    # (0.31–0.38 here, against 0.44, after 200 generator updates; it keeps improving with more)
    assert tv_dd2 < tv_init - 0.3 and tv_dd2 < tv_star - 0.03, (tv_dd2, tv_star, tv_init, tv_floor)


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_distill_under_bf16_autocast_keeps_the_flow_math_in_fp32(family, tmp_path):
    """precision "bf16" (the GPU profile): the networks run under autocast, the teacher's closed-form posterior and
    the losses see fp32 inputs (no dtype clash), the weights stay fp32 and finite."""
    tok, gpt, phi, codebook = tiny_setup(family)
    gen, guide = ardiff.ARDiffusion.from_teacher(phi, 32, 1), ardiff.ARDiffusion.from_teacher(phi, 32, 1)
    cfg = distill_config(n_steps=2, batch_size=4, k_guide=1, log_every=1, precision="bf16")
    out = dd2.distill(gen, guide, phi, tok, codebook, SAMPLING[family], 3, cfg, tmp_path / "bf16.pt")
    for p in [*gen.parameters(), *guide.parameters(), *out["ema"].parameters()]:
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    assert len(out["history"]) == 2 and all(math.isfinite(h["csd"]) and math.isfinite(h["fcs"]) for h in out["history"])


def test_configs_are_built_from_their_params_section():
    """DistillConfig and FitConfig take the fields of a params section that share their names, the rest from the
    overrides; DistillConfig's train_dd2 knobs have no default (a missing one is an error), its engine constants do."""
    @dataclasses.dataclass(frozen=True)
    class Section:  # a params section: train_dd2's knobs and one DistillConfig does not read
        n_steps: int = 7
        batch_size: int = 4
        n_euler: int = 10
        lr_gen: float = 3e-4

    cfg = dd2.DistillConfig.from_section(Section(), **{**DISTILL, "lr_gen": 1e-3})
    assert (cfg.n_steps, cfg.batch_size, cfg.lr_gen, cfg.ckpt_every) == (7, 4, 1e-3, 50)
    with pytest.raises(TypeError, match="csd_weight"):
        dd2.DistillConfig.from_section(Section(), **{k: v for k, v in DISTILL.items() if k != "csd_weight"})
    with pytest.raises(ValueError, match="csd_weight"):
        distill_config(1, 2, csd_weight="image")
    needed = {f.name for f in dataclasses.fields(dd2.DistillConfig) if f.default is dataclasses.MISSING}
    assert needed - {"seed", "precision"} <= {f.name for f in dataclasses.fields(params.TrainDD2)}
    fit = train.FitConfig.from_section(Section(), seed=3, lr=2e-3)
    assert (fit.n_steps, fit.batch_size, fit.lr, fit.seed, fit.weight_decay) == (7, 4, 2e-3, 3, 0.0)
