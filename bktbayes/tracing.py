"""The serving tracer: constant-time BKT updates and a fast batch replay.

Imports numpy and numba only (never PyMC, PyTensor, ArviZ or pandas), so the
production system can import it cheaply.

Maths (the seed card's, with optional forgetting). With ``p`` = P(mastered)
before a response, guess ``G``, slip ``S``, transit ``T`` and forget ``F``:

* predicted P(correct) = ``p (1 - S) + (1 - p) G``
* posterior after a correct answer  = ``p (1 - S) / (p (1 - S) + (1 - p) G)``
* posterior after an incorrect one  = ``p S / (p S + (1 - p)(1 - G))``
* P(mastery) after the response     = ``post (1 - F) + (1 - post) T``

"P(mastery) after a response" is always the posterior followed by the
transition, the same quantity the likelihood's forward filter carries.

Clamping: the seed clamps to [0.01, 0.99] when it *stores* a mastery value.
:func:`replay` therefore never clamps per-event outputs; it clamps each
(user, skill)'s running value at every batch boundary (a batch is one stored
update, e.g. one flashcard session) and the final value.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from .packing import DEFAULT_BLOCK_SIZE, Packed, _gather, minmax, pack_codes
from .params import BKTParams, ParamTable

__all__ = [
    "CLAMP_HIGH",
    "CLAMP_LOW",
    "MASTERED_THRESHOLD",
    "NEEDS_FOCUS_THRESHOLD",
    "BayesianKnowledgeTracer",
    "ReplayResult",
    "clamp",
    "lockstep_filter",
    "mastery_status",
    "replay",
    "sequential_filter",
]

#: The seed card's thresholds: P(L) > 0.95 is mastered, P(L) < 0.4 needs focus.
MASTERED_THRESHOLD = 0.95
NEEDS_FOCUS_THRESHOLD = 0.4
#: The seed card's clamp, applied when a mastery value is stored.
CLAMP_LOW = 0.01
CLAMP_HIGH = 0.99

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


def clamp(p: float, low: float = CLAMP_LOW, high: float = CLAMP_HIGH) -> float:
    """Clamp a mastery probability to ``[low, high]`` as the seed does when storing."""
    return min(high, max(low, p))


def mastery_status(
    p: float,
    *,
    mastered: float = MASTERED_THRESHOLD,
    needs_focus: float = NEEDS_FOCUS_THRESHOLD,
) -> str:
    """Classify a mastery probability by the seed card's thresholds.

    Parameters
    ----------
    p : float
        P(mastery), in [0, 1].
    mastered, needs_focus : float
        ``p > mastered`` is ``"mastered"``, ``p < needs_focus`` is
        ``"needs_focus"``, anything between is ``"in_progress"``.

    Returns
    -------
    str
    """
    if not needs_focus <= mastered:
        raise ValueError(f"needs_focus ({needs_focus}) must not exceed mastered ({mastered})")
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    if p > mastered:
        return "mastered"
    if p < needs_focus:
        return "needs_focus"
    return "in_progress"


_STATUS_NAMES = np.array(["needs_focus", "in_progress", "mastered"])


def _status_array(p: np.ndarray, mastered: float, needs_focus: float) -> np.ndarray:
    code = np.where(p > mastered, 2, np.where(p < needs_focus, 0, 1))
    return _STATUS_NAMES[code]


def _as_correct(correct: Any) -> bool:
    if isinstance(correct, (bool, np.bool_)):
        return bool(correct)
    if isinstance(correct, (int, np.integer)) and correct in (0, 1):
        return bool(correct)
    raise ValueError(f"correct must be a bool or 0/1, got {correct!r}")


class BayesianKnowledgeTracer:
    """One skill's BKT filter, exactly the seed card's ``update``/``predict_next``.

    Each call is O(1): production code keeps P(mastery) per (user, skill) and
    updates it per response, instead of replaying the history.

    Parameters
    ----------
    params : BKTParams, optional
        Seed defaults (0.3, 0.09, 0.2, 0.1) when omitted.
    """

    __slots__ = ("params",)

    def __init__(self, params: BKTParams | None = None) -> None:
        self.params = params if params is not None else BKTParams()
        if not isinstance(self.params, BKTParams):
            raise TypeError(f"params must be BKTParams, got {type(self.params).__name__}")

    def __repr__(self) -> str:
        return f"BayesianKnowledgeTracer({self.params!r})"

    def posterior(self, p_mastery: float, correct: bool) -> float:
        """P(mastered | this response), before the learning transition."""
        p = self.params
        if not (0.0 <= p_mastery <= 1.0):
            raise ValueError(f"p_mastery must be a probability in [0, 1], got {p_mastery!r}")
        if _as_correct(correct):
            num = (1.0 - p.p_slip) * p_mastery
            return num / (num + p.p_guess * (1.0 - p_mastery))
        num = p.p_slip * p_mastery
        return num / (num + (1.0 - p.p_guess) * (1.0 - p_mastery))

    def update(self, p_mastery: float, correct: bool) -> float:
        """P(mastery) after observing one response.

        Parameters
        ----------
        p_mastery : float
            P(mastery) before the response, in [0, 1].
        correct : bool
            Whether the response was correct.

        Returns
        -------
        float
            Posterior followed by the learning (and forgetting) transition.
            Not clamped: the clamp belongs to storage (see :func:`clamp`).
        """
        post = self.posterior(p_mastery, correct)
        p = self.params
        return post * (1.0 - p.p_forget) + (1.0 - post) * p.p_transit

    def predict_next(self, p_mastery: float) -> float:
        """Predicted probability that the next response is correct."""
        if not (0.0 <= p_mastery <= 1.0):
            raise ValueError(f"p_mastery must be a probability in [0, 1], got {p_mastery!r}")
        p = self.params
        return p_mastery * (1.0 - p.p_slip) + (1.0 - p_mastery) * p.p_guess

    def update_many(self, p_mastery: float, responses: Iterable[bool]) -> float:
        """Apply :meth:`update` for each response in order; returns the last value."""
        for c in responses:
            p_mastery = self.update(p_mastery, c)
        return p_mastery


# ---------------------------------------------------------------------------
# Kernels: plain functions over arrays.


@nb.njit(**_JIT)
def sequential_filter(
    correct, seq_start, seq_len, p_init, p_transit, p_guess, p_slip, p_forget, out_pred, out_mast
):
    """Forward filter one sequence after another (CSR layout).

    The reference for :func:`lockstep_filter`; latency-bound on the serial
    dependency of each step on the last.

    Parameters
    ----------
    correct : uint8 array, shape (n_events,)
        Responses in CSR order.
    seq_start, seq_len : int64 arrays, shape (n_seqs,)
        Sequence ``k`` is ``correct[seq_start[k]:seq_start[k] + seq_len[k]]``.
    p_init, p_transit, p_guess, p_slip, p_forget : float64 arrays, shape (n_seqs,)
        Parameters of each sequence.
    out_pred, out_mast : float64 arrays, shape (n_events,)
        Written (CSR order): P(correct) before and P(mastery) after each response.
    """
    for k in range(seq_start.shape[0]):
        p = p_init[k]
        g = p_guess[k]
        s = p_slip[k]
        tr = p_transit[k]
        keep = 1.0 - p_forget[k]
        for i in range(seq_start[k], seq_start[k] + seq_len[k]):
            q = 1.0 - p
            pc = p * (1.0 - s) + q * g
            out_pred[i] = pc
            if correct[i]:
                num = p * (1.0 - s)
                den = pc
            else:
                num = p * s
                den = num + q * (1.0 - g)
            post = num / den
            p = post * keep + (1.0 - post) * tr
            out_mast[i] = p


@nb.njit(**_JIT)
def _lockstep(
    correct,
    clamp_before,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    p_init,
    p_transit,
    p_guess,
    p_slip,
    p_forget,
    out_pred,
    out_mast,
    out_final,
    low,
    high,
    ev_guess,
    ev_slip,
):
    # ``clamp_before`` is None or a flag per event; numba compiles the two
    # cases separately and prunes the dead branch, so the plain kernel pays
    # nothing for batches. ``ev_guess``/``ev_slip`` (per event, item-level)
    # are None or replace the sequence's guess and slip step by step.
    bs = 0
    for b in range(block_seq.shape[0] - 1):
        bs = max(bs, block_seq[b + 1] - block_seq[b])
    state = np.empty(bs)
    one_s = np.empty(bs)
    sl = np.empty(bs)
    gg = np.empty(bs)
    one_g = np.empty(bs)
    tr = np.empty(bs)
    keep = np.empty(bs)
    for b in range(block_seq.shape[0] - 1):
        q0 = block_seq[b]
        m = block_seq[b + 1] - q0
        for j in range(m):
            state[j] = p_init[q0 + j]
            sl[j] = p_slip[q0 + j]
            one_s[j] = 1.0 - p_slip[q0 + j]
            gg[j] = p_guess[q0 + j]
            one_g[j] = 1.0 - p_guess[q0 + j]
            tr[j] = p_transit[q0 + j]
            keep[j] = 1.0 - p_forget[q0 + j]
        pos = block_ev[b]
        for t in range(step_ptr[b], step_ptr[b + 1]):
            n = step_count[t]
            # Slices of exactly n elements let LLVM drop its aliasing checks
            # and vectorise the loop across sequences.
            st = state[:n]
            cc = correct[pos : pos + n]
            o_pred = out_pred[pos : pos + n]
            o_mast = out_mast[pos : pos + n]
            if ev_guess is not None:
                eg = ev_guess[pos : pos + n]
                es = ev_slip[pos : pos + n]
                for j in range(n):
                    gg[j] = eg[j]
                    one_g[j] = 1.0 - eg[j]
                    sl[j] = es[j]
                    one_s[j] = 1.0 - es[j]
            if clamp_before is None:
                for j in range(n):
                    p = st[j]
                    q = 1.0 - p
                    pc = p * one_s[j] + q * gg[j]
                    c = cc[j] != 0
                    num = p * (one_s[j] if c else sl[j])
                    den = pc if c else num + q * one_g[j]
                    post = num / den
                    p = post * keep[j] + (1.0 - post) * tr[j]
                    st[j] = p
                    o_pred[j] = pc
                    o_mast[j] = p
            else:
                fl = clamp_before[pos : pos + n]
                for j in range(n):
                    p = st[j]
                    if fl[j]:
                        p = min(high, max(low, p))
                    q = 1.0 - p
                    pc = p * one_s[j] + q * gg[j]
                    c = cc[j] != 0
                    num = p * (one_s[j] if c else sl[j])
                    den = pc if c else num + q * one_g[j]
                    post = num / den
                    p = post * keep[j] + (1.0 - post) * tr[j]
                    st[j] = p
                    o_pred[j] = pc
                    o_mast[j] = p
            pos += n
        for j in range(m):
            out_final[q0 + j] = state[j]


@nb.njit(**_JIT)
def lockstep_filter(
    correct,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    p_init,
    p_transit,
    p_guess,
    p_slip,
    p_forget,
    out_pred,
    out_mast,
    out_final,
    ev_guess=None,
    ev_slip=None,
):
    """Forward filter many sequences in lockstep (lockstep layout).

    Same maths and rounding as :func:`sequential_filter`; the inner loop runs
    across the sequences active at a time step so that it vectorises.

    Parameters
    ----------
    correct : uint8 array, shape (n_events,)
        Responses in lockstep order.
    block_seq, block_ev, step_ptr, step_count : int arrays
        The layout (see :class:`bktbayes.packing.Packed`).
    p_init, p_transit, p_guess, p_slip, p_forget : float64 arrays, shape (n_seqs,)
        Parameters of each sequence (lockstep sequence order).
    out_pred, out_mast : float64 arrays, shape (n_events,)
        Written: P(correct) before and P(mastery) after each response.
    out_final : float64 array, shape (n_seqs,)
        Written: P(mastery) after each sequence's last response (unclamped).
    ev_guess, ev_slip : float64 arrays, shape (n_events,), optional
        Item-level guess and slip of each response (lockstep order), replacing
        the sequence's.
    """
    _lockstep(
        correct,
        None,
        block_seq,
        block_ev,
        step_ptr,
        step_count,
        p_init,
        p_transit,
        p_guess,
        p_slip,
        p_forget,
        out_pred,
        out_mast,
        out_final,
        0.0,
        1.0,
        ev_guess,
        ev_slip,
    )


@nb.njit(**_JIT)
def lockstep_filter_batched(
    correct,
    clamp_before,
    block_seq,
    block_ev,
    step_ptr,
    step_count,
    p_init,
    p_transit,
    p_guess,
    p_slip,
    p_forget,
    out_pred,
    out_mast,
    out_final,
    low,
    high,
    ev_guess=None,
    ev_slip=None,
):
    """:func:`lockstep_filter` that clamps the running value to [low, high]
    before every event flagged in ``clamp_before`` (uint8, lockstep order):
    the first event of a stored batch other than a sequence's first."""
    _lockstep(
        correct,
        clamp_before,
        block_seq,
        block_ev,
        step_ptr,
        step_count,
        p_init,
        p_transit,
        p_guess,
        p_slip,
        p_forget,
        out_pred,
        out_mast,
        out_final,
        low,
        high,
        ev_guess,
        ev_slip,
    )


