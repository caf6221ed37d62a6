"""The PyTensor Op: value and gradient against the scan twin, verify_grad,
NUMBA-mode compilation without the Python fallback."""

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from pytensor.gradient import verify_grad

from bktbayes.likelihood import LIKELIHOOD_BLOCK_SIZE
from bktbayes.ops import BKTLogLik, bkt_loglik, layout_inputs, scan_loglik
from bktbayes.packing import pack_codes


@pytest.fixture(scope="module")
def packed():
    rng = np.random.default_rng(0)
    n = 2500
    user = rng.integers(0, 80, n)
    skill = rng.integers(0, 3, n)
    correct = rng.integers(0, 2, n).astype(np.uint8)
    pk = pack_codes(user, skill, rng.permutation(n), correct, block_size=LIKELIHOOD_BLOCK_SIZE)
    return pk, correct


def _padded(pk, correct):
    L = int(pk.seq_len.max())
    y = np.zeros((L, pk.n_seqs), dtype=np.int64)
    m = np.zeros((L, pk.n_seqs))
    for q in range(pk.n_seqs):
        rows = pk.csr_row[pk.seq_start[q] : pk.seq_start[q] + pk.seq_len[q]]
        y[: len(rows), q] = correct[rows]
        m[: len(rows), q] = 1.0
    return y, m


def _nat(x, forgetting):
    p = pt.sigmoid(x)
    f = (1 - p[1]) * p[4] if forgetting else None
    return p[0], p[1], p[2] * 0.5, p[3] * 0.5, f


@pytest.mark.parametrize("forgetting", [False, True])
def test_op_matches_scan_twin_value_and_gradient(packed, forgetting):
    pk, correct = packed
    x = pt.dmatrix("x")
    data = layout_inputs(pk)
    total = bkt_loglik(data, *_nat(x, forgetting)).sum()
    f = pytensor.function([x], [total, pytensor.grad(total, x)], mode="NUMBA")
    y, m = _padded(pk, correct)
    twin = scan_loglik(pt.as_tensor(y), pt.as_tensor(m), *_nat(x, forgetting)).sum()
    g = pytensor.function([x], [twin, pytensor.grad(twin, x)])
    xv = np.random.default_rng(1).normal(-1, 0.7, (5, pk.n_seqs))
    v1, g1 = f(xv)
    v2, g2 = g(xv)
    assert v1 == pytest.approx(v2, rel=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-10)


def test_verify_grad(packed):
    pk, _ = packed
    data = layout_inputs(pk)
    xv = np.random.default_rng(2).normal(-1, 0.5, (5, pk.n_seqs))
    verify_grad(
        lambda x: bkt_loglik(data, *_nat(x, True)).sum(),
        [xv],
        rng=np.random.default_rng(3),
        mode="NUMBA",
    )


def test_numba_mode_never_calls_perform(packed, monkeypatch):
    pk, _ = packed

    def boom(*args, **kwargs):
        raise AssertionError("BKTLogLik.perform called: the numba registration was bypassed")

    monkeypatch.setattr(BKTLogLik, "perform", boom)
    x = pt.dmatrix("x")
    total = bkt_loglik(layout_inputs(pk), *_nat(x, False)).sum()
    f = pytensor.function([x], [total, pytensor.grad(total, x)], mode="NUMBA")
    v, _ = f(np.zeros((5, pk.n_seqs)))
    assert np.isfinite(v)


def test_data_inputs_are_disconnected(packed):
    pk, _ = packed
    op = BKTLogLik(False)
    node = op.make_node(*layout_inputs(pk, shared=False), *([np.full(pk.n_seqs, 0.2)] * 4))
    pattern = op.connection_pattern(node)
    assert pattern[:5] == [[False, False]] * 5
    assert all(p == [True, True] for p in pattern[5:])
    assert BKTLogLik(True) != BKTLogLik(False) and BKTLogLik(True) == BKTLogLik(True)


