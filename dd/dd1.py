"""Distilled Decoding 1 (DD1): a one-step (or few-step) generator distilled from an AR teacher.

`trajectories` turns the teacher's sampling into a deterministic map (y, E) → q by replacing each multinomial draw
with the flow map of fresh noise eps_i. The trajectory point after t AR steps is X^t = (c_q1 .. c_q(n_t), eps ...)
with n_t = ends[t-1] positions given as data (`perturb`). DD1 trains one network f(X^t, y, t) to predict the end
point q from any such point; sampling with t_list = [0] takes one step from pure noise, [0, t2] re-noises the
positions ≥ n_t2 of the first result with the ORIGINAL noise and predicts them again.

The network is the teacher re-purposed, initialised from a copy of its weights (`DD1Model.from_teacher`):

    LlamaGen   slots [cls(y), x_0 .. x_{L-1}], x_i a D-vector (noise or code) through a new Linear(D, dim); causal
               attention over the slots, so output slot i+1 predicts token i from x_0..x_i (no next-token shift)
    VAR        slots [sos(y), x_0 .. x_{L-1}] through the teacher's word_embed; a token attends to the start slot,
               to all coarser scales and to itself only (VAR draws a scale's tokens independently given coarser ones)

Both add a learned data/noise embedding Embedding(2, dim) (id 1 for the class slot and the n_t data positions), VAR
also a Linear(C, C) of it inside every block and before the heads. Two heads per position: the teacher's logits
head (copied) and a new PixArt-style continuous head with D outputs. `t` is the number of AR steps given as data
(LlamaGen: tokens, VAR: scales); `split` below counts AR steps the same way.

Training (`dd1_loss`): cross-entropy of the logits at the positions ≥ n_t, plus a continuous-head loss. The paper's
LPIPS on decoded images needs LPIPS weights we do not have; the default is MSE to the target code vectors
(`cont_loss="embed"`), with `"decoded"` (pixel MSE through the frozen tokenizer decoder) and `"none"` as options.

References:
    - Liu et al., "Distilled Decoding 1" (DD1), arXiv 2412.17153 (model, trajectory points, sampling schedules).
    - Liu et al., "Distilled Decoding 2" (DD2), arXiv 2510.21003 (DD1 baselines and teacher sampling settings).
    - microsoft/distilled_decoding @3b95d33 (behaviour matched): `LlamaGen/autoregressive/models/dd.py` (Linear
      input, n_d_embed, FinalLayer, init from the teacher), `VAR/models/dd.py` (extra start slot, diagonal
      block-causal mask, layer-wise data/noise projections, lvl/pos rows shifted by one), `VAR/models/basic_var.py`
      (where the layer-wise embedding enters a block), `LlamaGen/autoregressive/sample/eval_fewstep.py` and
      `VAR/sample.py` (few-step sampling, split between the heads), `*/eval_combine_sample.py`,
      `VAR/combine_sample.py` (teacher-involved sampling).
    - PixArt-alpha `T2IFinalLayer` (the continuous head's table-plus-condition modulation).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import flow, io, llamagen, var, var_tokenizer
from .trajectories import perturb, step_ends  # noqa: F401 (part of this module's API: X^t and the step table)

CONT_LOSSES = ("embed", "decoded", "none")


def _steps(t, B: int, device) -> torch.Tensor:
    """int | LongTensor [B] → LongTensor [B]."""
    t = torch.as_tensor(t, dtype=torch.long, device=device)
    return t.expand(B) if t.dim() == 0 else t


def n_data(t: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """AR steps t [B] → number of leading positions given as data [B] (0 for t = 0, ends[t-1] otherwise)."""
    return torch.tensor([0, *ends], device=t.device)[t]


def data_mask(t: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """t [B] → BoolTensor [B, L]: True where X^t holds data rather than noise."""
    return torch.arange(ends[-1], device=t.device)[None] < n_data(t, ends)[:, None]


class FinalLayer(nn.Module):
    """Continuous head: LayerNorm (no affine), modulated by (shift, scale) = table + e_y, then Linear(dim, D).

    h [B, T, dim], cond [B, dim] → [B, T, D]."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, h, cond):
        shift, scale = (self.scale_shift_table[None] + cond[:, None]).unbind(1)  # each [B, dim]
        return self.linear(self.norm_final(h) * (1 + scale[:, None]) + shift[:, None])


