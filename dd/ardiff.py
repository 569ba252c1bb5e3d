"""AR diffusion: the teacher's backbone with a per-token flow head, tuned on the teacher's exact conditional score.

DD2 starts its generator and its guidance network from this model (`dd.dd2`). Built in two steps
(`notebooks/08_train_dd2.ipynb`):

    0. LlamaGen only: `ContinuousGPT`, the teacher with its token table replaced by an MLP on codebook vectors
       (`fit_input_mlp`, then `kl_to_teacher` fine-tuning: `adapt_continuous_input`), so it reads continuous
       prefixes. It is the teacher Φ whose conditionals `teacher_logp` gives at every position. VAR needs no
       adaptation: it already reads vectors (through the tokenizer's f_hat recursion, `seq_input`).
    1. `ARDiffusion`: the (continuous) teacher's backbone plus a MAR-style per-token MLP flow head (`FlowHead`) in
       place of its logits head, velocity-parameterised, trained with the ground-truth-score (GTS) loss
       `gts_loss`: regress the closed-form teacher velocity on teacher samples (head only, then everything).
       `sample` runs it as a sampler (AR steps, each by Euler steps of the head's flow).

Time follows the project's convention (x_t = (1 − t)·eps + t·c, t = 0 noise, t = 1 data; `dd.flow` documents the
conversion from the paper's t_DD2 = 1 − t). Choices the paper leaves open (the spec marks them [assumption]): t ~
U(0, 1) for GTS, every token its own t and eps; LlamaGen's input adaptation matches the discrete teacher's
conditionals (KL) instead of the paper's AR cross-entropy on ImageNet tokens (the teacher's full distribution is at
hand, and no dataset is needed).

References:
    - Liu et al., "Distilled Decoding 2" (DD2), arXiv 2510.21003: Eq. (1) score, Eq. (6) GTS, App. E.1/E.4
      (parameterisation, LlamaGen continuous input).
    - Li et al., "MAR", arXiv 2406.11838; LTH14/mar `models/diffloss.py` (SimpleMLPAdaLN: the flow head's shape,
      zero-initialised modulation and output).
"""
from __future__ import annotations

import copy
import functools
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import flow, io, llamagen, train, var, var_tokenizer
from .trajectories import step_ends

T_EPS = 1e-3  # GTS / FCS times are drawn from [T_EPS, 1 − T_EPS]: the closed-form velocity is exact there


# ---- 0. LlamaGen: a teacher that reads continuous tokens --------------------------------------------------------

