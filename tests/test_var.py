"""Tests for dd.var_tokenizer (the multi-scale VQVAE) and dd.var (the VAR transformer and its sampler).

Reference outputs in tests/fixtures/var_*.safetensors come from the official FoundationVision/VAR code run on tiny
random-weight models (tests/fixtures/var_make_reference.py); the weights are stored in the official key layout,
so these tests also exercise the loaders. The rest are closed forms and invariants on tiny models.
"""
import itertools
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dd import var, var_tokenizer

FIX = Path(__file__).resolve().parent / "fixtures"
KEYS = Path(__file__).resolve().parents[2] / "shared" / "specs" / "keys"  # ../shared beside the repository
FIX_PATCH_NUMS = (1, 2, 3, 4, 6, 8)  # the fixtures' scales (16 px images, ch_mult (1, 1))
SMALL = (1, 2, 4)  # 8 px images with ch_mult (1, 2)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=0)


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    """The official-layout fixture VQVAE merged into one .safetensors file (stored in two halves)."""
    sd = {**load_file(FIX / "var_vae_weights_a.safetensors"), **load_file(FIX / "var_vae_weights_b.safetensors")}
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def vae_ref():
    return load_file(FIX / "var_vae_ref.safetensors")


@pytest.fixture(scope="module")
def var_ref():
    return load_file(FIX / "var_transformer_ref.safetensors")


def split(x, patch_nums):
    """[B, L, ...] -> one [B, pn*pn, ...] chunk per scale."""
    return list(x.split([p * p for p in patch_nums], 1))


def small_models(seed=0, gamma=0.5):
    """Tiny random VQVAE + VAR on scales (1, 2, 4); AdaLN gains raised so that every block matters."""
    torch.manual_seed(seed)
    vae = var_tokenizer.VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=SMALL)
    model = var.VAR(vocab_size=32, z_channels=8, num_classes=4, depth=2, embed_dim=32, num_heads=2,
                    patch_nums=SMALL)
    model.init_weights(init_adaln_gamma=gamma, init_head=1.0)
    return vae.eval(), model.eval()


# ---- structure ---------------------------------------------------------------------------------------------------

def test_phi_table_matches_upstream(vae_ref):
    assert var_tokenizer.phi_index_table(10) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # the release, with its tie at si = 2
    for n in range(2, 17):
        assert var_tokenizer.phi_index_table(n) == vae_ref[f"phi_table.{n}"].tolist(), n


def _read_keys(path):
    """Lines `name: (d0, d1, ...) [dtype]` -> {name: (shape, dtype or None)}."""
    out = {}
    for line in path.read_text().splitlines():
        name, shape, dtype = re.fullmatch(r"(\S+): \(([^)]*)\)\s*(\S*)", line.strip()).groups()
        out[name] = (tuple(int(d) for d in shape.split(",") if d.strip()), dtype or None)
    return out


@pytest.mark.skipif(not KEYS.is_dir(), reason=f"shared key lists not found at {KEYS}")
@pytest.mark.parametrize("build, fname", [
    (lambda: var.VAR(**var.VAR_CONFIGS["d16"]), "var_d16_keys.txt"),
    (lambda: var_tokenizer.VQVAE(**var_tokenizer.VAE_CONFIGS["release"]), "var_vae_keys.txt"),
])
def test_release_keys_and_shapes_match_spec(build, fname):
    with torch.device("meta"):
        model = build()
    want = _read_keys(KEYS / fname)
    got = model.state_dict()
    assert list(got) == list(want)  # same keys, same order
    for k, (shape, dtype) in want.items():
        assert tuple(got[k].shape) == shape, k
        assert dtype is None or str(got[k].dtype) == f"torch.{dtype}", k


def test_block_causal_mask_and_levels():
    _, model = small_models()
    assert model.lvl_1L.tolist() == [[0, 1, 1, 1, 1] + [2] * 16]
    m = model.attn_bias_for_masking[0, 0]
    assert m.shape == (21, 21) and m.dtype == torch.float32
    assert (m[:1, 1:] == -torch.inf).all() and (m[1:5, 5:] == -torch.inf).all()  # no look-ahead across scales
    assert (m[1:5, :5] == 0).all() and (m[5:, :] == 0).all()  # bidirectional within a scale, sees coarser ones


def test_logits_of_a_scale_ignore_later_inputs():
    vae, model = small_models()
    x_in, labels = torch.randn(2, 20, 8), torch.tensor([0, 3])
    base = model.logits(x_in, labels)
    x2 = x_in.clone()
    x2[:, 4:] += 1.0  # x_in[:, 4:] feeds scale 2 (tokens 5..20)
    out = model.logits(x2, labels)
    close(out[:, :5], base[:, :5], 0.0)
    assert (out[:, 5:] - base[:, 5:]).abs().max() > 1e-3


