"""Distilled Decoding 2 (DD2): a one-step generator distilled from the teacher's exact conditional score.

The teacher's next-token distribution p_Φ(· | q_<i) over codebook vectors, smoothed by the flow's Gaussian, has a
closed-form score at every position (`dd.flow`): no pair dataset is needed. DD2 trains a generator against it with
conditional score distillation (CSD), helped by a guidance network that learns the generator's own conditional score.
Both start from the GTS-tuned AR-diffusion model of `dd.ardiff` (whose `teacher_logp` gives Φ's conditionals).

Time follows the project's convention throughout (x_t = (1 − t)·eps + t·c, t = 0 noise, t = 1 data; `dd.flow`
documents the conversion from the paper's t_DD2 = 1 − t). The paper's velocity E[eps − c] is minus ours; its
generator output x = eps − v_DD2 is `eps + v(eps, t = 0)` here.

Pieces, in pipeline order (`notebooks/08_train_dd2.ipynb`, after `dd.ardiff`'s steps 0 and 1):

    2. Generator G and guidance ψ, both copies of the AR-diffusion model (`distill`). G reads the noise sequence
       shifted by one position (through the backbone) and eps_i itself (through the head): q_i = eps_i + v(eps_i,
       0, f_i(eps_<i)), one jump, continuous output (`generate`). ψ regresses the velocity of G's detached samples
       (`fcs_loss`); G minimises the SiD-form CSD loss (α = 1) between the teacher's and ψ's posterior means
       (`csd_loss`), with the prefix stop-gradient, K ψ updates per G update, a progressive EMA and an optional
       performance alignment; G's learning rate constant after the warm-up or cosine-decayed (`gen_lr`).
    3. Sampling: one step (`generate`), or k steps where the teacher redraws the last k − 1 AR steps
       (`sample_multistep`).

Choices the paper leaves open (the spec marks them [assumption]) and their defaults here: t ~ U(0, 1) for FCS,
U[t_min, t_max] = U[0.02, 0.98] for CSD, every token its own t and eps; m = 4 noise draws per sequence;
ω = 1 / mean|q − x̂0_Φ| per token (SiD); VAR's generator feeds its noise through the f_hat recursion (the teacher's
own input format); outputs are decoded continuously (tokens = nearest codes where discrete ids are needed); the
teacher's conditionals read G's prefix as it is or snapped to the nearest codes (`teacher_prefix`).

References:
    - Liu et al., "Distilled Decoding 2" (DD2), arXiv 2510.21003: Eq. (4) CSD, Eq. (5) FCS, App. C (multi-noise,
      two time-scale updates, performance alignment), App. E.1 (parameterisation), Alg. 4 (multi-step sampling).
    - Zhou et al., "Score identity Distillation" (SiD), arXiv 2404.04057; mingyuanzhou/SiD `training/sid_loss.py`
      (behaviour matched: the α-weighted loss and its per-sample normalisation ω).
    - Yin et al., "DMD2", arXiv 2405.14867; tianweiy/DMD2 (two time-scale update rule, t range 0.02–0.98).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ardiff, dd1, dist, flow, io, train


# ---- 2. generator, guidance network, conditional score distillation --------------------------------------------

def snap(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Every vector of x [..., D] replaced by its nearest code."""
    return codebook[flow.nearest_code(x.reshape(-1, x.shape[-1]), codebook)].view(x.shape)


