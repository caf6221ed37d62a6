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