def _var_block(b: var.AdaLNSelfAttn, x, cond, attn_bias, nd):
    """A teacher VAR block with DD1's layer-wise data/noise embedding nd [B, T, C] added between attention and FFN."""
    g1, g2, s1, s2, sh1, sh2 = b.ada_lin(cond).view(-1, 1, 6, b.dim).unbind(2)  # release chunk order
    x = x + var._drop_path(b.attn(b.ln_wo_grad(x) * (1 + s1) + sh1, attn_bias) * g1, b.drop_path, b.training)
    x = x + nd
    return x + var._drop_path(b.ffn(b.ln_wo_grad(x) * (1 + s2) + sh2) * g2, b.drop_path, b.training)


class DD1Model(nn.Module):
    """f(X^t, y, t) → (logits [B, L, V], continuous [B, L, D]) for a LlamaGen GPT or a VAR teacher.

    family: "llamagen" | "var"; teacher: the teacher's `config` dict; codebook_dim: D (VAR: its z_channels).
    Build it with `from_teacher`; the constructor alone gives the right shapes with untrained weights.
    """

    def __init__(self, family: str, teacher: dict, codebook_dim: int):
        super().__init__()
        self.config = dict(family=family, teacher=dict(teacher), codebook_dim=int(codebook_dim))
        self.family, self.D = family, int(codebook_dim)
        if family == "llamagen":
            gpt = llamagen.GPT(**teacher)  # its tok_embeddings are dropped: DD reads vectors, not indices
            self.grid_size, self.num_classes, self.n_prefix = gpt.grid_size, gpt.num_classes, gpt.n_prefix
            self.cls_embedding, self.layers = gpt.cls_embedding, gpt.layers
            self.norm, self.output = gpt.norm, gpt.output
            dim = gpt.config["dim"]
            self.tok_embeddings = nn.Linear(self.D, dim)  # new: D-vector input
            self._rope = None
            new = [self.tok_embeddings]
        elif family == "var":
            v = var.VAR(**teacher)
            if self.D != v.z_channels:
                raise ValueError(f"DD1Model: VAR reads Cvae = {v.z_channels}-d vectors, got codebook_dim {self.D}")
            self.patch_nums, self.num_classes, dim = v.patch_nums, v.num_classes, v.C
            self.word_embed, self.class_emb, self.blocks = v.word_embed, v.class_emb, v.blocks
            self.head_nm, self.head = v.head_nm, v.head
            L = v.L
            # one start slot + L token slots; level 0 is the start slot, level s + 1 the teacher's scale s
            self.pos_start = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_1LC = nn.Parameter(torch.zeros(1, L + 1, dim))
            self.lvl_embed = nn.Embedding(len(v.patch_nums) + 1, dim)
            lvl = torch.cat([torch.zeros(1, dtype=torch.long), v.lvl_1L[0] + 1])  # [L + 1]
            self.register_buffer("lvl_1L", lvl[None])
            # load-bearing: coarser levels and the diagonal only, so token j sees eps_j but no other eps of its scale
            sees = (lvl[:, None] > lvl[None, :]) | torch.eye(L + 1, dtype=torch.bool)
            self.register_buffer("attn_bias_for_masking", torch.where(sees, 0.0, -torch.inf)[None, None])
            self.layerwise_n_d_embed = nn.ModuleList(nn.Linear(dim, dim) for _ in range(len(v.blocks) + 1))
            new = list(self.layerwise_n_d_embed)
            std = (1 / dim / 3) ** 0.5  # the teacher's init scale for positions and levels
            for p in (self.pos_start, self.pos_1LC, self.lvl_embed.weight):
                nn.init.trunc_normal_(p, std=std)
        else:
            raise ValueError(f"DD1Model: unknown family {family!r}; families: llamagen, var")
        self.ends = step_ends(self)
        self.L, self.vocab_size = self.ends[-1], teacher["vocab_size"]
        self.n_d_embed = nn.Embedding(2, dim)  # new: id 1 = data (and the class slot), 0 = noise
        self.final_layer_conti = FinalLayer(dim, self.D)  # new continuous head
        for m in [*new, self.n_d_embed]:
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @classmethod
    def from_teacher(cls, teacher: nn.Module, codebook_dim: int | None = None) -> "DD1Model":
        """A DD1 model whose shared parts are copies of `teacher`'s weights (the teacher is left untouched).

        LlamaGen: class table, layers, final norm, logits head; codebook_dim (the tokenizer's D) is required.
        VAR: word_embed, class_emb, blocks, head_nm, head; pos_start; pos_1LC and lvl_embed shifted by one slot
        (DD slot j ≥ 2 takes the teacher row of slot j-1, the one that predicted token j-1; slot 1 stays new).
        """
        if isinstance(teacher, llamagen.GPT):
            if codebook_dim is None:
                raise ValueError("DD1Model.from_teacher: a LlamaGen teacher needs codebook_dim (the tokenizer's D)")
            model = cls("llamagen", teacher.config, codebook_dim)
            shared = ("cls_embedding", "layers", "norm", "output")
        elif isinstance(teacher, var.VAR):
            model = cls("var", teacher.config, teacher.z_channels)
            shared = ("word_embed", "class_emb", "blocks", "head_nm", "head")
            with torch.no_grad():
                model.pos_start.copy_(teacher.pos_start[:, :1])
                model.pos_1LC[:, 0] = teacher.pos_1LC[:, 0]
                model.pos_1LC[:, 2:] = teacher.pos_1LC[:, 1:]
                model.lvl_embed.weight[0] = teacher.lvl_embed.weight[0]
                model.lvl_embed.weight[2:] = teacher.lvl_embed.weight[1:]  # (the release re-inits class_emb[1] here)
        else:
            raise TypeError(f"DD1Model.from_teacher: expected a llamagen.GPT or var.VAR, got {type(teacher).__name__}")
        for name in shared:
            getattr(model, name).load_state_dict(getattr(teacher, name).state_dict())
        if isinstance(teacher, llamagen.GPT) and isinstance(teacher.cls_embedding, llamagen.CaptionEmbedder):
            model.cls_embedding.set_captions(teacher.cls_embedding.bank, teacher.cls_embedding.bank_mask)
        return model.to(next(teacher.parameters()).device)

    def rope(self, device) -> torch.Tensor:
        if self._rope is None or self._rope.device != torch.device(device):
            c = self.layers[0].cfg  # the GPT's full config (defaults filled in)
            self._rope = llamagen.rope_2d(self.grid_size, c["dim"] // c["n_head"], c["rope_base"],
                                          self.n_prefix).to(device)
        return self._rope

    def forward(self, x: torch.Tensor, labels: torch.Tensor, t, continuous: bool = True):
        """x = X^t [B, L, D], labels [B], t int | LongTensor [B] (AR steps given as data)
        → (logits [B, L, V] fp32, continuous [B, L, D], or None when `continuous` is False: sampling that reads no
        position from the continuous head skips it); position i is a prediction of token i."""
        B = x.shape[0]
        if x.dim() != 3 or x.shape[1:] != (self.L, self.D) or labels.shape != (B,):
            raise ValueError(f"DD1Model: expected x [B, {self.L}, {self.D}] and labels [B], got {tuple(x.shape)} "
                             f"and {tuple(labels.shape)}")
        t = _steps(t, B, x.device)
        nd = torch.arange(self.L + 1, device=x.device)[None] <= n_data(t, self.ends)[:, None]  # [B, L + 1]
        nd = self.n_d_embed(nd.long())  # [B, L + 1, dim]; slot 0 (class / start) always counts as data
        if self.family == "llamagen":
            return self._forward_llamagen(x, labels, nd, continuous)
        return self._forward_var(x, labels, nd, continuous)

    def _forward_llamagen(self, x, labels, nd, continuous):
        cond, key_mask = llamagen.condition(self.cls_embedding, labels)  # [B, P, dim]: P = 1 (class) or a caption
        P = cond.shape[1]
        nd = torch.cat([nd[:, :1].expand(-1, P - 1, -1), nd], 1)  # every prefix slot counts as data
        h = torch.cat([cond, self.tok_embeddings(x)], 1) + nd  # [B, P + L, dim]
        rope = self.rope(x.device)  # [P + L, hd/2, 2]; zero rows for the prefix, as in the teacher
        mask = llamagen.prefix_attn_mask(key_mask, 0, h.shape[1])
        for layer in self.layers:
            h = layer(h, rope, mask=mask)  # causal over the P + L slots (caption padding hidden)
        logits = self.output(self.norm(h)).float()[:, P:]  # [B, L, V]
        if not continuous:
            return logits, None
        if key_mask is None:
            pooled = cond.mean(1)  # the class embedding itself when P = 1
        else:
            w = key_mask[..., None].to(cond.dtype)
            pooled = (cond * w).sum(1) / w.sum(1)  # the caption's real tokens
        return logits, self.final_layer_conti(h, pooled)[:, P:]  # continuous head reads h before the norm

    def _forward_var(self, x, labels, nd, continuous):
        cond = self.class_emb(labels)  # [B, C]
        sos = cond[:, None] + self.pos_start  # [B, 1, C]
        h = torch.cat([sos, self.word_embed(x.float())], 1) + self.lvl_embed(self.lvl_1L) + self.pos_1LC + nd
        for block, proj in zip(self.blocks, self.layerwise_n_d_embed):
            h = _var_block(block, h, cond, self.attn_bias_for_masking, proj(nd))
        h = h + self.layerwise_n_d_embed[-1](nd)  # the last projection feeds both heads
        logits = self.head(self.head_nm(h.float(), cond)).float()[:, 1:]  # [B, L, V]
        return logits, (self.final_layer_conti(h, cond)[:, 1:] if continuous else None)


