"""The seed card's mastery service on a relational database (SQLAlchemy 2).

One row per (user, skill) holds the stored P(mastery), the attempt counts, the
status by the seed's thresholds and the version of the parameters that
produced it; an append-only event log holds every response with the batch
(one call) it arrived in. SQLite is the embedded default, PostgreSQL the
production target; both are tested for real.

Where the clamp applies
-----------------------
Exactly where the seed applies it: when a mastery value is *stored*. A call
(one batch: a flashcard session, one exam answer's skills) starts from the
stored value (or the skill's ``p_init`` for a new row, unclamped), runs the
tracer's update over the batch's responses in order, and stores the result
clamped to [0.01, 0.99]. The next batch starts from the clamped value.
:meth:`MasteryStore.recalculate` replays the log in arrival order with the
batch id as :func:`bktbayes.tracing.replay`'s batch key, which clamps at the
same places, so it reproduces the incremental rows.

Concurrency and durability
--------------------------
Every write is one transaction. On PostgreSQL the (user, skill) rows a call
touches are locked (``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``, in
sorted order so that exam answers over several skills cannot deadlock) before
the events are appended, so the log order of a (user, skill) is the order of
its updates. On SQLite every write transaction is ``BEGIN IMMEDIATE`` (one
writer at a time, others wait up to ``busy_timeout``), in WAL mode with
``synchronous=FULL``. A method returns only after its commit.

Keys
----
Each mastery row has an integer ``pair_key`` (unique; drawn from a sequence
on PostgreSQL, from the table's largest key under SQLite's single writer),
and each event carries its row's key. The recalculation reads the log's
integer columns and the rows' keys, not the text ids of every event: text
ids made the read and their encoding most of its time. Keys may have gaps.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from .params import BKTInputError, BKTParams, ParamTable
from .tracing import BayesianKnowledgeTracer, clamp, mastery_status

__all__ = [
    "SCHEMA_VERSION",
    "EventConflictError",
    "MasteryRow",
    "MasteryStore",
    "RecalcResult",
    "RecordResult",
    "StoreInputError",
    "update_mastery_bkt",
]

#: Version of the database schema, kept in ``bkt_meta`` for later migrations.
# 2: bkt_events.item_id; 3: an integer key per (user, skill) (pair_key) on the
# mastery row and every event, so that a recalculation reads integers, not
# text, from the log. Older databases are migrated on open.
SCHEMA_VERSION = 3
#: Longest user id, skill code, event id or source accepted.
MAX_ID_LENGTH = 200
#: Most responses in one call (one batch).
MAX_BATCH = 10_000

SOURCES = ("flashcard", "exam", "import")


class StoreInputError(BKTInputError):
    """Bad input to the store; nothing was written."""


class EventConflictError(StoreInputError):
    """An event id already in the log was sent again with different content."""


metadata = sa.MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias).
_BigID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

meta_table = sa.Table(
    "bkt_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(200), nullable=False),
)

batches = sa.Table(
    "bkt_batches",
    metadata,
    sa.Column("batch_id", _BigID, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.String(MAX_ID_LENGTH), nullable=False, index=True),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("n_events", sa.Integer, nullable=False),
)

events = sa.Table(
    "bkt_events",
    metadata,
    # Arrival order: the order of history for replay, whatever the event's own time.
    sa.Column("seq", _BigID, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(MAX_ID_LENGTH), nullable=False),
    sa.Column("user_id", sa.String(MAX_ID_LENGTH), nullable=False),
    sa.Column("skill", sa.String(MAX_ID_LENGTH), nullable=False),
    sa.Column("correct", sa.Boolean, nullable=False),
    sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("batch_id", sa.BigInteger, nullable=False),
    # The item answered (optional): item-level guess and slip where the
    # parameter table has them for (skill, item).
    sa.Column("item_id", sa.String(MAX_ID_LENGTH), nullable=True),
    # The (user, skill) row's pair_key (schema 3; NOT NULL except in
    # databases migrated on SQLite, where every write still fills it).
    sa.Column("pair_key", sa.BigInteger, nullable=False),
    # An exam answer tagged with several skills is one row per skill, sharing its id.
    sa.UniqueConstraint("event_id", "skill", name="uq_bkt_events_event_skill"),
    sa.Index("ix_bkt_events_user_skill", "user_id", "skill"),
)

mastery_table = sa.Table(
    "bkt_mastery",
    metadata,
    sa.Column("user_id", sa.String(MAX_ID_LENGTH), primary_key=True),
    sa.Column("skill", sa.String(MAX_ID_LENGTH), primary_key=True),
    sa.Column("p_mastery", sa.Double, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("correct_attempts", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("param_version", sa.String(64), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("pair_key", sa.BigInteger, nullable=False),
    sa.Index("ux_bkt_mastery_pair_key", "pair_key", unique=True),
    # Half-empty pages: an update of a row (every write, every row of a
    # recalculation) fits beside it as a heap-only tuple, touching no index.
    postgresql_with={"fillfactor": 50},
)
#: Where PostgreSQL draws pair keys (SQLite has no sequences; create_all skips it there).
pair_key_seq = sa.Sequence("bkt_pair_key_seq", metadata=metadata)

# Background recalculation jobs, in the database so that every server worker
# process sees the same jobs.
jobs_table = sa.Table(
    "bkt_jobs",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("submitted", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished", sa.DateTime(timezone=True)),
    sa.Column("result", sa.Text),
    sa.Column("error", sa.Text),
)


@dataclass(frozen=True)
class MasteryRow:
    """One (user, skill)'s stored mastery.

    ``p_mastery`` is clamped to [0.01, 0.99]; ``stored`` is False for a
    (user, skill) with no events yet (then ``p_mastery`` is the prior
    ``p_init``, clamped, and the counts are 0). ``known_skill`` says whether the
    parameter table knows the skill or the population default was used.
    """

    user_id: str
    skill: str
    p_mastery: float
    attempts: int
    correct_attempts: int
    status: str
    param_version: str
    updated_at: datetime | None
    known_skill: bool
    stored: bool = True

    def to_dict(self) -> dict[str, Any]:
        # Field by field: dataclasses.asdict deep-copies every value and was
        # a tenth of the HTTP service's per-request time.
        return {
            "user_id": self.user_id,
            "skill": self.skill,
            "p_mastery": self.p_mastery,
            "attempts": self.attempts,
            "correct_attempts": self.correct_attempts,
            "status": self.status,
            "param_version": self.param_version,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "known_skill": self.known_skill,
            "stored": self.stored,
        }


@dataclass(frozen=True)
class RecordResult:
    """What a write did: the rows after it, how many events it logged, which
    event ids were already in the log (ignored), and its batch id."""

    user_id: str
    mastery: dict[str, MasteryRow]
    recorded: int
    duplicates: list[str] = field(default_factory=list)
    batch_id: int | None = None


@dataclass(frozen=True)
class RecalcResult:
    """Outcome of :meth:`MasteryStore.recalculate` with its timings (seconds)."""

    n_events: int
    n_rows: int
    param_version: str
    bulk_read: str
    seconds_read: float
    seconds_replay: float
    seconds_write: float

    @property
    def seconds(self) -> float:
        return self.seconds_read + self.seconds_replay + self.seconds_write


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Lone surrogates cannot be encoded (UTF-8 on PostgreSQL, SQLite): not an id.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_id(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise StoreInputError(f"{name} must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_LENGTH:
        raise StoreInputError(f"{name} must have 1 to {MAX_ID_LENGTH} characters, got {value!r}")
    # PostgreSQL text cannot hold NUL; control characters in ids are always a bug upstream.
    if _CONTROL.search(value):
        raise StoreInputError(f"{name} contains control characters: {value!r}")
    if _SURROGATE.search(value):
        raise StoreInputError(f"{name} contains a lone surrogate (not valid Unicode): {value!r}")
    return value


def _check_correct(where: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    raise StoreInputError(f"{where}: correct must be true/false or 0/1, got {value!r}")


def _check_time(where: str, value: Any, now: datetime) -> datetime:
    if value is None:
        return now
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise StoreInputError(f"{where}: time {value!r} is not ISO 8601") from None
    if not isinstance(value, datetime):
        raise StoreInputError(f"{where}: time must be a datetime or ISO 8601 string")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        value = value.astimezone(UTC)
    except OverflowError:
        raise StoreInputError(f"{where}: time {value.isoformat()} is out of range") from None
    # PostgreSQL's timestamptz and SQLite's text both hold years 1 to 9999.
    return value


_EXAM_FIELDS = {"event_id", "correct", "skills", "time", "item_id"}


@dataclass(frozen=True)
class _Item:
    event_id: str
    skill: str
    correct: bool
    time: datetime
    item: str | None = None


@dataclass(frozen=True)
class WriteRequest:
    """One validated write (one batch): a user's responses, each on one skill."""

    user: str
    items: tuple[_Item, ...]
    source: str
    #: Event ids sent more than once in this call with the same content (kept once).
    repeated: tuple[str, ...] = ()


