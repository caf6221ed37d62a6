"""The mastery store on real databases (SQLite file and PostgreSQL server)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import UTC, datetime

import numpy as np
import pytest
import seed_reference as seed
import sqlalchemy as sa

from bktbayes.params import BKTParams, ParamTable
from bktbayes.store import (
    SCHEMA_VERSION,
    EventConflictError,
    MasteryStore,
    StoreInputError,
    events,
    mastery_table,
    update_mastery_bkt,
)
from bktbayes.tracing import BayesianKnowledgeTracer, replay


def _count(store: MasteryStore, table: sa.Table) -> int:
    with store.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def _table(seed_val: int = 3) -> ParamTable:
    rng = np.random.default_rng(seed_val)
    skills = {
        f"s{i}": BKTParams(
            p_init=float(rng.uniform(0.05, 0.6)),
            p_transit=float(rng.uniform(0.02, 0.3)),
            p_guess=float(rng.uniform(0.05, 0.3)),
            p_slip=float(rng.uniform(0.02, 0.2)),
        )
        for i in range(4)
    }
    # A fixed creation time: the same seed gives the same table and version.
    return ParamTable(
        skills, BKTParams(0.25, 0.1, 0.2, 0.1), model="test", created="2026-01-01T00:00:00+00:00"
    )


def _reference_rows(store: MasteryStore, params: ParamTable) -> dict[tuple[str, str], float]:
    """The tracer's maths over each (user, skill)'s log in arrival order,
    clamped at the end of every batch (where the seed clamps: on storing)."""
    log = store.events()
    out: dict[tuple[str, str], float] = {}
    last_batch: dict[tuple[str, str], int] = {}
    for u, s, c, b in zip(
        log["user_id"], log["skill"], log["correct"], log["batch_id"], strict=True
    ):
        key = (u, s)
        tracer = BayesianKnowledgeTracer(params.params_for(s, u))
        if key not in out:
            p = params.params_for(s, u).p_init
        else:
            p = out[key]
            if last_batch[key] != b:
                p = min(0.99, max(0.01, p))
        out[key] = tracer.update(p, bool(c))
        last_batch[key] = b
    return {k: min(0.99, max(0.01, v)) for k, v in out.items()}


def _random_traffic(store: MasteryStore, rng: np.random.Generator, n_calls: int) -> None:
    for i in range(n_calls):
        user = f"u{rng.integers(5)}"
        if rng.random() < 0.3:
            answers = [
                {
                    "event_id": f"x{i}-{j}",
                    "correct": bool(rng.random() < 0.6),
                    "skills": sorted(
                        {f"s{k}" for k in rng.integers(0, 6, size=rng.integers(1, 3))}
                    ),
                }
                for j in range(rng.integers(1, 4))
            ]
            store.record_exam_answers(user, answers)
        else:
            n = int(rng.integers(1, 8))
            store.record_responses(
                user,
                f"s{rng.integers(6)}",  # s4, s5 are unseen: population default
                (rng.random(n) < 0.65).tolist(),
                event_ids=[f"f{i}-{j}" for j in range(n)],
            )


def test_seed_parity_defaults(db_url):
    """With the seed defaults, a row is the seed's update_mastery_bkt arithmetic
    batch after batch (the seed's code, verbatim)."""
    store = MasteryStore(db_url)
    rng = np.random.default_rng(1)
    p = 0.3  # the seed's new row starts at p_init
    for _ in range(6):
        responses = (rng.random(int(rng.integers(1, 10))) < 0.7).tolist()
        row = update_mastery_bkt(store, "ann", "fractions", responses)
        p = seed.update_mastery_bkt_values(p, responses)
        assert row.p_mastery == pytest.approx(p, abs=1e-15)
    stored = store.mastery("ann", "fractions")
    assert stored.p_mastery == pytest.approx(p, abs=1e-15)
    assert stored.attempts == _count(store, events)
    want = seed.BayesianKnowledgeTracer().predict_next(p)
    assert store.predict_next("ann", "fractions") == pytest.approx(want, abs=1e-15)


def test_rows_equal_replay_and_recalculate(db_url):
    params = _table()
    store = MasteryStore(db_url, params)
    _random_traffic(store, np.random.default_rng(7), 60)
    ref = _reference_rows(store, params)
    rows = {(u, s): r for u in {k[0] for k in ref} for s, r in store.mastery(u).items()}
    assert set(rows) == set(ref)
    for key, p in ref.items():
        assert rows[key].p_mastery == pytest.approx(p, abs=1e-12)
        assert rows[key].param_version == params.version
    # Unseen skills are flagged, not silently served.
    assert {k[1] for k, r in rows.items() if not r.known_skill} <= {"s4", "s5"}
    assert any(not r.known_skill for r in rows.values())

    # The bulk write sends statuses as codes into the list of names: more
    # than one kind must round-trip.
    assert len({r.status for r in rows.values()}) >= 2
    methods = ["sqlalchemy"] + (["adbc", "parallel"] if store.dialect == "postgresql" else [])
    for method in methods:
        res = store.recalculate(bulk=method)
        assert res.bulk_read == method
        assert res.n_events == _count(store, events)
        assert res.n_rows == len(ref)
        again = {(u, s): r for u in {k[0] for k in ref} for s, r in store.mastery(u).items()}
        for key, r in rows.items():
            assert again[key].p_mastery == pytest.approx(r.p_mastery, abs=1e-12)
            assert again[key].attempts == r.attempts
            assert again[key].correct_attempts == r.correct_attempts
            assert again[key].status == r.status


def test_recalculate_with_new_params_matches_incremental(db_url, tmp_path):
    old, new = _table(3), _table(11)
    store = MasteryStore(db_url, old)
    _random_traffic(store, np.random.default_rng(5), 40)
    # The same traffic recorded incrementally under the new parameters.
    other = MasteryStore(f"sqlite:///{tmp_path / 'other.db'}", new)
    _random_traffic(other, np.random.default_rng(5), 40)
    res = store.recalculate(params=new)
    assert res.param_version == new.version
    assert store.param_version == new.version
    for u in (f"u{i}" for i in range(5)):
        got, want = store.mastery(u), other.mastery(u)
        assert set(got) == set(want)
        for s in want:
            assert got[s].p_mastery == pytest.approx(want[s].p_mastery, abs=1e-12)
            assert got[s].param_version == new.version


def test_recalculate_some_users_only(db_url):
    store = MasteryStore(db_url, _table())
    _random_traffic(store, np.random.default_rng(2), 30)
    before = {u: store.mastery(u) for u in ("u0", "u1")}
    res = store.recalculate(users=["u0"], params=_table(99))
    assert res.n_rows == len(before["u0"])
    assert all(r.param_version == _table(99).version for r in store.mastery("u0").values())
    assert store.mastery("u1") == before["u1"]  # untouched, old version


def test_idempotent_event_ids(db_url):
    store = MasteryStore(db_url)
    first = store.record_responses("ann", "s0", [1, 0, 1], event_ids=["a", "b", "c"])
    assert first.recorded == 3 and first.duplicates == []
    n_events = _count(store, events)
    retry = store.record_responses("ann", "s0", [1, 0, 1], event_ids=["a", "b", "c"])
    assert retry.recorded == 0
    assert retry.duplicates == ["a", "b", "c"]
    assert retry.batch_id is None
    assert retry.mastery["s0"] == first.mastery["s0"]
    assert _count(store, events) == n_events
    # A partly retried call records only the new response.
    part = store.record_responses("ann", "s0", [1, 0], event_ids=["c", "d"])
    assert part.recorded == 1 and part.duplicates == ["c"]
    assert part.mastery["s0"].attempts == 4
    # Exam answers: a retry of a multi-skill answer is one duplicate id.
    ans = [{"event_id": "q1", "correct": True, "skills": ["s1", "s2"]}]
    store.record_exam_answers("ann", ans)
    again = store.record_exam_answers("ann", ans)
    assert again.recorded == 0 and again.duplicates == ["q1"]
    assert store.mastery("ann", "s1").attempts == 1
    # The same id twice inside one call is kept once (a retry inside the call).
    inner = store.record_responses("ann", "s3", [1, 1, 0], event_ids=["r", "r", "t"])
    assert inner.recorded == 2 and inner.duplicates == ["r"]
    twice = store.record_exam_answers("ann", [ans[0] | {"event_id": "q9"}] * 2)
    assert twice.recorded == 2 and twice.duplicates == ["q9"]


@pytest.mark.parametrize(
    "second",
    [
        ("ann", "s0", [0]),  # same id, other answer
        ("bob", "s0", [1]),  # same id, other user
        ("ann", "s9", [1]),  # same id, other skill
    ],
)
def test_reused_event_id_with_other_content_is_rejected(db_url, second):
    store = MasteryStore(db_url)
    store.record_responses("ann", "s0", [1], event_ids=["e1"])
    rows = store.mastery("ann")
    n = _count(store, events)
    with pytest.raises(EventConflictError, match="e1"):
        store.record_responses(second[0], second[1], second[2], event_ids=["e1"])
    assert _count(store, events) == n
    assert store.mastery("ann") == rows
    assert store.mastery("bob") == {}


@pytest.mark.parametrize(
    ("answers", "match"),
    [
        ([{"event_id": "a", "correct": 2, "skills": ["s0"]}], r"answers\[0\].*correct"),
        ([{"event_id": "a", "correct": "yes", "skills": ["s0"]}], r"answers\[0\].*correct"),
        ([{"event_id": "a", "correct": True, "skills": []}], r"answers\[0\]\.skills is empty"),
        ([{"event_id": "a", "correct": True, "skills": "s0"}], r"answers\[0\]\.skills"),
        ([{"event_id": "a", "correct": True, "skills": ["s0"], "x": 1}], r"unknown field.*'x'"),
        ([{"event_id": "a", "skills": ["s0"]}], r"missing field 'correct'"),
        (
            [
                {"event_id": "a", "correct": True, "skills": ["s0"]},
                {"event_id": "b", "correct": 1, "skills": ["s1", "s1"]},
            ],
            r"answers\[1\]\.skills lists a skill twice",
        ),
        (
            [
                {"event_id": "a", "correct": True, "skills": ["s0", "s1"]},
                {"event_id": "a", "correct": True, "skills": ["s0"]},
            ],
            r"answers\[1\]\.event_id 'a' appears twice in this call with different",
        ),
        ([], "1 to"),
    ],
)
def test_exam_bad_input_writes_nothing(db_url, answers, match):
    store = MasteryStore(db_url)
    with pytest.raises(StoreInputError, match=match):
        store.record_exam_answers("ann", answers)
    assert _count(store, events) == 0
    assert _count(store, mastery_table) == 0


def test_exam_answer_is_atomic_across_skills(db_url):
    store = MasteryStore(db_url)
    store.record_responses("ann", "s2", [1], event_ids=["taken"])
    answers = [
        {"event_id": "q1", "correct": True, "skills": ["s0", "s1"]},
        {"event_id": "taken", "correct": False, "skills": ["s2", "s3"]},  # conflict
    ]
    with pytest.raises(EventConflictError):
        store.record_exam_answers("ann", answers)
    assert set(store.mastery("ann")) == {"s2"}
    assert _count(store, events) == 1
    ok = store.record_exam_answers("ann", answers[:1])
    assert set(ok.mastery) == {"s0", "s1"}
    assert all(r.attempts == 1 for r in ok.mastery.values())
    assert len({r.batch_id for r in [ok]}) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"responses": [1, 2]}, r"responses\[1\]"),
        ({"responses": [True, None]}, r"responses\[1\]"),
        ({"responses": []}, "1 to"),
        ({"responses": "101"}, "list"),
        ({"responses": [1], "event_ids": ["a", "b"]}, "event_ids has 2"),
        ({"responses": [1, 0], "event_ids": ["a", "a"]}, "twice in this call"),
        ({"responses": [1], "user": ""}, "user_id"),
        ({"responses": [1], "user": "a\x00b"}, "control"),
        ({"responses": [1], "skill": 7}, "skill must be a string"),
        ({"responses": [1], "source": "sms"}, "source"),
        ({"responses": [1], "times": ["yesterday"]}, r"times\[0\].*ISO"),
    ],
)
def test_flashcard_bad_input(db_url, kwargs, match):
    store = MasteryStore(db_url)
    args = {"user": "ann", "skill": "s0", **kwargs}
    with pytest.raises(StoreInputError, match=match):
        store.record_responses(**args)
    assert _count(store, events) == 0