@pytest.mark.parametrize("forgetting", [False, True])
def test_skill_op_matches_per_sequence_op(packed, forgetting):
    from bktbayes.ops import bkt_skill_loglik

    pk, _ = packed
    x = pt.dmatrix("x")  # (5, n_skills) logits
    p = pt.sigmoid(x)
    f = (1 - p[1]) * p[4] if forgetting else None
    data = layout_inputs(pk)
    sk = pytensor.shared(pk.seq_skill.astype(np.int64))
    total_skill = bkt_skill_loglik(data, sk, p[0], p[1], p[2] * 0.5, p[3] * 0.5, f)
    seq = pk.seq_skill
    total_seq = bkt_loglik(
        data,
        p[0][seq],
        p[1][seq],
        p[2][seq] * 0.5,
        p[3][seq] * 0.5,
        None if f is None else f[seq],
    ).sum()
    fa = pytensor.function([x], [total_skill, pytensor.grad(total_skill, x)], mode="NUMBA")
    fb = pytensor.function([x], [total_seq, pytensor.grad(total_seq, x)], mode="NUMBA")
    xv = np.random.default_rng(4).normal(-1, 0.6, (5, int(pk.seq_skill.max()) + 1))
    va, ga = fa(xv)
    vb, gb = fb(xv)
    assert va == pytest.approx(vb, rel=1e-13)
    np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-10)
    verify_grad(
        lambda xx: bkt_skill_loglik(
            data, sk, *(pt.sigmoid(xx[k]) * (0.5 if k >= 2 else 1) for k in range(4))
        ),
        [xv[:4]],
        rng=np.random.default_rng(5),
        mode="NUMBA",
    )


@pytest.mark.parametrize("forgetting", [False, True])
def test_item_op_matches_scan_twin_and_never_calls_perform(packed, forgetting, monkeypatch):
    # Item-level guess/slip: the Op (backward adjoints inside a numba kernel)
    # against the scan twin with per-response guess and slip, value and
    # gradient with respect to per-item and per-sequence logits.
    from bktbayes.ops import BKTItemLogLik, bkt_item_loglik

    pk, correct = packed
    rng = np.random.default_rng(6)
    n_items = 15
    item_row = rng.integers(0, n_items, pk.n_events)
    ev_item = pytensor.shared(pk.to_lockstep(item_row).astype(np.int64))

    def boom(*args, **kwargs):
        raise AssertionError("BKTItemLogLik.perform called in NUMBA mode")

    xs = pt.dmatrix("xs")  # (3, n_seqs) init, transit, forget logits
    xi = pt.dmatrix("xi")  # (2, n_items) guess, slip logits
    ps = pt.sigmoid(xs)
    pi_ = pt.sigmoid(xi)
    f = (1 - ps[1]) * ps[2] if forgetting else None
    total = bkt_item_loglik(layout_inputs(pk), ev_item, ps[0], ps[1], pi_[0] * 0.5, pi_[1] * 0.5, f)
    with monkeypatch.context() as mp:
        mp.setattr(BKTItemLogLik, "perform", boom)
        fk = pytensor.function([xs, xi], [total, *pytensor.grad(total, [xs, xi])], mode="NUMBA")
        xsv = rng.normal(-1, 0.6, (3, pk.n_seqs))
        xiv = rng.normal(-0.5, 0.6, (2, n_items))
        v1, gs1, gi1 = fk(xsv, xiv)
    y, m = _padded(pk, correct)
    # per-response item index, time-major like y
    it = np.zeros(y.shape, dtype=np.int64)
    for q in range(pk.n_seqs):
        rows = pk.csr_row[pk.seq_start[q] : pk.seq_start[q] + pk.seq_len[q]]
        it[: len(rows), q] = item_row[rows]
    twin = scan_loglik(
        pt.as_tensor(y), pt.as_tensor(m), ps[0], ps[1], pi_[0][it] * 0.5, pi_[1][it] * 0.5, f
    ).sum()
    ft = pytensor.function([xs, xi], [twin, *pytensor.grad(twin, [xs, xi])])
    v2, gs2, gi2 = ft(xsv, xiv)
    assert v1 == pytest.approx(v2, rel=1e-12)
    np.testing.assert_allclose(gi1, gi2, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(gs1, gs2, rtol=1e-9, atol=1e-10)
    verify_grad(
        lambda a, b: bkt_item_loglik(
            layout_inputs(pk),
            ev_item,
            pt.sigmoid(a[0]),
            pt.sigmoid(a[1]),
            pt.sigmoid(b[0]) * 0.5,
            pt.sigmoid(b[1]) * 0.5,
        ),
        [xsv[:2], xiv],
        rng=np.random.default_rng(7),
        mode="NUMBA",
    )


@pytest.mark.parametrize("forgetting", [False, True])
def test_prefix_op_matches_skill_op_and_never_calls_perform(packed, forgetting, monkeypatch):
    from bktbayes.ops import BKTPrefixLogLik, bkt_prefix_loglik, bkt_skill_loglik, prefix_inputs
    from bktbayes.packing import prefix_layout

    pk, correct = packed

    def boom(*args, **kwargs):
        raise AssertionError("BKTPrefixLogLik.perform called: the numba registration was bypassed")

    x = pt.dmatrix("x")
    p = pt.sigmoid(x)
    f = (1 - p[1]) * p[4] if forgetting else None
    layout = prefix_layout(pk.seq_skill, pk.seq_start, pk.seq_len, correct[pk.csr_row], depth=2)
    sk = pytensor.shared(pk.seq_skill.astype(np.int64))
    args = (p[0], p[1], p[2] * 0.5, p[3] * 0.5, f)
    total_p = bkt_prefix_loglik(prefix_inputs(layout), *args)
    total_s = bkt_skill_loglik(layout_inputs(pk), sk, *args)
    xv = np.random.default_rng(6).normal(-1, 0.6, (5, int(pk.seq_skill.max()) + 1))
    fb = pytensor.function([x], [total_s, pytensor.grad(total_s, x)], mode="NUMBA")
    # perform (object mode) agrees too, and is what the registration bypasses.
    fo = pytensor.function([x], [total_p, pytensor.grad(total_p, x)], mode="FAST_COMPILE")
    monkeypatch.setattr(BKTPrefixLogLik, "perform", boom)
    fa = pytensor.function([x], [total_p, pytensor.grad(total_p, x)], mode="NUMBA")
    (va, ga), (vb, gb) = fa(xv), fb(xv)
    assert va == pytest.approx(vb, rel=1e-13)
    np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-10)
    monkeypatch.undo()
    vo, go = fo(xv)
    assert vo == pytest.approx(vb, rel=1e-13)
    np.testing.assert_allclose(go, gb, rtol=1e-10, atol=1e-10)


