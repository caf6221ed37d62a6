"""BKT log-likelihood with the hidden mastery state summed out (forward algorithm).

Plain numba kernels over the lockstep layout of :mod:`bktbayes.packing`
(usable without PyTensor), the PyTensor Op that wraps them, and a plain
``pytensor.scan`` forward algorithm kept as the slow reference twin.

The filter is the serving tracer's (:mod:`bktbayes.tracing`): with
``p = P(mastered)`` and ``q = P(not mastered)`` before response ``y``,

* ``lik = p a + q b`` with ``a = P(y | mastered)`` (``1 - S`` or ``S``) and
  ``b = P(y | not mastered)`` (``G`` or ``1 - G``); the sequence's
  log-likelihood is the sum of ``log lik``;
* ``post_p = p a / lik``, ``post_q = q b / lik``;
* ``p' = post_p (1 - F) + post_q T`` and ``q' = post_p F + post_q (1 - T)``.

Numerical stability: ``p`` and ``q`` are carried separately and every sum
above has non-negative terms, so nothing cancels when ``p`` is near 1 (the
form ``1 - G - p (1 - S - G)`` for an error's likelihood does cancel, and
after a long run of correct answers drifts into nan). The gradient is carried
forward alongside the state (forward-mode sensitivities with respect to the
sequence's five natural parameters): the state is one scalar pair, so this is
cheaper than a reverse pass and needs no stored trajectory.

Speed: the inner loop runs across the sequences of a block active at a time
step, so LLVM vectorises it; one division per step (``1 / lik``) and the
logarithm taken of a running product every ``_LOG_EVERY`` steps keep
expensive calls out of the hot loop.
"""

from __future__ import annotations

import numba as nb
import numpy as np

__all__ = [
    "GS_BOUNDED",
    "GS_GUESS_FIRST",
    "GS_ORDERED",
    "LIKELIHOOD_BLOCK_SIZE",
    "draws_logp_items",
    "draws_student_logp",
    "forward_logp",
    "forward_logp_events",
    "forward_logp_grad",
    "item_logp_grad",
    "points_logp",
    "prefix_total_logp_grad",
    "student_total_logp_grad",
]

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
# FMA contraction only (no reassociation): fewer instructions, at least as accurate.
_JIT_FMA = {**_JIT, "fastmath": {"contract"}}

#: Guess/slip parametrisations of :func:`skill_logp_grad` (see
#: :class:`bktbayes.models.BKTModel`'s ``guess_slip``).
GS_ORDERED, GS_GUESS_FIRST, GS_BOUNDED = 0, 1, 2

#: Steps between logarithms of the running likelihood product. A step's
#: likelihood is at least min(G, 1 - G, S, 1 - S); 16 steps underflow only
#: if that minimum is below 5e-20 (a logit beyond -44), far outside any
#: prior's support. (Every 8 steps cost 9% more on the bundled data, whose
#: sequences are short: libm's log is not vectorised.)
_LOG_EVERY = 16


# Rows of the per-block scratch array of forward_logp_grad: one flat array
# with rows of a compile-time length _BS. With separate arrays (or rows of a
# runtime stride) LLVM needs a runtime alias check per pair of rows and gives
# up vectorising; with a constant stride it proves independence statically.
# 128 sequences per block keep the 18 rows (18 KiB) in L1; 256 spill to L2
# and cost about 20% here.
_BS = 128
#: Block size to pack events with for :func:`forward_logp_grad`.
LIKELIHOOD_BLOCK_SIZE = _BS
_P, _Q, _PR, _LL = 0, 1, 2, 3
_DP = 4  # 4..8: d p / d (init, transit, guess, slip, forget)
_G = 9  # 9..13: d log-likelihood / d (init, transit, guess, slip, forget)
_PS, _PG, _PT, _PF = 14, 15, 16, 17  # the sequence's slip, guess, transit, forget
_ROWS = 18


@nb.njit(**_JIT)
def _block_size(block_seq):
    bs = 1
    for b in range(block_seq.shape[0] - 1):
        bs = max(bs, block_seq[b + 1] - block_seq[b])
    return bs


@nb.njit(**_JIT_FMA)
def forward_logp(
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    p_init,
    p_transit,
    p_guess,
    p_slip,
    p_forget,
    out_logp,
    out_mast=None,
    init_state=None,
):
    """Per-sequence log-likelihood (value only), optionally the filtered state.

    Parameters
    ----------
    correct : uint8 array, shape (n_events,)
        Responses in lockstep order.
    block_seq, block_ev, step_ptr, step_count : int arrays
        The lockstep layout (:class:`bktbayes.packing.Packed`).
    p_init, p_transit, p_guess, p_slip : float64 arrays, shape (n_seqs,)
        Natural parameters per sequence (lockstep sequence order).
    p_forget : float64 array, shape (n_seqs,), or None
        None for a model without forgetting.
    out_logp : float64 array, shape (n_seqs,)
        Written: log p(responses of the sequence), in nats.
    out_mast : float64 array, shape (n_events,), optional
        Written when given (lockstep order): P(mastery) after each response,
        the posterior followed by the transition, the quantity the serving
        tracer reports.
    init_state : float64 array, shape (2, n_seqs), optional
        Start each sequence from this predicted state ``(p, q)`` instead of
        ``p_init`` (the prefix trie's suffixes).
    """
    if _block_size(block_seq) > _BS:
        raise ValueError(
            "forward_logp needs lockstep blocks of at most LIKELIHOOD_BLOCK_SIZE sequences"
        )
    # Flat scratch with rows of constant length _BS (see forward_logp_grad).
    W = np.zeros(8 * _BS)
    for b in range(block_seq.shape[0] - 1):
        q0 = block_seq[b]
        m = block_seq[b + 1] - q0
        for j in range(m):
            if init_state is None:
                W[0 * _BS + j] = p_init[q0 + j]
                W[1 * _BS + j] = 1.0 - p_init[q0 + j]
            else:
                W[0 * _BS + j] = init_state[0, q0 + j]
                W[1 * _BS + j] = init_state[1, q0 + j]
            W[2 * _BS + j] = 1.0
            W[3 * _BS + j] = 0.0
            W[4 * _BS + j] = p_slip[q0 + j]
            W[5 * _BS + j] = p_guess[q0 + j]
            W[6 * _BS + j] = p_transit[q0 + j]
            W[7 * _BS + j] = 0.0 if p_forget is None else p_forget[q0 + j]
        pos = block_ev[b]
        for ti in range(step_ptr[b], step_ptr[b + 1]):
            n = step_count[ti]
            cc = correct[pos : pos + n]
            for j in range(n):
                p = W[0 * _BS + j]
                q = W[1 * _BS + j]
                c = cc[j] != 0
                sl = W[4 * _BS + j]
                g = W[5 * _BS + j]
                a = (1.0 - sl) if c else sl
                bb = g if c else (1.0 - g)
                pa = p * a
                qb = q * bb
                lik = pa + qb
                inv = 1.0 / lik
                W[2 * _BS + j] *= lik
                pp = pa * inv
                pq = qb * inv
                t = W[6 * _BS + j]
                if p_forget is None:
                    f = 0.0
                else:
                    f = W[7 * _BS + j]
                W[0 * _BS + j] = pp * (1.0 - f) + pq * t
                W[1 * _BS + j] = pp * f + pq * (1.0 - t)
            if out_mast is not None:
                om = out_mast[pos : pos + n]
                for j in range(n):
                    om[j] = W[0 * _BS + j]
            if (ti - step_ptr[b]) % _LOG_EVERY == _LOG_EVERY - 1:
                for j in range(n):
                    W[3 * _BS + j] += np.log(W[2 * _BS + j])
                    W[2 * _BS + j] = 1.0
            pos += n
        for j in range(m):
            out_logp[q0 + j] = W[3 * _BS + j] + np.log(W[2 * _BS + j])


