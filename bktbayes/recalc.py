"""Background recalculation: the event log read in bulk, replayed with the
tracer's batch replay, and the mastery rows written back in bulk.

The replay itself is :func:`bktbayes.tracing.replay_packed` (numba); this module
only moves columns between the database and numpy. PostgreSQL has a fast path
at both ends (read: the ADBC driver's binary COPY straight into Arrow; write:
``COPY ... FROM STDIN`` in CSV on the locked transaction's own connection),
and every database has the portable SQLAlchemy path.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa

from .packing import pack_codes
from .params import ParamTable
from .tracing import ReplayResult, replay_packed

if TYPE_CHECKING:  # pragma: no cover
    from .store import MasteryStore, RecalcResult

__all__ = ["adbc_available", "read_log", "recalculate_store", "replay_columns"]

_LOG_COLUMNS = ("user_id", "skill", "correct", "seq", "batch_id")


def adbc_available() -> bool:
    """Whether the ADBC PostgreSQL driver (the bulk-read fast path) is installed."""
    try:
        import adbc_driver_postgresql.dbapi  # noqa: F401
    except ImportError:
        return False
    return True


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
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    uniques = np.asarray(enc.dictionary.to_pylist(), dtype=object)
    return codes, uniques


def read_log(
    store: MasteryStore, conn: sa.Connection, users: Sequence[str] | None, bulk: str
) -> tuple[dict[str, Any], str]:
    """Read ``user_id, skill, correct, seq, batch_id`` of the log (optionally
    some users) as columns; returns the columns and the method used."""
    if bulk not in ("auto", "adbc", "sqlalchemy"):
        raise ValueError(f"bulk must be 'auto', 'adbc' or 'sqlalchemy', got {bulk!r}")
    use_adbc = store.dialect == "postgresql" and (
        bulk == "adbc" or (bulk == "auto" and adbc_available())
    )
    if bulk == "adbc" and store.dialect != "postgresql":
        raise ValueError("bulk='adbc' needs PostgreSQL")
    if use_adbc:
        return _read_adbc(store, users), "adbc"
    from .store import events

    q = sa.select(*(events.c[c] for c in _LOG_COLUMNS))
    if users is not None:
        q = q.where(events.c.user_id.in_(users))
    rows = conn.execute(q).all()
    if rows:
        u, s, c, seq, b = zip(*rows, strict=True)
    else:
        u = s = c = seq = b = ()
    cols = {
        "user_id": np.array(u, dtype=object),
        "skill": np.array(s, dtype=object),
        "correct": np.array(c, dtype=bool),
        "seq": np.array(seq, dtype=np.int64),
        "batch_id": np.array(b, dtype=np.int64),
    }
    return cols, "sqlalchemy"


def _read_adbc(store: MasteryStore, users: Sequence[str] | None) -> dict[str, Any]:
    import adbc_driver_postgresql.dbapi as adbc

    url = store.url.set(drivername="postgresql").render_as_string(hide_password=False)
    sql = "SELECT user_id, skill, correct, seq, batch_id FROM bkt_events"
    args: tuple[Any, ...] = ()
    if users is not None:
        sql += " WHERE user_id = ANY($1)"
        args = (list(users),)
    with adbc.connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql, args if args else None)
        table = cur.fetch_arrow_table()
    return {
        "user_id": table.column("user_id"),
        "skill": table.column("skill"),
        "correct": table.column("correct").to_numpy().astype(bool),
        "seq": table.column("seq").to_numpy().astype(np.int64, copy=False),
        "batch_id": table.column("batch_id").to_numpy().astype(np.int64, copy=False),
    }


def replay_columns(
    cols: dict[str, Any], params: ParamTable, *, threads: int | None = None
) -> ReplayResult:
    """Replay log columns (``user_id, skill, correct, seq, batch_id``) in
    arrival order with the batch id as the batch key."""
    u_codes, u_vals = _codes(cols["user_id"])
    s_codes, s_vals = _codes(cols["skill"])
    packed = pack_codes(
        u_codes,
        s_codes,
        cols["seq"],
        cols["correct"],
        n_user=max(len(u_vals), 1),
        n_skill=max(len(s_vals), 1),
        threads=threads,
    )
    return replay_packed(packed, params, s_vals, u_vals, batch=cols["batch_id"], threads=threads)


def _mastery_rows(res: ReplayResult, version: str, now: datetime) -> dict[str, Any]:
    m = res.mastery
    return {
        "user_id": m["user_id"],
        "skill": m["skill"],
        "p_mastery": m["p_mastery"],
        "attempts": m["attempts"],
        "correct_attempts": m["correct"],
        "status": m["status"],
        "param_version": version,
        "updated_at": now,
    }


def _write_copy(conn: sa.Connection, rows: dict[str, Any]) -> None:
    """Append rows to bkt_mastery with COPY on the transaction's own connection."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    n = len(rows["p_mastery"])
    table = pa.table(
        {
            "user_id": pa.array(rows["user_id"], type=pa.string()),
            "skill": pa.array(rows["skill"], type=pa.string()),
            "p_mastery": pa.array(rows["p_mastery"], type=pa.float64()),
            "attempts": pa.array(rows["attempts"], type=pa.int64()),
            "correct_attempts": pa.array(rows["correct_attempts"], type=pa.int64()),
            "status": pa.array(rows["status"], type=pa.string()),
            "param_version": pa.array([rows["param_version"]] * n, type=pa.string()),
            "updated_at": pa.array([rows["updated_at"].isoformat()] * n, type=pa.string()),
        }
    )
    buf = io.BytesIO()
    # Arrow writes doubles in their shortest round-trip form: the stored value is exact.
    pcsv.write_csv(table, buf, pcsv.WriteOptions(include_header=False))
    raw = conn.connection.driver_connection
    with (
        raw.cursor() as cur,
        cur.copy(
            "COPY bkt_mastery (user_id, skill, p_mastery, attempts, correct_attempts, status, "
            "param_version, updated_at) FROM STDIN (FORMAT csv)"
        ) as cp,
    ):
        cp.write(buf.getvalue())