# PostgreSQL forms of a write's statements (see MasteryStore._logged & co.).
# Rows are created-or-locked in the sorted order of the input arrays: two
# groups lock shared rows in the same order and cannot deadlock.
_PG_LOCK_ROWS = """
INSERT INTO bkt_mastery AS m
    (user_id, skill, p_mastery, attempts, correct_attempts, status, param_version, updated_at,
     pair_key)
SELECT t.u, t.s, 0.5, 0, 0, 'in_progress', '', %(now)s, nextval('bkt_pair_key_seq')
FROM unnest(%(u)s::text[], %(s)s::text[]) WITH ORDINALITY AS t(u, s, k)
ORDER BY t.k
ON CONFLICT (user_id, skill) DO UPDATE SET attempts = m.attempts
RETURNING m.user_id, m.skill, m.p_mastery, m.attempts, m.correct_attempts, m.param_version,
    m.updated_at, m.pair_key
"""
# One index probe per id, whatever the table's size. The plain form
# ``WHERE event_id = ANY(ids)`` let the planner prefer a sequential scan
# (a hundred index probes cost more than a few hundred pages at the default
# random_page_cost) while the log held 10-60k rows: 5-15 ms per write group,
# growing with the table, which capped the HTTP service at 650-750 requests/s
# until the table was large enough for the plan to flip. OFFSET 0 keeps the
# subquery from being flattened into a join that could be planned the same way.
_PG_LOGGED = """
SELECT e.event_id, e.user_id, e.skill, e.correct, e.item_id
FROM unnest(%(ids)s::text[]) AS i(id)
CROSS JOIN LATERAL (
    SELECT event_id, user_id, skill, correct, item_id FROM bkt_events
    WHERE event_id = i.id OFFSET 0
) AS e
"""
# Batch ids are drawn first (MATERIALIZED: once per batch), events point at
# their batch by its position k, and are inserted in array order (ORDER BY
# the ordinality) so that their seq (arrival order) follows the order in
# which the updates were computed.
_PG_INSERT_LOG = """
WITH ids AS MATERIALIZED (
    SELECT t.k, nextval(pg_get_serial_sequence('bkt_batches', 'batch_id')) AS id,
           t.u, t.src, t.n
    FROM unnest(%(b_user)s::text[], %(b_source)s::text[], %(b_n)s::int[])
        WITH ORDINALITY AS t(u, src, n, k)
), b AS (
    INSERT INTO bkt_batches (batch_id, user_id, source, received_at, n_events)
    SELECT id, u, src, %(now)s, n FROM ids
), e AS (
    INSERT INTO bkt_events
        (event_id, user_id, skill, correct, event_time, source, batch_id, item_id, pair_key)
    SELECT e.id, e.u, e.s, e.c, e.t, e.src, ids.id, e.it, e.pk
    FROM unnest(%(e_id)s::text[], %(e_user)s::text[], %(e_skill)s::text[], %(e_correct)s::bool[],
                %(e_time)s::timestamptz[], %(e_source)s::text[], %(e_k)s::bigint[],
                %(e_item)s::text[], %(e_pair)s::bigint[])
        WITH ORDINALITY AS e(id, u, s, c, t, src, k, it, pk, ord)
    JOIN ids ON ids.k = e.k
    ORDER BY e.ord
)
SELECT k, id FROM ids
"""
_PG_UPDATE_ROWS = """
UPDATE bkt_mastery AS m
SET p_mastery = t.p, attempts = t.a, correct_attempts = t.c, status = t.st,
    param_version = %(v)s, updated_at = %(now)s
FROM unnest(%(u)s::text[], %(s)s::text[], %(p)s::float8[], %(a)s::int[], %(c)s::int[],
            %(st)s::text[]) AS t(u, s, p, a, c, st)
WHERE m.user_id = t.u AND m.skill = t.s
"""

