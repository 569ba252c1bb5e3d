"""Layers shared by the teacher families' networks.

`attention`: scaled dot-product attention that stays in fp32 under a CPU bf16 autocast. On CPUs with native bf16
(avx512_bf16 / AMX) the bf16 attention kernels, forward and backward, are slower than fp32 at the embedded
default's shapes while the matmuls around them gain: measured with `python -m dd.cpu_profile`, a DD1 training step
of the LlamaGen-style model took 0.64 s with bf16 attention and 0.50 s with fp32 attention (fp32 throughout: 0.90 s).
On a GPU the autocast's bf16 kernels are used as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, **kw), in fp32 when a CPU autocast is active (a floating attn_mask
    is taken in fp32 too); the output is then fp32, which the next autocast linear casts down again."""
    if q.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return F.scaled_dot_product_attention(q, k, v, **kw)
    mask = kw.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kw["attn_mask"] = mask.float()
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