@nb.njit(**_JIT_FMA)
def forward_logp_grad(
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    p_init,
    p_transit,
    p_guess,
    p_slip,
    p_forget,
    out_logp,
    out_grad,
    init_state=None,
):
    """Per-sequence log-likelihood and its gradient (forward-mode).

    Parameters
    ----------
    correct, block_seq, block_ev, step_ptr, step_count, p_init, p_transit,
    p_guess, p_slip, p_forget, out_logp
        As in :func:`forward_logp`.
    out_grad : float64 array, shape (5, n_seqs)
        Written: derivatives of each sequence's log-likelihood with respect to
        its ``p_init``, ``p_transit``, ``p_guess``, ``p_slip`` and ``p_forget``
        (row 4 is left untouched when ``p_forget`` is None).
    init_state : float64 array, shape (7, n_seqs), optional
        Start each sequence from this predicted state instead of ``p_init``:
        rows ``p``, ``q`` and ``d p / d`` (init, transit, guess, slip,
        forget), as left by the steps before it (the prefix trie's suffixes).

    Notes
    -----
    Since ``p + q = 1``, only ``dp`` is carried per parameter. Writing the
    derivative of the posterior in closed form removes every subtraction of
    large terms: with ``r = a b / lik^2`` and ``w = p q / lik^2``,
    ``d post_p = dp r`` (plus ``- w a d b`` for the guess and ``+ w b d a``
    for the slip), and ``dp' = d post_p (1 - F - T)`` plus ``post_q`` for the
    transit and ``- post_p`` for the forget parameter.
    """
    if _block_size(block_seq) > _BS:
        raise ValueError(
            "forward_logp_grad needs lockstep blocks of at most LIKELIHOOD_BLOCK_SIZE sequences"
        )
    W = np.zeros(_ROWS * _BS)
    for b in range(block_seq.shape[0] - 1):
        q0 = block_seq[b]
        m = block_seq[b + 1] - q0
        for j in range(m):
            if init_state is None:
                W[_P * _BS + j] = p_init[q0 + j]
                W[_Q * _BS + j] = 1.0 - p_init[q0 + j]
                W[_DP * _BS + j] = 1.0
                for k in range(1, 5):
                    W[(_DP + k) * _BS + j] = 0.0
            else:
                W[_P * _BS + j] = init_state[0, q0 + j]
                W[_Q * _BS + j] = init_state[1, q0 + j]
                for k in range(5):
                    W[(_DP + k) * _BS + j] = init_state[2 + k, q0 + j]
            W[_PR * _BS + j] = 1.0
            W[_LL * _BS + j] = 0.0
            for k in range(5):
                W[(_G + k) * _BS + j] = 0.0
            W[_PS * _BS + j] = p_slip[q0 + j]
            W[_PG * _BS + j] = p_guess[q0 + j]
            W[_PT * _BS + j] = p_transit[q0 + j]
            W[_PF * _BS + j] = 0.0 if p_forget is None else p_forget[q0 + j]
        pos = block_ev[b]
        for ti in range(step_ptr[b], step_ptr[b + 1]):
            n = step_count[ti]
            cc = correct[pos : pos + n]
            for j in range(n):
                p = W[_P * _BS + j]
                q = W[_Q * _BS + j]
                c = cc[j] != 0
                sl = W[_PS * _BS + j]
                g = W[_PG * _BS + j]
                a = (1.0 - sl) if c else sl
                bb = g if c else (1.0 - g)
                sa = -1.0 if c else 1.0  # d a / d slip
                sb = 1.0 if c else -1.0  # d b / d guess
                pa = p * a
                qb = q * bb
                lik = pa + qb
                inv = 1.0 / lik
                W[_PR * _BS + j] *= lik
                pp = pa * inv
                pq = qb * inv
                t = W[_PT * _BS + j]
                if p_forget is None:
                    f = 0.0
                else:
                    f = W[_PF * _BS + j]
                keep = 1.0 - f - t  # d p' / d post_p; > 0 by the parameter rules
                inv2 = inv * inv
                r = a * bb * inv2
                w = p * q * inv2
                amb = a - bb

                d = W[(_DP + 0) * _BS + j]
                W[(_G + 0) * _BS + j] += d * amb * inv
                W[(_DP + 0) * _BS + j] = d * r * keep
                d = W[(_DP + 1) * _BS + j]
                W[(_G + 1) * _BS + j] += d * amb * inv
                W[(_DP + 1) * _BS + j] = d * r * keep + pq
                d = W[(_DP + 2) * _BS + j]
                W[(_G + 2) * _BS + j] += (d * amb + q * sb) * inv
                W[(_DP + 2) * _BS + j] = (d * r - w * a * sb) * keep
                d = W[(_DP + 3) * _BS + j]
                W[(_G + 3) * _BS + j] += (d * amb + p * sa) * inv
                W[(_DP + 3) * _BS + j] = (d * r + w * bb * sa) * keep
                if p_forget is not None:
                    d = W[(_DP + 4) * _BS + j]
                    W[(_G + 4) * _BS + j] += d * amb * inv
                    W[(_DP + 4) * _BS + j] = d * r * keep - pp

                W[_P * _BS + j] = pp * (1.0 - f) + pq * t
                W[_Q * _BS + j] = pp * f + pq * (1.0 - t)
            if (ti - step_ptr[b]) % _LOG_EVERY == _LOG_EVERY - 1:
                for j in range(n):
                    W[_LL * _BS + j] += np.log(W[_PR * _BS + j])
                    W[_PR * _BS + j] = 1.0
            pos += n
        for j in range(m):
            out_logp[q0 + j] = W[_LL * _BS + j] + np.log(W[_PR * _BS + j])
            for k in range(4):
                out_grad[k, q0 + j] = W[(_G + k) * _BS + j]
            if p_forget is not None:
                out_grad[4, q0 + j] = W[(_G + 4) * _BS + j]


@nb.njit(**_JIT)
def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


