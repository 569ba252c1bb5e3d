"""VAR's image tokenizer: the multi-scale residual VQVAE, its training loss and its dead-code restarts.

The VQVAE encodes an image into K token maps r_1..r_K of growing side pn_k (`patch_nums`). Each map quantises what
the coarser maps have not explained yet: f_rest is area-downsampled to pn_k x pn_k, matched against the raw
codebook, and its code vectors are bicubic-upsampled, refined by a shared conv phi and subtracted. The image is
decoded from f_hat = sum_k phi_k(up(e(r_k))). The same recursion gives the VAR transformer (`dd.var`) its
teacher-forced input: the input of scale k is f_hat after k - 1 scales, area-downsampled to pn_k.

The network reproduces the release's architecture and state-dict keys (buffers included), so
`vae_ch160v4096z32.pth` loads strictly. On top of that: sizes are configurable (ch_mult included, which upstream
hard-codes) and there is a training loss whose dead-code restarts agree across processes (collective calls under
DDP). The distillation embedding space is the raw codebook `VQVAE.codebook()` (no normalisation). Decoded images
are in [-1, 1].

References:
    - Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction" (VAR),
      NeurIPS 2024, arXiv 2404.02905.
    - FoundationVision/VAR @78b9539 (behaviour matched): `models/basic_vae.py` (Encoder, Decoder), `models/quant.py`
      (VectorQuantizer2, Phi, PhiPartiallyShared), `models/vqvae.py` (VQVAE), `models/__init__.py` (release sizes).
    - CompVis latent-diffusion VQ-f16 (the encoder/decoder layout VAR's VQVAE copies).
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import io, layers

RELEASE_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 256 px, L = 680
TINY_PATCH_NUMS = (1, 2, 3, 4, 6, 8)  # 32 px, L = 130

VAE_CONFIGS = {
    "release": dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
                    patch_nums=list(RELEASE_PATCH_NUMS)),  # vae_ch160v4096z32.pth
    "tiny": dict(vocab_size=512, z_channels=16, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1,
                 patch_nums=list(TINY_PATCH_NUMS)),  # 32 px -> 8x8 latent; the embedded default
}


def check_patch_nums(patch_nums) -> tuple[int, ...]:
    """patch_nums (any ints) -> a tuple, checked: at least two strictly increasing positive sides."""
    pns = tuple(int(p) for p in patch_nums)
    if len(pns) < 2 or pns[0] < 1 or any(b <= a for a, b in zip(pns, pns[1:])):
        raise ValueError(f"patch_nums must be >= 2 strictly increasing positive ints, got {list(patch_nums)}")
    return pns


def to_map(h: torch.Tensor, pn: int) -> torch.Tensor:
    """[B, pn*pn, C] token vectors (raster order) -> [B, C, pn, pn]."""
    return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], pn, pn)


# ----------------------------------------------------------------------------------------------------------------
# Multi-scale residual VQVAE
# ----------------------------------------------------------------------------------------------------------------

def _group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()  # Identity: no key

    def forward(self, x):  # [B, c_in, H, W] -> [B, c_out, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with one fused 1x1 `qkv` conv (VAR's layout): [B,C,H,W] -> same."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj_out = _group_norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # each [B, HW, C]
        h = layers.attention(q, k, v)  # default scale C^-1/2, as upstream
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):  # asymmetric pad (right, bottom) then stride 2: H -> H/2
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(c_in: int, c_out: int, n_blocks: int, attn: bool) -> nn.Module:
    """One resolution level: `block.{j}` ResnetBlocks, each followed by `attn.{j}` on the coarsest level."""
    level = nn.Module()
    level.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(n_blocks)])
    level.attn = nn.ModuleList([AttnBlock(c_out) for _ in range(n_blocks)] if attn else [])
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


def _mid(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    """[B, 3, H, W] -> [B, z_channels, H/2^(n-1), W/2^(n-1)], n = len(ch_mult); keys `encoder.down.{i}...`."""

    def __init__(self, ch: int, ch_mult, num_res_blocks: int, z_channels: int):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = ch
        for i, m in enumerate(ch_mult):
            self.down.append(_level(c, ch * m, num_res_blocks, attn=i == n - 1))
            c = ch * m
            if i != n - 1:
                self.down[i].downsample = Downsample(c)
        self.mid = _mid(c)
        self.norm_out, self.conv_out = _group_norm(c), nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> [B, 3, h*2^(n-1), w*2^(n-1)]; `decoder.up.{i}` is indexed by resolution level
    (up.{n-1} is the coarsest and runs first), with num_res_blocks + 1 ResnetBlocks per level."""

    def __init__(self, ch: int, ch_mult, num_res_blocks: int, z_channels: int):
        super().__init__()
        n = len(ch_mult)
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _mid(c)
        levels = [None] * n
        for i in reversed(range(n)):
            levels[i] = _level(c, ch * ch_mult[i], num_res_blocks + 1, attn=i == n - 1)
            c = ch * ch_mult[i]
            if i != 0:
                levels[i].upsample = Upsample(c)
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _group_norm(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def phi_index_table(n_scales: int, n_phi: int = 4) -> list[int]:
    """Which of the n_phi shared phi convs each scale uses: the one whose tick is nearest to si / (SN - 1).

    Ticks are linspace(1/3/K, 1 - 1/3/K, K) for K = 4 (1/2/K margins otherwise). With the release's 10 scales,
    si = 2 lies exactly between ticks 0 and 1 and float64 rounding picks 1: [0,0,1,1,1,2,2,3,3,3]. The same
    numpy expressions as upstream are used on purpose so that ties break the same way.
    """
    margin = 1 / 3 / n_phi if n_phi == 4 else 1 / 2 / n_phi
    ticks = np.linspace(margin, 1 - margin, n_phi)
    return [int(np.argmin(np.abs(ticks - si / (n_scales - 1)))) for si in range(n_scales)]


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): the residual refinement applied to each upsampled scale."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, padding=1)
        self.ratio = ratio

    def forward(self, h):
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class PhiPartiallyShared(nn.Module):
    """K phi convs (`qresi_ls`) shared by the scales through `phi_index_table`: (h [B,C,H,W], si) -> same."""

    def __init__(self, c: int, ratio: float, n_phi: int, n_scales: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(c, ratio) for _ in range(n_phi)])
        self.table = phi_index_table(n_scales, n_phi)

    def forward(self, h, si: int):
        return self.qresi_ls[self.table[si]](h)


