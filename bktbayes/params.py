"""BKT parameters, the per-skill parameter table and its versioned JSON format.

This module imports only the standard library so that the serving tracer
(:mod:`bktbayes.tracing`) can use it without pulling in the research stack.

JSON schema, version 4 (version 3 is the same without ``draws.items``,
version 2 also without ``items``, version 1 also without ``students`` and
``draws``; all are still read)::

    {
      "schema_version": 4,
      "model": "seed-defaults",                 # what produced the table
      "created": "2026-11-25T19:40:00+00:00",   # ISO 8601
      "default": {"p_init": 0.3, "p_transit": 0.09, "p_guess": 0.2,
                  "p_slip": 0.1, "p_forget": 0.0},
      "skills": {
        "Absolute Value": {
          "params": {...same five fields...},
          # optional uncertainty, each a mapping field -> value:
          "sd": {...}, "median": {...}, "lower": {...}, "upper": {...},
          "interval_prob": 0.94, "n_obs": 1234, "n_sequences": 87
        }
      },
      "students": null | {"init": {user: logit offset}, "transit": {...}},
      "items": null | {skill: {item: {"p_guess": 0.25, "p_slip": 0.08}}},
      "draws": null | {"n": 100, "default": {"p_init": [100 values], ...},
                       "skills": {skill: {"p_init": [...], ...}},
                       # optional, for the items of "items":
                       "items": {skill: {item: {"p_guess": [...], "p_slip": [...]}}}},
      "metadata": {...free-form...}
    }

Everything except ``metadata`` is validated strictly: unknown schema version,
missing or extra fields, non-finite or out-of-range values are rejected with an
error naming the skill and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "PARAM_NAMES",
    "SCHEMA_VERSION",
    "BKTInputError",
    "BKTParams",
    "ParamFileError",
    "ParamTable",
    "SkillStats",
]

#: The five parameters, in the order used by every array layout in the package.
PARAM_NAMES: tuple[str, ...] = ("p_init", "p_transit", "p_guess", "p_slip", "p_forget")

#: Version written by :meth:`ParamTable.to_json`; the loader reads every version up to it.
#: Version 2 adds ``students`` (per-student logit offsets) and ``draws``
#: (thinned posterior draws of every skill's and the default's parameters).
#: Version 3 adds ``items`` (item-level guess and slip per skill, KT-IDEM).
#: Version 4 lets ``draws`` carry the items' guess and slip draws too.
SCHEMA_VERSION = 4


class BKTInputError(ValueError):
    """Input a user can fix: the message says what and where (CLI exit code 2)."""


class ParamFileError(BKTInputError):
    """A parameter file or mapping does not follow the schema."""


def _require_fields(
    d: Any, where: str, required: Any, optional: Any = (), what: str = "an object"
) -> None:
    """Raise ParamFileError unless ``d`` is a mapping with exactly the allowed fields."""
    if not isinstance(d, Mapping):
        raise ParamFileError(f"{where}: expected {what}")
    missing = [k for k in required if k not in d]
    extra = sorted(set(d) - set(required) - set(optional))
    if missing:
        raise ParamFileError(f"{where}: missing field(s) {missing}")
    if extra:
        raise ParamFileError(f"{where}: unknown field(s) {extra}")


def _check_prob(name: str, value: Any, *, allow_zero: bool = False, where: str = "") -> float:
    prefix = f"{where}: " if where else ""
    # numpy scalars are Real; bools and strings are rejected rather than coerced.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{prefix}{name} must be a real number, got {value!r} ({type(value).__name__})"
        )
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{prefix}{name} must be finite, got {v!r}")
    lo_ok = v >= 0.0 if allow_zero else v > 0.0
    if not (lo_ok and v < 1.0):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{prefix}{name} must lie in {interval}, got {v!r}")
    return v


@dataclass(frozen=True, slots=True)
class BKTParams:
    """Parameters of one skill's two-state BKT model.

    Parameters
    ----------
    p_init : float
        P(L0), probability of mastery before the first response, in (0, 1).
    p_transit : float
        P(T), probability of learning at each opportunity, in (0, 1).
    p_guess : float
        P(G), probability of a correct answer without mastery, in (0, 1).
    p_slip : float
        P(S), probability of an incorrect answer with mastery, in (0, 1).
    p_forget : float
        P(F), probability of losing mastery at each opportunity, in [0, 1).

    Raises
    ------
    ValueError
        If a value is out of range, if ``p_guess + p_slip >= 1`` (the mastered
        state would not be the one that answers correctly more often) or if
        ``p_transit + p_forget >= 1`` (the mastered state would not be the
        persistent one). Together they guarantee that a correct answer never
        leaves P(mastery) lower than an incorrect one would.
    """

    p_init: float = 0.3
    p_transit: float = 0.09
    p_guess: float = 0.2
    p_slip: float = 0.1
    p_forget: float = 0.0

    def __post_init__(self) -> None:
        for name in PARAM_NAMES:
            v = _check_prob(name, getattr(self, name), allow_zero=(name == "p_forget"))
            object.__setattr__(self, name, v)
        if self.p_guess + self.p_slip >= 1.0:
            raise ValueError(
                f"p_guess + p_slip must be < 1 so that mastery raises P(correct); "
                f"got p_guess={self.p_guess!r} + p_slip={self.p_slip!r} = "
                f"{self.p_guess + self.p_slip!r}"
            )
        if self.p_transit + self.p_forget >= 1.0:
            raise ValueError(
                f"p_transit + p_forget must be < 1 so that a mastered student is more "
                f"likely to be mastered next step than an unmastered one; got "
                f"p_transit={self.p_transit!r} + p_forget={self.p_forget!r}"
            )

    def to_dict(self) -> dict[str, float]:
        """The five values keyed by name (JSON-ready)."""
        return {name: getattr(self, name) for name in PARAM_NAMES}

    def as_tuple(self) -> tuple[float, float, float, float, float]:
        """``(p_init, p_transit, p_guess, p_slip, p_forget)``."""
        return (self.p_init, self.p_transit, self.p_guess, self.p_slip, self.p_forget)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "params") -> BKTParams:
        """Build from a mapping with exactly the five fields; errors name ``where``."""
        _require_fields(d, where, PARAM_NAMES, what=f"an object with fields {list(PARAM_NAMES)}")
        values = {}
        for k in PARAM_NAMES:
            try:
                values[k] = _check_prob(k, d[k], allow_zero=(k == "p_forget"))
            except ValueError as e:
                raise ParamFileError(f"{where}.{e}") from None
        try:
            return cls(**values)
        except ValueError as e:
            raise ParamFileError(f"{where}: {e}") from None


_STAT_MAPS = ("sd", "median", "lower", "upper")
_STAT_FIELDS = frozenset({"params", *_STAT_MAPS, "interval_prob", "n_obs", "n_sequences"})


@dataclass(frozen=True)
class SkillStats:
    """Optional uncertainty and data counts for one skill.

    Each of ``sd``, ``median``, ``lower`` and ``upper`` maps a parameter name to
    a value; ``lower``/``upper`` bound a central interval of probability
    ``interval_prob``. ``n_obs`` is the number of responses and ``n_sequences``
    the number of (student, skill) sequences behind the estimate.
    """

    sd: Mapping[str, float] = field(default_factory=dict)
    median: Mapping[str, float] = field(default_factory=dict)
    lower: Mapping[str, float] = field(default_factory=dict)
    upper: Mapping[str, float] = field(default_factory=dict)
    interval_prob: float | None = None
    n_obs: int | None = None
    n_sequences: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in _STAT_MAPS:
            m = getattr(self, k)
            if m:
                out[k] = {name: float(m[name]) for name in PARAM_NAMES if name in m}
        for k in ("interval_prob", "n_obs", "n_sequences"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str) -> SkillStats:
        kwargs: dict[str, Any] = {}
        for k in _STAT_MAPS:
            if k not in d:
                continue
            m = d[k]
            if not isinstance(m, Mapping):
                raise ParamFileError(f"{where}.{k}: expected an object keyed by parameter name")
            extra = sorted(set(m) - set(PARAM_NAMES))
            if extra:
                raise ParamFileError(f"{where}.{k}: unknown field(s) {extra}")
            vals = {}
            for name, v in m.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ParamFileError(f"{where}.{k}.{name}: must be a finite number, got {v!r}")
                if k == "sd" and v < 0:
                    raise ParamFileError(f"{where}.{k}.{name}: must be >= 0, got {v!r}")
                if k != "sd" and not (0.0 <= v <= 1.0):
                    raise ParamFileError(f"{where}.{k}.{name}: must lie in [0, 1], got {v!r}")
                vals[name] = float(v)
            kwargs[k] = vals
        if "interval_prob" in d:
            v = d["interval_prob"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < v < 1.0):
                raise ParamFileError(f"{where}.interval_prob: must lie in (0, 1), got {v!r}")
            kwargs["interval_prob"] = float(v)
        for k in ("n_obs", "n_sequences"):
            if k in d:
                v = d[k]
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ParamFileError(f"{where}.{k}: must be a non-negative integer, got {v!r}")
                kwargs[k] = v
        return cls(**kwargs)


class ParamTable(Mapping[str, BKTParams]):
    """Per-skill BKT parameters plus a population default for unseen skills.

    Parameters
    ----------
    skills : mapping of str to BKTParams
        Parameters of each known skill. Skill codes are strings (the canonical
        events table stores skills as strings; other keys are converted with
        ``str``).
    default : BKTParams, optional
        Used for skills the table has never seen. A hierarchical fit provides
        the population mean; otherwise the seed card's defaults.
    stats : mapping of str to SkillStats, optional
        Uncertainty and counts per skill (only for skills in ``skills``).
    model : str
        What produced the table (e.g. ``"seed-defaults"``, ``"BKTModel"``).
    created : str, optional
        ISO 8601 creation time; now (UTC) when omitted.
    metadata : mapping, optional
        Free-form, JSON-serialisable information (configuration, diagnostics,
        data provenance).
    """

    def __init__(
        self,
        skills: Mapping[Any, BKTParams] | None = None,
        default: BKTParams | None = None,
        *,
        stats: Mapping[Any, SkillStats] | None = None,
        model: str = "seed-defaults",
        created: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        students: Mapping[str, Mapping[Any, float]] | None = None,
        draws: Mapping[str, Any] | None = None,
        items: Mapping[Any, Mapping[Any, Mapping[str, float]]] | None = None,
    ) -> None:
        self._skills: dict[str, BKTParams] = {}
        for k, v in (skills or {}).items():
            if not isinstance(v, BKTParams):
                raise TypeError(f"skill {k!r}: expected BKTParams, got {type(v).__name__}")
            self._skills[str(k)] = v
        self.default = default if default is not None else BKTParams()
        if not isinstance(self.default, BKTParams):
            raise TypeError("default must be a BKTParams")
        self.stats: dict[str, SkillStats] = {str(k): v for k, v in (stats or {}).items()}
        unknown = sorted(set(self.stats) - set(self._skills))
        if unknown:
            raise ValueError(f"stats given for skills not in the table: {unknown[:5]}")
        self.model = str(model)
        self.created = created or datetime.now(UTC).isoformat(timespec="seconds")
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.students: dict[str, dict[str, float]] | None = (
            _check_students(students, "students") if students is not None else None
        )
        # Not ``items``: that is the Mapping method.
        self.item_params: dict[str, dict[str, tuple[float, float]]] | None = (
            _check_items(items, self._skills, "items") if items is not None else None
        )
        self.draws: dict[str, Any] | None = (
            _check_draws(draws, set(self._skills), "draws", self.item_params)
            if draws is not None
            else None
        )

    @classmethod
    def seed_defaults(cls) -> ParamTable:
        """The seed card's defaults for every skill, with a fixed creation time
        so that its :attr:`version` is the same in every process (serving rows
        written with it compare equal across restarts)."""
        return cls(model="seed-defaults", created="2026-01-01T00:00:00+00:00")

    # Mapping protocol -------------------------------------------------
    def __getitem__(self, skill: Any) -> BKTParams:
        return self._skills[str(skill)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._skills)

    def __len__(self) -> int:
        return len(self._skills)

    def __contains__(self, skill: object) -> bool:
        return str(skill) in self._skills

    def __repr__(self) -> str:
        return f"ParamTable({len(self)} skills, model={self.model!r}, version={self.version[:12]})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParamTable):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    # Lookup -----------------------------------------------------------
    def lookup(self, skill: Any) -> tuple[BKTParams, bool]:
        """Parameters for ``skill`` and whether the skill is known.

        Unseen skills get the population default; the flag lets callers report
        them instead of predicting silently.
        """
        p = self._skills.get(str(skill))
        return (p, True) if p is not None else (self.default, False)

    def params_for(self, skill: Any, user: Any = None, item: Any = None) -> BKTParams:
        """Parameters for ``skill`` (the population default if unseen).

        With ``user`` and student offsets in the table, the student's logit
        offsets are added to ``p_init`` and ``p_transit`` (a student the fit
        never saw gets offset 0, the population mean); ``p_forget`` keeps its
        share of ``1 - p_transit``, as in the model. With ``item`` and
        item-level guess and slip in the table, the item's replace the
        skill's (an item the fit never saw keeps the skill's).
        """
        p = self.lookup(skill)[0]
        if item is not None and self.item_params:
            gs = self.item_params.get(str(skill), {}).get(str(item))
            if gs is not None:
                p = BKTParams(p.p_init, p.p_transit, gs[0], gs[1], p.p_forget)
        if user is None or not self.students:
            return p
        oi = self.students.get("init", {}).get(str(user), 0.0)
        ot = self.students.get("transit", {}).get(str(user), 0.0)
        if oi == 0.0 and ot == 0.0:
            return p
        pi = _expit(_logit(p.p_init) + oi)
        pt = _expit(_logit(p.p_transit) + ot)
        pf = p.p_forget * (1.0 - pt) / (1.0 - p.p_transit)
        return BKTParams(pi, pt, p.p_guess, p.p_slip, pf)

    @property
    def n_draws(self) -> int:
        """Number of posterior draws carried (0 when none)."""
        return 0 if not self.draws else int(self.draws["n"])

    def item_draws(self, skill: Any, item: Any) -> tuple[list[float], list[float]] | None:
        """Posterior draws of an item's guess and slip (two lists of
        ``n_draws`` values), or None when the table carries none for it."""
        if not self.draws or "items" not in self.draws:
            return None
        d = self.draws["items"].get(str(skill), {}).get(str(item))
        return None if d is None else (d["p_guess"], d["p_slip"])

    def draw_matrix(self, skill: Any) -> Any:
        """Posterior draws of ``skill`` as a list of five equal-length lists
        (the default's draws for an unseen skill); None without draws."""
        if not self.draws:
            return None
        d = self.draws["skills"].get(str(skill), self.draws["default"])
        return [d[name] for name in PARAM_NAMES]

    # Serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema version :data:`SCHEMA_VERSION`)."""
        skills: dict[str, Any] = {}
        for k, p in self._skills.items():
            entry: dict[str, Any] = {"params": p.to_dict()}
            if k in self.stats:
                entry.update(self.stats[k].to_dict())
            skills[k] = entry
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "created": self.created,
            "default": self.default.to_dict(),
            "skills": skills,
            "students": self.students,
            "items": None
            if self.item_params is None
            else {
                sk: {it: {"p_guess": g, "p_slip": sl} for it, (g, sl) in d.items()}
                for sk, d in self.item_params.items()
            },
            "draws": self.draws,
            "metadata": self.metadata,
        }

    def to_json(self, path: str | Path) -> Path:
        """Write the table as JSON (UTF-8) and return the path."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False)
        path.write_text(text + "\n", encoding="utf-8")
        return path

    @property
    def version(self) -> str:
        """SHA-256 of the canonical JSON document, metadata included.

        Stored on serving rows so that every mastery value says which
        parameters produced it.
        """
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ParamTable:
        """Validate and parse a JSON document (any supported schema version)."""
        if not isinstance(doc, Mapping):
            raise ParamFileError("parameter file: top level must be a JSON object")
        version = doc.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ParamFileError(
                f"parameter file: schema_version must be an integer, got {version!r}"
            )
        parser = _PARSERS.get(version)
        if parser is None:
            raise ParamFileError(
                f"parameter file: unknown schema_version {version} "
                f"(this bktbayes reads {sorted(_PARSERS)})"
            )
        return parser(doc)

    @classmethod
    def from_json(cls, path: str | Path) -> ParamTable:
        """Load and validate a parameter file written by :meth:`to_json`."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            raise ParamFileError(f"{path}: not valid JSON ({e})") from None
        except ParamFileError as e:
            raise ParamFileError(f"{path}: {e}") from None
        return cls.from_dict(doc)