@nb.njit(**_JIT)
def skill_logp_grad(
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    seq_skill,
    logits,
    gs_mode,
    out_logp,
    out_grad,
):
    """Per-skill log-likelihood and gradient with respect to logit-scale parameters.

    The parametrisation of :class:`bktbayes.models.BKTModel`: ``p_init =
    sigmoid(x0)``, ``p_transit = sigmoid(x1)``; guess/slip by ``gs_mode``:
    ``GS_ORDERED`` (slip first) ``p_slip = sigmoid(-x3)``, ``p_guess = (1 -
    p_slip) sigmoid(x2)``; ``GS_GUESS_FIRST`` ``p_guess = sigmoid(x2)``,
    ``p_slip = (1 - p_guess) sigmoid(-x3)``; ``GS_BOUNDED`` ``p_guess =
    sigmoid(x2) / 2``, ``p_slip = sigmoid(x3) / 2``; with a fifth row,
    ``p_forget = (1 - p_transit) sigmoid(x4)``.

    Parameters
    ----------
    correct, block_seq, block_ev, step_ptr, step_count
        Lockstep layout (blocks of at most ``LIKELIHOOD_BLOCK_SIZE``).
    seq_skill : int64 array, shape (n_seqs,)
        Skill index of each sequence.
    logits : float64 array, shape (4 or 5, n_skills)
    gs_mode : int
        ``GS_ORDERED``, ``GS_GUESS_FIRST`` or ``GS_BOUNDED``.
    out_logp : float64 array, shape (n_skills,)
        Written: summed log-likelihood per skill.
    out_grad : float64 array, shape (4 or 5, n_skills)
        Written: its gradient with respect to ``logits``.
    """
    n_par = logits.shape[0]
    n_skill = logits.shape[1]
    n_seq = seq_skill.shape[0]
    nat = np.empty((5, n_skill))
    for s in range(n_skill):
        nat[0, s] = _sig(logits[0, s])
        nat[1, s] = _sig(logits[1, s])
        sg = _sig(logits[2, s])
        if gs_mode == GS_ORDERED:
            nat[3, s] = _sig(-logits[3, s])
            nat[2, s] = _sig(logits[3, s]) * sg
        elif gs_mode == GS_GUESS_FIRST:
            nat[2, s] = sg
            nat[3, s] = (1.0 - sg) * _sig(-logits[3, s])
        else:
            nat[2, s] = 0.5 * sg
            nat[3, s] = 0.5 * _sig(logits[3, s])
        nat[4, s] = (1.0 - nat[1, s]) * _sig(logits[4, s]) if n_par == 5 else 0.0
    pi = np.empty(n_seq)
    pt = np.empty(n_seq)
    pg = np.empty(n_seq)
    ps = np.empty(n_seq)
    pf = np.empty(n_seq)
    for q in range(n_seq):
        s = seq_skill[q]
        pi[q] = nat[0, s]
        pt[q] = nat[1, s]
        pg[q] = nat[2, s]
        ps[q] = nat[3, s]
        pf[q] = nat[4, s]
    logp = np.empty(n_seq)
    grad = np.zeros((5, n_seq))
    if n_par == 5:
        forward_logp_grad(
            correct, block_seq, block_ev, step_ptr, step_count, pi, pt, pg, ps, pf, logp, grad
        )
    else:
        forward_logp_grad(
            correct, block_seq, block_ev, step_ptr, step_count, pi, pt, pg, ps, None, logp, grad
        )
    # Natural-parameter gradients summed per skill, then the chain rule once
    # per skill.
    gn = np.zeros((5, n_skill))
    out_logp[:] = 0.0
    for q in range(n_seq):
        s = seq_skill[q]
        out_logp[s] += logp[q]
        for k in range(5):
            gn[k, s] += grad[k, q]
    for s in range(n_skill):
        si = _sig(logits[0, s])
        st = _sig(logits[1, s])
        sg = _sig(logits[2, s])
        out_grad[0, s] = gn[0, s] * si * (1.0 - si)
        d_tr = gn[1, s]
        if n_par == 5:
            sf = _sig(logits[4, s])
            d_tr -= gn[4, s] * sf  # d forget / d transit = -sigmoid(x4)
            out_grad[4, s] = gn[4, s] * (1.0 - st) * sf * (1.0 - sf)
        out_grad[1, s] = d_tr * st * (1.0 - st)
        if gs_mode == GS_ORDERED:
            s3 = _sig(logits[3, s])
            # slip = 1 - s3; guess = s3 sg
            out_grad[2, s] = gn[2, s] * s3 * sg * (1.0 - sg)
            out_grad[3, s] = (gn[2, s] * sg - gn[3, s]) * s3 * (1.0 - s3)
        elif gs_mode == GS_GUESS_FIRST:
            sd = _sig(-logits[3, s])
            # guess = sg; slip = (1 - sg) sd
            out_grad[2, s] = (gn[2, s] - gn[3, s] * sd) * sg * (1.0 - sg)
            out_grad[3, s] = -gn[3, s] * (1.0 - sg) * sd * (1.0 - sd)
        else:
            sb = _sig(logits[3, s])
            out_grad[2, s] = gn[2, s] * 0.5 * sg * (1.0 - sg)
            out_grad[3, s] = gn[3, s] * 0.5 * sb * (1.0 - sb)


@nb.njit(parallel=True, **_JIT)
def points_logp(correct, seq_start, seq_len, logits, gs_mode, out):
    """Log-likelihood of one set of sequences at many parameter vectors.

    For one skill's posterior explored point by point (its modes, importance
    samples, Metropolis proposals): the same filter as the lockstep kernel,
    one thread per block of points, no gradient.

    Parameters
    ----------
    correct : uint8 array, shape (n_obs,)
        Responses, each sequence contiguous and in order.
    seq_start, seq_len : int64 arrays, shape (n_seqs,)
    logits : float64 array, shape (4 or 5, n_points)
        As in :func:`skill_logp_grad` (``gs_mode`` maps guess and slip).
    gs_mode : int
    out : float64 array, shape (n_points,)
        Written: the summed log-likelihood at each point (nats).
    """
    n_par = logits.shape[0]
    n_seq = seq_start.shape[0]
    for j in nb.prange(logits.shape[1]):
        pi = _sig(logits[0, j])
        t = _sig(logits[1, j])
        sg = _sig(logits[2, j])
        if gs_mode == GS_ORDERED:
            sl = _sig(-logits[3, j])
            g = _sig(logits[3, j]) * sg
        elif gs_mode == GS_GUESS_FIRST:
            g = sg
            sl = (1.0 - sg) * _sig(-logits[3, j])
        else:
            g = 0.5 * sg
            sl = 0.5 * _sig(logits[3, j])
        f = (1.0 - t) * _sig(logits[4, j]) if n_par == 5 else 0.0
        total = 0.0
        for s in range(n_seq):
            p = pi
            q = 1.0 - pi
            for k in range(seq_start[s], seq_start[s] + seq_len[s]):
                if correct[k] != 0:
                    pa = p * (1.0 - sl)
                    qb = q * g
                else:
                    pa = p * sl
                    qb = q * (1.0 - g)
                lik = pa + qb
                total += np.log(lik)
                pp = pa / lik
                pq = qb / lik
                p = pp * (1.0 - f) + pq * t
                q = pp * f + pq * (1.0 - t)
        out[j] = total


