import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import seed_reference as seed
from hypothesis import given
from hypothesis import strategies as st

from bktbayes import packing
from bktbayes.params import BKTParams, ParamTable
from bktbayes.tracing import (
    CLAMP_HIGH,
    CLAMP_LOW,
    BayesianKnowledgeTracer,
    lockstep_filter,
    mastery_status,
    replay,
    sequential_filter,
)

# Seed parity ---------------------------------------------------------------


def test_seed_parity_on_random_values():
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(2000):
        g, s = rng.uniform(0.01, 0.49, 2)
        pi, pt = rng.uniform(0.01, 0.99, 2)
        ours = BayesianKnowledgeTracer(BKTParams(pi, pt, g, s))
        theirs = seed.BayesianKnowledgeTracer(seed.BKTParams(pi, pt, g, s))
        p = rng.uniform(0, 1)
        c = bool(rng.integers(2))
        worst = max(worst, abs(ours.update(p, c) - theirs.update(p, c)))
        worst = max(worst, abs(ours.predict_next(p) - theirs.predict_next(p)))
    assert worst <= 1e-12


def test_seed_defaults_sequence():
    ours = BayesianKnowledgeTracer()
    theirs = seed.BayesianKnowledgeTracer()
    p = q = 0.3
    for c in [1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1]:
        p, q = ours.update(p, bool(c)), theirs.update(q, bool(c))
        assert abs(p - q) <= 1e-12


def test_forgetting_transition():
    prm = BKTParams(0.3, 0.1, 0.2, 0.1, p_forget=0.05)
    tr = BayesianKnowledgeTracer(prm)
    p = 0.6
    post = 0.6 * 0.9 / (0.6 * 0.9 + 0.4 * 0.2)
    assert tr.update(p, True) == pytest.approx(post * 0.95 + (1 - post) * 0.1, abs=1e-15)


def test_update_validates_inputs():
    tr = BayesianKnowledgeTracer()
    with pytest.raises(ValueError, match="p_mastery"):
        tr.update(1.2, True)
    with pytest.raises(ValueError, match="correct"):
        tr.update(0.5, 2)
    with pytest.raises(ValueError, match="correct"):
        tr.update(0.5, "yes")


def test_update_is_constant_time_state():
    # The production path keeps one number per (user, skill): updating from the
    # stored value equals replaying the whole history.
    tr = BayesianKnowledgeTracer()
    hist = [1, 0, 1, 1, 0, 1, 1, 1]
    p = tr.update_many(0.3, hist[:5])
    assert tr.update_many(p, hist[5:]) == tr.update_many(0.3, hist)


# Status ---------------------------------------------------------------------


def test_mastery_status_thresholds():
    assert mastery_status(0.951) == "mastered"
    assert mastery_status(0.95) == "in_progress"
    assert mastery_status(0.4) == "in_progress"
    assert mastery_status(0.399) == "needs_focus"
    assert mastery_status(0.9, mastered=0.85) == "mastered"
    assert mastery_status(0.45, needs_focus=0.5) == "needs_focus"
    with pytest.raises(ValueError):
        mastery_status(0.5, mastered=0.3, needs_focus=0.6)


# Properties -----------------------------------------------------------------

probs = st.floats(0.001, 0.999)


@st.composite
def params(draw, forget=True):
    g = draw(st.floats(0.001, 0.98))
    s = draw(st.floats(0.001, 0.998 - g))
    t = draw(st.floats(0.001, 0.98))
    f = draw(st.floats(0.0, 0.998 - t)) if forget else 0.0
    return BKTParams(draw(probs), t, g, s, f)


@given(params(), st.floats(0.0, 1.0), st.booleans())
def test_probabilities_stay_in_unit_interval(prm, p, c):
    tr = BayesianKnowledgeTracer(prm)
    u = tr.update(p, c)
    assert 0.0 <= u <= 1.0
    assert 0.0 < tr.predict_next(p) < 1.0