# ---- VQVAE against the official code ---------------------------------------------------------------------------

def test_vae_matches_official(vae_file, vae_ref):
    vae = var_tokenizer.load_vae(vae_file, patch_nums=FIX_PATCH_NUMS)
    assert vae.config["ch_mult"] == [1, 1] and vae.config["vocab_size"] == 64 and vae.config["z_channels"] == 8
    idx = vae.encode_scales(vae_ref["images"])
    assert [i.shape[1] for i in idx] == [p * p for p in FIX_PATCH_NUMS]
    assert torch.equal(torch.cat(idx, 1), vae_ref["idx"])
    close(vae.teacher_forcing_input(idx), vae_ref["x_in"])
    close(vae.decode_scales(idx), vae_ref["recon"])
    h = split(vae_ref["h_cont"], FIX_PATCH_NUMS)  # continuous per-scale vectors, off the codebook
    close(vae.decode_embeddings(h), vae_ref["recon_cont"])
    close(vae.teacher_forcing_input_from_embeddings(h), vae_ref["x_in_cont"])


def test_vae_training_forward_matches_official(vae_file, vae_ref):
    vae = var_tokenizer.load_vae(vae_file, patch_nums=FIX_PATCH_NUMS).train()
    rec, vq = vae(vae_ref["images"])
    (vq + rec.square().mean()).backward()
    close(rec, vae_ref["rec_train"])
    close(vq.view(1), vae_ref["vq"])
    for name, p in [("embedding", vae.quantize.embedding.weight), ("conv_in", vae.encoder.conv_in.weight),
                    ("quant_conv", vae.quant_conv.weight), ("phi0", vae.quantize.quant_resi.qresi_ls[0].weight)]:
        torch.testing.assert_close(p.grad, vae_ref[f"grad_{name}"], atol=1e-5, rtol=1e-4, msg=name)


# ---- VAR against the official code -----------------------------------------------------------------------------

def test_var_matches_official(vae_file, vae_ref, var_ref):
    vae = var_tokenizer.load_vae(vae_file, patch_nums=FIX_PATCH_NUMS)
    model = var.load_var(FIX / "var_transformer_weights.safetensors", patch_nums=FIX_PATCH_NUMS)
    assert (model.config["depth"], model.config["embed_dim"], model.config["num_heads"]) == (2, 32, 2)
    assert model.config["num_classes"] == 5
    labels, idx = var_ref["labels"], split(vae_ref["idx"], FIX_PATCH_NUMS)
    x_in = vae.teacher_forcing_input(idx)
    close(model.logits(x_in, labels), var_ref["logits"])
    close(model.cfg_logits(x_in, labels, 1.5), var_ref["cfg_logits_tf"])
    # KV-cached path, forced onto the fixture tokens: per-scale guided logits as upstream's sampler saw them.
    kv = []
    forced = model.generate(vae, labels, cfg=1.5, step_fn=lambda si, logits: kv.append(logits) or idx[si])
    close(torch.cat(kv, 1), var_ref["cfg_logits_kv"])
    close(vae.decode_scales(forced) * 0.5 + 0.5, var_ref["image_kv"])  # upstream returns [0, 1]


def test_var_seeded_sampling_matches_official(vae_file, var_ref):
    vae = var_tokenizer.load_vae(vae_file, patch_nums=FIX_PATCH_NUMS)
    model = var.load_var(FIX / "var_transformer_weights.safetensors", patch_nums=FIX_PATCH_NUMS)
    g = torch.Generator().manual_seed(7)  # upstream: g_seed=7 -> self.rng.manual_seed(7)
    idx = model.generate(vae, var_ref["labels"], cfg=1.5, top_k=8, top_p=0.9, generator=g)
    assert torch.equal(torch.cat(idx, 1), var_ref["sampled_idx"])


# ---- VAR invariants ----------------------------------------------------------------------------------------------

def test_kv_cache_logits_equal_teacher_forcing():
    vae, model = small_models(seed=1)
    labels = torch.tensor([0, 2, 3])
    draw, kv = var.Sampler(generator=torch.Generator().manual_seed(0)), []
    idx = model.generate(vae, labels, cfg=2.0, step_fn=lambda si, logits: kv.append(logits) or draw(si, logits))
    assert all(torch.equal(a, b) for a, b in zip(idx, model.generate(vae, labels, cfg=2.0,
                                                                     generator=torch.Generator().manual_seed(0))))
    tf = model.cfg_logits(vae.teacher_forcing_input(idx), labels, 2.0)
    assert tf.std() > 0.1  # non-degenerate logits
    close(torch.cat(kv, 1), tf, 1e-4)


