import copy
import math

import pytest
import torch

from dd import bench, params, teachers


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    fam = teachers.family("llamagen")
    tok = fam.build_tokenizer(params.read_section("train_tokenizer", "llamagen", codebook_size=16, z_channels=32))
    cfg = params.read_section("train_teacher", "llamagen", dim=16, n_layer=1, n_head=1)
    teacher = fam.build_teacher(cfg, tok, num_classes=3, image_size=32)
    return fam, tok.eval(), teacher.eval()


def test_encode_decode_shapes(tiny):
    fam, tok, _ = tiny
    x = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    t = fam.encode(tok, x, batch_size=2)
    assert t.shape == (5, 64) and t.dtype == torch.int64 and t.max() < 16
    img = fam.decode(tok, t, batch_size=2)
    assert img.shape == (5, 3, 32, 32) and img.abs().max() <= 1
    assert torch.equal(fam.codebook(tok), tok.codebook())


def test_untrained_teacher_nll_is_log_vocab(tiny):
    fam, _, teacher = tiny  # zero-initialised head: uniform logits
    t = torch.randint(0, 16, (4, 64))
    assert teachers.nll(fam, tiny[1], teacher, t, torch.tensor([0, 1, 2, 3]) % 3, batch_size=3) == pytest.approx(math.log(16), abs=1e-5)
    assert fam.ar_steps(teacher) == 64


def test_nll_batches_bound_the_logits_and_keep_the_value(tiny, monkeypatch):
    fam, tok, teacher = tiny
    teacher = copy.deepcopy(teacher)
    torch.nn.init.normal_(teacher.output.weight)
    t, y = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    whole = teachers.nll(fam, tok, teacher, t, y)
    monkeypatch.setattr(teachers, "LOGIT_ELEMENTS", 2 * 64 * 16)  # two sequences of logits at a time
    assert teachers.nll(fam, tok, teacher, t, y) == pytest.approx(whole, rel=1e-6)


def test_sample_is_seeded_and_uses_sampling_params(tiny):
    fam, tok, teacher = tiny
    teacher = copy.deepcopy(teacher)
    torch.nn.init.normal_(teacher.output.weight)  # no ties, so top-1 is one token
    cfg = params.read_section("sample_teacher", "llamagen", cfg_scale=1.5, top_k=1)
    y = torch.tensor([0, 1, 2])
    a = fam.sample(tok, teacher, y, cfg, generator=torch.Generator().manual_seed(1), batch_size=2)
    b = fam.sample(tok, teacher, y, cfg, generator=torch.Generator().manual_seed(2), batch_size=2)
    assert a.shape == (3, 64) and torch.equal(a, b)  # top_k = 1 is greedy: seed-independent


def test_save_load_roundtrip_and_wrong_class(tiny, tmp_path):
    fam, tok, teacher = tiny
    teachers.save_model(tmp_path, "train_teacher", "teacher", teacher, n_params=1)
    again = teachers.load_model(tmp_path, "teacher", fam.Teacher)
    t, y = torch.randint(0, 16, (2, 64)), torch.tensor([0, 1])
    assert torch.equal(again.logits(t, y), teacher.logits(t, y))
    with pytest.raises(ValueError, match="teacher is GPT, expected a VQModel"):
        teachers.load_model(tmp_path, "teacher", fam.Tokenizer)
    with pytest.raises(ValueError, match="unknown teacher family 'gpt'"):
        teachers.family("gpt")


def test_bench_reports_positive_figures(tiny):
    fam, tok, teacher = tiny
    cfg = params.read_section("sample_teacher", "llamagen")
    out = bench.teacher_speed(fam, tok, teacher, cfg, torch.zeros(4, dtype=torch.long), big_batch=4, device="cpu",
                              repeats=1)
    assert out["tokens"]["latency_s"] > 0 and out["end_to_end"]["throughput_img_s"] > 0


@pytest.fixture(scope="module")
def tiny_var():
    torch.manual_seed(0)
    fam = teachers.family("var")
    tok = fam.build_tokenizer(params.read_section("train_tokenizer", "var", vocab_size=16, z_channels=4))
    cfg = params.read_section("train_teacher", "var", depth=1, embed_dim=16, num_heads=2)
    return fam, tok.eval(), fam.build_teacher(cfg, tok, num_classes=3, image_size=32).eval()


def test_var_family_roundtrip(tiny_var):
    fam, tok, teacher = tiny_var
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    t = fam.encode(tok, x, batch_size=2)
    assert t.shape == (3, 1 + 4 + 9 + 16 + 36 + 64) and fam.ar_steps(teacher) == 6
    assert [p.shape[1] for p in fam.split(tok, t)] == [1, 4, 9, 16, 36, 64]
    assert fam.decode(tok, t).shape == (3, 3, 32, 32)
    y = torch.tensor([0, 1, 2])
    loss = fam.teacher_loss_fn(tok)(teacher, {"tokens": t, "labels": y})
    nll = teachers.nll(fam, tok, teacher.eval(), t, y)
    assert math.isfinite(loss.item()) and 0 < nll < 2 * math.log(16)
    cfg = params.read_section("sample_teacher", "var", top_k=4)
    s = fam.sample(tok, teacher, y, cfg, generator=torch.Generator().manual_seed(0))
    assert s.shape == t.shape and s.max() < 16


