"""VAR teacher: the class-conditional next-scale-prediction transformer and its KV-cached sampler.

A VAR image is K token maps r_1..r_K of growing side pn_k (`patch_nums`), made by the multi-scale VQVAE of
`dd.var_tokenizer`. VAR predicts all pn_k^2 tokens of scale k at once from the class and the coarser scales
(block-causal attention), so sampling takes K steps; the teacher-forced input of scale k is the VQVAE's f_hat after
k - 1 scales, area-downsampled to pn_k.

The network reproduces the release's architecture and state-dict keys (buffers included), so `var_d*.pth` loads
strictly. On top of that: configurable sizes, teacher-forced (guided) logits, a training loss, and a KV-cached
sampler (`VAR.steps`, one scale at a time) with a single per-step hook `step_fn(si, logits) -> tokens`: it gets the
guided logits of a scale and returns its tokens; the default, `Sampler`, filters and draws. DD1 replaces the draw
by a flow map through it; a caller that stops iterating stops sampling (the skip-n baselines).

Differences from upstream: `forward`'s label dropout happens only in training (upstream drops labels in eval too);
no global `reset_parameters` monkey-patch (VAR.init_weights initialises explicitly); no shared AdaLN (only the
512 px d36 uses it), progressive training, gumbel "more_smooth" sampling, flash-attn or fused kernels; decoded
images are in [-1, 1] (upstream's sampler returns [0, 1]).

References:
    - Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction" (VAR),
      NeurIPS 2024, arXiv 2404.02905.
    - Liu et al., "Distilled Decoding 1" (DD1), arXiv 2412.17153; "Distilled Decoding 2" (DD2), arXiv 2510.21003.
    - FoundationVision/VAR @78b9539 (behaviour matched): `models/basic_var.py` (SelfAttention, AdaLNSelfAttn,
      AdaLNBeforeHead), `models/var.py` (VAR.forward, autoregressive_infer_cfg, init_weights), `models/helpers.py`
      (sample_with_top_k_top_p_), `models/__init__.py` (release sizes).
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import io, layers, var_tokenizer

VAR_CONFIGS = {  # build_vae_var(depth): width 64 * depth, heads = depth, drop path 0.1 * depth / 24
    **{f"d{d}": dict(vocab_size=4096, z_channels=32, num_classes=1000, depth=d, embed_dim=64 * d, num_heads=d,
                     drop_path_rate=0.1 * d / 24, patch_nums=list(var_tokenizer.RELEASE_PATCH_NUMS))
       for d in (16, 20, 24, 30)},
    "tiny": dict(vocab_size=512, z_channels=16, num_classes=10, depth=4, embed_dim=192, num_heads=4,
                 drop_path_rate=0.0, patch_nums=list(var_tokenizer.TINY_PATCH_NUMS)),
}


# ----------------------------------------------------------------------------------------------------------------
# VAR transformer
# ----------------------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q, k and a learned per-head temperature (`scale_mul_1H11`).

    [B, L, C] -> [B, L, C]. attn_bias (0 / -inf, [1, 1, L, L]) is used in teacher forcing; while generating
    the mask is None and a KV cache (plain attributes, never in the state dict) holds the earlier scales.
    """

    def __init__(self, dim: int, n_head: int, attn_l2_norm: bool):
        super().__init__()
        self.n_head, self.head_dim, self.attn_l2_norm = n_head, dim // n_head, attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, n_head, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))  # k has no bias; kept as a buffer for the keys
        self.proj = nn.Linear(dim, dim)
        self.caching, self.kv = False, None

    def forward(self, x, attn_bias):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
            k = F.normalize(k, dim=-1)
        if self.caching:
            if self.kv is not None:
                k, v = torch.cat((self.kv[0], k), 2), torch.cat((self.kv[1], v), 2)
            self.kv = (k, v)
        mask = None if attn_bias is None else attn_bias.to(q.dtype)  # SDPA wants a mask of q's dtype (autocast)
        out = layers.attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual branch with probability p (training only)."""
    if p == 0.0 or not training:
        return x
    return x * x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p).div_(1 - p)


class AdaLNSelfAttn(nn.Module):
    """Transformer block whose LayerNorm scale / shift and residual gains come from the class: [B,L,C] -> same."""

    def __init__(self, dim: int, n_head: int, mlp_ratio: float, norm_eps: float, attn_l2_norm: bool,
                 drop_path: float):
        super().__init__()
        self.dim, self.drop_path = dim, drop_path
        self.attn = SelfAttention(dim, n_head, attn_l2_norm)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, cond, attn_bias):  # cond: [B, C] class embedding
        # load-bearing: the release's chunk order is gamma1, gamma2, scale1, scale2, shift1, shift2
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).view(-1, 1, 6, self.dim).unbind(2)
        h = self.attn(self.ln_wo_grad(x) * (1 + scale1) + shift1, attn_bias)
        x = x + _drop_path(h * gamma1, self.drop_path, self.training)
        h = self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2)
        return x + _drop_path(h * gamma2, self.drop_path, self.training)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, norm_eps: float):
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, cond):  # [B, L, C], [B, C] -> [B, L, C]
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return self.ln_wo_grad(x) * (1 + scale) + shift


class VAR(nn.Module):
    """Class-conditional next-scale transformer (defaults = VAR-d16 at 256 px; embed_dim None -> 64 * depth,
    num_heads None -> depth, as the release). Token t of the length-L sequence belongs to scale lvl_1L[t]."""

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, num_classes: int = 1000, depth: int = 16,
                 embed_dim: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6, cond_drop_rate: float = 0.1, attn_l2_norm: bool = True,
                 drop_path_rate: float = 0.0, patch_nums=var_tokenizer.RELEASE_PATCH_NUMS):
        super().__init__()
        pns = var_tokenizer.check_patch_nums(patch_nums)
        C, H = embed_dim or 64 * depth, num_heads or depth
        if C % H:
            raise ValueError(f"VAR: embed_dim {C} is not divisible by num_heads {H}")
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels, num_classes=num_classes, depth=depth,
                           embed_dim=C, num_heads=H, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
                           cond_drop_rate=cond_drop_rate, attn_l2_norm=attn_l2_norm,
                           drop_path_rate=drop_path_rate, patch_nums=list(pns))
        self.patch_nums, self.num_classes, self.cond_drop_rate = pns, num_classes, cond_drop_rate
        self.z_channels, self.vocab_size, self.C = z_channels, vocab_size, C
        self.L, self.first_l = sum(p * p for p in pns), pns[0] ** 2
        self.ends = np.cumsum([p * p for p in pns]).tolist()  # end of each scale in the sequence

        self.word_embed = nn.Linear(z_channels, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)  # row num_classes: the null class of CFG
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))  # learned absolute positions
        self.lvl_embed = nn.Embedding(len(pns), C)
        dpr = np.linspace(0, drop_path_rate, depth).tolist()  # numpy: also works on the meta device
        self.blocks = nn.ModuleList([AdaLNSelfAttn(C, H, mlp_ratio, norm_eps, attn_l2_norm, dpr[i])
                                     for i in range(depth)])
        lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pns)])  # [L] scale of each token
        self.register_buffer("lvl_1L", lvl.view(1, self.L))
        # Block-causal mask: a token sees its own scale and all coarser ones (release key, saved in checkpoints).
        mask = torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask.view(1, 1, self.L, self.L))
        self.head_nm = AdaLNBeforeHead(C, norm_eps)
        self.head = nn.Linear(C, vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        """The release's recipe (build_vae_var defaults): truncated normal std sqrt(1/(3C)) for linears,
        embeddings and positions; head x init_head; AdaLN scale/shift rows x init_adaln, gain rows x
        init_adaln_gamma (blocks start close to identity); residual projections / sqrt(2 depth)."""
        auto_std = (1 / self.C / 3) ** 0.5
        std = auto_std if init_std < 0 else init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        nn.init.trunc_normal_(self.pos_start, std=auto_std)
        nn.init.trunc_normal_(self.pos_1LC, std=auto_std)
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        depth = len(self.blocks)
        for b in self.blocks:
            b.attn.proj.weight.div_(math.sqrt(2 * depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            b.ada_lin[-1].weight[2 * self.C:].mul_(init_adaln)
            b.ada_lin[-1].weight[:2 * self.C].mul_(init_adaln_gamma)
            if b.attn.attn_l2_norm:
                b.attn.scale_mul_1H11.fill_(math.log(4.0))
            b.attn.q_bias.zero_()
            b.attn.v_bias.zero_()

    def _head(self, x, cond):  # [B, l, C] -> logits [B, l, V], fp32
        return self.head(self.head_nm(x.float(), cond).float()).float()

    def hidden(self, x_in: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The features the logits head reads, [B, L, C] fp32 (after `head_nm`): row t depends on the class and on
        the scales before token t's scale only. DD2's flow head reads them in place of the logits head."""
        if x_in.dim() != 3 or x_in.shape[1:] != (self.L - 1, self.z_channels) or labels.shape != x_in.shape[:1]:
            raise ValueError(f"VAR: expected x_in [B, {self.L - 1}, {self.z_channels}] and labels [B], got "
                             f"{tuple(x_in.shape)} and {tuple(labels.shape)}")
        B = x_in.shape[0]
        cond = self.class_emb(labels)  # [B, C]
        sos = cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        x = torch.cat((sos, self.word_embed(x_in.float())), 1)
        x = x + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)  # [B, L, C]
        for block in self.blocks:
            x = block(x, cond, self.attn_bias_for_masking)
        return self.head_nm(x.float(), cond).float()

    def _forward(self, x_in: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x_in, labels)).float()

    def logits(self, x_in: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, L, V] from x_in [B, L - 1, Cvae] (`VQVAE.teacher_forcing_input`) and labels
        [B]; logits[:, t] predicts token t. Never drops labels; labels == num_classes is the null class."""
        return self._forward(x_in, labels)

    def cfg_ramp(self, cfg: float) -> torch.Tensor:
        """Per-token guidance r [1, L, 1]: r = cfg * si / (SN - 1) for a token of scale si (0 at the first)."""
        SN = len(self.patch_nums)
        r = torch.tensor([cfg * (si / (SN - 1)) for si in range(SN)], device=self.lvl_1L.device)
        return r[self.lvl_1L].unsqueeze(-1)

    def cfg_logits(self, x_in: torch.Tensor, labels: torch.Tensor, cfg: float) -> torch.Tensor:
        """Guided teacher-forced logits [B, L, V] = (1 + r) c - r u with VAR's linear ramp r (`cfg_ramp`)."""
        B = labels.shape[0]
        both = self._forward(torch.cat((x_in, x_in)), torch.cat((labels, torch.full_like(labels, self.num_classes))))
        r = self.cfg_ramp(cfg)
        return (1 + r) * both[:B] - r * both[B:]

    def loss(self, idx_list: list[torch.Tensor], labels: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """Training loss: mean cross-entropy over all L tokens of idx_list ([B, pn*pn] per scale) given x_in =
        `vae.teacher_forcing_input(idx_list)` [B, L - 1, Cvae]. In train mode each label becomes the null class
        with probability cond_drop_rate (CFG training), and drop path is active."""
        if self.training:
            drop = torch.rand(labels.shape, device=labels.device) < self.cond_drop_rate
            labels = torch.where(drop, self.num_classes, labels)
        logits = self._forward(x_in, labels)
        return F.cross_entropy(logits.flatten(0, 1), torch.cat(idx_list, 1).flatten())

    def _check_vae(self, vae: var_tokenizer.VQVAE) -> None:
        if (list(vae.patch_nums), vae.z_channels, vae.config["vocab_size"]) != \
                (list(self.patch_nums), self.z_channels, self.vocab_size):
            raise ValueError(f"VAR: the VQVAE (patch_nums {list(vae.patch_nums)}, Cvae {vae.z_channels}, "
                             f"V {vae.config['vocab_size']}) does not match this VAR ({self.config})")

    def _cached_blocks(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One sampling step through the blocks, attending to (and appending to) each block's KV cache. Caching is
        on only inside this call, so a sampler left suspended never leaks a cache into teacher forcing."""
        for b in self.blocks:
            b.attn.caching = True
        try:
            for block in self.blocks:
                x = block(x, cond, None)
        finally:
            for b in self.blocks:
                b.attn.caching = False
        return x

    def _clear_kv_cache(self) -> None:
        for b in self.blocks:
            b.attn.kv = None

    @torch.no_grad()
    def steps(self, vae: var_tokenizer.VQVAE, labels: torch.Tensor, cfg: float = 1.5, step_fn=None):
        """KV-cached next-scale sampling for labels [B] (upstream autoregressive_infer_cfg), one scale at a time:
        yields scale si's tokens LongTensor [B, pn*pn]. Stop iterating to stop sampling (skip-n baselines).

        The batch is doubled with the null class; scale si's logits are (1 + r) c - r u, r = cfg * si / (SN - 1).
        `step_fn(si, logits [B, pn*pn, V]) -> LongTensor [B, pn*pn]` turns those guided logits into the scale's
        tokens; default `Sampler()` (no filtering, unseeded).
        """
        self._check_vae(vae)
        step_fn = Sampler() if step_fn is None else step_fn
        B, SN, K = labels.shape[0], len(self.patch_nums), self.patch_nums[-1]
        cond = self.class_emb(torch.cat((labels, torch.full_like(labels, self.num_classes))))  # [2B, C]
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC  # [1, L, C]
        x = cond.unsqueeze(1).expand(2 * B, self.first_l, -1) + self.pos_start.expand(2 * B, -1, -1) \
            + lvl_pos[:, :self.first_l]
        f_hat = cond.new_zeros(B, self.z_channels, K, K)
        self._clear_kv_cache()
        try:
            for si, pn in enumerate(self.patch_nums):
                logits = self._head(self._cached_blocks(x, cond), cond)  # [2B, pn*pn, V]
                r = cfg * (si / (SN - 1))
                idx = step_fn(si, (1 + r) * logits[:B] - r * logits[B:])
                yield idx
                f_hat, nxt = vae.next_scale_input(si, f_hat, var_tokenizer.to_map(vae.quantize.embedding(idx), pn))
                if si != SN - 1:
                    x = self.word_embed(nxt.flatten(2).transpose(1, 2)) + lvl_pos[:, self.ends[si]:self.ends[si + 1]]
                    x = x.repeat(2, 1, 1)  # conditional and null halves see the same tokens
        finally:
            self._clear_kv_cache()

    @torch.no_grad()
    def generate(self, vae: var_tokenizer.VQVAE, labels: torch.Tensor, cfg: float = 1.5, top_k: int = 0,
                 top_p: float = 0.0, generator: torch.Generator | None = None, step_fn=None) -> list[torch.Tensor]:
        """Every scale of `steps`: one LongTensor [B, pn*pn] per scale; decode with `vae.decode_scales`.

        Each scale's guided logits are filtered (`filter_logits`; top_k=0, top_p=0 mean off; no temperature) and
        sampled with `generator` (`Sampler`), or, given `step_fn(si, logits) -> tokens`, handed to it instead (then
        the sampling options stay unset: the hook decides the tokens, e.g. DD1's flow map or a recorder that
        wraps a `Sampler`).
        """
        if step_fn is None:
            step_fn = Sampler(top_k, top_p, generator)
        elif (top_k, top_p) != (0, 0.0) or generator is not None:
            raise ValueError("VAR.generate: give the sampling options (top_k, top_p, generator) or a step_fn, not both")
        return list(self.steps(vae, labels, cfg, step_fn))


class Sampler:
    """VAR's ordinary sampling step, the default `step_fn` of `VAR.steps` / `VAR.generate`:
    (si, guided logits [B, pn*pn, V]) -> tokens [B, pn*pn], every token drawn from `filter`'s distribution."""

    def __init__(self, top_k: int = 0, top_p: float = 0.0, generator: torch.Generator | None = None):
        self.top_k, self.top_p, self.generator = top_k, top_p, generator

    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits this step draws from (`filter_logits`), [..., V] -> same; removed entries -inf."""
        return filter_logits(logits, self.top_k, self.top_p)

    def __call__(self, si: int, logits: torch.Tensor) -> torch.Tensor:
        probs = self.filter(logits).softmax(-1).view(-1, logits.shape[-1])
        return torch.multinomial(probs, 1, replacement=True, generator=self.generator).view(logits.shape[:-1])


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """VAR's top-k then top-p filtering over the last dim [..., V]; removed entries become -inf.

    top-k keeps logits >= the k-th largest. top-p sorts ascending and removes the entries whose cumulative
    probability is <= 1 - top_p; the most likely token is always kept. top_k=0 and top_p=0 disable them
    (note: LlamaGen disables top-p with 1.0). Returns a new tensor.
    """
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values.amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -torch.inf)
    return logits


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint loading (raw state dicts as released, .safetensors, or {"model": ..., "config": ...})
# ----------------------------------------------------------------------------------------------------------------

def load_var(path, patch_nums=None, n_head: int | None = None, trusted: bool = False) -> VAR:
    """Build a VAR from a checkpoint (`var_d*.pth` raw state dict, .safetensors, or {"model", "config"}) with
    sizes inferred from shapes, and load it strictly (buffers included). Returns the model on CPU, eval mode.

    depth from the block keys, width and Cvae from word_embed, vocab from head, num_classes from class_emb rows
    - 1, heads from scale_mul_1H11 (else depth, as the release). patch_nums and n_head, when given, win over a
    stored config; patch_nums defaults to the release's.
    """
    sd, cfg = io.read_state_dict(path, trusted=trusted)
    need = partial(io.require_key, sd, path=path, what="VAR")
    C, cvae = need("word_embed.weight")
    depth = io.count_indices(sd, r"blocks\.(\d+)\.")
    pns = var_tokenizer.check_patch_nums(patch_nums or cfg.get("patch_nums") or var_tokenizer.RELEASE_PATCH_NUMS)
    L, n_pos = sum(p * p for p in pns), need("pos_1LC")[1]
    if n_pos != L:
        raise ValueError(f"{path}: pos_1LC has {n_pos} positions but patch_nums {list(pns)} give L = {L}")
    sm = sd.get("blocks.0.attn.scale_mul_1H11")
    cfg = {**cfg, "vocab_size": need("head.weight")[0], "z_channels": cvae,
           "num_classes": need("class_emb.weight")[0] - 1, "depth": depth, "embed_dim": C,
           "num_heads": n_head or (sm.shape[1] if sm is not None else cfg.get("num_heads", depth)),
           "mlp_ratio": need("blocks.0.ffn.fc1.weight")[0] / C,
           "attn_l2_norm": sm is not None, "patch_nums": list(pns)}
    with torch.device("meta"):  # no init work: every tensor comes from the file
        model = VAR(**cfg)
    return io.load_strict(model, sd, path)