# ---- training ----------------------------------------------------------------------------------------------------

def dd1_loss(model: DD1Model, batch: dict, codebook: torch.Tensor, ends: list[int], t_set=(0,),
             cont_loss: str = "embed", split: int = 0, cont_weight: float = 1.0, decode_fn=None):
    """DD1 training loss on a batch of pairs {"labels" [B], "tokens" [B, L], "noise" [B, L, D]}.

    Each sample draws t uniformly from t_set (AR steps), the input is X^t = perturb(codebook[tokens], noise, t).
    ce: cross-entropy of the logits over the positions ≥ n_t (the ones the model must produce).
    cont ("embed"): MSE of the continuous head to codebook[tokens] over positions ≥ max(n_t, n_split), n_split =
    the positions of the first `split` AR steps (0: everywhere). ("decoded"): pixel MSE between decode_fn of
    [data prefix; sg(codebook[argmax logits]) before n_split; continuous head after] and decode_fn of the target,
    decode_fn(emb [B, L, D]) → images (e.g. `lambda e: decode(tok, e)`). ("none"): 0.
    Returns (ce + cont_weight · cont, {"ce", "cont"}).
    """
    if cont_loss not in CONT_LOSSES:
        raise ValueError(f"dd1_loss: cont_loss must be one of {CONT_LOSSES}, got {cont_loss!r}")
    tokens, noise, labels = batch["tokens"], batch["noise"], batch["labels"]
    B, L = tokens.shape
    dev = tokens.device
    cb = codebook.to(device=dev, dtype=noise.dtype)
    target = cb[tokens]  # [B, L, D]
    t_set = torch.as_tensor(list(t_set), dtype=torch.long, device=dev)
    t = t_set[torch.randint(len(t_set), (B,), device=dev)]  # [B]
    logits, cont = model(perturb(target, noise, t, ends), labels, t)
    gen = ~data_mask(t, ends)  # [B, L]
    ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")  # [B, L]
    ce = (ce * gen).sum() / gen.sum().clamp_min(1)
    late = torch.arange(L, device=dev) >= n_data(_steps(split, 1, dev), ends)  # [L]
    if cont_loss == "embed":
        m = gen & late
        c = (((cont - target) ** 2).mean(-1) * m).sum() / m.sum().clamp_min(1)
    elif cont_loss == "decoded":
        if decode_fn is None:
            raise ValueError("dd1_loss: cont_loss='decoded' needs decode_fn(emb [B, L, D]) → images")
        early = cb[logits.detach().argmax(-1)]  # no gradient through the argmax, as in the release
        x_hat = torch.where(gen[..., None], torch.where(late[:, None], cont, early), target)
        with torch.no_grad():
            ref = decode_fn(target)
        c = F.mse_loss(decode_fn(x_hat), ref)
    else:
        c = ce.new_zeros(())
    return ce + cont_weight * c, {"ce": ce.item(), "cont": c.item()}