class ContinuousGPT(nn.Module):
    """A LlamaGen GPT whose token table is an MLP on D-dim codebook vectors (DD2 App. E.4), same layers and heads.

    teacher: the GPT's `config`; codebook_dim: D; mlp_hidden: the MLP's hidden width (0: 4·dim).
    Sequences are vectors x [B, T, D] (codes or anything continuous); position i reads the class and x_<i.
    """

    def __init__(self, teacher: dict, codebook_dim: int, mlp_hidden: int = 0):
        super().__init__()
        gpt = llamagen.GPT(**teacher)
        dim = gpt.config["dim"]
        mlp_hidden = int(mlp_hidden) or 4 * dim
        self.config = dict(teacher=dict(gpt.config), codebook_dim=int(codebook_dim), mlp_hidden=mlp_hidden)
        self.grid_size, self.vocab_size, self.n_prefix = gpt.grid_size, gpt.vocab_size, gpt.n_prefix
        self.cls_embedding, self.layers, self.norm, self.output = gpt.cls_embedding, gpt.layers, gpt.norm, gpt.output
        self.tok_mlp = nn.Sequential(nn.Linear(codebook_dim, mlp_hidden), nn.SiLU(), nn.Linear(mlp_hidden, dim))
        self._rope = None

    @classmethod
    def from_teacher(cls, teacher: llamagen.GPT, codebook_dim: int, mlp_hidden: int = 0) -> "ContinuousGPT":
        """Copies of the teacher's class table, layers, final norm and logits head; the MLP is new (fit it)."""
        model = cls(teacher.config, codebook_dim, mlp_hidden)
        for name in ("cls_embedding", "layers", "norm", "output"):
            getattr(model, name).load_state_dict(getattr(teacher, name).state_dict())
        share_captions(teacher, model)
        return model.to(next(teacher.parameters()).device)

    @property
    def num_classes(self) -> int:
        """Classes (T2I: captions in the bank); this id is the null condition of CFG."""
        return self.cls_embedding.num_classes

    def rope(self, device) -> torch.Tensor:
        if self._rope is None or self._rope.device != torch.device(device):
            c = self.config["teacher"]
            self._rope = llamagen.rope_2d(self.grid_size, c["dim"] // c["n_head"], c["rope_base"],
                                          self.n_prefix).to(device)
        return self._rope

    def hidden(self, x: torch.Tensor, labels: torch.Tensor, mask_of: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] (x[:, -1] is not read), labels [B] → normalised features [B, T, dim]; row i sees the
        condition prefix (class or caption; mask_of: see `llamagen.CaptionEmbedder`) and x_<i."""
        cond, key_mask = llamagen.condition(self.cls_embedding, labels, 0.0, mask_of)
        h = torch.cat([cond, self.tok_mlp(x[:, :-1])], 1)
        rope = self.rope(x.device)[:h.shape[1]]
        mask = llamagen.prefix_attn_mask(key_mask, 0, h.shape[1])
        for layer in self.layers:
            h = layer(h, rope, mask=mask)
        return self.norm(h)[:, self.n_prefix - 1:]

    def logits(self, x: torch.Tensor, labels: torch.Tensor, mask_of: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] fp32; logits[:, i] is the distribution of token i given x_<i."""
        return self.output(self.hidden(x, labels, mask_of)).float()

    def cfg_logits(self, x: torch.Tensor, labels: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """u + s (c − u), u from the null condition (its partner's caption mask), as `llamagen.GPT.cfg_logits`."""
        B = labels.shape[0]
        both = self.logits(torch.cat([x, x]), torch.cat([labels, labels.new_full((B,), self.num_classes)]),
                           mask_of=torch.cat([labels, labels]))
        return both[B:] + cfg_scale * (both[:B] - both[B:])


def share_captions(src: nn.Module, dst: nn.Module) -> None:
    """Give dst's caption embedder src's caption bank (a bank is runtime data, not in a state dict); no-op for
    class-conditional models."""
    banks = [m for m in src.modules() if isinstance(m, llamagen.CaptionEmbedder)]
    if banks:
        for m in dst.modules():
            if isinstance(m, llamagen.CaptionEmbedder):
                m.set_captions(banks[0].bank, banks[0].bank_mask)


def fit_input_mlp(model: ContinuousGPT, table: torch.Tensor, codebook: torch.Tensor, n_steps: int, lr: float = 3e-3,
                  desc: str = "input MLP") -> list[float]:
    """Fit model.tok_mlp(c_v) ≈ table[v] (the teacher's token embeddings [V, dim]) over the codebook [V, D] by full-
    batch Adam on the MSE (DD2 App. E.4, step 1). Returns the loss every step."""
    table, codebook = table.detach().to(codebook), codebook.detach()
    opt = torch.optim.Adam(model.tok_mlp.parameters(), lr=lr)
    losses = []
    with train.deterministic(codebook.device):
        for step in io.progress(range(n_steps), desc=desc):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / n_steps))
            loss = F.mse_loss(model.tok_mlp(codebook), table)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def kl_to_teacher(teacher: llamagen.GPT, codebook: torch.Tensor):
    """loss_fn(model, {"tokens", "labels"}) for `train.fit`: mean KL(p_teacher ‖ p_model) per position, the model
    reading codebook[tokens] and the discrete teacher the token ids, both unguided (CFG is applied on top of both),
    over conditional and null-class labels (DD2 App. E.4, step 2, with the teacher's soft targets)."""
    teacher.eval().requires_grad_(False)

    def loss(model, batch):
        tokens, labels = batch["tokens"], batch["labels"]
        labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])  # both branches of CFG
        tokens = torch.cat([tokens, tokens])
        with torch.no_grad():
            target = teacher.logits(tokens, labels).log_softmax(-1)
        logq = model.logits(codebook[tokens], labels).log_softmax(-1)
        kl = (target.exp() * (target - logq)).sum(-1).mean()
        return kl, {"kl": kl.item()}

    return loss