_UPDATE_ROW = (
    sa.update(mastery_table)
    .where(
        mastery_table.c.user_id == sa.bindparam("u"),
        mastery_table.c.skill == sa.bindparam("s"),
    )
    .values(
        p_mastery=sa.bindparam("p_mastery"),
        attempts=sa.bindparam("attempts"),
        correct_attempts=sa.bindparam("correct_attempts"),
        status=sa.bindparam("status"),
        param_version=sa.bindparam("param_version"),
        updated_at=sa.bindparam("updated_at"),
    )
)


class MasteryStore:
    """Mastery rows and the event log on a relational database.

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite:///mastery.db`` (the embedded default) or
        ``postgresql+psycopg://user@host/db``.
    params : ParamTable, BKTParams, path or None
        The parameters to serve (a :class:`ParamTable` or the path of its
        JSON); None uses the seed card's defaults for every skill.
    create : bool
        Create the schema on first use (and check its version otherwise).
    engine_options : mapping, optional
        Extra keyword arguments for :func:`sqlalchemy.create_engine`.
    """

    def __init__(
        self,
        url: str = "sqlite:///mastery.db",
        params: ParamTable | BKTParams | str | Path | None = None,
        *,
        create: bool = True,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = sa.engine.make_url(url)
        self.dialect = self.url.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise StoreInputError(
                f"unsupported database {self.dialect!r}: use sqlite or postgresql"
            )
        self.engine = _make_engine(self.url, dict(engine_options or {}))
        self._lock = threading.Lock()
        self.set_params(params)
        if create:
            self.create_schema()
        else:
            self._check_schema()

    # Parameters ---------------------------------------------------------
    def set_params(self, params: ParamTable | BKTParams | str | Path | None) -> None:
        """Serve ``params`` from now on (stored rows keep their old version
        until :meth:`recalculate` rewrites them)."""
        table = _as_table(params)
        with self._lock:
            self.params = table
            self.param_version = table.version
            # Tracers of the table being served; any other table builds its own.
            self._tracers: tuple[ParamTable, dict[tuple[str, str | None], Any]] = (table, {})

    def _tracer(
        self, skill: str, user: str, params: ParamTable | None = None, item: str | None = None
    ) -> BayesianKnowledgeTracer:
        params = self.params if params is None else params
        if item is not None and not (
            params.item_params and item in params.item_params.get(skill, {})
        ):
            item = None  # skill-level guess and slip
        owner, cache = self._tracers
        if owner is not params:
            return BayesianKnowledgeTracer(params.params_for(skill, user, item))
        key = (skill, user if params.students else None, item)
        hit = cache.get(key)
        if hit is None:
            hit = BayesianKnowledgeTracer(params.params_for(skill, user, item))
            if len(cache) > 100_000:
                cache.clear()
            cache[key] = hit
        return hit

    # Schema -------------------------------------------------------------
    def create_schema(self) -> None:
        """Create the tables if missing and record the schema version."""
        metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
            ).first()
            if row is None:
                conn.execute(
                    sa.insert(meta_table).values(key="schema_version", value=str(SCHEMA_VERSION))
                )
            elif int(row[0]) in (1, 2):
                self._migrate(conn, int(row[0]))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreInputError(
                    f"database schema version {row[0]}, this bktbayes uses {SCHEMA_VERSION}"
                )

    def _migrate(self, conn: sa.Connection, version: int) -> None:
        """Bring a schema version 1 or 2 database to the current version, in
        the caller's transaction (a failure leaves it as it was)."""
        if version == 1:
            # 1 -> 2: the optional item column (existing events have none,
            # and replay at skill level as before).
            conn.exec_driver_sql(
                f"ALTER TABLE bkt_events ADD COLUMN item_id VARCHAR({MAX_ID_LENGTH})"
            )
        # 2 -> 3: a key per mastery row, copied to its events.
        conn.exec_driver_sql("ALTER TABLE bkt_mastery ADD COLUMN pair_key BIGINT")
        if self.dialect == "postgresql":
            conn.exec_driver_sql("UPDATE bkt_mastery SET pair_key = nextval('bkt_pair_key_seq')")
        else:
            conn.exec_driver_sql("UPDATE bkt_mastery SET pair_key = rowid")
        conn.exec_driver_sql(
            "CREATE UNIQUE INDEX ux_bkt_mastery_pair_key ON bkt_mastery (pair_key)"
        )
        conn.exec_driver_sql("ALTER TABLE bkt_events ADD COLUMN pair_key BIGINT")
        conn.exec_driver_sql(
            "UPDATE bkt_events SET pair_key = (SELECT m.pair_key FROM bkt_mastery m "
            "WHERE m.user_id = bkt_events.user_id AND m.skill = bkt_events.skill)"
        )
        orphans = conn.exec_driver_sql(
            "SELECT count(*), min(seq) FROM bkt_events WHERE pair_key IS NULL"
        ).one()
        if orphans[0]:
            raise StoreInputError(
                f"cannot migrate to schema version {SCHEMA_VERSION}: {orphans[0]} events "
                f"(first seq {orphans[1]}) have no mastery row; nothing was changed"
            )
        if self.dialect == "postgresql":
            conn.exec_driver_sql("ALTER TABLE bkt_mastery SET (fillfactor = 50)")
            conn.exec_driver_sql("ALTER TABLE bkt_mastery ALTER COLUMN pair_key SET NOT NULL")
            conn.exec_driver_sql("ALTER TABLE bkt_events ALTER COLUMN pair_key SET NOT NULL")
        conn.execute(
            sa.update(meta_table)
            .where(meta_table.c.key == "schema_version")
            .values(value=str(SCHEMA_VERSION))
        )

    def _check_schema(self) -> None:
        row = None
        if sa.inspect(self.engine).has_table(meta_table.name):
            with self.engine.connect() as conn:
                row = conn.execute(
                    sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
                ).first()
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise StoreInputError(
                f"database at {self.url.render_as_string(hide_password=True)} has no bktbayes "
                f"schema version {SCHEMA_VERSION} (found {row[0] if row else None})"
            )

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()

    def __enter__(self) -> MasteryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Writes ---------------------------------------------------------------
    def record_responses(
        self,
        user: str,
        skill: str,
        responses: Sequence[bool | int],
        event_ids: Sequence[str] | None = None,
        source: str = "flashcard",
        times: Sequence[datetime | str | None] | None = None,
        items: Sequence[str | None] | None = None,
    ) -> RecordResult:
        """Log a sequence of responses of one user on one skill (one batch) and
        update the mastery row, in one transaction.

        Parameters
        ----------
        user, skill : str
        responses : sequence of bool or 0/1, length n (1 <= n <= 10,000)
            In the order they were answered.
        event_ids : sequence of str, length n, optional
            Unique ids (None: a fresh one); an id already in the log with the same content is
            ignored and reported in ``duplicates`` (retries do not count
            twice), with different content it raises :class:`EventConflictError`.
            Without ids every response is new.
        source : str
            ``"flashcard"``, ``"exam"`` or ``"import"``.
        times : sequence, optional
            Each response's own time (recorded; history is ordered by arrival).
        items : sequence of str or None, optional
            The item each response answered: where the parameter table has
            item-level guess and slip for (skill, item), they score it.

        Returns
        -------
        RecordResult
        """
        req = self.flashcard_request(user, skill, responses, event_ids, source, times, items)
        return self._write(req)

    @staticmethod
    def flashcard_request(
        user: str,
        skill: str,
        responses: Sequence[bool | int],
        event_ids: Sequence[str] | None = None,
        source: str = "flashcard",
        times: Sequence[datetime | str | None] | None = None,
        items: Sequence[str | None] | None = None,
    ) -> WriteRequest:
        """Validate the arguments of :meth:`record_responses` into a request
        for :meth:`write_group` (raises :class:`StoreInputError`)."""
        user = _check_id("user_id", user)
        skill = _check_id("skill", skill)
        if isinstance(responses, (str, bytes)) or not isinstance(responses, Iterable):
            raise StoreInputError("responses must be a list of true/false or 0/1")
        responses = list(responses)
        n = len(responses)
        if not 1 <= n <= MAX_BATCH:
            raise StoreInputError(f"responses must hold 1 to {MAX_BATCH} items, got {n}")
        if event_ids is None:
            event_ids = [_new_id() for _ in range(n)]
        else:
            event_ids = list(event_ids)
            if len(event_ids) != n:
                raise StoreInputError(f"event_ids has {len(event_ids)} items, responses has {n}")
        if times is not None and len(times) != n:
            raise StoreInputError(f"times has {len(times)} items, responses has {n}")
        if items is not None:
            if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
                raise StoreInputError("items must be a list of item ids (or null)")
            items = list(items)
            if len(items) != n:
                raise StoreInputError(f"items has {len(items)} entries, responses has {n}")
        item_ids = [
            None if items is None or items[i] is None else _check_id(f"items[{i}]", items[i])
            for i in range(n)
        ]
        now = datetime.now(UTC)
        out: list[_Item] = []
        first: dict[str, tuple[bool, str | None]] = {}
        repeated: list[str] = []
        for i in range(n):
            eid = _new_id() if event_ids[i] is None else _check_id(f"event_ids[{i}]", event_ids[i])
            c = _check_correct(f"responses[{i}]", responses[i])
            t = _check_time(f"times[{i}]", times[i] if times is not None else None, now)
            # An id sent twice in one call is a retry inside the call: the
            # same rule as across calls (kept once, or a conflict).
            if eid in first:
                if first[eid] != (c, item_ids[i]):
                    raise EventConflictError(
                        f"event_ids[{i}] {eid!r} appears twice in this call with different "
                        "answers; nothing was written"
                    )
                repeated.append(eid)
                continue
            first[eid] = (c, item_ids[i])
            out.append(_Item(eid, skill, c, t, item_ids[i]))
        return WriteRequest(user, tuple(out), _check_source(source), tuple(repeated))

    def record_exam_answers(
        self, user: str, answers: Sequence[Mapping[str, Any]], source: str = "exam"
    ) -> RecordResult:
        """Log exam answers tagged with skills and update every tagged skill's
        row, all in one transaction (one batch).

        Parameters
        ----------
        user : str
        answers : sequence of mappings
            Each ``{"event_id": str, "correct": bool | 0/1, "skills": [str, ...]}``
            and optionally ``"time"`` and ``"item_id"`` (the question). An
            answer tagged with k skills is k log rows sharing its event id (one
            per skill).
        """
        return self._write(self.exam_request(user, answers, source))

    @staticmethod
    def exam_request(
        user: str, answers: Sequence[Mapping[str, Any]], source: str = "exam"
    ) -> WriteRequest:
        """Validate the arguments of :meth:`record_exam_answers` into a request
        for :meth:`write_group` (raises :class:`StoreInputError`)."""
        user = _check_id("user_id", user)
        if isinstance(answers, (str, bytes, Mapping)) or not isinstance(answers, Iterable):
            raise StoreInputError("answers must be a list of objects")
        answers = list(answers)
        if not 1 <= len(answers) <= MAX_BATCH:
            raise StoreInputError(f"answers must hold 1 to {MAX_BATCH} items, got {len(answers)}")
        now = datetime.now(UTC)
        items: list[_Item] = []
        seen: dict[str, tuple[bool, frozenset[str], str | None]] = {}
        repeated: list[str] = []
        for i, a in enumerate(answers):
            where = f"answers[{i}]"
            if not isinstance(a, Mapping):
                raise StoreInputError(f"{where} must be an object")
            extra = set(a) - _EXAM_FIELDS
            if extra:
                raise StoreInputError(f"{where}: unknown field(s) {sorted(map(str, extra))}")
            for name in ("event_id", "correct", "skills"):
                if name not in a:
                    raise StoreInputError(f"{where}: missing field {name!r}")
            eid = _check_id(f"{where}.event_id", a["event_id"])
            c = _check_correct(where, a["correct"])
            skills = a["skills"]
            if isinstance(skills, (str, bytes)) or not isinstance(skills, Iterable):
                raise StoreInputError(f"{where}.skills must be a list of skill codes")
            skills = [_check_id(f"{where}.skills[{j}]", s) for j, s in enumerate(skills)]
            if not skills:
                raise StoreInputError(f"{where}.skills is empty: tag at least one skill")
            if len(set(skills)) != len(skills):
                raise StoreInputError(f"{where}.skills lists a skill twice")
            t = _check_time(f"{where}.time", a.get("time"), now)
            item = a.get("item_id")
            item = None if item is None else _check_id(f"{where}.item_id", item)
            content = (c, frozenset(skills), item)
            if eid in seen:
                if seen[eid] != content:
                    raise EventConflictError(
                        f"{where}.event_id {eid!r} appears twice in this call with different "
                        "content; nothing was written"
                    )
                repeated.append(eid)
                continue
            seen[eid] = content
            items.extend(_Item(eid, s, c, t, item) for s in skills)
        return WriteRequest(user, tuple(items), _check_source(source), tuple(repeated))

    def _write(self, request: WriteRequest) -> RecordResult:
        res = self.write_group([request])[0]
        if isinstance(res, Exception):
            raise res
        return res

    def write_group(self, requests: Sequence[WriteRequest]) -> list[RecordResult | StoreInputError]:
        """Apply several validated write requests in one transaction.

        Each request is its own batch, applied in list order (so two requests
        on the same (user, skill) chain, with the clamp between them). A
        request that reuses an event id for different content gets its
        :class:`EventConflictError` in the result list and writes nothing;
        the others are committed together. Everything returned is committed:
        the HTTP service uses this to group concurrent requests into one
        transaction (one commit, a handful of round trips) without weakening
        what a success means.

        Parameters
        ----------
        requests : sequence of WriteRequest
            Built by :meth:`flashcard_request` / :meth:`exam_request` (which
            validate the input).

        Returns
        -------
        list of RecordResult or StoreInputError, one per request
        """
        if not requests:
            return []
        with self._lock:
            params, version = self.params, self.param_version
        now = datetime.now(UTC)
        results: list[RecordResult | StoreInputError | None] = [None] * len(requests)
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    self._apply(conn, requests, params, version, now, results)
                break
            except sa.exc.IntegrityError:
                # Another process logged one of these event ids between our
                # check and our insert: retry once, the check now sees it.
                if attempt == 1:
                    raise
        return results  # type: ignore[return-value]

    def _apply(
        self,
        conn: sa.Connection,
        requests: Sequence[WriteRequest],
        params: ParamTable,
        version: str,
        now: datetime,
        results: list[Any],
    ) -> None:
        if self.dialect == "postgresql":
            self._apply_pg(conn, requests, params, version, now, results)
            return
        pairs = sorted({(r.user, it.skill) for r in requests for it in r.items})
        locked = self._lock_rows(conn, pairs, params, now)
        ids = sorted({it.event_id for r in requests for it in r.items})
        accepted, touched = self._plan(
            requests, locked, self._logged(conn, ids), params, version, now, results
        )
        if not accepted:
            conn.rollback()  # only the placeholder rows were written
            return
        batch_ids = self._insert_log(conn, accepted, now, locked)
        self._update_rows(conn, touched, version, now)
        self._set_batch_ids(accepted, batch_ids, results)

    def _apply_pg(
        self,
        conn: sa.Connection,
        requests: Sequence[WriteRequest],
        params: ParamTable,
        version: str,
        now: datetime,
        results: list[Any],
    ) -> None:
        """PostgreSQL: the same statements in psycopg's pipeline mode, so that
        a group costs two round trips before its commit (lock rows and look up
        event ids together; append the log and update the rows together)."""
        import psycopg

        raw = conn.connection.driver_connection
        pairs = sorted({(r.user, it.skill) for r in requests for it in r.items})
        ids = sorted({it.event_id for r in requests for it in r.items})
        try:
            with raw.pipeline() as pipe, raw.cursor() as c1, raw.cursor() as c2:
                c1.execute(
                    _PG_LOCK_ROWS,
                    {"u": [u for u, _ in pairs], "s": [s for _, s in pairs], "now": now},
                )
                c2.execute(_PG_LOGGED, {"ids": ids})
                pipe.sync()
                locked = {}
                for u, s, p, att, cor, v, t, key in c1.fetchall():
                    if att == 0:
                        p = params.params_for(s, u).p_init
                    locked[(u, s)] = (float(p), int(att), int(cor), v, t, int(key))
                logged = c2.fetchall()
                accepted, touched = self._plan(
                    requests, locked, logged, params, version, now, results
                )
                if not accepted:
                    pipe.sync()
                    conn.rollback()  # only the placeholder rows were written
                    return
                c1.execute(_PG_INSERT_LOG, _pg_log_params(accepted, now, locked))
                c2.execute(_PG_UPDATE_ROWS, _pg_row_params(touched, version, now))
                pipe.sync()
                batch_ids = [b for _, b in sorted(c1.fetchall())]
        except psycopg.errors.IntegrityError as e:
            raise sa.exc.IntegrityError("write group", None, e) from e
        self._set_batch_ids(accepted, batch_ids, results)

    @staticmethod
    def _set_batch_ids(
        accepted: list[tuple[int, WriteRequest, list[_Item]]],
        batch_ids: list[int],
        results: list[Any],
    ) -> None:
        for (i, _, _), b in zip(accepted, batch_ids, strict=True):
            res = results[i]
            results[i] = RecordResult(
                res.user_id, res.mastery, res.recorded, res.duplicates, int(b)
            )

    def _plan(
        self,
        requests: Sequence[WriteRequest],
        locked: dict[tuple[str, str], tuple[float, int, int, str, datetime, int]],
        logged: Iterable[tuple[str, str, str, bool]],
        params: ParamTable,
        version: str,
        now: datetime,
        results: list[Any],
    ) -> tuple[list[tuple[int, WriteRequest, list[_Item]]], list[MasteryRow]]:
        """The group's arithmetic, no I/O: which events are new, duplicates or
        conflicts, and every touched row's new value (requests in list order).
        Fills ``results``; returns the accepted requests and the touched rows."""
        state = {k: v[:3] for k, v in locked.items()}
        stored = {k: (v[3], _aware(v[4])) for k, v in locked.items()}
        have: dict[str, set[tuple[str, str, bool, str | None]]] = {}
        for eid, u, s, c, item in logged:
            have.setdefault(eid, set()).add((u, s, bool(c), item))
        accepted: list[tuple[int, WriteRequest, list[_Item]]] = []
        touched: dict[tuple[str, str], MasteryRow] = {}
        for i, r in enumerate(requests):
            try:
                dups = _duplicates(r.user, r.items, have)
            except EventConflictError as e:
                results[i] = e
                continue
            new = [it for it in r.items if it.event_id not in dups]
            for it in new:
                have.setdefault(it.event_id, set()).add((r.user, it.skill, it.correct, it.item))
            rows: dict[str, MasteryRow] = {}
            for s in sorted({it.skill for it in r.items}):
                mine = [it for it in new if it.skill == s]
                p, att, cor = state[(r.user, s)]
                known = params.lookup(s)[1]
                if mine:
                    for it in mine:
                        p = self._tracer(s, r.user, params, it.item).update(p, it.correct)
                    p = clamp(p)
                    att += len(mine)
                    cor += sum(it.correct for it in mine)
                    state[(r.user, s)] = (p, att, cor)
                    row = MasteryRow(r.user, s, p, att, cor, mastery_status(p), version, now, known)
                    touched[(r.user, s)] = row
                elif att == 0:
                    p = clamp(p)
                    row = MasteryRow(
                        r.user, s, p, 0, 0, mastery_status(p), version, None, known, False
                    )
                else:
                    row = touched.get((r.user, s)) or MasteryRow(
                        r.user, s, p, att, cor, mastery_status(p), *stored[(r.user, s)], known
                    )
                rows[s] = row
            results[i] = RecordResult(r.user, rows, len(new), sorted(dups | set(r.repeated)), None)
            if new:
                accepted.append((i, r, new))
        return accepted, list(touched.values())

    # The statements of a write in their portable SQLAlchemy form (SQLite and
    # any other database); PostgreSQL uses _apply_pg.
    def _logged(
        self, conn: sa.Connection, ids: list[str]
    ) -> list[tuple[str, str, str, bool, str | None]]:
        out = []
        for lo in range(0, len(ids), 5000):
            out += conn.execute(
                sa.select(
                    events.c.event_id,
                    events.c.user_id,
                    events.c.skill,
                    events.c.correct,
                    events.c.item_id,
                ).where(events.c.event_id.in_(ids[lo : lo + 5000]))
            ).all()
        return out

    def _insert_log(
        self,
        conn: sa.Connection,
        accepted: list[tuple[int, WriteRequest, list[_Item]]],
        now: datetime,
        locked: Mapping[tuple[str, str], tuple[Any, ...]],
    ) -> list[int]:
        """Append the accepted requests' batches and events (events in list
        order, so that arrival order follows the order of the updates)."""
        ids = [
            row[0]
            for row in conn.execute(
                sa.insert(batches).returning(batches.c.batch_id, sort_by_parameter_order=True),
                [
                    {"user_id": r.user, "source": r.source, "received_at": now, "n_events": len(n)}
                    for _, r, n in accepted
                ],
            )
        ]
        conn.execute(
            sa.insert(events),
            [
                {
                    "event_id": it.event_id,
                    "user_id": r.user,
                    "skill": it.skill,
                    "correct": it.correct,
                    "event_time": it.time,
                    "source": r.source,
                    "batch_id": b,
                    "item_id": it.item,
                    "pair_key": locked[(r.user, it.skill)][5],
                }
                for (_, r, new), b in zip(accepted, ids, strict=True)
                for it in new
            ],
        )
        return ids

    def _update_rows(
        self, conn: sa.Connection, rows: list[MasteryRow], version: str, now: datetime
    ) -> None:
        conn.execute(
            _UPDATE_ROW,
            [
                {
                    "u": r.user_id,
                    "s": r.skill,
                    "p_mastery": r.p_mastery,
                    "attempts": r.attempts,
                    "correct_attempts": r.correct_attempts,
                    "status": r.status,
                    "param_version": version,
                    "updated_at": now,
                }
                for r in rows
            ],
        )

    def _lock_rows(
        self,
        conn: sa.Connection,
        pairs: list[tuple[str, str]],
        params: ParamTable,
        now: datetime,
    ) -> dict[tuple[str, str], tuple[float, int, int, str, datetime, int]]:
        """Create missing rows and lock all of ``pairs`` (sorted, so that
        concurrent groups lock in the same order); return (p, attempts,
        correct, param_version, updated_at, pair_key) per pair. A row without
        attempts starts from the current parameters' ``p_init``, unclamped, as
        replay does."""
        out: dict[tuple[str, str], tuple[float, int, int, str, datetime, int]] = {}
        insert = _dialect_insert(self.dialect)
        # New rows' keys follow the largest key: the transaction is the only
        # writer (SQLite's BEGIN IMMEDIATE). Keys offered to rows that exist
        # already are left unused.
        next_key = conn.execute(
            sa.select(sa.func.coalesce(sa.func.max(mastery_table.c.pair_key), 0))
        ).scalar_one()
        for lo in range(0, len(pairs), 1000):
            chunk = pairs[lo : lo + 1000]
            ins = insert(mastery_table).values(
                [
                    {
                        "user_id": u,
                        "skill": s,
                        "p_mastery": 0.5,
                        "attempts": 0,
                        "correct_attempts": 0,
                        "status": "in_progress",
                        "param_version": "",
                        "updated_at": now,
                        "pair_key": next_key + lo + k + 1,
                    }
                    for k, (u, s) in enumerate(chunk)
                ]
            )
            # A no-op update of a conflicting row takes its row lock
            # (PostgreSQL) and returns it: create-or-lock in one round trip.
            stmt = ins.on_conflict_do_update(
                index_elements=[mastery_table.c.user_id, mastery_table.c.skill],
                set_={"attempts": ins.excluded.attempts + mastery_table.c.attempts},
            ).returning(
                mastery_table.c.user_id,
                mastery_table.c.skill,
                mastery_table.c.p_mastery,
                mastery_table.c.attempts,
                mastery_table.c.correct_attempts,
                mastery_table.c.param_version,
                mastery_table.c.updated_at,
                mastery_table.c.pair_key,
            )
            for u, s, p, att, cor, v, t, key in conn.execute(stmt):
                if att == 0:
                    p = params.params_for(s, u).p_init
                out[(u, s)] = (float(p), int(att), int(cor), v, t, int(key))
        return out

    def delete_user(self, user: str) -> dict[str, int]:
        """Remove a user's events, batches and mastery rows in one transaction
        (a privacy request). Returns the number of rows deleted per table."""
        user = _check_id("user_id", user)
        with self.engine.begin() as conn:
            counts = {}
            for name, table in (
                ("mastery", mastery_table),
                ("events", events),
                ("batches", batches),
            ):
                counts[name] = conn.execute(
                    sa.delete(table).where(table.c.user_id == user)
                ).rowcount
        return counts

    # Reads ----------------------------------------------------------------
    def mastery(self, user: str, skill: str | None = None) -> MasteryRow | dict[str, MasteryRow]:
        """The stored row of (user, skill), or all of a user's rows by skill.

        For a (user, skill) with no events yet, the row is the prior
        (``stored=False``): the skill's ``p_init`` clamped, attempts 0.
        """
        user = _check_id("user_id", user)
        if skill is None:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(mastery_table)
                    .where(mastery_table.c.user_id == user, mastery_table.c.attempts > 0)
                    .order_by(mastery_table.c.skill)
                ).all()
            return {r.skill: self._row(r) for r in rows}
        skill = _check_id("skill", skill)
        return self._rows(user, [skill])[skill]

    def _rows(self, user: str, skills: list[str]) -> dict[str, MasteryRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(mastery_table).where(
                    mastery_table.c.user_id == user,
                    mastery_table.c.skill.in_(skills),
                    mastery_table.c.attempts > 0,
                )
            ).all()
        out = {r.skill: self._row(r) for r in rows}
        for s in skills:
            if s not in out:
                known = self.params.lookup(s)[1]
                p = clamp(self.params.params_for(s, user).p_init)
                out[s] = MasteryRow(
                    user, s, p, 0, 0, mastery_status(p), self.param_version, None, known, False
                )
        return out

    def _row(self, r: Any) -> MasteryRow:
        updated = r.updated_at
        if updated is not None and updated.tzinfo is None:  # SQLite drops the zone
            updated = updated.replace(tzinfo=UTC)
        return MasteryRow(
            r.user_id,
            r.skill,
            float(r.p_mastery),
            int(r.attempts),
            int(r.correct_attempts),
            r.status,
            r.param_version,
            updated,
            r.skill in self.params,
        )

    def predict_next(self, user: str, skill: str) -> float:
        """P(correct) on the user's next response on ``skill``, from the stored
        (clamped) P(mastery), or the prior for a new (user, skill)."""
        row = self.mastery(user, skill)
        return self._tracer(row.skill, row.user_id).predict_next(row.p_mastery)

    def events(self, user: str | None = None) -> dict[str, np.ndarray]:
        """The event log in arrival order, as columns (optionally one user's)."""
        q = sa.select(events).order_by(events.c.seq)
        if user is not None:
            q = q.where(events.c.user_id == _check_id("user_id", user))
        with self.engine.connect() as conn:
            res = conn.execute(q)
            keys = list(res.keys())
            rows = res.all()
        cols = list(zip(*rows, strict=True)) if rows else [[] for _ in keys]
        return {
            k: np.array(c, dtype=object if k not in ("seq", "batch_id") else np.int64)
            for k, c in zip(keys, cols, strict=True)
        }

    # Jobs -------------------------------------------------------------------
    def create_job(self) -> dict[str, Any]:
        """Register a queued background job; returns its record."""
        rec = {"job_id": _new_id(), "state": "queued", "submitted": datetime.now(UTC)}
        with self.engine.begin() as conn:
            conn.execute(sa.insert(jobs_table).values(**rec))
        return self.job(rec["job_id"])  # type: ignore[return-value]

    def set_job(self, job_id: str, **fields: Any) -> None:
        """Update a job's ``state``, ``finished``, ``result`` (JSON-able) or ``error``."""
        import json

        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(jobs_table).where(jobs_table.c.job_id == job_id).values(**fields)
            )

    def job(self, job_id: str) -> dict[str, Any] | None:
        """A job's record, or None."""
        import json

        with self.engine.connect() as conn:
            r = conn.execute(sa.select(jobs_table).where(jobs_table.c.job_id == job_id)).first()
        if r is None:
            return None
        rec = dict(r._mapping)
        for k in ("submitted", "finished"):
            if rec[k] is not None and rec[k].tzinfo is None:
                rec[k] = rec[k].replace(tzinfo=UTC)
        rec["result"] = json.loads(rec["result"]) if rec["result"] else None
        return rec

    # Recalculation ---------------------------------------------------------
    def recalculate(
        self,
        users: Sequence[str] | None = None,
        params: ParamTable | BKTParams | str | Path | None = None,
        *,
        bulk: str = "auto",
        threads: int | None = None,
    ) -> RecalcResult:
        """Rebuild mastery rows from the event log (the background job).

        Replays the log in arrival order with :func:`bktbayes.tracing.replay`
        (batch id as the batch key, so the clamp applies where the
        incremental updates applied it) and rewrites the rows, in one
        transaction that holds writers off (PostgreSQL: an EXCLUSIVE lock on the
        mastery table, readers go on; SQLite: ``BEGIN IMMEDIATE``).

        Parameters
        ----------
        users : sequence of str, optional
            Only these users (default: everyone).
        params : optional
            New parameters: the rows are rebuilt with them, and the store
            serves them from then on.
        bulk : {"auto", "parallel", "adbc", "sqlalchemy"}
            How to read the log: ``"parallel"`` (PostgreSQL 14+, whole log, no
            item-level parameters: two connections on this transaction's
            snapshot, each aggregating heap page ranges into binary
            strings), ``"adbc"`` (PostgreSQL: the ADBC driver's binary COPY
            straight into Arrow), ``"sqlalchemy"`` (portable, row by row
            through the DBAPI); ``"auto"`` picks the first that applies.
        """
        from . import recalc

        if params is not None:
            table = _as_table(params)
            version = table.version
        else:
            with self._lock:
                table, version = self.params, self.param_version
        if users is not None:
            users = sorted({_check_id(f"users[{i}]", u) for i, u in enumerate(users)})
        result = recalc.recalculate_store(self, table, version, users, bulk, threads)
        if params is not None:
            self.set_params(table)
        return result


