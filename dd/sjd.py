"""Speculative Jacobi decoding (SJD) of a LlamaGen GPT: the training-free, lossless way to take fewer forward passes.

Every pass feeds the last committed token and a window of `window` draft tokens through the KV cache at once. The
pass's output at draft i is the teacher's guided, filtered conditional p_i given everything before it; draft i is
accepted with probability min(1, p_i(d_i) / q_i(d_i)), q_i being the distribution it was drawn from, up to the first
rejection. The rejected position is redrawn from the residual max(0, p_i − q_i) (normalised) and committed with the
accepted prefix; when every draft is accepted, the last output adds one more token. This is speculative sampling
with the previous pass's conditionals as the draft model, so every committed token is an exact draw from the
teacher's sampling distribution (CFG, temperature, top-k / top-p), the prefix it is drawn under being exact too.
The drafts after the committed ones are redrawn from this pass's conditionals (q = those conditionals); new window
slots start from a uniform draw ("random") or the token to their left in the grid ("repeat"), both with a one-hot q
(accepted with probability p(d)), as the release initialises them.

Sequences of a batch advance independently (own positions, own window); a pass stops counting for a sequence once
its last token is committed, so `passes` is the per-image number of sequential forward passes.

    tokens, passes = sjd.generate(gpt, labels, cfg_scale=2.0, top_k=100, window=16, generator=g)   # [B, N], [B]

References:
    - Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative Jacobi
      Decoding", arXiv 2410.01699 (acceptance rule, residual resampling, random initialisation of new drafts).
    - tyshiwo1/Accelerating-T2I-AR-with-SJD: `scheduler/jacobi_iteration_lumina_mgpt.py` (one-hot q of initialised
      drafts, drafts after the rejection redrawn from the current conditionals), `test_llamagen.py` (window 16,
      left-neighbour initialisation for LlamaGen). Differences: the release commits the batch's shortest accepted
      prefix for every sequence and applies top-k again to the residual; here each sequence keeps its own and the
      residual is exact.
    - Leviathan et al., "Fast Inference from Transformers via Speculative Decoding", arXiv 2211.17192 (the rule).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import layers, llamagen

INITS = ("random", "repeat")


def _window_logits(gpt: llamagen.GPT, h: torch.Tensor, pos: torch.Tensor, cache: list,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """GPT forward of input embeddings h [R,T,dim] at per-row sequence positions pos [R,T] (consecutive, after the
    condition prefix), through the KV cache (per layer (k, v) [R,H,S,hd], written at pos): each query sees the
    cache up to its own position, but no prefix position where key_mask [R,P] is False (caption padding).
    -> fp32 logits [R,T,V]. The same blocks as `GPT.forward` (eval semantics), with per-row start positions."""
    R, T, _ = h.shape
    S = cache[0][0].shape[2]
    last = gpt.n_prefix + gpt.grid_size ** 2 - 1  # the rope table's last row
    rope = gpt.rope(h.device)[pos.clamp(max=last)]  # [R,T,hd/2,2]; positions past the end: padding
    rot = torch.view_as_complex(rope.float().contiguous())[:, :, None, None]  # [R,T,1,1,hd/2]
    mask = (torch.arange(S, device=h.device) <= pos[..., None])[:, None]  # [R,1,T,S]: key s visible to query t
    if key_mask is not None:
        real = torch.cat([key_mask, key_mask.new_ones(R, S - key_mask.shape[1])], 1)  # [R,S]
        mask = mask & real[:, None, None]
    for blk, (kc, vc) in zip(gpt.layers, cache):
        att = blk.attention
        qkv = att.wqkv(blk.attention_norm(h)).view(R, T, 3, att.n_head, att.head_dim)
        qk = torch.view_as_real(torch.view_as_complex(qkv[:, :, :2].float().unflatten(-1, (-1, 2))) * rot)
        q, k = (t.transpose(1, 2) for t in qk.flatten(-2).type_as(qkv).unbind(2))  # [R,H,T,hd], as apply_rope
        slot = pos[:, None, :, None].expand_as(q)
        kc.scatter_(2, slot, k)
        vc.scatter_(2, slot, qkv[:, :, 2].transpose(1, 2))
        y = layers.attention(q, kc, vc, attn_mask=mask)  # [R,H,T,hd]
        h = h + att.wo(y.transpose(1, 2).reshape(R, T, -1))
        h = h + blk.feed_forward(blk.ffn_norm(h))
    return gpt.output(gpt.norm(h)).float()


@torch.no_grad()
def generate(gpt: llamagen.GPT, labels: torch.Tensor, cfg_scale: float = 1.0, cfg_interval: int = -1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, window: int = 16, init: str = "random",
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SJD samples for labels [B]: (tokens LongTensor [B, N], passes LongTensor [B]), N = grid². The tokens follow
    the distribution of `gpt.generate` with the same guidance and sampling options; `passes` counts each image's
    sequential forward passes (N for window 0, which is `gpt.generate` itself)."""
    if init not in INITS:
        raise ValueError(f"sjd: init must be one of {INITS}, got {init!r}")
    if window < 0:
        raise ValueError(f"sjd: window must be >= 0, got {window}")
    gpt.eval()
    dev, B, N, V, W = labels.device, labels.shape[0], gpt.grid_size ** 2, gpt.vocab_size, window
    T, grid = W + 1, gpt.grid_size
    guided = cfg_scale > 1.0
    pre, key_mask = gpt.null_pair(labels) if guided else gpt.prefix(labels)  # [R,P,dim]: the class or a caption
    R, P = pre.shape[0], gpt.n_prefix
    c, w = gpt.config, gpt.tok_embeddings.weight
    shape = (R, c["n_head"], P - 1 + N + T, c["dim"] // c["n_head"])  # room for a window past the last position
    cache = [(w.new_zeros(shape), w.new_zeros(shape)) for _ in gpt.layers]
    if P > 1:  # a caption: all but its last token go into the cache once
        gpt.forward(pre[:, :P - 1], start=0, cache=cache, key_mask=key_mask)
    sampler = llamagen.Sampler(temperature, top_k, top_p)
    out = torch.zeros(B, N + T + 1, dtype=torch.long, device=dev)  # committed tokens, then the drafts' slots
    a = torch.zeros(B, dtype=torch.long, device=dev)  # committed tokens per sequence
    passes = torch.zeros(B, dtype=torch.long, device=dev)
    draft = torch.zeros(B, W, dtype=torch.long, device=dev)  # draft i proposes token a + i
    q = torch.zeros(B, W, V, device=dev)  # the distribution draft i was drawn from
    fresh = torch.ones(B, W, dtype=torch.bool, device=dev)  # slots still to be initialised
    b_idx = torch.arange(B, device=dev)
    steps = torch.arange(T, device=dev)

    def initialise():  # fill the fresh slots (one-hot q); a "repeat" slot copies the token to its left
        tok = torch.randint(V, (B, W), generator=generator, device=dev)
        if init == "repeat":  # left to right: the left neighbour may be a slot filled just before
            for i in range(W):
                t = a + i  # the token slot i proposes; its left neighbour t - 1 is committed (i = 0) or slot i - 1
                left = out[b_idx, (t - 1).clamp(min=0)] if i == 0 else torch.where(fresh[:, i - 1], tok[:, i - 1],
                                                                                     draft[:, i - 1])
                tok[:, i] = torch.where((t % grid) > 0, left, tok[:, i])
        draft.copy_(torch.where(fresh, tok, draft))
        q.copy_(torch.where(fresh[..., None], F.one_hot(tok, V).to(q.dtype), q))

    while bool((a < N).any()):
        if W and bool(fresh.any()):
            initialise()
        active = a < N
        passes += active.long()
        pos = a[:, None] + steps  # [B,T]: slot a holds the last committed token (or the prefix's last), then drafts
        prev = out[b_idx, (a - 1).clamp(min=0)]
        emb = gpt.tok_embeddings(torch.cat([prev[:, None], draft], 1))  # [B,T,dim]
        emb = emb.repeat(R // B, 1, 1)
        emb[:, 0] = torch.where((a == 0).repeat(R // B)[:, None], pre[:, P - 1], emb[:, 0])
        logits = _window_logits(gpt, emb, pos.repeat(R // B, 1) + P - 1, cache, key_mask)  # [R,T,V]: token a + t
        if guided:
            cond, uncond = logits[:B], logits[B:]
            logits = uncond + cfg_scale * (cond - uncond)
            if cfg_interval > -1:  # guidance only for tokens n <= cfg_interval + 1, as GPT.steps
                logits = torch.where((pos <= cfg_interval + 1)[..., None], logits, cond)
        p = sampler.filter(logits).softmax(-1)  # [B,T,V] the teacher's sampling distribution at each output
        # accept drafts up to the first rejection (drafts past the last token never count)
        remaining = N - a  # tokens still to commit
        if W:
            p_d, q_d = p[:, :W].gather(-1, draft[..., None])[..., 0], q.gather(-1, draft[..., None])[..., 0]
            u = torch.rand(B, W, generator=generator, device=dev)
            ok = (u * q_d < p_d) & (steps[:W] < remaining[:, None])
            n_acc = ok.long().cumprod(1).sum(1)  # [B] accepted leading drafts
        else:
            n_acc = torch.zeros(B, dtype=torch.long, device=dev)
        # the token after them: the residual at a rejection, the last output when every draft was accepted
        p_n = p[b_idx, n_acc]
        resid = (p_n - q[b_idx, n_acc.clamp(max=W - 1)]).clamp(min=0) if W else p_n
        resid = torch.where(((n_acc < W) & (resid.sum(-1) > 0))[:, None], resid, p_n)
        extra = torch.multinomial(resid, 1, generator=generator)[:, 0]  # (multinomial normalises)
        commit = torch.minimum(n_acc + 1, remaining).clamp(min=0)  # [B]; 0 for finished sequences
        # the committed tokens at a .. a + commit - 1: the accepted drafts, then the extra token
        cand = torch.where(steps == n_acc[:, None], extra[:, None], torch.cat([draft, extra[:, None]], 1))  # [B,T]
        idx = pos.clamp(max=out.shape[1] - 1)
        out.scatter_(1, idx, torch.where(steps < commit[:, None], cand, out.gather(1, idx)))
        # the next window: this pass's conditionals where it has them (q = them), fresh slots after
        if W:
            nxt = torch.multinomial(p.view(-1, V), 1, generator=generator).view(B, T)
            src = commit[:, None] + steps[:W]  # output index proposing new draft j
            have = src < T
            src = src.clamp(max=T - 1)
            draft = torch.where(have, nxt.gather(1, src), draft)
            q = torch.where(have[..., None], p.gather(1, src[..., None].expand(-1, -1, V)), q)
            fresh = ~have
        a = a + commit
    return out[:, :N], passes
