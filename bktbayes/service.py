"""HTTP scoring service over :class:`bktbayes.store.MasteryStore` (FastAPI).

``bktbayes serve --params PARAMS.json --db URL`` runs it on uvicorn. Writes
(record a flashcard session, record exam answers, delete a user, start a
recalculation) need the API key when one is configured (header ``X-API-Key``,
compared in constant time); reads are open. A 2xx to a write means it is
committed: concurrent writes are grouped into one transaction by a writer
thread (:class:`GroupWriter`) and every response is sent after that commit.
The accepted requests of the two write endpoints are answered by an ASGI
fast path below FastAPI's routing (``_FastWrites``) with the responses the
routes give; everything else, rejected writes included, goes through FastAPI.

Errors: request bodies that do not match the schema get FastAPI's 422 naming
the field; input the store rejects gets 422 with its message; an event id
reused with different content gets 409. There is deliberately no catch-all
handler: anything unexpected stays a 500 and is logged.
"""

import asyncio
import concurrent.futures
import gc
import hmac
import logging
import os
import queue
import sys
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import pydantic_core
from fastapi import Depends, FastAPI, HTTPException, Path, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.responses import Response as HTTPResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .store import (
    MAX_BATCH,
    MAX_ID_LENGTH,
    SCHEMA_VERSION,
    EventConflictError,
    MasteryRow,
    MasteryStore,
    RecordResult,
    StoreInputError,
    WriteRequest,
)

__all__ = ["GroupWriter", "create_app"]

log = logging.getLogger("bktbayes.service")

_ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)]
PathId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(_Strict):
    """One flashcard response."""

    correct: StrictBool
    event_id: Id | None = Field(
        None, description="Unique id; a retry with the same id is not counted twice."
    )
    time: datetime | None = Field(None, description="When it was answered (recorded only).")
    item_id: Id | None = Field(
        None, description="The card answered: item-level guess and slip where the table has them."
    )


class FlashcardSession(_Strict):
    """A user's responses on one skill, in the order they were answered."""

    user_id: Id
    skill: Id
    responses: list[Response] = Field(min_length=1, max_length=MAX_BATCH)


class ExamAnswer(_Strict):
    event_id: Id
    correct: StrictBool
    skills: list[Id] = Field(min_length=1, max_length=100, json_schema_extra={"uniqueItems": True})
    time: datetime | None = None
    item_id: Id | None = Field(
        None, description="The question: item-level guess and slip where the table has them."
    )


class ExamAnswers(_Strict):
    """A user's exam answers, each tagged with the skills it tests."""

    user_id: Id
    answers: list[ExamAnswer] = Field(min_length=1, max_length=MAX_BATCH)


class MasteryOut(BaseModel):
    user_id: str
    skill: str
    p_mastery: float = Field(description="P(mastered), clamped to [0.01, 0.99]")
    attempts: int
    correct_attempts: int
    status: Literal["mastered", "in_progress", "needs_focus"]
    param_version: str
    updated_at: datetime | None
    known_skill: bool = Field(description="False: the population default was used")
    stored: bool = Field(description="False: no events yet, the prior is shown")


class RecordOut(BaseModel):
    user_id: str
    recorded: int = Field(description="Events newly logged")
    duplicates: list[str] = Field(description="Event ids already logged (ignored)")
    batch_id: int | None
    mastery: list[MasteryOut]


class UserMastery(BaseModel):
    user_id: str
    mastery: list[MasteryOut]


class PredictionOut(BaseModel):
    user_id: str
    skill: str
    p_correct: float
    p_mastery: float
    status: str
    known_skill: bool


class RecalcIn(_Strict):
    users: list[Id] | None = Field(None, max_length=100_000, description="Default: everyone")


class JobOut(BaseModel):
    job_id: str
    state: Literal["queued", "running", "done", "failed"]
    submitted: datetime
    finished: datetime | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class DeletedOut(BaseModel):
    user_id: str
    deleted: dict[str, int]


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    database: str
    schema_version: int
    param_version: str
    param_model: str
    n_skills: int


