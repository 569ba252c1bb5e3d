"""dd.llamagen's text-to-image GPT: the official T2I code's outputs, the release layout, caption masks, KV cache."""
import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dd.llamagen import GPT, Sampler, load_gpt

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "llamagen_t2i_tiny.safetensors"


def official(tmp_path) -> tuple[GPT, dict, dict]:
    """The fixture's official state dict saved as a release training file, loaded; its captions as the bank."""
    f = load_file(FIXTURE)
    sd = {k[6:]: v for k, v in f.items() if k.startswith("model.")}
    ref = {k[4:]: v for k, v in f.items() if k.startswith("ref.")}
    torch.save({"model": sd, "args": argparse.Namespace(gpt_model="tiny")}, tmp_path / "t2i.pt")
    gpt = load_gpt(tmp_path / "t2i.pt", grid_size=4, n_head=2)
    gpt.cls_embedding.set_captions(ref["features"], ref["masks"])
    return gpt, sd, ref


def test_release_layout_loads_strictly(tmp_path):
    gpt, sd, _ = official(tmp_path)
    assert gpt.config["caption_dim"] == 8 and gpt.config["cls_token_num"] == 120 and gpt.num_classes == 3
    assert set(gpt.state_dict()) == set(sd)  # the caption bank is not part of a checkpoint
    assert {"cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight",
            "cls_embedding.uncond_embedding"} <= set(sd)
    rebuilt = GPT(**gpt.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    bad = dict(sd, **{"cls_embedding.cap_proj.fc1.weight": torch.zeros(32, 9)})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"cls_embedding.cap_proj.fc1.weight: file \(32, 9\) vs model \(32, 8\)"):
        load_gpt(tmp_path / "bad.pt", grid_size=4, n_head=2)


def test_logits_match_official_training_forward(tmp_path):
    gpt, _, ref = official(tmp_path)
    ids = torch.arange(3)
    torch.testing.assert_close(gpt.logits(ref["tokens"], ids), ref["logits"], atol=1e-5, rtol=0)
    s = ref["cfg_scale"].item()
    torch.testing.assert_close(gpt.cfg_logits(ref["tokens"], ids, s), ref["cfg_logits"], atol=1e-5, rtol=0)
    # the mask matters: without it (every prefix position real) the short captions' logits change
    no_mask = gpt.cls_embedding.bank_mask
    gpt.cls_embedding.set_captions(ref["features"], torch.ones_like(no_mask))
    assert (gpt.logits(ref["tokens"], ids)[0] - ref["logits"][0]).abs().max() > 1e-2


def test_generate_matches_official_kv_cached_sampler(tmp_path):
    gpt, _, ref = official(tmp_path)
    seen = []
    draw = Sampler(top_k=1)
    tokens = gpt.generate(torch.arange(3), ref["cfg_scale"].item(), int(ref["gen_cfg_interval"]),
                          step_fn=lambda n, logits: seen.append(logits) or draw(n, logits))
    assert torch.equal(tokens, ref["gen_tokens"])
    torch.testing.assert_close(torch.stack(seen, 1), ref["gen_logits"], atol=1e-5, rtol=0)


def tiny_t2i(P: int = 5, n_real=(5, 2, 3)) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(vocab_size=40, dim=32, n_layer=2, n_head=2, grid_size=3, caption_dim=6, cls_token_num=P).eval()
    with torch.no_grad():
        gpt.output.weight.normal_(std=0.3)
    mask = torch.stack([torch.arange(P) >= P - n for n in n_real])
    gpt.cls_embedding.set_captions(torch.randn(len(n_real), P, 6), mask)
    return gpt


def test_kv_cache_equals_teacher_forced_with_caption_masks():
    gpt = tiny_t2i()
    ids = torch.tensor([0, 1, 2, 3])  # 3 = the null caption
    for s, interval in [(1.0, -1), (3.0, -1), (3.0, 2)]:
        seen = []
        draw = Sampler(temperature=0.8, generator=torch.Generator().manual_seed(2))
        tokens = gpt.generate(ids, s, interval, step_fn=lambda n, lg: seen.append(lg) or draw(n, lg))
        want = gpt.cfg_logits(tokens, ids, s) if s > 1 else gpt.logits(tokens, ids)
        if interval >= 0:
            want[:, interval + 2:] = gpt.logits(tokens, ids)[:, interval + 2:]
        torch.testing.assert_close(torch.stack(seen, 1), want, atol=1e-5, rtol=0)