def test_group_write_isolates_a_conflicting_request(db_url):
    store = MasteryStore(db_url)
    store.record_responses("ann", "s0", [1], event_ids=["e1"])
    reqs = [
        store.flashcard_request("bob", "s0", [1, 1], event_ids=["b1", "b2"]),
        store.flashcard_request("cat", "s0", [0], event_ids=["e1"]),  # conflict
        store.flashcard_request("bob", "s0", [0], event_ids=["b3"]),  # chains after the first
        store.flashcard_request("bob", "s0", [1], event_ids=["b1"]),  # duplicate of the first
    ]
    out = store.write_group(reqs)
    assert isinstance(out[1], EventConflictError)
    assert out[0].recorded == 2 and out[2].recorded == 1 and out[3].recorded == 0
    assert out[0].batch_id != out[2].batch_id
    assert out[3].duplicates == ["b1"]
    row = store.mastery("bob", "s0")
    assert row.attempts == 3
    # Two batches: clamp after the first, as two separate calls would.
    p = seed.update_mastery_bkt_values(0.3, [1, 1])
    p = seed.update_mastery_bkt_values(p, [0])
    assert row.p_mastery == pytest.approx(p, abs=1e-15)
    assert store.mastery("cat") == {}


def test_concurrent_writers_lose_nothing(db_url):
    """Many threads on the same (user, skill) and a few others: every logged
    event is counted once and the rows equal a replay of the log."""
    store = MasteryStore(db_url)
    n_threads, n_calls = 8, 15
    errors: list[BaseException] = []

    def work(t: int) -> None:
        rng = np.random.default_rng(t)
        try:
            for i in range(n_calls):
                skill = "hot" if rng.random() < 0.7 else f"s{t % 3}"
                k = int(rng.integers(1, 4))
                store.record_responses(
                    "ann" if rng.random() < 0.8 else "bob",
                    skill,
                    (rng.random(k) < 0.6).tolist(),
                    event_ids=[f"t{t}-{i}-{j}" for j in range(k)],
                )
                if i % 5 == 0:  # a retry racing with the others
                    store.record_responses("ann", "hot", [True], event_ids=[f"retry-{i}"])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    log = store.events()
    ref = _reference_rows(store, store.params)
    for (u, s), p in ref.items():
        row = store.mastery(u, s)
        n = int(np.sum((log["user_id"] == u) & (log["skill"] == s)))
        assert row.attempts == n
        assert row.p_mastery == pytest.approx(p, abs=1e-12)
    # Each retry id logged once however many threads sent it.
    assert len(log["event_id"]) == len(set(zip(log["event_id"], log["skill"], strict=True)))