def test_sample_step_fn_sees_every_step_of_every_batch(tiny_var):
    fam, tok, teacher = tiny_var
    cfg = params.read_section("sample_teacher", "var", top_k=1)
    y = torch.tensor([0, 1, 2])
    seen = []

    def greedy(step, logits):  # logits [B, pn², V]: guided, not yet truncated
        seen.append((step, tuple(logits.shape)))
        return fam.sampler(cfg).filter(logits).argmax(-1)

    s = fam.sample(tok, teacher, y, cfg, batch_size=2, step_fn=greedy)
    assert torch.equal(s, fam.sample(tok, teacher, y, cfg, torch.Generator().manual_seed(0), batch_size=2))
    assert [k for k, _ in seen] == [*range(6), *range(6)]
    assert [shape[:2] for _, shape in seen[:6]] == [(2, p * p) for p in tok.patch_nums] and seen[6][1][0] == 1
    with pytest.raises(ValueError, match="not both"):
        fam.sample(tok, teacher, y, cfg, torch.Generator(), step_fn=greedy)


def test_methods_speed_times_batch_one_apart_from_the_large_batch(monkeypatch):
    from types import SimpleNamespace

    from dd import dd1
    calls = []

    def method(name):
        def generate(labels, noise, seed):
            calls.append((name, len(labels)))
            return labels, noise
        return SimpleNamespace(generate=generate, normalize=True)

    monkeypatch.setattr(dd1, "decode", lambda tok, emb, normalize=True: emb)
    f = SimpleNamespace(shape=(4, 2), teacher=SimpleNamespace(num_classes=3), device=torch.device("cpu"), tok=None)
    out = bench.methods_speed(f, {"teacher": method("teacher"), "fast": method("fast")}, big_batch=8, repeats=10)
    sizes = [b for _, b in calls]
    first_big = sizes.index(8)
    assert set(sizes[:first_big]) == {1} and set(sizes[first_big:]) == {8}  # batch-1 rounds first, then batch 8
    # batch 1: a warm-up call, then 10 rounds of two back-to-back calls, per method and part (tokens, end to end)
    assert calls[:first_big].count(("fast", 1)) == 2 * (1 + 2 * 10)
    assert calls[first_big:].count(("fast", 8)) == 2 * 1  # 10 // 10 timed rounds, no warm-up
    for part in ("tokens", "end_to_end"):
        s = out["fast"][part]
        assert len(s["latency_rounds_s"]) == 10 and s["latency_s"] > 0 and s["throughput_img_s"] > 0


@pytest.mark.parametrize("which", ["llamagen", "var"])
def test_quantisation_stays_fp32_under_bf16_autocast(which, tiny, tiny_var):
    """Under the bf16 autocast of a tokenizer's training (runtime.precision bf16 / auto), the nearest-code search
    and VAR's residual recursion run in fp32: the same latents give the same codes as without autocast, and the
    training loss still runs (its convs in bf16)."""
    fam, tok, _ = tiny if which == "llamagen" else tiny_var
    torch.manual_seed(1)
    cb = fam.codebook(tok)
    a = torch.randint(len(cb), (4096,))
    b = (a + torch.randint(1, len(cb), (4096,))) % len(cb)
    z = 0.5 * (cb[a] + cb[b]) + 2e-3 * (cb[a] - cb[b])  # just on code a's side of the a | b boundary: near-ties
    if which == "llamagen":
        z = torch.nn.functional.normalize(z, dim=-1)
    want = tok.quantize.nearest(z)
    assert torch.equal(want, torch.cdist(z.double(), cb.double()).argmin(1))  # (a bf16 search misses ~30 %)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tok.quantize.nearest(z), want)
        assert torch.equal(tok.quantize.nearest(z.bfloat16()), tok.quantize.nearest(z.bfloat16().float()))
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        loss, parts = copy.deepcopy(tok).train().loss(x)
    assert loss.dtype == torch.float32 and math.isfinite(parts["loss"])
    if which == "var":
        f = torch.randn(2, cb.shape[1], 8, 8)
        ref = tok.quantize(f)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = tok.quantize(f)
            x_in = tok.teacher_forcing_input(ref[1])
        assert got[0].dtype == torch.float32 and all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))
        assert x_in.dtype == torch.float32 and torch.equal(x_in, tok.teacher_forcing_input(ref[1]))


def test_attention_stays_fp32_under_cpu_autocast():
    """dd.layers.attention: plain SDPA without autocast; under a CPU bf16 autocast it runs in fp32 (the mask too)
    and equals the fp32 result on the same inputs."""
    from dd import layers

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.zeros(5, 5).masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(layers.attention(q, k, v, attn_mask=mask), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layers.attention(q, k, v, attn_mask=mask.bfloat16())
        causal = layers.attention(q, k, v, is_causal=True)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(causal, want, atol=1e-6)