@nb.njit(**_JIT)
def _batch_flags(batch, lock_row, block_ev, step_ptr, step_count):
    """Flag (in lockstep order) events whose batch differs from the previous
    event of the same sequence.

    Lockstep order is time-major within a block, and the sequences active at
    a step are the first ``step_count`` of those active at the step before,
    in the same order; so the previous event of position ``pos + j`` is at
    ``pos + j - step_count[t - 1]``. One gather of the batch keys into
    lockstep order, then sequential reads: this replaced a walk in CSR order
    that made three random accesses per event (``replay_packed`` on a
    10M-event log with batches: 0.69-0.85 s -> 0.39-0.50 s).
    """
    n = lock_row.shape[0]
    b = _gather(batch, lock_row)
    flags = np.zeros(n, dtype=np.uint8)
    for blk in range(block_ev.shape[0] - 1):
        pos = block_ev[blk]
        prev = 0
        for t in range(step_ptr[blk], step_ptr[blk + 1]):
            c = step_count[t]
            if t > step_ptr[blk]:
                for j in range(c):
                    if b[pos + j] != b[pos + j - prev]:
                        flags[pos + j] = 1
            prev = c
            pos += c
    return flags


@nb.njit(**_JIT)
def _lock_seq(block_seq, block_ev, step_ptr, step_count, n_events):
    """Sequence index of each lockstep position."""
    out = np.empty(n_events, dtype=np.int64)
    for b in range(block_seq.shape[0] - 1):
        pos = block_ev[b]
        for t in range(step_ptr[b], step_ptr[b + 1]):
            for j in range(step_count[t]):
                out[pos + j] = block_seq[b] + j
            pos += step_count[t]
    return out


