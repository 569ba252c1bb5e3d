"""The `t2i` teacher family: the caption bank its tokenizer carries, what its labels ask for, and its metrics."""
import types

import pytest
import torch

from dd import captions, metrics, teachers
from dd.teachers import T2I

CLASSES = ["T-shirt/top", "Trouser", "Bag"]
TOK = types.SimpleNamespace(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=16, codebook_size=32,
                            codebook_dim=4, dead_code_steps=0)
GPT = types.SimpleNamespace(dim=32, n_layer=1, n_head=2, dropout=0.0, class_dropout=0.1)


def conditions(P=6, Dc=8):
    """A caption bank of the caption tables (train, then held-out) with random features in place of the encoder's."""
    rows = captions.caption_table(CLASSES, "train") + captions.caption_table(CLASSES, "heldout")
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(P).expand(len(rows), P) >= torch.randint(1, P, (len(rows), 1), generator=g)
    return {"captions": torch.randn(len(rows), P, Dc, generator=g) * mask[..., None], "caption_mask": mask,
            "caption_info": torch.tensor([[r["label"], *(r[a] for a in captions.ATTRIBUTES)] for r in rows]),
            "n_train": len(captions.caption_table(CLASSES, "train")), "texts": [r["text"] for r in rows]}


@pytest.fixture(scope="module")
def family():
    cond = conditions()
    tok = T2I.build_tokenizer(TOK, cond)
    return tok, T2I.build_teacher(GPT, tok, cond["n_train"], 16), cond


def test_tokenizer_carries_the_bank_and_the_teacher_reads_it(family, tmp_path):
    tok, teacher, cond = family
    assert torch.equal(tok.captions, cond["captions"]) and tok.n_train == cond["n_train"]
    assert teacher.num_classes == len(cond["texts"]) and teacher.n_prefix == 6
    teachers.save_model(tmp_path / "tok", "train_tokenizer", "tokenizer", tok)
    teachers.save_model(tmp_path, "train_teacher", "teacher", teacher)
    tok2 = teachers.load_model(tmp_path / "tok", "tokenizer", teachers.CaptionedVQ)
    assert torch.equal(tok2.caption_info, tok.caption_info) and tok2.n_train == tok.n_train
    teacher2 = teachers.load_model(tmp_path, "teacher", T2I.Teacher, tok2)
    labels = torch.tensor([0, 5, len(cond["texts"]) - 1])
    tokens = torch.randint(32, (3, 64))
    assert torch.allclose(teacher2.logits(tokens, labels), teacher.eval().logits(tokens, labels), atol=1e-6)
    with pytest.raises(ValueError, match="caption prefix: load it with tok="):
        teachers.load_model(tmp_path, "teacher", T2I.Teacher)
    with pytest.raises(ValueError, match="give the conditions"):
        T2I.build_tokenizer(TOK)


def test_labels_ask_for_classes_and_attributes(family):
    tok, _, cond = family
    n_train, info = cond["n_train"], cond["caption_info"]
    ev = T2I.eval_labels(tok, 30, n_train, seed=0)
    assert (ev >= n_train).all() and len(ev.unique()) == 30  # held-out captions only, no repeats
    assert torch.equal(T2I.classes(tok, ev), torch.arange(30) % len(CLASSES))  # the classes in turn
    assert torch.equal(T2I.eval_labels(tok, 30, n_train, seed=0), ev)
    assert not torch.equal(T2I.eval_labels(tok, 30, n_train, seed=1), ev)
    groups = T2I.groups(tok, torch.arange(len(info)))
    same = (info[:, None] == info[None]).all(-1)  # captions that ask for the same class and attributes
    assert torch.equal(groups[:, None] == groups[None], same)
    assert len(groups.unique()) == len(CLASSES) * 2 ** len(captions.ATTRIBUTES)
    assert set(groups[ev].tolist()) <= set(groups[:n_train].tolist())  # a held-out caption has training partners


def test_quality_measures_attributes_and_judges_canonical_images(family):
    tok, _, cond = family
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % len(CLASSES)
    plain = torch.zeros(40, 1, 32, 32, dtype=torch.uint8)
    for i, c in enumerate(y.tolist()):  # a class-shaped blob: wide, tall or square
        h, w = ((10, 24), (24, 8), (16, 16))[c]
        plain[i, 0, 16 - h // 2:16 + h // 2, 16 - w // 2:16 + w // 2] = 200
    attrs, ids = captions.assign(y, captions.caption_table(CLASSES, "heldout"), g)
    ids = ids + cond["n_train"]
    images = captions.render(plain, attrs)
    net = metrics.FeatureNet(in_channels=3, num_classes=len(CLASSES), width=8).eval()
    feats = metrics.extract_features(net, images.float() / 127.5 - 1)
    mu, sigma = metrics.feature_stats(feats)
    ref = {"mu": torch.as_tensor(mu), "sigma": torch.as_tensor(sigma), "feats": feats}
    q = T2I.quality(tok, net, ref, images.float() / 127.5 - 1, ids, "fashion-mnist")
    assert {"fid_fmnist", "precision", "recall", "class_acc", "size_acc", "position_acc", "brightness_acc"} <= set(q)
    assert min(q["size_acc"], q["position_acc"], q["brightness_acc"]) >= 0.95
    wrong = T2I.quality(tok, net, ref, images.flip(0).float() / 127.5 - 1, ids, "fashion-mnist")
    assert wrong["position_acc"] < 0.8
    # the class judge sees canonical images: the same objects at any size, position and brightness judge alike
    big = captions.render(plain, torch.tensor([[1, 1, 1]]).expand(40, 3))
    same = T2I.quality(tok, net, ref, big.float() / 127.5 - 1, ids, "fashion-mnist")
    assert same["class_acc"] == pytest.approx(q["class_acc"], abs=0.1)
