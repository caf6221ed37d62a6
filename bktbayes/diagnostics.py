"""Convergence diagnostics vectorised over parameters.

Rank-normalised split R-hat and bulk/tail effective sample sizes (Vehtari,
Gelman, Simpson, Carpenter and Buerkner 2021), computed exactly as ArviZ
computes them (``arviz.rhat``, ``arviz.ess(method="bulk" | "tail")``; the
tests compare the two to rounding), but for every parameter at once:
ArviZ applies its algorithm one parameter at a time in Python, about 4 ms
per parameter and method, which on a 110-skill model was 4 s of every fit.

Plain functions over arrays of shape ``(n_chains, n_draws, n_params)``.

:func:`skill_modes` looks where those diagnostics cannot: for the local
maxima of each skill's posterior given the population parameters, and the
share of that posterior each one holds. A fit whose chains all stay in one
mode passes R-hat while missing the others.
"""

from __future__ import annotations

import numpy as np
from scipy.fft import next_fast_len
from scipy.special import ndtri

__all__ = ["ess_bulk", "ess_tail", "rhat_rank", "skill_modes"]

_RESOLUTION = np.finfo(float).resolution


# Internally draws are laid out (n_params, n_chains, n_draws), C-contiguous:
# sorting and transforms then run along contiguous rows.


def _split(x: np.ndarray) -> np.ndarray:
    """Split each chain in two halves (the middle draw of an odd count dropped)."""
    half = x.shape[2] // 2
    return np.concatenate([x[:, :, :half], x[:, :, x.shape[2] - half :]], axis=1)


