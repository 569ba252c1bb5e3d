"""A teacher family behind one small interface: tokenizer, AR teacher, sampling, likelihood, decoding.

The stages (`train_tokenizer`, `train_teacher`, `sample_teacher`, and the distillation stages after them) use a
family only through `family(name)`, so they do not care whether the teacher predicts the next token (LlamaGen) or the
next scale (VAR). Token sequences are always `LongTensor[N, L]` in the teacher's generation order (LlamaGen: raster
order of the h×w grid; VAR: the scales concatenated, coarse to fine). Images are uint8 `[N, C, S, S]` on the way in
(grey data is replicated to the official 3 channels) and float `[N, 3, S, S]` in [-1, 1] on the way out.

Text-to-image (`t2i`): the LlamaGen family with a caption prefix. Its labels are caption ids into a caption bank
(`dd.captions`: every caption's text features, the class and the attributes it asks for), carried by its tokenizer
(`CaptionedVQ`), so the stages pass [N] ints as they do for classes. Beside the ordinary interface a family has the
hooks that make that possible: `dataset` (the images and labels a family trains on), `eval_labels` (the evaluation's
conditions), `groups` (labels -> the condition groups per-class baselines use), `classes` (the classes labels ask
for) and `quality` (the metrics of generated images: for t2i the class judge on `captions.canonical` images and each
attribute's measured accuracy).

Hand-offs: weights as safetensors, the constructor config in the stage's `meta.json`, so
`load_model(folder, name, cls)` rebuilds a model without pickles (a t2i model with `tok=`, for its caption bank).

References:
    FoundationVision/LlamaGen (`autoregressive/sample/sample_c2i.py`: labels → tokens → `decode_code`).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import captions, data, io, llamagen, metrics, var, var_tokenizer


def _batches(n: int, batch_size: int, desc: str | None = None):
    starts = range(0, n, batch_size)
    return io.progress(starts, desc=desc) if desc and len(starts) > 4 else starts


class LlamaGen:
    """Next-token family: VQ tokenizer (L2-normalised codebook) + class-conditional GPT, raster order."""

    name = "llamagen"
    Tokenizer, Teacher = llamagen.VQModel, llamagen.GPT

    @staticmethod
    def dataset(folder, tcfg, seed: int) -> tuple[dict, dict, dict, None]:
        """The prepare stage's splits as this family trains on them -> ({"images", "labels"} train, the same for
        test, the dataset's meta, conditions for `build_tokenizer`: None, class labels need none)."""
        x_train, y_train, meta = data.load_split("train", folder)
        x_test, y_test, _ = data.load_split("test", folder)
        return {"images": x_train, "labels": y_train}, {"images": x_test, "labels": y_test}, meta, None

    @staticmethod
    def build_tokenizer(cfg, conditions=None) -> llamagen.VQModel:
        return llamagen.VQModel(in_channels=3, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                                z_channels=cfg.z_channels, codebook_size=cfg.codebook_size,
                                codebook_embed_dim=cfg.codebook_dim, dead_code_steps=cfg.dead_code_steps)

    @staticmethod
    def eval_labels(tok, n: int, num_classes: int, seed: int) -> torch.Tensor:
        """The evaluation's labels [n]: the classes in turn (balanced)."""
        return torch.arange(n) % num_classes

    @staticmethod
    def groups(tok, labels: torch.Tensor) -> torch.Tensor:
        """labels -> the condition groups of the per-class baselines (onestep*, skip-n): the classes themselves."""
        return labels

    @staticmethod
    def classes(tok, labels: torch.Tensor) -> torch.Tensor:
        """labels -> the classes they ask for (mosaics, class accuracy): the labels themselves."""
        return labels

    @staticmethod
    def quality(tok, net, ref: dict, images: torch.Tensor, labels: torch.Tensor | None, dataset: str, k: int = 3,
                device="cpu") -> dict:
        """The feature-space metrics of generated images [N, 3, S, S] for labels [N] (`metrics.sample_metrics`)."""
        return metrics.sample_metrics(net, ref, images, labels, dataset, k, device)

    @staticmethod
    def tokenizer_loss(model, batch):
        return model.loss(data.to_channels(data.to_float(batch["images"]), 3))

    @staticmethod
    @torch.no_grad()
    def encode(tok, images: torch.Tensor, batch_size: int = 500, device="cpu") -> torch.Tensor:
        """uint8 [N, C, S, S] → tokens [N, h·w] (raster order)."""
        tok.eval().to(device)
        out = [tok.encode_indices(data.to_channels(data.to_float(images[i:i + batch_size].to(device)), 3)).flatten(1)
               for i in _batches(len(images), batch_size, "encode")]
        return torch.cat(out).cpu()

    @staticmethod
    @torch.no_grad()
    def decode(tok, tokens: torch.Tensor, batch_size: int = 500, device="cpu") -> torch.Tensor:
        """tokens [N, h·w] → images [N, 3, S, S] in [-1, 1] (clamped)."""
        tok.eval().to(device)
        side = math.isqrt(tokens.shape[1])
        out = [tok.decode_indices(tokens[i:i + batch_size].to(device).view(-1, side, side)).clamp(-1, 1).cpu()
               for i in _batches(len(tokens), batch_size)]
        return torch.cat(out)

    @staticmethod
    def codebook(tok) -> torch.Tensor:
        """[V, D]: the embedding space the flow / score of DD1 and DD2 live in."""
        return tok.codebook().detach()

    @staticmethod
    def build_teacher(cfg, tok, num_classes: int, image_size: int) -> llamagen.GPT:
        side = image_size // tok.downsample_factor
        return llamagen.GPT(vocab_size=tok.config["codebook_size"], num_classes=num_classes, dim=cfg.dim,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, grid_size=side,
                            token_dropout_p=cfg.dropout, resid_dropout_p=cfg.dropout, ffn_dropout_p=cfg.dropout,
                            class_dropout_prob=cfg.class_dropout)

    @staticmethod
    def teacher_loss_fn(tok):
        """loss_fn(model, {"tokens", "labels"}) for `train.fit` (picklable: `dd.launch`)."""
        return _gpt_loss

    @staticmethod
    def ar_steps(teacher) -> int:
        return teacher.grid_size ** 2

    @staticmethod
    @torch.no_grad()
    def logits(tok, teacher, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced, unguided logits [N, L, V]; position i predicts tokens[:, i]."""
        return teacher.logits(tokens, labels)

    @staticmethod
    def sampler(cfg, generator=None) -> llamagen.Sampler:
        """The ordinary AR step of the sample_teacher section (temperature, top-k, top-p), drawing with `generator`."""
        return llamagen.Sampler(cfg.temperature, cfg.top_k, cfg.top_p, generator)

    @staticmethod
    def steps(tok, teacher, labels: torch.Tensor, cfg, step_fn):
        """The teacher's KV-cached sampler on one batch labels [B] with the section's guidance (teacher in eval mode
        on labels' device): yields each AR step's tokens [B, 1]; step_fn(n, guided logits [B, V]) → tokens [B]."""
        teacher.eval().to(labels.device)
        return (t[:, None] for t in teacher.steps(labels, cfg.cfg_scale, cfg.cfg_interval, step_fn))

    @staticmethod
    def sample(tok, teacher, labels: torch.Tensor, cfg, generator=None, batch_size: int = 250, device="cpu",
               step_fn=None) -> torch.Tensor:
        """labels [N] → tokens [N, L], with the sample_teacher section's CFG / temperature / top-k / top-p
        (`sampler`), or with step_fn(n, guided logits [B, V]) → tokens [B] deciding every step."""
        return _sample(LlamaGen, tok, teacher, labels, cfg, generator, batch_size, device, step_fn)

    @staticmethod
    def load_official(tcfg):
        """`teacher.source: official`: the released VQ and GPT files, loaded strictly."""
        return llamagen.load_vq(tcfg.tokenizer_path), llamagen.load_gpt(tcfg.teacher_path, grid_size=tcfg.grid_size)


class VAR:
    """Next-scale family: multi-scale residual VQVAE (raw codebook) + VAR transformer; tokens = scales concatenated."""

    name = "var"
    Tokenizer, Teacher = var_tokenizer.VQVAE, var.VAR
    dataset, eval_labels, groups, classes, quality = (LlamaGen.dataset, LlamaGen.eval_labels, LlamaGen.groups,
                                                      LlamaGen.classes, LlamaGen.quality)

    @staticmethod
    def build_tokenizer(cfg, conditions=None) -> var_tokenizer.VQVAE:
        return var_tokenizer.VQVAE(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=cfg.ch,
                                   ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                                   patch_nums=list(cfg.patch_nums))

    tokenizer_loss = LlamaGen.tokenizer_loss

    @staticmethod
    def split(tok, tokens: torch.Tensor) -> list[torch.Tensor]:
        """[N, L] → one [N, pn²] block per scale."""
        return list(tokens.split([p * p for p in tok.patch_nums], dim=1))

    @staticmethod
    @torch.no_grad()
    def encode(tok, images: torch.Tensor, batch_size: int = 500, device="cpu") -> torch.Tensor:
        """uint8 [N, C, S, S] → tokens [N, L] (scales coarse to fine, each in raster order)."""
        tok.eval().to(device)
        out = [torch.cat(tok.encode_scales(data.to_channels(data.to_float(images[i:i + batch_size].to(device)), 3)), 1)
               for i in _batches(len(images), batch_size, "encode")]
        return torch.cat(out).cpu()

    @staticmethod
    @torch.no_grad()
    def decode(tok, tokens: torch.Tensor, batch_size: int = 500, device="cpu") -> torch.Tensor:
        tok.eval().to(device)
        out = [tok.decode_scales(VAR.split(tok, tokens[i:i + batch_size].to(device))).clamp(-1, 1).cpu()
               for i in _batches(len(tokens), batch_size)]
        return torch.cat(out)

    @staticmethod
    def codebook(tok) -> torch.Tensor:
        return tok.codebook().detach()

    @staticmethod
    def build_teacher(cfg, tok, num_classes: int, image_size: int) -> var.VAR:
        return var.VAR(vocab_size=tok.config["vocab_size"], z_channels=tok.z_channels, num_classes=num_classes,
                       depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
                       cond_drop_rate=cfg.class_dropout, patch_nums=list(tok.patch_nums))

    @staticmethod
    def teacher_loss_fn(tok):
        """loss_fn(model, {"tokens", "labels"}): the frozen VQVAE builds VAR's next-scale inputs per batch
        (picklable: `dd.launch`)."""
        tok.eval()
        return functools.partial(_var_loss, tok)

    @staticmethod
    def ar_steps(teacher) -> int:
        return len(teacher.patch_nums)

    @staticmethod
    def logits(tok, teacher, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return teacher.logits(tok.teacher_forcing_input(VAR.split(tok, tokens)), labels)

    @staticmethod
    def sampler(cfg, generator=None) -> var.Sampler:
        """The ordinary AR step of the sample_teacher section (top-k, top-p; no temperature), drawing with
        `generator`."""
        return var.Sampler(cfg.top_k, cfg.top_p, generator)

    @staticmethod
    def steps(tok, teacher, labels: torch.Tensor, cfg, step_fn):
        """The teacher's KV-cached sampler on one batch labels [B] with VAR's CFG ramp (teacher and VQVAE in eval
        mode on labels' device): yields each scale's tokens [B, pn²]; step_fn(si, guided logits [B, pn², V]) →
        tokens [B, pn²]."""
        teacher.eval().to(labels.device), tok.eval().to(labels.device)
        return teacher.steps(tok, labels, cfg.cfg, step_fn)

    @staticmethod
    def sample(tok, teacher, labels: torch.Tensor, cfg, generator=None, batch_size: int = 250, device="cpu",
               step_fn=None) -> torch.Tensor:
        """labels [N] → tokens [N, L], with VAR's CFG ramp and top-k / top-p (`sampler`), or with
        step_fn(si, guided logits [B, pn², V]) → tokens [B, pn²] deciding every scale."""
        return _sample(VAR, tok, teacher, labels, cfg, generator, batch_size, device, step_fn)

    @staticmethod
    def load_official(tcfg):
        return var_tokenizer.load_vae(tcfg.tokenizer_path), var.load_var(tcfg.teacher_path)


class CaptionedVQ(llamagen.VQModel):
    """The t2i family's tokenizer: LlamaGen's VQ for the images, and the caption bank its teacher's prefix reads.

    Buffers (in its state dict): `captions` [n, P, Dc] every caption's text features (left-padded, zeros at padding),
    `caption_mask` [n, P] (True: a real token), `caption_info` [n, 4] the class and the attributes (`dd.captions`
    ATTRIBUTES order) each caption asks for. Ids [0, n_train) are the training templates' captions, the rest the
    held-out templates' (evaluation only).
    """

    def __init__(self, *, n_captions: int, n_train: int, cls_token_num: int, caption_dim: int, **vq):
        super().__init__(**vq)
        self.config.update(n_captions=n_captions, n_train=n_train, cls_token_num=cls_token_num,
                           caption_dim=caption_dim)
        self.n_train = n_train
        self.register_buffer("captions", torch.zeros(n_captions, cls_token_num, caption_dim))
        self.register_buffer("caption_mask", torch.zeros(n_captions, cls_token_num, dtype=torch.bool))
        self.register_buffer("caption_info", torch.zeros(n_captions, 1 + len(captions.ATTRIBUTES), dtype=torch.long))

    def set_conditions(self, conditions: dict) -> "CaptionedVQ":
        for key in ("captions", "caption_mask", "caption_info"):
            getattr(self, key).copy_(conditions[key])
        return self


class T2I(LlamaGen):
    """Text-to-image: LlamaGen's T2I GPT (the caption's text-encoder tokens as the prefix, the release's layout) on
    captioned images (`dd.captions`: the class plus drawn size / position / brightness, rendered into the image).
    Labels are caption ids into the tokenizer's caption bank; the metrics judge the class on canonical images and
    measure every attribute."""

    name = "t2i"
    Tokenizer = CaptionedVQ

    @staticmethod
    def dataset(folder, tcfg, seed: int) -> tuple[dict, dict, dict, dict]:
        """Every image of the prepare stage's splits with drawn attributes rendered into it and one caption saying
        them (train split: the training templates; test split: the held-out ones), and the caption bank: the
        text features of every caption (`captions.encode`, tcfg.caption_tokens tokens)."""
        g = torch.Generator().manual_seed(seed)
        x_train, y_train, meta = data.load_split("train", folder)
        x_test, y_test, _ = data.load_split("test", folder)
        tables = {s: captions.caption_table(meta["classes"], s) for s in ("train", "heldout")}
        a_train, ids_train = captions.assign(y_train, tables["train"], g)
        a_test, ids_test = captions.assign(y_test, tables["heldout"], g)
        rows = tables["train"] + tables["heldout"]
        feats, mask = captions.encode([r["text"] for r in rows], tcfg.caption_tokens)
        info = torch.tensor([[r["label"], *(r[a] for a in captions.ATTRIBUTES)] for r in rows])
        n_train = len(tables["train"])
        meta = {**meta, "num_classes": n_train, "n_captions": len(rows), "caption_tokens": tcfg.caption_tokens}
        conditions = {"captions": feats, "caption_mask": mask, "caption_info": info, "n_train": n_train,
                      "texts": [r["text"] for r in rows]}
        return ({"images": captions.render(x_train, a_train), "labels": ids_train},
                {"images": captions.render(x_test, a_test), "labels": ids_test + n_train}, meta, conditions)

    @staticmethod
    def build_tokenizer(cfg, conditions=None) -> CaptionedVQ:
        if conditions is None:
            raise ValueError("t2i: the tokenizer carries the caption bank; give the conditions of `T2I.dataset`")
        n, P, Dc = conditions["captions"].shape
        tok = CaptionedVQ(n_captions=n, n_train=conditions["n_train"], cls_token_num=P, caption_dim=Dc,
                          in_channels=3, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                          z_channels=cfg.z_channels, codebook_size=cfg.codebook_size,
                          codebook_embed_dim=cfg.codebook_dim, dead_code_steps=cfg.dead_code_steps)
        return tok.set_conditions(conditions)

    @staticmethod
    def build_teacher(cfg, tok, num_classes: int, image_size: int) -> llamagen.GPT:
        side = image_size // tok.downsample_factor
        n, P, Dc = tok.captions.shape
        gpt = llamagen.GPT(vocab_size=tok.config["codebook_size"], dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head,
                           grid_size=side, token_dropout_p=cfg.dropout, resid_dropout_p=cfg.dropout,
                           ffn_dropout_p=cfg.dropout, class_dropout_prob=cfg.class_dropout, caption_dim=Dc,
                           cls_token_num=P)
        gpt.cls_embedding.set_captions(tok.captions, tok.caption_mask)
        return gpt

    @staticmethod
    def eval_labels(tok, n: int, num_classes: int, seed: int) -> torch.Tensor:
        """n held-out captions, the classes in turn, each class's captions in a seeded random order."""
        held = torch.arange(tok.n_train, len(tok.captions))
        held = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(seed))]
        cls = tok.caption_info.cpu()[held, 0]
        per_class = [held[cls == c] for c in cls.unique()]
        C = len(per_class)
        return torch.stack([per_class[i % C][(i // C) % len(per_class[i % C])] for i in range(n)])

    @staticmethod
    def groups(tok, labels: torch.Tensor) -> torch.Tensor:
        """caption ids -> what they ask for as one group id (class and attributes), so a held-out caption finds
        the training captions that say the same."""
        info = tok.caption_info.cpu()[labels.cpu()]
        out = info[:, 0]
        for j in range(1, info.shape[1]):  # the attributes are binary
            out = out * 2 + info[:, j]
        return out

    @staticmethod
    def classes(tok, labels: torch.Tensor) -> torch.Tensor:
        return tok.caption_info.cpu()[labels.cpu(), 0]

    @staticmethod
    def quality(tok, net, ref: dict, images: torch.Tensor, labels: torch.Tensor | None, dataset: str, k: int = 3,
                device="cpu") -> dict:
        """The feature-space metrics and class accuracy on `captions.canonical` images (the attributes undone, so
        the plain test split is the reference), and each attribute's accuracy measured on the images as generated
        (`captions.attribute_accuracy`, chance 0.5)."""
        classes = None if labels is None else T2I.classes(tok, labels)
        out = metrics.sample_metrics(net, ref, captions.canonical(images), classes, dataset, k, device)
        if labels is not None:
            out.update(captions.attribute_accuracy(images, tok.caption_info.cpu()[labels.cpu(), 1:]))
        return out

    @staticmethod
    def load_official(tcfg):
        raise ValueError("params.yaml: teacher.t2i.source = official is not allowed; allowed: train. A released "
                         "LlamaGen T2I model reads FLAN-T5 features of its own captions: load it with "
                         "dd.llamagen.load_gpt and give it the features with cls_embedding.set_captions")


@torch.no_grad()
def _sample(fam, tok, teacher, labels: torch.Tensor, cfg, generator, batch_size: int, device, step_fn) -> torch.Tensor:
    """`fam.sample`: every AR step of `fam.steps` on labels [N] in batches → tokens [N, L] on the CPU. One generator
    drives all batches in order, so a batch's draws depend on the batches before it."""
    if step_fn is None:
        step_fn = fam.sampler(cfg, generator)
    elif generator is not None:
        raise ValueError(f"{fam.name} sample: give a generator (ordinary sampling) or a step_fn, not both")
    out = [torch.cat(list(fam.steps(tok, teacher, labels[i:i + batch_size].to(device), cfg, step_fn)), 1).cpu()
           for i in _batches(len(labels), batch_size, "sample")]
    return torch.cat(out)


LOGIT_ELEMENTS = 2 ** 26  # logits computed at once by `nll` (2,048 sequences of 64 x 512, 16 of 256 x 16,384)


@torch.no_grad()
def nll(fam, tok, teacher, tokens: torch.Tensor, labels: torch.Tensor, batch_size: int = 250, device="cpu") -> float:
    """Mean negative log-likelihood of tokens [N, L] under the unguided teacher, in nats per token; in batches of
    at most batch_size sequences and LOGIT_ELEMENTS logits."""
    teacher.eval().to(device), tok.eval().to(device)
    batch_size = max(1, min(batch_size, LOGIT_ELEMENTS // (tokens.shape[1] * teacher.vocab_size)))
    total = 0.0
    for i in _batches(len(tokens), batch_size):
        t, y = tokens[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        total += F.cross_entropy(fam.logits(tok, teacher, t, y).flatten(0, 1), t.flatten(), reduction="sum").item()
    return total / tokens.numel()


def _gpt_loss(model, batch):
    return model.loss(batch["tokens"], batch["labels"])


def _var_loss(tok, model, batch):
    idx = VAR.split(tok, batch["tokens"])
    with torch.no_grad():
        x_in = tok.to(batch["tokens"].device).teacher_forcing_input(idx)
    return model.loss(idx, batch["labels"], x_in)


FAMILIES = {"llamagen": LlamaGen, "var": VAR, "t2i": T2I}


def family(name: str):
    if name not in FAMILIES:
        raise ValueError(f"unknown teacher family {name!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def save_model(folder: str | Path, stage: str, name: str, model, **info) -> None:
    """Write `folder/name.safetensors` and record the model's class and constructor config in meta.json."""
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    io.save_tensors(Path(folder) / f"{name}.safetensors", weights)
    io.write_meta(folder, stage, {f"{name}.safetensors": weights},
                  models={name: {"class": type(model).__name__, "config": model.config, **info}})


def load_model(folder: str | Path, name: str, cls, tok=None):
    """Rebuild `cls(**config)` from meta.json and load `folder/name.safetensors` strictly (eval mode). A model with
    a caption prefix (t2i) reads its caption bank from `tok`, the family's `CaptionedVQ` (a bank is runtime data,
    not in the release's state dict)."""
    folder = io.path(folder)
    weights, meta = io.read_checked(folder, f"{name}.safetensors")
    info = meta.get("models", {}).get(name)
    if info is None or info["class"] != cls.__name__:
        raise ValueError(f"{folder}/meta.json: {name} is {info and info['class']}, expected a {cls.__name__} "
                         "(wrong family's checkpoint?)")
    model = cls(**info["config"])
    model.load_state_dict(weights, strict=True)
    banks = [m for m in model.modules() if isinstance(m, llamagen.CaptionEmbedder)]
    if banks:
        if not isinstance(tok, CaptionedVQ):
            raise ValueError(f"{folder}/{name}.safetensors has a caption prefix: load it with tok= the t2i "
                             "tokenizer, whose caption bank it reads")
        for m in banks:
            m.set_captions(tok.captions, tok.caption_mask)
    return model.eval()
