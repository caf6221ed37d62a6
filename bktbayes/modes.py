"""Modes of a skill's posterior given the population parameters.

In the per-skill models (no student or item effects) skills are independent
given the population means and scales, so each skill's posterior is a
density of 4 (or 5) logits that is cheap to explore. BKT's identifiability
problem (Beck and Chang 2007) can give it two modes: students who already
know the skill and rarely learn it, or who start unmastered and learn at
once. NUTS crosses a shallow valley between them freely and a deep one
rarely, so a fit can hold a minor mode in none of its draws, or in one
chain's many, while R-hat sees only the second case.

:func:`skill_modes` finds the modes and the share of each;
:func:`mode_jumps` moves draws between them with an independence Metropolis
kernel that leaves each skill's conditional posterior invariant.

Plain functions over arrays; the kernels are
:func:`bktbayes.likelihood.skill_logp_grad` and
:func:`bktbayes.likelihood.skill_newton`.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

__all__ = [
    "collapse_nodes",
    "collapsed_logp_grad",
    "exp_nonpositive",
    "mode_jumps",
    "nearest_mode",
    "skill_loglik_many",
    "skill_modes",
    "skill_responses",
]


def skill_responses(
    correct: np.ndarray, seq_len: np.ndarray, seqs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The responses and lengths of the sequences ``seqs``.

    Parameters
    ----------
    correct : uint8 array, shape (n_obs,)
        Responses, sequence after sequence.
    seq_len : int64 array, shape (n_seqs,)
    seqs : int array
        Indices of the sequences wanted, in the order wanted.

    Returns
    -------
    y : uint8 array, shape (sum of their lengths,)
    lens : int64 array, shape (len(seqs),)
    """
    seq_len = np.asarray(seq_len, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(seq_len)[:-1]])
    lens = seq_len[seqs]
    idx = np.repeat(starts[seqs] - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
    return np.asarray(correct)[idx], lens


def nearest_mode(x: np.ndarray, modes: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """Index of the mode nearest each point in Mahalanobis distance.

    ``x`` (n, n_par); ``modes`` (k, n_par); ``covs`` (k, n_par, n_par).
    """
    d = [
        np.einsum("ni,ij,nj->n", x - m, np.linalg.inv(c), x - m)
        for m, c in zip(modes, covs, strict=True)
    ]
    return np.argmin(d, axis=0)


def _valley(y, lens, modes: np.ndarray, log_density: np.ndarray, gs_mode: int, prior) -> np.ndarray:
    """Nats from each mode after the first down to the lowest of 41 points
    on the straight segment joining it to the first (``prior(x)``: the log
    prior density at points x, shape (n, n_par))."""
    k = modes.shape[0]
    t = np.linspace(0.0, 1.0, 41)
    seg = np.concatenate([modes[0] + t[:, None] * (modes[j] - modes[0]) for j in range(1, k)])
    lp = skill_loglik_many(y, lens, seg, gs_mode=gs_mode) + prior(seg)
    return log_density[1:k] - lp.reshape(k - 1, t.size).min(axis=1)


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
        Importance samples per multimodal skill (0: no shares, nan).
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

    def prior(x):  # x: (n, n_par)
        return -0.5 * (ridge.T * (x - mu.T) ** 2).sum(axis=1)

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
    for s in np.flatnonzero(n_modes >= 2):
        k = n_modes[s]
        if n_samples <= 0:
            y, lens = skill_responses(correct, seq_len, np.flatnonzero(seq_skill == s))
            valley[s, 1:k] = _valley(y, lens, logits[s, :k], log_density[s, :k], gs_mode, prior)
            continue
        rvs, logq_fn = _t_mixture(logits[s, :k], covs[s, :k], 4.0, 2.0)
        z = rvs(n_samples, rng)
        logq = logq_fn(z)
        y, lens = skill_responses(correct, seq_len, np.flatnonzero(seq_skill == s))
        lp = skill_loglik_many(y, lens, z, gs_mode=gs_mode) + prior(z)
        # The lowest point of the straight segment from the main mode to
        # each other one: how deep a valley a chain must cross (the best
        # path can only be shallower).
        valley[s, 1:k] = _valley(y, lens, logits[s, :k], log_density[s, :k], gs_mode, prior)
        lw = lp - logq
        w = np.exp(lw - lw.max())
        w /= w.sum()
        ess[s] = 1.0 / np.sum(w**2)
        near = nearest_mode(z, logits[s, :k], covs[s, :k])
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


def _t_mixture(modes: np.ndarray, covs: np.ndarray, df: float, scale: float):
    """Sampler and log density of an equal mixture of multivariate t."""
    from scipy.stats import multivariate_t

    comps = [
        multivariate_t(loc=m, shape=scale * c, df=df) for m, c in zip(modes, covs, strict=True)
    ]

    def logpdf(z):
        return np.logaddexp.reduce([c.logpdf(z) for c in comps], axis=0) - np.log(len(comps))

    def rvs(n, rng):
        lab = rng.integers(0, len(comps), n)
        z = np.empty((n, modes.shape[1]))
        for j, c in enumerate(comps):
            if np.any(lab == j):
                z[lab == j] = c.rvs(size=int((lab == j).sum()), random_state=rng).reshape(
                    -1, modes.shape[1]
                )
        return z

    return rvs, logpdf


def mode_jumps(
    correct: np.ndarray,
    seq_len: np.ndarray,
    logits: np.ndarray,
    prior_mean: np.ndarray,
    prior_sd: np.ndarray,
    modes: np.ndarray,
    covs: np.ndarray,
    *,
    gs_mode: int,
    n_steps: int = 20,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Move one skill's draws between its modes: independence Metropolis.

    Each draw's logits take ``n_steps`` independence Metropolis steps whose
    proposal is an equal mixture of multivariate t (4 degrees of freedom,
    covariance twice the Laplace covariance) centred on ``modes``, and whose
    target is the skill's posterior given that draw's population
    (``prior_mean``, ``prior_sd``): ``p(y_s | x) N(x | mean, sd)``. The
    kernel leaves that conditional invariant whatever the proposal, so a
    draw from the joint posterior stays one; a draw whose chain could not
    cross to the other mode is given the mode's proper weight. Draws are
    independent of each other; the same seed gives the same result.

    Parameters
    ----------
    correct : uint8 array, shape (n_obs,)
        The skill's responses, sequence after sequence.
    seq_len : int64 array, shape (n_seqs,)
    logits : float64 array, shape (n_draws, n_par)
        The draws' logits (init, transit, guess, slip[, forget]).
    prior_mean, prior_sd : float64 arrays, shape (n_draws, n_par)
        Each draw's population mean and sd of the logits.
    modes : float64 array, shape (k, n_par)
    covs : float64 array, shape (k, n_par, n_par)
        Modes and their Laplace covariances (from :func:`skill_modes`).
    gs_mode : int
        Guess/slip parametrisation.

    Returns
    -------
    logits : float64 array, shape (n_draws, n_par)
    accept : float64 array, shape (n_draws,)
        Share of each draw's proposals accepted.
    """

    x = np.array(logits, dtype=float, copy=True)
    n_draw = x.shape[0]
    mean = np.broadcast_to(np.asarray(prior_mean, dtype=float), x.shape)
    sd = np.broadcast_to(np.asarray(prior_sd, dtype=float), x.shape)
    if np.any(sd <= 0):
        raise ValueError("prior_sd must be positive")
    correct = np.ascontiguousarray(correct, dtype=np.uint8)
    seq_len = np.asarray(seq_len, dtype=np.int64)
    rng = np.random.default_rng(seed)
    rvs, logq = _t_mixture(np.asarray(modes, float), np.asarray(covs, float), 4.0, 2.0)

    def logpost(z):
        lp = skill_loglik_many(correct, seq_len, z, gs_mode=gs_mode)
        return lp - 0.5 * (((z - mean) / sd) ** 2).sum(axis=1)

    w = logpost(x) - logq(x)
    accepted = np.zeros(n_draw)
    for _ in range(n_steps):
        z = rvs(n_draw, rng)
        wz = logpost(z) - logq(z)
        take = np.log(rng.uniform(size=n_draw)) < wz - w
        x[take] = z[take]
        w[take] = wz[take]
        accepted += take
    return x, accepted / max(n_steps, 1)


def skill_loglik_many(
    correct: np.ndarray, seq_len: np.ndarray, logits: np.ndarray, *, gs_mode: int
) -> np.ndarray:
    """Log-likelihood of one skill's sequences at many parameter vectors.

    Parameters
    ----------
    correct : uint8 array, shape (n_obs,)
        The skill's responses, sequence after sequence.
    seq_len : int64 array, shape (n_seqs,)
    logits : float64 array, shape (n_points, n_par)

    Returns
    -------
    float64 array, shape (n_points,)
        Nats.
    """
    from .likelihood import points_logp

    x = np.ascontiguousarray(np.asarray(logits, dtype=float).T)
    seq_len = np.asarray(seq_len, dtype=np.int64)
    seq_start = np.concatenate([[0], np.cumsum(seq_len)[:-1]]).astype(np.int64)
    out = np.empty(x.shape[1])
    points_logp(np.ascontiguousarray(correct, dtype=np.uint8), seq_start, seq_len, x, gs_mode, out)
    return out


_JIT = {"cache": True, "nogil": True, "error_model": "numpy", "fastmath": {"contract"}}
# fdlibm's exp (e_exp.c): x = k ln2 + r with |r| <= ln2 / 2,
# exp(r) = 1 + 2 r / (2 - R(r)); within 1 ulp of the correctly rounded value.
_INV_LN2 = 1.44269504088896338700e00
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_EP1 = 1.66666666666666019037e-01
_EP2 = -2.77777777770155933842e-03
_EP3 = 6.61375632143793436117e-05
_EP4 = -1.65339022054652515390e-06
_EP5 = 4.13813679705723846039e-08
# Adding 1.5 * 2^52 rounds a double of magnitude below 2^51 to an integer,
# which then sits in the low bits of the sum's representation.
_ROUND = 6755399441055744.0
_ROUND_BITS = 0x4338000000000000
# Below this exp(x) < 1e-304: set to 0 (2^k stays a normal number above it).
_EXP_FLOOR = -700.0


@nb.njit(**_JIT)
def exp_nonpositive(x, out, scratch):
    """``exp(x)`` for ``x <= 0``, vectorised (``out`` is returned).

    libm's ``exp`` is a call LLVM cannot vectorise (~9 ns each here); this is
    fdlibm's algorithm with the power of two built from bit fields, which
    vectorises (~2 ns per element) and is within 1 ulp. Values below -700
    (``exp`` < 1e-304) give 0 and nan gives nan (a failed likelihood then
    shows as a non-finite total); ``x`` must not be positive.

    Parameters
    ----------
    x, out, scratch : float64 arrays, shape (n,)
        ``scratch`` is overwritten.
    """
    n = x.shape[0]
    si = scratch.view(np.int64)
    oi = out.view(np.int64)
    for j in range(n):
        scratch[j] = max(x[j], _EXP_FLOOR) * _INV_LN2 + _ROUND
    for j in range(n):
        v = max(x[j], _EXP_FLOOR)
        kd = scratch[j] - _ROUND
        hi = v - kd * _LN2_HI
        lo = kd * _LN2_LO
        r = hi - lo
        t = r * r
        c = r - t * (_EP1 + t * (_EP2 + t * (_EP3 + t * (_EP4 + t * _EP5))))
        y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
        oi[j] = (si[j] - _ROUND_BITS + 1023) << 52
        out[j] = y * out[j] * (1.0 if x[j] >= _EXP_FLOOR else 0.0)
    return out


# Reassociation lets LLVM vectorise the sums over nodes (their order, not
# their value, then depends on the vector width).
@nb.njit(**{**_JIT, "fastmath": {"contract", "reassoc"}})
def collapsed_logp_grad(nodes_t, c, start, mean, sd, grad):
    """Collapsed skills' likelihood with their logits integrated out, and its
    gradient with respect to the population means and scales.

    For skill ``k`` with nodes ``x_j`` and ``c_j`` (:func:`collapse_nodes`),
    ``log (1/N_k) sum_j exp(c_j) N(x_j | mean, sd)`` (independent normals
    over the parameters), summed over skills. A skill's nodes are the
    columns ``start[k]:start[k + 1]``.

    Parameters
    ----------
    nodes_t : float64 array, shape (n_par, n_nodes)
        Logits of every skill's nodes, one row per parameter group.
    c : float64 array, shape (n_nodes,)
    start : int64 array, shape (n_skills + 1,)
    mean, sd : float64 arrays, shape (n_par,)
        Population means and scales of the logits.
    grad : float64 array, shape (2, n_par)
        Overwritten: derivatives with respect to ``mean`` (row 0) and ``sd``.

    Returns
    -------
    float
        Nats.
    """
    n_par, n = nodes_t.shape
    inv = 1.0 / sd
    e = c.copy()
    for g in range(n_par):
        m, iv = mean[g], inv[g]
        for j in range(n):
            z = (nodes_t[g, j] - m) * iv
            e[j] -= 0.5 * z * z
    log_norm = 0.5 * n_par * math.log(2.0 * math.pi)
    for g in range(n_par):
        log_norm += math.log(sd[g])
    n_skill = start.shape[0] - 1
    top = np.empty(n_skill)
    for k in range(n_skill):
        mx = e[start[k]]
        for j in range(start[k] + 1, start[k + 1]):
            mx = max(mx, e[j])
        for j in range(start[k], start[k + 1]):
            e[j] -= mx
        top[k] = mx
    w = exp_nonpositive(e, np.empty(n), np.empty(n))
    grad[:] = 0.0
    total = 0.0
    for k in range(n_skill):
        a, b = start[k], start[k + 1]
        s = 0.0
        for j in range(a, b):
            s += w[j]
        total += top[k] + math.log(s) - math.log(b - a) - log_norm
        inv_s = 1.0 / s
        # The gradient is the weighted mean of the normal's score.
        for g in range(n_par):
            m, iv = mean[g], inv[g]
            s1 = 0.0
            s2 = 0.0
            for j in range(a, b):
                z = (nodes_t[g, j] - m) * iv
                s1 += w[j] * z
                s2 += w[j] * z * z
            grad[0, g] += s1 * inv_s * iv
            grad[1, g] += (s2 * inv_s - 1.0) * iv
    return total


def collapse_nodes(
    correct: np.ndarray,
    seq_len: np.ndarray,
    modes: np.ndarray,
    covs: np.ndarray,
    *,
    gs_mode: int,
    n_nodes: int = 4000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed importance-sampling nodes for one skill's marginal likelihood.

    With nodes ``x_j`` from the mixture of t at the skill's modes (as in
    :func:`skill_modes`) and ``c_j = log p(y_s | x_j) - log q(x_j)``, the
    skill's likelihood with its logits integrated out under the population
    density ``N(mu, sigma)`` is estimated by
    ``logsumexp_j(c_j + log N(x_j | mu, sigma)) - log n_nodes``: a smooth,
    deterministic function of the population parameters (the same nodes at
    every evaluation), which a model can sample instead of the skill's own
    multimodal logits.

    Returns
    -------
    nodes : float64 array, shape (n_nodes, n_par)
    c : float64 array, shape (n_nodes,)
    """
    rvs, logq = _t_mixture(np.asarray(modes, float), np.asarray(covs, float), 4.0, 2.0)
    nodes = rvs(n_nodes, np.random.default_rng(seed))
    c = skill_loglik_many(correct, seq_len, nodes, gs_mode=gs_mode) - logq(nodes)
    return nodes, c