@given(params(), st.floats(0.0, 1.0))
def test_correct_never_lower_than_incorrect(prm, p):
    tr = BayesianKnowledgeTracer(prm)
    assert tr.posterior(p, True) >= tr.posterior(p, False) - 1e-15
    assert tr.update(p, True) >= tr.update(p, False) - 1e-15


@given(params(forget=False), st.floats(0.0, 1.0))
def test_without_forgetting_a_correct_answer_never_lowers_mastery(prm, p):
    # The "degenerate fit" complaint: mastery falling after a correct answer.
    tr = BayesianKnowledgeTracer(prm)
    assert tr.update(p, True) >= p - 1e-12


# Replay against the scalar loop ---------------------------------------------


def _random_events(rng, n, n_users=40, n_skills=6):
    return {
        "user_id": rng.integers(0, n_users, n),
        "skill": np.array([f"k{i}" for i in rng.integers(0, n_skills, n)], dtype=object),
        "correct": rng.integers(0, 2, n),
        "order": rng.permutation(n) * 3 - 7,
    }


def _scalar_replay(ev, table, batch=None):
    groups = defaultdict(list)
    for i in range(len(ev["correct"])):
        groups[(ev["user_id"][i], ev["skill"][i])].append(i)
    pred = np.full(len(ev["correct"]), np.nan)
    mast = np.full(len(ev["correct"]), np.nan)
    final = {}
    for key, rows in groups.items():
        rows.sort(key=lambda i: ev["order"][i])
        tr = BayesianKnowledgeTracer(table.params_for(key[1]))
        p = tr.params.p_init
        prev_batch = None
        for i in rows:
            if batch is not None and prev_batch is not None and batch[i] != prev_batch:
                p = min(CLAMP_HIGH, max(CLAMP_LOW, p))
            prev_batch = None if batch is None else batch[i]
            pred[i] = tr.predict_next(p)
            p = tr.update(p, bool(ev["correct"][i]))
            mast[i] = p
        final[key] = (
            min(CLAMP_HIGH, max(CLAMP_LOW, p)),
            len(rows),
            int(sum(ev["correct"][i] for i in rows)),
        )
    return pred, mast, final


def _table(n_skills=5):
    rng = np.random.default_rng(7)
    return ParamTable(
        {
            f"k{i}": BKTParams(
                rng.uniform(0.05, 0.9),
                rng.uniform(0.01, 0.4),
                rng.uniform(0.05, 0.4),
                rng.uniform(0.02, 0.3),
                rng.uniform(0, 0.1),
            )
            for i in range(n_skills)
        },
        BKTParams(0.25, 0.1, 0.2, 0.1),
    )


@pytest.mark.parametrize("block_size", [1, 3, 256])
def test_replay_equals_scalar_loop(block_size):
    rng = np.random.default_rng(3)
    ev = _random_events(rng, 3000)
    table = _table(5)  # skill k5 is unseen: population default
    res = replay(ev, table, block_size=block_size)
    pred, mast, final = _scalar_replay(ev, table)
    np.testing.assert_allclose(res.p_correct, pred, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.p_mastery, mast, rtol=0, atol=1e-12)
    m = res.mastery
    assert len(m["p_mastery"]) == len(final)
    for u, s, p, a, c, st_, known in zip(
        m["user_id"],
        m["skill"],
        m["p_mastery"],
        m["attempts"],
        m["correct"],
        m["status"],
        m["known_skill"],
        strict=True,
    ):
        fp, fa, fc = final[(u, s)]
        assert abs(p - fp) <= 1e-12 and a == fa and c == fc
        assert st_ == mastery_status(p)
        assert known == (s != "k5")
    assert res.unknown_skills == ["k5"]


