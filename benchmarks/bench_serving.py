"""Serving figures: store latency, HTTP load, recalculation (PostgreSQL and Dask).

    make bench-serving                       # starts a throwaway PostgreSQL itself
    BKTBAYES_TEST_PG_URL=postgresql+psycopg://... python benchmarks/bench_serving.py --part http

Parts:
  store   p50/p99 latency of one record_responses call (3 responses), SQLite and PostgreSQL
  asgi    the service's own CPU per write request (its ASGI app driven in-process),
          with the write fast path and routed through FastAPI, alternating
  http    load test of `bktbayes serve` on PostgreSQL: client processes on loopback
          (a raw asyncio HTTP/1.1 keep-alive client, so that the client's own cost
          stays small on this 2-core machine), fixed duration; requests/s, p50/p99,
          and whether the slowest 1% came in a few stalls (250 ms windows); then
          checks that no update was lost or doubled
  recalc  10 million events in PostgreSQL's log -> mastery rows: the parallel
          snapshot read (and, beside it, the single-connection ADBC read) + binary
          COPY write, and the portable SQLAlchemy path; --no-retain-heap for the
          library's memory default instead of the service's
  dask    the same replay from partitioned Parquet on a dask.distributed LocalCluster
          against the single-process replay
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bktbayes.params import ParamTable  # noqa: E402


def _pg_url() -> str:
    url = os.environ.get("BKTBAYES_TEST_PG_URL")
    if not url:
        sys.exit("set BKTBAYES_TEST_PG_URL (make bench-serving starts a server and sets it)")
    return url


def _reset(url: str) -> None:
    import sqlalchemy as sa

    from bktbayes.store import metadata

    engine = sa.create_engine(url)
    metadata.drop_all(engine)
    engine.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------- store
def bench_store(n_calls: int) -> None:
    from bktbayes.store import MasteryStore

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in (("SQLite", f"sqlite:///{tmp}/m.db"), ("PostgreSQL", _pg_url())):
            if name == "PostgreSQL":
                _reset(url)
            store = MasteryStore(url)
            for i in range(200):  # warm the pool and caches
                store.record_responses(f"w{i}", "s0", [True])
            lat = np.empty(n_calls)
            for i in range(n_calls):
                user, skill = f"u{rng.integers(5000)}", f"s{rng.integers(50)}"
                resp = (rng.random(3) < 0.6).tolist()
                t = time.perf_counter()
                store.record_responses(user, skill, resp)
                lat[i] = time.perf_counter() - t
            p50, p99 = np.percentile(lat, [50, 99]) * 1e3
            print(
                f"store {name:<10} record_responses (3 responses, one call, durable commit): "
                f"p50 {p50:.2f} ms, p99 {p99:.2f} ms over {n_calls} calls"
            )
            store.close()


# ---------------------------------------------------------------------- http
async def _client(
    port: int,
    conns: int,
    duration: float,
    worker: int,
    users: int,
    skills: int,
    rate: float = 0.0,
) -> tuple[list[float], dict[str, int], int, list[float]]:
    """One client process: ``conns`` keep-alive connections. With ``rate`` 0
    each sends its next request as soon as the last is answered (closed loop,
    saturation); otherwise each connection sends on a fixed schedule adding up
    to ``rate`` requests/s for the process (open loop), and latency counts from
    the scheduled time, so that a stalled server cannot hide its queue."""
    lat: list[float] = []
    done: list[float] = []  # perf_counter at each answer (one clock for all processes)
    sent: dict[str, int] = {}
    errors = 0
    deadline = time.perf_counter() + duration
    rng = np.random.default_rng(1000 + worker)

    async def one(c: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = 0
        interval = conns / rate if rate else 0.0
        due = time.perf_counter() + interval * rng.random()
        while time.perf_counter() < deadline:
            if interval:
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            user = f"u{rng.integers(users)}"
            skill = f"s{rng.integers(skills)}"
            k = int(rng.integers(1, 6))
            resp = [
                {"correct": bool(x), "event_id": f"w{worker}c{c}i{i}r{j}"}
                for j, x in enumerate(rng.random(k) < 0.65)
            ]
            body = json.dumps({"user_id": user, "skill": skill, "responses": resp}).encode()
            req = (
                b"POST /v1/flashcard-sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nX-API-Key: bench-key-0123456789abcdef\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            t = due if interval else time.perf_counter()
            due += interval
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            done.append(time.perf_counter())
            lat.append(done[-1] - t)
            if head.startswith(b"HTTP/1.1 200"):
                key = f"{user}\t{skill}"
                sent[key] = sent.get(key, 0) + k
            else:
                errors += 1
            i += 1
        writer.close()

    await asyncio.gather(*(one(c) for c in range(conns)))
    return lat, sent, errors, done


def _client_proc(args: tuple) -> tuple[list[float], dict[str, int], int, list[float]]:
    return asyncio.run(_client(*args))


def bench_http(
    duration: float,
    procs: int,
    conns: int,
    users: int,
    skills: int,
    workers: int,
    rate: float,
    fast_writes: bool = True,
) -> dict[str, tuple[float, float, float]]:
    """Returns, per run, (requests/s, p50 ms, p99 ms)."""
    import sqlalchemy as sa

    from bktbayes.store import MasteryStore, events

    url = _pg_url()
    _reset(url)
    MasteryStore(url).close()  # schema
    port = _free_port()
    env = dict(os.environ, BKTBAYES_API_KEY="bench-key-0123456789abcdef")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "bktbayes.cli", "serve", "--db", url, "--port", str(port)),
            *("--log-level", "warning", "--workers", str(workers)),
            *(() if fast_writes else ("--no-fast-writes",)),
        ],
        env=env,
    )
    try:
        import httpx

        for _ in range(300):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
                break
            except (httpx.HTTPError, OSError):
                time.sleep(0.1)
        # Warm-up: compile the tracer, fill the pools.
        with mp.get_context("spawn").Pool(procs) as pool:
            pool.map(_client_proc, [(port, 2, 2.0, 100 + w, users, skills) for w in range(procs)])
            results = {}
            for mode, r in ((f"fixed {rate:.0f}/s", rate), ("saturation (closed loop)", 0.0)):
                t0 = time.perf_counter()
                results[mode] = pool.map(
                    _client_proc,
                    [
                        (port, conns, duration, w + 10 * (r > 0), users, skills, r / procs)
                        for w in range(procs)
                    ],
                )
                results[mode] = (results[mode], time.perf_counter() - t0)
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = []
    figures = {}
    for mode, (res, wall) in results.items():
        out += res
        lat = np.concatenate([np.asarray(o[0]) for o in res])
        done = np.concatenate([np.asarray(o[3]) for o in res])
        errors = sum(o[2] for o in res)
        p50, p99 = np.percentile(lat, [50, 99]) * 1e3
        figures[mode] = (len(lat) / wall, p50, p99)
        # Where the slowest 1% came from: spread over the run, or a few
        # stalls that every client saw (then it is the server's side).
        window = np.floor((done - done.min()) * 4).astype(int)  # 250 ms windows
        over = np.bincount(window[lat * 1e3 > p99], minlength=window.max() + 1)
        stalls = np.argsort(over)[::-1][:3]
        print(
            f"http PostgreSQL, {workers} server processes"
            f"{'' if fast_writes else ' (--no-fast-writes)'}, {procs} client processes x {conns} "
            f"connections, {duration:.0f} s, {mode}: {len(lat) / wall:,.0f} requests/s, "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {errors} non-200 responses"
        )
        print(
            f"  slowest 1%: {over[stalls].sum() / max(over.sum(), 1):.0%} of them in the worst "
            "three 250 ms windows (at "
            + ", ".join(f"{w / 4:.2f} s: {over[w]}" for w in stalls)
            + f"); slowest request {lat.max() * 1e3:.1f} ms"
        )
    # Integrity after the run: attempts equal what was acknowledged (warm-up
    # included), and rows equal a replay of the log.
    store = MasteryStore(url)
    with store.engine.connect() as c:
        rows = c.execute(
            sa.select(events.c.user_id, events.c.skill, sa.func.count()).group_by(
                events.c.user_id, events.c.skill
            )
        ).all()
    logged = {f"{u}\t{s}": n for u, s, n in rows}
    from bktbayes.store import mastery_table

    with store.engine.connect() as c:
        stored = {
            f"{u}\t{s}": (n, p)
            for u, s, n, p in c.execute(
                sa.select(
                    mastery_table.c.user_id,
                    mastery_table.c.skill,
                    mastery_table.c.attempts,
                    mastery_table.c.p_mastery,
                )
            )
        }
    acked: dict[str, int] = {}
    for o in out:
        for k, v in o[1].items():
            acked[k] = acked.get(k, 0) + v
    lost = sum(1 for k, v in acked.items() if logged.get(k, 0) < v)
    mismatch = sum(1 for k, (n, _) in stored.items() if logged.get(k) != n)
    before = dict(stored)
    res = store.recalculate()
    with store.engine.connect() as c:
        after = {
            f"{u}\t{s}": p
            for u, s, p in c.execute(
                sa.select(mastery_table.c.user_id, mastery_table.c.skill, mastery_table.c.p_mastery)
            )
        }
    worst = max(abs(after[k] - before[k][1]) for k in before)
    print(
        f"  after the run: {res.n_events:,} events logged in {len(stored):,} rows; "
        f"(user, skill) with fewer logged events than acknowledged: {lost}; rows whose "
        f"attempts differ from the log: {mismatch}; max |row - replay of log| {worst:.1e}"
    )
    store.close()
    return figures


# ---------------------------------------------------------------------- asgi
async def _asgi_cpu(fast_writes: bool, n: int, seed: int) -> tuple[float, float]:
    """Drive the service's ASGI app in-process with 32 concurrent writers (no
    sockets, no uvicorn): CPU of this process (event loop + writer thread) per
    request, in ms, and requests/s."""
    import gc

    from bktbayes.service import create_app
    from bktbayes.store import MasteryStore

    url = _pg_url()
    _reset(url)
    store = MasteryStore(url)
    key = b"asgi-key-0123456789abcdef"
    app = create_app(store, api_key=key.decode(), fast_writes=fast_writes)
    rng = np.random.default_rng(seed)
    bodies = []
    for i in range(n):
        resp = [
            {"correct": bool(x), "event_id": f"a{seed}-{i}-{j}"}
            for j, x in enumerate(rng.random(int(rng.integers(1, 6))) < 0.65)
        ]
        doc = {"user_id": f"u{rng.integers(2000)}", "skill": f"s{rng.integers(20)}"}
        bodies.append(json.dumps(doc | {"responses": resp}).encode())

    async def call(body: bytes) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/flashcard-sessions",
            "raw_path": b"/v1/flashcard-sessions",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"bench"),
                (b"content-type", b"application/json"),
                (b"x-api-key", key),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
            "state": {},
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)  # no disconnect while the request runs
            return {"type": "http.disconnect"}

        status = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        if status != [200]:
            raise RuntimeError(f"status {status}")

    warm = 50
    for b in bodies[:warm]:
        await call(b)
    gc.collect()
    gc.freeze()  # as the service's lifespan does
    todo = iter(bodies[warm:])

    async def worker() -> None:
        for b in todo:
            await call(b)

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(32)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    app.state.writer.close()
    store.close()
    gc.unfreeze()
    return 1e3 * cpu / (n - warm), (n - warm) / wall


def bench_asgi(n: int = 4000, reps: int = 5) -> None:
    """The service's own CPU per write request, fast path against routed,
    alternating (the same PostgreSQL, a fresh schema each run)."""
    import uvloop

    cpu: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(reps):
        for fast in (True, False):
            ms, rps = uvloop.run(_asgi_cpu(fast, n, rep))
            cpu[fast].append(ms)
            print(
                f"asgi in-process, {'fast path' if fast else 'routed   '}: {ms:.3f} ms CPU "
                f"per request ({rps:,.0f} requests/s)",
                flush=True,
            )
    f, r = np.median(cpu[True]), np.median(cpu[False])
    print(
        f"asgi in-process, median of {reps}: fast path {f:.3f} ms, routed {r:.3f} ms CPU per "
        f"request: x{f / r:.2f}"
    )


# -------------------------------------------------------------------- recalc
def _make_log(n_events: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A realistic log: geometric sequence lengths (mean 20), 50 skills, batches
    of geometric size (mean 4) within each (user, skill), arrival order mixed
    across users."""
    rng = np.random.default_rng(seed)
    n_seq = n_events // 20
    lens = rng.geometric(1 / 20, size=int(n_seq * 1.1))
    cum = np.cumsum(lens)
    lens = lens[: np.searchsorted(cum, n_events) + 1]
    lens[-1] -= int(lens.sum() - n_events)
    lens = lens[lens > 0]
    n_seq = len(lens)
    users_per = 5
    seq_user = np.arange(n_seq) // users_per
    seq_skill = rng.integers(0, 50, n_seq)
    seq_id = np.repeat(np.arange(n_seq), lens)
    pos = np.arange(n_events) - np.repeat(np.cumsum(lens) - lens, lens)
    # Batches: cut each sequence where a geometric(1/4) draw says so.
    cut = (rng.random(n_events) < 0.25) | (pos == 0)
    batch = np.cumsum(cut)
    # Arrival order: batches interleaved across users by a random key.
    batch_key = rng.random(batch[-1] + 1)
    order = np.lexsort((np.arange(n_events), batch_key[batch]))
    user = np.char.add("user-", seq_user[seq_id].astype(str))[order]
    skill = np.char.add("skill-", seq_skill[seq_id].astype(str))[order]
    correct = (rng.random(n_events) < 0.6)[order]
    batch_id = batch[order]
    # One mastery row per (user, skill), keyed as the store keys them: from
    # a sequence that every write request advances, so with gaps.
    _, first, pair_codes = np.unique(
        seq_user * 50 + seq_skill, return_index=True, return_inverse=True
    )
    keys = np.cumsum(rng.geometric(1 / 3, len(first)))
    return {
        "user_id": user,
        "skill": skill,
        "correct": correct,
        "batch_id": batch_id,
        "pair_key": keys[pair_codes[seq_id]][order],
        "pairs": {
            "pair_key": keys,
            "user_id": np.char.add("user-", seq_user[first].astype(str)),
            "skill": np.char.add("skill-", seq_skill[first].astype(str)),
        },
    }


