"""The likelihood kernels against independent references.

References: brute-force enumeration of every hidden path (short sequences),
mpmath at 50 digits (long sequences, value and gradient), finite differences,
the plain pytensor.scan twin, and the serving tracer (filtered P(mastery)).
"""

import itertools

import mpmath
import numpy as np
import pytest

from bktbayes.likelihood import LIKELIHOOD_BLOCK_SIZE, forward_logp, forward_logp_grad
from bktbayes.packing import pack_codes
from bktbayes.params import BKTParams, ParamTable
from bktbayes.tracing import replay


def _layout(pk):
    return (pk.lock_correct, pk.block_seq, pk.block_ev, pk.step_ptr, pk.step_count)


def _random_packed(rng, n_seq, max_len, block_size=7):
    lens = rng.integers(1, max_len + 1, n_seq)
    user = np.repeat(np.arange(n_seq), lens)
    correct = rng.integers(0, 2, user.size).astype(np.uint8)
    pk = pack_codes(user, np.zeros_like(user), np.arange(user.size), correct, block_size=block_size)
    return pk, correct


def _seq_responses(pk, correct, q):
    rows = pk.csr_row[pk.seq_start[q] : pk.seq_start[q] + pk.seq_len[q]]
    return correct[rows]


def _brute_force(y, p0, t, g, s, f):
    total = 0.0
    for path in itertools.product([0, 1], repeat=len(y)):
        pr = p0 if path[0] else 1 - p0
        for k, (m, obs) in enumerate(zip(path, y, strict=True)):
            pr *= ((1 - s) if obs else s) if m else (g if obs else 1 - g)
            if k + 1 < len(y):
                nxt = path[k + 1]
                pr *= ((1 - f) if nxt else f) if m else (t if nxt else 1 - t)
        total += pr
    return np.log(total)


def _params(rng, n, forgetting):
    p = [
        rng.uniform(0.05, 0.6, n),
        rng.uniform(0.02, 0.5, n),
        rng.uniform(0.05, 0.4, n),
        rng.uniform(0.02, 0.3, n),
    ]
    p.append(rng.uniform(0.0, 0.3, n) if forgetting else None)
    return p


@pytest.mark.parametrize("forgetting", [False, True])
def test_value_equals_brute_force_enumeration(forgetting):
    rng = np.random.default_rng(1)
    pk, correct = _random_packed(rng, 40, 9)
    prm = _params(rng, pk.n_seqs, forgetting)
    out = np.empty(pk.n_seqs)
    out2 = np.empty(pk.n_seqs)
    grad = np.zeros((5, pk.n_seqs))
    forward_logp(*_layout(pk), *prm, out)
    forward_logp_grad(*_layout(pk), *prm, out2, grad)
    for q in range(pk.n_seqs):
        f = 0.0 if prm[4] is None else prm[4][q]
        ref = _brute_force(
            _seq_responses(pk, correct, q), prm[0][q], prm[1][q], prm[2][q], prm[3][q], f
        )
        assert out[q] == pytest.approx(ref, abs=1e-12)
        assert out2[q] == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("forgetting", [False, True])
def test_gradient_equals_finite_differences(forgetting):
    rng = np.random.default_rng(2)
    pk, _ = _random_packed(rng, 60, 30)
    prm = _params(rng, pk.n_seqs, forgetting)
    out = np.empty(pk.n_seqs)
    grad = np.zeros((5, pk.n_seqs))
    forward_logp_grad(*_layout(pk), *prm, out, grad)
    n_par = 5 if forgetting else 4
    h = 1e-6
    for k in range(n_par):
        up = [None if x is None else x.copy() for x in prm]
        dn = [None if x is None else x.copy() for x in prm]
        up[k] += h
        dn[k] -= h
        lu, ld = np.empty(pk.n_seqs), np.empty(pk.n_seqs)
        forward_logp(*_layout(pk), *up, lu)
        forward_logp(*_layout(pk), *dn, ld)
        fd = (lu - ld) / (2 * h)
        # Central differences: truncation O(h^2 f''') ~1e-10, rounding
        # ~eps |f| / h ~ 1e-8 for |f| ~ 50 nats.
        np.testing.assert_allclose(grad[k], fd, rtol=1e-6, atol=1e-6)


def _mp_forward(y, p0, t, g, s, f):
    """Forward algorithm at 50 significant digits; returns log-likelihood."""
    mpmath.mp.dps = 50
    p, q = mpmath.mpf(p0), 1 - mpmath.mpf(p0)
    t, g, s, f = (mpmath.mpf(x) for x in (t, g, s, f))
    ll = mpmath.mpf(0)
    for obs in y:
        a = (1 - s) if obs else s
        b = g if obs else (1 - g)
        lik = p * a + q * b
        ll += mpmath.log(lik)
        pp, pq = p * a / lik, q * b / lik
        p, q = pp * (1 - f) + pq * t, pp * f + pq * (1 - t)
    return ll