def test_replay_with_batches_clamps_at_boundaries():
    rng = np.random.default_rng(4)
    ev = _random_events(rng, 2000, n_users=10, n_skills=3)
    # Strong parameters push P(mastery) beyond the clamp within a batch.
    table = ParamTable({f"k{i}": BKTParams(0.5, 0.4, 0.05, 0.02) for i in range(3)})
    ev["batch"] = ev["order"] // 40
    res = replay(ev, table, batch="batch")
    pred, mast, _ = _scalar_replay(ev, table, batch=ev["batch"])
    np.testing.assert_allclose(res.p_correct, pred, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.p_mastery, mast, rtol=0, atol=1e-12)
    no_batch = replay(ev, table)
    assert not np.allclose(no_batch.p_mastery, res.p_mastery)  # the clamp mattered
    assert (res.p_mastery > CLAMP_HIGH).any()  # per-event outputs are not clamped


def test_multi_skill_response_updates_every_tagged_skill():
    # One exam answer tagged with two skills is one row per skill.
    ev = {
        "user_id": [1, 1, 1, 1],
        "skill": ["algebra", "algebra", "fractions", "algebra"],
        "correct": [0, 1, 1, 1],
        "order": [1, 2, 2, 3],
    }
    res = replay(ev, BKTParams())
    m = res.mastery_frame().set_index("skill")
    tr = BayesianKnowledgeTracer()
    assert m.loc["fractions", "attempts"] == 1
    assert m.loc["fractions", "p_mastery"] == pytest.approx(tr.update(0.3, True), abs=1e-15)
    assert m.loc["algebra", "attempts"] == 3
    expected = min(0.99, tr.update_many(0.3, [False, True, True]))
    assert m.loc["algebra", "p_mastery"] == pytest.approx(expected, abs=1e-15)


def test_replay_is_deterministic_and_thread_independent(monkeypatch):
    rng = np.random.default_rng(5)
    ev = _random_events(rng, 50_000, n_users=500, n_skills=5)
    table = _table(5)
    a = replay(ev, table, threads=1)
    monkeypatch.setattr(packing, "PARALLEL_MIN_EVENTS", 1000)
    b = replay(ev, table, threads=2)
    c = replay(ev, table, threads=2)
    for x, y in ((a, b), (b, c)):
        assert np.array_equal(x.p_correct, y.p_correct)
        assert np.array_equal(x.p_mastery, y.p_mastery)
        assert np.array_equal(x.mastery["p_mastery"], y.mastery["p_mastery"])


def test_input_is_not_mutated():
    import pandas as pd

    rng = np.random.default_rng(6)
    df = pd.DataFrame(_random_events(rng, 500))
    before = df.copy(deep=True)
    replay(df, _table(6))
    pd.testing.assert_frame_equal(df, before)


def test_lockstep_equals_sequential_kernel():
    rng = np.random.default_rng(8)
    n = 20_000
    user = rng.integers(0, 300, n)
    skill = rng.integers(0, 7, n)
    order = rng.permutation(n)
    correct = rng.integers(0, 2, n).astype(np.uint8)
    pk = packing.pack_codes(user, skill, order, correct, block_size=16)
    prm = [rng.uniform(0.05, 0.4, pk.n_seqs) for _ in range(4)] + [rng.uniform(0, 0.1, pk.n_seqs)]
    pred, mast, fin = np.empty(n), np.empty(n), np.empty(pk.n_seqs)
    lockstep_filter(
        pk.lock_correct,
        pk.block_seq,
        pk.block_ev,
        pk.step_ptr,
        pk.step_count,
        *prm,
        pred,
        mast,
        fin,
    )
    pred2, mast2 = np.empty(n), np.empty(n)
    sequential_filter(pk.to_csr(correct), pk.seq_start, pk.seq_len, *prm, pred2, mast2)
    # Same arithmetic in the same order: bitwise equal after mapping back.
    assert np.array_equal(pk.from_lockstep(pred), _csr_to_rows(pk, pred2))
    assert np.array_equal(pk.from_lockstep(mast), _csr_to_rows(pk, mast2))
    last = pk.seq_start + pk.seq_len - 1
    assert np.array_equal(fin, mast2[last])


def _csr_to_rows(pk, x):
    out = np.empty_like(x)
    out[pk.csr_row] = x
    return out