def _copy_in(cur, name: str, table) -> None:
    """COPY an Arrow table into the database table of the same column names."""
    import io

    import pyarrow.csv as pcsv

    buf = io.BytesIO()
    pcsv.write_csv(table, buf, pcsv.WriteOptions(include_header=False))
    data = buf.getvalue()
    with cur.copy(f"COPY {name} ({', '.join(table.column_names)}) FROM STDIN (FORMAT csv)") as cp:
        for lo in range(0, len(data), 1 << 24):
            cp.write(data[lo : lo + (1 << 24)])


def _load_log(url: str, log: dict[str, np.ndarray]) -> None:
    """Fill bkt_events and bkt_mastery (one placeholder row per pair, with the
    pair keys) with COPY (benchmark set-up only)."""
    import psycopg
    import pyarrow as pa

    n = len(log["correct"])
    pairs = log["pairs"]
    m = len(pairs["pair_key"])
    when = "2026-11-25T00:00:00+00:00"
    raw = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(raw) as conn, conn.cursor() as cur:
        _copy_in(
            cur,
            "bkt_events",
            pa.table(
                {
                    "event_id": pa.array(np.char.add("e", np.arange(n).astype(str))),
                    "user_id": pa.array(log["user_id"]),
                    "skill": pa.array(log["skill"]),
                    "correct": pa.array(log["correct"]),
                    "event_time": pa.array([when] * n),
                    "source": pa.array(["import"] * n),
                    "batch_id": pa.array(log["batch_id"]),
                    "pair_key": pa.array(log["pair_key"]),
                }
            ),
        )
        _copy_in(
            cur,
            "bkt_mastery",
            pa.table(
                {
                    "user_id": pa.array(pairs["user_id"]),
                    "skill": pa.array(pairs["skill"]),
                    "p_mastery": pa.array(np.full(m, 0.5)),
                    "attempts": pa.array(np.zeros(m, dtype=np.int64)),
                    "correct_attempts": pa.array(np.zeros(m, dtype=np.int64)),
                    "status": pa.array(["in_progress"] * m),
                    "param_version": pa.array([""] * m),
                    "updated_at": pa.array([when] * m),
                    "pair_key": pa.array(pairs["pair_key"]),
                }
            ),
        )
        cur.execute("SELECT setval('bkt_pair_key_seq', %s)", (int(pairs["pair_key"].max()),))
    # Steady state before timing: without this, autovacuum's pass over the
    # freshly inserted rows and the checkpoint of the load's dirty pages run
    # during the timed recalculation (runs right after a load varied 12.7-18.1 s).
    with psycopg.connect(raw, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) bkt_events")
        conn.execute("VACUUM (ANALYZE) bkt_mastery")
        conn.execute("CHECKPOINT")


