"""dd.llamagen: official reference outputs, KV-cache consistency, closed forms, loaders and their errors."""
import argparse
import itertools
import math
import pathlib
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dd.llamagen import (GPT, GPT_CONFIGS, VQ_CONFIGS, Sampler, VQModel, apply_rope, filter_logits, load_gpt,
                         load_vq, rope_2d)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
KEYS = Path(__file__).resolve().parents[2] / "shared" / "specs" / "keys"  # ../shared from the repository root


def split(name: str) -> tuple[dict, dict]:
    """Fixture -> (official state dict, references)."""
    f = load_file(FIXTURES / name)
    return ({k[6:]: v for k, v in f.items() if k.startswith("model.")},
            {k[4:]: v for k, v in f.items() if k.startswith("ref.")})


def training_file(path: Path, sd: dict, **extra) -> Path:
    """Write sd the way the official train scripts do: a dict with an argparse.Namespace under "args"."""
    torch.save({"model": sd, "optimizer": {}, "steps": 7, "args": argparse.Namespace(gpt_model="tiny", lr=1e-4),
                **extra}, path)
    return path


def official_gpt(tmp_path) -> tuple[GPT, dict, dict]:
    sd, ref = split("llamagen_gpt_tiny.safetensors")
    return load_gpt(training_file(tmp_path / "gpt.pt", sd), grid_size=4, n_head=2), sd, ref


def official_vq(tmp_path) -> tuple[VQModel, dict, dict]:
    sd, ref = split("llamagen_vq_tiny.safetensors")
    sd = {k: v.float() / 64 for k, v in sd.items()}  # stored as int8 k for weights k/64
    sd["quantize.codebook_used"] = torch.zeros(65536)
    return load_vq(training_file(tmp_path / "vq.pt", sd)), sd, ref


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(**{**dict(vocab_size=48, num_classes=5, dim=32, n_layer=2, n_head=2, grid_size=3), **kw})
    with torch.no_grad():
        gpt.output.weight.normal_(std=0.3)  # the release init zeroes the head: all logits would be equal
    return gpt.eval()


# ---------------------------------------------------------------- official reference outputs


def test_gpt_logits_match_official(tmp_path):
    gpt, _, ref = official_gpt(tmp_path)
    assert gpt.config["ffn_hidden"] == 96 and gpt.config["num_classes"] == 10 and gpt.config["n_layer"] == 2
    gpt.train()  # `logits` has eval semantics whatever the module mode: no dropout, no label dropout
    torch.testing.assert_close(gpt.logits(ref["tokens"], ref["labels"]), ref["logits"], atol=1e-5, rtol=0)
    s = ref["cfg_scale"].item()
    torch.testing.assert_close(gpt.cfg_logits(ref["tokens"], ref["labels"], s), ref["cfg_logits"], atol=1e-5, rtol=0)
    # T < grid^2: a prefix of the sequence gives the prefix of the logits (causality)
    torch.testing.assert_close(gpt.logits(ref["tokens"][:, :7], ref["labels"]), ref["logits"][:, :7],
                               atol=1e-5, rtol=0)


def recorded(gpt, labels, cfg_scale, cfg_interval, draw):
    """gpt.generate with `draw` as the step, also returning every step's guided logits [B, grid^2, V]."""
    seen = []
    tokens = gpt.generate(labels, cfg_scale, cfg_interval,
                          step_fn=lambda n, logits: seen.append(logits) or draw(n, logits))
    return tokens, torch.stack(seen, 1)


def test_generate_matches_official_kv_cached_sampling(tmp_path):
    gpt, _, ref = official_gpt(tmp_path)
    tokens, steps = recorded(gpt, ref["gen_labels"], ref["cfg_scale"].item(), int(ref["gen_cfg_interval"]),
                             Sampler(top_k=1))
    assert tokens.dtype == torch.long and torch.equal(tokens, ref["gen_tokens"])
    torch.testing.assert_close(steps, ref["gen_logits"], atol=1e-5, rtol=0)


