import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bktbayes.data import (
    DataWarning,
    EventsError,
    detect_format,
    load_events,
    pack_events,
    save_events,
)

HERE = Path(__file__).parent
REPO = HERE.parent
BUNDLED = REPO / "data" / "assistments2009.parquet"
RAW = HERE / "data" / "skill_builder_raw_15_students.csv"
DATASHOP = HERE / "data" / "datashop_step_export_12kc_head2000.csv"
SHARED_DATASHOP = (
    REPO.parent
    / "shared"
    / "data"
    / "cognitive_tutor_kddcup_subset"
    / ("datashop_step_export_12kc.csv")
)


def _canon(**cols):
    base = {
        "user_id": [1, 1, 2, 2],
        "skill": ["a", "a", "a", "b"],
        "correct": [0, 1, 1, 0],
        "order": [1, 2, 1, 2],
    }
    base.update(cols)
    return pd.DataFrame(base)


# Bundled data ------------------------------------------------------------------


def test_bundled_parquet_matches_the_published_figures():
    df = load_events(BUNDLED)
    assert df.attrs["source_format"] == "assistments2009"
    assert len(df) == 325_589
    assert df["user_id"].nunique() == 4_150
    assert df["skill"].nunique() == 110
    assert df["item_id"].nunique() == 16_891
    # The data README rounds the mean to 0.659 (it is 0.65846).
    assert df["correct"].mean() == pytest.approx(0.659, abs=1e-3)
    assert sorted(df["fold"].unique()) == [1, 2, 3, 4, 5]
    assert list(df.columns[:4]) == ["user_id", "skill", "correct", "order"]


# Raw ASSISTments export ------------------------------------------------------------


def test_raw_assistments_byte_order_mark_and_missing_skills():
    assert RAW.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert detect_format(pd.read_csv(RAW, encoding="utf-8-sig", nrows=1).columns) == (
        "assistments_raw"
    )
    with pytest.raises(EventsError, match=r"column 'skill': 338 row\(s\).*drop_missing_skill"):
        load_events(RAW)


def test_raw_assistments_exclusion_and_duplicates_are_reported():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        df = load_events(RAW, drop_missing_skill=True)
    msgs = [str(x.message) for x in w if issubclass(x.category, DataWarning)]
    assert any("excluded 338 row(s) without a skill" in m for m in msgs)
    # Order 32072764 appears twice for one skill, identical but for the
    # export's opportunity counter: one copy kept, and said so.
    assert any("kept one copy of 1 exact duplicate" in m for m in msgs)
    assert len(df) == 1887 - 338 - 1
    assert df.attrs["load_report"]["rows_without_skill_excluded"] == 338
    assert df.attrs["load_report"]["exact_duplicates_merged"] == 1
    # Multi-skill problems: one row per skill sharing the event id.
    multi = df.groupby("event_id")["skill"].nunique()
    assert (multi > 1).sum() > 0
    assert df["skill"].str.fullmatch(r"\d+").all()  # skill_id as the code, "37" not "37.0"


# pyBKT and DataShop ------------------------------------------------------------------


def test_pybkt_columns():
    raw = pd.DataFrame(
        {
            "order_id": [10, 11, 12],
            "user_id": ["s1", "s1", "s2"],
            "skill_name": ["Box and Whisker", "Box and Whisker", "Circle Graph"],
            "correct": [1, 0, 1],
            "problem_id": [5, 6, 7],
        }
    )
    df = load_events(raw)
    assert df.attrs["source_format"] == "pybkt"
    assert df["skill"].tolist() == ["Box and Whisker", "Box and Whisker", "Circle Graph"]
    assert df["order"].tolist() == [10, 11, 12]
    assert df["item_id"].tolist() == ["5", "6", "7"]


def test_datashop_export_with_exact_duplicate():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        df = load_events(DATASHOP)
    assert df.attrs["source_format"] == "datashop"
    assert any("exact duplicate" in str(x.message) for x in w)
    assert len(df) == 1999
    assert df["order"].dtype == np.int64
    assert df["skill"].iloc[0] == "Calculate_unit_rate"


def test_datashop_multi_kc_cells_are_split():
    raw = pd.DataFrame(
        {
            "Row": [1, 2, 3],
            "Anon Student Id": ["a", "a", "b"],
            "Problem Name": ["P1", "P1", "P2"],
            "Step Name": ["s1", "s2", "s1"],
            "Correct First Attempt": [1, 0, 1],
            "KC(Default)": ["add~~carry", "add", None],
        }
    )
    with pytest.raises(EventsError, match=r"column 'skill': 1 row\(s\)"):
        load_events(raw)
    with pytest.warns(DataWarning, match="excluded 1 row"):
        df = load_events(raw, drop_missing_skill=True)
    assert df["skill"].tolist() == ["add", "carry", "add"]
    assert df["event_id"].tolist() == [1, 1, 2]


@pytest.mark.skipif(not SHARED_DATASHOP.exists(), reason="shared data not beside the clone")
def test_full_datashop_export():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        df = load_events(SHARED_DATASHOP)
    assert df["skill"].nunique() == 12
    assert df["user_id"].nunique() == 587


# Mapping and validation ------------------------------------------------------------


