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
    """Sum over every hidden path (same guess and slip for every response)."""
    return _brute_force_events(y, p0, t, [g] * len(y), [s] * len(y), f)


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


def _mastery_then_errors(seed, n=1200):
    """Long runs of correct answers (P(mastery) within 1e-15 of 1), then
    runs of errors, as one packed sequence."""
    rng = np.random.default_rng(seed)
    y = []
    while len(y) < n:
        y += [1] * int(rng.integers(50, 200)) + [0] * int(rng.integers(1, 12))
    y = np.array(y[:n], dtype=np.uint8)
    zero = np.zeros(y.size, dtype=np.int64)
    return y, pack_codes(zero, zero, np.arange(y.size), y), rng


def _mp_forward(y, p0, t, g, s, f):
    """Forward algorithm at 50 significant digits; returns log-likelihood."""
    return _mp_forward_events(y, p0, t, [g] * len(y), [s] * len(y), f)


@pytest.mark.parametrize("forgetting", [False, True])
def test_long_sequences_with_errors_after_mastery(forgetting):
    # 1,200 responses: long runs of correct answers drive P(mastery) to within
    # 1e-15 of 1, then runs of errors. The unstable form 1 - G - p (1 - S - G)
    # goes nan here; the kernel must match 50-digit arithmetic, value and
    # gradient (mpmath central differences with h = 1e-20).
    y, pk, _ = _mastery_then_errors(3)
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
        # Per-skill columns gathered inside the kernel: the same numbers.
        col = rng.integers(0, 3, pk.n_seqs)
        per_col = [x[:, :3].copy() for x in prm]
        fc = None if f is None else f[:, :3].copy()
        out_c = np.empty((n_draws, pk.n_seqs))
        draws_logp(*_layout(pk), *per_col, fc, out_c, col)
        out_g = np.empty((n_draws, pk.n_seqs))
        draws_logp(
            *_layout(pk), *(x[:, col] for x in per_col), None if fc is None else fc[:, col], out_g
        )
        np.testing.assert_array_equal(out_c, out_g)


# --- item-level guess and slip (forward pass + backward adjoints) ----------


def _lock_seq_of_event(pk):
    """Lockstep sequence index of every event, in lockstep order."""
    ev_seq = np.empty(pk.n_events, dtype=np.int64)
    for k in range(pk.n_seqs):
        ev_seq[pk.csr_row[pk.seq_start[k] : pk.seq_start[k] + pk.seq_len[k]]] = k
    return pk.to_lockstep(ev_seq)


