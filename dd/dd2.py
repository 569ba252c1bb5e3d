"""Distilled Decoding 2 (DD2): a one-step generator distilled from the teacher's exact conditional score.

The teacher's next-token distribution p_Φ(· | q_<i) over codebook vectors, smoothed by the flow's Gaussian, has a
closed-form score at every position (`dd.flow`): no pair dataset is needed. DD2 trains a generator against it with
conditional score distillation (CSD), helped by a guidance network that learns the generator's own conditional score.

Time follows the project's convention throughout (x_t = (1 − t)·eps + t·c, t = 0 noise, t = 1 data; `dd.flow`
documents the conversion from the paper's t_DD2 = 1 − t). The paper's velocity E[eps − c] is minus ours; its
generator output x = eps − v_DD2 is `eps + v(eps, t = 0)` here.

Pieces, in pipeline order (`notebooks/08_train_dd2.ipynb`):

    0. LlamaGen only: `ContinuousGPT`, the teacher with its token table replaced by an MLP on codebook vectors
       (`fit_input_mlp`, then `kl_to_teacher` fine-tuning), so it reads continuous prefixes. It is the teacher Φ
       of the CSD loss. VAR needs no adaptation: it already reads vectors (through the tokenizer's f_hat recursion).
    1. `ARDiffusion`: the (continuous) teacher's backbone plus a MAR-style per-token MLP flow head (`FlowHead`) in
       place of its logits head, velocity-parameterised, trained with the ground-truth-score (GTS) loss
       `gts_loss`: regress the closed-form teacher velocity on teacher samples (head only, then everything).
    2. Generator G and guidance ψ, both copies of the AR-diffusion model (`distill`). G reads the noise sequence
       shifted by one position (through the backbone) and eps_i itself (through the head): q_i = eps_i + v(eps_i,
       0, f_i(eps_<i)), one jump, continuous output. ψ regresses the velocity of G's detached samples (FCS loss);
       G minimises the SiD-form CSD loss (α = 1) between the teacher's and ψ's posterior means, with the prefix
       stop-gradient, K ψ updates per G update, a progressive EMA and an optional performance alignment; G's
       learning rate constant after the warm-up or cosine-decayed (`lr_gen_decay_to`); optionally G's output soft-
       snapped to the codebook at an annealed temperature (`out_tau`, `soft_snap`; off by default).
    3. Sampling: one step (`generate`), or k steps where the teacher redraws the last k − 1 AR steps
       (`sample_multistep`).

Choices the paper leaves open (the spec marks them [assumption]) and their defaults here: t ~ U(0, 1) for GTS and
FCS, U[t_min, t_max] = U[0.02, 0.98] for CSD, every token its own t and eps; m = 4 noise draws per sequence;
ω = 1 / mean|q − x̂0_Φ| per token (SiD); VAR's generator feeds its noise through the f_hat recursion (the teacher's
own input format); outputs are decoded continuously (tokens = nearest codes where discrete ids are needed); the
teacher's conditionals read G's prefix as it is (`teacher_prefix = "codes"`: snapped to the nearest codes, what the
discrete teacher was trained on);
LlamaGen's input adaptation matches the discrete teacher's conditionals (KL) instead of the paper's AR
cross-entropy on ImageNet tokens (the teacher's full distribution is at hand, and no dataset is needed).

References:
    - Liu et al., "Distilled Decoding 2" (DD2), arXiv 2510.21003: Eq. (1) score, Eq. (4) CSD, Eq. (5) FCS, Eq. (6)
      GTS, App. C (multi-noise, two time-scale updates, performance alignment), App. E.1/E.4 (parameterisation,
      LlamaGen continuous input), Alg. 4 (multi-step sampling).
    - Zhou et al., "Score identity Distillation" (SiD), arXiv 2404.04057; mingyuanzhou/SiD `training/sid_loss.py`
      (behaviour matched: the α-weighted loss and its per-sample normalisation ω).
    - Yin et al., "DMD2", arXiv 2405.14867; tianweiy/DMD2 (two time-scale update rule, t range 0.02–0.98).
    - Li et al., "MAR", arXiv 2406.11838; LTH14/mar `models/diffloss.py` (SimpleMLPAdaLN: the flow head's shape,
      zero-initialised modulation and output).
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dd1, dist, flow, io, llamagen, metrics, teachers, train, var
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
        self.grid_size, self.num_classes, self.vocab_size = gpt.grid_size, gpt.num_classes, gpt.vocab_size
        self.cls_embedding, self.layers, self.norm, self.output = gpt.cls_embedding, gpt.layers, gpt.norm, gpt.output
        self.tok_mlp = nn.Sequential(nn.Linear(codebook_dim, mlp_hidden), nn.SiLU(), nn.Linear(mlp_hidden, dim))
        self._rope = None

    @classmethod
    def from_teacher(cls, teacher: llamagen.GPT, codebook_dim: int, mlp_hidden: int = 0) -> "ContinuousGPT":
        """Copies of the teacher's class table, layers, final norm and logits head; the MLP is new (fit it)."""
        model = cls(teacher.config, codebook_dim, mlp_hidden)
        for name in ("cls_embedding", "layers", "norm", "output"):
            getattr(model, name).load_state_dict(getattr(teacher, name).state_dict())
        return model.to(next(teacher.parameters()).device)

    def rope(self, device) -> torch.Tensor:
        if self._rope is None or self._rope.device != torch.device(device):
            c = self.config["teacher"]
            self._rope = llamagen.rope_2d(self.grid_size, c["dim"] // c["n_head"], c["rope_base"]).to(device)
        return self._rope

    def hidden(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] (x[:, -1] is not read), labels [B] → normalised features [B, T, dim]; row i sees x_<i."""
        h = torch.cat([self.cls_embedding(labels), self.tok_mlp(x[:, :-1])], 1)
        rope = self.rope(x.device)[:h.shape[1]]
        for layer in self.layers:
            h = layer(h, rope)
        return self.norm(h)

    def logits(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] fp32; logits[:, i] is the distribution of token i given x_<i."""
        return self.output(self.hidden(x, labels)).float()

    def cfg_logits(self, x: torch.Tensor, labels: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """u + s (c − u), u from the null class, as `llamagen.GPT.cfg_logits`."""
        B = labels.shape[0]
        both = self.logits(torch.cat([x, x]), torch.cat([labels, labels.new_full((B,), self.num_classes)]))
        return both[B:] + cfg_scale * (both[:B] - both[B:])


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


def rebuild_phi(tok, teacher: llamagen.GPT, codebook: torch.Tensor, sampling, num_classes: int, cfg, seed: int,
                adapt_state: str | Path, device="cpu"):
    """The continuous-input teacher Φ that a `train_dd2` run of the LlamaGen family distilled, rebuilt outside the
    notebook: its GTS teacher samples (cfg.n_gts_samples labels and tokens drawn under `seed`, as notebook 08 draws
    them) and `adapt_continuous_input` under the same seeds, with cfg's (a train_dd2 section's) sizes. adapt_state
    is that run's `adapt_state.pt`: a finished one is read back, a missing one is trained and written there (so a
    script can also build a Φ with other sizes). → (Φ, adapt_continuous_input's report)."""
    labels = torch.randint(num_classes, (cfg.n_gts_samples,), generator=torch.Generator().manual_seed(seed))
    tokens = teachers.family("llamagen").sample(tok, teacher, labels, sampling,
                                                torch.Generator(device=device).manual_seed(seed), cfg.sample_batch,
                                                device).cpu()
    torch.manual_seed(seed)
    return adapt_continuous_input(teacher, codebook, {"tokens": tokens, "labels": labels}, cfg.mlp_steps,
                                  cfg.adapt_steps, cfg.adapt_lr, cfg.gts_batch, n_hold=min(500, cfg.n_gts_samples // 4),
                                  seed=seed, ckpt_path=adapt_state, device=device)


# ---- the teacher's distribution at every position, given a continuous prefix -------------------------------------

def seq_input(tok, x: torch.Tensor) -> torch.Tensor:
    """Per-position vectors x [B, L, D] → what the family's backbone reads: LlamaGen the vectors themselves (the
    backbone shifts them by one), VAR its next-scale input [B, L − 1, Cvae] through the tokenizer's f_hat recursion.
    Either way, position i's features depend on the vectors of the earlier AR steps only."""
    if isinstance(tok, var.VQVAE):
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
    generator and the guidance network (identical architecture, DD2 §3.3)."""

    def __init__(self, family: str, teacher: dict, codebook_dim: int, head_width: int = 256, head_depth: int = 3,
                 out_tau: float = 0.0):
        super().__init__()
        self.config = dict(family=family, teacher=dict(teacher), codebook_dim=int(codebook_dim),
                           head_width=int(head_width), head_depth=int(head_depth))
        self.family, self.D = family, int(codebook_dim)
        self.set_out_tau(out_tau)
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
        return model.to(next(teacher.parameters()).device)

    def set_out_tau(self, tau: float) -> None:
        """The generator's output layer (`generate`): 0 = the jump's vector as is; > 0 = its soft snap to the codebook
        at this temperature (`soft_snap`). Kept in `config` (only when > 0, so models without it keep theirs)."""
        self.out_tau = float(tau)
        if self.out_tau > 0:
            self.config["out_tau"] = self.out_tau
        else:
            self.config.pop("out_tau", None)

    def features(self, inp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """inp = `seq_input(tok, x)`, labels [B] → per-position features [B, L, dim]; row i depends on the earlier
        AR steps of x only."""
        return self.backbone.hidden(inp, labels)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The head on every position: x [..., D], t [...] (or a float), f [..., dim] → velocity [..., D]."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[:-1])
        return self.head(x.reshape(-1, self.D), t.reshape(-1), f.reshape(-1, f.shape[-1])).view(x.shape)


def _noised(z: torch.Tensor, lo: float, hi: float, share: tuple[int, int] = (0, 1)):
    """Per-token t ~ U[lo, hi] [B, L] and eps; → (t, eps, x_t = (1 − t) eps + t z).

    share = (rank, world): z holds rows rank::world of a global batch of B · world rows; every process draws the
    global batch's (t, eps) and keeps its rows, so several processes see the random numbers of one (`_rows`)."""
    full = (z.shape[0] * share[1], *z.shape[1:])
    t = _rows(lo + (hi - lo) * torch.rand(full[:-1], device=z.device, dtype=z.dtype), share)
    eps = _rows(torch.randn(full, device=z.device, dtype=z.dtype), share)
    return t, eps, (1 - t[..., None]) * eps + t[..., None] * z


def _rows(x: torch.Tensor, share: tuple[int, int]) -> torch.Tensor:
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
        t, _, x = _noised(z, T_EPS, 1 - T_EPS)
        with torch.no_grad():
            target = flow.velocity(x.reshape(-1, D), t.reshape(-1), logp, codebook).view(x.shape)
        total = total + F.mse_loss(model.velocity(x, t, f), target)
    total = total / n_noise
    return total, {"gts": total.item()}


@torch.no_grad()
def ardiff_sample(model: ARDiffusion, tok, labels: torch.Tensor, n_euler: int = 10,
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


# ---- 2. generator, guidance network, conditional score distillation --------------------------------------------

def snap(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Every vector of x [..., D] replaced by its nearest code."""
    return codebook[flow.nearest_code(x.reshape(-1, x.shape[-1]), codebook)].view(x.shape)


def code_spacing(codebook: torch.Tensor) -> torch.Tensor:
    """The median distance from a code to its nearest other code (a scalar tensor): the codebook's length scale."""
    d = torch.cdist(codebook, codebook)
    return d.fill_diagonal_(float("inf")).min(1).values.median()


def soft_snap(y: torch.Tensor, codebook: torch.Tensor, tau: float) -> torch.Tensor:
    """y [..., D] → Σ_c softmax_c(−‖y − c‖² / (tau · s²)) c, s = `code_spacing(codebook)`: every vector pulled to
    a weighted average of codes, the nearest code as tau → 0, differentiable in y. A continuous map from noise can
    put its vectors between codes where the teacher has none; through this layer it only needs to land in the
    right code's neighbourhood. (An ablation: on the embedded default it does not close DD2's gap to DD1; README.)"""
    cb = codebook.to(y)
    d = torch.cdist(y.reshape(-1, y.shape[-1]), cb).pow(2)
    w = torch.softmax(-d / (tau * code_spacing(codebook).to(y).pow(2)), -1)
    return (w @ cb).view(y.shape)


def generate(gen: ARDiffusion, tok, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One step: eps [B, L, D], labels [B] → continuous tokens q [B, L, D], q_i = eps_i + v(eps_i, 0, f_i(eps_<i))
    (the backbone reads the noise sequence in the place of the data: shifted by one position for LlamaGen, through
    the f_hat recursion for VAR); with gen.out_tau > 0, q_i = `soft_snap`(that, the tokenizer's codebook, out_tau)."""
    f = gen.features(seq_input(tok, eps), labels)
    y = eps + gen.velocity(eps, 0.0, f)
    if gen.out_tau > 0:
        y = soft_snap(y, teachers.family(gen.family).codebook(tok), gen.out_tau)
    return y


def fcs_loss(guide: ARDiffusion, tok, z: torch.Tensor, labels: torch.Tensor, n_noise: int = 4,
             share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Fake-score loss (DD2 Eq. 5, velocity form): ψ regresses the velocity z − eps of the generator's detached
    samples z [B, L, D] at x_t = (1 − t) eps + t z, n_noise draws per sequence sharing the backbone pass.
    share: (rank, world) of a data-parallel run (`_noised`)."""
    f = guide.features(seq_input(tok, z), labels)
    total = 0.0
    for _ in range(n_noise):
        t, eps, x = _noised(z, T_EPS, 1 - T_EPS, share)
        total = total + F.mse_loss(guide.velocity(x, t, f), z - eps)
    return total / n_noise


def csd_loss(z: torch.Tensor, logp: torch.Tensor, guide: ARDiffusion, f_guide: torch.Tensor, codebook: torch.Tensor,
             t_min: float = 0.02, t_max: float = 0.98, share: tuple[int, int] = (0, 1),
             weight: str = "token") -> tuple[torch.Tensor, dict]:
    """Conditional score distillation (DD2 Eq. 4, SiD form with α = 1) for generator samples z [B, L, D] (with
    gradient). logp [B, L, V]: the teacher's conditionals given sg(z_<i); f_guide [B, L, dim]: ψ's features of
    sg(z) (both computed without gradient: the prefix stop-gradient). Per token t ~ U[t_min, t_max], x_t =
    (1 − t) eps + t z;  m_Φ = E_Φ[c | x_t] (closed form), m_ψ = x_t + (1 − t) v_ψ(x_t, t, f_i) (ψ's weights frozen,
    the gradient flows through x_t);  loss = mean_i ω_i (m_Φ − m_ψ)·(m_ψ − z_i), ω_i = 1 / mean_D |z_i − m_Φ|
    (no gradient; weight = "sequence": ω = 1 / mean_{L,D} |z − m_Φ| per sequence, SiD's per-image form, so tokens
    far from the teacher's mean keep their larger pull). In x̂0 form the paper's t_DD2 = 1 − t and α_t = 1 − t_DD2
    = t: the same expression. share: (rank, world) of a data-parallel run (`_noised`)."""
    B, L, D = z.shape
    t, _, x = _noised(z, t_min, t_max, share)
    m_real = flow.posterior_mean(x.reshape(-1, D), t.reshape(-1), logp.reshape(B * L, -1), codebook).view(B, L, D)
    m_fake = flow.mean_from_velocity(x.reshape(-1, D), t.reshape(-1),
                                     guide.velocity(x, t, f_guide).reshape(-1, D)).view(B, L, D)
    with torch.no_grad():
        dims = {"token": (-1,), "sequence": (-2, -1)}[weight]
        w = 1.0 / (z - m_real).abs().mean(dims, keepdim=True).clamp_min(1e-5)
    loss = (w * (m_real - m_fake) * (m_fake - z)).sum(-1).mean()
    return loss, {"csd": loss.item(), "gap": (m_real - m_fake).detach().pow(2).sum(-1).mean().item()}


@dataclass
class DistillConfig:
    n_steps: int                  # generator updates
    batch_size: int
    lr_gen: float = 1e-4
    lr_guide: float = 2e-4
    warmup_steps: int = 0         # generator updates of linear LR warm-up (ψ: the same number of its own updates)
    lr_gen_decay_to: float = 1.0  # the generator's LR at its last update / lr_gen: cosine decay after the warm-up
    teacher_prefix: str = "continuous"  # the teacher's conditionals given the generator's prefix as is, or snapped
                                        # to the nearest codes ("codes")
    k_guide: int = 5              # ψ updates per generator update (two time-scale rule)
    align_at: int = 0             # generator step of the performance alignment (0: before the first update)
    align_steps: int = 0          # ψ-only updates of the alignment (G frozen at its EMA; 0 = no alignment)
    k_after: int = 2              # ψ updates per G update after the alignment
    n_noise: int = 4              # (t, eps) draws per sequence in the FCS loss
    t_min: float = 0.02
    t_max: float = 0.98
    ema_max: float = 0.9999       # progressive EMA: min(ema_max, (i + 1) / (i + 10)) at generator step i
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    ckpt_every: int = 50
    log_every: int = 5
    seed: int = 0
    precision: str = "fp32"       # "bf16": networks under bf16 autocast (the closed-form teacher posterior stays fp32)
    out_tau: float = 0.0          # the generator's output layer: 0 = the jump's vector; > 0 = `soft_snap` at this
    out_tau_end: float = 0.0      # temperature, annealed geometrically to out_tau_end at the last update (0: constant)
    csd_weight: str = "token"     # the CSD loss's normalisation ω per token (DD2) or per "sequence" (SiD's per image)


def _warm(lr: float, step: int, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


def gen_lr(cfg: DistillConfig, step: int) -> float:
    """The generator's learning rate at update `step` (0-based): linear warm-up to lr_gen, then a cosine decay
    reaching lr_gen · lr_gen_decay_to at the last update (lr_gen_decay_to = 1: constant after the warm-up)."""
    if step < cfg.warmup_steps or cfg.lr_gen_decay_to == 1.0:
        return _warm(cfg.lr_gen, step, cfg.warmup_steps)
    span = max(1, cfg.n_steps - 1 - cfg.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return cfg.lr_gen * (cfg.lr_gen_decay_to + (1 - cfg.lr_gen_decay_to) * cos)


def out_tau(cfg: DistillConfig, step: int) -> float:
    """The generator's output temperature at update `step` (0-based): out_tau → out_tau_end geometrically."""
    if cfg.out_tau <= 0 or cfg.out_tau_end <= 0:
        return cfg.out_tau
    return cfg.out_tau * (cfg.out_tau_end / cfg.out_tau) ** (min(step, cfg.n_steps - 1) / max(1, cfg.n_steps - 1))


def distill(gen: ARDiffusion, guide: ARDiffusion, teacher, tok, codebook: torch.Tensor, sampling, num_classes: int,
            cfg: DistillConfig, ckpt_path: str | Path, device="cpu", desc: str = "DD2", on_step=None) -> dict:
    """Alternate K FCS updates of `guide` and one CSD update of `gen` (both trained in place) for cfg.n_steps
    generator updates, uniform random labels, no data. The checkpoint (atomic, every ckpt_every generator steps)
    holds both models, the generator's EMA, both optimizers, the step, the history and the RNG state, so an
    interrupted run resumes exactly; a non-finite loss raises `train.TrainingDiverged` naming the step and the
    last good checkpoint. on_step(step, ema), when given, runs after every generator update (e.g. a quality
    curve; it must not draw from the global RNG); what it returns other than None is kept in the checkpoint and
    returned as "records", so a resumed run's curve is whole. Returns {"history", "ema", "resumed_from", "aligned",
    "records", "seconds"}: seconds is the training's wall time without on_step, summed over every run that built
    the checkpoint (a run that resumes a finished checkpoint still reports what the distillation cost).

    Under torchrun (`dd.dist`, `dd.launch`) every process takes rows rank::world of each global batch (labels,
    noise and the losses' (t, eps) drawn for the whole batch from the same seed on every process), gradients are
    averaged before each update, rank 0 writes the checkpoints and runs on_step: the result equals one process's
    at the same batch_size up to floating-point summation order, and a checkpoint resumes on any process count."""
    device = torch.device(device)
    ckpt_path = Path(ckpt_path)
    world = dist.world()
    if cfg.batch_size % world:
        raise ValueError(f"distill: batch_size {cfg.batch_size} does not split evenly across {world} processes")
    if cfg.teacher_prefix not in ("continuous", "codes"):
        raise ValueError(f"distill: teacher_prefix must be 'continuous' or 'codes', got {cfg.teacher_prefix!r}")
    if cfg.csd_weight not in ("token", "sequence"):
        raise ValueError(f"distill: csd_weight must be 'token' or 'sequence', got {cfg.csd_weight!r}")
    share = (dist.rank(), world)
    torch.manual_seed(cfg.seed)
    gen.to(device).train()
    guide.to(device).train()
    dist.broadcast_module(gen)
    dist.broadcast_module(guide)
    teacher.to(device).eval().requires_grad_(False)
    codebook = codebook.to(device)
    ema = copy.deepcopy(gen).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_gen, betas=cfg.betas)
    opt_f = torch.optim.Adam(guide.parameters(), lr=cfg.lr_guide, betas=cfg.betas)
    fingerprint = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
                   "model_config": copy.deepcopy(gen.config),
                   "inputs": train.inputs_digest([m for m in (gen, guide, teacher, tok) if isinstance(m, nn.Module)],
                                                 {"codebook": codebook})}
    step, n_guide, history, aligned, records, spent = 0, 0, [], False, [], 0.0
    ck = io.load_checkpoint(ckpt_path, map_location=device) if ckpt_path.is_file() else None
    if ck is not None and ck.get("fingerprint") != fingerprint:
        print(f"{ckpt_path}: written by a run with other settings, weights or data; starting afresh")
        ck = None
    if ck is not None:
        gen.load_state_dict(ck["gen"]), guide.load_state_dict(ck["guide"]), ema.load_state_dict(ck["ema"])
        opt_g.load_state_dict(ck["opt_gen"]), opt_f.load_state_dict(ck["opt_guide"])
        step, n_guide, history, aligned = ck["step"], ck["n_guide"], ck["history"], ck["aligned"]
        records, spent = ck.get("records", []), ck.get("seconds", 0.0)
        train._set_rng_state(ck["rng"])
    resumed_from = step
    t_start, hooks = time.perf_counter(), 0.0  # hooks: time in on_step (reporting, not training)

    def seconds():
        return spent + time.perf_counter() - t_start - hooks

    def save():
        if dist.is_main():  # every process holds the same weights and RNG state
            io.save_checkpoint(ckpt_path, {
                "gen": gen.state_dict(), "guide": guide.state_dict(), "ema": ema.state_dict(),
                "opt_gen": opt_g.state_dict(), "opt_guide": opt_f.state_dict(), "step": step, "n_guide": n_guide,
                "history": history, "aligned": aligned, "rng": train._rng_state(), "fingerprint": fingerprint,
                "records": records, "seconds": seconds()})
        dist.barrier()

    def labels_draw():
        return _rows(torch.randint(num_classes, (cfg.batch_size,), device=device), share)

    def noise_draw():
        return _rows(torch.randn(cfg.batch_size, gen.L, gen.D, device=device), share)

    def check(loss, what):
        if not (torch.isfinite(loss) if world == 1 else dist.mean(torch.isfinite(loss).float()) == 1):
            last = f"{ckpt_path} (step {io.load_checkpoint(ckpt_path)['step']})" \
                if ckpt_path.is_file() else "none written yet"
            raise train.TrainingDiverged(f"{desc}: {what} loss is {loss.item()} at generator step {step}; "
                                         f"last good checkpoint: {last}")

    def guide_update(labels):
        nonlocal n_guide
        with torch.no_grad(), autocast():
            z = generate(gen, tok, noise_draw(), labels).float()
        with autocast():
            loss = fcs_loss(guide, tok, z, labels, cfg.n_noise, share)
        check(loss, "guidance (FCS)")
        for group in opt_f.param_groups:
            group["lr"] = _warm(cfg.lr_guide, n_guide, cfg.warmup_steps)
        opt_f.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(list(guide.parameters()))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(guide.parameters(), cfg.grad_clip)
        opt_f.step()
        n_guide += 1
        return loss.item()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    main = dist.is_main()
    with train.deterministic(device):
        bar = io.progress(total=cfg.n_steps, initial=step, desc=desc, disable=not main)
        while step < cfg.n_steps:
            guide.requires_grad_(True)
            if cfg.align_steps and step == cfg.align_at and not aligned:
                gen.load_state_dict(ema.state_dict())  # performance alignment: G ← EMA, then ψ catches up alone
                for _ in io.progress(range(cfg.align_steps), desc=f"{desc} alignment", leave=False,
                              disable=not main):
                    guide_update(labels_draw())
                aligned = True
                save()
            for model in (gen, ema):
                model.set_out_tau(out_tau(cfg, step))
            k = cfg.k_after if aligned else cfg.k_guide
            labels = labels_draw()
            fcs = sum(guide_update(labels) for _ in range(k)) / max(k, 1)
            guide.requires_grad_(False)  # frozen for the generator's update; gradients still flow through its input
            with autocast():
                z = generate(gen, tok, noise_draw(), labels).float()
                with torch.no_grad():
                    zc = z.detach()
                    zt = zc if cfg.teacher_prefix == "continuous" else snap(zc, codebook)
                    logp = teacher_logp(teacher, tok, zt, labels, sampling).float()
                    f_guide = guide.features(seq_input(tok, zc), labels)
                loss, logs = csd_loss(z, logp, guide, f_guide, codebook, cfg.t_min, cfg.t_max, share,
                                      cfg.csd_weight)
            check(loss, "generator (CSD)")
            for group in opt_g.param_groups:
                group["lr"] = gen_lr(cfg, step)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            for p in gen.parameters():  # SiD / DMD2: a rare non-finite gradient entry must not poison the weights
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            dist.average_gradients([p for p in gen.parameters() if p.requires_grad])
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip)
            opt_g.step()
            train.ema_update(ema, gen, min(cfg.ema_max, (step + 1) / (step + 10)))
            step += 1
            if step % cfg.log_every == 0 or step == cfg.n_steps:
                if world > 1:  # the global batch's means
                    fcs, *vals = dist.mean(torch.tensor([fcs, *logs.values()], dtype=torch.float64)).tolist()
                    logs = dict(zip(logs, vals))
                history.append({"step": step, "fcs": fcs, **logs, "lr_gen": opt_g.param_groups[0]["lr"],
                                "guide_updates": n_guide})
                bar.set_postfix(csd=f"{logs['csd']:.4f}", fcs=f"{fcs:.4f}")
            if on_step is not None and main:  # before the checkpoint, which keeps what it returns
                t_hook = time.perf_counter()
                record = on_step(step, ema)
                if record is not None:
                    records.append(record)
                hooks += time.perf_counter() - t_hook
            if step % cfg.ckpt_every == 0 or step == cfg.n_steps:
                save()
            bar.update(1)
        bar.close()
    guide.requires_grad_(True)
    gen.eval(), guide.eval()
    return {"history": history, "ema": ema, "resumed_from": resumed_from, "aligned": aligned, "records": records,
            "seconds": seconds()}


class Probe:
    """`distill`'s on_step: every `every` generator steps (and at the last, `last`), the feature-space metrics
    (`metrics.sample_metrics`) of the EMA generator's one-step samples for fixed labels [N] and noise [N, L, D].
    Returns the step's {"step", <fid name>, "class_acc"} row (None between probes), which `distill` keeps in its
    checkpoint; `records` also collects the rows of this object's calls, `seconds` the time they took."""

    def __init__(self, tok, net, ref, dataset: str, k_nn: int, labels, noise, every: int, last: int,
                 batch_size: int = 250, device="cpu"):
        self.tok, self.net, self.ref, self.dataset, self.k_nn = tok, net, ref, dataset, k_nn
        self.labels, self.noise, self.every, self.last = labels, noise, every, last
        self.batch_size, self.device = batch_size, device
        self.records, self.seconds = [], 0.0

    @torch.no_grad()
    def __call__(self, step: int, ema: ARDiffusion) -> dict | None:
        if step % self.every and step != self.last:
            return None
        t0 = time.perf_counter()
        x = dd1.in_batches(lambda e, y: generate(ema, self.tok, e, y), self.noise, self.labels, self.batch_size)
        m = metrics.sample_metrics(self.net, self.ref, dd1.decode(self.tok, x).cpu(), self.labels.cpu(),
                                   self.dataset, self.k_nn, self.device)
        fid = metrics.fid_name(self.dataset)
        self.records.append({"step": step, fid: m[fid], "class_acc": m["class_acc"]})
        self.seconds += time.perf_counter() - t0
        return self.records[-1]


# ---- 3. sampling ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_multistep(gen: ARDiffusion, teacher, tok, eps: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor,
                     k: int, sampling, generator: torch.Generator | None = None):
    """DD2 Alg. 4: one generator step, then the (discrete) teacher redraws the last k − 1 AR steps with its
    ordinary sampler given the generator's prefix snapped to the nearest codes. k = 1 is the one-step generator.
    → (tokens [B, L], embeddings [B, L, D]: the generator's continuous vectors, the teacher's codes after)."""
    n_ar = len(gen.ends)
    if not 1 <= k <= n_ar:
        raise ValueError(f"sample_multistep: k must be in [1, {n_ar}], got {k}")
    x = generate(gen, tok, eps, labels)
    cb = codebook.to(x)
    tokens = flow.nearest_code(x.reshape(-1, x.shape[-1]), cb).view(x.shape[:2])
    if k == 1:
        return tokens, x
    tokens = dd1.teacher_steps(teacher, tok, tokens, labels, n_ar - (k - 1), n_ar, sampling, generator)
    first = ([0, *gen.ends])[n_ar - (k - 1)]
    keep = (torch.arange(gen.L, device=x.device) < first)[None, :, None]
    return tokens, torch.where(keep, x, cb[tokens])