def adapt_continuous_input(teacher: llamagen.GPT, codebook: torch.Tensor, data: dict, mlp_steps: int,
                           adapt_steps: int, adapt_lr: float, batch_size: int, n_hold: int, seed: int = 0,
                           ckpt_path: str | Path | None = None, device="cpu"):
    """DD2 App. E.4 for LlamaGen: a `ContinuousGPT` copy of the teacher, its input MLP fitted to the token table
    (`fit_input_mlp`, mlp_steps) and then fine-tuned (`kl_to_teacher`, adapt_steps of `train.fit` on data =
    {"tokens", "labels"} teacher samples, the last n_hold held out). The fine-tuned weights are kept only if they
    lower the held-out KL; otherwise the fitted MLP is. → (model in eval mode without gradients, report dict with
    "mlp_mse", "kl_after_fit", "kl_after_tuning", "kept", "mlp_losses", "history", "seconds"); seconds: the MLP fit's
    wall time and the fine-tuning's (`train.fit`'s, summed over resumed runs)."""
    phi = ContinuousGPT.from_teacher(teacher, codebook.shape[1]).to(device)
    t0 = time.perf_counter()
    mlp_losses = fit_input_mlp(phi, teacher.tok_embeddings.weight, codebook, mlp_steps)
    seconds = time.perf_counter() - t0
    kl_fn = kl_to_teacher(teacher, codebook)
    hold = {k: v[-n_hold:].to(device) for k, v in data.items()}
    with torch.no_grad():
        kl_fit = kl_fn(phi.eval(), hold)[0].item()
    fitted = copy.deepcopy(phi.state_dict())
    history = []
    if adapt_steps > 0:
        tuned = train.fit(phi, kl_fn, {k: v[:-n_hold] for k, v in data.items()},
                          train.FitConfig(n_steps=adapt_steps, batch_size=batch_size, lr=adapt_lr,
                                          warmup_steps=min(20, adapt_steps), seed=seed),
                          ckpt_path=ckpt_path, device=device, desc="continuous input")
        history, seconds = tuned["history"], seconds + tuned["seconds"]
    phi.eval().requires_grad_(False)
    with torch.no_grad():
        kl_tuned = kl_fn(phi, hold)[0].item()
    if kl_tuned > kl_fit:  # the fine-tuning did not help on held-out samples: keep the fitted MLP
        phi.load_state_dict(fitted)
    return phi, {"mlp_mse": mlp_losses[-1] if mlp_losses else None, "kl_after_fit": kl_fit,
                 "kl_after_tuning": kl_tuned, "kept": "tuned" if kl_tuned <= kl_fit else "fitted",
                 "mlp_losses": mlp_losses, "history": history, "seconds": seconds}


# ---- the teacher's distribution at every position, given a continuous prefix -------------------------------------

def seq_input(tok, x: torch.Tensor) -> torch.Tensor:
    """Per-position vectors x [B, L, D] → what the family's backbone reads: LlamaGen the vectors themselves (the
    backbone shifts them by one), VAR its next-scale input [B, L − 1, Cvae] through the tokenizer's f_hat recursion.
    Either way, position i's features depend on the vectors of the earlier AR steps only."""
    if isinstance(tok, var_tokenizer.VQVAE):
        return tok.teacher_forcing_input_from_embeddings(list(x.split([p * p for p in tok.patch_nums], 1)))
    return x


def teacher_logp(teacher, tok, x: torch.Tensor, labels: torch.Tensor, sampling) -> torch.Tensor:
    """log p_Φ(· | x_<i) [B, L, V] with the sample_teacher section's guidance and truncation (−inf = filtered out),
    for continuous prefixes x [B, L, D]. teacher: a `ContinuousGPT` (LlamaGen) or `var.VAR`."""
    if isinstance(teacher, ContinuousGPT):
        s = sampling.cfg_scale
        logits = teacher.cfg_logits(x, labels, s) if s > 1.0 else teacher.logits(x, labels)
        if s > 1.0 and sampling.cfg_interval > -1:  # guidance only for tokens n <= cfg_interval + 1
            late = torch.arange(x.shape[1], device=x.device) > sampling.cfg_interval + 1
            logits = torch.where(late[:, None], teacher.logits(x, labels), logits)
        logits = llamagen.filter_logits(logits / max(sampling.temperature, 1e-5), sampling.top_k, sampling.top_p)
    elif isinstance(teacher, var.VAR):
        logits = var.filter_logits(teacher.cfg_logits(seq_input(tok, x), labels, sampling.cfg), sampling.top_k,
                                   sampling.top_p)
    else:
        raise TypeError(f"teacher_logp: expected a ContinuousGPT or var.VAR, got {type(teacher).__name__}")
    return logits.log_softmax(-1)


