"""Closed forms of the flow from Gaussian noise to a categorical distribution over codebook vectors.

One AR position: the teacher gives log-probabilities `logp` [V] over the codebook rows c_1..c_V ∈ R^D. With
eps ~ N(0, I_D), c ~ Σ_v p_v δ(c_v), and the project convention

    x_t = (1 − t)·eps + t·c,        t = 0 noise, t = 1 data,

the marginal is p_t(x) = Σ_v p_v N(x; t c_v, (1 − t)² I), and everything has a closed form through the
posterior over codes w_v(x, t) ∝ p_v N(x; t c_v, (1 − t)² I):

    posterior mean   m = E[c | x_t = x] = Σ_v w_v c_v
    velocity         v = E[c − eps | x_t = x] = (m − x) / (1 − t)
    score            s = ∇_x log p_t(x) = (t m − x) / (1 − t)²

DD1 integrates dx/dt = v from t = 0 to 1 (`flow_map`): a deterministic map eps → token whose output is
distributed exactly as p (flow matching preserves marginals). DD2 uses the score as the teacher's "real" score.

DD2 writes time the other way round (t_DD2 = 1 is noise, x = (1 − t_DD2) c + t_DD2 eps). Every function here takes
the project's t; convert once, t = 1 − t_DD2. Then the score is the same function, DD2's x̂0 is `posterior_mean`,
and DD2's velocity E[eps − c | x] is −`velocity`. DD2 Eq. (1), s = −Σ_j p_j (x − (1−t_DD2) c_j) N_j /
(t_DD2² Σ_j p_j N_j), is `score(x, 1 − t_DD2, ...)` (checked in tests/test_flow.py).

Numerics: log-weights log p_v − ‖x − t c_v‖² / (2(1 − t)²) come from one matmul with ‖x‖² dropped (it cancels
in the softmax), never a [N, V, D] broadcast; rows are processed in chunks so [chunk, V] stays bounded; `logp`
may be unnormalised and hold −inf (top-k / top-p filtered codes get zero weight and are never output).

References:
    - Liu et al., "Distilled Decoding 1" (DD1), arXiv 2412.17153: AR flow matching, noise → token map.
    - Liu et al., "Distilled Decoding 2" (DD2), arXiv 2510.21003: Eq. (1) closed-form conditional score, App. C.1.
    - Lu et al., "DPM-Solver++", arXiv 2211.01095: data-prediction multistep (2M) update used by `flow_map`.
    - microsoft/distilled_decoding (behaviour matched): snapping continuous outputs to the nearest code,
      `LlamaGen/autoregressive/sample/eval_fewstep.py`, `VAR/models/dd.py`; the unreleased "gaussian" sampling
      of `VAR.intermediate_sample` in `VAR/models/var.py` (commented out: a DPM-Solver ODE, `ode_step=200`).
"""
from __future__ import annotations

import math

import torch

N_STEPS = 64  # default ODE steps of `flow_map`; see `map_convergence` and tests/test_flow.py for why it suffices
# (up to 4096 codes; LlamaGen's 16384 × 8 normalised codebook needs 128: tests/test_flow.py, CUDA test)
LAMBDA_RANGE = (-4.0, 10.0)  # log-SNR span of the time grid, relative to −log(codebook spread)
T_CLAMP = 1e-6  # t and 1 − t are clamped to this where they divide (t = 0 or t = 1 exactly stays finite)
CHUNK = 2 ** 25  # max elements of one [rows, V] block


def _time(t, x: torch.Tensor) -> torch.Tensor:
    """float | [N] | [N, 1] → [N, 1] or [1, 1] tensor of x's dtype and device."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, 1)


def _chunks(n: int, v: int):
    step = max(1, CHUNK // max(v, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)]


def _rows(a: torch.Tensor, sl: slice) -> torch.Tensor:
    return a if a.shape[0] == 1 else a[sl]  # broadcast rows ([1, ...]) are shared by every chunk


def _logits(x: torch.Tensor, t: torch.Tensor, logp: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """[N, D], [N|1, 1], [N|1, V], [V, D] → [N, V]: log p_v − ‖x − t c_v‖² / (2(1 − t)²) + ‖x‖² / (2(1 − t)²).

    With a = t / (1 − t)², this is log p_v + a x·c_v − ½ a t ‖c_v‖²: one addmm on [a x, −½ a t] · [c_v, ‖c_v‖²].
    """
    a = t / (1 - t).clamp_min(T_CLAMP) ** 2
    xa = torch.cat([a * x, (-0.5 * a * t).expand(x.shape[0], 1)], 1)  # [N, D + 1]
    ca = torch.cat([codebook, (codebook * codebook).sum(1, keepdim=True)], 1)  # [V, D + 1]
    return torch.addmm(logp, xa, ca.T)  # load-bearing: −inf in logp stays −inf (zero weight)


def _fp(x: torch.Tensor):
    """Autocast off: logits reach (1 − t)⁻² · x·c, so half precision would scramble near-tied codes."""
    return torch.autocast(x.device.type, enabled=False)


def _prepare(x, t, logp, codebook):
    logp, codebook = logp.to(x.dtype), codebook.to(x.dtype)
    return _time(t, x), logp.reshape(-1, logp.shape[-1]), codebook


def posterior_mean(x: torch.Tensor, t, logp: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """E[c | x_t = x]: x [N, D], t float | [N] | [N, 1], logp [N, V] (or [1, V], unnormalised, −inf allowed),
    codebook [V, D] → [N, D] in x's dtype. At t = 0 it is the prior mean Σ_v p_v c_v."""
    t, logp, codebook = _prepare(x, t, logp, codebook)
    with _fp(x):
        out = [torch.softmax(_logits(x[sl], _rows(t, sl), _rows(logp, sl), codebook), -1) @ codebook
               for sl in _chunks(x.shape[0], codebook.shape[0])]
    return torch.cat(out)