@pytest.mark.parametrize("forgetting", [False, True])
def test_long_sequences_with_errors_after_mastery(forgetting):
    # 1,200 responses: long runs of correct answers drive P(mastery) to within
    # 1e-15 of 1, then runs of errors. The unstable form 1 - G - p (1 - S - G)
    # goes nan here; the kernel must match 50-digit arithmetic, value and
    # gradient (mpmath central differences with h = 1e-20).
    rng = np.random.default_rng(3)
    y = []
    while len(y) < 1200:
        y += [1] * int(rng.integers(50, 200)) + [0] * int(rng.integers(1, 12))
    y = np.array(y[:1200], dtype=np.uint8)
    pk = pack_codes(
        np.zeros(y.size, dtype=np.int64), np.zeros(y.size, dtype=np.int64), np.arange(y.size), y
    )
    theta = [0.4, 0.3, 0.25, 0.002, 0.01 if forgetting else 0.0]
    prm = [np.array([v]) for v in theta[:4]] + [np.array([theta[4]]) if forgetting else None]
    out = np.empty(1)
    grad = np.zeros((5, 1))
    forward_logp_grad(*_layout(pk), *prm, out, grad)
    ref = _mp_forward(y, *theta)
    assert np.isfinite(out[0])
    assert out[0] == pytest.approx(float(ref), rel=1e-12)
    h = mpmath.mpf("1e-20")
    for k in range(5 if forgetting else 4):
        up = [mpmath.mpf(v) for v in theta]
        dn = [mpmath.mpf(v) for v in theta]
        up[k] += h
        dn[k] -= h
        d = (_mp_forward(y, *up) - _mp_forward(y, *dn)) / (2 * h)
        assert grad[k, 0] == pytest.approx(float(d), rel=1e-8, abs=1e-8)


def test_filter_equals_serving_tracer():
    # The likelihood's filtered P(mastery) is the tracer's, to 1e-10.
    rng = np.random.default_rng(4)
    n = 20_000
    ev = {
        "user_id": rng.integers(0, 400, n),
        "skill": rng.integers(0, 6, n).astype(str),
        "correct": rng.integers(0, 2, n),
        "order": rng.permutation(n),
    }
    table = ParamTable(
        {
            str(k): BKTParams(*rng.uniform(0.05, 0.45, 4), p_forget=rng.uniform(0, 0.2))
            for k in range(6)
        }
    )
    res = replay(ev, table)
    skills = np.unique(ev["skill"])
    pk = pack_codes(
        ev["user_id"],
        np.searchsorted(skills, ev["skill"]),
        ev["order"],
        ev["correct"],
        block_size=LIKELIHOOD_BLOCK_SIZE,
    )
    mat = np.array([table[s].as_tuple() for s in skills])[pk.seq_skill]
    out = np.empty(pk.n_seqs)
    mast = np.empty(n)
    forward_logp(*_layout(pk), *(np.ascontiguousarray(mat[:, i]) for i in range(5)), out, mast)
    np.testing.assert_allclose(pk.from_lockstep(mast), res.p_mastery, rtol=0, atol=1e-10)


def test_log_every_keeps_long_products_finite():
    # 5,000 steps of small likelihoods: the running product is logged every
    # few steps, so it never underflows.
    y = np.zeros(5000, dtype=np.uint8)
    pk = pack_codes(
        np.zeros(y.size, dtype=np.int64), np.zeros(y.size, dtype=np.int64), np.arange(y.size), y
    )
    out = np.empty(1)
    prm = [np.array([0.999]), np.array([0.5]), np.array([0.01]), np.array([0.01]), None]
    forward_logp(*_layout(pk), *prm, out)
    assert np.isfinite(out[0]) and out[0] < -1000


def test_draws_logp_matches_one_draw_at_a_time():
    from bktbayes.likelihood import draws_logp

    rng = np.random.default_rng(5)
    pk, _ = _random_packed(rng, 300, 25, block_size=LIKELIHOOD_BLOCK_SIZE)
    n_draws = 7
    prm = [rng.uniform(0.05, 0.45, (n_draws, pk.n_seqs)) for _ in range(4)]
    forget = rng.uniform(0.0, 0.3, (n_draws, pk.n_seqs))
    for f in (None, forget):
        out = np.empty((n_draws, pk.n_seqs))
        draws_logp(*_layout(pk), *prm, f, out)
        for d in range(n_draws):
            one = np.empty(pk.n_seqs)
            forward_logp(*_layout(pk), *(x[d] for x in prm), None if f is None else f[d], one)
            np.testing.assert_array_equal(out[d], one)