def test_explicit_mapping():
    raw = pd.DataFrame({"student": [1, 1], "kc": ["x", "x"], "ok": [1, 0], "t": [3, 4]})
    df = load_events(
        raw, columns={"user_id": "student", "skill": "kc", "correct": "ok", "order": "t"}
    )
    assert df["correct"].tolist() == [1, 0]
    with pytest.raises(EventsError, match="missing column.*'when'"):
        load_events(
            raw, columns={"user_id": "student", "skill": "kc", "correct": "ok", "order": "when"}
        )
    with pytest.raises(EventsError, match="unmapped"):
        load_events(raw, columns={"user_id": "student", "skill": "kc", "correct": "ok"})


def test_missing_columns():
    with pytest.raises(EventsError, match="unrecognised event layout"):
        load_events(pd.DataFrame({"user_id": [1], "skill": ["a"]}))


@pytest.mark.parametrize(
    ("values", "bad"),
    [
        (["yes", "1", "1", "0"], "'yes'"),
        ([0, 2, 1, 0], "2"),
        ([0, np.nan, 1, 0], "nan"),
        ([0.0, 1.0, 0.5, 1.0], "0.5"),
    ],
)
def test_non_binary_correct(values, bad):
    with pytest.raises(EventsError, match=r"column 'correct': 1 row\(s\) \(0-based row numbers"):
        load_events(_canon(correct=values))


def test_correct_error_counts_and_shows_rows():
    n = 12
    df = pd.DataFrame(
        {"user_id": range(n), "skill": ["a"] * n, "correct": [3] * 8 + [1] * 4, "order": range(n)}
    )
    with pytest.raises(EventsError) as e:
        load_events(df)
    msg = str(e.value)
    assert "8 row(s)" in msg and "0, 1, 2, 3, 4, ... (3 more)" in msg


def test_booleans_and_string_digits_are_binary():
    assert load_events(_canon(correct=[True, False, True, True]))["correct"].tolist() == [
        1,
        0,
        1,
        1,
    ]
    assert load_events(_canon(correct=["1", "0", "1", "1"]))["correct"].tolist() == [1, 0, 1, 1]


def test_duplicated_user_skill_order():
    df = _canon(order=[1, 1, 1, 2])
    with pytest.raises(EventsError, match=r"\(user_id, skill, order\): 1 row\(s\).*row numbers: 1"):
        load_events(df)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = load_events(df, duplicates="keep_first")
    assert len(out) == 3 and any(issubclass(x.category, DataWarning) for x in w)
    assert out["correct"].tolist() == [0, 1, 0]


def test_empty_input():
    with pytest.raises(EventsError, match="empty"):
        load_events(_canon().iloc[:0])


def test_missing_user_and_order():
    with pytest.raises(EventsError, match="column 'user_id'"):
        load_events(_canon(user_id=[1, None, 2, 2]))
    with pytest.raises(EventsError, match="column 'order'"):
        load_events(_canon(order=[1, np.nan, 1, 2]))
    with pytest.raises(EventsError, match="column 'order'.*ISO 8601"):
        load_events(_canon(order=["2026-01-01", "soon", "2026-01-01", "2026-01-02"]))


def test_timestamps_in_iso_8601():
    df = load_events(
        _canon(
            order=["2026-01-01T10:30:00Z", "2026-01-01T11:00:00+01:00", "2026-01-01", "2026-01-02"]
        )
    )
    assert df["order"].dtype == "datetime64[ns]"
    # 11:00+01:00 is 10:00 UTC: earlier than row 0, whatever the text says.
    assert df["order"].iloc[1] < df["order"].iloc[0]
    assert str(df["order"].iloc[1]) == "2026-01-01 10:00:00"


def test_load_does_not_mutate_input():
    df = _canon(correct=[True, False, True, True], skill=[" a", "a", "a", "b"])
    before = df.copy(deep=True)
    load_events(df)
    pd.testing.assert_frame_equal(df, before)


def test_skill_whitespace_and_numbers():
    df = load_events(_canon(skill=[" a ", "a", 3.0, 3]))
    assert df["skill"].tolist() == ["a", "a", "3", "3"]


def test_save_round_trip(tmp_path):
    df = load_events(_canon())
    for name in ("e.parquet", "e.csv"):
        back = load_events(save_events(df, tmp_path / name))
        pd.testing.assert_frame_equal(back[df.columns.tolist()], df, check_dtype=False)


def test_unknown_file_type(tmp_path):
    p = tmp_path / "events.xlsx"
    p.write_text("x")
    with pytest.raises(EventsError, match="unknown file type"):
        load_events(p)


# Packing ------------------------------------------------------------------------------


def test_pack_events_keeps_the_code_mapping():
    df = load_events(_canon(item_id=["p1", "p2", "p1", "p3"]))
    pe = pack_events(df)
    pk = pe.packed
    assert pk.n_seqs == 3 and pk.n_events == 4
    seqs = {(pe.users[u], pe.skills[s]) for u, s in zip(pk.seq_user, pk.seq_skill, strict=True)}
    assert seqs == {(1, "a"), (2, "a"), (2, "b")}
    assert list(pe.skills) == ["a", "b"]
    assert pe.items[pe.item_code].tolist() == ["p1", "p2", "p1", "p3"]
    # The longest sequence comes first and holds user 1's two responses in order.
    assert pk.seq_len[0] == 2
    assert pk.csr_row[pk.seq_start[0] : pk.seq_start[0] + 2].tolist() == [0, 1]