def _as_table(params: ParamTable | BKTParams | str | Path | None) -> ParamTable:
    """A parameter table from a table, one set of parameters for every skill,
    the path of a JSON file, or None (the seed card's defaults)."""
    if params is None:
        return ParamTable.seed_defaults()
    if isinstance(params, ParamTable):
        return params
    if isinstance(params, BKTParams):
        # A fixed creation time keeps the version stable across processes.
        return ParamTable(default=params, model="constant", created="2026-01-01T00:00:00+00:00")
    if isinstance(params, (str, Path)):
        return ParamTable.from_json(params)
    raise TypeError(f"params: expected ParamTable, BKTParams or a path, got {params!r}")


def _check_source(source: Any) -> str:
    if source not in SOURCES:
        raise StoreInputError(f"source must be one of {list(SOURCES)}, got {source!r}")
    return source


def _duplicates(
    user: str, items: Sequence[_Item], have: Mapping[str, set[tuple[str, str, bool, str | None]]]
) -> set[str]:
    """Ids of ``items`` already logged with the same content; raise on reuse
    of an id for different content (another user, skill set, answer or item)."""
    want: dict[str, set[tuple[str, str, bool, str | None]]] = {}
    for it in items:
        if it.event_id in have:
            want.setdefault(it.event_id, set()).add((user, it.skill, it.correct, it.item))
    for eid, rows in want.items():
        if rows != have[eid]:
            raise EventConflictError(
                f"event_id {eid!r} is already logged with different content "
                f"(logged {sorted(have[eid])}, sent {sorted(rows)}); nothing was written"
            )
    return set(want)