def skill_newton(
    layout: tuple,
    seq_skill: np.ndarray,
    x0: np.ndarray,
    *,
    gs_mode: int = 0,
    ridge: float | np.ndarray = 1.0 / 9.0,
    prior_mean: np.ndarray | None = None,
    max_iter: int = 30,
    tol: float = 1e-2,
    subset=None,
) -> dict:
    """Per-skill maximum (penalised) likelihood by block-diagonal Newton steps.

    Skills are independent, so the Hessian is block-diagonal (one 4x4 or 5x5
    block per skill). One perturbation of parameter k for *all* skills at
    once gives column k of every block by a finite difference of the exact
    gradient: an iteration costs 1 + n_par kernel evaluations, whatever the
    number of skills. Steps are damped (Levenberg-Marquardt) and accepted
    skill by skill only when they raise that skill's objective.

    Parameters
    ----------
    layout : tuple
        ``(correct, block_seq, block_ev, step_ptr, step_count)``.
    seq_skill : int64 array, shape (n_seqs,)
    x0 : float64 array, shape (n_par, n_skills)
        Starting logits.
    gs_mode : int
        Guess/slip parametrisation (see :func:`skill_logp_grad`).
    ridge : float or float64 array, shape (n_par, 1)
        Precision of a Normal penalty on the logits around ``prior_mean``
        (keeps skills whose likelihood is flat, e.g. all answers correct, at
        finite values); per parameter group, with the population scales of
        a hierarchical model, it makes the objective a skill's conditional
        log posterior.
    prior_mean : float64 array, shape (n_par, 1) or like ``x0``, optional
    max_iter : int
    tol : float
        Stop when an iteration raises the total objective by less than
        ``tol`` nats (a skill whose Newton step promises less is done).
    subset : callable, optional
        ``subset(mask) -> (layout, seq_skill)`` for the sequences of the
        skills in ``mask`` only. Late iterations move few skills; once fewer
        than a third are still moving, evaluations run on theirs alone.

    Returns
    -------
    dict
        ``x`` (logits), ``loglik`` per skill (unpenalised), ``n_eval``,
        ``n_iter``, ``converged``.
    """
    x = np.array(x0, dtype=np.float64, copy=True)
    n_par, n_skill = x.shape
    mu = np.zeros_like(x) if prior_mean is None else np.broadcast_to(prior_mean, x.shape)
    lp = np.empty(n_skill)
    g = np.empty((n_par, n_skill))
    n_eval = 0

    cur_layout, cur_seq_skill = layout, seq_skill
    moving = np.ones(n_skill, dtype=bool)  # skills evaluated by cur_layout

    def evaluate(xx):
        nonlocal n_eval
        n_eval += 1
        lp_ = np.zeros(n_skill)
        g_ = np.zeros((n_par, n_skill))
        skill_logp_grad(*cur_layout, cur_seq_skill, xx, gs_mode, lp_, g_)
        obj = lp_ - 0.5 * (ridge * (xx - mu) ** 2).sum(axis=0)
        return lp_, obj, g_ - ridge * (xx - mu)

    lp, obj, g = evaluate(x)
    lam = np.full(n_skill, 1e-4)
    h = 1e-5
    converged = False
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        hess = np.empty((n_skill, n_par, n_par))
        for k in range(n_par):
            xk = x.copy()
            xk[k] += h
            _, _, gk = evaluate(xk)
            hess[:, :, k] = ((gk - g) / h).T
        hess = 0.5 * (hess + hess.transpose(0, 2, 1))
        neg = -hess
        eye = np.eye(n_par)
        diag = 1.0 + np.abs(np.diagonal(neg, axis1=1, axis2=2))
        # Skills whose Newton step promises less than 1e-4 nats are done:
        # retrying them would cost a full evaluation of every skill for
        # nothing. Skills outside the current subset are frozen.
        done = ~moving.copy()
        neg[done] = eye
        gain = np.zeros(n_skill)
        for _ in range(8):
            a = neg + (lam[:, None] * diag)[:, :, None] * eye
            try:
                step = np.linalg.solve(a, g.T[:, :, None])[:, :, 0].T
            except np.linalg.LinAlgError:
                lam *= 10.0
                continue
            step = np.clip(step, -3.0, 3.0)
            pred = 0.5 * (g * step).sum(axis=0)
            # Not an ascent direction (Hessian block not negative definite):
            # damp harder, towards a gradient step.
            uphill = pred > 0
            lam[~done & ~uphill] *= 10.0
            done |= uphill & (pred < 1e-4)
            trial = ~done & uphill
            if not trial.any():
                if done.all():
                    break
                continue
            xn = np.where(trial, x + step, x)
            lpn, objn, gn = evaluate(xn)
            better = (objn > obj) & trial
            gain[better] = objn[better] - obj[better]
            x[:, better] = xn[:, better]
            lp[better] = lpn[better]
            obj[better] = objn[better]
            g[:, better] = gn[:, better]
            lam[better] = np.maximum(lam[better] / 100.0, 1e-6)
            lam[trial & ~better] *= 10.0
            done |= better
        if gain.sum() < tol:
            converged = True
            break
        still = gain > 1e-4
        if not still.any():
            converged = True
            break
        if subset is not None and still.sum() < moving.sum() / 3:
            cur_layout, cur_seq_skill = subset(still)
            moving = still
            # Re-evaluate on the subset: values of the frozen skills are kept.
            lpn, objn, gn = evaluate(x)
            lp[moving] = lpn[moving]
            obj[moving] = objn[moving]
            g[:, moving] = gn[:, moving]
    return {"x": x, "loglik": lp, "n_eval": n_eval, "n_iter": it, "converged": converged}


@nb.njit(parallel=True, **_JIT)
def draws_logp(
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    p_init,
    p_transit,
    p_guess,
    p_slip,
    p_forget,
    out,
    seq_col=None,
):
    """Per-sequence log-likelihood for many parameter draws (threads over draws).

    Parameters
    ----------
    correct, block_seq, block_ev, step_ptr, step_count
        The lockstep layout.
    p_init, p_transit, p_guess, p_slip, p_forget : float64 arrays, shape (n_draws, n_cols)
        One column per sequence (``n_cols = n_seqs``), or per ``seq_col``
        value (e.g. per skill). ``p_forget`` may be None.
    out : float64 array, shape (n_draws, n_seqs)
        Written: the pointwise log-likelihood that PSIS-LOO needs.
    seq_col : int64 array, shape (n_seqs,), optional
        Column of each sequence's parameters. Gathering per draw inside the
        kernel keeps (n_draws, n_seqs) parameter arrays (1.3 GB each for
        4,000 draws of the bundled data) out of memory.
    """
    n_seqs = out.shape[1]
    for d in nb.prange(p_init.shape[0]):
        row = np.empty(n_seqs)
        if seq_col is None:
            pi = p_init[d]
            pt = p_transit[d]
            pg = p_guess[d]
            ps = p_slip[d]
        else:
            pi = np.empty(n_seqs)
            pt = np.empty(n_seqs)
            pg = np.empty(n_seqs)
            ps = np.empty(n_seqs)
            for q in range(n_seqs):
                k = seq_col[q]
                pi[q] = p_init[d, k]
                pt[q] = p_transit[d, k]
                pg[q] = p_guess[d, k]
                ps[q] = p_slip[d, k]
        if p_forget is None:
            forward_logp(
                correct, block_seq, block_ev, step_ptr, step_count, pi, pt, pg, ps, None, row
            )
        else:
            if seq_col is None:
                pf = p_forget[d]
            else:
                pf = np.empty(n_seqs)
                for q in range(n_seqs):
                    pf[q] = p_forget[d, seq_col[q]]
            forward_logp(
                correct, block_seq, block_ev, step_ptr, step_count, pi, pt, pg, ps, pf, row
            )
        out[d] = row


