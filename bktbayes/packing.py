"""Packing events into the layouts the kernels need (numpy and numba only).

Two layouts of the same events:

* **CSR** (one sequence after another): events of a (user, skill) sequence are
  contiguous and in order, sequences in (user, skill) code order;
  ``seq_start[k]`` and ``seq_len[k]`` delimit sequence ``k``.
* **Lockstep** (time-major within blocks): sequences are sorted by length,
  longest first, and cut into blocks of ``block_size``. Within a block, step
  ``t`` of every sequence still active at ``t`` is stored contiguously, the
  active sequences first (lengths are non-increasing inside a block). A kernel
  then runs its inner loop *across* sequences, which the compiler vectorises;
  a per-sequence loop is latency-bound on the filter's serial dependency.

Sequences are numbered in lockstep order everywhere (sequence ``k`` is the
``k``-th longest, ties broken by (user code, skill code)), so per-sequence
arrays line up with both layouts.

All work here is O(n) radix and counting sorts compiled with numba; only the
events within one sequence are ever sorted by comparison (they are few).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numba as nb
import numpy as np

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "PREFIX_NODE_COST",
    "Packed",
    "PrefixLayout",
    "default_threads",
    "minmax",
    "pack_codes",
    "prefix_layout",
]

#: Sequences per lockstep block: enough lanes to fill the vector units and
#: amortise the loop overhead, small enough for the state to stay in L1.
DEFAULT_BLOCK_SIZE = 256

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@dataclass(frozen=True)
class Packed:
    """Events packed by (user, skill) sequence.

    Attributes
    ----------
    n_events, n_seqs : int
        Number of events and of (user, skill) sequences.
    seq_user, seq_skill : int64 array, shape (n_seqs,)
        Integer codes of each sequence's user and skill.
    seq_len : int64 array, shape (n_seqs,)
        Responses per sequence (non-increasing).
    seq_start : int64 array, shape (n_seqs,)
        Where each sequence starts in ``csr_row``; it occupies
        ``csr_row[seq_start[k]:seq_start[k] + seq_len[k]]``.
    csr_row : int64 array, shape (n_events,)
        Input rows sorted by (user code, skill code, order): each sequence is
        contiguous and in order (computed on first use).
    block_size : int
        Sequences per lockstep block.
    block_seq : int64 array, shape (n_blocks + 1,)
        First sequence of each block.
    block_ev : int64 array, shape (n_blocks + 1,)
        First lockstep position of each block.
    step_ptr : int64 array, shape (n_blocks + 1,)
        Offsets into ``step_count`` per block (one entry per time step).
    step_count : int32 array
        Number of active sequences at each time step of each block.
    lock_row : int64 array, shape (n_events,)
        Input row of each lockstep position.
    lock_correct : uint8 array, shape (n_events,), or None
        Responses in lockstep order, when ``correct`` was packed.
    seq_correct : int64 array, shape (n_seqs,), or None
        Correct responses per sequence, when ``correct`` was packed.
    """

    n_events: int
    n_seqs: int
    seq_user: np.ndarray
    seq_skill: np.ndarray
    seq_len: np.ndarray
    seq_start: np.ndarray
    block_size: int
    block_seq: np.ndarray
    block_ev: np.ndarray
    step_ptr: np.ndarray
    step_count: np.ndarray
    lock_row: np.ndarray
    lock_correct: np.ndarray | None = None
    seq_correct: np.ndarray | None = None
    _sorted: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _row_mask: int = field(default=0, repr=False)

    @cached_property
    def csr_row(self) -> np.ndarray:
        """Input rows in CSR order (see class docstring)."""
        return _rows_of(self._sorted, self._row_mask)

    @property
    def n_blocks(self) -> int:
        return len(self.block_seq) - 1

    def to_lockstep(self, values: np.ndarray) -> np.ndarray:
        """Gather a per-row array (input row order) into lockstep order."""
        return _gather(np.ascontiguousarray(values), self.lock_row)

    def from_lockstep(self, values: np.ndarray) -> np.ndarray:
        """Scatter a lockstep-ordered array back to input row order."""
        out = np.empty(self.n_events, dtype=values.dtype)
        _scatter(values, self.lock_row, out)
        return out

    def from_lockstep_pair(
        self, a: np.ndarray, b: np.ndarray, threads: int | None = None
    ) -> np.ndarray:
        """Scatter two float64 lockstep arrays back to input row order.

        Returns an (n_events, 2) array: one random cache line per event
        instead of two, which is what the scatter costs.
        """
        out = np.empty((self.n_events, 2))
        threads = default_threads() if threads is None else threads
        if threads >= 2 and self.n_events >= PARALLEL_MIN_EVENTS:
            prev = nb.get_num_threads()
            nb.set_num_threads(min(threads, nb.config.NUMBA_NUM_THREADS))
            try:
                _scatter2_parallel(a, b, self.lock_row, out)
            finally:
                nb.set_num_threads(prev)
        else:
            _scatter2(a, b, self.lock_row, out)
        return out

    def to_csr(self, values: np.ndarray) -> np.ndarray:
        """Gather a per-row array into CSR (sequence by sequence) order."""
        return _gather(np.ascontiguousarray(values), self.csr_row)


@nb.njit(**_JIT)
def _gather(values, idx):
    out = np.empty(idx.shape[0], dtype=values.dtype)
    for i in range(idx.shape[0]):
        out[i] = values[idx[i]]
    return out


@nb.njit(**_JIT)
def _scatter(values, idx, out):
    for i in range(idx.shape[0]):
        out[idx[i]] = values[i]


@nb.njit(**_JIT)
def _counting_sort(keys, n_keys):
    """Stable permutation sorting ``keys`` (values in [0, n_keys))."""
    n = keys.shape[0]
    start = np.zeros(n_keys + 1, dtype=np.int64)
    for i in range(n):
        start[keys[i] + 1] += 1
    for k in range(n_keys):
        start[k + 1] += start[k]
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        k = keys[i]
        out[start[k]] = i
        start[k] += 1
    return out


@nb.njit(**_JIT)
def _compose(user, skill, order, flag, n_skill, o_min, o_shift, f_shift, k_shift, out):
    """One int64 per event: key | order - o_min | flag | row, highest first.

    Sorting these plain integers (numpy's vectorised sort) orders events by
    (user, skill, order) with the input row breaking ties, i.e. stably, and
    carries the row and a one-bit payload (the response) along without any
    random access. Bit layout from the bottom: row (``k_shift`` minus the
    others), flag (1 bit at ``row_bits``), order (from ``o_shift``; absent when
    ``o_shift < 0``), key (from ``k_shift``).
    """
    for i in range(user.shape[0]):
        v = (user[i] * n_skill + skill[i]) << k_shift
        if o_shift >= 0:
            v |= (np.int64(order[i]) - o_min) << o_shift
        out[i] = v | (np.int64(flag[i] != 0) << f_shift) | i


@nb.njit(**_JIT)
def _sort_segment(vals, ords, lo, hi):
    """Stable sort of vals[lo:hi] and ords[lo:hi] by ords, in place."""
    # Already ordered is the common case (logs are appended in time order).
    ok = True
    for i in range(lo + 1, hi):
        if ords[i] < ords[i - 1]:
            ok = False
            break
    if ok:
        return
    if hi - lo <= 48:
        for i in range(lo + 1, hi):
            r = vals[i]
            v = ords[i]
            j = i - 1
            while j >= lo and ords[j] > v:
                vals[j + 1] = vals[j]
                ords[j + 1] = ords[j]
                j -= 1
            vals[j + 1] = r
            ords[j + 1] = v
    else:
        idx = np.argsort(ords[lo:hi], kind="mergesort")
        seg_v = vals[lo:hi][idx]
        seg_o = ords[lo:hi][idx]
        vals[lo:hi] = seg_v
        ords[lo:hi] = seg_o


@nb.njit(**_JIT)
def _layout(
    sv, k_shift, f_shift, row_mask, order, sort_within, n_skill, block_size, lock_row, lock_flag
):
    """Sequences, their length order and the lockstep layout from sorted ``sv``.

    ``lock_row`` and ``lock_flag`` (n_events,) are filled in place.
    """
    n = sv.shape[0]
    n_seg = 0
    for i in range(n):
        if i == 0 or (sv[i] >> k_shift) != (sv[i - 1] >> k_shift):
            n_seg += 1
    # One sequential pass for everything per sequence: random reads cost a
    # cache miss each (~80 ns here), sequential ones almost nothing.
    seg_start = np.empty(n_seg + 1, dtype=np.int64)
    seg_key = np.empty(n_seg, dtype=np.int64)
    seg_flag = np.zeros(n_seg, dtype=np.int64)
    s = -1
    for i in range(n):
        v = sv[i]
        if i == 0 or (v >> k_shift) != (sv[i - 1] >> k_shift):
            s += 1
            seg_start[s] = i
            seg_key[s] = v >> k_shift
        seg_flag[s] += (v >> f_shift) & 1
    seg_start[n_seg] = n
    if sort_within:
        # Order was not packed into the key: sort each (short) sequence.
        ords = np.empty(n, dtype=order.dtype)
        for i in range(n):
            ords[i] = order[sv[i] & row_mask]
        for k in range(n_seg):
            _sort_segment(sv, ords, seg_start[k], seg_start[k + 1])
    max_len = 0
    for k in range(n_seg):
        max_len = max(max_len, seg_start[k + 1] - seg_start[k])

    # Sequences by length, longest first, stable in (user, skill) order.
    rev_len = np.empty(n_seg, dtype=np.int64)
    for k in range(n_seg):
        rev_len[k] = max_len - (seg_start[k + 1] - seg_start[k])
    seq_of = _counting_sort(rev_len, max_len + 1)

    seq_user = np.empty(n_seg, dtype=np.int64)
    seq_skill = np.empty(n_seg, dtype=np.int64)
    seq_len = np.empty(n_seg, dtype=np.int64)
    seq_start = np.empty(n_seg, dtype=np.int64)
    seq_flag = np.empty(n_seg, dtype=np.int64)
    for q in range(n_seg):
        k = seq_of[q]
        kk = seg_key[k]
        seq_user[q] = kk // n_skill
        seq_skill[q] = kk - (kk // n_skill) * n_skill
        seq_start[q] = seg_start[k]
        seq_len[q] = seg_start[k + 1] - seg_start[k]
        seq_flag[q] = seg_flag[k]

    # Lockstep blocks: within a block, lengths are non-increasing, so the
    # sequences active at step t are the first step_count[t] of the block.
    n_blocks = (n_seg + block_size - 1) // block_size
    block_seq = np.empty(n_blocks + 1, dtype=np.int64)
    block_ev = np.empty(n_blocks + 1, dtype=np.int64)
    step_ptr = np.empty(n_blocks + 1, dtype=np.int64)
    total_steps = 0
    for b in range(n_blocks):
        total_steps += seq_len[b * block_size]
    step_count = np.zeros(total_steps, dtype=np.int32)
    block_seq[0] = 0
    block_ev[0] = 0
    step_ptr[0] = 0
    for b in range(n_blocks):
        q0 = b * block_size
        q1 = min(q0 + block_size, n_seg)
        t_max = seq_len[q0]
        sp = step_ptr[b]
        for q in range(q0, q1):
            step_count[sp + seq_len[q] - 1] += 1
        for t in range(t_max - 2, -1, -1):
            step_count[sp + t] += step_count[sp + t + 1]
        pos = block_ev[b]
        for t in range(t_max):
            m = step_count[sp + t]
            # Slices of exactly m elements keep the loop free of bounds and
            # aliasing checks; reads walk 256 sequences in step.
            ss = seq_start[q0 : q0 + m]
            lr = lock_row[pos : pos + m]
            lf = lock_flag[pos : pos + m]
            for j in range(m):
                v = sv[ss[j] + t]
                lr[j] = v & row_mask
                lf[j] = (v >> f_shift) & 1
            pos += m
        block_seq[b + 1] = q1
        block_ev[b + 1] = pos
        step_ptr[b + 1] = sp + t_max
    return (
        seq_user,
        seq_skill,
        seq_len,
        seq_start,
        block_seq,
        block_ev,
        step_ptr,
        step_count,
        seq_flag,
    )


@nb.njit(**_JIT)
def _rows_of(sv, row_mask):
    out = np.empty(sv.shape[0], dtype=np.int64)
    for i in range(sv.shape[0]):
        out[i] = sv[i] & row_mask
    return out


@nb.njit(**_JIT)
def _scatter2(a, b, idx, out):
    for i in range(idx.shape[0]):
        r = idx[i]
        out[r, 0] = a[i]
        out[r, 1] = b[i]


@nb.njit(parallel=True, **_JIT)
def _scatter2_parallel(a, b, idx, out):
    # Latency-bound random writes: a second thread overlaps the cache misses.
    for i in nb.prange(idx.shape[0]):
        r = idx[i]
        out[r, 0] = a[i]
        out[r, 1] = b[i]


@nb.njit(**_JIT)
def _merge(x, y, out):
    i = 0
    j = 0
    k = 0
    while i < x.shape[0] and j < y.shape[0]:
        if y[j] < x[i]:
            out[k] = y[j]
            j += 1
        else:
            out[k] = x[i]
            i += 1
        k += 1
    while i < x.shape[0]:
        out[k] = x[i]
        i += 1
        k += 1
    while j < y.shape[0]:
        out[k] = y[j]
        j += 1
        k += 1


#: Below this many events, threads cost more than they save.
PARALLEL_MIN_EVENTS = 1 << 20


def _sort_inplace(v: np.ndarray, threads: int) -> np.ndarray:
    """Sort int64 values; with 2+ threads, sort halves concurrently and merge.

    numpy's sort releases the GIL, so two Python threads sort in parallel.
    Values are unique (they hold the row), so the result is the same either way.
    """
    if threads < 2 or v.shape[0] < PARALLEL_MIN_EVENTS:
        v.sort()
        return v
    from concurrent.futures import ThreadPoolExecutor

    h = v.shape[0] // 2
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(np.ndarray.sort, (v[:h], v[h:])))
    out = np.empty_like(v)
    _merge(v[:h], v[h:], out)
    return out


def default_threads() -> int:
    """Threads used by the packing and replay helpers: numba's thread count."""
    return int(nb.config.NUMBA_NUM_THREADS)


@nb.njit(**_JIT)
def _minmax(x):
    lo = x[0]
    hi = x[0]
    for i in range(1, x.shape[0]):
        v = x[i]
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


def minmax(x: np.ndarray) -> tuple:
    """``(x.min(), x.max())`` in one pass; ``x`` must be non-empty and numeric."""
    return _minmax(np.ascontiguousarray(x))


def _bits(x: int) -> int:
    return int(x).bit_length()


def pack_codes(
    user: np.ndarray,
    skill: np.ndarray,
    order: np.ndarray,
    correct: np.ndarray | None = None,
    *,
    n_user: int | None = None,
    n_skill: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    threads: int | None = None,
) -> Packed:
    """Pack integer-coded events into CSR and lockstep layouts.

    Parameters
    ----------
    user, skill : int array, shape (n_events,)
        Non-negative integer codes.
    order : int, float or datetime64 array, shape (n_events,)
        Orders events within a (user, skill) sequence; ties keep input order.
    correct : 0/1 array, shape (n_events,), optional
        Responses; packed into lockstep order as ``Packed.lock_correct``.
    n_user, n_skill : int, optional
        Number of codes (``max + 1`` when omitted).
    block_size : int
        Sequences per lockstep block.
    threads : int, optional
        Threads for the sort (default: numba's thread count). The result does
        not depend on it.

    Returns
    -------
    Packed

    Notes
    -----
    Events are ordered by one ``np.sort`` of 64-bit integers that pack
    (user, skill, order, correct, row) when their ranges fit in 63 bits (the
    usual case: dense codes, integer positions); otherwise by (user, skill,
    row) followed by a short sort within each sequence.
    """
    user = np.ascontiguousarray(user, dtype=np.int64)
    skill = np.ascontiguousarray(skill, dtype=np.int64)
    order = np.ascontiguousarray(order)
    if order.dtype.kind == "M":
        order = order.view(np.int64)
    elif order.dtype.kind == "b":
        order = order.astype(np.int64)
    elif order.dtype.kind not in "iuf":
        raise TypeError(f"order must be numeric or datetime64, got dtype {order.dtype}")
    n = user.shape[0]
    if skill.shape[0] != n or order.shape[0] != n:
        raise ValueError("user, skill and order must have the same length")
    if correct is None:
        correct = np.zeros(n, dtype=np.uint8)
        has_correct = False
    else:
        correct = np.ascontiguousarray(correct, dtype=np.uint8)
        has_correct = True
        if correct.shape[0] != n:
            raise ValueError("correct must have the same length as user")
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    if n:
        u_lo, u_hi = minmax(user)
        s_lo, s_hi = minmax(skill)
        if u_lo < 0 or s_lo < 0:
            raise ValueError("user and skill codes must be non-negative")
    else:
        u_hi = s_hi = 0
    n_user = max(int(u_hi) + 1 if n_user is None else int(n_user), 1)
    n_skill = max(int(s_hi) + 1 if n_skill is None else int(n_skill), 1)
    if n and (u_hi >= n_user or s_hi >= n_skill):
        raise ValueError("user or skill code out of range of n_user / n_skill")

    row_bits = _bits(max(n - 1, 0))
    key_bits = _bits(n_user * n_skill - 1)
    o_bits = None
    o_min = 0
    if n and order.dtype.kind in "iu":
        o_lo, o_hi = minmax(order)
        o_min, o_bits = int(o_lo), _bits(int(o_hi) - int(o_lo))
    elif n and order.dtype.kind == "f":
        o_lo, o_hi = minmax(order)
        # Integral floats (positions stored as float) pack like integers.
        if (
            np.isfinite(o_lo)
            and np.isfinite(o_hi)
            and max(abs(o_lo), abs(o_hi)) < 2**53
            and bool(np.all(order == np.floor(order)))
        ):
            o_min, o_bits = int(o_lo), _bits(int(o_hi) - int(o_lo))
    if o_bits is not None and key_bits + o_bits + 1 + row_bits <= 63:
        o_shift = row_bits + 1
        k_shift = o_shift + o_bits
        sort_within = False
    elif key_bits + 1 + row_bits <= 63:
        o_shift, k_shift = -1, row_bits + 1
        sort_within = True
    else:
        raise ValueError("too many (user, skill) combinations to pack: factorize the ids first")
    sv = np.empty(n, dtype=np.int64)
    _compose(user, skill, order, correct, n_skill, o_min, o_shift, row_bits, k_shift, sv)
    sv = _sort_inplace(sv, default_threads() if threads is None else threads)
    lock_row = np.empty(n, dtype=np.int64)
    lock_flag = np.empty(n, dtype=np.uint8)
    row_mask = (1 << row_bits) - 1
    (
        seq_user,
        seq_skill,
        seq_len,
        seq_start,
        block_seq,
        block_ev,
        step_ptr,
        step_count,
        seq_flag,
    ) = _layout(
        sv,
        k_shift,
        row_bits,
        row_mask,
        order,
        sort_within,
        n_skill,
        block_size,
        lock_row,
        lock_flag,
    )
    return Packed(
        n_events=n,
        n_seqs=len(seq_len),
        seq_user=seq_user,
        seq_skill=seq_skill,
        seq_len=seq_len,
        seq_start=seq_start,
        block_size=block_size,
        block_seq=block_seq,
        block_ev=block_ev,
        step_ptr=step_ptr,
        step_count=step_count,
        lock_row=lock_row,
        lock_correct=lock_flag if has_correct else None,
        seq_correct=seq_flag if has_correct else None,
        _sorted=sv,
        _row_mask=row_mask,
    )


#: Cost of one prefix-trie node relative to one event of the lockstep kernel
#: (a trie node is a scalar step with a gather, a logarithm and a scatter to
#: its skill; a lockstep event is one lane of a vectorised step). Measured on
#: the bundled data; it only sets where the trie stops, not any result.
PREFIX_NODE_COST = 3.0


@dataclass(frozen=True)
class PrefixLayout:
    """Sequences of models with per-skill parameters, sharing their prefixes.

    With the same parameters for every sequence of a skill, two sequences
    whose first responses agree have the same filtered state after them, so
    those steps need computing once. The first ``depth`` steps are nodes of a
    trie per skill, weighted by how many sequences pass through them; the
    rest of each longer sequence (its suffix) is a lockstep layout that starts
    from its depth-``depth`` node's state.

    Attributes
    ----------
    depth : int
        Trie levels (>= 1 when there are events).
    node_parent : int64 array, shape (n_nodes,)
        Parent node (-1 at level 1); parents come before their children.
    node_skill : int64 array, shape (n_nodes,)
    node_y : uint8 array, shape (n_nodes,)
        The response that leads to the node.
    node_w : float64 array, shape (n_nodes,)
        Number of sequences whose prefix reaches the node.
    suffix : Packed
        Lockstep layout of the suffixes (responses ``depth`` onwards of the
        sequences longer than ``depth``).
    suf_node : int64 array, shape (suffix.n_seqs,)
        The depth-``depth`` node each suffix continues from.
    suf_skill : int64 array, shape (suffix.n_seqs,)
    seq_node : int64 array, shape (n_seqs,)
        The last trie node of each input sequence (at level
        ``min(length, depth)``).
    suf_seq : int64 array, shape (suffix.n_seqs,)
        The input sequence each suffix continues.
    n_events : int
        Events represented (trie steps weighted by sequences, plus suffixes).
    """

    depth: int
    node_parent: np.ndarray
    node_skill: np.ndarray
    node_y: np.ndarray
    node_w: np.ndarray
    suffix: Packed
    suf_node: np.ndarray
    suf_skill: np.ndarray
    seq_node: np.ndarray
    suf_seq: np.ndarray
    n_events: int

    @property
    def n_nodes(self) -> int:
        return len(self.node_parent)


def prefix_layout(
    seq_skill: np.ndarray,
    seq_start: np.ndarray,
    seq_len: np.ndarray,
    y_csr: np.ndarray,
    *,
    depth: int | None = None,
    block_size: int | None = None,
) -> PrefixLayout:
    """Build the prefix-sharing layout of a set of sequences.

    Parameters
    ----------
    seq_skill, seq_start, seq_len : int arrays, shape (n_seqs,)
        Skill code, start in ``y_csr`` and length (>= 1) of each sequence.
    y_csr : 0/1 array, shape (n_events,)
        Responses, each sequence contiguous and in order.
    depth : int, optional
        Trie levels. By default levels are added while a level has fewer
        nodes than ``1 / PREFIX_NODE_COST`` times the sequences reaching it,
        i.e. while the trie is cheaper than stepping those sequences.
    block_size : int, optional
        Lockstep block size of the suffix layout (default: the likelihood
        kernel's, ``LIKELIHOOD_BLOCK_SIZE``).

    Returns
    -------
    PrefixLayout
    """
    if block_size is None:
        from .likelihood import LIKELIHOOD_BLOCK_SIZE as block_size
    seq_skill = np.asarray(seq_skill, dtype=np.int64)
    seq_start = np.asarray(seq_start, dtype=np.int64)
    seq_len = np.asarray(seq_len, dtype=np.int64)
    y = np.asarray(y_csr, dtype=np.int64)
    if depth is not None and depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if (seq_len < 1).any():
        raise ValueError("every sequence needs at least one response")
    n_seqs = len(seq_len)
    cur = np.full(n_seqs, -1, dtype=np.int64)
    parents, skills, ys, ws = [], [], [], []
    n_nodes = 0
    alive = np.arange(n_seqs)
    d = 0
    while len(alive) and (depth is None or d < depth):
        base = seq_skill[alive] if d == 0 else cur[alive]
        key = base * 2 + y[seq_start[alive] + d]
        uk, first, inv, cnt = np.unique(
            key, return_index=True, return_inverse=True, return_counts=True
        )
        if depth is None and d > 0 and len(uk) * PREFIX_NODE_COST >= len(alive):
            break
        parents.append(np.full(len(uk), -1, dtype=np.int64) if d == 0 else uk // 2)
        skills.append(seq_skill[alive[first]])  # any sequence through the node
        ys.append((uk % 2).astype(np.uint8))
        ws.append(cnt.astype(np.float64))
        cur[alive] = n_nodes + inv.ravel()
        n_nodes += len(uk)
        d += 1
        alive = alive[seq_len[alive] > d]
    # Suffixes: responses d, d + 1, ... of the sequences still alive.
    suf_len = seq_len[alive] - d
    total = int(suf_len.sum())
    owner = np.repeat(np.arange(len(alive)), suf_len)
    pos = np.arange(total) - np.repeat(np.cumsum(suf_len) - suf_len, suf_len)
    yy = y[np.repeat(seq_start[alive] + d, suf_len) + pos].astype(np.uint8)
    suffix = pack_codes(
        owner,
        np.zeros(total, dtype=np.int64),
        pos,
        yy,
        n_user=max(len(alive), 1),
        block_size=block_size,
    )
    src = suffix.seq_user

    def cat(xs, dt):
        return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)

    return PrefixLayout(
        depth=d,
        node_parent=cat(parents, np.int64),
        node_skill=cat(skills, np.int64),
        node_y=cat(ys, np.uint8),
        node_w=cat(ws, np.float64),
        suffix=suffix,
        suf_node=np.ascontiguousarray(cur[alive][src]),
        suf_skill=np.ascontiguousarray(seq_skill[alive][src]),
        seq_node=cur,
        suf_seq=np.ascontiguousarray(alive[src]),
        n_events=int(seq_len.sum()),
    )