def _pg_log_params(
    accepted: list[tuple[int, WriteRequest, list[_Item]]],
    now: datetime,
    locked: Mapping[tuple[str, str], tuple[Any, ...]],
) -> dict[str, Any]:
    ev = [(it, r, k) for k, (_, r, new) in enumerate(accepted, 1) for it in new]
    return {
        "b_user": [r.user for _, r, _ in accepted],
        "b_source": [r.source for _, r, _ in accepted],
        "b_n": [len(new) for _, _, new in accepted],
        "now": now,
        "e_id": [it.event_id for it, _, _ in ev],
        "e_user": [r.user for _, r, _ in ev],
        "e_skill": [it.skill for it, _, _ in ev],
        "e_correct": [it.correct for it, _, _ in ev],
        "e_time": [it.time for it, _, _ in ev],
        "e_source": [r.source for _, r, _ in ev],
        "e_k": [k for _, _, k in ev],
        "e_item": [it.item for it, _, _ in ev],
        "e_pair": [locked[(r.user, it.skill)][5] for it, r, _ in ev],
    }


def _pg_row_params(rows: list[MasteryRow], version: str, now: datetime) -> dict[str, Any]:
    return {
        "u": [r.user_id for r in rows],
        "s": [r.skill for r in rows],
        "p": [r.p_mastery for r in rows],
        "a": [r.attempts for r in rows],
        "c": [r.correct_attempts for r in rows],
        "st": [r.status for r in rows],
        "v": version,
        "now": now,
    }


