"""Tests for dd.ardiff (continuous-input teacher, the teacher's conditionals given continuous prefixes, the
AR-diffusion model).

Tiny random teachers of both families check the wiring: copies, causality of the features, the teacher's
distribution given code vectors, the input adaptation. The GTS loss and the AR-diffusion sampler are checked on an
enumerable teacher by the acceptance test of tests/test_dd2.py.
"""
import dataclasses

import pytest
import torch
import torch.nn as nn

from dd import ardiff, dd1, flow, params, train
from test_dd1 import PNS, tiny_gpt, tiny_var

SAMPLING = {"llamagen": params.read_section("sample_teacher", "llamagen", cfg_scale=2.0, top_k=5),
            "var": params.read_section("sample_teacher", "var", cfg=2.0, top_k=5)}



class Lookup(nn.Module):
    """An input 'MLP' that maps each code vector exactly to its row of the token table (nearest code)."""

    def __init__(self, codebook, table):
        super().__init__()
        self.codebook, self.table = codebook, table

    def forward(self, x):
        idx = flow.nearest_code(x.reshape(-1, x.shape[-1]), self.codebook).view(x.shape[:-1])
        return self.table[idx]


def tiny_setup(family, D=4, seed=0):
    """(tok, discrete teacher, teacher Φ for DD2, codebook [V, D]) of a tiny random teacher."""
    if family == "llamagen":
        gpt = tiny_gpt(seed)
        torch.manual_seed(seed + 1)
        codebook = torch.randn(gpt.vocab_size, D)
        phi = ardiff.ContinuousGPT.from_teacher(gpt, D).eval()
        return None, gpt, phi, codebook
    tok, v = tiny_var(seed)
    return tok, v, v, tok.codebook().detach()


def test_continuous_gpt_reads_codes_like_the_teacher():
    """With an input map that sends c_v to the token table's row v, the continuous teacher IS the teacher."""
    tok, gpt, phi, codebook = tiny_setup("llamagen")
    phi.tok_mlp = Lookup(codebook, gpt.tok_embeddings.weight.detach())
    tokens, labels = torch.randint(16, (5, 9)), torch.tensor([0, 1, 2, 3, 1])  # 3 = the null class
    torch.testing.assert_close(phi.logits(codebook[tokens], labels), gpt.logits(tokens, labels))
    torch.testing.assert_close(phi.cfg_logits(codebook[tokens[:4]], labels[:4], 2.0),
                               gpt.cfg_logits(tokens[:4], labels[:4], 2.0))


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_teacher_logp_matches_the_samplers_distribution(family):
    """teacher_logp on code vectors = the filtered, guided logits the ordinary sampler draws from (dd1)."""
    tok, gpt, phi, codebook = tiny_setup(family)
    if family == "llamagen":
        phi.tok_mlp = Lookup(codebook, gpt.tok_embeddings.weight.detach())
    L = 9 if family == "llamagen" else sum(p * p for p in PNS)
    tokens, labels = torch.randint(16, (4, L)), torch.tensor([0, 1, 2, 0])
    got = ardiff.teacher_logp(phi, tok, codebook[tokens], labels, SAMPLING[family])
    ends = [0, *dd1.step_ends(gpt)]
    for s in range(len(ends) - 1):
        want = dd1.guided_logits(gpt, tok, tokens, labels, SAMPLING[family], s).log_softmax(-1)
        assert not want.requires_grad  # (no graph kept: the teacher's weights require grad here)
        assert torch.equal(torch.isinf(got[:, ends[s]:ends[s + 1]]), torch.isinf(want))
        torch.testing.assert_close(got[:, ends[s]:ends[s + 1]], want)


@pytest.mark.parametrize("family, interval", [("llamagen", -1), ("llamagen", 3), ("var", -1)])
def test_guided_logits_of_every_step_from_one_pass(family, interval):
    tok, gpt, _, _ = tiny_setup(family)
    sampling = SAMPLING[family] if family == "var" else dataclasses.replace(SAMPLING[family], cfg_interval=interval)
    L = 9 if family == "llamagen" else sum(p * p for p in PNS)
    tokens, labels = torch.randint(16, (4, L)), torch.tensor([0, 1, 2, 0])
    every = dd1.guided_logits_all(gpt, tok, tokens, labels, sampling)
    ends = dd1.step_ends(gpt)
    steps = torch.cat([dd1.guided_logits(gpt, tok, tokens, labels, sampling, s) for s in range(len(ends))], 1)
    assert torch.equal(torch.isinf(every), torch.isinf(steps))
    torch.testing.assert_close(every, steps)


def test_fit_input_mlp_and_kl_adaptation_reduce_the_gap(tmp_path):
    tok, gpt, phi, codebook = tiny_setup("llamagen")
    losses = ardiff.fit_input_mlp(phi, gpt.tok_embeddings.weight, codebook, n_steps=300, lr=1e-2)
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    tokens, labels = torch.randint(16, (64, 9)), torch.randint(3, (64,))
    kl = ardiff.kl_to_teacher(gpt, codebook)
    before = kl(phi, {"tokens": tokens, "labels": labels})[0].item()
    train.fit(phi, kl, {"tokens": tokens, "labels": labels},
              train.FitConfig(n_steps=40, batch_size=32, lr=3e-3, ckpt_every=10 ** 9), tmp_path / "adapt.pt")
    after = kl(phi, {"tokens": tokens, "labels": labels})[0].item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_ardiffusion_copies_the_backbone_and_starts_at_zero_velocity(family):
    tok, gpt, phi, codebook = tiny_setup(family)
    model = ardiff.ARDiffusion.from_teacher(phi, head_width=32, head_depth=2)
    skip = "output." if family == "llamagen" else "head."
    want = {k: v for k, v in phi.state_dict().items() if not k.startswith(skip)}
    got = {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    x, labels = torch.randn(3, model.L, model.D), torch.tensor([0, 1, 2])
    f = model.features(ardiff.seq_input(tok, x), labels)
    assert f.shape[:2] == (3, model.L)
    assert torch.equal(model.velocity(x, torch.rand(3, model.L), f), torch.zeros_like(x))
    copy = ardiff.ARDiffusion(**model.config)
    copy.load_state_dict(model.state_dict(), strict=True)  # rebuilt from its config alone