def _mastery_out(row: MasteryRow) -> MasteryOut:
    return MasteryOut(**row.to_dict())


def _flashcard_request(body: FlashcardSession) -> WriteRequest:
    return MasteryStore.flashcard_request(
        body.user_id,
        body.skill,
        [r.correct for r in body.responses],
        event_ids=[r.event_id for r in body.responses],
        times=[r.time for r in body.responses],
        items=[r.item_id for r in body.responses],
    )


def _exam_request(body: ExamAnswers) -> WriteRequest:
    return MasteryStore.exam_request(
        body.user_id, [a.model_dump(exclude_none=True) for a in body.answers]
    )


def _conflict_json(exc: EventConflictError) -> JSONResponse:
    return JSONResponse(status_code=409, content={"detail": str(exc)})


def _bad_input_json(exc: StoreInputError) -> JSONResponse:
    # The same shape as FastAPI's own 422, so one documented schema covers both.
    detail = [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]
    return JSONResponse(status_code=422, content={"detail": detail})


class _FastWrites:
    """ASGI middleware that answers the accepted requests of the two write
    endpoints itself, and passes everything else on to FastAPI.

    Under load these two endpoints are nearly every request, and below this
    middleware FastAPI's exception middleware, exit stack, router, request
    and dependency layers cost as much CPU as the endpoint's own work
    (py-spy of the service at 1,000 requests/s). It sits inside FastAPI's
    server-error and body-limit middleware, so a bug is still a logged 500.
    It answers only what the routes would answer with their own success or
    store-error responses: a request with a missing or wrong key, a body
    that fails validation, or a client that disconnects is replayed,
    unchanged, to the full application, which gives its usual 401 or 422
    (``tests/test_service.py`` compares the two paths response by response).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: dict[str, tuple[type[BaseModel], Callable[[Any], WriteRequest]]],
        key_ok: Callable[[str | None], bool],
        key_header: bytes,
        answer: Callable[[WriteRequest], Awaitable[HTTPResponse]],
    ) -> None:
        self.app = app
        self.routes = routes
        self.key_ok = key_ok
        self.key_header = key_header
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            route = self.routes.get(scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        key = next((v.decode("latin-1") for k, v in scope["headers"] if k == self.key_header), None)
        if not self.key_ok(key):
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        request = None
        if message["type"] == "http.request":
            model, build = route
            try:
                request = build(
                    model.model_validate_json(b"".join(m.get("body", b"") for m in received))
                )
            except (ValidationError, StoreInputError):
                pass  # FastAPI gives the error response
        if request is None:
            await self.app(scope, _replay(received, receive), send)
            return
        response = await self.answer(request)
        await response(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def _record_json(res: RecordResult) -> HTTPResponse:
    """A write's result as :class:`RecordOut` JSON, encoded once from plain
    values (the route's ``response_model`` stays declared for the OpenAPI
    spec). Building the pydantic models first validated data the store had
    just produced, and with them the response took a fifth of the service's
    time per request; ``test_record_json_matches_model`` checks that the two
    give the same document."""
    doc = {
        "user_id": res.user_id,
        "recorded": res.recorded,
        "duplicates": res.duplicates,
        "batch_id": res.batch_id,
        "mastery": [r.to_dict() for _, r in sorted(res.mastery.items())],
    }
    return HTTPResponse(pydantic_core.to_json(doc), media_type="application/json")


class GroupWriter:
    """One thread that takes every write waiting in its queue, applies them in
    one transaction (:meth:`MasteryStore.write_group`) and then resolves each
    request's future: group commit, so that throughput does not pay one commit
    (and half a dozen round trips) per request, while each caller still hears
    back only after its write is committed."""

    def __init__(self, store: MasteryStore, max_group: int = 256) -> None:
        self.store = store
        self.max_group = max_group
        self._queue: queue.Queue[tuple[WriteRequest, concurrent.futures.Future] | None] = (
            queue.Queue()
        )
        self._thread = threading.Thread(target=self._run, name="bktbayes-writer", daemon=True)
        self._thread.start()

    def submit(self, request: WriteRequest) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((request, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            stop = False
            while len(group) < self.max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            try:
                results = self.store.write_group([r for r, _ in group])
            except BaseException as e:  # the whole transaction failed: every caller hears it
                log.exception("write group of %d failed", len(group))
                for _, fut in group:
                    fut.set_exception(e)
            else:
                for (_, fut), res in zip(group, results, strict=True):
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
            if stop:
                return


class _Jobs:
    """Recalculation jobs: recorded in the store's database (every worker
    process sees them), run one at a time per process on a background thread."""

    def __init__(self, store: MasteryStore) -> None:
        self.store = store
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bktbayes-recalc")

    def warm_up(self) -> concurrent.futures.Future:
        """Load the recalculation kernels on the job thread (jobs queue
        behind it), then freeze what that created (see the lifespan)."""
        from .recalc import warm_up

        def run() -> float:
            seconds = warm_up(self.store.params, postgresql=self.store.dialect == "postgresql")
            gc.collect()
            gc.freeze()
            return seconds

        return self.pool.submit(run)

    def start(self, users: list[str] | None) -> JobOut:
        rec = self.store.create_job()
        self.pool.submit(self._run, rec["job_id"], users)
        return JobOut(**rec)

    def _run(self, job_id: str, users: list[str] | None) -> None:
        self.store.set_job(job_id, state="running")
        try:
            res = self.store.recalculate(users=users)
        except Exception as e:
            log.exception("recalculation %s failed", job_id)
            self.store.set_job(job_id, state="failed", error=str(e), finished=datetime.now(UTC))
            return
        result = {
            "n_events": res.n_events,
            "n_rows": res.n_rows,
            "param_version": res.param_version,
            "bulk_read": res.bulk_read,
            "seconds": res.seconds,
        }
        self.store.set_job(job_id, state="done", result=result, finished=datetime.now(UTC))

    def get(self, job_id: str) -> JobOut | None:
        rec = self.store.job(job_id)
        return None if rec is None else JobOut(**rec)


def create_app(
    store: MasteryStore,
    *,
    api_key: str | None = None,
    max_group: int = 256,
    fast_writes: bool = True,
) -> FastAPI:
    """The ASGI application over ``store``.

    Parameters
    ----------
    store : MasteryStore
    api_key : str, optional
        When set, writes need header ``X-API-Key`` with this value (else 401).
    max_group : int
        Most writes grouped into one transaction.
    fast_writes : bool
        Answer accepted flashcard-session and exam-answer writes below
        FastAPI's routing (the same responses for about a quarter less CPU
        per request; see ``_FastWrites``). False sends every request through
        FastAPI.
    """
    # The writer thread and the event loop share the GIL; CPython's default
    # 5 ms switch interval makes the loop wait behind the writer after every
    # socket call (the convoy effect), which showed as p99 latency in seconds.
    sys.setswitchinterval(float(os.environ.get("BKTBAYES_SWITCH_INTERVAL", "0.0005")))
    writer = GroupWriter(store, max_group=max_group)
    jobs = _Jobs(store)
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")

    async def lifespan(app: FastAPI):
        # Everything alive at start-up (FastAPI, pydantic, SQLAlchemy, numpy,
        # numba) goes to the permanent generation: a full collection then
        # scans only what requests created. Under load they ran every second
        # and took about 60 ms each (the p99 latency); frozen, about 4 ms.
        gc.collect()
        gc.freeze()
        from .recalc import retain_heap

        retain_heap()  # recalculation jobs reuse their memory
        # The warm-up creates objects that live as long as the process
        # (numba's loaded kernels, pyarrow, the database driver); it freezes
        # them too when it is done. Left unfrozen, they made full collections
        # under load take 40-60 ms about once a second: p99 latency 90 ms at
        # a p50 of 33.
        app.state.warm_up = jobs.warm_up()
        yield
        writer.close()
        jobs.pool.shutdown(wait=True)

    app = FastAPI(
        title="bktbayes mastery service",
        version=__version__,
        description=(
            "Bayesian Knowledge Tracing mastery rows (the seed card's service): record "
            "flashcard sessions and exam answers, read mastery, predict the next response, "
            "recalculate from the event log."
        ),
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.writer = writer

    def key_ok(key: str | None) -> bool:
        if api_key is None:
            return True
        return key is not None and hmac.compare_digest(key.encode(), api_key.encode())

    def check_key(key: str | None) -> None:
        if not key_ok(key):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong API key (header X-API-Key)",
                headers={"WWW-Authenticate": "APIKey"},
            )

    # async: a sync dependency would be sent to a worker thread on every request.
    async def require_key(key: Annotated[str | None, Security(key_header)] = None) -> None:
        check_key(key)

    write_auth = [Depends(require_key)]
    write_errors: dict[int | str, dict[str, Any]] = {
        400: {"description": "The body is not valid JSON"},
        401: {"description": "Missing or wrong API key"},
        409: {"description": "An event id was reused with different content"},
    }

    # The two write endpoints that take the load (flashcard sessions, exam
    # answers) check the key and validate their JSON body themselves, in one
    # pydantic call on the raw bytes: FastAPI's dependency solving and its
    # decode-then-validate of the body were a seventh of the service's CPU
    # per request (measured in-process: 0.79 against 0.67 ms per request,
    # median of 7 alternating runs). The OpenAPI document is the same as with
    # declared parameters (``_lean_openapi`` below; a test compares them),
    # and errors have FastAPI's shapes: 401 before anything else, 422 naming
    # the field under ``body``.
    def lean_write(model: type[BaseModel]) -> dict[str, Any]:
        return {
            "response_model": RecordOut,
            "responses": {**write_errors, 422: _VALIDATION_422},
            "tags": ["write"],
            "openapi_extra": {
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}
                        }
                    },
                    "required": True,
                },
                "security": [{key_header.scheme_name: []}],
            },
        }

    async def parse(request: Request, model: type[_M]) -> _M:
        check_key(request.headers.get(key_header.model.name))
        raw = await request.body()
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            errors = [
                # Undecodable bytes are not echoed back (FastAPI's own
                # json_invalid error carries an empty input too).
                {**err, "loc": ("body", *err["loc"])}
                | ({"input": {}} if err["type"] == "json_invalid" else {})
                for err in e.errors(include_url=False)
            ]
            raise RequestValidationError(errors) from None

    # Only the store's own input errors are mapped; anything else stays a 500.
    @app.exception_handler(EventConflictError)
    async def _conflict(request: Request, exc: EventConflictError) -> JSONResponse:
        return _conflict_json(exc)

    @app.exception_handler(StoreInputError)
    async def _bad_input(request: Request, exc: StoreInputError) -> JSONResponse:
        return _bad_input_json(exc)

    async def _answer(req: WriteRequest) -> HTTPResponse:
        """Submit a write; the store's errors after submission get the
        responses of the handlers above (the fast path has no handlers)."""
        try:
            return _record_json(await asyncio.wrap_future(writer.submit(req)))
        except EventConflictError as exc:
            return _conflict_json(exc)
        except StoreInputError as exc:
            return _bad_input_json(exc)

    @app.get("/health", response_model=Health, tags=["service"])
    def health() -> Health:
        """Liveness and what is being served (checks the database)."""
        with store.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return Health(
            status="ok",
            version=__version__,
            database=store.dialect,
            schema_version=SCHEMA_VERSION,
            param_version=store.param_version,
            param_model=store.params.model,
            n_skills=len(store.params),
        )

    @app.post("/v1/flashcard-sessions", **lean_write(FlashcardSession))
    async def record_flashcard_session(request: Request) -> HTTPResponse:
        """Record a flashcard session (one batch) and update the (user, skill) row."""
        return await _answer(_flashcard_request(await parse(request, FlashcardSession)))

    @app.post("/v1/exam-answers", **lean_write(ExamAnswers))
    async def record_exam_answers(request: Request) -> HTTPResponse:
        """Record exam answers tagged with skills: every tagged skill's row is
        updated in one transaction."""
        return await _answer(_exam_request(await parse(request, ExamAnswers)))

    if fast_writes:
        app.add_middleware(
            _FastWrites,
            routes={
                "/v1/flashcard-sessions": (FlashcardSession, _flashcard_request),
                "/v1/exam-answers": (ExamAnswers, _exam_request),
            },
            key_ok=key_ok,
            key_header=key_header.model.name.lower().encode("latin-1"),
            answer=_answer,
        )

    @app.get("/v1/users/{user_id}/mastery", response_model=UserMastery, tags=["read"])
    def user_mastery(user_id: PathId) -> UserMastery:
        """All of a user's stored mastery rows."""
        rows = store.mastery(user_id)
        return UserMastery(
            user_id=user_id, mastery=[_mastery_out(r) for _, r in sorted(rows.items())]
        )

    @app.get("/v1/users/{user_id}/skills/{skill}", response_model=MasteryOut, tags=["read"])
    def skill_mastery(user_id: PathId, skill: PathId) -> MasteryOut:
        """One (user, skill)'s row; the prior (``stored: false``) if it has no events."""
        return _mastery_out(store.mastery(user_id, skill))

    @app.get(
        "/v1/users/{user_id}/skills/{skill}/prediction",
        response_model=PredictionOut,
        tags=["read"],
    )
    def predict_next(user_id: PathId, skill: PathId) -> PredictionOut:
        """P(correct) on the user's next response on the skill."""
        row = store.mastery(user_id, skill)
        return PredictionOut(
            user_id=user_id,
            skill=skill,
            p_correct=store.predict_next(user_id, skill),
            p_mastery=row.p_mastery,
            status=row.status,
            known_skill=row.known_skill,
        )

    @app.delete(
        "/v1/users/{user_id}",
        response_model=DeletedOut,
        dependencies=write_auth,
        responses={401: write_errors[401]},
        tags=["write"],
    )
    def delete_user(user_id: PathId) -> DeletedOut:
        """Delete a user's events and mastery rows (one transaction)."""
        return DeletedOut(user_id=user_id, deleted=store.delete_user(user_id))

    @app.post(
        "/v1/recalculations",
        response_model=JobOut,
        status_code=202,
        dependencies=write_auth,
        responses={400: write_errors[400], 401: write_errors[401]},
        tags=["write"],
    )
    def start_recalculation(body: RecalcIn) -> JobOut:
        """Start a background recalculation of mastery rows from the event log."""
        return jobs.start(body.users)

    @app.get(
        "/v1/recalculations/{job_id}",
        response_model=JobOut,
        responses={404: {"description": "No such job"}},
        tags=["read"],
    )
    def recalculation(job_id: Annotated[str, Path(max_length=64)]) -> JobOut:
        """State of a recalculation job."""
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no recalculation job {job_id!r}")
        return job

    _lean_openapi(app, [FlashcardSession, ExamAnswers])
    return app