def test_filter_logits_matches_official():
    _, ref = split("llamagen_gpt_tiny.safetensors")
    x = ref["filter_input"]
    keep = x.clone()
    for name, want in ref.items():
        if m := re.fullmatch(r"filter_k(\d+)_p([\d.]+)", name):
            got = filter_logits(x, int(m[1]), float(m[2]))
            assert torch.equal(got, want), name
            # any leading dims: the same rows filtered as a [2, 2, V] batch
            assert torch.equal(filter_logits(x.view(2, 2, -1), int(m[1]), float(m[2])), want.view(2, 2, -1))
    assert torch.equal(x, keep)  # the input is not modified (upstream filters in place)
    assert torch.equal(filter_logits(x, 0, 1.0), x)  # both off


def test_vq_matches_official(tmp_path):
    vq, _, ref = official_vq(tmp_path)
    assert vq.config | {"dead_code_steps": 0} == dict(in_channels=3, ch=32, ch_mult=[1, 1], num_res_blocks=1,
                                                      z_channels=32, codebook_size=32, codebook_embed_dim=4,
                                                      commit_loss_beta=0.25, dropout_p=0.0, dead_code_steps=0)
    idx = vq.encode_indices(ref["images"])
    assert idx.dtype == torch.long and torch.equal(idx, ref["indices"])
    torch.testing.assert_close(vq.decode_indices(ref["indices"]), ref["decoded"], atol=1e-5, rtol=0)
    # continuous decoding of the (unit-norm) quantised latents, and its own normalisation of a scaled input
    z = ref["quant"].permute(0, 2, 3, 1)
    torch.testing.assert_close(vq.decode_embeddings(3 * z), ref["decoded"], atol=1e-5, rtol=0)
    torch.testing.assert_close(vq.codebook().norm(dim=-1), torch.ones(32))


# ---------------------------------------------------------------- release key layouts


def release_keys(name: str) -> dict:
    path = KEYS / name
    if not path.is_file():
        pytest.skip(f"shared key lists not found at {KEYS} (the ../shared folder next to the repository)")
    lines = (re.fullmatch(r"\s*([\w.]+): \(([\d, ]*)\)", s) for s in path.read_text().splitlines())
    return {m[1]: tuple(int(d) for d in m[2].replace(",", " ").split()) for m in lines if m}


@pytest.mark.parametrize("model, keys, n_params", [
    (lambda: GPT(**GPT_CONFIGS["GPT-B"]), "llamagen_gptB_keys.txt", 110_888_448),
    (lambda: VQModel(**VQ_CONFIGS["VQ-16"]), "llamagen_vq16_keys.txt", 71_883_403),
])
def test_release_keys_and_shapes(model, keys, n_params):
    want = release_keys(keys)
    with torch.device("meta"):
        m = model()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
    assert sum(p.numel() for p in m.parameters()) == n_params


# ---------------------------------------------------------------- GPT invariants and closed forms


def test_rope_closed_form_and_class_row():
    grid, hd = 3, 8
    table = rope_2d(grid, hd)  # [1 + 9, 4, 2]
    assert table.shape == (10, 4, 2) and not table[0].any()  # class token: cos = sin = 0
    f = 1.0 / 10000 ** (torch.arange(0, 4, 2).float() / 4)  # hd/4 frequencies per axis
    r, c = 2, 1
    ang = torch.cat([r * f, c * f])
    torch.testing.assert_close(table[1 + r * grid + c], torch.stack([ang.cos(), ang.sin()], -1))
    x = torch.randn(1, 10, 2, hd)
    y = apply_rope(x, table)
    assert not y[:, 0].any()  # q and k of the class token become zero, as upstream
    torch.testing.assert_close(y.norm(dim=-1)[:, 1:], x.norm(dim=-1)[:, 1:])  # rotations preserve norms


def test_kv_cache_logits_equal_teacher_forced():
    gpt = tiny_gpt()
    labels = torch.tensor([0, 4, 5])  # 5 = null class
    for s, interval in [(1.0, -1), (3.0, -1), (3.0, 2)]:
        tokens, steps = recorded(gpt, labels, s, interval,
                                 Sampler(temperature=0.7, top_k=10, generator=torch.Generator().manual_seed(1)))
        assert torch.equal(tokens, gpt.generate(labels, s, interval, temperature=0.7, top_k=10,
                                                generator=torch.Generator().manual_seed(1)))
        assert tokens.shape == (3, 9) and steps.shape == (3, 9, 48)
        want = gpt.cfg_logits(tokens, labels, s) if s > 1 else gpt.logits(tokens, labels)
        if interval >= 0:  # guidance stops after token interval + 1
            want[:, interval + 2:] = gpt.logits(tokens, labels)[:, interval + 2:]
        torch.testing.assert_close(steps, want, atol=1e-5, rtol=0)
    assert all("cache" not in k and "freqs" not in k for k in gpt.state_dict())  # a saved teacher has no cache
    assert set(gpt.state_dict()) == set(tiny_gpt().state_dict())