def test_cache_salt_follows_the_kernel_source(tmp_path, monkeypatch):
    # A compiled graph cached on disk embeds the kernels; the salt of its
    # cache key must change whenever their source does.
    import bktbayes.likelihood as lik
    import bktbayes.ops as ops

    before = ops._source_salt()
    assert before == ops._CACHE_VERSION
    edited = tmp_path / "likelihood.py"
    edited.write_text(open(lik.__file__).read() + "\n# edited\n")
    monkeypatch.setattr(ops.likelihood_module, "__file__", str(edited))
    assert ops._source_salt() != before


@pytest.mark.parametrize("forgetting", [False, True])
def test_student_op_matches_per_sequence_op_and_never_calls_perform(
    packed, forgetting, monkeypatch
):
    # The student Op gathers skill logits plus student offsets to sequences
    # and scatters the gradient back inside its kernel; the reference is the
    # per-sequence Op with PyTensor doing the gathers and scatters.
    from bktbayes.ops import BKTStudentLogLik, bkt_student_loglik

    pk, _ = packed
    n_skill = int(pk.seq_skill.max()) + 1
    n_user = int(pk.seq_user.max()) + 1
    xs = pt.dmatrix("xs")  # (5, n_skills) logits
    xu = pt.dmatrix("xu")  # (2, n_users) offsets
    data = layout_inputs(pk)
    sk = pytensor.shared(pk.seq_skill.astype(np.int64))
    us = pytensor.shared(pk.seq_user.astype(np.int64))
    g_, s_ = pt.sigmoid(xs[2]) * 0.5, pt.sigmoid(xs[3]) * 0.5
    share = pt.sigmoid(xs[4]) if forgetting else None
    total = bkt_student_loglik(data, sk, us, xs[0], xu[0], xs[1], xu[1], g_, s_, share)
    seq, usr = pk.seq_skill, pk.seq_user
    pi = pt.sigmoid(xs[0][seq] + xu[0][usr])
    tr = pt.sigmoid(xs[1][seq] + xu[1][usr])
    ref = bkt_loglik(
        data, pi, tr, g_[seq], s_[seq], None if share is None else (1 - tr) * share[seq]
    ).sum()

    def boom(*args, **kwargs):
        raise AssertionError("BKTStudentLogLik.perform called: the numba registration was bypassed")

    monkeypatch.setattr(BKTStudentLogLik, "perform", boom)
    fa = pytensor.function([xs, xu], [total, *pytensor.grad(total, [xs, xu])], mode="NUMBA")
    fb = pytensor.function([xs, xu], [ref, *pytensor.grad(ref, [xs, xu])], mode="NUMBA")
    rng = np.random.default_rng(6)
    xsv = rng.normal(-1, 0.6, (5, n_skill))
    xuv = rng.normal(0, 0.8, (2, n_user))
    va, gsa, gua = fa(xsv, xuv)
    vb, gsb, gub = fb(xsv, xuv)
    assert va == pytest.approx(vb, rel=1e-13)
    # Same sums in another order: rounding only.
    np.testing.assert_allclose(gsa, gsb, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gua, gub, rtol=1e-10, atol=1e-10)
    if not forgetting:
        assert not np.any(gsa[4])  # no forgetting parameter, no gradient


