"""The canonical events table, loaders for common layouts, validation and packing.

Canonical table (a pandas DataFrame, one row per (response, skill)):

=============  ==========================================================
``user_id``    student id (int or str, as in the source)
``skill``      skill code (str)
``correct``    0/1 (int8)
``order``      orders responses within a (user, skill): int64 or datetime64
``item_id``    optional: problem / step id (str)
``event_id``   optional: id of the response; a response tagged with several
               skills is one row per skill sharing its ``event_id``
``fold``       optional: a published cross-validation fold (int)
=============  ==========================================================

Nothing is dropped silently: rows without a skill are an error unless the
caller asks to exclude them, and then a :class:`DataWarning` counts them;
duplicated (user, skill, order) rows are an error unless the caller asks to
keep the first; exact duplicates in a known real export (raw ASSISTments,
DataShop) are reported and one copy kept. The input is never modified.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .packing import DEFAULT_BLOCK_SIZE, Packed, pack_codes
from .params import BKTInputError

__all__ = [
    "CANONICAL_COLUMNS",
    "FORMATS",
    "OPTIONAL_COLUMNS",
    "DataWarning",
    "EventsError",
    "PackedEvents",
    "detect_format",
    "load_events",
    "pack_events",
    "save_events",
    "validate_events",
]

CANONICAL_COLUMNS: tuple[str, ...] = ("user_id", "skill", "correct", "order")
OPTIONAL_COLUMNS: tuple[str, ...] = ("item_id", "event_id", "fold")

#: Layouts recognised by :func:`load_events`.
FORMATS: tuple[str, ...] = (
    "canonical",
    "assistments2009",
    "assistments_raw",
    "pybkt",
    "datashop",
)

_SHOW = 5  # row numbers quoted in an error


class EventsError(BKTInputError):
    """Events that cannot be used as they are; the message names the column and rows."""


class DataWarning(UserWarning):
    """Something was excluded or merged on the caller's request, with counts."""


def _rows(mask: np.ndarray | pd.Series) -> str:
    idx = np.flatnonzero(np.asarray(mask))
    shown = ", ".join(str(i) for i in idx[:_SHOW])
    more = f", ... ({idx.size - _SHOW} more)" if idx.size > _SHOW else ""
    return f"{idx.size} row(s) (0-based row numbers: {shown}{more})"


# ---------------------------------------------------------------------------
# Format detection.

_SIGNATURES: dict[str, set[str]] = {
    "canonical": {"user_id", "skill", "correct", "order"},
    "assistments2009": {"user_id", "fold", "position", "problem_id", "skill_name", "correct"},
    "assistments_raw": {
        "order_id",
        "assignment_id",
        "user_id",
        "problem_id",
        "original",
        "correct",
        "skill_id",
    },
    "pybkt": {"order_id", "user_id", "skill_name", "correct"},
    "datashop": {"Anon Student Id", "Correct First Attempt", "Row"},
}


def detect_format(columns: Any) -> str:
    """Name the layout of a table from its column names.

    Parameters
    ----------
    columns : iterable of str

    Returns
    -------
    str
        One of :data:`FORMATS`.

    Raises
    ------
    EventsError
        If no layout matches; the message lists the columns found.
    """
    cols = {str(c) for c in columns}
    for name in ("canonical", "assistments2009", "assistments_raw", "pybkt"):
        if _SIGNATURES[name] <= cols:
            return name
    if _SIGNATURES["datashop"] <= cols and any(c.startswith("KC(") for c in cols):
        return "datashop"
    raise EventsError(
        "unrecognised event layout: expected the canonical columns "
        f"{list(CANONICAL_COLUMNS)}, a known export (ASSISTments, pyBKT, DataShop) "
        f"or an explicit column mapping; found columns {sorted(cols)[:20]}"
    )