@nb.njit(parallel=True, **_JIT)
def draws_student_logp(
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    seq_skill,
    seq_user,
    init_logit,
    init_offset,
    transit_logit,
    transit_offset,
    p_guess,
    p_slip,
    forget_share,
    out,
):
    """Per-sequence log-likelihood for many draws of a model with student
    offsets (threads over draws); the parameters as in
    :func:`student_total_logp_grad`, one row per draw.

    Parameters
    ----------
    correct, block_seq, block_ev, step_ptr, step_count
        The lockstep layout.
    seq_skill, seq_user : int64 arrays, shape (n_seqs,)
    init_logit, transit_logit, p_guess, p_slip : float64 arrays, shape (n_draws, n_skills)
    init_offset : float64 array, shape (n_draws, n_users)
    transit_offset : float64 array, shape (n_draws, n_users), or None
    forget_share : float64 array, shape (n_draws, n_skills), or None
    out : float64 array, shape (n_draws, n_seqs)
        Written: the pointwise log-likelihood that PSIS-LOO needs.

    Notes
    -----
    Forming each draw's per-sequence parameters inside the thread keeps
    (n_draws, n_seqs) parameter arrays (1.3 GB each for 4,000 draws of the
    bundled data) out of memory.
    """
    n_seqs = out.shape[1]
    for d in nb.prange(init_logit.shape[0]):
        row = np.empty(n_seqs)
        pi = np.empty(n_seqs)
        pt = np.empty(n_seqs)
        pg = np.empty(n_seqs)
        ps = np.empty(n_seqs)
        pf = np.empty(n_seqs)
        _student_seq_params(
            seq_skill, seq_user, init_logit[d], init_offset[d], transit_logit[d],
            _row(transit_offset, d), p_guess[d], p_slip[d], _row(forget_share, d),
            pi, pt, pg, ps, pf,
        )  # fmt: skip
        if forget_share is None:
            forward_logp(
                correct, block_seq, block_ev, step_ptr, step_count, pi, pt, pg, ps, None, row
            )
        else:
            forward_logp(
                correct, block_seq, block_ev, step_ptr, step_count, pi, pt, pg, ps, pf, row
            )
        out[d] = row


@nb.njit(**_JIT)
def skill_total_logp_grad(
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    seq_skill,
    p_init,
    p_transit,
    p_guess,
    p_slip,
    p_forget,
    out_grad,
    init_state=None,
):
    """Total log-likelihood and its gradient with respect to per-skill parameters.

    The gather of skill parameters to sequences and the sum of the
    per-sequence gradients back to skills happen here, in one pass, instead
    of as separate graph operations around the kernel.

    Parameters
    ----------
    correct, block_seq, block_ev, step_ptr, step_count
        The lockstep layout.
    seq_skill : int64 array, shape (n_seqs,)
    p_init, p_transit, p_guess, p_slip : float64 arrays, shape (n_skills,)
    p_forget : float64 array, shape (n_skills,), or None
    out_grad : float64 array, shape (5, n_skills)
        Written: d total / d parameter (row 4 zero without forgetting).
    init_state : float64 array, shape (7, n_seqs), optional
        Start states, as in :func:`forward_logp_grad`.

    Returns
    -------
    float
        The total log-likelihood (nats).
    """
    n_seq = seq_skill.shape[0]
    pi = np.empty(n_seq)
    pt = np.empty(n_seq)
    pg = np.empty(n_seq)
    ps = np.empty(n_seq)
    pf = np.zeros(n_seq)
    for q in range(n_seq):
        s = seq_skill[q]
        pi[q] = p_init[s]
        pt[q] = p_transit[s]
        pg[q] = p_guess[s]
        ps[q] = p_slip[s]
        if p_forget is not None:
            pf[q] = p_forget[s]
    logp = np.empty(n_seq)
    grad = np.zeros((5, n_seq))
    if p_forget is None:
        forward_logp_grad(
            correct,
            block_seq,
            block_ev,
            step_ptr,
            step_count,
            pi,
            pt,
            pg,
            ps,
            None,
            logp,
            grad,
            init_state,
        )
    else:
        forward_logp_grad(
            correct,
            block_seq,
            block_ev,
            step_ptr,
            step_count,
            pi,
            pt,
            pg,
            ps,
            pf,
            logp,
            grad,
            init_state,
        )
    out_grad[:] = 0.0
    total = 0.0
    for q in range(n_seq):
        s = seq_skill[q]
        total += logp[q]
        for k in range(5):
            out_grad[k, s] += grad[k, q]
    return total


@nb.njit(**_JIT)
def _sig_sum(seq_skill, seq_user, skill_logit, user_offset, out):
    """out[q] = sigmoid(skill_logit[skill of q] + user_offset[user of q]);
    ``user_offset`` may be None (no offset)."""
    # sigmoid(a + b) = 1 / (1 + e^-a e^-b): one exp per skill and per student
    # instead of one per sequence (the exps cost more than the rest of the
    # gather); the direct form where the product is inf * 0.
    e_s = np.exp(-skill_logit)
    if user_offset is None:
        for q in range(seq_skill.shape[0]):
            out[q] = 1.0 / (1.0 + e_s[seq_skill[q]])
        return
    e_u = np.exp(-user_offset)
    for q in range(seq_skill.shape[0]):
        s = seq_skill[q]
        u = seq_user[q]
        v = e_s[s] * e_u[u]
        if v != v:
            v = np.exp(-(skill_logit[s] + user_offset[u]))
        out[q] = 1.0 / (1.0 + v)


@nb.njit(**_JIT)
def _row(x, d):
    """Row ``d`` of a 2-d array, or None for None (numba prunes the branch
    at compile time, so the caller needs no branch per combination)."""
    if x is None:
        return None
    return x[d]


@nb.njit(**_JIT)
def _student_seq_params(
    seq_skill,
    seq_user,
    init_logit,
    init_offset,
    transit_logit,
    transit_offset,
    p_guess,
    p_slip,
    forget_share,
    pi,
    pt,
    pg,
    ps,
    pf,
):
    """Each sequence's P(L0), P(T), guess, slip and P(F) from skill
    parameters and student offsets (one draw); ``transit_offset`` and
    ``forget_share`` may be None (``pf`` is then left as it is)."""
    _sig_sum(seq_skill, seq_user, init_logit, init_offset, pi)
    _sig_sum(seq_skill, seq_user, transit_logit, transit_offset, pt)
    for q in range(seq_skill.shape[0]):
        s = seq_skill[q]
        pg[q] = p_guess[s]
        ps[q] = p_slip[s]
        if forget_share is not None:
            pf[q] = (1.0 - pt[q]) * forget_share[s]


@nb.njit(**_JIT)
def student_total_logp_grad(
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    seq_skill,
    seq_user,
    init_logit,
    init_offset,
    transit_logit,
    transit_offset,
    p_guess,
    p_slip,
    forget_share,
    out_skill,
    out_user,
):
    """Total log-likelihood with per-student offsets, and its gradient.

    A sequence's ``P(L0) = sigmoid(init_logit[skill] + init_offset[user])``
    and ``P(T) = sigmoid(transit_logit[skill] + transit_offset[user])``;
    guess and slip are the skill's; with forgetting
    ``P(F) = (1 - P(T)) forget_share[skill]``. The gathers to sequences, the
    logistic maps and the sums of the gradients back to skills and students
    run here in one pass, instead of as a dozen graph operations over every
    sequence around :func:`forward_logp_grad`.

    Parameters
    ----------
    correct, block_seq, block_ev, step_ptr, step_count
        The lockstep layout.
    seq_skill, seq_user : int64 arrays, shape (n_seqs,)
    init_logit, transit_logit, p_guess, p_slip : float64 arrays, shape (n_skills,)
    init_offset, transit_offset : float64 arrays, shape (n_users,)
        Logit-scale offsets (zeros for a model without transit offsets).
    forget_share : float64 array, shape (n_skills,), or None
    out_skill : float64 array, shape (5, n_skills)
        Written: d total / d (init_logit, transit_logit, p_guess, p_slip,
        forget_share); row 4 zero without forgetting.
    out_user : float64 array, shape (2, n_users)
        Written: d total / d (init_offset, transit_offset).

    Returns
    -------
    float
        The total log-likelihood (nats).
    """
    n_seq = seq_skill.shape[0]
    pi = np.empty(n_seq)
    ptr = np.empty(n_seq)
    pg = np.empty(n_seq)
    ps = np.empty(n_seq)
    pf = np.zeros(n_seq)
    _student_seq_params(
        seq_skill, seq_user, init_logit, init_offset, transit_logit, transit_offset,
        p_guess, p_slip, forget_share, pi, ptr, pg, ps, pf,
    )  # fmt: skip
    logp = np.empty(n_seq)
    grad = np.zeros((5, n_seq))
    if forget_share is None:
        forward_logp_grad(
            correct, block_seq, block_ev, step_ptr, step_count, pi, ptr, pg, ps, None, logp, grad
        )
    else:
        forward_logp_grad(
            correct, block_seq, block_ev, step_ptr, step_count, pi, ptr, pg, ps, pf, logp, grad
        )
    out_skill[:] = 0.0
    out_user[:] = 0.0
    total = 0.0
    for q in range(n_seq):
        s = seq_skill[q]
        u = seq_user[q]
        total += logp[q]
        d_init = grad[0, q] * pi[q] * (1.0 - pi[q])
        d_tr = grad[1, q]
        if forget_share is not None:
            # P(F) depends on P(T) too.
            d_tr -= grad[4, q] * forget_share[s]
            out_skill[4, s] += grad[4, q] * (1.0 - ptr[q])
        d_tr *= ptr[q] * (1.0 - ptr[q])
        out_skill[0, s] += d_init
        out_skill[1, s] += d_tr
        out_skill[2, s] += grad[2, q]
        out_skill[3, s] += grad[3, q]
        out_user[0, u] += d_init
        out_user[1, u] += d_tr
    return total


