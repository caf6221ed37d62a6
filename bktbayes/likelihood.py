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
    "LIKELIHOOD_BLOCK_SIZE",
    "forward_logp",
    "forward_logp_grad",
]

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
# FMA contraction only (no reassociation): fewer instructions, at least as accurate.
_JIT_FMA = {**_JIT, "fastmath": {"contract"}}

#: Steps between logarithms of the running likelihood product. A step's
#: likelihood is at least min(G, 1 - G, S, 1 - S); 8 steps underflow only
#: if that minimum is below 1e-38, far outside any prior's support.
_LOG_EVERY = 8


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
    """
    bs = _block_size(block_seq)
    P = np.empty(bs)
    Q = np.empty(bs)
    PR = np.empty(bs)
    LL = np.empty(bs)
    for b in range(block_seq.shape[0] - 1):
        q0 = block_seq[b]
        m = block_seq[b + 1] - q0
        for j in range(m):
            P[j] = p_init[q0 + j]
            Q[j] = 1.0 - p_init[q0 + j]
            PR[j] = 1.0
            LL[j] = 0.0
        S = p_slip[q0 : q0 + m]
        G = p_guess[q0 : q0 + m]
        T = p_transit[q0 : q0 + m]
        pos = block_ev[b]
        for ti in range(step_ptr[b], step_ptr[b + 1]):
            n = step_count[ti]
            cc = correct[pos : pos + n]
            for j in range(n):
                p = P[j]
                q = Q[j]
                c = cc[j] != 0
                a = (1.0 - S[j]) if c else S[j]
                bb = G[j] if c else (1.0 - G[j])
                pa = p * a
                qb = q * bb
                lik = pa + qb
                inv = 1.0 / lik
                PR[j] *= lik
                pp = pa * inv
                pq = qb * inv
                if p_forget is None:
                    P[j] = pp + pq * T[j]
                    Q[j] = pq * (1.0 - T[j])
                else:
                    f = p_forget[q0 + j]
                    P[j] = pp * (1.0 - f) + pq * T[j]
                    Q[j] = pp * f + pq * (1.0 - T[j])
                if out_mast is not None:
                    out_mast[pos + j] = P[j]
            if (ti - step_ptr[b]) % _LOG_EVERY == _LOG_EVERY - 1:
                for j in range(n):
                    LL[j] += np.log(PR[j])
                    PR[j] = 1.0
            pos += n
        for j in range(m):
            out_logp[q0 + j] = LL[j] + np.log(PR[j])


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
            W[_P * _BS + j] = p_init[q0 + j]
            W[_Q * _BS + j] = 1.0 - p_init[q0 + j]
            W[_PR * _BS + j] = 1.0
            W[_LL * _BS + j] = 0.0
            W[_DP * _BS + j] = 1.0
            for k in range(1, 5):
                W[(_DP + k) * _BS + j] = 0.0
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