def _item_guess_slip(
    packed: Packed,
    params: ParamTable,
    skill_values: np.ndarray,
    items: np.ndarray,
    mat: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int, tuple[np.ndarray, np.ndarray, list]]:
    """Per-response guess and slip (lockstep order): the item's where the
    table has one for that (skill, item), the skill's otherwise.

    Returns the two arrays, the number of responses scored at item level and
    the index behind them, ``(lock_skill, ev_pair, pairs)``: each response's
    skill code, its (skill, item) pair's position in ``pairs`` (-1 at skill
    level), and the pairs as (skill, item) strings.
    """
    lock_skill = packed.seq_skill[
        _lock_seq(packed.block_seq, packed.block_ev, packed.step_ptr, packed.step_count,
                  packed.n_events)
    ]  # fmt: skip
    g = np.ascontiguousarray(mat[lock_skill, 2])
    s = np.ascontiguousarray(mat[lock_skill, 3])
    vals = np.asarray(items, dtype=object)[packed.lock_row]
    missing = np.fromiter(
        (v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ == "NAType"
         for v in vals),
        dtype=bool,
        count=vals.size,
    )  # fmt: skip
    text = np.where(missing, "", vals).astype(str)
    uniq, code = np.unique(text, return_inverse=True)
    pair, inv = np.unique(lock_skill * uniq.size + code.reshape(-1), return_inverse=True)
    known = np.full(pair.size, -1, dtype=np.int64)
    pairs: list[tuple[str, str]] = []
    pg, ps = [], []
    for k, key in enumerate(pair):
        sk = str(_plain(skill_values[key // uniq.size]))
        it = str(uniq[key % uniq.size])
        gs = params.item_params.get(sk, {}).get(it)
        if gs is not None:
            known[k] = len(pairs)
            pairs.append((sk, it))
            pg.append(gs[0])
            ps.append(gs[1])
    ev_pair = known[inv.reshape(-1)]
    ev_pair[missing] = -1
    hit = ev_pair >= 0
    g[hit] = np.asarray(pg)[ev_pair[hit]]
    s[hit] = np.asarray(ps)[ev_pair[hit]]
    return g, s, int(hit.sum()), (lock_skill, ev_pair, pairs)


def _item_draw_guess_slip(
    index: tuple[np.ndarray, np.ndarray, list],
    params: ParamTable,
    point: tuple[np.ndarray, np.ndarray],
    dm: np.ndarray,
) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """Per-draw per-response guess and slip: each skill's draw for skill-level
    responses, each item's draw where the table carries the item's draws (its
    posterior mean, as in ``point``, where it carries none).

    Returns ``for_draw(d)``: one draw's two arrays are built when asked for,
    so memory stays at one draw's responses, not all draws'."""
    lock_skill, ev_pair, pairs = index
    n = dm.shape[2]
    item_g = np.empty((len(pairs), n))
    item_s = np.empty((len(pairs), n))
    have = np.zeros(len(pairs), dtype=bool)
    for k, (sk, it) in enumerate(pairs):
        d = params.item_draws(sk, it)
        if d is not None:
            item_g[k], item_s[k] = d
            have[k] = True
    hit = ev_pair >= 0
    drawn = hit.copy()
    drawn[hit] = have[ev_pair[hit]]
    fixed = hit & ~drawn
    drawn_pair = ev_pair[drawn]

    def for_draw(d: int) -> tuple[np.ndarray, np.ndarray]:
        g = np.ascontiguousarray(dm[lock_skill, 2, d])
        s = np.ascontiguousarray(dm[lock_skill, 3, d])
        g[drawn] = item_g[drawn_pair, d]
        s[drawn] = item_s[drawn_pair, d]
        g[fixed] = point[0][fixed]
        s[fixed] = point[1][fixed]
        return g, s

    return for_draw


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# ---------------------------------------------------------------------------
# Batch replay.


@dataclass(frozen=True)
class ReplayResult:
    """Output of :func:`replay`.

    Per event (input row order):

    * ``p_correct``: predicted P(correct) before the response, float64 (n_events,)
    * ``p_mastery``: P(mastery) after the response, unclamped, float64 (n_events,)

    (the two are column views of one (n_events, 2) array).

    Per (user, skill) sequence, in one table (``mastery``) of equal-length arrays:
    ``user_id``, ``skill``, ``p_mastery`` (final, clamped to [0.01, 0.99]),
    ``attempts``, ``correct``, ``status``, ``known_skill`` (False where the
    population default was used).

    ``unknown_skills`` lists the skills that were not in the parameter table
    and were scored with its population default; ``n_item_level`` counts the
    responses scored with item-level guess and slip (the rest used their
    skill's).
    """

    p_correct: np.ndarray
    p_mastery: np.ndarray
    mastery: dict[str, np.ndarray]
    unknown_skills: list[Any]
    n_item_level: int = 0

    def events_frame(self):
        """Per-event outputs as a pandas DataFrame (imports pandas)."""
        import pandas as pd

        return pd.DataFrame({"p_correct": self.p_correct, "p_mastery": self.p_mastery})

    def mastery_frame(self):
        """The per-(user, skill) table as a pandas DataFrame (imports pandas)."""
        import pandas as pd

        return pd.DataFrame(self.mastery)


def _column(events: Any, name: str, *, required: bool = True) -> np.ndarray | None:
    try:
        col = events[name]
    except (KeyError, IndexError, TypeError):
        col = None
    if col is None:
        if required:
            raise ValueError(f"events: missing column {name!r}")
        return None
    if hasattr(col, "to_numpy"):
        try:
            return col.to_numpy()
        except TypeError:  # pyarrow ChunkedArray needs zero_copy_only=False
            return col.to_numpy(zero_copy_only=False)
    return np.asarray(col)


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and uniques of an id column (numpy only).

    Integer columns whose range is small relative to their length are coded
    by offset (O(n)); anything else goes through ``np.unique`` (a sort).

    Returns
    -------
    codes : int64 array, shape (n,)
    uniques : array
        ``uniques[codes] == values``; may hold values that do not occur when
        coded by offset.
    """
    values = np.asarray(values)
    if values.dtype.kind in "iu" and values.size:
        lo, hi = (int(v) for v in minmax(values))
        if hi - lo <= 4 * values.size + (1 << 20):
            codes = values.astype(np.int64, copy=False)
            if lo != 0:
                codes = codes - lo
            return codes, np.arange(lo, hi + 1, dtype=np.int64)
    if values.dtype.kind == "b":
        values = values.astype(np.int64)
    pd = sys.modules.get("pandas")
    if pd is not None and values.dtype.kind in "OUS":
        # A hash table beats sorting strings by far; used only when the
        # caller has pandas loaded already (the tracer never imports it).
        codes, uniq = pd.factorize(values, sort=True, use_na_sentinel=True)
        if (codes < 0).any():
            bad = np.flatnonzero(codes < 0)
            raise ValueError(f"missing id in {bad.size} rows, first rows {bad[:5].tolist()}")
        return codes.astype(np.int64), np.asarray(uniq, dtype=object)
    if values.dtype.kind == "O":
        bad = [
            i
            for i, v in enumerate(values[: min(values.size, 10**7)])
            if v is None or (isinstance(v, float) and math.isnan(v))
        ]
        if bad:
            raise ValueError(f"missing id in {len(bad)} rows, first rows {bad[:5]}")
    uniq, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64).reshape(-1), uniq


def _check_correct(correct: np.ndarray) -> np.ndarray:
    c = np.asarray(correct)
    if c.dtype.kind == "b":
        return c.astype(np.uint8)
    if c.dtype.kind in "iuf":
        bad = ~((c == 0) | (c == 1))
        if bad.any():
            rows = np.flatnonzero(bad)
            raise ValueError(
                f"column 'correct': {rows.size} rows are not 0/1, first rows {rows[:5].tolist()}"
            )
        return c.astype(np.uint8)
    raise ValueError(f"column 'correct': expected 0/1 or bool values, got dtype {c.dtype}")


def _param_arrays(
    params: ParamTable | BKTParams | Mapping[Any, BKTParams],
    skill_values: Sequence[Any],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-skill-code parameter matrix (n_skills, 5) and known flags."""
    if isinstance(params, BKTParams):
        mat = np.tile(np.array(params.as_tuple()), (len(skill_values), 1))
        return mat, np.ones(len(skill_values), dtype=bool)
    if not isinstance(params, ParamTable):
        params = ParamTable(params)
    mat = np.empty((len(skill_values), 5))
    known = np.empty(len(skill_values), dtype=bool)
    for i, s in enumerate(skill_values):
        p, k = params.lookup(s.item() if isinstance(s, np.generic) else s)
        mat[i] = p.as_tuple()
        known[i] = k
    return mat, known


def replay(
    events: Any,
    params: ParamTable | BKTParams | Mapping[Any, BKTParams],
    *,
    batch: str | None = None,
    columns: Mapping[str, str] | None = None,
    mastered: float = MASTERED_THRESHOLD,
    needs_focus: float = NEEDS_FOCUS_THRESHOLD,
    block_size: int = DEFAULT_BLOCK_SIZE,
    threads: int | None = None,
    interval: float | None = None,
) -> ReplayResult:
    """Replay event histories through the BKT filter (background recalculation).

    Parameters
    ----------
    events : columnar table
        Anything indexable by column name: a dict of arrays, a pandas
        DataFrame, a pyarrow Table. Columns ``user_id``, ``skill``,
        ``correct`` (0/1 or bool) and ``order`` (numeric or datetime64), in any
        row order. A response tagged with several skills is one row per skill.
    params : ParamTable, BKTParams or mapping skill -> BKTParams
        Skills missing from a table use its population default and are listed
        in ``ReplayResult.unknown_skills``.
    batch : str, optional
        Name of a column identifying the stored batch (one store update) each
        event arrived in. The running value is clamped to [0.01, 0.99] at each
        batch boundary within a (user, skill), as the store does.
    columns : mapping, optional
        Canonical name -> column name in ``events``.
    mastered, needs_focus : float
        Status thresholds.
    block_size : int
        Sequences per lockstep block.
    threads : int, optional
        Threads for sorting and scattering (default: numba's thread count;
        ``1`` for strictly one core). Results are identical for any value.
    interval : float, optional
        With a table that carries posterior draws (schema 2), also replay each
        draw and add, per (user, skill), the central ``interval`` bounds of
        the final P(mastery) (``p_mastery_lower``/``p_mastery_upper``) and the
        posterior probability that it exceeds the mastered threshold
        (``p_mastered``): "mastered with 90% credibility" is
        ``p_mastered >= 0.9``. Costs one replay per draw.

    A table with student offsets (schema 2) applies them to the students it
    knows; others get the population mean (offset 0). A table with item-level
    guess and slip (schema 3) applies them where ``events`` has an
    ``item_id`` column and the table knows the (skill, item); other responses
    use their skill's (``ReplayResult.n_item_level`` counts the former). The
    ``interval`` replays use the items' draws where the table carries them
    (schema 4), their posterior means otherwise.

    Returns
    -------
    ReplayResult
        Per-event outputs in the input's row order, and the per-(user, skill)
        mastery table.
    """
    cols = {"user_id": "user_id", "skill": "skill", "correct": "correct", "order": "order"}
    cols.update(columns or {})
    user = _column(events, cols["user_id"])
    skill = _column(events, cols["skill"])
    correct = _check_correct(_column(events, cols["correct"]))
    order = _column(events, cols["order"])
    n = len(correct)
    for name, arr in (("user_id", user), ("skill", skill), ("order", order)):
        if len(arr) != n:
            raise ValueError(f"column {cols[name]!r} has {len(arr)} rows, expected {n}")
    if order.dtype.kind == "f" and np.isnan(order).any():
        rows = np.flatnonzero(np.isnan(order))
        raise ValueError(
            f"column {cols['order']!r}: {rows.size} rows have no order, first rows "
            f"{rows[:5].tolist()}"
        )
    if order.dtype.kind not in "iufM":
        raise ValueError(
            f"column {cols['order']!r}: expected numbers or datetimes, got dtype {order.dtype}"
        )
    u_codes, u_uniq = factorize(user)
    s_codes, s_uniq = factorize(skill)
    packed = pack_codes(
        u_codes,
        s_codes,
        order,
        correct,
        n_user=len(u_uniq),
        n_skill=len(s_uniq),
        block_size=block_size,
        threads=threads,
    )
    batch_arr = _column(events, batch) if batch is not None else None
    if batch_arr is not None:
        batch_arr, _ = factorize(batch_arr)
    items = None
    if isinstance(params, ParamTable) and params.item_params:
        items = _column(events, cols.get("item_id", "item_id"), required=False)
        if items is not None and len(items) != n:
            raise ValueError(
                f"column {cols.get('item_id', 'item_id')!r} has {len(items)} rows, expected {n}"
            )
    return replay_packed(
        packed,
        params,
        s_uniq,
        u_uniq,
        batch=batch_arr,
        mastered=mastered,
        needs_focus=needs_focus,
        threads=threads,
        interval=interval,
        items=items,
    )


def _student_adjust(
    seq_p: np.ndarray, users: np.ndarray, students: Mapping[str, Mapping[str, float]] | None
) -> np.ndarray:
    """Apply per-student logit offsets to per-sequence parameters (n_seqs, 5)."""
    if not students:
        return seq_p
    out = seq_p.copy()
    keys = np.array([str(u) for u in users], dtype=object)
    for col, kind in ((0, "init"), (1, "transit")):
        table = students.get(kind)
        if not table:
            continue
        off = np.array([table.get(k, 0.0) for k in keys])
        x = np.log(out[:, col]) - np.log1p(-out[:, col]) + off
        # Leave students without an offset bit-for-bit at the skill's value.
        new = np.where(off != 0.0, 1.0 / (1.0 + np.exp(-x)), out[:, col])
        if col == 1:
            # p_forget keeps its share of 1 - p_transit, as in the model.
            out[:, 4] = out[:, 4] * (1.0 - new) / (1.0 - seq_p[:, 1])
        out[:, col] = new
    return out


def replay_packed(
    packed: Packed,
    params: ParamTable | BKTParams | Mapping[Any, BKTParams],
    skill_values: Sequence[Any],
    user_values: Sequence[Any],
    *,
    batch: np.ndarray | None = None,
    mastered: float = MASTERED_THRESHOLD,
    needs_focus: float = NEEDS_FOCUS_THRESHOLD,
    threads: int | None = None,
    interval: float | None = None,
    per_event: bool = True,
    items: np.ndarray | None = None,
) -> ReplayResult:
    """:func:`replay` on events already packed (see :func:`bktbayes.packing.pack_codes`).

    ``packed`` must carry the responses (``pack_codes(..., correct)``).
    ``per_event=False`` skips scattering per-event outputs back to input order
    (a recalculation needs only the mastery table); ``p_correct`` and
    ``p_mastery`` are then empty.
    ``skill_values[code]`` and ``user_values[code]`` give the ids behind the
    integer codes; ``batch`` holds integer batch codes in input row order;
    ``items`` the item id of each input row (None or NaN where unknown), used
    with a table that carries item-level guess and slip.
    """
    if packed.lock_correct is None or packed.seq_correct is None:
        raise ValueError("packed events carry no responses: pack them with correct=")
    if not isinstance(params, (ParamTable, BKTParams)):
        params = ParamTable(params)
    used_skills = np.flatnonzero(np.bincount(packed.seq_skill, minlength=len(skill_values)))
    mat_used, known_used = _param_arrays(params, [skill_values[i] for i in used_skills])
    mat = np.zeros((len(skill_values), 5))
    known = np.ones(len(skill_values), dtype=bool)
    mat[used_skills] = mat_used
    known[used_skills] = known_used
    skill_values = (
        np.asarray(skill_values, dtype=object)
        if not isinstance(skill_values, np.ndarray)
        else skill_values
    )
    user_values = (
        np.asarray(user_values) if not isinstance(user_values, np.ndarray) else user_values
    )
    students = params.students if isinstance(params, ParamTable) else None
    seq_users = user_values[packed.seq_user]
    seq_p = _student_adjust(mat[packed.seq_skill], seq_users, students)
    obs = packed.lock_correct
    pred = np.empty(packed.n_events)
    mast = np.empty(packed.n_events)
    flags = None
    if batch is not None:
        flags = _batch_flags(
            np.ascontiguousarray(batch),
            packed.lock_row,
            packed.block_ev,
            packed.step_ptr,
            packed.step_count,
        )

    ev_g = ev_s = item_index = None
    n_item_level = 0
    if items is not None and isinstance(params, ParamTable) and params.item_params:
        ev_g, ev_s, n_item_level, item_index = _item_guess_slip(
            packed, params, skill_values, items, mat
        )

    def run(sp: np.ndarray, ev_g=ev_g, ev_s=ev_s) -> np.ndarray:
        final = np.empty(packed.n_seqs)
        cols = [np.ascontiguousarray(sp[:, i]) for i in range(5)]
        lay = (packed.block_seq, packed.block_ev, packed.step_ptr, packed.step_count)
        if flags is None:
            lockstep_filter(obs, *lay, *cols, pred, mast, final, ev_g, ev_s)
        else:
            lockstep_filter_batched(
                obs, flags, *lay, *cols, pred, mast, final, CLAMP_LOW, CLAMP_HIGH, ev_g, ev_s
            )
        return np.clip(final, CLAMP_LOW, CLAMP_HIGH)

    extra: dict[str, np.ndarray] = {}
    if interval is not None:
        if not isinstance(params, ParamTable) or not params.n_draws:
            raise ValueError("interval= needs a parameter table that carries posterior draws")
        if not 0.0 < interval < 1.0:
            raise ValueError(f"interval must lie in (0, 1), got {interval}")
        used = [skill_values[i] for i in used_skills]
        dm = np.zeros((len(skill_values), 5, params.n_draws))
        dm[used_skills] = np.array([params.draw_matrix(s) for s in used])
        item_draw = None
        if item_index is not None:
            item_draw = _item_draw_guess_slip(item_index, params, (ev_g, ev_s), dm)
        finals = np.empty((params.n_draws, packed.n_seqs))
        for d in range(params.n_draws):
            sp = _student_adjust(dm[packed.seq_skill, :, d], seq_users, students)
            if item_draw is None:
                finals[d] = run(sp)
            else:
                finals[d] = run(sp, *item_draw(d))
        lo, hi = np.quantile(finals, [(1 - interval) / 2, (1 + interval) / 2], axis=0)
        extra = {
            "p_mastery_lower": lo,
            "p_mastery_upper": hi,
            "p_mastered": (finals > mastered).mean(axis=0),
        }
    final = run(seq_p)  # last, so pred/mast hold the point estimate's outputs
    mastery = {
        "user_id": seq_users,
        "skill": skill_values[packed.seq_skill],
        "p_mastery": final,
        "attempts": packed.seq_len.copy(),
        "correct": packed.seq_correct.copy(),
        "status": _status_array(final, mastered, needs_focus),
        "known_skill": known[packed.seq_skill],
        **extra,
    }
    unknown = [_plain(skill_values[i]) for i in used_skills[~known_used]]
    both = packed.from_lockstep_pair(pred, mast, threads) if per_event else np.empty((0, 2))
    return ReplayResult(
        p_correct=both[:, 0],
        p_mastery=both[:, 1],
        mastery=mastery,
        unknown_skills=unknown,
        n_item_level=n_item_level,
    )