def test_delete_user(db_url):
    store = MasteryStore(db_url)
    store.record_responses("ann", "s0", [1, 0])
    store.record_exam_answers("ann", [{"event_id": "q", "correct": 1, "skills": ["s1", "s2"]}])
    store.record_responses("bob", "s0", [1])
    counts = store.delete_user("ann")
    assert counts == {"mastery": 3, "events": 4, "batches": 2}
    assert store.mastery("ann") == {}
    assert len(store.events("ann")["seq"]) == 0
    assert store.mastery("bob", "s0").attempts == 1
    assert store.delete_user("ann") == {"mastery": 0, "events": 0, "batches": 0}


def test_new_pair_reads_prior_and_unseen_skill_uses_default(db_url):
    table = ParamTable({"known": BKTParams(0.5, 0.1, 0.2, 0.1)}, BKTParams(0.005, 0.1, 0.2, 0.1))
    store = MasteryStore(db_url, table)
    row = store.mastery("ann", "other")
    assert not row.stored and not row.known_skill
    assert row.p_mastery == 0.01  # the default's p_init, clamped for display
    # ...but the first batch starts from the unclamped p_init, as replay does.
    got = store.record_responses("ann", "other", [1]).mastery["other"]
    want = BayesianKnowledgeTracer(table.default).update(0.005, True)
    assert got.p_mastery == pytest.approx(min(0.99, max(0.01, want)), abs=1e-15)
    assert store.mastery("ann", "known").known_skill