def log_density(x: torch.Tensor, t, logp: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """log p_t(x) = log Σ_v p_v N(x; t c_v, (1 − t)² I) with p = softmax(logp): x [N, D] → [N]."""
    t, logp, codebook = _prepare(x, t, logp, codebook)
    D, out = x.shape[1], []
    for sl in _chunks(x.shape[0], codebook.shape[0]):
        xs, ts, lp = x[sl], _rows(t, sl), _rows(logp, sl)
        s2 = (1 - ts).clamp_min(T_CLAMP) ** 2
        with _fp(x):
            lse = torch.logsumexp(_logits(xs, ts, lp, codebook), -1) - torch.logsumexp(lp, -1)  # normalises p
        out.append(lse - (xs * xs).sum(1) / (2 * s2[:, 0]) - 0.5 * D * torch.log(2 * math.pi * s2[:, 0]))
    return torch.cat(out)


# Conversions between posterior mean m, velocity v and score s at (x [N, D], t float | [N] | [N, 1]) → [N, D].
# Those dividing by t are singular at t = 0 (where s = −x carries no information about m): t is clamped.
def velocity_from_mean(x, t, m):
    """v = (m − x) / (1 − t)."""
    return (m - x) / (1 - _time(t, x)).clamp_min(T_CLAMP)


def mean_from_velocity(x, t, v):
    """m = x + (1 − t) v."""
    return x + (1 - _time(t, x)) * v


def score_from_mean(x, t, m):
    """s = (t m − x) / (1 − t)²."""
    t = _time(t, x)
    return (t * m - x) / (1 - t).clamp_min(T_CLAMP) ** 2


def mean_from_score(x, t, s):
    """m = (x + (1 − t)² s) / t."""
    t = _time(t, x)
    return (x + (1 - t) ** 2 * s) / t.clamp_min(T_CLAMP)


def score_from_velocity(x, t, v):
    """s = (t v − x) / (1 − t)."""
    t = _time(t, x)
    return (t * v - x) / (1 - t).clamp_min(T_CLAMP)


def velocity_from_score(x, t, s):
    """v = (x + (1 − t) s) / t."""
    t = _time(t, x)
    return (x + (1 - t) * s) / t.clamp_min(T_CLAMP)


def velocity(x: torch.Tensor, t, logp: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Flow-matching velocity E[c − eps | x_t = x] = (m − x) / (1 − t): [N, D] → [N, D]."""
    return velocity_from_mean(x, t, posterior_mean(x, t, logp, codebook))


def score(x: torch.Tensor, t, logp: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Exact score ∇_x log p_t(x) = (t m − x) / (1 − t)²: [N, D] → [N, D].

    DD2's real score s_Φ(x, t_DD2) is score(x, 1 − t_DD2, ...)."""
    return score_from_mean(x, t, posterior_mean(x, t, logp, codebook))


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, logp: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_v ‖x − c_v‖² over codes with finite logp (all codes if logp is None): [N, D] → LongTensor [N]."""
    codebook = codebook.to(x.dtype)
    V = codebook.shape[0]
    logp = x.new_zeros(1, V) if logp is None else logp.reshape(-1, V)
    # ‖x − c‖² = ‖x‖² − 2(x·c − ½‖c‖²): maximise x·c − ½‖c‖², one addmm per chunk as in `_logits`
    xa = torch.cat([x, x.new_full((x.shape[0], 1), -0.5)], 1)  # [N, D + 1]
    ca = torch.cat([codebook, (codebook * codebook).sum(1, keepdim=True)], 1)  # [V, D + 1]
    out = []
    for sl in _chunks(x.shape[0], V):
        lp = _rows(logp, sl)
        masked = torch.zeros(lp.shape, dtype=x.dtype, device=x.device).masked_fill(~torch.isfinite(lp), -math.inf)
        with _fp(x):
            out.append(torch.addmm(masked, xa[sl], ca.T).argmax(-1))
    return torch.cat(out)


def time_grid(n_steps: int, codebook: torch.Tensor) -> list[float]:
    """n_steps + 1 times 0 = t_0 < ... < t_n = 1 for `flow_map`, uniform in log-SNR λ = log(t / (1 − t)).

    Why not uniform in t: a code pair at distance δ is told apart when t / (1 − t) ≈ 1 / δ, so the decisions are
    spread evenly over log-SNR, from the codebook's spread R down to its closest pairs; a uniform t grid ends at
    1 − t = 1 / n and leaves close codes unresolved (a measurable bias in the token frequencies). The interior points
    span λ ∈ LAMBDA_RANGE − log R, R = max_v ‖c_v − mean‖ (translation-invariant: the posterior only sees
    differences of codes), i.e. from "nothing resolved" to code pairs ~1e-3 R apart.
    """
    if n_steps < 1:
        raise ValueError(f"flow.time_grid: n_steps must be >= 1, got {n_steps}")
    cb = codebook.double()
    spread = (cb - cb.mean(0)).norm(dim=1).max().clamp_min(1e-12).item()
    lo, hi = (lam - math.log(spread) for lam in LAMBDA_RANGE)
    shift = min(0.0, 30.0 - hi) + max(0.0, -30.0 - lo)  # keep t < 1 in float64 (a single code has spread 0)
    lam = torch.linspace(lo + shift, hi + shift, n_steps - 1, dtype=torch.float64)
    return [0.0] + torch.sigmoid(lam).tolist() + [1.0]


@torch.no_grad()
def flow_map(eps: torch.Tensor, logp: torch.Tensor, codebook: torch.Tensor, n_steps: int = N_STEPS) -> torch.Tensor:
    """DD1's deterministic noise → token map: solve dx/dt = v(x, t) from x_0 = eps to t = 1, then snap to the
    nearest code with finite logp. eps [..., D], logp [..., V] (or [V], shared; unnormalised, −inf allowed),
    codebook [V, D] → LongTensor [...] of code indices.

    Solver: DPM-Solver++(2M) in data prediction on `time_grid`. A step t → s is
    x_s = ((1 − s) x_t + (s − t) d) / (1 − t) with d = m_t + (m_t − m_prev) / (2r), r = h_prev / h (h: log-SNR
    steps); it is exact when m is constant, stable up to t = 1 (its last step returns d), and first order (d = m_t)
    on the first step (λ_0 = −∞) and the last (h = ∞). Second order cuts the frequency bias several-fold at equal
    cost (one posterior mean per step). Codes filtered out in every row are dropped first, so top-k costs O(k),
    not O(V). For float32 on GPU keep TF32 matmuls off (the default): the logits scale like (1 − t)⁻².
    """
    V, D = codebook.shape
    lead = eps.shape[:-1]
    x, logp = eps.reshape(-1, D), logp.reshape(-1, V)
    keep = torch.isfinite(logp).any(0).nonzero()[:, 0]  # union of the rows' supports
    if keep.numel() < V:
        logp, codebook = logp[:, keep], codebook[keep]
    ts = time_grid(n_steps, codebook)
    lam = [math.log(t / (1 - t)) if 0 < t < 1 else None for t in ts]
    m_prev = None
    for k in range(n_steps):
        t, s = ts[k], ts[k + 1]
        m = posterior_mean(x, t, logp, codebook)
        d = m
        if m_prev is not None and lam[k - 1] is not None and lam[k + 1] is not None:
            r = (lam[k] - lam[k - 1]) / (lam[k + 1] - lam[k])
            d = m + (m - m_prev) / (2 * r)
        x = ((1 - s) * x + (s - t) * d) / (1 - t)
        m_prev = m
    idx = nearest_code(x, codebook, logp)
    return (keep[idx] if keep.numel() < V else idx).reshape(lead)


def map_convergence(eps: torch.Tensor, logp: torch.Tensor, codebook: torch.Tensor,
                    n_steps: tuple[int, ...] = (8, 16, 32, 64, 128), reference_steps: int | None = None) -> dict:
    """How the token map depends on n_steps, against a `reference_steps` solve of the same eps [N, D] (default:
    8 × the most steps compared, 1024 for the default n_steps): {n: {"agreement": share of eps mapped to the same
    token, "tv": total variation between the two token histograms}}. Agreement measures the map, tv the (cheaper
    to get right) distribution."""
    V = codebook.shape[0]
    ref = flow_map(eps, logp, codebook, reference_steps or 8 * max(n_steps))
    h_ref = torch.bincount(ref.flatten(), minlength=V).double() / ref.numel()
    out = {}
    for n in n_steps:
        q = flow_map(eps, logp, codebook, n)
        h = torch.bincount(q.flatten(), minlength=V).double() / q.numel()
        out[n] = {"agreement": (q == ref).double().mean().item(), "tv": 0.5 * (h - h_ref).abs().sum().item()}
    return out