def generate(gen: ardiff.ARDiffusion, tok, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One step: eps [B, L, D], labels [B] → continuous tokens q [B, L, D], q_i = eps_i + v(eps_i, 0, f_i(eps_<i))
    (the backbone reads the noise sequence in the place of the data: shifted by one position for LlamaGen, through
    the f_hat recursion for VAR)."""
    f = gen.features(ardiff.seq_input(tok, eps), labels)
    return eps + gen.velocity(eps, 0.0, f)


def fcs_loss(guide: ardiff.ARDiffusion, tok, z: torch.Tensor, labels: torch.Tensor, n_noise: int = 4,
             share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Fake-score loss (DD2 Eq. 5, velocity form): ψ regresses the velocity z − eps of the generator's detached
    samples z [B, L, D] at x_t = (1 − t) eps + t z, n_noise draws per sequence sharing the backbone pass.
    share: (rank, world) of a data-parallel run (`ardiff.noised`)."""
    f = guide.features(ardiff.seq_input(tok, z), labels)
    total = 0.0
    for _ in range(n_noise):
        t, eps, x = ardiff.noised(z, ardiff.T_EPS, 1 - ardiff.T_EPS, share)
        total = total + F.mse_loss(guide.velocity(x, t, f), z - eps)
    return total / n_noise


def csd_loss(z: torch.Tensor, logp: torch.Tensor, guide: ardiff.ARDiffusion, f_guide: torch.Tensor,
             codebook: torch.Tensor, t_min: float = 0.02, t_max: float = 0.98, share: tuple[int, int] = (0, 1),
             weight: str = "token") -> tuple[torch.Tensor, dict]:
    """Conditional score distillation (DD2 Eq. 4, SiD form with α = 1) for generator samples z [B, L, D] (with
    gradient). logp [B, L, V]: the teacher's conditionals given sg(z_<i); f_guide [B, L, dim]: ψ's features of
    sg(z) (both computed without gradient: the prefix stop-gradient). Per token t ~ U[t_min, t_max], x_t =
    (1 − t) eps + t z;  m_Φ = E_Φ[c | x_t] (closed form), m_ψ = x_t + (1 − t) v_ψ(x_t, t, f_i) (ψ's weights frozen,
    the gradient flows through x_t);  loss = mean_i ω_i (m_Φ − m_ψ)·(m_ψ − z_i), ω_i = 1 / mean_D |z_i − m_Φ|
    (no gradient; weight = "sequence": ω = 1 / mean_{L,D} |z − m_Φ| per sequence, SiD's per-image form, so tokens
    far from the teacher's mean keep their larger pull). In x̂0 form the paper's t_DD2 = 1 − t and α_t = 1 − t_DD2
    = t: the same expression. share: (rank, world) of a data-parallel run (`ardiff.noised`)."""
    B, L, D = z.shape
    t, _, x = ardiff.noised(z, t_min, t_max, share)
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
    """The distillation's settings: the train_dd2 section's knobs (`from_section`), the run's seed and precision,
    and the engine's constants (defaults)."""
    n_steps: int                  # generator updates
    batch_size: int
    lr_gen: float
    lr_guide: float
    warmup_steps: int             # generator updates of linear LR warm-up (ψ: the same number of its own updates)
    lr_gen_decay_to: float        # the generator's LR at its last update / lr_gen: cosine decay after the warm-up
    teacher_prefix: str           # the teacher's conditionals given the generator's prefix as is ("continuous") or
                                  # snapped to the nearest codes ("codes")
    k_guide: int                  # ψ updates per generator update (two time-scale rule)
    align_at: int                 # generator step of the performance alignment (0: before the first update)
    align_steps: int              # ψ-only updates of the alignment (G frozen at its EMA; 0 = no alignment)
    k_after: int                  # ψ updates per G update after the alignment
    n_noise: int                  # (t, eps) draws per sequence in the FCS loss
    t_min: float                  # CSD times t ~ U[t_min, t_max]
    t_max: float
    ema_max: float                # progressive EMA: min(ema_max, (i + 1) / (i + 10)) at generator step i
    csd_weight: str               # the CSD loss's normalisation ω per "token" (DD2) or "sequence" (SiD's per image)
    seed: int
    precision: str                # "bf16": networks under bf16 autocast (the closed-form teacher posterior stays fp32)
    betas: tuple = (0.9, 0.95)    # Adam's, both networks
    grad_clip: float = 1.0        # gradient-norm clip of both networks (0 = off)
    ckpt_every: int = 50          # generator updates between checkpoints (and one at the end)
    log_every: int = 5            # generator updates between history rows (and one at the end)

    def __post_init__(self):
        if self.teacher_prefix not in ("continuous", "codes"):
            raise ValueError(f"DistillConfig: teacher_prefix must be 'continuous' or 'codes', got "
                             f"{self.teacher_prefix!r}")
        if self.csd_weight not in ("token", "sequence"):
            raise ValueError(f"DistillConfig: csd_weight must be 'token' or 'sequence', got {self.csd_weight!r}")

    @classmethod
    def from_section(cls, section, **overrides) -> "DistillConfig":
        """From a train_dd2 section (`dd.params.TrainDD2`) and the values it lacks:
        `DistillConfig.from_section(cfg, seed=seed, precision=rt.precision)`."""
        return train.of_section(cls, section, **overrides)


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


def _noise(gen: ardiff.ARDiffusion, cfg: DistillConfig, share: tuple[int, int], device) -> torch.Tensor:
    """This process's rows of a global batch of generator noise [batch_size, L, D] (`ardiff.rank_rows`)."""
    return ardiff.rank_rows(torch.randn(cfg.batch_size, gen.L, gen.D, device=device), share)


def _guide_update(run: train.Run, gen, guide, tok, opt: torch.optim.Optimizer, labels: torch.Tensor,
                  cfg: DistillConfig, share: tuple[int, int]) -> float:
    """One FCS update of ψ on the generator's detached samples of fresh noise for `labels`; → the loss."""
    with torch.no_grad(), train.autocast(run.device, cfg.precision):
        z = generate(gen, tok, _noise(gen, cfg, share, run.device), labels).float()
    with train.autocast(run.device, cfg.precision):
        loss = fcs_loss(guide, tok, z, labels, cfg.n_noise, share)
    run.check_finite(loss, "guidance (FCS) loss")
    for group in opt.param_groups:
        group["lr"] = _warm(cfg.lr_guide, run.values["n_guide"], cfg.warmup_steps)
    train.step_optimizer(opt, loss, list(guide.parameters()), cfg.grad_clip)
    run.values["n_guide"] += 1
    return loss.item()


def _generator_loss(gen, guide, teacher, tok, codebook: torch.Tensor, sampling, labels: torch.Tensor,
                    cfg: DistillConfig, share: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """The CSD loss of one generator update on fresh noise for `labels`: the teacher's conditionals and ψ's
    features read G's samples without gradient (the prefix stop-gradient), ψ's weights frozen by the caller."""
    with train.autocast(codebook.device, cfg.precision):
        z = generate(gen, tok, _noise(gen, cfg, share, codebook.device), labels).float()
        with torch.no_grad():
            zc = z.detach()
            zt = zc if cfg.teacher_prefix == "continuous" else snap(zc, codebook)
            logp = ardiff.teacher_logp(teacher, tok, zt, labels, sampling).float()
            f_guide = guide.features(ardiff.seq_input(tok, zc), labels)
        return csd_loss(z, logp, guide, f_guide, codebook, cfg.t_min, cfg.t_max, share, cfg.csd_weight)


def distill(gen: ardiff.ARDiffusion, guide: ardiff.ARDiffusion, teacher, tok, codebook: torch.Tensor, sampling,
            num_classes: int, cfg: DistillConfig, ckpt_path: str | Path, device="cpu", desc: str = "DD2",
            on_step=None) -> dict:
    """Alternate K FCS updates of `guide` and one CSD update of `gen` (both trained in place) for cfg.n_steps
    generator updates, uniform random labels, no data, on `train.Run`'s checkpoint, resume, NaN guard and timing:
    the checkpoint (every ckpt_every generator steps) holds both models, the generator's EMA, both optimizers and
    the RNG state, so an interrupted run resumes exactly. on_step(step, ema), when given, runs after every generator
    update (e.g. a quality curve; it must not draw from the global RNG); what it returns other than None is kept in
    the checkpoint with the training seconds up to that step ("train_seconds") and returned as "records", so a
    resumed run's curve is whole (`dd.probe.Probe` is such a hook). Returns {"history", "ema",
    "resumed_from", "aligned", "records", "seconds"}: seconds without on_step, summed over resumed runs.

    Under torchrun (`dd.dist`, `dd.launch`) every process takes rows rank::world of each global batch (labels,
    noise and the losses' (t, eps) drawn for the whole batch from the same seed on every process), gradients are
    averaged before each update, rank 0 writes the checkpoints and runs on_step: the result equals one process's
    at the same batch_size up to floating-point summation order, and a checkpoint resumes on any process count."""
    device, world = torch.device(device), dist.world()
    if cfg.batch_size % world:
        raise ValueError(f"distill: batch_size {cfg.batch_size} does not split evenly across {world} processes")
    share = (dist.rank(), world)
    torch.manual_seed(cfg.seed)
    for net in (gen, guide):
        net.to(device).train()
    for net in (gen, guide):
        dist.broadcast_module(net)
    teacher.to(device).eval().requires_grad_(False)
    codebook = codebook.to(device)
    ema = copy.deepcopy(gen).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_gen, betas=cfg.betas)
    opt_f = torch.optim.Adam(guide.parameters(), lr=cfg.lr_guide, betas=cfg.betas)
    nets = [m for m in (gen, guide, teacher, tok) if isinstance(m, nn.Module)]
    run = train.Run(ckpt_path, cfg.n_steps, train.fingerprint(cfg, nets, {"codebook": codebook}, on_step),
                    {"gen": gen, "guide": guide, "ema": ema, "opt_gen": opt_g, "opt_guide": opt_f},
                    {"n_guide": 0, "aligned": False, "records": []}, desc, device, unit="generator step")
    run.resume()
    v, gen_params = run.values, [p for p in gen.parameters() if p.requires_grad]

    def labels_draw():
        return ardiff.rank_rows(torch.randint(num_classes, (cfg.batch_size,), device=device), share)

    with run.loop():
        while run.step < cfg.n_steps:
            guide.requires_grad_(True)
            if cfg.align_steps and run.step == cfg.align_at and not v["aligned"]:
                gen.load_state_dict(ema.state_dict())  # performance alignment: G ← EMA, then ψ catches up alone
                for _ in io.progress(range(cfg.align_steps), desc=f"{desc} alignment", leave=False,
                                     disable=not dist.is_main()):
                    _guide_update(run, gen, guide, tok, opt_f, labels_draw(), cfg, share)
                v["aligned"] = True
                run.save()
            k, labels = cfg.k_after if v["aligned"] else cfg.k_guide, labels_draw()
            fcs = sum(_guide_update(run, gen, guide, tok, opt_f, labels, cfg, share) for _ in range(k)) / max(k, 1)
            guide.requires_grad_(False)  # frozen for the generator's update; gradients still flow through its input
            loss, logs = _generator_loss(gen, guide, teacher, tok, codebook, sampling, labels, cfg, share)
            run.check_finite(loss, "generator (CSD) loss")
            for group in opt_g.param_groups:
                group["lr"] = gen_lr(cfg, run.step)
            # SiD / DMD2: a rare non-finite gradient entry must not poison the weights
            train.step_optimizer(opt_g, loss, gen_params, cfg.grad_clip, zero_non_finite=True)
            train.ema_update(ema, gen, min(cfg.ema_max, (run.step + 1) / (run.step + 10)))
            run.step += 1
            if run.due(cfg.log_every):  # the global batch's means
                run.log({"step": run.step, **train.mean_over_ranks({"fcs": fcs, **logs}),
                         "lr_gen": opt_g.param_groups[0]["lr"], "guide_updates": v["n_guide"]}, "csd", "fcs")
            if on_step is not None and dist.is_main():  # before the checkpoint, which keeps what it returns
                run.record(on_step, ema)
            if run.due(cfg.ckpt_every):
                run.save()
            run.bar.update(1)
    guide.requires_grad_(True)
    gen.eval(), guide.eval()
    return {"history": run.history, "ema": ema, "resumed_from": run.resumed_from, "aligned": v["aligned"],
            "records": v["records"], "seconds": run.seconds()}


# ---- 3. sampling ------------------------------------------------------------------------------------------------

@torch.no_grad()
def one_step(gen: ardiff.ARDiffusion, eps: torch.Tensor, labels: torch.Tensor, tok, codebook: torch.Tensor):
    """The one-step generator's sample of noise eps [B, L, D] → (tokens [B, L]: the nearest codes, embeddings
    [B, L, D]: its continuous vectors); the argument order of `dd.probe.Probe`'s sampler."""
    x = generate(gen, tok, eps, labels)
    return flow.nearest_code(x.reshape(-1, x.shape[-1]), codebook.to(x)).view(x.shape[:2]), x


@torch.no_grad()
def sample_multistep(gen: ardiff.ARDiffusion, teacher, tok, eps: torch.Tensor, labels: torch.Tensor,
                     codebook: torch.Tensor, k: int, sampling, generator: torch.Generator | None = None):
    """DD2 Alg. 4: one generator step, then the (discrete) teacher redraws the last k − 1 AR steps with its
    ordinary sampler given the generator's prefix snapped to the nearest codes. k = 1 is the one-step generator.
    → (tokens [B, L], embeddings [B, L, D]: the generator's continuous vectors, the teacher's codes after)."""
    n_ar = len(gen.ends)
    if not 1 <= k <= n_ar:
        raise ValueError(f"sample_multistep: k must be in [1, {n_ar}], got {k}")
    tokens, x = one_step(gen, eps, labels, tok, codebook)
    if k == 1:
        return tokens, x
    cb = codebook.to(x)
    tokens = dd1.teacher_steps(teacher, tok, tokens, labels, n_ar - (k - 1), n_ar, sampling, generator)
    first = ([0, *gen.ends])[n_ar - (k - 1)]
    keep = (torch.arange(gen.L, device=x.device) < first)[None, :, None]
    return tokens, torch.where(keep, x, cb[tokens])