@nb.njit(**_JIT_FMA)
def prefix_total_logp_grad(
    node_parent,
    node_skill,
    node_y,
    node_w,
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    suf_node,
    suf_skill,
    p_init,
    p_transit,
    p_guess,
    p_slip,
    p_forget,
    out_grad,
):
    """Total log-likelihood and per-skill gradient over a prefix-trie layout.

    The same quantity as :func:`skill_total_logp_grad`, computed on
    :class:`bktbayes.packing.PrefixLayout`: each trie node's step (its
    log-likelihood term and forward-mode derivatives) is taken once and
    weighted by the sequences that pass through it; the suffixes run in the
    lockstep kernel from their node's state, derivatives included.

    Parameters
    ----------
    node_parent, node_skill, node_y, node_w
        The trie (:class:`bktbayes.packing.PrefixLayout`).
    correct, block_seq, block_ev, step_ptr, step_count
        The suffixes' lockstep layout.
    suf_node, suf_skill : int64 arrays, shape (n_suffixes,)
    p_init, p_transit, p_guess, p_slip : float64 arrays, shape (n_skills,)
    p_forget : float64 array, shape (n_skills,), or None
    out_grad : float64 array, shape (5, n_skills)
        Written: d total / d parameter (row 4 zero without forgetting).

    Returns
    -------
    float
        The total log-likelihood (nats).
    """
    n_nodes = node_parent.shape[0]
    # Row per node (7 contiguous values), so a child's gather of its parent's
    # state is one cache line: p, q, d p / d (init, transit, guess, slip, forget).
    S = np.empty((n_nodes, 7))
    out_grad[:] = 0.0
    total = 0.0
    for k in range(n_nodes):
        s = node_skill[k]
        par = node_parent[k]
        if par < 0:
            p = p_init[s]
            q = 1.0 - p
            d0 = 1.0
            d1 = 0.0
            d2 = 0.0
            d3 = 0.0
            d4 = 0.0
        else:
            p = S[par, 0]
            q = S[par, 1]
            d0 = S[par, 2]
            d1 = S[par, 3]
            d2 = S[par, 4]
            d3 = S[par, 5]
            d4 = S[par, 6]
        c = node_y[k] != 0
        sl = p_slip[s]
        g = p_guess[s]
        t = p_transit[s]
        f = 0.0 if p_forget is None else p_forget[s]
        a = (1.0 - sl) if c else sl
        bb = g if c else (1.0 - g)
        sa = -1.0 if c else 1.0
        sb = 1.0 if c else -1.0
        pa = p * a
        qb = q * bb
        lik = pa + qb
        inv = 1.0 / lik
        pp = pa * inv
        pq = qb * inv
        keep = 1.0 - f - t
        inv2 = inv * inv
        r = a * bb * inv2
        w = p * q * inv2
        amb = a - bb
        wt = node_w[k]
        total += wt * np.log(lik)
        winv = wt * inv
        out_grad[0, s] += d0 * amb * winv
        out_grad[1, s] += d1 * amb * winv
        out_grad[2, s] += (d2 * amb + q * sb) * winv
        out_grad[3, s] += (d3 * amb + p * sa) * winv
        S[k, 0] = pp * (1.0 - f) + pq * t
        S[k, 1] = pp * f + pq * (1.0 - t)
        S[k, 2] = d0 * r * keep
        S[k, 3] = d1 * r * keep + pq
        S[k, 4] = (d2 * r - w * a * sb) * keep
        S[k, 5] = (d3 * r + w * bb * sa) * keep
        if p_forget is None:
            S[k, 6] = 0.0
        else:
            out_grad[4, s] += d4 * amb * winv
            S[k, 6] = d4 * r * keep - pp
    n_suf = suf_node.shape[0]
    if n_suf == 0:
        return total
    init = np.empty((7, n_suf))
    for j in range(n_suf):
        nd = suf_node[j]
        for k in range(7):
            init[k, j] = S[nd, k]
    g_suf = np.empty_like(out_grad)
    total += skill_total_logp_grad(
        correct,
        block_seq,
        block_ev,
        step_ptr,
        step_count,
        suf_skill,
        p_init,
        p_transit,
        p_guess,
        p_slip,
        p_forget,
        g_suf,
        init,
    )
    out_grad += g_suf
    return total