def _reject_constant(name: str) -> float:
    raise ParamFileError(f"non-finite number {name} is not allowed")


def jsonable(x: Any) -> Any:
    """Plain JSON types from nested dicts, lists, tuples and numpy values."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return x.tolist()  # numpy scalars and arrays, without importing numpy
    return x


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _expit(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _check_students(obj: Any, where: str) -> dict[str, dict[str, float]]:
    _require_fields(obj, where, (), ("init", "transit"), "an object with 'init' and/or 'transit'")
    out: dict[str, dict[str, float]] = {}
    for kind, offsets in obj.items():
        if not isinstance(offsets, Mapping):
            raise ParamFileError(f"{where}.{kind}: expected an object user -> logit offset")
        vals = {}
        for user, v in offsets.items():
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ParamFileError(
                    f"{where}.{kind}[{user!r}]: must be a finite number, got {v!r}"
                )
            vals[str(user)] = float(v)
        out[kind] = vals
    return out


def _check_items(
    obj: Any, skills: Mapping[str, BKTParams], where: str
) -> dict[str, dict[str, tuple[float, float]]]:
    if not isinstance(obj, Mapping):
        raise ParamFileError(f"{where}: expected an object skill -> {{item -> guess and slip}}")
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for code, table in obj.items():
        code = str(code)
        if code not in skills:
            raise ParamFileError(f"{where}: skill {code!r} is not in the table")
        if not isinstance(table, Mapping):
            raise ParamFileError(f"{where}[{code!r}]: expected an object item -> parameters")
        base = skills[code]
        vals = {}
        for item, d in table.items():
            w = f"{where}[{code!r}][{item!r}]"
            if isinstance(d, tuple) and len(d) == 2:  # the parsed form, ParamTable.item_params
                d = {"p_guess": d[0], "p_slip": d[1]}
            _require_fields(d, w, ("p_guess", "p_slip"), what="an object with p_guess and p_slip")
            try:
                p = BKTParams(base.p_init, base.p_transit, d["p_guess"], d["p_slip"], base.p_forget)
            except (ValueError, TypeError) as e:
                raise ParamFileError(f"{w}: {e}") from None
            vals[str(item)] = (p.p_guess, p.p_slip)
        out[code] = vals
    return out


def _check_draws(
    obj: Any,
    skills: set[str],
    where: str,
    items: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    _require_fields(obj, where, ("n", "default", "skills"), ("items",))
    n = obj["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ParamFileError(f"{where}.n: must be an integer >= 2, got {n!r}")

    def column(col: Any, w: str) -> list[float]:
        if not isinstance(col, list) or len(col) != n:
            raise ParamFileError(f"{w}: expected a list of {n} numbers")
        try:
            return [float(v) for v in col]
        except (TypeError, ValueError):
            raise ParamFileError(f"{w}: expected a list of {n} numbers") from None

    def one(d: Any, w: str) -> dict[str, list[float]]:
        _require_fields(d, w, PARAM_NAMES, what="an object of five lists")
        cols = {k: column(d[k], f"{w}.{k}") for k in PARAM_NAMES}
        for i in range(n):
            try:
                BKTParams(*(cols[k][i] for k in PARAM_NAMES))
            except (ValueError, TypeError) as e:
                raise ParamFileError(f"{w}, draw {i}: {e}") from None
        return cols

    out_skills = {}
    for code, d in obj["skills"].items():
        if str(code) not in skills:
            raise ParamFileError(f"{where}.skills: skill {code!r} is not in the table")
        out_skills[str(code)] = one(d, f"{where}.skills[{code!r}]")
    out = {"n": n, "default": one(obj["default"], f"{where}.default"), "skills": out_skills}
    if obj.get("items") is not None:
        out["items"] = _check_item_draws(obj["items"], items or {}, f"{where}.items", column)
    return out


def _check_item_draws(obj: Any, items: Mapping[str, Mapping[str, Any]], where: str, column):
    """Draws of item guess and slip: only for items of the table's ``items``."""
    if not isinstance(obj, Mapping):
        raise ParamFileError(f"{where}: expected an object skill -> {{item -> draws}}")
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for code, table in obj.items():
        code = str(code)
        if code not in items:
            raise ParamFileError(f"{where}: skill {code!r} has no items in the table")
        if not isinstance(table, Mapping):
            raise ParamFileError(f"{where}[{code!r}]: expected an object item -> draws")
        out[code] = {}
        for item, d in table.items():
            w = f"{where}[{code!r}][{item!r}]"
            if str(item) not in items[code]:
                raise ParamFileError(f"{w}: item is not in the table's items")
            _require_fields(d, w, ("p_guess", "p_slip"), what="an object with two lists")
            g = column(d["p_guess"], f"{w}.p_guess")
            sl = column(d["p_slip"], f"{w}.p_slip")
            for i, (gi, si) in enumerate(zip(g, sl, strict=True)):
                try:
                    BKTParams(0.5, 0.1, gi, si)
                except (ValueError, TypeError) as e:
                    raise ParamFileError(f"{w}, draw {i}: {e}") from None
            out[code][str(item)] = {"p_guess": g, "p_slip": sl}
    return out