@pytest.mark.parametrize(
    "order",
    [
        lambda rng, n: rng.permutation(n).astype(float) + 0.5,  # not integral: sort per sequence
        lambda rng, n: rng.permutation(n).astype(np.int64) * 2**40,  # too wide to pack
        lambda rng, n: (
            np.datetime64("2026-01-01T00:00:00", "ns") + rng.permutation(n).astype("timedelta64[s]")
        ),
    ],
)
def test_order_fallbacks_match_packed_path(order):
    # Non-integral, very wide and datetime orders take the per-sequence sort
    # path; with the same relative order the results must be identical.
    rng = np.random.default_rng(9)
    n = 5000
    ev = _random_events(rng, n, n_users=50, n_skills=4)
    base = replay(ev, _table(4))
    ranks = np.argsort(np.argsort(ev["order"]))
    other = replay(dict(ev, order=np.sort(order(rng, n))[ranks]), _table(4))
    assert np.array_equal(base.p_mastery, other.p_mastery)
    assert np.array_equal(base.mastery["p_mastery"], other.mastery["p_mastery"])


def test_ties_in_order_keep_input_order():
    ev = {"user_id": [0, 0, 0], "skill": ["a", "a", "a"], "correct": [0, 1, 1], "order": [5, 5, 5]}
    res = replay(ev, BKTParams())
    tr = BayesianKnowledgeTracer()
    assert res.p_mastery[0] == tr.update(0.3, False)


def test_replay_errors_name_the_column():
    ev = {"user_id": [0, 1], "skill": ["a", "b"], "correct": [0, 2], "order": [0, 1]}
    with pytest.raises(ValueError, match="'correct'.*1 rows"):
        replay(ev, BKTParams())
    with pytest.raises(ValueError, match="missing column 'order'"):
        replay({"user_id": [0], "skill": ["a"], "correct": [1]}, BKTParams())


def test_empty_replay():
    ev = {
        "user_id": np.array([], dtype=np.int64),
        "skill": np.array([], dtype=object),
        "correct": np.array([], dtype=np.int64),
        "order": np.array([], dtype=np.int64),
    }
    res = replay(ev, BKTParams())
    assert res.p_correct.shape == (0,) and len(res.mastery["p_mastery"]) == 0


# Import purity ---------------------------------------------------------------