# ---------------------------------------------------------------------------
# Readers.


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    if not path.exists():
        raise FileNotFoundError(f"events file not found: {path}")
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz", ".txt")):
        # utf-8-sig: the raw ASSISTments export starts with a byte-order mark.
        return pd.read_csv(path, encoding="utf-8-sig", low_memory=False)
    if name.endswith((".tsv", ".tsv.gz")):
        return pd.read_csv(path, sep="\t", encoding="utf-8-sig", low_memory=False)
    raise EventsError(f"{path}: unknown file type (expected .csv, .tsv or .parquet)")


def _skill_str(s: pd.Series) -> pd.Series:
    """Skill codes as strings; missing stays missing; 37.0 becomes "37"."""
    if pd.api.types.is_float_dtype(s):
        integral = s.dropna()
        if (integral == np.floor(integral)).all():
            s = s.astype("Int64")
    elif s.dtype == object:
        s = s.map(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)
    out = s.astype("string")
    out = out.str.strip()
    return out.mask(out == "", pd.NA)


def _from_assistments2009(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": df["user_id"],
            "skill": _skill_str(df["skill_name"]),
            "correct": df["correct"],
            "order": df["position"],
            "item_id": df["problem_id"].astype("string"),
            "fold": df["fold"],
        }
    )


def _from_assistments_raw(df: pd.DataFrame) -> pd.DataFrame:
    # skill_id is the key; some rows carry an id but no name, so the name
    # cannot be the code. Rows without a skill_id have no skill.
    out = pd.DataFrame(
        {
            "user_id": df["user_id"],
            "skill": _skill_str(df["skill_id"]),
            "correct": df["correct"],
            "order": df["order_id"],
            "item_id": df["problem_id"].astype("string"),
            "event_id": df["order_id"],
        }
    )
    if "skill_name" in df.columns:
        out["skill_name"] = df["skill_name"].astype("string")
    return out


def _from_pybkt(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "user_id": df["user_id"],
            "skill": _skill_str(df["skill_name"]),
            "correct": df["correct"],
            "order": df["order_id"],
        }
    )
    if "problem_id" in df.columns:
        out["item_id"] = df["problem_id"].astype("string")
    return out


def _from_datashop(df: pd.DataFrame, kc_model: str | None) -> pd.DataFrame:
    kc_cols = [c for c in df.columns if str(c).startswith("KC(")]
    kc = (
        f"KC({kc_model})"
        if kc_model
        else ("KC(Default)" if "KC(Default)" in kc_cols else kc_cols[0])
    )
    if kc not in df.columns:
        raise EventsError(f"DataShop export has no column {kc!r}; KC columns: {kc_cols}")
    item = None
    if "Problem Name" in df.columns and "Step Name" in df.columns:
        item = df["Problem Name"].astype("string") + "/" + df["Step Name"].astype("string")
    out = pd.DataFrame(
        {
            "user_id": df["Anon Student Id"],
            "skill": df[kc].astype("string"),
            "correct": df["Correct First Attempt"],
            "order": df["Row"],
            "event_id": df["Row"],
        }
    )
    if item is not None:
        out["item_id"] = item
    # A step tagged with several KCs ("a~~b") is one row per KC.
    out["_src"] = np.arange(len(out))
    out["skill"] = out["skill"].str.split("~~")
    out = out.explode("skill", ignore_index=True)
    out["skill"] = _skill_str(out["skill"].astype("string"))
    return out