def test_generate_seeding_step_fn_and_early_stop():
    gpt = tiny_gpt()
    labels = torch.tensor([1, 2, 3, 4])
    draw = lambda seed: gpt.generate(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))

    seen, truncate = [], Sampler(top_k=5).filter

    def greedy(step, logits):
        seen.append((step, logits))
        assert (truncate(logits) > float("-inf")).sum(-1).eq(5).all()  # the filter is the caller's to apply
        return truncate(logits).argmax(-1)

    tokens, steps = recorded(gpt, labels, 2.0, -1, greedy)
    assert [s for s, _ in seen] == list(range(9))
    assert not steps.isinf().any()  # the hook sees the guided logits unfiltered
    assert torch.equal(tokens, steps.argmax(-1))  # greedy: the filter keeps the maximum
    # the caller stops sampling by not asking for more steps: the same draws, in the same order
    part = list(itertools.islice(gpt.steps(labels, 2.0, -1, Sampler(generator=torch.Generator().manual_seed(0))), 4))
    assert torch.equal(torch.stack(part, 1), draw(0)[:, :4])
    with pytest.raises(ValueError, match="not both"):
        gpt.generate(labels, temperature=0.5, step_fn=Sampler())


def test_gpt_loss_closed_forms():
    gpt = GPT(vocab_size=48, num_classes=5, dim=32, n_layer=1, n_head=2, grid_size=3)
    tokens, labels = torch.randint(0, 48, (4, 9)), torch.tensor([0, 1, 2, 3])
    assert math.isclose(gpt.loss(tokens, labels).item(), math.log(48), rel_tol=1e-6)  # zero head: uniform
    # with every dropout off and label dropout certain, the loss is the CE of the null-class logits
    gpt = tiny_gpt(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=1.0)
    null = torch.full_like(labels, 5)
    want = torch.nn.functional.cross_entropy(gpt.logits(tokens, null).flatten(0, 1), tokens.flatten())
    torch.testing.assert_close(gpt.loss(tokens, labels), want)
    gpt.loss(tokens, labels).backward()
    assert gpt.tok_embeddings.weight.grad.abs().sum() > 0


def test_config_roundtrip_and_validation():
    for model in (tiny_gpt(), VQModel(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32, codebook_size=16)):
        cfg = model.config
        assert all(isinstance(v, (int, float, bool, list)) for v in cfg.values())
        rebuilt = type(model)(**cfg)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="multiple of 32"):
        VQModel(ch=48)
    with pytest.raises(ValueError, match="head_dim % 4"):
        GPT(dim=36, n_head=6)


# ---------------------------------------------------------------- VQ training


def test_vq_loss_straight_through_and_dead_code_restart():
    torch.manual_seed(0)
    vq = VQModel(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=64, codebook_size=512,
                 codebook_embed_dim=8, dead_code_steps=1).train()
    with torch.no_grad():
        vq.quantize.embedding.weight[:] = vq.quantize.embedding.weight[0]  # collapsed: one code does everything
    x = torch.rand(12, 3, 16, 16) * 2 - 1  # 12 * 8 * 8 = 768 latents for 512 codes
    loss, parts = vq.loss(x)
    assert parts["restarted"] == 0 and parts["usage"] == 1 / 512
    assert math.isclose(loss.item(), parts["rec"] + parts["vq"] + parts["commit"], rel_tol=1e-6)
    assert math.isclose(parts["commit"], 0.25 * parts["vq"], rel_tol=1e-5)  # same distance, beta = 0.25
    loss.backward()
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert torch.equal(vq.quantize.codebook_used[-768:].long(), vq.encode_indices(x).flatten())  # ring buffer

    _, parts = vq.loss(x)  # the 511 codes unused last step are re-seeded from this batch's latents
    assert parts["restarted"] == 511
    assert vq.encode_indices(x).unique().numel() >= 511  # each re-seeded code is its latent's nearest code