def _write_portable(conn: sa.Connection, rows: dict[str, Any]) -> None:
    from .store import mastery_table

    n = len(rows["p_mastery"])
    chunk = 20_000
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        conn.execute(
            sa.insert(mastery_table),
            [
                {
                    "user_id": str(rows["user_id"][i]),
                    "skill": str(rows["skill"][i]),
                    "p_mastery": float(rows["p_mastery"][i]),
                    "attempts": int(rows["attempts"][i]),
                    "correct_attempts": int(rows["correct_attempts"][i]),
                    "status": str(rows["status"][i]),
                    "param_version": rows["param_version"],
                    "updated_at": rows["updated_at"],
                }
                for i in range(lo, hi)
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
    """Implementation of :meth:`bktbayes.store.MasteryStore.recalculate`."""
    from .store import RecalcResult, mastery_table

    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            # Writers wait (they upsert a mastery row first); readers go on.
            conn.exec_driver_sql("LOCK TABLE bkt_mastery IN EXCLUSIVE MODE")
        t0 = time.perf_counter()
        cols, method = read_log(store, conn, users, bulk)
        t1 = time.perf_counter()
        n_events = len(cols["seq"])
        res = replay_columns(cols, params, threads=threads) if n_events else None
        t2 = time.perf_counter()
        q = sa.delete(mastery_table)
        if users is not None:
            q = q.where(mastery_table.c.user_id.in_(users))
        conn.execute(q)
        n_rows = 0
        if res is not None:
            rows = _mastery_rows(res, version, datetime.now(UTC))
            n_rows = len(rows["p_mastery"])
            if store.dialect == "postgresql" and method == "adbc":
                _write_copy(conn, rows)
            else:
                _write_portable(conn, rows)
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
