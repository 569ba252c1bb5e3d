"""LlamaGen teacher family: the VQ-16 image tokenizer and the class-conditional GPT.

The tokenizer maps an image in [-1, 1] to a grid of codebook indices; the GPT models those indices in raster
order given a class label, and is sampled with KV caching, classifier-free guidance (CFG) and top-k / top-p
filtering. Both reproduce the official architectures and state-dict key layouts, so released checkpoints load
strictly, and add what this project needs on top: training losses (with dead-code restarts for small codebooks),
teacher-forced (CFG) logits, a KV-cached sampler (`GPT.steps`, one token at a time) with a single per-step hook
`step_fn(n, logits) -> tokens` (it gets the guided logits of step n and returns its tokens; the default, `Sampler`,
filters and draws; DD1 replaces the draw by a flow map through it, and a caller that stops iterating stops
sampling), and loaders that infer every size from tensor shapes.

The distillation embedding space is `VQModel.codebook()`: the L2-normalised code vectors (unit sphere in R^D).

References:
    - Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation" (LlamaGen),
      arXiv 2406.06525.
    - "Distilled Decoding 1: One-step Sampling of Image Auto-regressive Models with Flow Matching" (DD1),
      arXiv 2412.17153; "Distilled Decoding 2" (DD2), arXiv 2510.21003.
    - FoundationVision/LlamaGen (behaviour matched): `autoregressive/models/gpt.py` (architecture, 2-D RoPE with
      zero class rows, keys), `autoregressive/models/generate.py` (CFG, cfg_interval, temperature,
      top-k / top-p filtering), `tokenizer/tokenizer_image/vq_model.py` (VQ-16, L2-normalised codebook).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import io, layers

# ----------------------------------------------------------------------------------------------------------------
# VQ tokenizer
# ----------------------------------------------------------------------------------------------------------------

VQ_CONFIGS = {"VQ-16": {}, "VQ-8": {"ch_mult": [1, 2, 2, 4]}}  # overrides of the VQModel defaults (= VQ-16)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a residual (1x1 `nin_shortcut` when widths differ). [B,C,H,W]."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = dropout
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.dropout(F.silu(self.norm2(h)), self.dropout, self.training)
        h = self.conv2(h)
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (separate 1x1 q, k, v, proj_out), residual. [B,C,H,W]."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # [B,1,HW,C]
        h = layers.attention(q, k, v)  # default scale C^-1/2, as upstream
        return x + self.proj_out(h[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad (right/bottom), as upstream


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `res` blocks, each followed by an `attn` block on the deepest level only."""

    def __init__(self, c_in: int, c_out: int, n_res: int, attn: bool, dropout: float):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, dropout) for j in range(n_res))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_res if attn else 0))

    def forward(self, h):
        for j, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


def _mid(c: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])