def bench_recalc(n_events: int, portable: bool, retain: bool = True) -> None:
    import psycopg

    from bktbayes.recalc import retain_heap
    from bktbayes.store import MasteryStore

    url = _pg_url()
    _reset(url)
    store = MasteryStore(url, ParamTable.seed_defaults())
    t = time.perf_counter()
    _load_log(url, _make_log(n_events))  # (the ~1 GB of generated columns is freed here)
    print(f"recalc: loaded {n_events:,} events into PostgreSQL in {time.perf_counter() - t:.0f} s")
    # `bktbayes serve` and `bktbayes recalculate` keep freed memory in the
    # process (bktbayes.recalc.retain_heap); --no-retain-heap measures the
    # library's default, where glibc returns it to the kernel.
    print(f"recalc: retain_heap() {retain_heap() if retain else 'not called'}")
    runs = [("auto", "cold process"), ("auto", "warm kernels"), ("auto", "warm kernels")]
    runs += [("adbc", "warm kernels")]
    runs += [("sqlalchemy", "warm kernels")] if portable else []
    for method, state in runs:
        # Every run rewrites the same rows (like-for-like): the previous
        # run's dead rows are vacuumed outside the timing.
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as c:
            c.autocommit = True
            c.execute("VACUUM bkt_mastery")
        # "cold process": the first replay in this process loads the numba
        # kernels from their cache (0.5-1 s), as `bktbayes recalculate` does;
        # the service's jobs run warm ("warm kernels": its job thread loads
        # the kernels at start-up, bktbayes.recalc.warm_up).
        res = store.recalculate(bulk=method)
        print(
            f"recalc PostgreSQL {res.bulk_read:<10} ({state}): {res.n_events:,} events -> "
            f"{res.n_rows:,} rows in "
            f"{res.seconds:.1f} s = {res.n_events / res.seconds / 1e6:.2f} M events/s "
            f"(read {res.seconds_read:.1f} s, replay {res.seconds_replay:.1f} s, write + commit "
            f"{res.seconds_write:.1f} s)"
        )
    store.close()


