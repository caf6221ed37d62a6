"""Scale-out replay on a real dask.distributed LocalCluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from bktbayes.data import load_events
from bktbayes.params import BKTParams, ParamTable
from bktbayes.recalc import replay_partitioned, write_partitioned
from bktbayes.tracing import replay

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "assistments2009.parquet"


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as lc,
        Client(lc) as client,
    ):
        yield client


def _table() -> ParamTable:
    rng = np.random.default_rng(0)
    skills = {
        str(s): BKTParams(
            float(rng.uniform(0.1, 0.6)),
            float(rng.uniform(0.02, 0.3)),
            float(rng.uniform(0.05, 0.3)),
            float(rng.uniform(0.02, 0.2)),
        )
        for s in range(60)
    }
    return ParamTable(skills, BKTParams(), model="test")


@pytest.mark.slow
def test_dask_replay_equals_single_process_on_bundled_data(cluster, tmp_path):
    events = load_events(BUNDLED)
    files = write_partitioned(events, tmp_path / "events", n_partitions=7)
    # Every user lives in exactly one file.
    owners = {}
    for i, f in enumerate(files):
        for u in pq.read_table(f, columns=["user_id"])["user_id"].to_pylist():
            assert owners.setdefault(u, i) == i
    assert sum(pq.read_metadata(f).num_rows for f in files) == len(events)

    # Half the skills known, and item-level guess and slip for the 300 most
    # answered (skill, item) pairs: the partitions carry the items too.
    rng = np.random.default_rng(1)
    skills = sorted(events["skill"].astype(str).unique())[::2]
    top = events.groupby(["skill", "item_id"], observed=True).size().sort_values().index[-300:]
    items: dict[str, dict[str, dict[str, float]]] = {}
    for s, i in top:
        if str(s) in skills:
            g, sl = rng.uniform(0.05, 0.4), rng.uniform(0.02, 0.2)
            items.setdefault(str(s), {})[str(i)] = {"p_guess": g, "p_slip": sl}
    base = _table()
    params = ParamTable(
        {s: base[str(k % 60)] for k, s in enumerate(skills)}, BKTParams(), model="t", items=items
    )
    out = replay_partitioned(tmp_path / "events", params, tmp_path / "mastery", client=cluster)
    got = pd.read_parquet(out).sort_values(["user_id", "skill"]).reset_index(drop=True)
    whole = replay(events, params)
    assert whole.n_item_level > 10_000
    ref = whole.mastery_frame()
    ref = ref.assign(user_id=ref["user_id"].astype(str), skill=ref["skill"].astype(str))
    ref = ref.sort_values(["user_id", "skill"]).reset_index(drop=True)
    assert len(got) == len(ref)
    assert (got["user_id"] == ref["user_id"]).all() and (got["skill"] == ref["skill"]).all()
    # Same kernel, same sequences: bit-for-bit identical.
    assert np.array_equal(got["p_mastery"].to_numpy(), ref["p_mastery"].to_numpy())
    assert np.array_equal(got["attempts"].to_numpy(), ref["attempts"].to_numpy())


@pytest.mark.slow
def test_dask_replay_refuses_input_not_partitioned_by_user(cluster, tmp_path):
    ev = pd.DataFrame(
        {
            "user_id": ["a", "a", "b"],
            "skill": ["s", "s", "s"],
            "correct": [1, 0, 1],
            "order": [0, 1, 0],
        }
    )
    src = tmp_path / "bad"
    src.mkdir()
    ev.iloc[:1].to_parquet(src / "p0.parquet")
    ev.iloc[1:].to_parquet(src / "p1.parquet")
    with pytest.raises(ValueError, match="not partitioned by user.*a / s"):
        replay_partitioned(src, ParamTable(), tmp_path / "out", client=cluster)


def test_write_partitioned_refuses_missing_columns_and_nonempty_dir(tmp_path):
    with pytest.raises(ValueError, match="missing column"):
        write_partitioned(pd.DataFrame({"user_id": [1]}), tmp_path / "x")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "f").write_text("x")
    ev = pd.DataFrame({"user_id": [1], "skill": ["s"], "correct": [1], "order": [0]})
    with pytest.raises(FileExistsError):
        write_partitioned(ev, tmp_path / "y")


@pytest.mark.parametrize("spread", [3, 10**9])
def test_pair_index_finds_every_events_row_dense_or_sparse_keys(spread):
    # Keys from a sequence with gaps (lookup table) or far apart (binary
    # search): both give each event's row, and an unknown key is named.
    from bktbayes.recalc import _pair_index

    rng = np.random.default_rng(0)
    keys = np.cumsum(rng.integers(1, spread, 500)).astype(np.int64)
    keys = keys[rng.permutation(500)]  # rows in any order
    row = rng.integers(0, 500, 20_000)
    seq = np.arange(20_000) + 1
    np.testing.assert_array_equal(_pair_index(keys, keys[row], seq), row)
    bad = keys[row].copy()
    bad[[7, 900]] = [keys.max() + 1, -5]
    with pytest.raises(RuntimeError, match=r"2 events \(first seq 8\)"):
        _pair_index(keys, bad, seq)