class Encoder(nn.Module):
    """[B,in_channels,H,W] -> [B,z_channels,H/2^(L-1),W/2^(L-1)], L = len(ch_mult)."""

    def __init__(self, in_channels, ch, ch_mult, num_res_blocks, z_channels, dropout):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        for i, c_out in enumerate(widths):
            level = _Level(ch if i == 0 else widths[i - 1], c_out, num_res_blocks, i == len(widths) - 1, dropout)
            if i < len(widths) - 1:
                level.downsample = Downsample(c_out)
            self.conv_blocks.append(level)
        self.mid = _mid(widths[-1], dropout)
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B,z_channels,h,w] -> [B,out_channels,h*2^(L-1),w*2^(L-1)]; `conv_blocks[0]` is the deepest level."""

    def __init__(self, out_channels, ch, ch_mult, num_res_blocks, z_channels, dropout):
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1)
        self.mid = _mid(widths[0], dropout)
        self.conv_blocks = nn.ModuleList()
        for i, c_out in enumerate(widths):
            level = _Level(widths[max(i - 1, 0)], c_out, num_res_blocks + 1, i == 0, dropout)
            if i < len(widths) - 1:
                level.upsample = Upsample(c_out)
            self.conv_blocks.append(level)
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup on the unit sphere: both z and the codebook are L2-normalised before the argmin."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        with torch.no_grad():
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # Ring buffer of the last 65536 assigned indices (official key; kept a plain float buffer because
        # upstream's nn.Parameter-as-buffer breaks the in-place update on CPU).
        self.register_buffer("codebook_used", torch.zeros(65536))
        # Steps since each code was last assigned: drives dead-code restarts; not part of checkpoints.
        self.register_buffer("code_age", torch.zeros(codebook_size, dtype=torch.long), persistent=False)

    def codebook(self) -> torch.Tensor:
        """[V, D] unit-norm code vectors."""
        return F.normalize(self.embedding.weight, dim=-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: [..., D] unit-norm -> indices [...]. Same distance expression as upstream, so ties break alike."""
        with torch.autocast(z.device.type, enabled=False):  # fp32 under a bf16 autocast: near-ties stay resolved
            e = self.codebook().float()
            zf = z.reshape(-1, z.shape[-1]).float()
            d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
        return d.argmin(1).view(z.shape[:-1])

    @torch.no_grad()
    def track_usage(self, idx: torch.Tensor) -> float:
        """Update the ring buffer and code ages with the indices of one training batch; returns usage in [0,1]."""
        flat = idx.flatten()[-self.codebook_used.numel():].to(self.codebook_used.dtype)
        self.codebook_used.copy_(torch.cat([self.codebook_used[flat.numel():], flat]))
        hit = torch.zeros_like(self.code_age)
        hit[idx.flatten()] = 1
        if dist.is_available() and dist.is_initialized():  # codes hit anywhere in the global batch: every rank
            dist.all_reduce(hit, op=dist.ReduceOp.MAX)      # then ages and restarts the same codes
        self.code_age += 1
        self.code_age[hit.bool()] = 0
        return self.codebook_used.unique().numel() / self.embedding.num_embeddings

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, after: int) -> int:
        """Re-seed codes unassigned for `after` steps with random vectors of z [..., D]; returns how many."""
        if after <= 0:
            return 0
        dead = (self.code_age >= after).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        pool = z.detach().reshape(-1, z.shape[-1])
        pick = torch.randperm(pool.shape[0], device=pool.device)[: dead.numel()]
        if pick.numel() < dead.numel():  # fewer batch vectors than dead codes: sample with replacement
            pick = torch.randint(pool.shape[0], (dead.numel(),), device=pool.device)
        new = pool[pick].to(self.embedding.weight.dtype)
        if dist.is_available() and dist.is_initialized():  # parameters edited in place: every rank takes rank 0's
            dist.broadcast(new, 0)
        self.embedding.weight[dead] = new
        self.code_age[dead] = 0
        return dead.numel()


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer (defaults = VQ-16: 16384 x 8 codebook, downsampling 16)."""

    def __init__(self, in_channels: int = 3, ch: int = 128, ch_mult: list = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, codebook_size: int = 16384, codebook_embed_dim: int = 8,
                 commit_loss_beta: float = 0.25, dropout_p: float = 0.0, dead_code_steps: int = 50):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        if any(w % 32 for w in widths):  # GroupNorm(32, C) needs C divisible by 32
            raise ValueError(f"VQModel: every width ch*ch_mult[i] must be a multiple of 32 (GroupNorm(32)); "
                             f"got ch={ch}, ch_mult={list(ch_mult)} -> widths {widths}")
        self.config = dict(in_channels=in_channels, ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           z_channels=z_channels, codebook_size=codebook_size,
                           codebook_embed_dim=codebook_embed_dim, commit_loss_beta=commit_loss_beta,
                           dropout_p=dropout_p, dead_code_steps=dead_code_steps)
        args = (ch, list(ch_mult), num_res_blocks, z_channels, dropout_p)
        self.encoder = Encoder(in_channels, *args)
        self.decoder = Decoder(in_channels, *args)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)  # image side / token-grid side

    def codebook(self) -> torch.Tensor:
        """[V, D] L2-normalised code vectors: the token embedding space DD1/DD2 work in."""
        return self.quantize.codebook()

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """[B,C,H,W] in [-1,1] -> unit-norm continuous latents [B,h,w,D] (before quantisation)."""
        return F.normalize(self.quant_conv(self.encoder(images)).float().permute(0, 2, 3, 1), dim=-1)  # fp32

    def encode_indices(self, images: torch.Tensor) -> torch.Tensor:
        """[B,C,H,W] in [-1,1] -> code indices LongTensor [B,h,w] (raster order = GPT token order)."""
        return self.quantize.nearest(self.encode_latents(images))

    def decode_embeddings(self, z: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Continuous code vectors [B,h,w,D] -> images [B,C,H,W]; L2-normalised first like the codebook, or with
        normalize=False decoded as they are (upstream's `decode`, as the released DD1 sampler decodes)."""
        z = (F.normalize(z, dim=-1) if normalize else z).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z))

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """[B,h,w] code indices -> images [B,C,H,W], roughly in [-1,1] (not clamped, as upstream)."""
        return self.decode_embeddings(self.codebook()[idx])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Quantised reconstruction [B,C,H,W]."""
        return self.decode_indices(self.encode_indices(images))

    def loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Training loss on [B,C,H,W] in [-1,1]: MSE reconstruction + codebook + beta * commitment.

        Straight-through estimator: the decoder sees z + sg(z_q - z). In train mode, codes unassigned for
        `dead_code_steps` steps are first re-seeded from this batch's latents. Returns (loss, parts as floats).
        """
        z = self.encode_latents(images)  # [B,h,w,D]
        restarted = 0
        if self.training:  # before the lookup, so the in-place codebook edit precedes its use in the graph
            restarted = self.quantize.restart_dead_codes(z, self.config["dead_code_steps"])
        idx = self.quantize.nearest(z)
        z_q = self.codebook()[idx]
        vq = F.mse_loss(z_q, z.detach())
        commit = self.config["commit_loss_beta"] * F.mse_loss(z, z_q.detach())
        z_st = z + (z_q - z).detach()  # load-bearing: straight-through gradient to the encoder
        rec = F.mse_loss(self.decoder(self.post_quant_conv(z_st.permute(0, 3, 1, 2))), images)
        size = self.config["codebook_size"]
        usage = self.quantize.track_usage(idx) if self.training else idx.unique().numel() / size
        loss = rec + vq + commit
        parts = dict(loss=loss.item(), rec=rec.item(), vq=vq.item(), commit=commit.item(), usage=usage,
                     restarted=float(restarted))
        return loss, parts