def test_padding_is_invisible_and_dropout_keeps_the_mask():
    gpt = tiny_t2i()
    tokens, ids = torch.randint(0, 40, (3, 9)), torch.arange(3)
    base = gpt.logits(tokens, ids)
    bank = gpt.cls_embedding.bank.clone()
    bank[~gpt.cls_embedding.bank_mask] = 5.0  # whatever sits under the padding, nothing changes
    gpt.cls_embedding.set_captions(bank, gpt.cls_embedding.bank_mask)
    torch.testing.assert_close(gpt.logits(tokens, ids), base, atol=1e-6, rtol=0)
    # loss with every caption dropped = CE of the null caption under each caption's mask
    gpt.config.update(class_dropout_prob=1.0, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    pre, mask = gpt.prefix(torch.full_like(ids, 3), mask_of=ids)
    h = torch.cat([pre, gpt.tok_embeddings(tokens[:, :-1])], 1)
    want = torch.nn.functional.cross_entropy(gpt.forward(h, key_mask=mask)[:, 4:].flatten(0, 1), tokens.flatten())
    torch.testing.assert_close(gpt.loss(tokens, ids), want)


def test_caption_bank_errors():
    gpt = tiny_t2i()
    with pytest.raises(ValueError, match=r"expected \[n, 5, 6\]"):
        gpt.cls_embedding.set_captions(torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match=r"caption ids must lie in \[0, 3\]"):
        gpt.logits(torch.zeros(1, 9, dtype=torch.long), torch.tensor([4]))
    with pytest.raises(ValueError, match="cls_token_num 1"):
        GPT(dim=32, n_head=2, cls_token_num=4)


def test_dd1_model_on_a_caption_prefix():
    from dd.dd1 import DD1Model, dd1_loss, step_ends

    gpt = tiny_t2i()
    model = DD1Model.from_teacher(gpt, codebook_dim=4).eval()
    assert model.cls_embedding.num_classes == 3  # the teacher's caption bank comes along
    torch.testing.assert_close(model.cls_embedding.cap_proj.fc1.weight, gpt.cls_embedding.cap_proj.fc1.weight)
    x, ids = torch.randn(4, 9, 4), torch.tensor([0, 1, 2, 3])
    logits, cont = model(x, ids, 0)
    assert logits.shape == (4, 9, 40) and cont.shape == (4, 9, 4)
    y = x.clone()
    y[:, 5:] = torch.randn(4, 4, 4)  # causal: positions before 5 do not see later inputs
    torch.testing.assert_close(model(y, ids, 0)[0][:, :5], logits[:, :5], atol=1e-5, rtol=0)
    emb = model.cls_embedding
    bank = emb.bank.clone()
    bank[~emb.bank_mask] = 3.0  # features under the padding are invisible
    emb.set_captions(bank, emb.bank_mask)
    torch.testing.assert_close(model(x, ids, 0)[0], logits, atol=1e-5, rtol=0)
    emb.set_captions(bank, torch.ones_like(emb.bank_mask))  # ...unless the mask says they are real
    assert (model(x, ids, 0)[0][1] - logits[1]).abs().max() > 1e-3
    batch = {"tokens": torch.randint(0, 40, (4, 9)), "noise": torch.randn(4, 9, 4), "labels": ids}
    loss, parts = dd1_loss(model.train(), batch, torch.randn(40, 4), step_ends(model), t_set=(0, 3))
    loss.backward()
    assert torch.isfinite(loss) and model.cls_embedding.cap_proj.fc1.weight.grad.abs().sum() > 0


def test_continuous_gpt_reads_a_caption_prefix_as_the_teacher():
    from dd.ardiff import ARDiffusion, ContinuousGPT

    gpt = tiny_t2i()
    model = ContinuousGPT.from_teacher(gpt, codebook_dim=40).eval()
    assert model.num_classes == 3
    lookup = torch.nn.Linear(40, 32, bias=False)  # one-hot vectors through the token table: the teacher exactly
    lookup.weight.data = gpt.tok_embeddings.weight.data.T.clone()
    model.tok_mlp = lookup
    tokens, ids = torch.randint(0, 40, (4, 9)), torch.tensor([0, 1, 2, 3])
    x = torch.nn.functional.one_hot(tokens, 40).float()
    torch.testing.assert_close(model.logits(x, ids), gpt.logits(tokens, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.cfg_logits(x, ids, 2.5), gpt.cfg_logits(tokens, ids, 2.5), atol=1e-5, rtol=0)
    ar = ARDiffusion.from_teacher(ContinuousGPT.from_teacher(gpt, codebook_dim=40), head_width=16, head_depth=1)
    assert ar.backbone.num_classes == 3 and ar.features(x, ids).shape == (4, 9, 32)


@pytest.mark.parametrize("window", [0, 3])
def test_sjd_greedy_equals_the_kv_cached_sampler_on_captions(window):
    from dd import sjd

    gpt = tiny_t2i()
    ids = torch.tensor([0, 1, 2, 3, 1])
    for s in (1.0, 3.0):
        want = gpt.generate(ids, s, top_k=1)
        got, passes = sjd.generate(gpt, ids, s, top_k=1, window=window, generator=torch.Generator().manual_seed(0))
        assert torch.equal(got, want) and (passes <= 9).all()