def _apply_mapping(df: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    known = set(CANONICAL_COLUMNS) | set(OPTIONAL_COLUMNS)
    bad = sorted(set(columns) - known)
    if bad:
        raise EventsError(f"column mapping: unknown canonical name(s) {bad}; use {sorted(known)}")
    missing_src = [src for src in columns.values() if src not in df.columns]
    if missing_src:
        raise EventsError(
            f"column mapping refers to missing column(s) {missing_src}; "
            f"found {list(df.columns)[:20]}"
        )
    out = pd.DataFrame({canon: df[src] for canon, src in columns.items()})
    missing = [c for c in CANONICAL_COLUMNS if c not in out.columns]
    if missing:
        raise EventsError(f"column mapping leaves required column(s) {missing} unmapped")
    if "skill" in out:
        out["skill"] = _skill_str(out["skill"])
    return out


# ---------------------------------------------------------------------------
# Validation.


def _coerce_correct(s: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(s):
        return s.astype("int8")
    if pd.api.types.is_numeric_dtype(s):
        bad = ~s.isin([0, 1]) | s.isna()
        if bad.any():
            sample = s[bad].head(3).tolist()
            raise EventsError(f"column 'correct': {_rows(bad)} are not 0/1 (e.g. {sample})")
        return s.astype("int8")
    # Strings: only the digits 0 and 1 are unambiguous ("yes", "TRUE" are not).
    st = s.astype("string").str.strip()
    bad = ~st.isin(["0", "1"]) | st.isna()
    if bad.any():
        sample = s[bad].head(3).tolist()
        raise EventsError(f"column 'correct': {_rows(bad)} are not 0/1 (e.g. {sample})")
    return (st == "1").astype("int8")


def _coerce_order(s: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(s):
        bad = s.isna()
        if bad.any():
            raise EventsError(f"column 'order': {_rows(bad)} have no time")
        if isinstance(s.dtype, pd.DatetimeTZDtype):
            s = s.dt.tz_convert("UTC").dt.tz_localize(None)
        return s.astype("datetime64[ns]")
    if pd.api.types.is_bool_dtype(s):
        raise EventsError("column 'order': expected integers or timestamps, got booleans")
    if pd.api.types.is_numeric_dtype(s):
        bad = s.isna()
        if bad.any():
            raise EventsError(f"column 'order': {_rows(bad)} have no order value")
        if pd.api.types.is_float_dtype(s):
            frac = s != np.floor(s)
            if frac.any():
                return s.astype("float64")
        return s.astype("int64")
    parsed = pd.to_datetime(s, errors="coerce", format="ISO8601", utc=True)
    bad = parsed.isna()
    if bad.any():
        sample = s[bad].head(3).tolist()
        raise EventsError(
            f"column 'order': {_rows(bad)} are neither numbers nor ISO 8601 times (e.g. {sample})"
        )
    # Naive UTC: one comparable time line whatever the offsets in the source.
    return parsed.dt.tz_localize(None).astype("datetime64[ns]")


def validate_events(
    df: pd.DataFrame,
    *,
    drop_missing_skill: bool = False,
    duplicates: Literal["error", "keep_first"] = "error",
    known_format: bool = False,
) -> pd.DataFrame:
    """Check and normalise a table that has the canonical columns.

    Parameters
    ----------
    df : DataFrame
        Must hold ``user_id``, ``skill``, ``correct`` and ``order``.
    drop_missing_skill : bool
        Exclude rows without a skill (with a :class:`DataWarning` that counts
        them) instead of raising.
    duplicates : {"error", "keep_first"}
        What to do with several rows for one (user, skill, order).
    known_format : bool
        The table comes from a known real export, whose exact duplicate rows
        are an artefact: keep one copy and warn.

    Returns
    -------
    DataFrame
        A new table (the input is not modified), canonical columns first.

    Raises
    ------
    EventsError
        Naming the column, the number of bad rows and the first row numbers.
    """
    if duplicates not in ("error", "keep_first"):
        raise ValueError("duplicates must be 'error' or 'keep_first'")
    if len(df) == 0:
        raise EventsError("no events: the table is empty")
    missing = [c for c in CANONICAL_COLUMNS if c not in df.columns]
    if missing:
        raise EventsError(
            f"missing column(s) {missing}; found {list(df.columns)[:20]} "
            "(pass columns={'user_id': ..., 'skill': ..., 'correct': ..., 'order': ...})"
        )
    out = df.reset_index(drop=True).copy()
    report: dict[str, Any] = {"rows_in": len(out)}

    bad = out["user_id"].isna()
    if bad.any():
        raise EventsError(f"column 'user_id': {_rows(bad)} have no user")
    out["correct"] = _coerce_correct(out["correct"])
    out["order"] = _coerce_order(out["order"])
    out["skill"] = _skill_str(out["skill"])
    no_skill = out["skill"].isna()
    if no_skill.any():
        if not drop_missing_skill:
            raise EventsError(
                f"column 'skill': {_rows(no_skill)} have no skill; pass "
                "drop_missing_skill=True (CLI: --drop-missing-skill) to exclude them"
            )
        warnings.warn(
            f"excluded {int(no_skill.sum())} row(s) without a skill ({_rows(no_skill)})",
            DataWarning,
            stacklevel=3,
        )
        report["rows_without_skill_excluded"] = int(no_skill.sum())
        out = out.loc[~no_skill].reset_index(drop=True)
        if len(out) == 0:
            raise EventsError("no events left after excluding rows without a skill")

    key = ["user_id", "skill", "order"]
    dup = out.duplicated(key, keep="first")
    if dup.any():
        canon = [c for c in (*CANONICAL_COLUMNS, *OPTIONAL_COLUMNS) if c in out.columns]
        exact = out.duplicated(canon, keep="first")
        if known_format and (exact == dup).all():
            warnings.warn(
                f"kept one copy of {int(exact.sum())} exact duplicate row(s) of this "
                f"export ({_rows(exact)}, numbered after conversion)",
                DataWarning,
                stacklevel=3,
            )
            report["exact_duplicates_merged"] = int(exact.sum())
            out = out.loc[~exact].reset_index(drop=True)
        elif duplicates == "keep_first":
            warnings.warn(
                f"kept the first of duplicated (user_id, skill, order): dropped {_rows(dup)}",
                DataWarning,
                stacklevel=3,
            )
            report["duplicates_dropped"] = int(dup.sum())
            out = out.loc[~dup].reset_index(drop=True)
        else:
            raise EventsError(
                f"columns (user_id, skill, order): {_rows(dup)} repeat an earlier "
                "row's key; pass duplicates='keep_first' (CLI: --keep-first-duplicate) "
                "to keep the first"
            )
    for c in ("item_id",):
        if c in out.columns:
            out[c] = out[c].astype("string")
    if "fold" in out.columns:
        bad = out["fold"].isna()
        if bad.any():
            raise EventsError(f"column 'fold': {_rows(bad)} have no fold")
        out["fold"] = out["fold"].astype("int64")
    first = [c for c in (*CANONICAL_COLUMNS, *OPTIONAL_COLUMNS) if c in out.columns]
    out = out[first + [c for c in out.columns if c not in first]]
    report["rows_out"] = len(out)
    out.attrs["load_report"] = report
    return out


def load_events(
    source: str | Path | pd.DataFrame,
    *,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    drop_missing_skill: bool = False,
    duplicates: Literal["error", "keep_first"] = "error",
    kc_model: str | None = None,
) -> pd.DataFrame:
    """Load events from a file or DataFrame into the canonical table.

    Parameters
    ----------
    source : path or DataFrame
        A ``.csv`` (any compression pandas reads), ``.tsv`` or ``.parquet``
        file, or a DataFrame (never modified).
    format : str
        ``"auto"`` (recognise the layout by its columns) or one of
        :data:`FORMATS`.
    columns : mapping, optional
        Explicit canonical name -> source column mapping for any other layout
        (e.g. ``{"user_id": "student", "skill": "kc", "correct": "ok",
        "order": "t"}``); overrides ``format``.
    drop_missing_skill : bool
        Exclude (and count, with a :class:`DataWarning`) rows without a skill.
    duplicates : {"error", "keep_first"}
        Handling of several rows for one (user, skill, order).
    kc_model : str, optional
        DataShop: which ``KC(...)`` column to use (default ``KC(Default)``).

    Returns
    -------
    DataFrame
        The canonical table; ``df.attrs["source_format"]`` names the layout and
        ``df.attrs["load_report"]`` counts what happened to the rows.
    """
    if isinstance(source, pd.DataFrame):
        raw = source
    else:
        raw = _read_table(Path(source))
    if columns is not None:
        fmt = "mapping"
        df = _apply_mapping(raw, columns)
    else:
        fmt = detect_format(raw.columns) if format == "auto" else format
        if fmt not in FORMATS:
            raise EventsError(f"unknown format {format!r}; use 'auto' or one of {FORMATS}")
        if fmt != "auto" and format != "auto":
            missing = sorted(_SIGNATURES[fmt] - {str(c) for c in raw.columns})
            if missing:
                raise EventsError(f"format {fmt!r}: missing column(s) {missing}")
        if fmt == "canonical":
            keep = [c for c in (*CANONICAL_COLUMNS, *OPTIONAL_COLUMNS) if c in raw.columns]
            df = raw[keep + [c for c in raw.columns if c not in keep]]
        elif fmt == "assistments2009":
            df = _from_assistments2009(raw)
        elif fmt == "assistments_raw":
            df = _from_assistments_raw(raw)
        elif fmt == "pybkt":
            df = _from_pybkt(raw)
        else:
            df = _from_datashop(raw, kc_model).drop(columns="_src")
    known = fmt in ("assistments_raw", "datashop")
    out = validate_events(
        df, drop_missing_skill=drop_missing_skill, duplicates=duplicates, known_format=known
    )
    out.attrs["source_format"] = fmt
    if not isinstance(source, pd.DataFrame):
        out.attrs["source"] = str(source)
    return out


def save_events(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as Parquet (zstd) or CSV, chosen by the file extension."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        df.to_parquet(path, compression="zstd", index=False)
    elif name.endswith((".csv", ".csv.gz")):
        df.to_csv(path, index=False)
    else:
        raise EventsError(f"{path}: unknown output type (use .csv, .csv.gz or .parquet)")
    return path


# ---------------------------------------------------------------------------
# Packing.


@dataclass(frozen=True)
class PackedEvents:
    """Events packed for the kernels, with the codes behind the integers.

    ``users[packed.seq_user[k]]`` and ``skills[packed.seq_skill[k]]`` are
    the ids of sequence ``k``; ``items`` and ``item_code`` (per event, input
    row order; -1 where missing) are present when the table has ``item_id``.
    """

    packed: Packed
    users: np.ndarray
    skills: np.ndarray
    correct: np.ndarray
    items: np.ndarray | None = None
    item_code: np.ndarray | None = None


def pack_events(df: pd.DataFrame, *, block_size: int = DEFAULT_BLOCK_SIZE) -> PackedEvents:
    """Pack a canonical events table (see :func:`bktbayes.packing.pack_codes`).

    Skill codes are sorted, so the same skills always get the same indices.
    """
    missing = [c for c in CANONICAL_COLUMNS if c not in df.columns]
    if missing:
        raise EventsError(f"missing column(s) {missing}")
    u_codes, users = pd.factorize(df["user_id"], sort=True)
    s_codes, skills = pd.factorize(df["skill"], sort=True)
    correct = df["correct"].to_numpy(dtype=np.uint8)
    order = df["order"].to_numpy()
    if order.dtype.kind == "M":
        order = order.astype("datetime64[ns]").view(np.int64)
    packed = pack_codes(
        u_codes,
        s_codes,
        order,
        correct,
        n_user=len(users),
        n_skill=len(skills),
        block_size=block_size,
    )
    items = item_code = None
    if "item_id" in df.columns:
        item_code, items = pd.factorize(df["item_id"], sort=True)
        item_code = item_code.astype(np.int64)
        items = np.asarray(items)
    return PackedEvents(
        packed=packed,
        users=np.asarray(users),
        skills=np.asarray(skills, dtype=object),
        correct=correct,
        items=items,
        item_code=item_code,
    )