# ----------------------------------------------------------------------------------------------------------------
# GPT
# ----------------------------------------------------------------------------------------------------------------

GPT_CONFIGS = {  # release sizes (head_dim 64 except GPT-3B); vocab 16384, 1000 classes by default
    "GPT-B": dict(dim=768, n_layer=12, n_head=12),
    "GPT-L": dict(dim=1024, n_layer=24, n_head=16),
    "GPT-XL": dict(dim=1280, n_layer=36, n_head=20),
    "GPT-XXL": dict(dim=1536, n_layer=48, n_head=24),
    "GPT-XXXL": dict(dim=2560, n_layer=48, n_head=40),
    "GPT-3B": dict(dim=3200, n_layer=24, n_head=32),
}


def rope_2d(grid_size: int, head_dim: int, base: float = 10000.0, n_prefix: int = 1) -> torch.Tensor:
    """2-D rotary table [n_prefix + grid^2, head_dim/2, 2] of (cos, sin), with ZERO rows for the condition prefix
    (the class token; T2I: the caption's n_prefix = cls_token_num tokens).

    The first head_dim/4 pairs rotate with the row index, the rest with the column index (raster p = r*grid+c).
    Because the prefix rows are zero (cos = sin = 0), the prefix's q and k become zero, exactly as upstream.
    """
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)  # [hd/4]
    ang = torch.outer(torch.arange(grid_size).float(), freqs)  # [grid, hd/4]
    grid = torch.cat([ang[:, None].expand(-1, grid_size, -1), ang[None].expand(grid_size, -1, -1)], -1)
    table = torch.stack([grid.cos(), grid.sin()], -1).flatten(0, 1)  # [grid^2, hd/2, 2]
    return torch.cat([torch.zeros(n_prefix, half, 2), table])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [B,T,...,hd], rope [T,hd/2,2] -> x with pairs (x[2i], x[2i+1]) rotated, computed in fp32.

    One complex product (x0 + i x1)(cos + i sin) = (x0 cos - x1 sin) + i (x1 cos + x0 sin), as upstream.
    """
    rot = torch.view_as_complex(rope.float().contiguous())  # [T, hd/2]
    rot = rot.view(rot.shape[0], *[1] * (x.dim() - 3), rot.shape[1])
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)  # rows [q; k; v]
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope, cache=None, start=0, attn_p=0.0, mask=None):
        """x [B,T,dim]; cache = (k, v) buffers [B,H,S,hd] filled up to `start`, written in place; mask: None
        (causal) or the bool attention mask [B,1,T,start+T] (True: attend)."""
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.n_head, self.head_dim)
        q, k = apply_rope(qkv[:, :, :2], rope).unbind(2)  # [B,T,H,hd] each; q and k rotated in one op
        v = qkv[:, :, 2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B,H,T,hd]
        if cache is not None:
            if T > 1 and start > 0:
                raise ValueError("a multi-token step through the KV cache must start at position 0")
            cache[0][:, :, start:start + T], cache[1][:, :, start:start + T] = k, v
            k, v = cache[0][:, :, :start + T], cache[1][:, :, :start + T]
        if mask is None:
            y = layers.attention(q, k, v, dropout_p=attn_p, is_causal=T > 1)  # one query sees all keys
        else:
            y = layers.attention(q, k, v, dropout_p=attn_p, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attention = Attention(cfg["dim"], cfg["n_head"])
        self.feed_forward = FeedForward(cfg["dim"], cfg["ffn_hidden"])
        self.attention_norm = RMSNorm(cfg["dim"], cfg["norm_eps"])
        self.ffn_norm = RMSNorm(cfg["dim"], cfg["norm_eps"])
        self.cfg = cfg

    def forward(self, x, rope, cache=None, start=0, dropout=False, mask=None):
        c = self.cfg
        a = self.attention(self.attention_norm(x), rope, cache, start, c["attn_dropout_p"] if dropout else 0.0, mask)
        h = x + F.dropout(a, c["resid_dropout_p"], dropout)
        return h + F.dropout(self.feed_forward(self.ffn_norm(h)), c["ffn_dropout_p"], dropout)


class LabelEmbedder(nn.Module):
    """Class embedding with a null row at index `num_classes` (the unconditional class for CFG)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        """labels [B] -> [B,1,dim]; each label is replaced by the null class with probability drop_prob."""
        if drop_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < drop_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)[:, None]