# ---- 1. the AR-diffusion model: backbone + per-token flow head ---------------------------------------------------

def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


def time_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t ∈ [0, 1] (scaled by 1000, as MAR's integer timesteps): [N] → [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class ResBlock(nn.Module):
    """MAR's residual AdaLN MLP block: x + gate · MLP(modulate(LN(x), shift, scale)), modulation from c."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, c):
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, -1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class HeadOut(nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, -1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class FlowHead(nn.Module):
    """Per-token velocity v(x_t, t, f): x_t [N, D], t [N], backbone feature f [N, cond_dim] → [N, D].

    MAR's SimpleMLPAdaLN: input projection, `depth` residual AdaLN MLP blocks conditioned on time_embed(t) +
    cond_embed(f), an AdaLN output layer. Modulations and the output layer start at zero, so a new head predicts
    v = 0 and each block starts as the identity."""

    def __init__(self, codebook_dim: int, cond_dim: int, width: int = 256, depth: int = 3):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(codebook_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = HeadOut(width, codebook_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.time_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for m in [*(b.adaLN_modulation[-1] for b in self.res_blocks), self.final_layer.adaLN_modulation[-1],
                  self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        c = self.time_embed(time_embedding(t)) + self.cond_embed(f)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, c)
        return self.final_layer(h, c)


class ARDiffusion(nn.Module):
    """Backbone (LlamaGen: `ContinuousGPT` without its logits head; VAR: `var.VAR` without `head`) + `FlowHead`.

    family: "llamagen" | "var"; teacher: the backbone's config (LlamaGen: the ContinuousGPT config, VAR: the VAR
    config); codebook_dim: D. Build it with `from_teacher`. Used three times: the GTS-tuned initialiser, the
    generator and the guidance network (identical architecture, DD2 §3.3; `dd.dd2`)."""

    def __init__(self, family: str, teacher: dict, codebook_dim: int, head_width: int = 256, head_depth: int = 3):
        super().__init__()
        self.config = dict(family=family, teacher=dict(teacher), codebook_dim=int(codebook_dim),
                           head_width=int(head_width), head_depth=int(head_depth))
        self.family, self.D = family, int(codebook_dim)
        if family == "llamagen":
            self.backbone = ContinuousGPT(**teacher)
            self.backbone.output = None  # replaced by the flow head
            dim = self.backbone.config["teacher"]["dim"]
        elif family == "var":
            self.backbone = var.VAR(**teacher)
            if self.D != self.backbone.z_channels:
                raise ValueError(f"ARDiffusion: VAR reads Cvae = {self.backbone.z_channels}-d vectors, got "
                                 f"codebook_dim {self.D}")
            self.backbone.head = None
            dim = self.backbone.C
        else:
            raise ValueError(f"ARDiffusion: unknown family {family!r}; families: llamagen, var")
        self.ends = step_ends(self.backbone)
        self.L = self.ends[-1]
        self.head = FlowHead(self.D, dim, head_width, head_depth)

    @classmethod
    def from_teacher(cls, teacher: nn.Module, head_width: int = 256, head_depth: int = 3) -> "ARDiffusion":
        """teacher: a `ContinuousGPT` (LlamaGen, after its input adaptation) or a `var.VAR`. Every backbone weight
        is copied; the flow head is new (v = 0 at the start)."""
        if isinstance(teacher, ContinuousGPT):
            model = cls("llamagen", teacher.config, teacher.config["codebook_dim"], head_width, head_depth)
            skip = "output."
        elif isinstance(teacher, var.VAR):
            model = cls("var", teacher.config, teacher.z_channels, head_width, head_depth)
            skip = "head."
        else:
            raise TypeError(f"ARDiffusion.from_teacher: expected a ContinuousGPT or var.VAR, got "
                            f"{type(teacher).__name__}")
        weights = {k: v for k, v in teacher.state_dict().items() if not k.startswith(skip)}
        model.backbone.load_state_dict(weights, strict=True)
        share_captions(teacher, model)
        return model.to(next(teacher.parameters()).device)

    def features(self, inp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """inp = `seq_input(tok, x)`, labels [B] → per-position features [B, L, dim]; row i depends on the earlier
        AR steps of x only."""
        return self.backbone.hidden(inp, labels)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The head on every position: x [..., D], t [...] (or a float), f [..., dim] → velocity [..., D]."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[:-1])
        return self.head(x.reshape(-1, self.D), t.reshape(-1), f.reshape(-1, f.shape[-1])).view(x.shape)


def noised(z: torch.Tensor, lo: float, hi: float, share: tuple[int, int] = (0, 1)):
    """Per-token t ~ U[lo, hi] [B, L] and eps; → (t, eps, x_t = (1 − t) eps + t z).

    share = (rank, world): z holds rows rank::world of a global batch of B · world rows; every process draws the
    global batch's (t, eps) and keeps its rows, so several processes see the random numbers of one (`rank_rows`)."""
    full = (z.shape[0] * share[1], *z.shape[1:])
    t = rank_rows(lo + (hi - lo) * torch.rand(full[:-1], device=z.device, dtype=z.dtype), share)
    eps = rank_rows(torch.randn(full, device=z.device, dtype=z.dtype), share)
    return t, eps, (1 - t[..., None]) * eps + t[..., None] * z