# ---------------------------------------------------------------- loaders and their errors


def test_loader_formats(tmp_path):
    gpt, sd, ref = official_gpt(tmp_path)
    noisy = {f"module._orig_mod.{k}": v for k, v in sd.items()}  # DDP + torch.compile prefixes
    noisy["freqs_cis"] = torch.zeros(17, 8, 2)
    noisy["module.layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 2, 24, 16)  # saved after sampling
    torch.save(noisy, tmp_path / "raw.pth")
    save_file(sd, tmp_path / "w.safetensors")
    ema = {k: v + 0.01 for k, v in sd.items()}
    training_file(tmp_path / "ema.pt", sd, ema=ema)
    for path in ("raw.pth", "w.safetensors"):
        other = load_gpt(tmp_path / path, grid_size=4, n_head=2)
        assert not other.training
        torch.testing.assert_close(other.logits(ref["tokens"], ref["labels"]), ref["logits"], atol=1e-5, rtol=0)
    assert torch.equal(load_gpt(tmp_path / "ema.pt", 4, 2, which="ema").norm.weight, ema["norm.weight"])
    # our own checkpoints carry the config: no sizes needed
    torch.save({"model": gpt.state_dict(), "config": gpt.config}, tmp_path / "ours.pt")
    assert load_gpt(tmp_path / "ours.pt").config == gpt.config
    # release files carry no head count: dim // 64 by default, and grid 16
    torch.save(GPT(vocab_size=8, num_classes=2, dim=128, n_layer=1, n_head=2).state_dict(), tmp_path / "d128.pt")
    cfg = load_gpt(tmp_path / "d128.pt").config
    assert cfg["n_head"] == 2 and cfg["grid_size"] == 16


@pytest.mark.parametrize("name, ffn", [("GPT-B", 2048), ("GPT-L", 2816), ("GPT-XL", 3584), ("GPT-XXL", 4096),
                                       ("GPT-3B", 8704)])
def test_release_ffn_width(name, ffn):
    with torch.device("meta"):
        assert GPT(**GPT_CONFIGS[name]).config["ffn_hidden"] == ffn

def test_loader_errors(tmp_path):
    gpt, sd, _ = official_gpt(tmp_path)
    # truncated file: the message names the file
    path = training_file(tmp_path / "cut.pt", sd)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.pt.*the file is truncated"):
        load_gpt(path, 4, 2)
    cut = tmp_path / "cut.safetensors"
    save_file(sd, cut)
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*the file is truncated"):
        load_gpt(cut, 4, 2)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_gpt(tmp_path / "nowhere.pt")
    # mismatch: every missing, unexpected and mis-shaped key is listed; nothing is loaded
    bad = dict(sd)
    del bad["layers.1.ffn_norm.weight"]
    bad["layers.1.extra.weight"] = torch.zeros(3)
    bad["layers.1.attention.wo.weight"] = torch.zeros(32, 16)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_gpt(tmp_path / "bad.pt", 4, 2)
    msg = str(err.value)
    assert "bad.pt" in msg and "missing: 1 ['layers.1.ffn_norm.weight']" in msg
    assert "unexpected: 1 ['layers.1.extra.weight']" in msg
    assert "layers.1.attention.wo.weight: file (32, 16) vs model (32, 32)" in msg
    # the wrong kind of checkpoint
    _, vq_sd, _ = official_vq(tmp_path)
    with pytest.raises(ValueError, match="tok_embeddings.weight"):
        load_gpt(tmp_path / "vq.pt")
    with pytest.raises(ValueError, match="encoder.conv_in.weight"):
        load_vq(tmp_path / "gpt.pt")
    with pytest.raises(ValueError, match="'ema'"):
        load_vq(tmp_path / "vq.pt", which="ema")
    # pickled objects beyond tensors (and argparse.Namespace) need an explicit opt-in
    torch.save({"model": sd, "args": argparse.Namespace(data=pathlib.PurePosixPath("/data"))}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match="trusted=True"):
        load_gpt(tmp_path / "obj.pt", 4, 2)
    assert load_gpt(tmp_path / "obj.pt", 4, 2, trusted=True).config == gpt.config
