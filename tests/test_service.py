"""The HTTP service as a real uvicorn server on loopback, with a real client
(httpx) and schemathesis against its own OpenAPI document."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import httpx
import numpy as np
import pytest
import schemathesis
import seed_reference as seed
import uvicorn
from fastapi import Depends, FastAPI, Security
from fastapi.security import APIKeyHeader
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from bktbayes.params import BKTParams, ParamTable
from bktbayes.service import ExamAnswers, FlashcardSession, RecordOut, create_app
from bktbayes.store import MasteryStore

KEY = "test-key-0123456789abcdef"


class _Server:
    def __init__(self, store: MasteryStore, api_key: str | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(store, api_key=api_key)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def server(db_url):
    table = ParamTable({"fractions": BKTParams()}, BKTParams(0.25, 0.1, 0.2, 0.1), model="test")
    store = MasteryStore(db_url, table)
    with _Server(store, KEY) as srv:
        srv.store = store
        yield srv
    store.close()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=30) as c:
        yield c


def test_flashcard_session_round_trip(server, client):
    r = client.post(
        "/v1/flashcard-sessions",
        json={
            "user_id": "ann",
            "skill": "fractions",
            "responses": [
                {"correct": True, "event_id": "a"},
                {"correct": False, "event_id": "b"},
                {"correct": True, "event_id": "c", "time": "2026-11-25T10:00:00+01:00"},
            ],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    want = seed.update_mastery_bkt_values(0.3, [True, False, True])
    assert body["recorded"] == 3
    (row,) = body["mastery"]
    assert row["p_mastery"] == pytest.approx(want, abs=1e-15)
    assert row["attempts"] == 3 and row["correct_attempts"] == 2
    assert row["known_skill"] is True
    # Committed: a fresh store on the same database sees it.
    assert MasteryStore(str(server.store.url), create=False).mastery("ann", "fractions").attempts
    got = client.get("/v1/users/ann/mastery").json()
    assert got["mastery"][0]["p_mastery"] == row["p_mastery"]
    pred = client.get("/v1/users/ann/skills/fractions/prediction").json()
    assert pred["p_correct"] == pytest.approx(
        seed.BayesianKnowledgeTracer().predict_next(want), abs=1e-15
    )
    # Retrying the same request counts nothing twice.
    again = client.post(
        "/v1/flashcard-sessions",
        json={
            "user_id": "ann",
            "skill": "fractions",
            "responses": [{"correct": True, "event_id": e} for e in "a"],
        },
    ).json()
    assert again["recorded"] == 0 and again["duplicates"] == ["a"]


def test_item_ids_over_http(db_url):
    """A flashcard response and an exam answer carrying item ids are scored
    with the items' guess and slip, as the store computes them directly."""
    items = {"fractions": {"card7": {"p_guess": 0.45, "p_slip": 0.02}}}
    table = ParamTable({"fractions": BKTParams()}, BKTParams(), model="test", items=items)
    store = MasteryStore(db_url, table)
    with (
        _Server(store, KEY) as srv,
        httpx.Client(base_url=srv.url, headers={"X-API-Key": KEY}, timeout=30) as c,
    ):
        r = c.post(
            "/v1/flashcard-sessions",
            json={
                "user_id": "ann",
                "skill": "fractions",
                "responses": [{"correct": True, "item_id": "card7"}, {"correct": False}],
            },
        )
        assert r.status_code == 200, r.text
        r = c.post(
            "/v1/exam-answers",
            json={
                "user_id": "ann",
                "answers": [
                    {"event_id": "x", "correct": True, "skills": ["fractions"], "item_id": "card7"}
                ],
            },
        )
        assert r.status_code == 200, r.text
        got = r.json()["mastery"][0]["p_mastery"]
    # The reference: the tracer with params_for(skill, item), clamped after each batch.
    p = table.params_for("fractions").p_init
    for y, it in [(True, "card7"), (False, None)]:
        p = _step(table, it, p, y)
    p = min(0.99, max(0.01, p))
    p = min(0.99, max(0.01, _step(table, "card7", p, True)))
    assert got == pytest.approx(p, abs=1e-12)
    assert store.events("ann")["item_id"].tolist() == ["card7", None, "card7"]
    store.close()


def _step(table, item, p, y):
    from bktbayes.tracing import BayesianKnowledgeTracer

    return BayesianKnowledgeTracer(table.params_for("fractions", item=item)).update(p, y)