@pytest.mark.parametrize("forgetting", [False, True])
def test_item_kernel_with_one_item_per_sequence_equals_forward_mode(forgetting):
    # Two independent derivations: forward-mode sensitivities per sequence and
    # the backward adjoint pass with each sequence as its own item.
    from bktbayes.likelihood import item_logp_grad

    rng = np.random.default_rng(11)
    pk, _ = _random_packed(rng, 500, 60, block_size=LIKELIHOOD_BLOCK_SIZE)
    prm = _params(rng, pk.n_seqs, forgetting)
    out = np.empty(pk.n_seqs)
    grad = np.zeros((5, pk.n_seqs))
    forward_logp_grad(*_layout(pk), *prm, out, grad)
    out2 = np.empty(pk.n_seqs)
    gseq = np.zeros((3, pk.n_seqs))
    gitem = np.zeros((2, pk.n_seqs))
    item_logp_grad(
        *_layout(pk), _lock_seq_of_event(pk), prm[0], prm[1], prm[2], prm[3], prm[4],
        out2, gseq, gitem,
    )  # fmt: skip
    # Same maths in a different order of operations: agreement to ~1e-13
    # relative on values of order 10-100 nats.
    np.testing.assert_allclose(out2, out, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(gseq[0], grad[0], rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(gseq[1], grad[1], rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(gitem[0], grad[2], rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(gitem[1], grad[3], rtol=1e-11, atol=1e-11)
    if forgetting:
        np.testing.assert_allclose(gseq[2], grad[4], rtol=1e-11, atol=1e-11)


def _brute_force_events(y, p0, t, gs, ss, f):
    total = 0.0
    for path in itertools.product([0, 1], repeat=len(y)):
        pr = p0 if path[0] else 1 - p0
        for k, (m, obs) in enumerate(zip(path, y, strict=True)):
            g, s = gs[k], ss[k]
            pr *= ((1 - s) if obs else s) if m else (g if obs else 1 - g)
            if k + 1 < len(y):
                nxt = path[k + 1]
                pr *= ((1 - f) if nxt else f) if m else (t if nxt else 1 - t)
        total += pr
    return np.log(total)


@pytest.mark.parametrize("forgetting", [False, True])
def test_item_kernels_equal_brute_force_and_finite_differences(forgetting):
    from bktbayes.likelihood import forward_logp_events, item_logp_grad

    rng = np.random.default_rng(12)
    pk, correct = _random_packed(rng, 40, 9)
    n_items = 6
    item_row = rng.integers(0, n_items, pk.n_events)  # input row order
    ev_item = pk.to_lockstep(item_row)
    prm = _params(rng, pk.n_seqs, forgetting)
    ig = rng.uniform(0.05, 0.4, n_items)
    isl = rng.uniform(0.02, 0.3, n_items)
    out = np.empty(pk.n_seqs)
    out_v = np.empty(pk.n_seqs)
    gseq = np.zeros((3, pk.n_seqs))
    gitem = np.zeros((2, n_items))
    item_logp_grad(*_layout(pk), ev_item, prm[0], prm[1], ig, isl, prm[4], out, gseq, gitem)
    forward_logp_events(*_layout(pk), prm[0], prm[1], ig[ev_item], isl[ev_item], prm[4], out_v)
    for q in range(pk.n_seqs):
        rows = pk.csr_row[pk.seq_start[q] : pk.seq_start[q] + pk.seq_len[q]]
        f = 0.0 if prm[4] is None else prm[4][q]
        ref = _brute_force_events(
            correct[rows], prm[0][q], prm[1][q], ig[item_row[rows]], isl[item_row[rows]], f
        )
        assert out[q] == pytest.approx(ref, abs=1e-12)
        assert out_v[q] == pytest.approx(ref, abs=1e-12)

    def total(ig_, isl_, seq=None):
        o = np.empty(pk.n_seqs)
        p = [prm[0], prm[1], prm[4]] if seq is None else seq
        forward_logp_events(*_layout(pk), p[0], p[1], ig_[ev_item], isl_[ev_item], p[2], o)
        return o

    h = 1e-6
    # Central differences: truncation ~1e-10, rounding ~eps |f| / h ~ 1e-8.
    for k in range(n_items):
        e = np.zeros(n_items)
        e[k] = h
        fd_g = (total(ig + e, isl).sum() - total(ig - e, isl).sum()) / (2 * h)
        fd_s = (total(ig, isl + e).sum() - total(ig, isl - e).sum()) / (2 * h)
        assert gitem[0, k] == pytest.approx(fd_g, rel=1e-6, abs=1e-6)
        assert gitem[1, k] == pytest.approx(fd_s, rel=1e-6, abs=1e-6)
    for r, idx in ((0, 0), (1, 1), (2, 4)):
        if prm[idx] is None:
            continue
        up = [prm[0].copy(), prm[1].copy(), None if prm[4] is None else prm[4].copy()]
        dn = [prm[0].copy(), prm[1].copy(), None if prm[4] is None else prm[4].copy()]
        up[r] += h
        dn[r] -= h
        fd = (total(ig, isl, up) - total(ig, isl, dn)) / (2 * h)
        np.testing.assert_allclose(gseq[r], fd, rtol=1e-6, atol=1e-6)


def _mp_forward_events(y, p0, t, gs, ss, f):
    mpmath.mp.dps = 50
    p, q = mpmath.mpf(p0), 1 - mpmath.mpf(p0)
    t, f = mpmath.mpf(t), mpmath.mpf(f)
    ll = mpmath.mpf(0)
    for obs, g, s in zip(y, gs, ss, strict=True):
        g, s = mpmath.mpf(g), mpmath.mpf(s)
        a = (1 - s) if obs else s
        b = g if obs else (1 - g)
        lik = p * a + q * b
        ll += mpmath.log(lik)
        pp, pq = p * a / lik, q * b / lik
        p, q = pp * (1 - f) + pq * t, pp * f + pq * (1 - t)
    return ll


@pytest.mark.parametrize("forgetting", [False, True])
def test_item_kernel_long_sequence_with_errors_after_mastery(forgetting):
    # As test_long_sequences_with_errors_after_mastery, with three items: the
    # backward adjoints must stay finite and match 50-digit arithmetic.
    from bktbayes.likelihood import item_logp_grad

    y, pk, rng = _mastery_then_errors(13)
    items = rng.integers(0, 3, y.size)
    ig = [0.25, 0.15, 0.35]
    isl = [0.002, 0.01, 0.005]
    theta = [0.4, 0.3, 0.01 if forgetting else 0.0]
    out = np.empty(1)
    gseq = np.zeros((3, 1))
    gitem = np.zeros((2, 3))
    item_logp_grad(
        *_layout(pk), pk.to_lockstep(items), np.array([theta[0]]), np.array([theta[1]]),
        np.array(ig), np.array(isl), np.array([theta[2]]) if forgetting else None,
        out, gseq, gitem,
    )  # fmt: skip

    def mp(th, g_, s_):
        return _mp_forward_events(
            y, th[0], th[1], [g_[i] for i in items], [s_[i] for i in items], th[2]
        )

    assert np.isfinite(out[0])
    assert out[0] == pytest.approx(float(mp(theta, ig, isl)), rel=1e-12)
    h = mpmath.mpf("1e-20")
    mg = [mpmath.mpf(v) for v in ig]
    ms = [mpmath.mpf(v) for v in isl]
    mt = [mpmath.mpf(v) for v in theta]
    for k in range(3):
        for which, row in ((mg, 0), (ms, 1)):
            up, dn = list(which), list(which)
            up[k] += h
            dn[k] -= h
            args_up = (up, ms) if row == 0 else (mg, up)
            args_dn = (dn, ms) if row == 0 else (mg, dn)
            d = (mp(mt, *args_up) - mp(mt, *args_dn)) / (2 * h)
            assert gitem[row, k] == pytest.approx(float(d), rel=1e-8, abs=1e-8)
    for r in range(3 if forgetting else 2):
        up, dn = list(mt), list(mt)
        up[r] += h
        dn[r] -= h
        d = (mp(up, mg, ms) - mp(dn, mg, ms)) / (2 * h)
        assert gseq[r, 0] == pytest.approx(float(d), rel=1e-8, abs=1e-8)


def test_draws_logp_items_matches_one_draw_at_a_time():
    from bktbayes.likelihood import draws_logp_items, forward_logp_events

    rng = np.random.default_rng(14)
    pk, _ = _random_packed(rng, 300, 25, block_size=LIKELIHOOD_BLOCK_SIZE)
    ev_item = rng.integers(0, 9, pk.n_events)
    n_draws = 5
    pi, ptr = (rng.uniform(0.05, 0.45, (n_draws, pk.n_seqs)) for _ in range(2))
    ig, isl = (rng.uniform(0.05, 0.3, (n_draws, 9)) for _ in range(2))
    forget = rng.uniform(0.0, 0.3, (n_draws, pk.n_seqs))
    for f in (None, forget):
        out = np.empty((n_draws, pk.n_seqs))
        draws_logp_items(*_layout(pk), ev_item, pi, ptr, ig, isl, f, out)
        for d in range(n_draws):
            one = np.empty(pk.n_seqs)
            fd = None if f is None else f[d]
            forward_logp_events(
                *_layout(pk), pi[d], ptr[d], ig[d][ev_item], isl[d][ev_item], fd, one
            )
            np.testing.assert_array_equal(out[d], one)


# ---------------------------------------------------------------------------
# Prefix sharing (models with per-skill parameters).


def _skill_data(rng, n_seq, n_skill, max_len):
    """Sequences with many shared prefixes: few skills, short responses
    patterns drawn from a skewed distribution, lengths 1..max_len."""
    lens = rng.integers(1, max_len + 1, n_seq)
    user = np.repeat(np.arange(n_seq), lens)
    skill = np.repeat(rng.integers(0, n_skill, n_seq), lens)
    correct = (rng.random(user.size) < 0.75).astype(np.uint8)
    pk = pack_codes(user, skill, np.arange(user.size), correct, block_size=LIKELIHOOD_BLOCK_SIZE)
    return pk, correct


def _prefix_args(pl, prm, out_grad):
    sp = pl.suffix
    return (
        pl.node_parent,
        pl.node_skill,
        pl.node_y,
        pl.node_w,
        sp.lock_correct,
        sp.block_seq,
        sp.block_ev,
        sp.step_ptr,
        sp.step_count,
        pl.suf_node,
        pl.suf_skill,
        *prm,
        out_grad,
    )


@pytest.mark.parametrize("forgetting", [False, True])
@pytest.mark.parametrize("depth", [1, 3, 6, None, 1000])
def test_prefix_kernel_equals_lockstep_kernel(forgetting, depth):
    from bktbayes.likelihood import prefix_total_logp_grad, skill_total_logp_grad
    from bktbayes.packing import prefix_layout

    rng = np.random.default_rng(11)
    n_skill = 4
    pk, correct = _skill_data(rng, 400, n_skill, 25)
    prm = _params(rng, n_skill, forgetting)
    g_ref = np.zeros((5, n_skill))
    ref = skill_total_logp_grad(*_layout(pk), pk.seq_skill, *prm, g_ref)
    pl = prefix_layout(
        pk.seq_skill,
        pk.seq_start,
        pk.seq_len,
        correct[pk.csr_row],
        depth=depth,
        block_size=LIKELIHOOD_BLOCK_SIZE,
    )
    # The layout represents every event once: trie steps weighted by the
    # sequences through them, plus the suffixes.
    assert pl.node_w.sum() + pl.suffix.n_events == pk.n_events
    assert pl.n_nodes < pk.n_events  # prefixes were shared
    if depth == 1000:
        assert pl.suffix.n_events == 0
    g = np.zeros((5, n_skill))
    total = prefix_total_logp_grad(*_prefix_args(pl, prm, g))
    # Same terms summed in another order: ~n_events * eps relative.
    assert total == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-9)


def test_prefix_kernel_equals_brute_force():
    from bktbayes.likelihood import prefix_total_logp_grad
    from bktbayes.packing import prefix_layout

    rng = np.random.default_rng(12)
    pk, correct = _skill_data(rng, 60, 2, 8)
    prm = _params(rng, 2, True)
    pl = prefix_layout(pk.seq_skill, pk.seq_start, pk.seq_len, correct[pk.csr_row], depth=3)
    total = prefix_total_logp_grad(*_prefix_args(pl, prm, np.zeros((5, 2))))
    ref = 0.0
    for q in range(pk.n_seqs):
        s = pk.seq_skill[q]
        ref += _brute_force(
            _seq_responses(pk, correct, q), prm[0][s], prm[1][s], prm[2][s], prm[3][s], prm[4][s]
        )
    assert total == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("forgetting", [False, True])
@pytest.mark.parametrize("depth", [1, 4, None, 1000])
def test_draws_prefix_logp_equals_draws_logp(forgetting, depth):
    """Pointwise log-likelihood over a prefix trie = stepping every sequence."""
    from bktbayes.likelihood import draws_logp, draws_prefix_logp
    from bktbayes.packing import prefix_layout

    rng = np.random.default_rng(13)
    n_skill, n_draws = 5, 7
    pk, correct = _skill_data(rng, 300, n_skill, 30)
    draws = [_params(rng, n_skill, forgetting) for _ in range(n_draws)]
    stacked = [
        None if draws[0][k] is None else np.ascontiguousarray([d[k] for d in draws])
        for k in range(5)
    ]
    ref = np.empty((n_draws, pk.n_seqs))
    draws_logp(*_layout(pk), *stacked, ref, pk.seq_skill.astype(np.int64))
    pl = prefix_layout(
        pk.seq_skill,
        pk.seq_start,
        pk.seq_len,
        correct[pk.csr_row],
        depth=depth,
        block_size=LIKELIHOOD_BLOCK_SIZE,
    )
    # Every sequence ends at a node of its own skill, at level min(len, depth).
    assert (pl.node_skill[pl.seq_node] == pk.seq_skill).all()
    assert (pk.seq_len[pl.suf_seq] > pl.depth).all()
    assert len(np.unique(pl.suf_seq)) == pl.suffix.n_seqs == (pk.seq_len > pl.depth).sum()
    sp = pl.suffix
    out = np.full((n_draws, pk.n_seqs), np.nan)
    draws_prefix_logp(
        pl.node_parent, pl.node_skill, pl.node_y,
        sp.lock_correct, sp.block_seq, sp.block_ev, sp.step_ptr, sp.step_count,
        pl.suf_node, pl.suf_skill, pl.seq_node, pl.suf_seq,
        *stacked, out,
    )  # fmt: skip
    # The same products, logged at other points: rounding only.
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    # A mismatched output array is an error, not a write past its end.
    args = (
        pl.node_parent, pl.node_skill, pl.node_y,
        sp.lock_correct, sp.block_seq, sp.block_ev, sp.step_ptr, sp.step_count,
        pl.suf_node, pl.suf_skill, pl.seq_node, pl.suf_seq, *stacked,
    )  # fmt: skip
    with pytest.raises(ValueError, match="one row per draw"):
        draws_prefix_logp(*args, np.empty((n_draws - 1, pk.n_seqs)))
    with pytest.raises(ValueError, match="one column per sequence"):
        draws_prefix_logp(*args, np.empty((n_draws, pk.n_seqs - 1)))


def test_prefix_layout_rejects_bad_input():
    from bktbayes.packing import prefix_layout

    with pytest.raises(ValueError, match="depth"):
        prefix_layout([0], [0], [1], [1], depth=0)
    with pytest.raises(ValueError, match="at least one response"):
        prefix_layout([0, 0], [0, 1], [1, 0], [1], depth=2)


@pytest.mark.parametrize("guess_slip", ["ordered", "ordered_guess_first", "bounded"])
@pytest.mark.parametrize("n_par", [4, 5])
def test_skill_logits_kernel_matches_the_model_mapping_and_finite_differences(guess_slip, n_par):
    # The fast estimate's kernel maps logits to probabilities itself; it must
    # be the model's mapping (natural_params) and its chain rule must be right.
    from bktbayes.likelihood import skill_logp_grad
    from bktbayes.models import GROUPS, _gs_modes, natural_params

    rng = np.random.default_rng(21)
    lens = rng.integers(1, 30, 90)
    user = np.repeat(np.arange(90), lens)
    skill = np.repeat(rng.integers(0, 3, 90), lens)
    correct = rng.integers(0, 2, user.size).astype(np.uint8)
    pk = pack_codes(user, skill, np.arange(user.size), correct, block_size=LIKELIHOOD_BLOCK_SIZE)
    x = rng.normal(-0.5, 0.8, (n_par, 3))
    mode = _gs_modes()[guess_slip]

    def run(xx):
        lp, g = np.empty(3), np.empty((n_par, 3))
        skill_logp_grad(*_layout(pk), pk.seq_skill, xx, mode, lp, g)
        return lp, g

    lp, g = run(x)
    nat = natural_params(dict(zip(GROUPS, x, strict=False)), guess_slip)
    assert np.all(nat["p_guess"] + nat["p_slip"] < 1)
    per_seq = np.empty(pk.n_seqs)
    sk = pk.seq_skill
    forward_logp(
        *_layout(pk),
        *(nat[k][sk] for k in ("p_init", "p_transit", "p_guess", "p_slip")),
        nat["p_forget"][sk] if n_par == 5 else None,
        per_seq,
    )
    np.testing.assert_allclose(lp, np.bincount(sk, weights=per_seq, minlength=3), rtol=1e-12)
    h = 1e-6
    for k in range(n_par):
        e = np.zeros_like(x)
        e[k] = h
        fd = (run(x + e)[0] - run(x - e)[0]) / (2 * h)
        # Central differences on ~100-nat sums: rounding ~1e-16 * 100 / 1e-6.
        np.testing.assert_allclose(g[k], fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gs_mode", [0, 1, 2])
@pytest.mark.parametrize("n_par", [4, 5])
def test_points_logp_equals_the_brute_force_and_the_skill_kernel(gs_mode, n_par):
    """One set of sequences at many parameter vectors (modes.skill_loglik_many)
    against brute-force enumeration of hidden paths (short sequences) and the
    lockstep skill kernel (with a 1,200-response sequence of error runs after
    mastery, where a cancelling form would lose digits)."""
    from bktbayes.likelihood import points_logp, skill_logp_grad

    rng = np.random.default_rng(11 + gs_mode + n_par)
    lens = rng.integers(1, 9, 12)
    y = rng.integers(0, 2, lens.sum()).astype(np.uint8)
    starts = np.r_[0, np.cumsum(lens)[:-1]].astype(np.int64)
    x = rng.normal(0, 1.5, (n_par, 7))
    out = np.empty(7)
    points_logp(y, starts, lens.astype(np.int64), x, gs_mode, out)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for j in range(7):
        pi, t = sig(x[0, j]), sig(x[1, j])
        if gs_mode == 0:
            s_, g = sig(-x[3, j]), sig(x[3, j]) * sig(x[2, j])
        elif gs_mode == 1:
            g, s_ = sig(x[2, j]), (1 - sig(x[2, j])) * sig(-x[3, j])
        else:
            g, s_ = 0.5 * sig(x[2, j]), 0.5 * sig(x[3, j])
        f = (1 - t) * sig(x[4, j]) if n_par == 5 else 0.0
        ref = sum(
            _brute_force(y[a : a + n], pi, t, g, s_, f) for a, n in zip(starts, lens, strict=True)
        )
        assert out[j] == pytest.approx(ref, rel=1e-12, abs=1e-10)
    # Long sequences: against the lockstep kernel, one "skill" per point.
    long = np.r_[np.ones(600), np.tile([0, 0, 1, 1, 1], 120)].astype(np.uint8)
    lens2 = np.array([long.size, 3, 40])
    y2 = np.r_[long, rng.integers(0, 2, 43)].astype(np.uint8)
    starts2 = np.r_[0, np.cumsum(lens2)[:-1]].astype(np.int64)
    out2 = np.empty(7)
    points_logp(y2, starts2, lens2.astype(np.int64), x, gs_mode, out2)
    n_pt = x.shape[1]
    seq = np.repeat(np.arange(3 * n_pt), np.tile(lens2, n_pt))
    skill = np.repeat(np.arange(n_pt), y2.size)
    pk = pack_codes(seq, skill, np.arange(seq.size), np.tile(y2, n_pt), n_skill=n_pt,
                    block_size=LIKELIHOOD_BLOCK_SIZE)  # fmt: skip
    lp = np.zeros(n_pt)
    skill_logp_grad(*_layout(pk), pk.seq_skill, x, gs_mode, lp, np.zeros_like(x))
    np.testing.assert_allclose(out2, lp, rtol=1e-11)
