"""Speculative Jacobi decoding (dd/sjd.py): window 0 is the teacher's own sampler token for token; any window
samples the teacher's exact joint (guidance and top-k included) on an enumerable toy teacher, in fewer passes."""
import itertools
import math

import pytest
import torch

from dd import llamagen, sjd

V, K, L = 4, 2, 4


def toy_teacher(grid: int = 2, scale: float = 2.0) -> llamagen.GPT:
    """A 2×2-grid teacher (4 tokens of V = 4, 2 classes) whose conditionals depend strongly on the prefix."""
    torch.manual_seed(0)
    t = llamagen.GPT(vocab_size=V, num_classes=K, dim=32, n_layer=2, n_head=2, grid_size=grid)
    with torch.no_grad():
        for p in t.parameters():
            if p.dim() >= 2:
                p.normal_(0, scale / math.sqrt(p.shape[-1]) if p.shape[-1] > V else scale)
    return t.eval()


def test_window_zero_is_the_teachers_sampler():
    t = toy_teacher()
    y = torch.randint(K, (64,), generator=torch.Generator().manual_seed(5))
    opts = dict(cfg_scale=1.5, cfg_interval=1, top_k=3)
    want = t.generate(y, **opts, generator=torch.Generator().manual_seed(1))
    got, passes = sjd.generate(t, y, **opts, window=0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, want) and (passes == L).all()


@pytest.mark.parametrize("cfg_scale,top_k,window,init", [(1.0, 0, 3, "random"), (2.0, 3, 2, "repeat"),
                                                         (2.0, 3, 5, "random")])
def test_sjd_samples_the_teachers_joint(cfg_scale, top_k, window, init):
    """TV of M SJD samples to the exact guided, filtered joint stays at the floor of M exact draws."""
    t = toy_teacher()
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))  # [256, 4]; row r is r in base V
    with torch.no_grad():
        joint = []
        for c in range(K):
            lab = torch.full((len(seqs),), c)
            lg = t.cfg_logits(seqs, lab, cfg_scale) if cfg_scale > 1 else t.logits(seqs, lab)
            joint.append(llamagen.filter_logits(lg, top_k).log_softmax(-1).gather(-1, seqs[..., None]).sum((1, 2)).exp())
    joint = torch.stack(joint)  # [K, 256]
    place = V ** torch.arange(L - 1, -1, -1)

    def tv(tokens, labels):  # mean over classes of TV(empirical joint, exact joint)
        h = torch.zeros(K, V ** L).index_put_((labels, (tokens * place).sum(1)), torch.ones(len(labels)),
                                              accumulate=True)
        return (0.5 * (h / h.sum(1, keepdim=True) - joint).abs().sum(1)).mean().item()

    g, M = torch.Generator().manual_seed(2), 8000
    y = torch.randint(K, (M,), generator=g)
    tokens, passes = sjd.generate(t, y, cfg_scale, top_k=top_k, window=window, init=init, generator=g)
    floor = tv(seqs[torch.stack([torch.multinomial(joint[c], 1, generator=g)[0] for c in y.tolist()])], y)
    assert tv(tokens, y) < floor + 0.015, (tv(tokens, y), floor)
    assert passes.float().mean() < L and passes.min() >= 1


def test_confident_teacher_takes_few_passes():
    """A near-deterministic teacher (temperature 0.05) accepts most drafts: far fewer passes than tokens."""
    t = toy_teacher(grid=4)
    y = torch.arange(K).repeat(8)
    _, passes = sjd.generate(t, y, temperature=0.05, window=8, init="repeat", generator=torch.Generator().manual_seed(0))
    assert passes.float().mean() < 16 / 2, passes


def test_bad_options_are_named():
    t = toy_teacher()
    with pytest.raises(ValueError, match="init must be one of"):
        sjd.generate(t, torch.tensor([0]), init="zeros")
    with pytest.raises(ValueError, match="window must be >= 0"):
        sjd.generate(t, torch.tensor([0]), window=-1)