# ---------------------------------------------------------------------- dask
def bench_dask(n_events: int, workers: int) -> None:
    import pandas as pd

    from bktbayes.recalc import replay_partitioned
    from bktbayes.tracing import replay

    log = _make_log(n_events)
    df = pd.DataFrame(
        {
            "user_id": log["user_id"],
            "skill": log["skill"],
            "correct": log["correct"],
            "order": np.arange(n_events),
            "batch": log["batch_id"],
        }
    )
    params = ParamTable.seed_defaults()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "events"
        from bktbayes.recalc import write_partitioned

        write_partitioned(df, src, n_partitions=16, batch="batch")
        t = time.perf_counter()
        single = replay(df, params, batch="batch")
        t_single = time.perf_counter() - t
        from dask.distributed import Client, LocalCluster

        with (
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster,
            Client(cluster) as client,
        ):
            replay_partitioned(src, params, Path(tmp) / "warm", client=client, batch="batch")
            t = time.perf_counter()
            out = replay_partitioned(
                src, params, Path(tmp) / "mastery", client=client, batch="batch"
            )
            t_dask = time.perf_counter() - t
        got = pd.read_parquet(out).sort_values(["user_id", "skill"]).reset_index(drop=True)
    ref = single.mastery_frame().sort_values(["user_id", "skill"]).reset_index(drop=True)
    same = len(got) == len(ref) and np.array_equal(got["p_mastery"], ref["p_mastery"])
    print(
        f"dask: {n_events:,} events; single process replay (in memory) {t_single:.2f} s = "
        f"{n_events / t_single / 1e6:.1f} M/s; LocalCluster {workers} workers from partitioned "
        f"Parquet to partitioned Parquet {t_dask:.2f} s = {n_events / t_dask / 1e6:.1f} M/s, "
        f"{n_events / t_dask / workers / 1e6:.2f} M/s per worker; identical results: {same}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--part", default="all", choices=["all", "store", "asgi", "http", "recalc", "dask"]
    )
    ap.add_argument("--calls", type=int, default=2000, help="store: calls per database")
    ap.add_argument("--duration", type=float, default=15.0, help="http: seconds")
    ap.add_argument("--procs", type=int, default=4, help="http: client processes")
    ap.add_argument("--conns", type=int, default=8, help="http: connections per process")
    ap.add_argument("--server-workers", type=int, default=1, help="http: server processes")
    ap.add_argument("--rate", type=float, default=1000.0, help="http: fixed-rate run, req/s")
    ap.add_argument(
        "--baseline",
        action="store_true",
        help="http: then the same runs with `serve --no-fast-writes`, for the ratio",
    )
    ap.add_argument("--events", type=int, default=10_000_000, help="recalc/dask: log size")
    ap.add_argument("--no-portable", action="store_true", help="recalc: skip the portable path")
    ap.add_argument(
        "--no-retain-heap",
        action="store_true",
        help="recalc: measure without bktbayes.recalc.retain_heap (the library default)",
    )
    ap.add_argument("--workers", type=int, default=2, help="dask: workers")
    a = ap.parse_args()
    if a.part in ("all", "store"):
        bench_store(a.calls)
    if a.part in ("all", "asgi"):
        bench_asgi()
    if a.part in ("all", "http"):
        fast = bench_http(
            a.duration, a.procs, a.conns, 2000, 20, workers=a.server_workers, rate=a.rate
        )
        if a.baseline:
            routed = bench_http(
                *(a.duration, a.procs, a.conns, 2000, 20),
                workers=a.server_workers,
                rate=a.rate,
                fast_writes=False,
            )
            for mode, (rps, p50, p99) in fast.items():
                b = routed[mode]
                print(
                    f"  fast path / routed, {mode}: requests/s x{rps / b[0]:.2f}, "
                    f"p50 x{p50 / b[1]:.2f}, p99 x{p99 / b[2]:.2f}"
                )
    if a.part in ("all", "recalc"):
        bench_recalc(a.events, not a.no_portable, not a.no_retain_heap)
    if a.part in ("all", "dask"):
        bench_dask(a.events, a.workers)


if __name__ == "__main__":
    main()