@nb.njit(parallel=True, **_JIT)
def draws_prefix_logp(
    node_parent,
    node_skill,
    node_y,
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    suf_node,
    suf_skill,
    seq_node,
    suf_seq,
    p_init,
    p_transit,
    p_guess,
    p_slip,
    p_forget,
    out,
):
    """Per-sequence log-likelihood for many draws of per-skill parameters, on
    a prefix-trie layout (threads over draws).

    The same numbers as :func:`draws_logp` with ``seq_col`` the sequences'
    skills: a sequence's log-likelihood is its last trie node's cumulative
    log-likelihood, plus its suffix's from that node's state. Shared
    prefixes are stepped once per draw.

    Parameters
    ----------
    node_parent, node_skill, node_y
        The trie (:class:`bktbayes.packing.PrefixLayout`).
    correct, block_seq, block_ev, step_ptr, step_count
        The suffixes' lockstep layout.
    suf_node, suf_skill, suf_seq : int64 arrays, shape (n_suffixes,)
        Start node, skill and sequence (an index into ``out``'s columns) of
        each suffix.
    seq_node : int64 array, shape (n_seqs,)
        The last trie node of each sequence.
    p_init, p_transit, p_guess, p_slip : float64 arrays, shape (n_draws, n_skills)
    p_forget : float64 array, shape (n_draws, n_skills), or None
    out : float64 array, shape (n_draws, n_seqs)
        Written: log-likelihood of each sequence under each draw (nats).
    """
    n_nodes = node_parent.shape[0]
    n_suf = suf_node.shape[0]
    n_seqs = out.shape[1]
    # Unchecked indexing below: a mismatched out would be written past its end.
    if out.shape[0] != p_init.shape[0]:
        raise ValueError("draws_prefix_logp: out needs one row per draw (p_init's rows)")
    if seq_node.shape[0] != n_seqs:
        raise ValueError("draws_prefix_logp: out needs one column per sequence (seq_node)")
    for d in nb.prange(p_init.shape[0]):
        S = np.empty((n_nodes, 3))  # p, q, cumulative log-likelihood
        for k in range(n_nodes):
            s = node_skill[k]
            par = node_parent[k]
            if par < 0:
                p = p_init[d, s]
                q = 1.0 - p
                ll = 0.0
            else:
                p = S[par, 0]
                q = S[par, 1]
                ll = S[par, 2]
            c = node_y[k] != 0
            sl = p_slip[d, s]
            g = p_guess[d, s]
            t = p_transit[d, s]
            f = 0.0 if p_forget is None else p_forget[d, s]
            pa = p * ((1.0 - sl) if c else sl)
            qb = q * (g if c else (1.0 - g))
            lik = pa + qb
            pp = pa / lik
            pq = qb / lik
            S[k, 0] = pp * (1.0 - f) + pq * t
            S[k, 1] = pp * f + pq * (1.0 - t)
            S[k, 2] = ll + np.log(lik)
        row = out[d]
        for q in range(n_seqs):
            row[q] = S[seq_node[q], 2]
        if n_suf == 0:
            continue
        init = np.empty((2, n_suf))
        pi = np.empty(n_suf)
        pt = np.empty(n_suf)
        pg = np.empty(n_suf)
        ps = np.empty(n_suf)
        pf = np.zeros(n_suf)
        for j in range(n_suf):
            nd = suf_node[j]
            init[0, j] = S[nd, 0]
            init[1, j] = S[nd, 1]
            s = suf_skill[j]
            pi[j] = p_init[d, s]
            pt[j] = p_transit[d, s]
            pg[j] = p_guess[d, s]
            ps[j] = p_slip[d, s]
            if p_forget is not None:
                pf[j] = p_forget[d, s]
        suf = np.empty(n_suf)
        if p_forget is None:
            forward_logp(
                correct, block_seq, block_ev, step_ptr, step_count,
                pi, pt, pg, ps, None, suf, None, init,
            )  # fmt: skip
        else:
            forward_logp(
                correct, block_seq, block_ev, step_ptr, step_count,
                pi, pt, pg, ps, pf, suf, None, init,
            )  # fmt: skip
        for j in range(n_suf):
            row[suf_seq[j]] += suf[j]


# ---------------------------------------------------------------------------
# Item-level guess and slip (KT-IDEM).
#
# With one guess and slip per item the parameters are per event, so
# forward-mode sensitivities (one per parameter) no longer fit; the gradient
# comes from one forward pass that stores the predicted state of every event
# and one backward pass of the adjoints u_t(i) = d logL / d pi_t(i) of the
# predicted state pi_t = (p_t, q_t):
#
#   beta_t(i) = sum_j A(i, j) u_{t+1}(j)      (beta_T = 1; A the transition)
#   u_t(i)    = e_t(i) beta_t(i) / lik_t       (e_t: the emission, a or b)
#   d logL / d a_t = p_t beta_t(M) / lik_t,   d logL / d b_t = q_t beta_t(U) / lik_t
#   d logL / d T  += post_q,t (u_{t+1}(M) - u_{t+1}(U))
#   d logL / d F  += post_p,t (u_{t+1}(U) - u_{t+1}(M))
#   d logL / d p_init = u_1(M) - u_1(U)
#
# Every quantity is a sum of non-negative terms except the final differences,
# which are the gradient itself. Starting the backward pass from u = (1, 1)
# gives beta = (1, 1) and zero transition terms at a sequence's last event, so
# sequences of different lengths need no special case in the vectorised loop.


@nb.njit(**_JIT_FMA)
def forward_logp_events(
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    p_init,
    p_transit,
    ev_guess,
    ev_slip,
    p_forget,
    out_logp,
):
    """Per-sequence log-likelihood with guess and slip given per event.

    Parameters
    ----------
    correct, block_seq, block_ev, step_ptr, step_count
        The lockstep layout.
    p_init, p_transit : float64 arrays, shape (n_seqs,)
    ev_guess, ev_slip : float64 arrays, shape (n_events,)
        Guess and slip of each response's item (lockstep order).
    p_forget : float64 array, shape (n_seqs,), or None
    out_logp : float64 array, shape (n_seqs,)
        Written: log p(responses of the sequence), in nats.
    """
    if _block_size(block_seq) > _BS:
        raise ValueError(
            "forward_logp_events needs lockstep blocks of at most LIKELIHOOD_BLOCK_SIZE sequences"
        )
    W = np.zeros(6 * _BS)
    for b in range(block_seq.shape[0] - 1):
        q0 = block_seq[b]
        m = block_seq[b + 1] - q0
        for j in range(m):
            W[0 * _BS + j] = p_init[q0 + j]
            W[1 * _BS + j] = 1.0 - p_init[q0 + j]
            W[2 * _BS + j] = 1.0
            W[3 * _BS + j] = 0.0
            W[4 * _BS + j] = p_transit[q0 + j]
            W[5 * _BS + j] = 0.0 if p_forget is None else p_forget[q0 + j]
        pos = block_ev[b]
        for ti in range(step_ptr[b], step_ptr[b + 1]):
            n = step_count[ti]
            cc = correct[pos : pos + n]
            gg = ev_guess[pos : pos + n]
            ss = ev_slip[pos : pos + n]
            for j in range(n):
                p = W[0 * _BS + j]
                q = W[1 * _BS + j]
                c = cc[j] != 0
                a = (1.0 - ss[j]) if c else ss[j]
                bb = gg[j] if c else (1.0 - gg[j])
                pa = p * a
                qb = q * bb
                lik = pa + qb
                inv = 1.0 / lik
                W[2 * _BS + j] *= lik
                pp = pa * inv
                pq = qb * inv
                t = W[4 * _BS + j]
                f = W[5 * _BS + j]
                W[0 * _BS + j] = pp * (1.0 - f) + pq * t
                W[1 * _BS + j] = pp * f + pq * (1.0 - t)
            if (ti - step_ptr[b]) % _LOG_EVERY == _LOG_EVERY - 1:
                for j in range(n):
                    W[3 * _BS + j] += np.log(W[2 * _BS + j])
                    W[2 * _BS + j] = 1.0
            pos += n
        for j in range(m):
            out_logp[q0 + j] = W[3 * _BS + j] + np.log(W[2 * _BS + j])