def _aware(t: datetime | None) -> datetime | None:
    if t is not None and t.tzinfo is None:  # SQLite drops the zone
        return t.replace(tzinfo=UTC)
    return t


def _dialect_insert(dialect: str):
    return pg_dialect.insert if dialect == "postgresql" else sqlite_dialect.insert


def _new_id() -> str:
    return uuid.uuid4().hex


def _make_engine(url: sa.URL, options: dict[str, Any]) -> sa.Engine:
    if url.get_backend_name() == "sqlite":
        db = url.database
        if db and db != ":memory:":
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        options.setdefault("connect_args", {}).setdefault("timeout", 60.0)
        engine = sa.create_engine(url, **options)

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own
            # transaction handling would defer it to the first write).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # a commit is durable
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # One writer at a time from the first statement on: no lost updates
            # and no upgrade deadlocks between readers turning writers.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    options.setdefault("pool_size", 10)
    options.setdefault("max_overflow", 20)
    options.setdefault("pool_pre_ping", False)
    engine = sa.create_engine(url, **options)
    if url.get_backend_name() == "postgresql":

        @sa.event.listens_for(engine, "connect")
        def _on_connect_pg(dbapi_conn: Any, _record: Any) -> None:
            # psycopg prepares a statement after its fifth run, and PostgreSQL
            # may then switch to a generic plan, costed while the tables were
            # small, for the rest of the session: in about half of the HTTP
            # load runs on a fresh database, every write group then took
            # 30-45 ms instead of 10 (350 against 1,000-1,250 requests/s).
            # Planning each call for its own arrays is cheap.
            auto = dbapi_conn.autocommit
            dbapi_conn.autocommit = True
            with dbapi_conn.cursor() as cur:
                cur.execute("SET plan_cache_mode = force_custom_plan")
            dbapi_conn.autocommit = auto

    return engine


def update_mastery_bkt(
    store: MasteryStore, user: str, skill_code: str, responses: Sequence[bool]
) -> MasteryRow:
    """The seed card's entry point: update (user, skill_code) with a sequence
    of responses and return the stored row (a thin wrapper over
    :meth:`MasteryStore.record_responses`)."""
    return store.record_responses(user, skill_code, responses).mastery[skill_code]
