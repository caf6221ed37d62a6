"""Background recalculation: the event log read in bulk, replayed with the
tracer's batch replay, and the mastery rows written back in bulk.

The replay itself is :func:`bktbayes.tracing.replay_packed` (numba); this module
only moves columns between the database and numpy. PostgreSQL has a fast path
at both ends (read: several connections on the locked transaction's exported
snapshot, each aggregating heap page ranges into binary strings, or the ADBC
driver's binary COPY into Arrow for some users or with item ids; write: binary
``COPY ... FROM STDIN`` on the locked transaction's own connection), and every
database has the portable SQLAlchemy path.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa

from . import packing
from .packing import pack_codes
from .params import ParamTable
from .tracing import ReplayResult, replay_packed

if TYPE_CHECKING:  # pragma: no cover
    from .store import MasteryStore, RecalcResult

__all__ = [
    "adbc_available",
    "read_log",
    "recalculate_store",
    "replay_columns",
    "retain_heap",
    "warm_up",
]

#: Log columns a recalculation reads (``item_id`` too when the parameter
#: table has item-level parameters), and the mastery rows' key columns.
_LOG_COLUMNS = ("pair_key", "correct", "seq", "batch_id")
_PAIR_COLUMNS = ("pair_key", "user_id", "skill")
_DTYPES = {"pair_key": np.int64, "correct": bool, "seq": np.int64, "batch_id": np.int64}


def adbc_available() -> bool:
    """Whether the ADBC PostgreSQL driver (the bulk-read fast path) is installed."""
    try:
        import adbc_driver_postgresql.dbapi  # noqa: F401
    except ImportError:
        return False
    return True


def retain_heap() -> bool:
    """Keep the memory that freed arrays leave inside this process, for
    reuse, instead of returning it to the kernel (glibc's ``mallopt``;
    returns ``False`` and changes nothing elsewhere).

    Why: a recalculation of 10M events allocates and frees about 2 GB of
    arrays. By default glibc returns every freed block over 128 kB to the
    kernel, and the next recalculation faults all of those pages in again,
    which on the 2-core benchmark machine took 0.3-1.9 s of system time in
    the replay alone (1.1-2.9 s, against 0.8-1.1 s with the heap kept).
    ``bktbayes serve`` and ``bktbayes recalculate`` call this at start-up,
    so their resident memory stays at the largest recalculation's peak;
    importing or calling the library never changes how the host process
    allocates. With ``BKTBAYES_RETAIN_HEAP=0`` in the environment it does
    nothing (and returns ``False``).
    """
    import ctypes
    import ctypes.util
    import os
    import sys

    if os.environ.get("BKTBAYES_RETAIN_HEAP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # Blocks up to 1 GB come from the heap (not separate mappings, which go
    # back on free), and the heap's top is never trimmed; both are needed.
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _codes(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and the values behind them for a string column (Arrow or numpy)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    enc = pc.dictionary_encode(arr)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.unify_dictionaries().combine_chunks() if enc.num_chunks else enc
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
    codes = enc.indices.to_numpy(zero_copy_only=False)  # int32; pack_codes widens once
    uniques = np.asarray(enc.dictionary.to_pylist(), dtype=object)
    return codes, uniques


def _objects(values: Any) -> np.ndarray:
    """A string column (Arrow or a sequence) as a numpy object array."""
    if hasattr(values, "to_pylist"):
        return np.asarray(values.to_pylist(), dtype=object)
    return np.asarray(values, dtype=object)


def read_log(
    store: MasteryStore,
    conn: sa.Connection,
    users: Sequence[str] | None,
    bulk: str,
    *,
    items: bool = False,
) -> tuple[dict[str, Any], str]:
    """Read the log's ``pair_key, correct, seq, batch_id`` (and ``item_id``
    with ``items``) and the mastery rows' ``pair_key, user_id, skill``
    (under ``"pairs"``), optionally for some users only, as columns; returns
    the columns and the method used.

    ``bulk`` is ``"parallel"`` (PostgreSQL, whole log, no items: several
    connections on ``conn``'s snapshot, see :func:`_read_parallel`),
    ``"adbc"`` (PostgreSQL: the ADBC driver's binary COPY into Arrow),
    ``"sqlalchemy"`` (portable) or ``"auto"``: the first of these that
    applies.
    """
    if bulk not in ("auto", "parallel", "adbc", "sqlalchemy"):
        raise ValueError(f"bulk must be 'auto', 'parallel', 'adbc' or 'sqlalchemy', got {bulk!r}")
    pg = store.dialect == "postgresql"
    if bulk in ("adbc", "parallel") and not pg:
        raise ValueError(f"bulk={bulk!r} needs PostgreSQL")
    if bulk == "parallel" and (users is not None or items):
        raise ValueError(
            "bulk='parallel' reads the whole log without item ids: use 'adbc' for "
            "some users or for item-level parameters"
        )
    # Page ranges are TID range scans from PostgreSQL 14 on; before that each
    # range would scan the whole table.
    tid_ranges = pg and (conn.dialect.server_version_info or (0,)) >= (14,)
    if bulk == "parallel" and not tid_ranges:
        raise ValueError("bulk='parallel' needs PostgreSQL 14 or later (TID range scans)")
    if bulk == "parallel" or (bulk == "auto" and tid_ranges and users is None and not items):
        return _read_parallel(store, conn), "parallel"
    use_adbc = pg and (bulk == "adbc" or (bulk == "auto" and adbc_available()))
    log_cols = _LOG_COLUMNS + (("item_id",) if items else ())
    if use_adbc:
        return _read_adbc(store, users, log_cols), "adbc"
    from .store import events, mastery_table

    out = _select_columns(conn, events, log_cols, users)
    out["pairs"] = _select_columns(conn, mastery_table, _PAIR_COLUMNS, users)
    return out, "sqlalchemy"


def _select_columns(
    conn: sa.Connection, table: sa.Table, names: Sequence[str], users: Sequence[str] | None
) -> dict[str, np.ndarray]:
    """Columns of ``table`` (optionally for some users) through the DBAPI."""
    q = sa.select(*(table.c[c] for c in names))
    if users is not None:
        q = q.where(table.c.user_id.in_(users))
    rows = conn.execute(q).all()
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    return {n: np.array(c, dtype=_DTYPES.get(n, object)) for n, c in zip(names, cols, strict=True)}


#: Connections that read the log at once in the "parallel" read.
READ_CONNECTIONS = 2

#: One range's events as one binary string: per event three big-endian
#: 64-bit integers, ``pair_key``, ``seq * 2 + correct`` and ``batch_id``
#: (folding the response into ``seq`` saves a field per row; a ``seq`` over
#: 2**62 would make the server raise "bigint out of range", not wrap).
_PG_RANGE = (
    "SELECT string_agg(int8send(pair_key) || int8send(seq * 2 + correct::int)"
    " || int8send(batch_id), ''::bytea) FROM bkt_events"
    " WHERE ctid >= %s::tid AND ctid < %s::tid"
)


def _range_pages(block_size: int) -> int:
    """Heap pages per range: 2048 pages of 8 kB hold at most about 600k rows
    (``block_size / 28`` a page), a string of at most 14 MB, far below
    PostgreSQL's 1 GB value limit; small enough that each is decoded and
    freed while the next streams in."""
    return max(1, 2048 * 8192 // block_size)


def _read_ranges(
    url: str, snapshot: str | None, ranges: Sequence[tuple[int, int]]
) -> list[tuple[np.ndarray, ...]]:
    """The log's events in each heap page range ``[lo, hi)``, read on a new
    connection that imports ``snapshot`` (from ``pg_export_snapshot()``;
    ``None``: its own), as the columns :data:`_LOG_COLUMNS` of each range."""
    import psycopg
    from psycopg.adapt import Loader
    from psycopg.pq import Format

    class _Range(Loader):
        # Decodes straight from the driver's result buffer (a memoryview:
        # no intermediate bytes object), on this reader's thread.
        format = Format.BINARY

        def load(self, data: Any) -> tuple[np.ndarray, ...]:
            raw = np.frombuffer(data, dtype=">i8").reshape(-1, 3)
            sc = raw[:, 1].astype(np.int64)
            # In the order of _LOG_COLUMNS: pair_key, correct, seq, batch_id.
            return (
                raw[:, 0].astype(np.int64),
                (sc & 1).astype(bool),
                sc >> 1,
                raw[:, 2].astype(np.int64),
            )

    out: list[tuple[np.ndarray, ...]] = []
    empty = _Range(0).load(b"")
    # autocommit: the transaction is this explicit BEGIN, whose isolation
    # level a snapshot import needs (not an implicit one that the driver
    # opens at the first statement).
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        if snapshot is not None:
            c.execute("SET TRANSACTION SNAPSHOT " + _quote(snapshot))
        cur = c.cursor(binary=True)
        cur.adapters.register_loader("bytea", _Range)
        for lo, hi in ranges:
            got = cur.execute(_PG_RANGE, (f"({lo},0)", f"({hi},0)")).fetchone()[0]
            out.append(empty if got is None else got)
        c.execute("COMMIT")
    return out


def _quote(snapshot: str) -> str:
    """A snapshot id (``pg_export_snapshot()``'s hex and dashes) as a literal."""
    if not snapshot or any(ch not in "0123456789ABCDEFabcdef-" for ch in snapshot):
        raise ValueError(f"unexpected snapshot id {snapshot!r}")
    return f"'{snapshot}'"


def _read_parallel(store: MasteryStore, conn: sa.Connection) -> dict[str, Any]:
    """The whole log over :data:`READ_CONNECTIONS` connections, each on
    ``conn``'s snapshot (``pg_export_snapshot``, as ``pg_dump --jobs`` reads
    tables), each aggregating its share of the heap's page ranges into one
    binary string per range; the mastery rows' keys alongside.

    Why: a COPY of the four columns costs about 500 ns per row on each side
    of the connection (the server's output functions; the client's per-row
    COPY messages, which the ADBC driver decodes one field at a time), and
    one connection keeps one server process busy. Aggregated ranges cost the
    server about half again as much per row but the client almost nothing,
    and two server processes share the work.
    """
    snapshot = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
    n_pages, block = conn.exec_driver_sql(
        "SELECT pg_relation_size('bkt_events') / current_setting('block_size')::int, "
        "current_setting('block_size')::int"
    ).one()
    step = _range_pages(int(block))
    # The last range is open-ended: the snapshot may see pages the size above
    # missed (none under the recalculation's lock, but it costs nothing).
    bounds = [*range(0, int(n_pages), step), 2**32 - 1]
    if len(bounds) == 1:
        bounds = [0, 2**32 - 1]
    ranges = list(itertools.pairwise(bounds))
    n_conn = max(1, min(READ_CONNECTIONS, len(ranges)))
    url = store.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with concurrent.futures.ThreadPoolExecutor(n_conn) as pool:
        futs = [pool.submit(_read_ranges, url, snapshot, ranges[i::n_conn]) for i in range(n_conn)]
        # The mastery rows' keys meanwhile (the table is locked: any
        # snapshot from now on sees the same rows).
        pairs = _read_pairs(store, conn)
        got = [f.result() for f in futs]
    # Page order (about arrival order), whatever the number of connections.
    parts = [got[k % n_conn][k // n_conn] for k in range(len(ranges))]
    del got
    out: dict[str, Any] = {
        name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(_LOG_COLUMNS)
    }
    out["pairs"] = pairs
    return out


def _read_pairs(store: MasteryStore, conn: sa.Connection) -> dict[str, Any]:
    """The mastery rows' ``pair_key, user_id, skill`` (all rows)."""
    if adbc_available():
        return _read_adbc(store, None, ())["pairs"]
    from .store import mastery_table

    return _select_columns(conn, mastery_table, _PAIR_COLUMNS, None)


def _read_adbc(
    store: MasteryStore, users: Sequence[str] | None, log_cols: Sequence[str]
) -> dict[str, Any]:
    """Log columns ``log_cols`` (none: only the pairs) and the mastery rows'
    keys under ``"pairs"``, through the ADBC driver."""
    import adbc_driver_postgresql.dbapi as adbc

    url = store.url.set(drivername="postgresql").render_as_string(hide_password=False)
    where = " WHERE user_id = ANY($1)" if users is not None else ""
    args = (list(users),) if users is not None else None
    out: dict[str, Any] = {}
    with adbc.connect(url) as conn, conn.cursor() as cur:
        if log_cols:
            cur.execute(f"SELECT {', '.join(log_cols)} FROM bkt_events{where}", args)
            log = cur.fetch_arrow_table()
            out.update(
                (n, log.column(n).to_numpy().astype(_DTYPES[n], copy=False))
                for n in log_cols
                if n != "item_id"
            )
            if "item_id" in log_cols:
                out["item_id"] = log.column("item_id")
        cur.execute(f"SELECT {', '.join(_PAIR_COLUMNS)} FROM bkt_mastery{where}", args)
        pairs = cur.fetch_arrow_table()
    out["pairs"] = {
        "pair_key": pairs.column("pair_key").to_numpy().astype(np.int64, copy=False),
        "user_id": pairs.column("user_id"),
        "skill": pairs.column("skill"),
    }
    return out


def _key_positions(keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Position in ``keys`` (unique pair keys) of each of ``wanted``; -1 where absent."""
    idx = np.full(len(wanted), -1, dtype=np.int64)
    if len(wanted) and len(keys):
        kmax = int(keys.max())
        inside = (wanted >= 0) & (wanted <= kmax)
        if kmax < 4 * (len(wanted) + len(keys)) + 1024:
            # Keys are drawn from a sequence (dense up to gaps): a lookup
            # table is one gather per key.
            lut = np.full(kmax + 1, -1, dtype=np.int32 if len(keys) < 2**31 else np.int64)
            lut[keys] = np.arange(len(keys))
            idx[inside] = lut[wanted[inside]]
        else:
            order = np.argsort(keys, kind="stable")
            pos = np.searchsorted(keys[order], wanted).clip(0, len(keys) - 1)
            hit = keys[order][pos] == wanted
            idx[hit] = order[pos[hit]]
    return idx


def _pair_index(keys: np.ndarray, ev_keys: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Position in ``keys`` (the mastery rows' pair keys) of each event's key."""
    idx = _key_positions(keys, ev_keys)
    bad = np.flatnonzero(idx < 0)
    if len(bad):
        raise RuntimeError(
            f"bkt_events: {len(bad)} events (first seq {int(seq[bad[0]])}) carry a pair_key "
            "with no bkt_mastery row"
        )
    return idx


def replay_columns(
    cols: dict[str, Any], params: ParamTable, *, threads: int | None = None
) -> ReplayResult:
    """Replay log columns (``pair_key, correct, seq, batch_id``, optionally
    ``item_id``, and the mastery rows' keys under ``"pairs"``) in arrival
    order with the batch id as the batch key; items count only with a table
    that has item-level parameters. The result's mastery table carries each
    row's ``pair_key``.

    Each (user, skill) pair is one sequence: its index among the rows is the
    packing's "user" code, and the pair's user id stands behind it (so that
    student-level parameters still apply).
    """
    pairs = cols["pairs"]
    keys = np.asarray(pairs["pair_key"], dtype=np.int64)
    idx = _pair_index(keys, np.asarray(cols["pair_key"], dtype=np.int64), cols["seq"])
    s_codes, s_vals = _codes(pairs["skill"])
    s_codes = np.asarray(s_codes, dtype=np.int64)
    packed = pack_codes(
        idx,
        s_codes[idx],
        cols["seq"],
        cols["correct"],
        n_user=max(len(keys), 1),
        n_skill=max(len(s_vals), 1),
        threads=threads,
    )
    items = None
    if cols.get("item_id") is not None and params.item_params:
        items = _objects(cols["item_id"])
    res = replay_packed(
        packed,
        params,
        s_vals,
        _objects(pairs["user_id"]),
        batch=cols["batch_id"],
        threads=threads,
        per_event=False,
        items=items,
    )
    res.mastery["pair_key"] = keys[packed.seq_user]
    return res


def warm_up(params: ParamTable, *, postgresql: bool = False) -> float:
    """Load every kernel a recalculation runs (from numba's cache, or compile
    them) by replaying a small synthetic log with the column types a read
    returns; with ``postgresql`` also import the bulk-read driver. Returns the
    seconds it took.

    The service runs this on its recalculation thread at start-up, so that a
    recalculation job does not pay the 0.5-1 s of a cold process (a tenth of
    a 10M-event recalculation).
    """
    import pyarrow as pa

    t0 = time.perf_counter()
    if postgresql and adbc_available():
        import adbc_driver_postgresql.dbapi  # noqa: F401
    rng = np.random.default_rng(0)
    n, n_pairs = 512, 16
    cols: dict[str, Any] = {
        "pair_key": rng.integers(0, n_pairs, n).astype(np.int64),
        "correct": rng.random(n) < 0.6,
        "seq": np.arange(n, dtype=np.int64),
        "batch_id": np.arange(n, dtype=np.int64) // 3,
        "pairs": {
            "pair_key": np.arange(n_pairs, dtype=np.int64),
            "user_id": pa.array([f"u{i}" for i in range(n_pairs)]),
            "skill": pa.array([f"s{i % 4}" for i in range(n_pairs)]),
        },
    }
    if params.item_params:
        cols["item_id"] = pa.array([None] * n, type=pa.string())
    replay_columns(cols, params)
    # Logs of 2**20+ events sort in two threads and merge the halves: a
    # kernel the small log above does not reach.
    v = np.arange(8, dtype=np.int64)
    packing._merge(v[:4], v[4:], np.empty_like(v))
    return time.perf_counter() - t0


def _mastery_rows(res: ReplayResult, version: str, now: datetime) -> dict[str, Any]:
    m = res.mastery
    return {
        "pair_key": m["pair_key"],
        "p_mastery": m["p_mastery"],
        "attempts": m["attempts"],
        "correct_attempts": m["correct"],
        "status": m["status"],
        "param_version": version,
        "updated_at": now,
    }


def _copy_binary(rows: dict[str, Any]) -> tuple[bytes, list[str]]:
    """The new row values as PostgreSQL's binary COPY format, built in one
    numpy pass (every field fixed-width: the status goes as a code into the
    list of status names returned with it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    status = np.asarray(rows["status"])
    # (A numpy unicode array converts in C++; through Python objects it took 4x as long.)
    enc = pc.dictionary_encode(pa.array(status if status.dtype.kind == "U" else status.astype(str)))
    names = enc.dictionary.to_pylist()
    fields = [
        ("pair_key", ">i8", rows["pair_key"]),
        ("p_mastery", ">f8", rows["p_mastery"]),
        ("attempts", ">i4", rows["attempts"]),
        ("correct_attempts", ">i4", rows["correct_attempts"]),
        ("status", ">i2", enc.indices.to_numpy(zero_copy_only=False)),
    ]
    dtype = [("n", ">i2")]
    for name, kind, _ in fields:
        dtype += [(f"{name}_len", ">i4"), (name, kind)]
    # In key order, which is about the heap's order: the update then walks
    # the table's pages in turn.
    order = np.argsort(rows["pair_key"], kind="stable")
    rec = np.empty(len(order), dtype=np.dtype(dtype))  # packed: no padding
    rec["n"] = len(fields)
    for name, kind, values in fields:
        rec[f"{name}_len"] = np.dtype(kind).itemsize
        rec[name] = np.asarray(values)[order]
    header = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8  # signature, flags, no extension
    return header + rec.tobytes() + b"\xff\xff", names


def _update_copy(conn: sa.Connection, rows: dict[str, Any]) -> None:
    """Rewrite mastery rows in place, by key: COPY the new values (binary)
    into a temporary table on the transaction's own connection, then one
    ``UPDATE ... FROM``. The table's fill factor (50) leaves room on every
    page, so these are heap-only updates that touch no index (measured on
    480k rows: 1.5 s, against 3.4 s to delete and COPY them back). Binary
    COPY of fixed-width fields replaced CSV (0.8-1.1 s -> 0.4-0.5 s for 480k
    rows, building included: no text to write, none for the server to parse)."""
    data, names = _copy_binary(rows)
    raw = conn.connection.driver_connection
    with raw.cursor() as cur:
        cur.execute(
            "CREATE TEMPORARY TABLE bkt_recalc_rows (pair_key bigint, p_mastery float8, "
            "attempts int, correct_attempts int, status smallint) ON COMMIT DROP"
        )
        with cur.copy("COPY bkt_recalc_rows FROM STDIN (FORMAT binary)") as cp:
            cp.write(data)
        cur.execute("ANALYZE bkt_recalc_rows")
        cur.execute(
            "UPDATE bkt_mastery AS m SET p_mastery = t.p_mastery, attempts = t.attempts, "
            "correct_attempts = t.correct_attempts, status = (%s::text[])[t.status + 1], "
            "param_version = %s, updated_at = %s FROM bkt_recalc_rows AS t "
            "WHERE m.pair_key = t.pair_key",
            (names, rows["param_version"], rows["updated_at"]),
        )


def _update_portable(conn: sa.Connection, rows: dict[str, Any]) -> None:
    from .store import mastery_table

    stmt = (
        sa.update(mastery_table)
        .where(mastery_table.c.pair_key == sa.bindparam("k"))
        .values(
            p_mastery=sa.bindparam("p"),
            attempts=sa.bindparam("a"),
            correct_attempts=sa.bindparam("c"),
            status=sa.bindparam("st"),
            param_version=rows["param_version"],
            updated_at=rows["updated_at"],
        )
    )
    n = len(rows["p_mastery"])
    chunk = 20_000
    for lo in range(0, n, chunk):
        conn.execute(
            stmt,
            [
                {
                    "k": int(rows["pair_key"][i]),
                    "p": float(rows["p_mastery"][i]),
                    "a": int(rows["attempts"][i]),
                    "c": int(rows["correct_attempts"][i]),
                    "st": str(rows["status"][i]),
                }
                for i in range(lo, min(n, lo + chunk))
            ],
        )


def recalculate_store(
    store: MasteryStore,
    params: ParamTable,
    version: str,
    users: Sequence[str] | None,
    bulk: str,
    threads: int | None,
) -> RecalcResult:
    """Implementation of :meth:`bktbayes.store.MasteryStore.recalculate`.

    Every (user, skill) with events gets its row rewritten in place (its key
    is kept); a row in scope without events (none arise from the store's own
    writes) is deleted, as a rebuild from the log would leave it out.
    """
    from .store import RecalcResult, mastery_table

    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            # Writers wait (they upsert a mastery row first); readers go on.
            conn.exec_driver_sql("LOCK TABLE bkt_mastery IN EXCLUSIVE MODE")
            # The rewrite joins every row with its new values: at the default
            # 4 MB a 480k-row join spilled to temporary files in four batches
            # (2.2-2.3 s for the update; 1.7-1.9 s in memory). This job only.
            conn.exec_driver_sql("SET LOCAL work_mem = '256MB'")
        t0 = time.perf_counter()
        # A process that has not replayed yet (`bktbayes recalculate`) loads
        # the kernels while the log streams in; in a warm one this is a
        # replay of 512 events.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            warm = pool.submit(warm_up, params)
            cols, method = read_log(store, conn, users, bulk, items=bool(params.item_params))
            warm.result()
        t1 = time.perf_counter()
        n_events = len(cols["seq"])
        res = replay_columns(cols, params, threads=threads) if n_events else None
        t2 = time.perf_counter()
        n_rows = 0
        replayed = np.zeros(0, dtype=np.int64)
        if res is not None:
            rows = _mastery_rows(res, version, datetime.now(UTC))
            n_rows = len(rows["p_mastery"])
            replayed = np.asarray(rows["pair_key"], dtype=np.int64)
            if store.dialect == "postgresql" and method != "sqlalchemy":
                _update_copy(conn, rows)
            else:
                _update_portable(conn, rows)
        # Rows in scope that no event replayed (one gather; setdiff1d's two
        # sorts took 0.5-0.7 s on 480k rows).
        keys = np.asarray(cols["pairs"]["pair_key"], dtype=np.int64)
        seen = np.zeros(len(keys), dtype=bool)
        seen[_key_positions(keys, replayed)] = True
        stale = keys[~seen]
        for lo in range(0, len(stale), 10_000):
            conn.execute(
                sa.delete(mastery_table).where(
                    mastery_table.c.pair_key.in_(stale[lo : lo + 10_000].tolist())
                )
            )
    t4 = time.perf_counter()
    return RecalcResult(
        n_events=n_events,
        n_rows=n_rows,
        param_version=version,
        bulk_read=method,
        seconds_read=t1 - t0,
        seconds_replay=t2 - t1,
        seconds_write=t4 - t2,  # includes the commit
    )


# --------------------------------------------------------------- scale-out
# A history too big for one machine is a directory of Parquet files,
# partitioned by user (every (user, skill) sequence lives in one file). Each
# file is replayed independently with the same kernel, so a cluster of n
# workers replays n files at a time and writes one mastery file per input.

_PART_COLUMNS = ("user_id", "skill", "correct", "order")


def write_partitioned(
    events: Any, path: str | Path, n_partitions: int = 16, *, batch: str | None = None
) -> list[Path]:
    """Write a canonical events table as ``n_partitions`` Parquet files,
    partitioned by user (a stable hash of ``user_id``).

    Parameters
    ----------
    events : pandas.DataFrame
        Canonical columns ``user_id, skill, correct, order``; ``item_id``
        and the ``batch`` column are kept when present, other columns dropped.
    path : directory to create (must not exist or be empty)
    n_partitions : int
    batch : str, optional
        Name of a batch column to keep with the events.

    Returns
    -------
    list of Path, the files written (``part-00000.parquet`` ...)
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    missing = [c for c in _PART_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events: missing column(s) {missing}")
    keys = pd.util.hash_array(events["user_id"].astype(str).to_numpy(dtype=object))
    bucket = (keys % np.uint64(n_partitions)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(n_partitions + 1))
    # The item column travels too: a table with item-level guess and slip
    # scores the partitions as replay scores the whole.
    cols = list(_PART_COLUMNS) + ([batch] if batch else [])
    if "item_id" in events.columns:
        cols.append("item_id")
    table = pa.Table.from_pandas(events[cols], preserve_index=False)
    files = []
    for i in range(n_partitions):
        part = table.take(pa.array(order[bounds[i] : bounds[i + 1]]))
        f = path / f"part-{i:05d}.parquet"
        # One row group per file: a reader never splits a user's rows.
        pq.write_table(part, f, row_group_size=max(part.num_rows, 1))
        files.append(f)
    return files


def _replay_file(
    src: str, dst: str, params_json: str, batch: str | None
) -> tuple[int, int, list[str]]:
    """Replay one partition file and write its mastery table (a Dask task)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .tracing import replay

    params = ParamTable.from_dict(json.loads(params_json))
    table = pq.read_table(src)
    if table.num_rows == 0:
        return 0, 0, []
    res = replay(table, params, batch=batch)
    m = res.mastery
    out = pa.table(
        {
            "user_id": pa.array(np.asarray(m["user_id"]).astype(str)),
            "skill": pa.array(np.asarray(m["skill"]).astype(str)),
            "p_mastery": m["p_mastery"],
            "attempts": m["attempts"],
            "correct": m["correct"],
            "status": pa.array(np.asarray(m["status"]).astype(str)),
            "known_skill": m["known_skill"],
        }
    )
    pq.write_table(out, dst)
    return table.num_rows, out.num_rows, [str(s) for s in res.unknown_skills]


def replay_partitioned(
    src: str | Path,
    params: ParamTable,
    out: str | Path,
    *,
    client: Any = None,
    batch: str | None = None,
) -> Path:
    """Replay a user-partitioned Parquet event history on Dask and write the
    mastery table as partitioned Parquet (one file per input file).

    Parameters
    ----------
    src : directory of ``*.parquet`` files with columns ``user_id, skill,
        correct, order`` (see :func:`write_partitioned`)
    params : ParamTable
        Shipped to the workers as its JSON document.
    out : directory to write (created)
    client : dask.distributed.Client, str or None
        A client, a scheduler address, ``"local"`` (a LocalCluster on this
        machine) or None (the default client).
    batch : str, optional
        Batch column (clamp at batch boundaries, as the store does).

    Returns
    -------
    Path of the output directory.
    """
    from dask.distributed import Client, LocalCluster, default_client

    src, out = Path(src), Path(out)
    files = sorted(src.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{src}: no .parquet files (a user-partitioned directory)")
    out.mkdir(parents=True, exist_ok=True)
    own = None
    if client is None:
        client = default_client()
    elif client == "local":
        own = LocalCluster(processes=True, threads_per_worker=1)
        client = Client(own)
    elif isinstance(client, str):
        own = client = Client(client)
    try:
        # As JSON text: Dask walks dict arguments looking for tasks (a table
        # with nested item dicts made its scheduler fail an assertion).
        doc = json.dumps(params.to_dict())
        futures = client.map(
            _replay_file,
            [str(f) for f in files],
            [str(out / f.name) for f in files],
            params_json=doc,
            batch=batch,
            pure=False,
        )
        client.gather(futures)  # raises a worker's error here
    finally:
        if own is not None:
            client.close()
            own.close()
    _check_partitioned(out)
    return out


def _check_partitioned(out: Path) -> None:
    """A (user, skill) in two output files means the input was not
    partitioned by user: its sequence was split, so its result is wrong."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = [pq.read_table(f, columns=["user_id", "skill"]) for f in sorted(out.glob("*.parquet"))]
    if not tables:
        return
    t = pa.concat_tables(tables)
    key = pc.binary_join_element_wise(t["user_id"], t["skill"], "\x1f")
    if pc.count_distinct(key).as_py() != t.num_rows:
        counts = pc.value_counts(key)
        dup = [
            v["values"].as_py().replace("\x1f", " / ") for v in counts if v["counts"].as_py() > 1
        ][:5]
        raise ValueError(
            "input is not partitioned by user: these (user, skill) sequences are split "
            f"across files, so their results are wrong: {dup}"
        )