def rank_rows(x: torch.Tensor, share: tuple[int, int]) -> torch.Tensor:
    """This process's rows rank::world of a global batch drawn identically by every process."""
    return x[share[0]::share[1]]


def gts_loss(teacher, tok, codebook: torch.Tensor, sampling, n_noise: int = 4):
    """loss_fn(model, {"tokens", "labels"}) for `train.fit`: the ground-truth-score loss (DD2 Eq. 6) in velocity
    form, ‖v_ψ(x_t, t, f_i) − v_Φ(x_t, t | q_<i)‖² averaged over positions and n_noise draws of (t, eps) per
    sequence (the backbone features are shared by the draws), v_Φ the closed-form velocity of the teacher's
    guided, filtered conditional (`teacher_logp`) on teacher samples. Picklable (`dd.launch`)."""
    return functools.partial(_gts, teacher, tok, codebook, sampling, n_noise)


def _gts(teacher, tok, codebook, sampling, n_noise, model, batch):
    V, D = codebook.shape
    z, labels = codebook[batch["tokens"]], batch["labels"]
    with torch.no_grad():
        logp = teacher_logp(teacher, tok, z, labels, sampling).reshape(-1, V)
    f = model.features(seq_input(tok, z), labels)
    total = 0.0
    for _ in range(n_noise):
        t, _, x = noised(z, T_EPS, 1 - T_EPS)
        with torch.no_grad():
            target = flow.velocity(x.reshape(-1, D), t.reshape(-1), logp, codebook).view(x.shape)
        total = total + F.mse_loss(model.velocity(x, t, f), target)
    total = total / n_noise
    return total, {"gts": total.item()}


@torch.no_grad()
def sample(model: ARDiffusion, tok, labels: torch.Tensor, n_euler: int = 10,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The AR-diffusion model as a sampler: AR step by AR step (teacher-forced, no cache), each new position's
    vector by `n_euler` Euler steps of the head's velocity from noise (t = 0) to t = 1. labels [B] → [B, L, D]."""
    B, dev = labels.shape[0], labels.device
    x = torch.randn(B, model.L, model.D, generator=generator, device=dev)
    start = 0
    for end in model.ends:
        f = model.features(seq_input(tok, x), labels)[:, start:end]
        y = x[:, start:end]
        for k in range(n_euler):
            y = y + model.velocity(y, k / n_euler, f) / n_euler
        x = torch.cat([x[:, :start], y, x[:, end:]], 1)
        start = end
    return x