def test_student_op_verify_grad(packed):
    from bktbayes.ops import bkt_student_loglik

    pk, _ = packed
    data = layout_inputs(pk)
    sk = pytensor.shared(pk.seq_skill.astype(np.int64))
    us = pytensor.shared(pk.seq_user.astype(np.int64))
    rng = np.random.default_rng(7)
    n_skill = int(pk.seq_skill.max()) + 1
    n_user = int(pk.seq_user.max()) + 1
    verify_grad(
        lambda xs, xu: bkt_student_loglik(
            data,
            sk,
            us,
            xs[0],
            xu[0],
            xs[1],
            xu[1],
            pt.sigmoid(xs[2]) * 0.5,
            pt.sigmoid(xs[3]) * 0.5,
            pt.sigmoid(xs[4]),
        ),
        [rng.normal(-1, 0.5, (5, n_skill)), rng.normal(0, 0.5, (2, n_user))],
        rng=np.random.default_rng(8),
        mode="NUMBA",
    )


def _collapsed_reference(nodes, c, mean, sd):
    """The collapsed skills' total as written in the model before the Op:
    a logsumexp per skill (scipy), summed."""
    from scipy.special import logsumexp

    total = 0.0
    for x, ck in zip(nodes, c, strict=True):
        z = (x - mean) / sd
        lw = ck - 0.5 * (z**2).sum(axis=1) - np.log(sd).sum() - 0.5 * len(mean) * np.log(2 * np.pi)
        total += logsumexp(lw) - np.log(len(ck))
    return total


@pytest.fixture(scope="module")
def collapsed_nodes():
    rng = np.random.default_rng(11)
    # Three skills of unequal node counts; c spread over tens of nats, as a
    # log-likelihood minus a proposal density is.
    nodes = [rng.normal(0.3 * k, 1.5, size=(n, 4)) for k, n in enumerate((700, 1300, 257))]
    c = [rng.normal(0.0, 8.0, size=len(x)) for x in nodes]
    return nodes, c