def test_exam_answers_and_unseen_skill(client):
    r = client.post(
        "/v1/exam-answers",
        json={
            "user_id": "bob",
            "answers": [
                {"event_id": "q1", "correct": True, "skills": ["fractions", "ratios"]},
                {"event_id": "q2", "correct": False, "skills": ["ratios"]},
            ],
        },
    )
    assert r.status_code == 200, r.text
    rows = {m["skill"]: m for m in r.json()["mastery"]}
    assert rows["ratios"]["attempts"] == 2 and rows["fractions"]["attempts"] == 1
    assert rows["ratios"]["known_skill"] is False  # population default, and said so
    prior = client.get("/v1/users/bob/skills/geometry").json()
    assert prior["stored"] is False and prior["attempts"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "u", "skill": "s", "responses": [{"correct": 2}]}, "correct"),
        ({"user_id": "u", "skill": "s", "responses": [{"correct": "yes"}]}, "correct"),
        ({"user_id": "u", "skill": "s", "responses": []}, "responses"),
        ({"user_id": "u", "skill": "s", "responses": [{"correct": True}], "x": 1}, "x"),
        ({"user_id": "", "skill": "s", "responses": [{"correct": True}]}, "user_id"),
        ({"skill": "s", "responses": [{"correct": True}]}, "user_id"),
    ],
)
def test_bad_flashcard_input_is_422_naming_the_field(server, client, body, field):
    r = client.post("/v1/flashcard-sessions", json=body)
    assert r.status_code == 422
    assert field in r.text
    assert server.store.events()["seq"].size == 0


def test_exam_conflict_is_409_and_atomic(server, client):
    ok = {"user_id": "ann", "answers": [{"event_id": "q1", "correct": True, "skills": ["a"]}]}
    assert client.post("/v1/exam-answers", json=ok).status_code == 200
    bad = {
        "user_id": "ann",
        "answers": [
            {"event_id": "q2", "correct": True, "skills": ["b", "c"]},
            {"event_id": "q1", "correct": False, "skills": ["a"]},
        ],
    }
    r = client.post("/v1/exam-answers", json=bad)
    assert r.status_code == 409 and "q1" in r.text
    assert set(server.store.mastery("ann")) == {"a"}
    r = client.post(
        "/v1/exam-answers",
        json={"user_id": "ann", "answers": [{"event_id": "q3", "correct": 1, "skills": []}]},
    )
    assert r.status_code == 422 and "skills" in r.text