def test_tracing_imports_no_research_stack():
    code = (
        "import sys, bktbayes.tracing, bktbayes.params, bktbayes.packing\n"
        "bad = [m for m in ('pymc', 'pytensor', 'arviz', 'pandas') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_package_namespace_is_lazy():
    code = (
        "import sys, bktbayes\n"
        "assert 'numba' not in sys.modules and 'pandas' not in sys.modules\n"
        "from bktbayes import replay, BayesianKnowledgeTracer\n"
        "assert 'pandas' not in sys.modules\n"
        "from bktbayes import load_events\n"
        "assert 'pandas' in sys.modules\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_spawn_start_method_does_not_hang():
    # The reference library's users report multiprocessing that hangs under
    # spawn; bktbayes uses threads only, so a spawned process just works.
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        r = pool.apply_async(_spawned_replay)
        assert r.get(timeout=300) == pytest.approx(_spawned_replay())


def _spawned_replay() -> float:
    ev = {"user_id": [0, 0, 1], "skill": ["a", "a", "a"], "correct": [1, 1, 0], "order": [0, 1, 0]}
    return float(replay(ev, BKTParams()).p_mastery.sum())


# Schema-2 tables: student offsets and posterior draws -------------------------


def _draws_for(table, n, rng, spread):
    def cols(p):
        out = {k: [] for k in p.to_dict()}
        for _ in range(n):
            while True:
                vals = {
                    k: float(np.clip(v * np.exp(rng.normal(0, spread)), 1e-3, 0.9))
                    for k, v in p.to_dict().items()
                }
                vals["p_forget"] = p.p_forget
                try:
                    BKTParams(**vals)
                    break
                except ValueError:
                    continue
            for k, v in vals.items():
                out[k].append(v)
        return out

    return {"n": n, "default": cols(table.default), "skills": {s: cols(table[s]) for s in table}}


def test_replay_applies_student_offsets_like_the_scalar_tracer():
    rng = np.random.default_rng(11)
    ev = _random_events(rng, 3000, n_users=30, n_skills=4)
    base = _table(4)
    students = {
        "init": {str(u): float(rng.normal()) for u in range(20)},
        "transit": {str(u): float(rng.normal(0, 0.5)) for u in range(10)},
    }
    table = ParamTable(dict(base), base.default, students=students)
    res = replay(ev, table)
    groups = defaultdict(list)
    for i in range(len(ev["correct"])):
        groups[(ev["user_id"][i], ev["skill"][i])].append(i)
    for (u, s), rows in groups.items():
        rows.sort(key=lambda i: ev["order"][i])
        tr = BayesianKnowledgeTracer(table.params_for(s, user=u))
        p = tr.params.p_init
        for i in rows:
            p = tr.update(p, bool(ev["correct"][i]))
            assert abs(p - res.p_mastery[i]) <= 1e-12
    # Students 20..29 are new: the population (offset 0) applies.
    plain = replay(ev, base)
    new = np.isin(ev["user_id"], np.arange(20, 30))
    assert np.array_equal(res.p_mastery[new], plain.p_mastery[new])
    assert not np.allclose(res.p_mastery[~new], plain.p_mastery[~new])


def test_interval_over_posterior_draws():
    rng = np.random.default_rng(12)
    ev = _random_events(rng, 4000, n_users=50, n_skills=4)
    base = _table(4)
    # Draws identical to the point estimate: a degenerate interval.
    same = ParamTable(dict(base), base.default, draws=_draws_for(base, 5, rng, 0.0))
    r = replay(ev, same, interval=0.9)
    m = r.mastery
    np.testing.assert_allclose(m["p_mastery_lower"], m["p_mastery"], atol=1e-12)
    np.testing.assert_allclose(m["p_mastery_upper"], m["p_mastery"], atol=1e-12)
    assert set(np.unique(m["p_mastered"])) <= {0.0, 1.0}
    # Spread draws: the interval has width and brackets most point values.
    spread = ParamTable(dict(base), base.default, draws=_draws_for(base, 60, rng, 0.3))
    m = replay(ev, spread, interval=0.9).mastery
    assert (m["p_mastery_upper"] - m["p_mastery_lower"]).mean() > 0.01
    inside = (m["p_mastery_lower"] - 1e-9 <= m["p_mastery"]) & (
        m["p_mastery"] <= m["p_mastery_upper"] + 1e-9
    )
    assert inside.mean() > 0.8
    with pytest.raises(ValueError, match="posterior draws"):
        replay(ev, base, interval=0.9)


@pytest.mark.parametrize("block_size", [1, 7, 256])
def test_batch_flags_match_a_walk_of_each_sequence(block_size):
    # The batch-boundary flags are computed in lockstep order from the
    # layout alone; a plain walk of each sequence in CSR order is the
    # reference. Random lengths (1 to 60 events), ties in order, small blocks
    # so that many blocks and ragged steps occur.
    from bktbayes.tracing import _batch_flags

    rng = np.random.default_rng(11)
    n = 5000
    user = rng.integers(0, 150, n)
    skill = rng.integers(0, 4, n)
    order = rng.integers(0, 400, n)
    batch = rng.integers(0, 3, n).cumsum()  # arrival batches, repeated values
    packed = packing.pack_codes(user, skill, order, block_size=block_size)
    want = np.zeros(n, dtype=np.uint8)  # indexed by input row
    csr = packed.csr_row
    for k in range(packed.n_seqs):
        rows = csr[packed.seq_start[k] : packed.seq_start[k] + packed.seq_len[k]]
        want[rows[1:]] = batch[rows[1:]] != batch[rows[:-1]]
    got = _batch_flags(batch, packed.lock_row, packed.block_ev, packed.step_ptr, packed.step_count)
    np.testing.assert_array_equal(got, want[packed.lock_row])
    assert 0 < got.sum() < n - packed.n_seqs  # both kinds of step occur