def test_exp_nonpositive_is_libm_exp_to_one_ulp():
    from bktbayes.modes import exp_nonpositive

    rng = np.random.default_rng(2)
    x = np.concatenate(
        [-rng.uniform(0, 700, 200_000), -rng.uniform(0, 1e-6, 1000), [0.0, -0.0, -5e-324]]
    )
    out = exp_nonpositive(x, np.empty_like(x), np.empty_like(x))
    ref = np.exp(x)
    assert np.all(np.abs(out - ref) <= np.spacing(ref)), np.max(np.abs(out - ref) / np.spacing(ref))
    # Below -700 (exp < 1e-304, nothing beside a weight of order 1) it is 0.
    far = exp_nonpositive(np.array([-700.5, -745.2, -1e300, -np.inf]), np.empty(4), np.empty(4))
    np.testing.assert_array_equal(far, 0.0)
    # nan stays nan: a node whose likelihood failed is not silently weighted 0.
    assert np.isnan(exp_nonpositive(np.array([np.nan]), np.empty(1), np.empty(1))[0])


def test_collapsed_kernel_against_logsumexp_and_finite_differences(collapsed_nodes):
    from bktbayes.modes import collapsed_logp_grad

    nodes, c = collapsed_nodes
    start = np.r_[0, np.cumsum([len(x) for x in c])].astype(np.int64)
    nodes_t = np.ascontiguousarray(np.concatenate(nodes).T)
    cc = np.concatenate(c)
    for mean, sd in [
        (np.array([0.1, -0.2, 0.3, 0.0]), np.array([1.2, 0.8, 1.0, 1.5])),
        (np.array([2.0, -3.0, 0.5, 1.0]), np.array([0.3, 0.5, 2.0, 0.7])),
    ]:
        grad = np.empty((2, 4))
        got = collapsed_logp_grad(nodes_t, cc, start, mean, sd, grad)
        assert got == pytest.approx(_collapsed_reference(nodes, c, mean, sd), rel=1e-13, abs=1e-11)
        # Central differences of the reference: error O(h^2) ~ 1e-10 here.
        h = 1e-5
        for row, par in enumerate((mean, sd)):
            for g in range(4):
                up, dn = par.copy(), par.copy()
                up[g] += h
                dn[g] -= h
                args_up = (up, sd) if row == 0 else (mean, up)
                args_dn = (dn, sd) if row == 0 else (mean, dn)
                fd = (
                    _collapsed_reference(nodes, c, *args_up)
                    - _collapsed_reference(nodes, c, *args_dn)
                ) / (2 * h)
                assert grad[row, g] == pytest.approx(fd, rel=1e-6, abs=1e-7), (row, g)


def test_collapsed_op_verify_grad_and_numba_mode(collapsed_nodes):
    from bktbayes.ops import BKTCollapsedLogLik, bkt_collapsed_loglik

    nodes, c = collapsed_nodes
    mean = pt.dvector("mean")
    sd = pt.dvector("sd")
    total = bkt_collapsed_loglik(nodes, c, mean, sd)
    m0, s0 = np.array([0.1, -0.2, 0.3, 0.0]), np.array([1.2, 0.8, 1.0, 1.5])
    ref = _collapsed_reference(nodes, c, m0, s0)
    f_py = pytensor.function([mean, sd], total, mode="FAST_COMPILE")
    assert float(f_py(m0, s0)) == pytest.approx(ref, rel=1e-13)
    # NUMBA mode runs the registered kernel, never perform.
    calls = []
    orig = BKTCollapsedLogLik.perform
    BKTCollapsedLogLik.perform = lambda self, *a: (calls.append(1), orig(self, *a))[1]
    try:
        g = pytensor.grad(total, [mean, sd])
        f_nb = pytensor.function([mean, sd], [total, *g], mode="NUMBA")
        val, gm, gs = f_nb(m0, s0)
    finally:
        BKTCollapsedLogLik.perform = orig
    assert calls == []
    assert float(val) == pytest.approx(ref, rel=1e-13)
    assert np.all(np.isfinite(gm)) and np.all(np.isfinite(gs))
    start = np.r_[0, np.cumsum([len(x) for x in c])].astype(np.int64)
    nodes_t = np.ascontiguousarray(np.concatenate(nodes).T)
    cc = np.concatenate(c)
    verify_grad(
        lambda mu, s: BKTCollapsedLogLik()(nodes_t, cc, start, mu, s)[0],
        [m0, s0],
        rng=np.random.default_rng(4),
    )