_M = TypeVar("_M", bound=BaseModel)

_VALIDATION_422 = {
    "description": "Validation Error",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
    },
}


def _lean_openapi(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add the request models of the lean write endpoints (which declare no
    body parameter) to the OpenAPI components, as FastAPI would have."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = default()
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in js.pop("$defs", {}).items():
                    schemas.setdefault(name, sub)
                schemas.setdefault(model.__name__, js)
            doc["components"]["schemas"] = dict(sorted(schemas.items()))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_env() -> FastAPI:
    """Application factory for ``uvicorn --factory`` and ``bktbayes serve --workers N``:
    reads ``BKTBAYES_DB`` (SQLAlchemy URL), ``BKTBAYES_PARAMS`` (parameter JSON,
    optional), ``BKTBAYES_API_KEY`` (optional) and ``BKTBAYES_FAST_WRITES``
    (``0`` turns the write fast path off) from the environment."""
    import os

    from .params import ParamTable

    params = os.environ.get("BKTBAYES_PARAMS")
    store = MasteryStore(
        os.environ.get("BKTBAYES_DB", "sqlite:///mastery.db"),
        ParamTable.from_json(params) if params else None,
    )
    return create_app(
        store,
        api_key=os.environ.get("BKTBAYES_API_KEY") or None,
        fast_writes=os.environ.get("BKTBAYES_FAST_WRITES", "1") != "0",
    )