_FIELDS_V1 = frozenset({"schema_version", "model", "created", "default", "skills", "metadata"})
_FIELDS_V2 = _FIELDS_V1 | {"students", "draws"}
_FIELDS_V3 = _FIELDS_V2 | {"items"}


def _parse_v1(doc: Mapping[str, Any]) -> ParamTable:
    return _parse(doc, set(_FIELDS_V1))


def _parse_v2(doc: Mapping[str, Any]) -> ParamTable:
    _no_item_draws(doc)
    return _parse(doc, set(_FIELDS_V2))


def _no_item_draws(doc: Mapping[str, Any]) -> None:
    draws = doc.get("draws")
    if isinstance(draws, Mapping) and "items" in draws:
        raise ParamFileError("parameter file: draws.items needs schema_version 4")


def _parse_v3(doc: Mapping[str, Any]) -> ParamTable:
    _no_item_draws(doc)
    return _parse(doc, set(_FIELDS_V3))


def _parse_v4(doc: Mapping[str, Any]) -> ParamTable:
    return _parse(doc, set(_FIELDS_V3))


def _parse(doc: Mapping[str, Any], required: set[str]) -> ParamTable:
    _require_fields(doc, "parameter file", sorted(required))
    if not isinstance(doc["model"], str):
        raise ParamFileError("parameter file: model must be a string")
    created = doc["created"]
    if not isinstance(created, str):
        raise ParamFileError("parameter file: created must be an ISO 8601 string")
    try:
        datetime.fromisoformat(created)
    except ValueError:
        raise ParamFileError(f"parameter file: created is not ISO 8601: {created!r}") from None
    if not isinstance(doc["metadata"], Mapping):
        raise ParamFileError("parameter file: metadata must be an object")
    default = BKTParams.from_dict(doc["default"], where="default")
    if not isinstance(doc["skills"], Mapping):
        raise ParamFileError("parameter file: skills must be an object keyed by skill code")
    skills: dict[str, BKTParams] = {}
    stats: dict[str, SkillStats] = {}
    for code, entry in doc["skills"].items():
        where = f"skill {code!r}"
        _require_fields(entry, where, ("params",), _STAT_FIELDS, "an object with a 'params' field")
        skills[code] = BKTParams.from_dict(entry["params"], where=f"{where}.params")
        s = SkillStats.from_dict(entry, where=where)
        if s.to_dict():
            stats[code] = s
    students = doc.get("students")
    draws = doc.get("draws")
    items = doc.get("items")
    try:
        return ParamTable(
            skills,
            default,
            stats=stats,
            model=doc["model"],
            created=created,
            metadata=dict(doc["metadata"]),
            students=students,
            draws=draws,
            items=items,
        )
    except ParamFileError as e:
        raise ParamFileError(f"parameter file: {e}") from None


_PARSERS = {1: _parse_v1, 2: _parse_v2, 3: _parse_v3, 4: _parse_v4}