def test_writes_need_the_key(server):
    body = {"user_id": "ann", "skill": "s", "responses": [{"correct": True}]}
    with httpx.Client(base_url=server.url) as anon:
        assert anon.post("/v1/flashcard-sessions", json=body).status_code == 401
        wrong = anon.post("/v1/flashcard-sessions", json=body, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401
        assert anon.delete("/v1/users/ann").status_code == 401
        assert anon.post("/v1/recalculations", json={}).status_code == 401
        assert anon.get("/v1/users/ann/mastery").status_code == 200  # reads are open
        assert anon.get("/health").json()["status"] == "ok"
    assert server.store.events()["seq"].size == 0


def test_recalculation_job_and_delete(server, client):
    for i in range(5):
        client.post(
            "/v1/flashcard-sessions",
            json={"user_id": f"u{i % 2}", "skill": "fractions", "responses": [{"correct": True}]},
        )
    before = client.get("/v1/users/u0/mastery").json()["mastery"]
    job = client.post("/v1/recalculations", json={}).json()
    assert job["state"] in ("queued", "running", "done")
    for _ in range(300):
        state = client.get(f"/v1/recalculations/{job['job_id']}").json()
        if state["state"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert state["state"] == "done", state
    assert state["result"]["n_events"] == 5
    after = client.get("/v1/users/u0/mastery").json()["mastery"]
    assert after[0]["p_mastery"] == pytest.approx(before[0]["p_mastery"], abs=1e-12)
    assert client.get("/v1/recalculations/nope").status_code == 404
    gone = client.delete("/v1/users/u0").json()
    assert gone["deleted"]["events"] == 3
    assert client.get("/v1/users/u0/mastery").json()["mastery"] == []


def test_concurrent_http_writes_lose_nothing(server, client):
    def send(i: int) -> int:
        rng = np.random.default_rng(i)
        body = {
            "user_id": "ann" if i % 3 else "bob",
            "skill": "fractions",
            "responses": [
                {"correct": bool(c), "event_id": f"e{i}-{j}"}
                for j, c in enumerate(rng.random(3) < 0.6)
            ],
        }
        return client.post("/v1/flashcard-sessions", json=body).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(send, range(120)))
    assert codes == [200] * 120
    log = server.store.events()
    for user in ("ann", "bob"):
        row = server.store.mastery(user, "fractions")
        mine = log["user_id"] == user
        assert row.attempts == int(mine.sum())
        # Replaying the user's log batch by batch gives the stored row.
        p = 0.3
        for b in np.unique(log["batch_id"][mine]):
            sel = mine & (log["batch_id"] == b)
            p = seed.update_mastery_bkt_values(p, log["correct"][sel].astype(bool).tolist())
        assert row.p_mastery == pytest.approx(p, abs=1e-12)


# Fuzzing with schemathesis against the served OpenAPI document: no request may
# get a 500, every response must match the documented schema and status codes,
# and invalid input (negative mode) must be rejected with a 4xx. Run through
# hypothesis directly: schemathesis' pytest plugin does not support pytest 9.
@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_openapi(server, mode):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        case.call_and_validate(headers={"X-API-Key": KEY})

    run()


@pytest.mark.slow
def test_bktbayes_serve_command(tmp_path):
    """`bktbayes serve` as a process: SQLite default file, key from the environment."""
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = tmp_path / "params.json"
    ParamTable({"fractions": BKTParams(0.4, 0.1, 0.2, 0.1)}).to_json(params)
    env = dict(os.environ, BKTBAYES_API_KEY=KEY)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "bktbayes.cli", "serve", "--params", str(params)),
            *("--port", str(port), "--log-level", "warning"),
        ],
        cwd=tmp_path,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                health = httpx.get(f"{url}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert health["database"] == "sqlite" and health["n_skills"] == 1
        body = {"user_id": "ann", "skill": "fractions", "responses": [{"correct": True}]}
        assert httpx.post(f"{url}/v1/flashcard-sessions", json=body).status_code == 401
        r = httpx.post(f"{url}/v1/flashcard-sessions", json=body, headers={"X-API-Key": KEY})
        assert r.status_code == 200
        want = min(0.99, max(0.01, _seed_update(0.4)))
        assert r.json()["mastery"][0]["p_mastery"] == pytest.approx(want, abs=1e-12)
        assert (tmp_path / "mastery.db").exists()  # the documented default
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _seed_update(p: float) -> float:
    tracer = seed.BayesianKnowledgeTracer(seed.BKTParams(0.4, 0.1, 0.2, 0.1))
    return tracer.update(p, True)


def test_record_json_matches_model(db_url):
    """The write endpoints encode their result from plain values (no pydantic
    models on the hot path): the document must be what ``RecordOut`` gives,
    field for field, and every ``MasteryRow`` field must reach it."""
    import dataclasses
    import json
    from datetime import datetime

    from bktbayes.service import MasteryOut, _record_json
    from bktbayes.store import MasteryRow

    store = MasteryStore(db_url)
    store.record_responses("u1", "fractions", [1, 0, 1], event_ids=["a", "b", "c"])
    # One stored row updated, one new: both kinds of MasteryRow, plus a duplicate id.
    res = store.record_exam_answers(
        "u1",
        [
            {"event_id": "c", "correct": 1, "skills": ["fractions"]},
            {"event_id": "d", "correct": 0, "skills": ["fractions", "decimals"]},
        ],
    )
    fast = json.loads(_record_json(res).body)
    slow = json.loads(
        RecordOut(
            user_id=res.user_id,
            recorded=res.recorded,
            duplicates=res.duplicates,
            batch_id=res.batch_id,
            mastery=[MasteryOut(**r.to_dict()) for _, r in sorted(res.mastery.items())],
        ).model_dump_json()
    )
    RecordOut.model_validate(fast)  # the fast document is valid against the response model

    def norm(doc):
        for m in doc["mastery"]:
            if m["updated_at"] is not None:
                m["updated_at"] = datetime.fromisoformat(m["updated_at"])
        return doc

    assert norm(fast) == norm(slow)
    assert len(fast["mastery"]) == 2 and fast["recorded"] == 2 and fast["duplicates"] == ["c"]
    row = next(iter(res.mastery.values()))
    assert set(row.to_dict()) == {f.name for f in dataclasses.fields(MasteryRow)}
    store.close()


def test_service_warms_the_recalculation_kernels_at_start(server):
    # A recalculation job should not pay a cold process's kernel loading
    # (0.5-1 s, a tenth of a 10M-event job): the service loads them on the
    # job thread at start-up.
    import gc

    from bktbayes import packing, tracing

    seconds = server.app.state.warm_up.result(timeout=120)
    assert seconds > 0
    # ... and freezes what it created: a loaded kernel is in no collected
    # generation, so full collections under load do not scan it.
    compiled = list(tracing.lockstep_filter_batched.overloads.values())
    assert compiled
    tracked = {id(o) for o in gc.get_objects()}
    assert not any(id(c) in tracked for c in compiled)
    # numba dispatchers the job runs: compiled (or loaded from the cache) by now
    kernels = (tracing.lockstep_filter_batched, tracing._batch_flags, packing._layout)
    for kernel in (*kernels, packing._merge):  # _merge: logs of 2**20+ events
        assert kernel.signatures, kernel


# The reference for test_lean_write_routes_...: the two write routes with a
# declared body parameter and key dependency (module level, so that FastAPI
# can resolve the string annotations of this module).
_REF_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


async def _ref_require_key(key: Annotated[str | None, Security(_REF_KEY)] = None) -> None:
    return None


def _reference_write_app() -> FastAPI:
    ref = FastAPI()
    kw = dict(
        response_model=RecordOut,
        dependencies=[Depends(_ref_require_key)],
        responses={
            400: {"description": "The body is not valid JSON"},
            401: {"description": "Missing or wrong API key"},
            409: {"description": "An event id was reused with different content"},
        },
        tags=["write"],
    )

    @ref.post("/v1/flashcard-sessions", **kw)
    async def record_flashcard_session(body: FlashcardSession) -> None:
        """Record a flashcard session (one batch) and update the (user, skill) row."""

    @ref.post("/v1/exam-answers", **kw)
    async def record_exam_answers(body: ExamAnswers) -> None:
        """Record exam answers tagged with skills: every tagged skill's row is
        updated in one transaction."""

    return ref


def test_lean_write_routes_document_what_declared_parameters_would():
    # The write endpoints parse their own body (see service.lean_write): their
    # OpenAPI operation and component schemas must be what FastAPI generates
    # for a declared body parameter and key dependency. pydantic writes
    # "default": null on optional fields where FastAPI leaves it out; that
    # annotation is the only difference allowed.
    def drop_null_defaults(x):
        if isinstance(x, dict):
            return {k: drop_null_defaults(v) for k, v in x.items() if (k, v) != ("default", None)}
        if isinstance(x, list):
            return [drop_null_defaults(v) for v in x]
        return x

    got = create_app(MasteryStore("sqlite://"), api_key=KEY).openapi()
    want = _reference_write_app().openapi()
    for path in ("/v1/flashcard-sessions", "/v1/exam-answers"):
        assert got["paths"][path]["post"] == want["paths"][path]["post"], path
    for name, schema in want["components"]["schemas"].items():
        assert drop_null_defaults(got["components"]["schemas"][name]) == schema, name
    assert "FlashcardSession" in want["components"]["schemas"]  # the check covered them


def test_undecodable_body_is_422_and_the_key_is_checked_first(server, client):
    # Found by the fuzzer when the write endpoints began to parse their own
    # body: invalid UTF-8 made the error response itself fail (a 500).
    for path in ("/v1/flashcard-sessions", "/v1/exam-answers"):
        r = client.post(path, content=b"<t\xf75\xb1", headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["type"] == "json_invalid"
        assert r.json()["detail"][0]["loc"][0] == "body"
        with httpx.Client(base_url=server.url) as anon:
            assert anon.post(path, content=b"{").status_code == 401
    assert server.store.events()["seq"].size == 0


def test_fast_write_path_answers_as_the_routes_do(tmp_path, monkeypatch):
    """The write fast path (service._FastWrites) against the same service with
    every request routed through FastAPI: the same sequence of requests,
    accepted and rejected, must give the same status, headers and body on
    both, and the fast path must answer the accepted ones itself and hand
    each rejected one over to FastAPI (body replayed unchanged)."""
    import bktbayes.service as service

    handed = []  # requests the fast path passed on to FastAPI

    class Counting(service._FastWrites):
        def __init__(self, app, **kw):
            async def counted(scope, receive, send):
                if scope["type"] == "http":
                    handed.append(scope["path"])
                await app(scope, receive, send)

            super().__init__(counted, **kw)

    monkeypatch.setattr(service, "_FastWrites", Counting)
    table = ParamTable({"fractions": BKTParams()}, BKTParams(0.25, 0.1, 0.2, 0.1), model="t")
    fc, ex = "/v1/flashcard-sessions", "/v1/exam-answers"

    def chunks():  # a body in several ASGI messages (chunked transfer)
        yield b'{"user_id": "bob", "skill": "s",'
        yield b' "responses": [{"correct": false}, {"correct": true, "event_id": "c"}]}'

    def card(*responses, **extra):
        return {
            "json": {"user_id": "ann", "skill": "fractions", "responses": list(responses)} | extra
        }

    def exam(*answers):
        return {"json": {"user_id": "ann", "answers": list(answers)}}

    a_right, a_wrong = {"correct": True, "event_id": "a"}, {"correct": False, "event_id": "a"}
    future = {"correct": True, "time": "2999-01-01T00:00:00Z", "item_id": "card-7"}
    d_twice = ({"correct": True, "event_id": "d"}, {"correct": False, "event_id": "d"})
    # (method, path, keyword arguments, key header, answered by the fast path)
    cases = [
        ("POST", fc, card(a_right), KEY, True),
        ("POST", fc, card(a_right), KEY, True),  # a retry: counted once
        ("POST", fc + "?x=1", card(a_wrong), KEY, True),  # 409 from the log
        ("POST", fc, {"content": chunks()}, KEY, True),
        ("POST", fc, card(a_right), None, False),
        ("POST", fc, card(a_right), KEY + "x", False),
        ("POST", fc, {"content": b'{"user_id": '}, KEY, False),
        ("POST", fc, {"content": b"<t\xf75"}, KEY, False),
        ("POST", fc, card(a_right, x=1), KEY, False),
        ("POST", fc, card({"correct": 2}), KEY, False),
        ("POST", fc, card(future), KEY, True),
        ("POST", fc, card(*d_twice), KEY, False),  # the store's 409
        ("POST", ex, exam({"event_id": "q1", "correct": True, "skills": ["a", "b"]}), KEY, True),
        ("POST", ex, exam({"event_id": "q1", "correct": False, "skills": ["a"]}), KEY, True),
        ("POST", ex, exam({"event_id": "q2", "correct": 1, "skills": []}), KEY, False),
        ("GET", fc, {}, KEY, None),
        ("POST", fc + "/", card(a_right), KEY, None),
        ("GET", "/v1/users/ann/mastery", {}, None, None),
    ]

    def normalise(doc):  # drop what depends on the clock
        if isinstance(doc, dict):
            return {k: normalise(v) for k, v in doc.items() if k != "updated_at"}
        if isinstance(doc, list):
            return [normalise(v) for v in doc]
        return doc

    answers = {}
    for fast in (True, False):
        store = MasteryStore(f"sqlite:///{tmp_path / f'{fast}.db'}", table)
        srv = _Server(store, KEY)
        srv.app = create_app(store, api_key=KEY, fast_writes=fast)
        srv.server.config.app = srv.app
        out = []
        with srv, httpx.Client(base_url=srv.url, timeout=30, follow_redirects=False) as c:
            for method, path, kw, key, by_fast in cases:
                before = len(handed)
                headers = {"X-API-Key": key} if key else {}
                if "content" in kw and not isinstance(kw["content"], bytes):
                    kw = {"content": chunks()}  # a generator runs once
                r = c.request(method, path, headers=headers, **kw)
                body = normalise(r.json()) if r.content else None
                out.append((r.status_code, r.headers.get("content-type"), body))
                if fast and by_fast is not None:
                    assert len(handed) - before == (0 if by_fast else 1), (path, kw, r.text)
        store.close()
        answers[fast] = out
    for case, a, b in zip(cases, answers[True], answers[False], strict=True):
        assert a == b, case
    codes = [a[0] for a in answers[True]]
    want = [200, 200, 409, 200, 401, 401, 422, 422, 422, 422, 200, 409, 200, 409, 422, 405, 307]
    assert codes == [*want, 200]
    assert answers[True][1][2]["duplicates"] == ["a"]


def test_fast_writes_setting_reaches_worker_processes(tmp_path, monkeypatch):
    # `bktbayes serve --workers N --no-fast-writes` hands the setting to the
    # worker processes' app factory through the environment.
    from bktbayes.service import _FastWrites, app_from_env

    monkeypatch.setenv("BKTBAYES_DB", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.delenv("BKTBAYES_PARAMS", raising=False)
    for value, expected in ((None, True), ("1", True), ("0", False)):
        if value is None:
            monkeypatch.delenv("BKTBAYES_FAST_WRITES", raising=False)
        else:
            monkeypatch.setenv("BKTBAYES_FAST_WRITES", value)
        app = app_from_env()
        assert any(m.cls is _FastWrites for m in app.user_middleware) is expected, value
        app.state.writer.close()
        app.state.store.close()