class CaptionProjection(nn.Module):
    """The release's caption MLP: fc1 -> GELU (tanh) -> fc2, no biases."""

    def __init__(self, caption_dim: int, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(caption_dim, dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """LlamaGen T2I caption embedder: text-encoder token features [B,P,Dc] -> `cap_proj` -> prefix [B,P,dim].
    `uncond_embedding` [P, Dc] is the null caption of CFG, a buffer (saved, not trained), as released.

    dd addition: a caption bank (`set_captions`; non-persistent, so a state dict is the release's) lets labels
    [B] be caption ids, as class labels are: id n (the bank's size, `num_classes`) is the null caption. Features
    are left-padded to P tokens with a mask (True: a real token), as the release's T5 features are.
    """

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = CaptionProjection(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim ** 0.5)
        self.register_buffer("bank", torch.zeros(0, token_num, caption_dim), persistent=False)
        self.register_buffer("bank_mask", torch.zeros(0, token_num, dtype=torch.bool), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.bank.shape[0]

    def set_captions(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Caption bank: features [n,P,Dc] (positions where mask [n,P] is False are zeroed, as the release's
        sampler does; no mask: every position is a real token)."""
        P, Dc = self.uncond_embedding.shape
        if features.dim() != 3 or features.shape[1:] != (P, Dc):
            raise ValueError(f"caption features: expected [n, {P}, {Dc}] (cls_token_num, caption_dim), "
                             f"got {list(features.shape)}")
        mask = torch.ones(features.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        if mask.shape != features.shape[:2]:
            raise ValueError(f"caption mask: expected {list(features.shape[:2])}, got {list(mask.shape)}")
        dev = self.uncond_embedding.device
        self.bank = (features * mask[..., None]).to(dev, self.uncond_embedding.dtype)
        self.bank_mask = mask.to(dev)

    def forward(self, labels: torch.Tensor, drop_prob: float = 0.0, mask_of: torch.Tensor | None = None):
        """labels [B] -> (prefix [B,P,dim], key mask [B,P]); with probability drop_prob a caption becomes the null
        caption (its mask kept, as the release's training). The mask comes from `mask_of`'s captions (default
        labels; CFG gives the null branch its partner's mask, as the release's sampler); the null id alone: all
        tokens real."""
        feats = torch.cat([self.bank, self.uncond_embedding[None]])
        masks = torch.cat([self.bank_mask, self.bank_mask.new_ones(1, feats.shape[1])])
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"caption ids must lie in [0, {self.num_classes}] (the bank's size is the null "
                             f"caption); got {labels.min().item()}..{labels.max().item()}")
        x = feats[labels]
        if drop_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < drop_prob
            x = torch.where(drop[:, None, None], self.uncond_embedding, x)
        return self.cap_proj(x), masks[labels if mask_of is None else mask_of]


def condition(embedder: nn.Module, labels: torch.Tensor, drop_prob: float = 0.0,
              mask_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A `LabelEmbedder` or `CaptionEmbedder` on labels [B] -> (prefix embeddings [B,P,dim], prefix key mask [B,P],
    or None when every prefix position is real: always for class labels). mask_of: see `CaptionEmbedder`."""
    if isinstance(embedder, LabelEmbedder):
        return embedder(labels, drop_prob), None
    h, mask = embedder(labels, drop_prob, mask_of)
    return h, (None if mask.all() else mask)


def prefix_attn_mask(key_mask: torch.Tensor | None, start: int, T: int) -> torch.Tensor | None:
    """Bool attention mask [B,1,T,start+T] of positions start..start+T-1 after a prefix of P = key_mask.shape[1]
    positions: causal, prefix keys hidden where key_mask [B,P] is False, each position seeing itself (the
    release's eye); None without a key mask (plain causal attention)."""
    if key_mask is None:
        return None
    S, P = start + T, key_mask.shape[1]
    q = torch.arange(start, S, device=key_mask.device)[:, None]
    k = torch.arange(S, device=key_mask.device)[None]
    real = torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], max(S - P, 0))], 1)[:, :S]
    return (((k <= q) & real[:, None]) | (k == q))[:, None]


class GPT(nn.Module):
    """LlamaGen GPT (defaults = class-conditional GPT-B at 16x16 tokens). Sequence: [cls(y), tok_0..tok_{N-2}].

    caption_dim > 0 makes the release's text-to-image model: the prefix is a caption's cls_token_num tokens
    (`CaptionEmbedder`), labels are caption ids into its bank, and a prefix mask hides padding tokens.
    """

    def __init__(self, vocab_size: int = 16384, num_classes: int = 1000, dim: int = 768, n_layer: int = 12,
                 n_head: int = 12, ffn_hidden: int | None = None, grid_size: int = 16, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, token_dropout_p: float = 0.1, attn_dropout_p: float = 0.0,
                 resid_dropout_p: float = 0.1, ffn_dropout_p: float = 0.1, class_dropout_prob: float = 0.1,
                 caption_dim: int = 0, cls_token_num: int = 1):
        super().__init__()
        if dim % n_head or (dim // n_head) % 4:
            raise ValueError(f"GPT: need dim % n_head == 0 and head_dim % 4 == 0 (2-D RoPE); "
                             f"got dim={dim}, n_head={n_head}")
        ffn_hidden = ffn_hidden or -(-(8 * dim // 3) // 256) * 256  # official: round 8/3*dim up to 256
        self.config = dict(vocab_size=vocab_size, num_classes=num_classes, dim=dim, n_layer=n_layer, n_head=n_head,
                           ffn_hidden=ffn_hidden, grid_size=grid_size, rope_base=float(rope_base),
                           norm_eps=norm_eps, token_dropout_p=token_dropout_p, attn_dropout_p=attn_dropout_p,
                           resid_dropout_p=resid_dropout_p, ffn_dropout_p=ffn_dropout_p,
                           class_dropout_prob=class_dropout_prob)
        if caption_dim:
            self.config.update(caption_dim=caption_dim, cls_token_num=cls_token_num)
            self.cls_embedding = CaptionEmbedder(caption_dim, dim, cls_token_num)
        elif cls_token_num != 1:
            raise ValueError(f"GPT: a class-conditional model has cls_token_num 1, got {cls_token_num}")
        else:
            self.cls_embedding = LabelEmbedder(num_classes, dim)
        self.vocab_size, self.grid_size, self.n_prefix = vocab_size, grid_size, cls_token_num
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(Block(self.config) for _ in range(n_layer))
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self._rope = None  # fp32 table, a plain attribute: never saved, never cast by .to(dtype)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)  # zero-initialised head, as upstream

    @property
    def num_classes(self) -> int:
        """Classes (T2I: captions in the bank); this id is the null condition of CFG."""
        return self.cls_embedding.num_classes

    def rope(self, device) -> torch.Tensor:
        if self._rope is None or self._rope.device != torch.device(device):
            c = self.config
            self._rope = rope_2d(self.grid_size, c["dim"] // c["n_head"], c["rope_base"], self.n_prefix).to(device)
        return self._rope

    def prefix(self, labels: torch.Tensor, drop_labels: bool = False, mask_of: torch.Tensor | None = None):
        """labels [B] -> (prefix embeddings [B,P,dim], prefix key mask [B,P] or None), see `condition`."""
        return condition(self.cls_embedding, labels, self.config["class_dropout_prob"] if drop_labels else 0.0,
                         mask_of)

    def null_pair(self, labels: torch.Tensor):
        """CFG's doubled batch for labels [B]: (prefix [2B,P,dim], key mask or None), conditional rows first, then
        the null condition with its partner's prefix mask (as the release's sampler)."""
        null = labels.new_full(labels.shape, self.num_classes)
        return self.prefix(torch.cat([labels, null]), mask_of=torch.cat([labels, labels]))

    def embed(self, tokens: torch.Tensor, labels: torch.Tensor, drop_labels: bool = False):
        """tokens [B,T], labels [B] -> (teacher-forcing input [B,P+T-1,dim] = [prefix(y)] + tok_emb(tokens[:, :-1]),
        prefix key mask or None)."""
        h, mask = self.prefix(labels, drop_labels)
        return torch.cat([h, self.tok_embeddings(tokens[:, :-1])], 1), mask

    def forward(self, h: torch.Tensor, start: int = 0, cache: list | None = None, dropout: bool = False,
                key_mask: torch.Tensor | None = None):
        """Input embeddings h [B,T,dim] at sequence positions start..start+T-1 -> fp32 logits [B,T,V].

        Positions 0..P-1 are the condition prefix (P = 1: the class token); position P+i holds token i (RoPE of
        grid cell i). `cache` is a list of per-layer (k, v) buffers; `dropout` switches on the release's
        dropouts (independent of .train()); key_mask [B,P]: the prefix's real tokens (None: all).
        """
        T, last = h.shape[1], self.n_prefix + self.grid_size ** 2 - 1
        if start + T > last:
            raise ValueError(f"sequence of {start + T} positions exceeds prefix + grid_size^2 - 1 = {last}")
        rope = self.rope(h.device)[start:start + T]
        mask = prefix_attn_mask(key_mask, start, T)
        h = F.dropout(h, self.config["token_dropout_p"], dropout)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, None if cache is None else cache[i], start, dropout, mask)
        return self.output(self.norm(h)).float()

    def logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B,T,V] (eval semantics); logits[:, i] predicts tokens[:, i]; T <= grid^2.
        labels == num_classes is the null class."""
        h, mask = self.embed(tokens, labels)
        return self.forward(h, key_mask=mask)[:, self.n_prefix - 1:]

    def cfg_logits(self, tokens: torch.Tensor, labels: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Guided teacher-forced logits [B,T,V] = u + s (c - u), with u from the null class."""
        B = labels.shape[0]
        pre, mask = self.null_pair(labels)
        h = torch.cat([pre, self.tok_embeddings(torch.cat([tokens, tokens])[:, :-1])], 1)
        both = self.forward(h, key_mask=mask)[:, self.n_prefix - 1:]
        c, u = both[:B], both[B:]
        return u + cfg_scale * (c - u)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss: train-mode forward (dropouts, CFG label dropout), mean CE over all T tokens."""
        h, mask = self.embed(tokens, labels, drop_labels=True)
        logits = self.forward(h, dropout=True, key_mask=mask)[:, self.n_prefix - 1:]
        return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    @torch.no_grad()
    def steps(self, labels: torch.Tensor, cfg_scale: float = 1.0, cfg_interval: int = -1, step_fn=None):
        """KV-cached sampling for labels [B], one token at a time, with the official semantics: yields token n,
        LongTensor [B], for n = 0 .. grid^2 - 1. Stop iterating to stop sampling (skip-n baselines).

        Guidance u + s (c - u) is used iff cfg_scale > 1 (the batch is doubled with the null class), for tokens
        n <= cfg_interval + 1 (all tokens when cfg_interval == -1). `step_fn(n, logits [B, V]) -> LongTensor [B]`
        turns step n's guided logits into its tokens; default `Sampler()` (no filtering, unseeded).
        """
        step_fn = Sampler() if step_fn is None else step_fn
        B, N, P = labels.shape[0], self.grid_size ** 2, self.n_prefix
        guided = cfg_scale > 1.0
        h, mask = self.null_pair(labels) if guided else self.prefix(labels)  # [B or 2B, P, dim]
        c, w = self.config, self.tok_embeddings.weight
        shape = (h.shape[0], c["n_head"], P + N - 1, c["dim"] // c["n_head"])
        cache = [(w.new_empty(shape), w.new_empty(shape)) for _ in self.layers]  # never part of the state dict
        for n in range(N):
            logits = self.forward(h, start=0 if n == 0 else P - 1 + n, cache=cache, key_mask=mask)[:, -1]
            if guided:
                cond, uncond = logits[:B], logits[B:]
                use_cfg = cfg_interval <= -1 or n <= cfg_interval + 1
                logits = uncond + cfg_scale * (cond - uncond) if use_cfg else cond
            tok = step_fn(n, logits)
            yield tok
            h = self.tok_embeddings(torch.cat([tok, tok]) if guided else tok)[:, None]

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, cfg_scale: float = 1.0, cfg_interval: int = -1,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None,
                 step_fn=None) -> torch.Tensor:
        """All grid^2 tokens of `steps`: LongTensor [B, grid^2] for labels [B].

        Each step's guided logits are divided by max(temperature, 1e-5), filtered (top_k=0 and top_p=1.0 mean
        off) and sampled with `generator` (`Sampler`), or, given `step_fn(n, logits) -> tokens`, handed to it
        instead (then the sampling options stay unset: the hook decides the tokens, e.g. DD1's flow map or a
        recorder that wraps a `Sampler`).
        """
        if step_fn is None:
            step_fn = Sampler(temperature, top_k, top_p, generator)
        elif (temperature, top_k, top_p) != (1.0, 0, 1.0) or generator is not None:
            raise ValueError("GPT.generate: give the sampling options (temperature, top_k, top_p, generator) or a "
                             "step_fn, not both")
        return torch.stack(list(self.steps(labels, cfg_scale, cfg_interval, step_fn)), 1)


class Sampler:
    """LlamaGen's ordinary sampling step, the default `step_fn` of `GPT.steps` / `GPT.generate`:
    (n, guided logits [B, V]) -> tokens [B], drawn from `filter`'s distribution."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None):
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits this step draws from: logits / max(temperature, 1e-5), then `filter_logits` ([..., V])."""
        return filter_logits(logits / max(self.temperature, 1e-5), self.top_k, self.top_p)

    def __call__(self, n: int, logits: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(self.filter(logits).softmax(-1), 1, generator=self.generator)[:, 0]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """LlamaGen top-k then top-p (nucleus) filtering over the last dim [..., V]; removed entries become -inf.

    top-k keeps logits >= the k-th largest; top-p keeps the shortest prefix of the sorted distribution whose
    mass reaches top_p (the token crossing the threshold is kept). top_k=0 and top_p=1.0 disable them.
    Returns a new tensor (the input is not modified).
    """
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        remove = sorted_logits.softmax(-1).cumsum(-1) > top_p
        remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], -1)  # keep the crossing token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint loading (released training-format files, raw state dicts, safetensors, our own checkpoints)
# ----------------------------------------------------------------------------------------------------------------

_RELEASE_HEADS = {c["dim"]: c["n_head"] for c in GPT_CONFIGS.values()}  # GPT-3B has head_dim 100, not 64


def load_gpt(path, grid_size: int | None = None, n_head: int | None = None, which: str = "model",
             trusted: bool = False) -> GPT:
    """Build a GPT from a checkpoint (release `{"model", "ema", "args", ...}` file, raw state dict, or
    .safetensors) with sizes inferred from shapes, and load it strictly; returns the model on CPU in eval mode.

    vocab and dim come from tok_embeddings, num_classes from the class table (rows - 1), n_layer from the
    layer keys, the FFN width from w1; a text-to-image file (`cls_embedding.cap_proj.*`) gives caption_dim and
    cls_token_num from its null caption, and the model waits for a caption bank (`set_captions`). grid_size and
    n_head are not in the weights: they come from the arguments, else from a config stored in the file, else 16
    and the release head count (dim // 64, 32 for GPT-3B's dim 3200).
    """
    sd, cfg = io.read_state_dict(path, which, trusted)
    need = partial(io.require_key, sd, path=path, what="LlamaGen GPT")
    vocab, dim = need("tok_embeddings.weight")
    cfg = {**cfg, "vocab_size": vocab, "dim": dim, "n_layer": io.count_indices(sd, r"layers\.(\d+)\."),
           "ffn_hidden": need("layers.0.feed_forward.w1.weight")[0]}
    if "cls_embedding.cap_proj.fc1.weight" in sd:  # text-to-image: caption width and prefix length from shapes
        cfg["cls_token_num"], cfg["caption_dim"] = need("cls_embedding.uncond_embedding")
        cfg["num_classes"] = 0
    else:
        cfg["num_classes"] = need("cls_embedding.embedding_table.weight")[0] - 1
    cfg["grid_size"] = grid_size or cfg.get("grid_size", 16)
    cfg["n_head"] = n_head or cfg.get("n_head") or _RELEASE_HEADS.get(dim, dim // 64)
    with torch.device("meta"):  # every buffer is saved or empty, so nothing is left uninitialised by to_empty
        model = GPT(**cfg)
    return io.load_strict(model, sd, path)


def load_vq(path, which: str = "model", trusted: bool = False) -> VQModel:
    """Build a VQModel from a checkpoint (same formats as `load_gpt`), inferring in_channels, ch, ch_mult,
    num_res_blocks, z_channels and the codebook size and dim from shapes; strict load, eval mode, CPU."""
    sd, cfg = io.read_state_dict(path, which, trusted)
    need = partial(io.require_key, sd, path=path, what="LlamaGen VQ")
    ch, in_channels = need("encoder.conv_in.weight")[:2]
    n_levels = io.count_indices(sd, r"encoder\.conv_blocks\.(\d+)\.")
    ch_mult = [need(f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] // ch for i in range(n_levels)]
    size, dim = need("quantize.embedding.weight")
    cfg = {**cfg, "in_channels": in_channels, "ch": ch, "ch_mult": ch_mult,
           "num_res_blocks": io.count_indices(sd, r"encoder\.conv_blocks\.0\.res\.(\d+)\."),
           "z_channels": need("encoder.conv_out.weight")[0], "codebook_size": size,
           "codebook_embed_dim": dim}
    return io.load_strict(VQModel(**cfg), sd, path)