def loss_fn(codebook: torch.Tensor, ends: list[int], **kw):
    """`loss_fn(model, batch)` for `train.fit`: `dd1_loss` with these arguments bound (picklable for `dd.launch`
    when decode_fn is)."""
    return functools.partial(dd1_loss, codebook=codebook, ends=ends, **kw)


# ---- sampling ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model: DD1Model, noise: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor, ends: list[int],
           t_list=(0,), split: int | None = None, tokens: torch.Tensor | None = None):
    """Few-step DD1 sampling: noise E [B, L, D], labels [B] → (tokens [B, L], embeddings [B, L, D]).

    For each t in t_list (increasing AR steps, e.g. [0] or [0, t2]): X^t = the current result's first n_t positions
    followed by the ORIGINAL noise E (never fresh noise: the map was learnt for this E); the model predicts every
    position ≥ n_t; positions before n_split (the first `split` AR steps; None: all) take codebook[argmax logits],
    the others the continuous head, left unsnapped (decode them as they are; `tokens` holds their nearest codes).
    `tokens` [B, L], when given, is the data prefix of a first t > 0 (teacher-involved sampling).
    """
    B, L, _ = noise.shape
    t_list = [int(t) for t in t_list]
    if any(b <= a for a, b in zip(t_list, t_list[1:])) or t_list[0] < 0 or t_list[-1] >= len(ends):
        raise ValueError(f"sample: t_list must increase within [0, {len(ends) - 1}], got {t_list}")
    if t_list[0] > 0 and tokens is None:
        raise ValueError(f"sample: t_list starts at {t_list[0]} > 0, which needs a data prefix `tokens`")
    cb = codebook.to(noise)
    late = torch.arange(L, device=noise.device) >= (L if split is None else ([0, *ends])[split])  # [L]
    reads_cont = split is not None and split < len(ends)  # some position comes from the continuous head
    tokens = torch.zeros(B, L, dtype=torch.long, device=noise.device) if tokens is None else tokens.clone()
    x = cb[tokens]
    for t in t_list:
        t = _steps(t, B, noise.device)
        x_t = perturb(x, noise, t, ends)
        logits, cont = model(x_t, labels, t, continuous=reads_cont)
        idx = logits.argmax(-1)  # [B, L]
        keep = data_mask(t, ends)  # the data prefix is copied, not re-predicted
        if reads_cont:
            near = flow.nearest_code(cont.reshape(-1, cont.shape[-1]), cb).view(B, L)
            idx = torch.where(late, near, idx)
            pred = torch.where(late[:, None], cont.to(cb.dtype), cb[idx])
        else:
            pred = cb[idx]
        tokens = torch.where(keep, tokens, idx)
        x = torch.where(keep[..., None], x_t, pred)
    return tokens, x