class MultiScaleQuantizer(nn.Module):
    """VAR's residual quantiser (upstream VectorQuantizer2): raw codebook, Euclidean nearest code, phi convs."""

    def __init__(self, vocab_size, z_channels, patch_nums, beta, quant_resi, share_quant_resi, dead_code_frac):
        super().__init__()
        self.patch_nums, self.beta, self.dead_code_frac = tuple(patch_nums), beta, dead_code_frac
        self.quant_resi = PhiPartiallyShared(z_channels, quant_resi, share_quant_resi, len(patch_nums))
        # Per-scale EMA of code hits per batch (release key; only statistics, drives the dead-code restarts).
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, z_channels)
        self.n_records = 0  # batches seen by the EMA; a plain attribute, not in the state dict

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, C] -> nearest raw code [N]; same distance expression as upstream, so near-ties break alike."""
        e = self.embedding.weight.detach()
        with torch.autocast(z.device.type, enabled=False):  # fp32 under a bf16 autocast: near-ties stay resolved
            z = z.float()
            d = torch.addmm(z.square().sum(1, keepdim=True) + e.square().sum(1), z, e.T, alpha=-2)
        return d.argmin(1)

    def forward(self, f: torch.Tensor):
        """f [B, C, H, W] -> (f_hat [B,C,H,W] straight-through, idx list [B, pn^2] per scale, vq loss, z [N, C]).

        vq = mean over scales of beta * |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2 (f_hat_k: the running sum);
        z holds every vector that was matched against the codebook (the candidates for dead-code restarts).
        """
        with torch.autocast(f.device.type, enabled=False):  # the residual recursion in fp32 under a bf16 autocast
            return self._forward(f.float())

    def _forward(self, f: torch.Tensor):
        B, C, H, W = f.shape
        SN = len(self.patch_nums)
        f_ng = f.detach()
        f_rest, f_hat = f_ng.clone(), torch.zeros_like(f_ng)
        idx_list, zs, vq = [], [], 0.0
        for si, pn in enumerate(self.patch_nums):
            z = f_rest if si == SN - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, C)
            idx = self.nearest(z)
            h = self.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2)
            if si != SN - 1:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            h = self.quant_resi(h, si)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            vq = vq + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_ng)
            idx_list.append(idx.view(B, pn * pn))
            zs.append(z)
        f_hat = f_hat.detach() - f_ng + f  # load-bearing: straight-through gradient to the encoder
        return f_hat, idx_list, vq / SN, torch.cat(zs)

    @torch.no_grad()
    def update_usage(self, idx_list: list[torch.Tensor], z: torch.Tensor) -> dict:
        """Training bookkeeping after one batch: EMA of hits per scale (decay 0.9 for the first 100 batches, then
        0.99, as upstream), then restart dead codes from random rows of z. A code is dead when its hits over
        all scales fall below dead_code_frac x the mean; restarted codes get the mean hit count as a grace
        period. Returns {"usage": % of codes hit by this batch, "restarted": count}."""
        V = self.embedding.num_embeddings
        hits = torch.stack([idx.flatten().bincount(minlength=V).float() for idx in idx_list])  # [S, V]
        ddp = dist.is_available() and dist.is_initialized()
        if ddp:  # global counts, as upstream: every rank then sees the same EMA and the same dead codes
            dist.all_reduce(hits)
        decay = 0.0 if self.n_records == 0 else 0.9 if self.n_records < 100 else 0.99
        self.ema_vocab_hit_SV.mul_(decay).add_(hits * (1 - decay))
        self.n_records += 1
        usage = 100.0 * (hits.sum(0) > 0).float().mean().item()
        total = self.ema_vocab_hit_SV.sum(0)
        dead = total < self.dead_code_frac * total.mean()
        n = int(dead.sum())
        if n:
            new = z[torch.randint(z.shape[0], (n,), device=z.device)].to(self.embedding.weight.dtype)
            if ddp:  # load-bearing under DDP: parameters are edited in place, so all ranks take rank 0's rows
                dist.broadcast(new, 0)
            self.embedding.weight[dead] = new
            self.ema_vocab_hit_SV[:, dead] = self.ema_vocab_hit_SV.mean(1, keepdim=True)
        return {"usage": usage, "restarted": float(n)}


class VQVAE(nn.Module):
    """Multi-scale residual VQVAE (defaults = the release `vae_ch160v4096z32`: 256 px -> 16x16 x 32 latent).

    Images are [B, 3, H, W] in [-1, 1] with H = W = patch_nums[-1] * 2^(len(ch_mult) - 1).
    """

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160, ch_mult=(1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, patch_nums=RELEASE_PATCH_NUMS, beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4, dead_code_frac: float = 0.01):
        super().__init__()
        pns = check_patch_nums(patch_nums)
        widths = [ch] + [ch * m for m in ch_mult]
        if any(w % 32 for w in widths):  # GroupNorm(32, C) needs C divisible by 32
            raise ValueError(f"VQVAE: every width ch*ch_mult[i] must be a multiple of 32 (GroupNorm(32)); "
                             f"got ch={ch}, ch_mult={list(ch_mult)} -> widths {widths}")
        if share_quant_resi < 2:
            raise ValueError(f"VQVAE: share_quant_resi must be >= 2 (partially shared phi), got {share_quant_resi}")
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=list(ch_mult),
                           num_res_blocks=num_res_blocks, patch_nums=list(pns), beta=beta, quant_resi=quant_resi,
                           share_quant_resi=share_quant_resi, dead_code_frac=dead_code_frac)
        self.patch_nums, self.z_channels = pns, z_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, pns, beta, quant_resi, share_quant_resi,
                                            dead_code_frac)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1)

    def codebook(self) -> torch.Tensor:
        """[V, Cvae] raw code vectors: the token embedding space DD1 / DD2 work in."""
        return self.quantize.embedding.weight.detach()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> f [B, Cvae, pn_K, pn_K], checking that the latent matches patch_nums[-1]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"VQVAE: expected images [B, 3, H, W], got {tuple(images.shape)}")
        f = self.quant_conv(self.encoder(images))
        pn = self.patch_nums[-1]
        if f.shape[-2:] != (pn, pn):
            raise ValueError(f"VQVAE: {tuple(images.shape[-2:])} images give a {tuple(f.shape[-2:])} latent "
                             f"(downsample {self.downsample} from ch_mult {self.config['ch_mult']}), but "
                             f"patch_nums[-1] = {pn}: use {pn * self.downsample}x{pn * self.downsample} images")
        return f

    @torch.no_grad()
    def encode_scales(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] in [-1, 1] -> token maps, one LongTensor [B, pn*pn] (raster order) per scale."""
        return self.quantize(self._features(images))[1]

    def next_scale_input(self, si: int, f_hat: torch.Tensor, h: torch.Tensor):
        """One step of the next-scale recursion: add scale si's code map h [B, Cvae, pn_si, pn_si] to
        f_hat [B, Cvae, pn_K, pn_K]. Returns (f_hat, VAR's input for scale si+1 [B, Cvae, pn_si+1, pn_si+1]);
        at the last scale the second item is f_hat itself."""
        K = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            f_hat = f_hat + self.quantize.quant_resi(F.interpolate(h, size=(K, K), mode="bicubic"), si)
            pn = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
        f_hat = f_hat + self.quantize.quant_resi(h, si)
        return f_hat, f_hat

    def _check_scales(self, xs: list[torch.Tensor]) -> None:
        want = [pn * pn for pn in self.patch_nums]
        if len(xs) != len(want) or [x.shape[1] for x in xs] != want:
            raise ValueError(f"VQVAE: expected one [B, pn*pn, ...] tensor per scale with pn*pn = {want}, got "
                             f"{[tuple(x.shape) for x in xs]}")

    def _accumulate(self, h_list: list[torch.Tensor], n: int):
        """Run the recursion over the first n scales of h_list: -> (f_hat, VAR's inputs [B, pn*pn, Cvae] for
        scales 2..n+1)."""
        self._check_scales(h_list)
        K = self.patch_nums[-1]
        dtype = torch.promote_types(h_list[0].dtype, torch.float32)  # bf16 vectors (autocast) are taken in fp32
        f_hat, nexts = h_list[0].new_zeros(h_list[0].shape[0], self.z_channels, K, K, dtype=dtype), []
        with torch.autocast(f_hat.device.type, enabled=False):  # the recursion in fp32 under a bf16 autocast
            for si, pn in enumerate(self.patch_nums[:n]):
                f_hat, nxt = self.next_scale_input(si, f_hat, to_map(h_list[si], pn).to(dtype))
                nexts.append(nxt.flatten(2).transpose(1, 2))
        return f_hat, nexts

    def teacher_forcing_input_from_embeddings(self, h_list: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale code vectors [B, pn*pn, Cvae] -> VAR's teacher-forcing input [B, L - 1, Cvae] (the input of
        scales 2..K; the last scale's vectors are not needed but must be given)."""
        return torch.cat(self._accumulate(h_list, len(self.patch_nums) - 1)[1], 1)

    def teacher_forcing_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Token maps [B, pn*pn] per scale -> VAR's teacher-forcing input [B, L - 1, Cvae]."""
        return self.teacher_forcing_input_from_embeddings([self.quantize.embedding(i) for i in idx_list])

    def decode_embeddings(self, h_list: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale code vectors [B, pn*pn, Cvae] (any continuous values) -> images [B, 3, H, W] in [-1, 1]."""
        f_hat = self._accumulate(h_list, len(self.patch_nums))[0]
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def decode_scales(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Token maps [B, pn*pn] per scale -> images [B, 3, H, W] in [-1, 1]."""
        return self.decode_embeddings([self.quantize.embedding(i) for i in idx_list])

    def _reconstruct(self, images: torch.Tensor):
        f_hat, idx_list, vq, z = self.quantize(self._features(images))
        return self.decoder(self.post_quant_conv(f_hat)), idx_list, vq, z

    def forward(self, images: torch.Tensor):
        """Training forward: images [B, 3, H, W] -> (reconstruction [B, 3, H, W], not clamped; vq loss)."""
        rec, _, vq, _ = self._reconstruct(images)
        return rec, vq

    def loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Training loss on [B, 3, H, W] in [-1, 1]: MSE reconstruction + VAR's multi-scale vq loss (beta 0.25,
        straight-through). In train mode also updates code usage and restarts dead codes. Returns (loss, parts
        as floats: loss, rec, vq, and in train mode usage [% codes hit by the batch], restarted)."""
        rec, idx_list, vq, z = self._reconstruct(images)
        rec_loss = F.mse_loss(rec, images)
        loss = rec_loss + vq
        parts = {"loss": loss.item(), "rec": rec_loss.item(), "vq": vq.item()}
        if self.training:  # after the forward: the embedding backward needs indices only, not the edited rows
            parts.update(self.quantize.update_usage(idx_list, z))
        return loss, parts


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint loading (`vae_ch160v4096z32.pth` as released, .safetensors, or {"model": ..., "config": ...})
# ----------------------------------------------------------------------------------------------------------------

def load_vae(path, patch_nums=None, trusted: bool = False) -> VQVAE:
    """Build a VQVAE from a checkpoint (`vae_ch160v4096z32.pth`, .safetensors, or {"model", "config"}),
    inferring ch, ch_mult, num_res_blocks, vocab size, Cvae and the number of phi convs from shapes; strict
    load, CPU, eval mode. As upstream, an `ema_vocab_hit_SV` saved for a different number of scales is reset
    (it is usage statistics, not weights)."""
    sd, cfg = io.read_state_dict(path, trusted=trusted)
    need = partial(io.require_key, sd, path=path, what="VQVAE")
    ch = need("encoder.conv_in.weight")[0]
    n_levels = io.count_indices(sd, r"encoder\.down\.(\d+)\.")
    ch_mult = [need(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(n_levels)]
    V, cvae = need("quantize.embedding.weight")
    pns = check_patch_nums(patch_nums or cfg.get("patch_nums") or RELEASE_PATCH_NUMS)
    cfg = {**cfg, "vocab_size": V, "z_channels": cvae, "ch": ch, "ch_mult": ch_mult,
           "num_res_blocks": io.count_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."), "patch_nums": list(pns),
           "share_quant_resi": io.count_indices(sd, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.")}
    ema = sd.get("quantize.ema_vocab_hit_SV")
    if ema is not None and ema.shape[0] != len(pns):
        sd = {**sd, "quantize.ema_vocab_hit_SV": torch.zeros(len(pns), V)}
    with torch.device("meta"):
        model = VQVAE(**cfg)
    return io.load_strict(model, sd, path)