def test_student_offsets_are_served(db_url):
    table = ParamTable(
        {"s0": BKTParams(0.3, 0.1, 0.2, 0.1)},
        students={"init": {"ann": 1.5}, "transit": {"ann": -0.5}},
    )
    store = MasteryStore(db_url, table)
    store.record_responses("ann", "s0", [1, 0, 1])
    store.record_responses("bob", "s0", [1, 0, 1])
    for u in ("ann", "bob"):
        tr = BayesianKnowledgeTracer(table.params_for("s0", u))
        p = table.params_for("s0", u).p_init
        for c in (1, 0, 1):
            p = tr.update(p, bool(c))
        assert store.mastery(u, "s0").p_mastery == pytest.approx(p, abs=1e-15)
    before = store.mastery("ann", "s0").p_mastery
    store.recalculate()
    assert store.mastery("ann", "s0").p_mastery == pytest.approx(before, abs=1e-12)


def test_schema_version_and_reopen(db_url, tmp_path):
    store = MasteryStore(db_url)
    store.record_responses("ann", "s0", [1])
    store.close()
    again = MasteryStore(db_url, create=False)
    assert again.mastery("ann", "s0").attempts == 1
    with pytest.raises(StoreInputError, match="schema version"):
        MasteryStore(f"sqlite:///{tmp_path / 'empty.db'}", create=False)