def test_steps_stop_when_the_caller_stops():
    vae, model = small_models(seed=1)
    labels = torch.tensor([0, 2])
    full = model.generate(vae, labels, cfg=2.0, generator=torch.Generator().manual_seed(0))
    steps = model.steps(vae, labels, 2.0, var.Sampler(generator=torch.Generator().manual_seed(0)))
    part = list(itertools.islice(steps, 2))
    assert len(part) == 2 and all(torch.equal(a, b) for a, b in zip(part, full))
    # a suspended sampler leaves no KV cache switched on: teacher forcing is unaffected
    x_in = vae.teacher_forcing_input(full)
    close(model.logits(x_in, labels), small_models(seed=1)[1].logits(x_in, labels), 0.0)
    steps.close()
    assert all(b.attn.kv is None and not b.attn.caching for b in model.blocks)
    with pytest.raises(ValueError, match="not both"):
        model.generate(vae, labels, top_k=2, step_fn=var.Sampler())


def test_cfg_ramp_closed_form():
    _, model = small_models()
    x_in, labels = torch.randn(2, 20, 8), torch.tensor([1, 2])
    c, u = model.logits(x_in, labels), model.logits(x_in, torch.full_like(labels, 4))
    g = model.cfg_logits(x_in, labels, 3.0)
    close(g[:, :1], c[:, :1])  # r = 0 at the first scale
    close(g[:, 1:5], 2.5 * c[:, 1:5] - 1.5 * u[:, 1:5])  # r = 3 * 1/2
    close(g[:, 5:], 4.0 * c[:, 5:] - 3.0 * u[:, 5:])  # r = 3 at the last scale
    close(model.cfg_logits(x_in, labels, 0.0), c)


def test_filter_logits_closed_form():
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    inf = -torch.inf
    assert torch.equal(var.filter_logits(logits, 0, 0.0), logits)  # off
    assert var.filter_logits(logits, 2, 0.0).tolist() == [inf, inf, *logits[2:].tolist()]
    # ascending cumsum [0.1, 0.3, 0.6, 1.0]; remove where <= 1 - top_p
    assert var.filter_logits(logits, 0, 0.5).isinf().tolist() == [True, True, False, False]
    assert var.filter_logits(logits, 0, 0.75).isinf().tolist() == [True, False, False, False]
    assert var.filter_logits(logits, 0, 1e-3).isinf().tolist() == [True, True, True, False]  # top kept
    # top-k first, then top-p on the renormalised rest: top-2 -> [3/7, 4/7]; top_p 0.5 drops 3/7
    assert var.filter_logits(logits, 2, 0.5).isinf().tolist() == [True, True, True, False]
    batch = logits.repeat(2, 3, 1)  # any leading dims
    assert torch.equal(var.filter_logits(batch, 2, 0.5), var.filter_logits(logits, 2, 0.5).expand(2, 3, 4))


def test_step_fn_receives_guided_logits():
    vae, model = small_models()
    seen, truncate = [], var.Sampler(top_k=3).filter

    def greedy(si, logits):
        seen.append(logits)
        assert ((~truncate(logits).isinf()).sum(-1) == 3).all()  # the filter is the caller's to apply
        return truncate(logits).argmax(-1)

    idx = model.generate(vae, torch.tensor([1]), cfg=1.0, step_fn=greedy)
    assert [i.shape for i in idx] == [(1, 1), (1, 4), (1, 16)] and [s.shape[1] for s in seen] == [1, 4, 16]
    assert not any(s.isinf().any() for s in seen)  # unfiltered
    assert all(torch.equal(a, b) for a, b in zip(idx, model.generate(vae, torch.tensor([1]), cfg=1.0, top_k=1)))


def test_label_dropout_only_in_training():
    vae, model = small_models()
    model.cond_drop_rate = 1.0  # every label dropped when training
    idx = [torch.randint(32, (2, p * p)) for p in SMALL]
    x_in, labels = vae.teacher_forcing_input(idx), torch.tensor([0, 1])
    target = torch.cat(idx, 1).flatten()
    ce_label = F.cross_entropy(model.logits(x_in, labels).flatten(0, 1), target)
    ce_null = F.cross_entropy(model.logits(x_in, torch.full_like(labels, 4)).flatten(0, 1), target)
    assert (ce_label - ce_null).abs() > 1e-4
    close(model.eval().loss(idx, labels, x_in), ce_label)
    close(model.train().loss(idx, labels, x_in), ce_null)
    close(model.train().logits(x_in, labels), model.eval().logits(x_in, labels))  # logits never drop


def test_var_loss_decreases():
    vae, model = small_models()
    model.train()
    torch.manual_seed(0)
    idx = [torch.randint(32, (4, p * p)) for p in SMALL]
    with torch.no_grad():
        x_in = vae.teacher_forcing_input(idx)
    labels = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = model.loss(idx, labels, x_in)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ---- VQVAE training --------------------------------------------------------------------------------------------

