import copy

import pytest
import torch

from dd import io, params, teachers, trajectories


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    fam = teachers.family("llamagen")
    tok = fam.build_tokenizer(params.read_section("train_tokenizer", "llamagen", codebook_size=8, z_channels=32,
                                                  ch_mult=[1, 2, 2, 2])).eval()
    teacher = fam.build_teacher(params.read_section("train_teacher", "llamagen", dim=16, n_layer=1, n_head=1),
                                tok, num_classes=2, image_size=16).eval()  # 16 px / 8 → 2x2 = 4 tokens
    torch.nn.init.normal_(teacher.output.weight, std=0.5)  # a non-uniform, label-dependent teacher
    return fam, tok, teacher


def test_step_ends_and_perturb(tiny):
    _, _, teacher = tiny
    assert trajectories.step_ends(teacher) == [1, 2, 3, 4]

    class FakeVar:
        patch_nums = (1, 2, 3)

    assert trajectories.step_ends(FakeVar()) == [1, 5, 14]
    data, noise = torch.ones(3, 4, 2), torch.zeros(3, 4, 2)
    x = trajectories.perturb(data, noise, torch.tensor([0, 2, 4]), [1, 2, 3, 4])
    assert x[:, :, 0].tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_flow_tokens_with_dirac_distributions_equal_greedy_generation(tiny):
    fam, tok, teacher = tiny
    sampling = params.read_section("sample_teacher", "llamagen", cfg_scale=2.0, top_k=1)
    y = torch.tensor([0, 1, 1, 0])
    noise = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(1))
    greedy = fam.sample(tok, teacher, y, sampling)
    assert torch.equal(trajectories.flow_tokens(fam, tok, teacher, y, noise, sampling, n_steps=16), greedy)


def test_flow_tokens_are_distributed_like_teacher_samples(tiny):
    fam, tok, teacher = tiny
    sampling = params.read_section("sample_teacher", "llamagen", cfg_scale=1.0)
    n = 4000
    y = torch.zeros(n, dtype=torch.long)
    noise = torch.randn(n, 4, 8, generator=torch.Generator().manual_seed(2))
    q = trajectories.flow_tokens(fam, tok, teacher, y, noise, sampling, n_steps=32)
    # exact joint of the first two tokens from teacher-forced logits, against the empirical one
    grid = torch.cartesian_prod(torch.arange(8), torch.arange(8))  # [64, 2]
    seqs = torch.cat([grid, torch.zeros(64, 2, dtype=torch.long)], 1)
    logp = teacher.logits(seqs, torch.zeros(64, dtype=torch.long)).log_softmax(-1)
    exact = (logp[:, 0].gather(1, grid[:, :1]) + logp[:, 1].gather(1, grid[:, 1:])).exp().squeeze(1)
    emp = torch.bincount(q[:, 0] * 8 + q[:, 1], minlength=64).float() / n
    tv = 0.5 * (emp - exact).abs().sum().item()
    floor = 0.5 * (exact * (1 - exact) / n).sqrt().sum().item() * (2 / torch.pi) ** 0.5 * 2  # ~ E[TV] of n draws
    assert tv < floor + 0.02, (tv, floor)


def test_shards_are_rank_independent_and_resume(tiny, tmp_path, monkeypatch):
    fam, tok, teacher = tiny
    sampling = params.read_section("sample_teacher", "llamagen")
    kw = dict(n_pairs=10, shard_size=4, num_classes=2, seed=3, n_steps=8, batch_size=3)
    trajectories.build(tmp_path / "one", fam, tok, teacher, sampling, **kw)
    for rank in (0, 1):
        trajectories.build(tmp_path / "two", fam, tok, teacher, sampling, rank=rank, world=2, **kw)
    a, b = trajectories.load_pairs(tmp_path / "one"), trajectories.load_pairs(tmp_path / "two")
    assert a["tokens"].shape == (10, 4) and a["noise"].shape == (10, 4, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the stored noise is what the flow consumed: rebuilding the tokens from it gives the same pairs
    again = trajectories.flow_tokens(fam, tok, teacher, a["labels"], a["noise"], sampling, n_steps=8)
    assert torch.equal(again, a["tokens"])

    def boom(*args, **kwargs):
        raise AssertionError("an existing shard was rebuilt")

    monkeypatch.setattr(trajectories, "build_shard", boom)
    trajectories.build(tmp_path / "one", fam, tok, teacher, sampling, **kw)  # resume: nothing left to do


def test_build_drops_shards_of_other_settings_and_load_pairs_counts(tiny, tmp_path, capsys):
    fam, tok, teacher = tiny
    sampling = params.read_section("sample_teacher", "llamagen")
    kw = dict(n_pairs=6, shard_size=4, num_classes=2, seed=3, n_steps=8, batch_size=3)
    first = trajectories.build(tmp_path, fam, tok, teacher, sampling, fingerprint={"flow_steps": 8}, **kw)
    assert first["built_pairs"] == 6 and [p.name for p in first["shards"]] == ["pairs_00000.safetensors",
                                                                               "pairs_00001.safetensors"]
    again = trajectories.build(tmp_path, fam, tok, teacher, sampling, fingerprint={"flow_steps": 8}, **kw)
    assert again["built_pairs"] == 0  # same settings: resumed, nothing rebuilt
    # ... and the time reported is still what building the shards took (recorded in each shard's header)
    assert first["build_seconds"] > 0 and again["build_seconds"] == pytest.approx(first["build_seconds"], abs=2e-3)
    header = io.tensor_metadata(first["shards"][0])
    assert header["processes"] == "1" and float(header["seconds"]) > 0
    old = trajectories.load_pairs(tmp_path)
    kw["n_steps"] = 2
    other = trajectories.build(tmp_path, fam, tok, teacher, sampling, fingerprint={"flow_steps": 2}, **kw)
    assert other["built_pairs"] == 6 and "2 shards from a build with other settings" in capsys.readouterr().out
    assert torch.equal(trajectories.load_pairs(tmp_path)["noise"], old["noise"])  # same seed, same noise
    assert len(trajectories.load_pairs(tmp_path, 5)["labels"]) == 5
    with pytest.raises(FileNotFoundError, match="6 pairs on disk, 7 needed"):
        trajectories.load_pairs(tmp_path, 7)
    with pytest.raises(ValueError, match=r"pairs_00000.safetensors: labels out of range: found 0 \.\. 1, the teacher "
                                         r"takes 0 \.\. 0"):
        trajectories.load_pairs(tmp_path, num_classes=1)
    with pytest.raises(ValueError, match=r"pairs_00000.safetensors: tokens out of range: .* the teacher takes 0 \.\. 1 "):
        trajectories.load_pairs(tmp_path, vocab_size=2)