@nb.njit(**_JIT_FMA)
def item_logp_grad(
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    ev_item,
    p_init,
    p_transit,
    item_guess,
    item_slip,
    p_forget,
    out_logp,
    out_gseq,
    out_gitem,
):
    """Log-likelihood and gradient with item-level guess and slip (KT-IDEM).

    Parameters
    ----------
    correct, block_seq, block_ev, step_ptr, step_count
        The lockstep layout.
    ev_item : int64 array, shape (n_events,)
        Item index of each response (lockstep order).
    p_init, p_transit : float64 arrays, shape (n_seqs,)
    item_guess, item_slip : float64 arrays, shape (n_items,)
    p_forget : float64 array, shape (n_seqs,), or None
    out_logp : float64 array, shape (n_seqs,)
        Written: per-sequence log-likelihood (nats).
    out_gseq : float64 array, shape (3, n_seqs)
        Written: d logp_seq / d (p_init, p_transit, p_forget) of each sequence
        (row 2 left untouched when ``p_forget`` is None).
    out_gitem : float64 array, shape (2, n_items)
        Written: d (total log-likelihood) / d (p_guess, p_slip) of each item.

    Notes
    -----
    Forward pass storing each event's predicted state, then a backward pass of
    adjoints (see the comment above this function), block by block. Scratch:
    ``2 * 128`` float64 per time step of the longest block.
    """
    if _block_size(block_seq) > _BS:
        raise ValueError(
            "item_logp_grad needs lockstep blocks of at most LIKELIHOOD_BLOCK_SIZE sequences"
        )
    # The hot loops touch only ``W``, one flat array of rows of constant
    # length (see forward_logp_grad): with a second written array, or rows at
    # a runtime offset, LLVM does not vectorise them. The predicted state of
    # every time step of a block goes to ``H`` in a separate copy loop, and
    # items' guess and slip are gathered into ``W`` rows before each step.
    max_steps = 0
    for b in range(block_seq.shape[0] - 1):
        max_steps = max(max_steps, step_ptr[b + 1] - step_ptr[b])
    H = np.empty(2 * max_steps * _BS)
    # W rows: 0 p, 1 q, 2 running product, 3 log-likelihood, 4 transit,
    # 5 forget, 6 u(M), 7 u(U), 8 d/d transit, 9 d/d forget, 10 guess,
    # 11 slip, 12 d/d guess, 13 d/d slip
    W = np.zeros(14 * _BS)
    out_gitem[:] = 0.0
    for b in range(block_seq.shape[0] - 1):
        q0 = block_seq[b]
        m = block_seq[b + 1] - q0
        for j in range(m):
            W[0 * _BS + j] = p_init[q0 + j]
            W[1 * _BS + j] = 1.0 - p_init[q0 + j]
            W[2 * _BS + j] = 1.0
            W[3 * _BS + j] = 0.0
            W[4 * _BS + j] = p_transit[q0 + j]
            W[5 * _BS + j] = 0.0 if p_forget is None else p_forget[q0 + j]
            W[6 * _BS + j] = 1.0
            W[7 * _BS + j] = 1.0
            W[8 * _BS + j] = 0.0
            W[9 * _BS + j] = 0.0
        pos = block_ev[b]
        for ti in range(step_ptr[b], step_ptr[b + 1]):
            n = step_count[ti]
            h = 2 * (ti - step_ptr[b]) * _BS
            it = ev_item[pos : pos + n]
            for j in range(n):
                W[10 * _BS + j] = item_guess[it[j]]
                W[11 * _BS + j] = item_slip[it[j]]
            hp = H[h : h + n]
            hq = H[h + _BS : h + _BS + n]
            for j in range(n):
                hp[j] = W[0 * _BS + j]
            for j in range(n):
                hq[j] = W[1 * _BS + j]
            cc = correct[pos : pos + n]
            for j in range(n):
                p = W[0 * _BS + j]
                q = W[1 * _BS + j]
                c = cc[j] != 0
                g = W[10 * _BS + j]
                sl = W[11 * _BS + j]
                a = (1.0 - sl) if c else sl
                bb = g if c else (1.0 - g)
                pa = p * a
                qb = q * bb
                lik = pa + qb
                inv = 1.0 / lik
                W[2 * _BS + j] *= lik
                pp = pa * inv
                pq = qb * inv
                t = W[4 * _BS + j]
                f = W[5 * _BS + j]
                W[0 * _BS + j] = pp * (1.0 - f) + pq * t
                W[1 * _BS + j] = pp * f + pq * (1.0 - t)
            if (ti - step_ptr[b]) % _LOG_EVERY == _LOG_EVERY - 1:
                for j in range(n):
                    W[3 * _BS + j] += np.log(W[2 * _BS + j])
                    W[2 * _BS + j] = 1.0
            pos += n
        for j in range(m):
            out_logp[q0 + j] = W[3 * _BS + j] + np.log(W[2 * _BS + j])
        # Backward pass over the same steps in reverse.
        for ti in range(step_ptr[b + 1] - 1, step_ptr[b] - 1, -1):
            n = step_count[ti]
            pos -= n
            h = 2 * (ti - step_ptr[b]) * _BS
            it = ev_item[pos : pos + n]
            for j in range(n):
                W[10 * _BS + j] = item_guess[it[j]]
                W[11 * _BS + j] = item_slip[it[j]]
            hp = H[h : h + n]
            hq = H[h + _BS : h + _BS + n]
            for j in range(n):
                W[0 * _BS + j] = hp[j]
            for j in range(n):
                W[1 * _BS + j] = hq[j]
            cc = correct[pos : pos + n]
            for j in range(n):
                p = W[0 * _BS + j]
                q = W[1 * _BS + j]
                c = cc[j] != 0
                sa = -1.0 if c else 1.0  # d a / d slip
                sb = 1.0 if c else -1.0  # d b / d guess
                g = W[10 * _BS + j]
                sl = W[11 * _BS + j]
                a = (1.0 - sl) if c else sl
                bb = g if c else (1.0 - g)
                inv = 1.0 / (p * a + q * bb)
                t = W[4 * _BS + j]
                f = W[5 * _BS + j]
                um = W[6 * _BS + j]
                uu = W[7 * _BS + j]
                bm = (1.0 - f) * um + f * uu
                bu = t * um + (1.0 - t) * uu
                W[8 * _BS + j] += q * bb * inv * (um - uu)
                W[9 * _BS + j] += p * a * inv * (uu - um)
                W[12 * _BS + j] = sb * q * bu * inv
                W[13 * _BS + j] = sa * p * bm * inv
                W[6 * _BS + j] = a * bm * inv
                W[7 * _BS + j] = bb * bu * inv
            # Items repeat within a step, so the sum back to items is scalar.
            for j in range(n):
                out_gitem[0, it[j]] += W[12 * _BS + j]
                out_gitem[1, it[j]] += W[13 * _BS + j]
        for j in range(m):
            out_gseq[0, q0 + j] = W[6 * _BS + j] - W[7 * _BS + j]
            out_gseq[1, q0 + j] = W[8 * _BS + j]
            if p_forget is not None:
                out_gseq[2, q0 + j] = W[9 * _BS + j]


@nb.njit(parallel=True, **_JIT)
def draws_logp_items(
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    ev_item,
    p_init,
    p_transit,
    item_guess,
    item_slip,
    p_forget,
    out,
):
    """:func:`draws_logp` with item-level guess and slip.

    ``item_guess`` and ``item_slip`` have shape (n_draws, n_items);
    ``ev_item`` maps each response (lockstep order) to its item.
    """
    n_ev = correct.shape[0]
    for d in nb.prange(p_init.shape[0]):
        row = np.empty(p_init.shape[1])
        g = np.empty(n_ev)
        s = np.empty(n_ev)
        for e in range(n_ev):
            g[e] = item_guess[d, ev_item[e]]
            s[e] = item_slip[d, ev_item[e]]
        if p_forget is None:
            forward_logp_events(
                correct, block_seq, block_ev, step_ptr, step_count,
                p_init[d], p_transit[d], g, s, None, row,
            )  # fmt: skip
        else:
            forward_logp_events(
                correct, block_seq, block_ev, step_ptr, step_count,
                p_init[d], p_transit[d], g, s, p_forget[d], row,
            )  # fmt: skip
        out[d] = row