def _z_scale(x: np.ndarray) -> np.ndarray:
    """Normal scores of the pooled ranks (ties averaged; Blom's offset 3/8),
    per parameter: what ``scipy.stats.rankdata(method="average")`` followed
    by ``norm.ppf`` gives, from one unstable sort per row and a table of the
    2n possible scores (an average rank is a multiple of 1/2)."""
    p, c, d = x.shape
    n = c * d
    flat = x.reshape(p, n)
    order = np.argsort(flat, axis=1)
    srt = np.take_along_axis(flat, order, axis=1)
    pos = np.broadcast_to(np.arange(n), (p, n))
    new_run = np.ones((p, n), dtype=bool)
    new_run[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = np.maximum.accumulate(np.where(new_run, pos, 0), axis=1)
    end_run = np.ones((p, n), dtype=bool)
    end_run[:, :-1] = new_run[:, 1:]
    last = np.minimum.accumulate(np.where(end_run, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    # average rank (first + last) / 2 + 1, indexed by twice that value
    table = ndtri((np.arange(2 * n + 1) / 2.0 - 0.375) / (n - 0.75 + 1))
    z = np.empty((p, n))
    np.put_along_axis(z, order, table[first + last + 2], axis=1)
    return z.reshape(p, c, d)


def _rhat(x: np.ndarray) -> np.ndarray:
    n = x.shape[2]
    between = n * np.var(x.mean(axis=2), axis=1, ddof=1)
    within = np.var(x, axis=2, ddof=1).mean(axis=1)
    return np.sqrt((between / within + n - 1) / n)


def rhat_rank(x: np.ndarray) -> np.ndarray:
    """Rank-normalised split R-hat (the larger of bulk and folded).

    Parameters
    ----------
    x : float array, shape (n_chains, n_draws, n_params)

    Returns
    -------
    float array, shape (n_params,)
    """
    x, bad = _check(x)
    if x.shape[1] < 2:
        return np.full(x.shape[0], np.nan)
    s = _split(x)
    bulk = _rhat(_z_scale(s))
    folded = np.abs(s - np.median(s.reshape(s.shape[0], -1), axis=1)[:, None, None])
    out = np.maximum(bulk, _rhat(_z_scale(folded)))
    out[bad] = np.nan
    return out


def _ess(x: np.ndarray) -> np.ndarray:
    """Geyer's initial monotone sequence estimator, per parameter (the
    arrays already split and transformed)."""
    n_par, n_chain, n_draw = x.shape
    const = (x.max(axis=(1, 2)) - x.min(axis=(1, 2))) < _RESOLUTION
    m = next_fast_len(2 * n_draw)
    chain_mean = x.mean(axis=2, keepdims=True)
    f = np.fft.rfft(x - chain_mean, n=m, axis=2)
    acov = np.fft.irfft(f * np.conjugate(f), n=m, axis=2)[:, :, :n_draw] / n_draw
    mean_var = acov[:, :, 0].mean(axis=1) * n_draw / (n_draw - 1.0)
    var_plus = mean_var * (n_draw - 1.0) / n_draw
    if n_chain > 1:
        var_plus = var_plus + np.var(chain_mean[:, :, 0], axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = 1.0 - (mean_var[:, None] - acov.mean(axis=1)) / var_plus[:, None]
    out = np.empty(n_par)
    n_total = n_chain * n_draw
    for j in range(n_par):
        out[j] = _geyer(rho[j], n_draw, n_total)
    out[const] = n_total
    return out


def _geyer(rho: np.ndarray, n_draw: int, n_total: int) -> float:
    """ArviZ's truncation (initial positive sequence) and monotone adjustment
    of one autocorrelation sequence, line for line; ``rho`` is precomputed
    for every lag, so the loop is scalar work only."""
    rho_t = np.zeros(n_draw)
    rho_even = 1.0
    rho_odd = rho[1]
    rho_t[0] = rho_even
    rho_t[1] = rho_odd
    t = 1
    while t < n_draw - 3 and (rho_even + rho_odd) > 0.0:
        rho_even = rho[t + 1]
        rho_odd = rho[t + 2]
        if (rho_even + rho_odd) >= 0:
            rho_t[t + 1] = rho_even
            rho_t[t + 2] = rho_odd
        t += 2
    max_t = t - 2
    if rho_even > 0:
        rho_t[max_t + 1] = rho_even
    t = 1
    while t <= max_t - 2:
        if (rho_t[t + 1] + rho_t[t + 2]) > (rho_t[t - 1] + rho_t[t]):
            rho_t[t + 1] = (rho_t[t - 1] + rho_t[t]) / 2.0
            rho_t[t + 2] = rho_t[t + 1]
        t += 2
    if np.isnan(rho_t).any():
        return np.nan
    tau = -1.0 + 2.0 * rho_t[: max_t + 1].sum() + rho_t[max_t + 1 : max_t + 2].sum()
    tau = max(tau, 1.0 / np.log10(n_total))
    return n_total / tau


def ess_bulk(x: np.ndarray) -> np.ndarray:
    """Bulk effective sample size (rank-normalised split chains).

    Parameters
    ----------
    x : float array, shape (n_chains, n_draws, n_params)

    Returns
    -------
    float array, shape (n_params,)
    """
    x, bad = _check(x)
    out = _ess(_z_scale(_split(x)))
    out[bad] = np.nan
    return out


def ess_tail(x: np.ndarray, prob: float = 0.89) -> np.ndarray:
    """Tail effective sample size: the smaller of the ESS of the indicators
    ``x <= q`` at the quantiles ``min(prob, 1 - prob)`` and
    ``max(prob, 1 - prob)`` (ArviZ's ``ess(method="tail", prob=prob)``; 0.89
    is ArviZ 1's default ``stats.ci_prob``).

    Parameters
    ----------
    x : float array, shape (n_chains, n_draws, n_params)
    prob : float

    Returns
    -------
    float array, shape (n_params,)
    """
    x, bad = _check(x)
    lo, hi = sorted((prob, 1.0 - prob))
    q = np.quantile(x.reshape(x.shape[0], -1), [lo, hi], axis=1)
    e_lo = _ess(_split((x <= q[0][:, None, None]).astype(float)))
    e_hi = _ess(_split((x <= q[1][:, None, None]).astype(float)))
    out = np.minimum(e_lo, e_hi)
    out[bad] = np.nan
    return out


def _check(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The draws as floats, and which parameters have a nan (their
    diagnostics are nan, as in ArviZ); nan draws are zeroed so that the
    others are unaffected."""
    x = np.asarray(x, dtype=float)
    if x.ndim != 3:
        raise ValueError(f"draws must have shape (n_chains, n_draws, n_params), got {x.shape}")
    if x.shape[1] < 4:
        raise ValueError(f"diagnostics need at least 4 draws per chain, got {x.shape[1]}")
    x = np.ascontiguousarray(x.transpose(2, 0, 1))
    bad = np.isnan(x).any(axis=(1, 2))
    if bad.any():
        x = np.where(np.isnan(x), 0.0, x)
    return x, bad


def _replicated_layout(correct: np.ndarray, seq_len: np.ndarray, n_rep: int):
    """Lockstep layout of one skill's sequences repeated ``n_rep`` times,
    replica r as "skill" r (so that one kernel call evaluates n_rep
    parameter vectors)."""
    from .likelihood import LIKELIHOOD_BLOCK_SIZE
    from .packing import pack_codes

    n_seq, n_obs = seq_len.size, correct.size
    seq = np.repeat(np.arange(n_seq * n_rep), np.tile(seq_len, n_rep))
    rep = np.repeat(np.arange(n_rep), n_obs)
    pk = pack_codes(
        seq,
        rep,
        np.arange(n_obs * n_rep),
        np.tile(correct, n_rep),
        n_skill=n_rep,
        block_size=LIKELIHOOD_BLOCK_SIZE,
    )
    return (pk.lock_correct, pk.block_seq, pk.block_ev, pk.step_ptr, pk.step_count), pk.seq_skill


def skill_modes(
    correct: np.ndarray,
    seq_len: np.ndarray,
    seq_skill: np.ndarray,
    prior_mean: np.ndarray,
    prior_sd: np.ndarray,
    x0: np.ndarray,
    *,
    gs_mode: int,
    n_samples: int = 4000,
    spread: float = 1.5,
    min_separation: float = 0.5,
    seed: int = 0,
    max_obs_per_call: int = 8_000_000,
) -> dict:
    """Local maxima of each skill's conditional posterior and their shares.

    Given the population means and scales of the logits, a skill's logits
    have the density ``p(y_s | x) N(x | prior_mean, prior_sd)``, a function
    of 4 (or 5) numbers. Block Newton (:func:`bktbayes.likelihood.skill_newton`)
    climbs it from three starts per skill: ``x0`` and the two ends of BKT's
    identifiability ridge (Beck and Chang 2007): low p_init with high
    p_transit ("learns at the first attempt") and the reverse ("knew it
    already"), each ``spread`` population sds from the mean. Maxima further
    apart than ``min_separation`` (logit units, any coordinate) with a
    negative definite Hessian are distinct modes. For skills with two or
    more, the share of each is estimated by importance sampling from an
    equal mixture of multivariate t (4 degrees of freedom, covariance twice
    the Laplace covariance) centred on the modes; samples count towards the
    mode nearest in Mahalanobis distance.

    Parameters
    ----------
    correct : uint8 array, shape (n_obs,)
        Responses, sequence after sequence.
    seq_len : int64 array, shape (n_seqs,)
    seq_skill : int64 array, shape (n_seqs,)
        Skill index of each sequence.
    prior_mean, prior_sd : float64 arrays, shape (n_par,)
        Population mean and sd of each logit group (init, transit, guess,
        slip[, forget]), e.g. posterior means of a hierarchical fit.
    x0 : float64 array, shape (n_par, n_skills)
        A start per skill (e.g. the fast estimate's logits).
    gs_mode : int
        Guess/slip parametrisation (see :func:`bktbayes.likelihood.skill_logp_grad`).
    n_samples : int
        Importance samples per multimodal skill.
    seed : int
        Seed of the importance samples (same seed, same shares).

    Returns
    -------
    dict
        ``n_modes`` (n_skills,); ``logits`` (n_skills, 3, n_par) and
        ``log_density`` (n_skills, 3) of the distinct modes, best first
        (nan-padded), with ``cov`` (n_skills, 3, n_par, n_par) the Laplace
        covariance at each; ``valley`` (n_skills, 3): nats from each other mode
        down to the lowest point of the straight segment joining it to the
        main mode (an upper bound on the lowest pass; nan for the main
        mode); ``share`` (n_skills, 3) (1 for unimodal skills) and ``ess``
        (n_skills,) of the importance samples (nan for unimodal skills).
    """
    from scipy.stats import multivariate_t

    from .likelihood import LIKELIHOOD_BLOCK_SIZE, skill_logp_grad, skill_newton
    from .packing import pack_codes

    correct = np.ascontiguousarray(correct, dtype=np.uint8)
    seq_len = np.asarray(seq_len, dtype=np.int64)
    seq_skill = np.asarray(seq_skill, dtype=np.int64)
    x0 = np.asarray(x0, dtype=float)
    n_par, n_skill = x0.shape
    mu = np.asarray(prior_mean, dtype=float).reshape(n_par, 1)
    sd = np.asarray(prior_sd, dtype=float).reshape(n_par, 1)
    if correct.size != seq_len.sum() or seq_skill.size != seq_len.size:
        raise ValueError(
            "correct must hold sum(seq_len) responses and seq_skill one skill per sequence"
        )
    if np.any(sd <= 0):
        raise ValueError(f"prior_sd must be positive, got {sd.ravel()}")
    ridge = 1.0 / sd**2
    pk = pack_codes(
        np.repeat(np.arange(seq_len.size), seq_len),
        np.repeat(seq_skill, seq_len),
        np.arange(correct.size),
        correct,
        n_skill=n_skill,
        block_size=LIKELIHOOD_BLOCK_SIZE,
    )
    layout = (pk.lock_correct, pk.block_seq, pk.block_ev, pk.step_ptr, pk.step_count)

    def logpost(lay, sk, x):
        lp = np.zeros(x.shape[1])
        g = np.zeros_like(x)
        skill_logp_grad(*lay, sk, np.ascontiguousarray(x), gs_mode, lp, g)
        return lp - 0.5 * (ridge * (x - mu) ** 2).sum(axis=0), g - ridge * (x - mu)

    starts = [x0]
    for sign in (-1.0, 1.0):
        x = x0.copy()
        x[0] = mu[0, 0] + sign * spread * sd[0, 0]
        x[1] = mu[1, 0] - sign * spread * sd[1, 0]
        starts.append(x)
    sols, vals, negdef = [], [], []
    h = 1e-5
    for x in starts:
        res = skill_newton(
            layout, pk.seq_skill, x, gs_mode=gs_mode, ridge=ridge, prior_mean=mu, max_iter=60
        )
        xs = res["x"]
        v, g = logpost(layout, pk.seq_skill, xs)
        hess = np.empty((n_skill, n_par, n_par))
        for k in range(n_par):
            xk = xs.copy()
            xk[k] += h
            hess[:, :, k] = ((logpost(layout, pk.seq_skill, xk)[1] - g) / h).T
        hess = 0.5 * (hess + hess.transpose(0, 2, 1))
        negdef.append(np.linalg.eigvalsh(hess).max(axis=1) < 0)
        sols.append((xs, hess))
        vals.append(v)

    k_max = len(starts)
    logits = np.full((n_skill, k_max, n_par), np.nan)
    log_density = np.full((n_skill, k_max), np.nan)
    covs = np.full((n_skill, k_max, n_par, n_par), np.nan)
    n_modes = np.zeros(n_skill, dtype=np.int64)
    order = np.argsort(-np.stack(vals), axis=0)  # best start first, per skill
    for s in range(n_skill):
        for j in order[:, s]:
            if not negdef[j][s]:
                continue
            xs = sols[j][0][:, s]
            k = n_modes[s]
            if k and np.any(np.abs(logits[s, :k] - xs).max(axis=1) < min_separation):
                continue
            logits[s, k] = xs
            log_density[s, k] = vals[j][s]
            covs[s, k] = np.linalg.inv(-sols[j][1][s])
            n_modes[s] += 1
    share = np.full((n_skill, k_max), np.nan)
    share[n_modes == 1, 0] = 1.0
    ess = np.full(n_skill, np.nan)
    valley = np.full((n_skill, k_max), np.nan)
    rng = np.random.default_rng(seed)
    seq_start = np.concatenate([[0], np.cumsum(seq_len)[:-1]])
    for s in np.flatnonzero(n_modes >= 2):
        k = n_modes[s]
        comps = [multivariate_t(loc=logits[s, j], shape=2.0 * covs[s, j], df=4) for j in range(k)]
        lab = rng.integers(0, k, n_samples)
        z = np.empty((n_samples, n_par))
        for j in range(k):
            if not np.any(lab == j):
                continue
            z[lab == j] = (
                comps[j].rvs(size=int((lab == j).sum()), random_state=rng).reshape(-1, n_par)
            )
        logq = np.logaddexp.reduce([c.logpdf(z) for c in comps], axis=0) - np.log(k)
        mine = np.flatnonzero(seq_skill == s)
        lens = seq_len[mine]
        y = np.concatenate([correct[seq_start[i] : seq_start[i] + seq_len[i]] for i in mine])
        chunk = max(1, min(n_samples, max_obs_per_call // max(y.size, 1)))
        lp = np.empty(n_samples)
        lay, n_rep = None, 0
        for a in range(0, n_samples, chunk):
            b = min(a + chunk, n_samples)
            if lay is None or b - a != n_rep:
                n_rep = b - a
                lay, sk = _replicated_layout(y, lens, n_rep)
            lp[a:b] = logpost(lay, sk, z[a:b].T)[0]
        # The lowest point of the straight segment from the main mode to
        # each other one: how deep a valley a chain must cross (the best
        # path can only be shallower).
        t = np.linspace(0.0, 1.0, 41)
        seg = np.concatenate(
            [logits[s, 0] + t[:, None] * (logits[s, j] - logits[s, 0]) for j in range(1, k)]
        )
        lay_t, sk_t = _replicated_layout(y, lens, seg.shape[0])
        lp_t = logpost(lay_t, sk_t, seg.T)[0].reshape(k - 1, t.size)
        valley[s, 1:k] = log_density[s, 1:k] - lp_t.min(axis=1)
        lw = lp - logq
        w = np.exp(lw - lw.max())
        w /= w.sum()
        ess[s] = 1.0 / np.sum(w**2)
        maha = np.stack(
            [
                np.einsum(
                    "ni,ij,nj->n", z - logits[s, j], np.linalg.inv(covs[s, j]), z - logits[s, j]
                )
                for j in range(k)
            ]
        )
        near = np.argmin(maha, axis=0)
        share[s, :k] = np.bincount(near, weights=w, minlength=k)
    return {
        "n_modes": n_modes,
        "logits": logits,
        "log_density": log_density,
        "cov": covs,
        "valley": valley,
        "share": share,
        "ess": ess,
    }