def test_vae_loss_restarts_dead_codes():
    vae, _ = small_models()
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        vae.quantize.embedding.weight.fill_(100.0)  # every code far from the data ...
        vae.quantize.embedding.weight[0] = 0.0  # ... but one
    before = vae.quantize.embedding.weight.clone()
    loss, parts = vae.eval().loss(images)  # eval: no bookkeeping
    assert set(parts) == {"loss", "rec", "vq"} and torch.equal(vae.quantize.embedding.weight, before)
    assert loss.item() == pytest.approx(parts["rec"] + parts["vq"], rel=1e-6)
    assert len(torch.cat(vae.encode_scales(images), 1).unique()) == 1
    loss, parts = vae.train().loss(images)
    assert parts["usage"] == pytest.approx(100 / 32) and parts["restarted"] == 31
    assert vae.quantize.ema_vocab_hit_SV.sum() > 0
    loss.backward()  # the in-place restart must not break autograd
    assert (vae.quantize.embedding.weight[1:].abs() < 100).all()  # restarted from encoder vectors
    assert len(torch.cat(vae.encode_scales(images), 1).unique()) > 4


def test_vae_loss_decreases():
    torch.manual_seed(0)
    vae = var_tokenizer.VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1,), num_res_blocks=1,
                              patch_nums=SMALL).train()
    images = torch.rand(4, 3, 4, 4) * 2 - 1
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    first = None
    for _ in range(10):
        loss, parts = vae.loss(images)
        first = first or parts["rec"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["rec"] < 0.5 * first


# ---- configuration, validation, loading --------------------------------------------------------------------------

def test_config_rebuilds_models():
    vae, model = small_models()
    for m, cls in [(vae, var_tokenizer.VQVAE), (model, var.VAR)]:
        json.dumps(m.config)  # plain types only
        again = cls(**m.config)
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_validation_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        var_tokenizer.VQVAE(ch=48, ch_mult=(1, 2), patch_nums=SMALL)
    with pytest.raises(ValueError, match="strictly increasing"):
        var_tokenizer.VQVAE(ch=32, ch_mult=(1, 2), patch_nums=(1, 4, 2))
    with pytest.raises(ValueError, match="divisible"):
        var.VAR(depth=2, embed_dim=30, num_heads=4, patch_nums=SMALL)
    vae, model = small_models()
    with pytest.raises(ValueError, match=r"patch_nums\[-1\] = 4: use 8x8 images"):
        vae.encode_scales(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="x_in"):
        model.logits(torch.zeros(1, 19, 8), torch.zeros(1, dtype=torch.long))


def test_loaders_roundtrip_and_strict_errors(tmp_path):
    vae, model = small_models()
    p = tmp_path / "var.pth"
    torch.save(model.state_dict(), p)  # raw state dict, as released
    loaded = var.load_var(p, patch_nums=SMALL)
    assert loaded.config == model.config and not loaded.training
    x_in, labels = torch.randn(2, 20, 8), torch.tensor([0, 1])
    close(loaded.logits(x_in, labels), model.logits(x_in, labels), 0.0)
    with pytest.raises(ValueError, match="pos_1LC has 21 positions"):
        var.load_var(p)  # release patch_nums by default
    # our own {"model", "config"} checkpoints carry patch_nums
    torch.save({"model": vae.state_dict(), "config": vae.config}, tmp_path / "vae.pt")
    assert var_tokenizer.load_vae(tmp_path / "vae.pt").config == vae.config
    # an ema_vocab_hit_SV saved for another number of scales is reset, as upstream
    sd = {**vae.state_dict(), "quantize.ema_vocab_hit_SV": torch.ones(10, 32)}
    save_file(sd, str(tmp_path / "vae.safetensors"))
    assert var_tokenizer.load_vae(tmp_path / "vae.safetensors", patch_nums=SMALL).quantize.ema_vocab_hit_SV.sum() == 0

    bad = dict(model.state_dict())
    del bad["head.bias"]
    bad["extra.weight"] = torch.zeros(1)
    bad["blocks.0.attn.q_bias"] = torch.zeros(5)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        var.load_var(tmp_path / "bad.pth", patch_nums=SMALL)
    msg = str(e.value)
    assert "bad.pth" in msg and "head.bias" in msg and "extra.weight" in msg and "blocks.0.attn.q_bias" in msg

    data = p.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pth: cannot read checkpoint: the file is truncated"):
        var.load_var(tmp_path / "cut.pth", patch_nums=SMALL)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "vae.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.safetensors"):
        var_tokenizer.load_vae(tmp_path / "cut.safetensors", patch_nums=SMALL)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        var.load_var(tmp_path / "nope.pth")