def in_batches(fn, noise: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fn(noise [b, L, D], labels [b]) → [b, ...] applied in chunks of batch_size and concatenated."""
    return torch.cat([fn(noise[i:i + batch_size], labels[i:i + batch_size])
                      for i in range(0, len(labels), batch_size)])


@torch.no_grad()
def guided_logits(teacher, tok, tokens: torch.Tensor, labels: torch.Tensor, cfg, step: int) -> torch.Tensor:
    """The teacher's filtered sampling logits for AR step `step` given tokens [B, L] (later positions ignored)
    → [B, n_step, V], with the sample_teacher section's guidance / temperature / top-k / top-p semantics. Without
    gradient: a kept result would otherwise hold the whole forward pass (at 256 tokens x 16,384 codes, gigabytes
    per step)."""
    if isinstance(teacher, llamagen.GPT):
        ctx = tokens[:, :step + 1]  # logits[:, i] depends on tokens[:, :i] only
        use_cfg = cfg.cfg_scale > 1.0 and (cfg.cfg_interval <= -1 or step <= cfg.cfg_interval + 1)
        logits = teacher.cfg_logits(ctx, labels, cfg.cfg_scale) if use_cfg else teacher.logits(ctx, labels)
        return llamagen.Sampler(cfg.temperature, cfg.top_k, cfg.top_p).filter(logits[:, -1:])
    ends = [0, *step_ends(teacher)]
    x_in = tok.teacher_forcing_input(list(tokens.split([p * p for p in teacher.patch_nums], 1)))
    logits = teacher.cfg_logits(x_in, labels, cfg.cfg)[:, ends[step]:ends[step + 1]]  # block-causal: prefix only
    return var.Sampler(cfg.top_k, cfg.top_p).filter(logits)


@torch.no_grad()
def guided_logits_all(teacher, tok, tokens: torch.Tensor, labels: torch.Tensor, cfg) -> torch.Tensor:
    """`guided_logits` of every AR step at once, from one teacher-forced forward pass → [B, L, V] (a step's logits
    depend on the earlier positions only): for reports over all positions, where a pass per step would cost L
    passes."""
    if isinstance(teacher, llamagen.GPT):
        s = cfg.cfg_scale
        logits = teacher.cfg_logits(tokens, labels, s) if s > 1.0 else teacher.logits(tokens, labels)
        if s > 1.0 and cfg.cfg_interval > -1:  # guidance for tokens n <= cfg_interval + 1 only
            late = torch.arange(tokens.shape[1], device=tokens.device) > cfg.cfg_interval + 1
            logits = torch.where(late[:, None], teacher.logits(tokens, labels), logits)
        return llamagen.Sampler(cfg.temperature, cfg.top_k, cfg.top_p).filter(logits)
    x_in = tok.teacher_forcing_input(list(tokens.split([p * p for p in teacher.patch_nums], 1)))
    return var.Sampler(cfg.top_k, cfg.top_p).filter(teacher.cfg_logits(x_in, labels, cfg.cfg))


@torch.no_grad()
def teacher_steps(teacher, tok, tokens: torch.Tensor, labels: torch.Tensor, start: int, stop: int, cfg,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """tokens [B, L] → a copy whose AR steps start..stop-1 are drawn by the teacher's ordinary sampler given the
    positions before them; the other positions are kept. Teacher-forced (one full forward per step, no KV cache):
    exact, and cheap at this project's lengths. tok: the VQVAE for VAR (its inputs are built from f_hat), else unused.
    """
    bounds = [0, *step_ends(teacher)]
    tokens = tokens.clone()
    for s in range(start, stop):
        probs = guided_logits(teacher, tok, tokens, labels, cfg, s).float().softmax(-1)  # [B, n_s, V]
        draw = torch.multinomial(probs.flatten(0, 1), 1, generator=generator)
        tokens[:, bounds[s]:bounds[s + 1]] = draw.view(tokens.shape[0], -1)
    return tokens


@torch.no_grad()
def sample_mixed(model: DD1Model, teacher, tok, noise: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor,
                 t2: int, start: int, cfg, split: int | None = None, generator: torch.Generator | None = None):
    """Teacher-involved sampling ("pre-trained-(start+1)-(t2+1)"): a DD step at t = 0 (skipped when start = 0)
    whose first `start` AR steps are kept as tokens, the teacher's ordinary sampler for steps start..t2-1, and a
    DD step at t2 on [that prefix; the original noise]. → (tokens [B, L], embeddings [B, L, D]) as `sample`."""
    ends = model.ends
    if not 0 <= start <= t2 < len(ends):
        raise ValueError(f"sample_mixed: need 0 <= start <= t2 < {len(ends)}, got start={start}, t2={t2}")
    tokens = torch.zeros(noise.shape[:2], dtype=torch.long, device=noise.device)
    if start > 0:
        tokens = sample(model, noise, labels, codebook, ends, (0,), split)[0]  # snapped to codes
    tokens = teacher_steps(teacher, tok, tokens, labels, start, t2, cfg, generator)
    if t2 == 0:
        return sample(model, noise, labels, codebook, ends, (0,), split)
    return sample(model, noise, labels, codebook, ends, (t2,), split, tokens=tokens)


DECODE_PIXELS = 2 ** 20  # image pixels decoded at once (1,024 images at 32 px, 16 at 256 px)


def decode(tok, emb: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Per-position embeddings [B, L, D] (codes or continuous-head outputs, not snapped) → images [B, 3, S, S] in
    [-1, 1]. LlamaGen: the h×w grid (raster order; the decoder L2-normalises, unless normalize=False: the released
    DD1 models' continuous outputs are decoded as they are); VAR: the per-scale blocks through
    the residual f_hat recursion. In chunks of DECODE_PIXELS pixels: a 256 px decoder's activations are ~100 MB
    per image. Differentiable (used by `dd1_loss(cont_loss="decoded")`)."""
    B, L, D = emb.shape
    if isinstance(tok, llamagen.VQModel):
        side = math.isqrt(L)
        pixels = (side * tok.downsample_factor) ** 2
        run = lambda e: tok.decode_embeddings(e.reshape(len(e), side, side, D), normalize).clamp(-1, 1)  # noqa: E731
    elif isinstance(tok, var_tokenizer.VQVAE):
        pixels = (tok.patch_nums[-1] * tok.downsample) ** 2
        run = lambda e: tok.decode_embeddings(list(e.split([p * p for p in tok.patch_nums], 1)))  # noqa: E731
    else:
        raise TypeError(f"decode: expected a llamagen.VQModel or var_tokenizer.VQVAE, got {type(tok).__name__}")
    chunk = max(1, DECODE_PIXELS // pixels)
    return run(emb) if B <= chunk else torch.cat([run(e) for e in emb.split(chunk)])


# ---- the released DD1 models (microsoft/distilled_decoding) --------------------------------------------------------

OFFICIAL_STATE = {"llamagen": "ema", "var": "trainer.ema_parameters"}  # where the release's samplers read the EMA
OFFICIAL_RAW = {"llamagen": "model", "var": "trainer.var_wo_ddp"}       # the raw (non-EMA) weights
OFFICIAL_SPLIT = {"llamagen-B": 80, "llamagen-L": 130, "var-d16": 5, "var-d20": 4, "var-d24": 4}  # README split_t
_VAR_BUFFERS = ("lvl_1L", "attn_bias_for_masking")  # rebuilt from patch_nums; a file may hold them or not


def _official_family(sd: dict, path) -> str:
    """Which release a state dict is: LlamaGen-DD, VAR-DD, or a plain teacher (an error that says so)."""
    dd = "n_d_embed.weight" in sd and any(k.startswith("final_layer_conti.") for k in sd)
    if "layers.0.attention.wqkv.weight" in sd:
        if dd:
            return "llamagen"
        raise ValueError(f"{path}: a LlamaGen teacher checkpoint, not a DD1 model (no n_d_embed / final_layer_conti);"
                         f" load it with teacher.llamagen.source: official")
    if "blocks.0.attn.mat_qkv.weight" in sd:
        if dd and any(k.startswith("layerwise_n_d_embed.") for k in sd):
            return "var"
        raise ValueError(f"{path}: a VAR teacher checkpoint, not a DD1 model (no n_d_embed / layerwise_n_d_embed); "
                         f"load it with teacher.var.source: official")
    raise ValueError(f"{path}: neither a LlamaGen-DD nor a VAR-DD checkpoint (first keys: {sorted(sd)[:8]})")


def load_official(path, family: str, ema: bool = True, grid_size: int = 16, patch_nums=None,
                  n_head: int | None = None, trusted: bool = False) -> DD1Model:
    """A released DD1 model (`LlamaGen-DD/llamagen-{B,L}.pt`, `VAR-DD/var-d{16,20,24}.pth`) as a DD1Model on CPU in
    eval mode, with sizes inferred from the weights and every key loaded strictly (the release's samplers load with
    strict=False; a mismatch here lists the missing, unexpected and mis-shaped keys).

    Weights: the EMA the release samples from (LlamaGen-DD `ckpt["ema"]`, VAR-DD
    `ckpt["trainer"]["ema_parameters"]`), or with ema=False the raw ones (`["model"]`, `["trainer"]["var_wo_ddp"]`);
    a raw state dict or a .safetensors file is read as it is. VAR's deterministic buffers (level ids, attention
    mask) are rebuilt from patch_nums (default: the release's 1..16) and must equal the file's where it holds them.
    grid_size: tokens per side of LlamaGen (16 for 256 px); n_head: attention heads, not in the weights (default:
    the release's: LlamaGen dim // 64, VAR from scale_mul_1H11, else depth). A file of the other family, or a
    teacher instead of a DD1 model, is an error that says so. Official training files may pickle Python objects:
    `trusted` allows them. Sample it with `sample(..., split=...)` at the release's split (`OFFICIAL_SPLIT`) and
    decode LlamaGen's output with `decode(..., normalize=False)`, as the release does.
    """
    if family not in OFFICIAL_STATE:
        raise ValueError(f"load_official: unknown family {family!r}; families: {', '.join(OFFICIAL_STATE)}")
    entries = OFFICIAL_STATE if ema else OFFICIAL_RAW
    errors = []  # the family's entry; else the other family's (to name a wrong family); a raw state dict as it is
    for entry in dict.fromkeys([entries[family], *entries.values()]):
        try:
            sd, _ = io.read_state_dict(path, entry, trusted)
            break
        except ValueError as e:
            if "raw state dict" in str(e):
                sd, _ = io.read_state_dict(path, "model", trusted)
                break
            if not str(e).startswith(f"{path}: no "):
                raise
            errors.append(e)
    else:
        raise errors[0]
    found = _official_family(sd, path)
    if found != family:
        raise ValueError(f"{path}: a {found} DD1 checkpoint, but it was given as family {family!r}")
    need = functools.partial(io.require_key, sd, path=path, what=f"{family} DD1")
    if family == "llamagen":
        dim, D = need("tok_embeddings.weight")
        cfg = {"vocab_size": need("output.weight")[0], "dim": dim,
               "num_classes": need("cls_embedding.embedding_table.weight")[0] - 1,
               "n_layer": io.count_indices(sd, r"layers\.(\d+)\."),
               "ffn_hidden": need("layers.0.feed_forward.w1.weight")[0], "grid_size": grid_size,
               "n_head": n_head or llamagen._RELEASE_HEADS.get(dim, dim // 64)}
        with torch.device("meta"):
            teacher = llamagen.GPT(**cfg).config
            model = DD1Model("llamagen", teacher, D)  # no buffers: every tensor comes from the file
    else:
        C, D = need("word_embed.weight")
        depth = io.count_indices(sd, r"blocks\.(\d+)\.")
        pns = var_tokenizer.check_patch_nums(patch_nums or var_tokenizer.RELEASE_PATCH_NUMS)
        L, rows = sum(p * p for p in pns), need("pos_1LC")[1]
        if rows != L + 1:
            raise ValueError(f"{path}: pos_1LC has {rows} rows but patch_nums {list(pns)} give L + 1 = {L + 1} "
                             f"(the start slot and L tokens)")
        sm = sd.get("blocks.0.attn.scale_mul_1H11")
        cfg = {"vocab_size": need("head.weight")[0], "z_channels": D, "num_classes": need("class_emb.weight")[0] - 1,
               "depth": depth, "embed_dim": C, "num_heads": n_head or (sm.shape[1] if sm is not None else depth),
               "mlp_ratio": need("blocks.0.ffn.fc1.weight")[0] / C, "attn_l2_norm": sm is not None,
               "patch_nums": list(pns)}
        with torch.device("meta"):
            teacher = var.VAR(**cfg).config
        model = DD1Model("var", teacher, D)  # on CPU: the level ids and the mask are built here
        own = model.state_dict()
        for k in [k for k in own if k.split(".")[-1] in (*_VAR_BUFFERS, "zero_k_bias")]:
            if k not in sd:
                sd[k] = own[k]
            elif sd[k].shape == own[k].shape and not torch.equal(sd[k].to(own[k].dtype), own[k]):
                raise ValueError(f"{path}: buffer {k} differs from the one patch_nums {list(pns)} give; the file's "
                                 f"model was built with other patch_nums")
    return io.load_strict(model, sd, path)



def check_fits(model: DD1Model, codebook: torch.Tensor, ends: list[int], what: str) -> None:
    """A loaded DD1 model must read the teacher's embedding space: its codes [V, D] and token layout `ends`; `what`
    names the file in the error (a released model needs the tokenizer and teacher it was distilled from)."""
    have, want = (model.vocab_size, model.D, model.ends), (codebook.shape[0], codebook.shape[1], list(ends))
    if have != want:
        raise ValueError(f"{what} holds a DD1 model of {have[0]} codes x {have[1]} dims over {have[2][-1]} tokens in "
                         f"{len(have[2])} AR steps, but the teacher has {want[0]} x {want[1]} over {want[2][-1]} in "
                         f"{len(want[2])}: a released DD1 model needs the tokenizer and teacher it was distilled "
                         f"from (teacher.<family>.source: official)")