def test_replay_of_log_with_batches_matches_rows(db_url):
    """The store's rows equal tracing.replay of its own log with the batch key."""
    store = MasteryStore(db_url, _table())
    _random_traffic(store, np.random.default_rng(9), 30)
    log = store.events()
    res = replay(
        {
            "user_id": log["user_id"],
            "skill": log["skill"],
            "correct": log["correct"].astype(bool),
            "order": log["seq"],
            "batch": log["batch_id"],
        },
        store.params,
        batch="batch",
    )
    m = res.mastery
    for u, s, p in zip(m["user_id"], m["skill"], m["p_mastery"], strict=True):
        assert store.mastery(u, s).p_mastery == pytest.approx(p, abs=1e-12)


def test_store_imports_no_pymc():
    code = (
        "import sys, bktbayes.store, bktbayes.recalc\n"
        "bad = [m for m in ('pymc', 'pytensor', 'arviz') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _item_table() -> ParamTable:
    t = _table()
    items = {
        "s0": {"q1": {"p_guess": 0.45, "p_slip": 0.02}, "q2": {"p_guess": 0.05, "p_slip": 0.3}}
    }
    return ParamTable(dict(t), t.default, model="test", created=t.created, items=items)


def test_item_level_rows_equal_tracer_and_recalculate(db_url):
    """Responses tagged with items are scored with the item's guess and slip
    (the skill's for items the table lacks); the log keeps the item, so the
    recalculation reproduces the rows exactly."""
    params = _item_table()
    store = MasteryStore(db_url, params)
    rng = np.random.default_rng(21)
    batches = []
    for _ in range(12):
        n = int(rng.integers(1, 6))
        ys = [bool(v) for v in rng.random(n) < 0.6]
        its = [str(rng.choice(["q1", "q2", "q9"])) if rng.random() < 0.8 else None for _ in ys]
        store.record_responses("ann", "s0", ys, items=its)
        batches.append((ys, its))
    store.record_exam_answers(
        "ann", [{"event_id": "x1", "correct": True, "skills": ["s0", "s1"], "item_id": "q2"}]
    )
    batches.append(([True], ["q2"]))
    # The reference: the scalar tracer stepping with params_for(skill, item),
    # clamped where the store clamps (after each batch).
    p = params.params_for("s0").p_init
    for ys, its in batches:
        for y, it in zip(ys, its, strict=True):
            p = BayesianKnowledgeTracer(params.params_for("s0", item=it)).update(p, y)
        p = min(0.99, max(0.01, p))
    row = store.mastery("ann", "s0")
    assert row.p_mastery == pytest.approx(p, abs=1e-12)
    skill_only = BayesianKnowledgeTracer(params.params_for("s0"))
    q = params.params_for("s0").p_init
    for ys, _ in batches:
        for y in ys:
            q = skill_only.update(q, y)
        q = min(0.99, max(0.01, q))
    assert abs(row.p_mastery - q) > 1e-3  # the items changed the answer
    log = store.events("ann")
    assert set(log["item_id"]) >= {"q1", "q2", None}
    before = {s: r.p_mastery for s, r in store.mastery("ann").items()}
    store.recalculate()
    after = {s: r.p_mastery for s, r in store.mastery("ann").items()}
    assert after == pytest.approx(before, abs=1e-12)


def test_item_id_is_part_of_an_events_content(db_url):
    store = MasteryStore(db_url, _item_table())
    store.record_responses("ann", "s0", [1], event_ids=["e1"], items=["q1"])
    assert store.record_responses("ann", "s0", [1], event_ids=["e1"], items=["q1"]).recorded == 0
    with pytest.raises(EventConflictError, match="e1"):
        store.record_responses("ann", "s0", [1], event_ids=["e1"], items=["q2"])
    with pytest.raises(StoreInputError, match="items has 2 entries"):
        store.record_responses("ann", "s0", [1], items=["q1", "q2"])
    with pytest.raises(StoreInputError, match=r"items\[0\]"):
        store.record_responses("ann", "s0", [1], items=[""])
    assert _count(store, events) == 1


def _downgrade(store: MasteryStore, version: int) -> None:
    """Turn a current database back into a schema-``version`` one."""
    with store.engine.begin() as c:
        c.exec_driver_sql("DROP INDEX ux_bkt_mastery_pair_key")
        c.exec_driver_sql("ALTER TABLE bkt_mastery DROP COLUMN pair_key")
        c.exec_driver_sql("ALTER TABLE bkt_events DROP COLUMN pair_key")
        if version == 1:
            c.exec_driver_sql("ALTER TABLE bkt_events DROP COLUMN item_id")
        c.exec_driver_sql(f"UPDATE bkt_meta SET value = '{version}' WHERE key = 'schema_version'")
    store.close()


@pytest.mark.parametrize("old", [1, 2])
def test_old_schema_database_is_migrated(db_url, old):
    store = MasteryStore(db_url, _table())
    store.record_responses("ann", "s0", [1, 0, 1])
    store.record_responses("bob", "s1", [0, 1])
    store.record_exam_answers("bob", [{"event_id": "x1", "correct": True, "skills": ["s0", "s1"]}])
    rows = {u: store.mastery(u) for u in ("ann", "bob")}
    _downgrade(store, old)
    with pytest.raises(StoreInputError, match=f"schema version {SCHEMA_VERSION}"):
        MasteryStore(db_url, create=False)
    again = MasteryStore(db_url, _item_table())
    assert {u: again.mastery(u) for u in ("ann", "bob")} == rows
    ev = again.events()
    if old == 1:
        assert ev["item_id"].tolist() == [None] * len(ev["seq"])
    # Every event carries its (user, skill) row's key, and keys are unique per row.
    with again.engine.connect() as c:
        keys = dict(
            ((u, s), k)
            for u, s, k in c.execute(
                sa.select(mastery_table.c.user_id, mastery_table.c.skill, mastery_table.c.pair_key)
            )
        )
    assert len(set(keys.values())) == len(keys) == 3
    got = [keys[(u, s)] for u, s in zip(ev["user_id"], ev["skill"], strict=True)]
    assert ev["pair_key"].tolist() == got
    # New writes (a new row included) get keys; recalculation reproduces the rows.
    again.record_responses("ann", "s0", [1], items=["q1"])
    again.record_responses("cid", "s2", [1, 1])
    before = {u: again.mastery(u) for u in ("ann", "bob", "cid")}
    again.recalculate()
    for u, r in before.items():
        for s, row in r.items():
            assert again.mastery(u, s).p_mastery == pytest.approx(row.p_mastery, abs=1e-12)
    again.close()


def _store_with_orphaned_events(db_url: str) -> MasteryStore:
    """Events 1-2 on (ann, s0) with their row; event 3 on (ann, s1) without."""
    store = MasteryStore(db_url, _table())
    store.record_responses("ann", "s0", [1, 0])
    store.record_responses("ann", "s1", [1])
    with store.engine.begin() as c:
        c.execute(sa.delete(mastery_table).where(mastery_table.c.skill == "s1"))
    return store


def test_migration_refuses_events_without_a_row_and_changes_nothing(db_url):
    _downgrade(_store_with_orphaned_events(db_url), 2)
    with pytest.raises(StoreInputError, match=r"1 events \(first seq 3\) have no mastery row"):
        MasteryStore(db_url, _table())
    # Still a version-2 database: the migration's transaction was rolled back.
    engine = sa.create_engine(db_url)
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT value FROM bkt_meta")).scalar_one() == "2"
        cols = {r["name"] for r in sa.inspect(c).get_columns("bkt_events")}
    engine.dispose()
    assert "pair_key" not in cols


def test_recalculate_reports_events_whose_row_is_missing(db_url):
    store = _store_with_orphaned_events(db_url)
    with pytest.raises(RuntimeError, match=r"1 events \(first seq 3\) carry a pair_key"):
        store.recalculate(bulk="sqlalchemy")
    assert store.mastery("ann", "s0").attempts == 2  # nothing rewritten


@pytest.mark.parametrize("bulk", ["auto", "sqlalchemy"])
def test_recalculate_rewrites_rows_in_place_and_drops_rows_without_events(db_url, bulk):
    store = MasteryStore(db_url, _table())
    store.record_responses("ann", "s0", [1, 0, 1])
    store.record_responses("bob", "s1", [0])
    with store.engine.begin() as c:
        keys = dict(c.execute(sa.select(mastery_table.c.user_id, mastery_table.c.pair_key)).all())
        # A row that no event backs (the store's writes never leave one).
        c.execute(
            sa.insert(mastery_table).values(
                user_id="cid", skill="s2", p_mastery=0.5, attempts=3, correct_attempts=1,
                status="in_progress", param_version="", updated_at=datetime.now(UTC),
                pair_key=10_000,
            )
        )  # fmt: skip
    before = {u: store.mastery(u) for u in ("ann", "bob")}
    res = store.recalculate(params=_table(7), bulk=bulk)
    assert (res.n_events, res.n_rows) == (4, 2)
    assert store.mastery("cid") == {}
    with store.engine.connect() as c:
        after = dict(c.execute(sa.select(mastery_table.c.user_id, mastery_table.c.pair_key)).all())
    assert after == keys  # rows keep their keys
    for u, rows in before.items():
        for s, row in rows.items():
            new = store.mastery(u, s)
            assert new.attempts == row.attempts and new.param_version == _table(7).version


def test_postgresql_sessions_plan_every_statement_for_its_arguments(db_url):
    # A generic plan cached for a prepared write statement slowed every
    # later write group threefold in some load runs (see _make_engine).
    store = MasteryStore(db_url, _table())
    if store.dialect != "postgresql":
        pytest.skip("PostgreSQL setting")
    with store.engine.connect() as c:
        assert c.exec_driver_sql("SHOW plan_cache_mode").scalar_one() == "force_custom_plan"
    store.record_responses("ann", "s0", [1])  # and writes still work in that mode
    assert store.mastery("ann", "s0").attempts == 1


def test_postgresql_event_lookup_probes_the_index_at_every_table_size(db_url):
    # The duplicate check of a write group once let the planner scan the whole
    # log (``event_id = ANY(ids)``) while it held tens of thousands of rows:
    # each group then cost time in proportion to the log. The statement now
    # probes the index once per id. Its plan is checked on an analysed
    # 15k-row log, where the old form chose a sequential scan (PostgreSQL 15).
    from bktbayes.store import _PG_LOGGED

    store = MasteryStore(db_url, _table())
    if store.dialect != "postgresql":
        pytest.skip("PostgreSQL plan")
    store.record_responses("ann", "s0", [1])
    with store.engine.begin() as c:
        key = c.exec_driver_sql("SELECT pair_key FROM bkt_mastery").scalar_one()
        batch = c.exec_driver_sql("SELECT batch_id FROM bkt_batches").scalar_one()
        c.exec_driver_sql(
            "INSERT INTO bkt_events (event_id, user_id, skill, correct, event_time, source, "
            "batch_id, pair_key) SELECT 'e' || g, 'ann', 's0', g %% 2 = 0, now(), 'import', "
            f"{batch}, {key} FROM generate_series(1, 15000) AS g"
        )
        c.exec_driver_sql("ANALYZE bkt_events")
    ids = [f"e{i}" for i in range(1, 15_000, 150)]  # 100 ids, as in a busy group
    raw = store.engine.raw_connection()
    try:
        with raw.driver_connection.cursor() as cur:
            cur.execute("EXPLAIN " + _PG_LOGGED, {"ids": ids})
            plan = "\n".join(r[0] for r in cur.fetchall())
            cur.execute(_PG_LOGGED, {"ids": [*ids, "nope"]})
            found = cur.fetchall()
    finally:
        raw.close()
    assert "Seq Scan on bkt_events" not in plan, plan
    assert "bkt_events" in plan and "Index" in plan, plan
    assert sorted(r[0] for r in found) == sorted(ids)
    store.close()


# ------------------------------------------------ PostgreSQL's parallel read
def _sorted_log(cols: dict) -> dict:
    from bktbayes.recalc import _objects

    order = np.argsort(cols["seq"], kind="stable")
    out = {k: np.asarray(cols[k])[order] for k in ("pair_key", "correct", "seq", "batch_id")}
    pairs = cols["pairs"]
    po = np.argsort(np.asarray(pairs["pair_key"]))
    out["pairs"] = [
        (int(k), str(u), str(s))
        for k, u, s in zip(
            np.asarray(pairs["pair_key"])[po],
            _objects(pairs["user_id"])[po],
            _objects(pairs["skill"])[po],
            strict=True,
        )
    ]
    return out


@pytest.mark.parametrize("adbc", [True, False], ids=["pairs-adbc", "pairs-sqlalchemy"])
def test_parallel_read_equals_the_portable_read_over_many_page_ranges(pg_url, monkeypatch, adbc):
    from bktbayes import recalc

    if not adbc:  # the mastery rows' keys then come through SQLAlchemy
        monkeypatch.setattr(recalc, "adbc_available", lambda: False)
    store = MasteryStore(pg_url, _table())
    _random_traffic(store, np.random.default_rng(11), 150)
    with store.engine.connect() as c:
        n_pages = c.exec_driver_sql(
            "SELECT pg_relation_size('bkt_events') / current_setting('block_size')::int"
        ).scalar_one()
    assert n_pages >= 4  # several ranges over both connections, some on one only
    monkeypatch.setattr(recalc, "_range_pages", lambda block_size: 1)
    with store.engine.begin() as conn:
        fast, how = recalc.read_log(store, conn, None, "auto")
        ref, ref_how = recalc.read_log(store, conn, None, "sqlalchemy")
    assert (how, ref_how) == ("parallel", "sqlalchemy")
    a, b = _sorted_log(fast), _sorted_log(ref)
    assert len(a["seq"]) == _count(store, events) > 0
    for k in ("pair_key", "correct", "seq", "batch_id"):
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["pairs"] == b["pairs"]
    # Page order: the events come back in the order a sequential scan reads them.
    with store.engine.connect() as c:
        scan = [r[0] for r in c.exec_driver_sql("SELECT seq FROM bkt_events ORDER BY ctid")]
    assert fast["seq"].tolist() == scan


def test_parallel_readers_share_the_recalculation_snapshot(pg_url):
    # Each reader imports the locking transaction's snapshot: an event
    # committed after it was taken is not read, whatever the readers' timing.
    from bktbayes import recalc

    store = MasteryStore(pg_url, _table())
    store.record_responses("ann", "s0", [1, 0, 1])
    url = store.url.set(drivername="postgresql").render_as_string(hide_password=False)
    every_page = [(0, 2**32 - 1)]
    with store.engine.begin() as conn:
        snapshot = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
        store.record_responses("bob", "s1", [0, 0])  # commits on another connection
        (in_snapshot,) = recalc._read_ranges(url, snapshot, every_page)
        (now,) = recalc._read_ranges(url, None, every_page)
    assert len(in_snapshot[0]) == 3 and len(now[0]) == 5
    with pytest.raises(ValueError, match="snapshot id"):
        recalc._read_ranges(url, "1'; DROP TABLE bkt_events; --", every_page)


def test_bulk_read_choices_name_what_they_need(db_url):
    store = MasteryStore(db_url, _table())
    store.record_responses("ann", "s0", [1])
    if store.dialect != "postgresql":
        for bulk in ("parallel", "adbc"):
            with pytest.raises(ValueError, match=f"bulk='{bulk}' needs PostgreSQL"):
                store.recalculate(bulk=bulk)
        assert store.recalculate().bulk_read == "sqlalchemy"
        return
    assert store.recalculate().bulk_read == "parallel"
    assert store.recalculate(users=["ann"]).bulk_read == "adbc"
    with pytest.raises(ValueError, match="use 'adbc' for some users"):
        store.recalculate(users=["ann"], bulk="parallel")
    with pytest.raises(ValueError, match="bulk must be"):
        store.recalculate(bulk="copy")
    # Before PostgreSQL 14 a page range would scan the whole table.
    store.engine.dialect.server_version_info = (13, 9)
    assert store.recalculate().bulk_read == "adbc"
    with pytest.raises(ValueError, match="needs PostgreSQL 14"):
        store.recalculate(bulk="parallel")


def test_retain_heap_keeps_freed_memory_in_the_process():
    # In a child process (the setting is process-wide): a freed 400 MB array
    # leaves the resident set by default and stays in it once retained.
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    code = """
import sys, numpy as np
from bktbayes.recalc import retain_heap
ok = retain_heap() if sys.argv[1] == "1" else None
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
a = np.ones(50_000_000)  # 400 MB, touched
before = rss()
del a
print(ok, (before - rss()) / 1e6)
"""
    out = {}
    for flag in ("0", "1"):
        res = subprocess.run(
            [sys.executable, "-c", code, flag], capture_output=True, text=True, check=True
        )
        ok, released = res.stdout.split()
        out[flag] = (ok, float(released))
    assert out["1"][0] == "True"
    assert out["0"][1] > 300  # default: the block goes back to the kernel
    assert out["1"][1] < 50  # retained
    # BKTBAYES_RETAIN_HEAP=0 switches it off for the service and the CLI.
    off = subprocess.run(
        [sys.executable, "-c", code, "1"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BKTBAYES_RETAIN_HEAP": "0"},
    ).stdout.split()
    assert off[0] == "False" and float(off[1]) > 300
