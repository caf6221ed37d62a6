"""Draw synthetic responses from the BKT generative model (ground truth for recovery tests).

For each (student, skill) sequence: the initial state is mastered with
probability ``p_init``; each response is correct with probability
``1 - p_slip`` if mastered and ``p_guess`` if not; after each response an
unmastered student learns with probability ``p_transit`` and a mastered one
forgets with probability ``p_forget``.

Student variation (Yudelson et al. 2013): per-student offsets on the logit
scale, ``logit p_init[u, s] = logit p_init[s] + sd_init * z_u`` (and likewise
for ``p_transit``), with ``z_u`` standard normal.

Item variation (KT-IDEM): with ``items_per_skill``, each response is to one of
the skill's items drawn uniformly; item ``i`` of skill ``s`` has
``logit p_guess[i] = logit p_guess[s] + sd_guess * z_i`` and a slip offset
through a guess-first ordered mapping (the model's
``guess_slip="ordered_guess_first"``), ``p_slip[i] = (1 - p_guess[i])
sigmoid(-(x_s + sd_slip * w_i))`` with ``x_s`` the skill's, so that
``p_guess + p_slip < 1`` holds for every item. (Any mapping that keeps the
ordering generates valid ground truth; the recovery tests compare
probabilities, not logits.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .params import BKTParams, ParamTable

__all__ = ["SimulationTruth", "simulate"]


@dataclass(frozen=True)
class SimulationTruth:
    """What generated the data.

    Attributes
    ----------
    params : ParamTable
        Per-skill parameters.
    init_offset, transit_offset : float arrays, shape (n_users,)
        Per-student logit offsets (zeros without student variation).
    users : array, shape (n_users,)
        Student ids, aligned with the offsets.
    items : dict, optional
        ``{skill: {item: (p_guess, p_slip)}}`` when items were simulated.
    """

    params: ParamTable
    init_offset: np.ndarray
    transit_offset: np.ndarray
    users: np.ndarray
    items: dict | None = None


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def simulate(
    params: ParamTable | BKTParams | Mapping[str, BKTParams],
    n_users: int = 200,
    *,
    skills: Sequence[str] | int | None = None,
    skills_per_user: int | None = None,
    mean_length: float = 20.0,
    max_length: int | None = None,
    student_sd_init: float = 0.0,
    student_sd_transit: float = 0.0,
    items_per_skill: int | None = None,
    item_sd_guess: float = 0.0,
    item_sd_slip: float = 0.0,
    seed: int | np.random.Generator | None = None,
    return_truth: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, SimulationTruth]:
    """Simulate responses in the canonical events table.

    Parameters
    ----------
    params : ParamTable, BKTParams or mapping skill -> BKTParams
        Per-skill parameters; a single ``BKTParams`` applies to every skill
        in ``skills``.
    n_users : int
        Number of students.
    skills : sequence of str or int, optional
        Skills to simulate (default: the table's skills; with a single
        ``BKTParams``, an int ``k`` means skills ``"s0"`` ... ``"s{k-1}"``).
    skills_per_user : int, optional
        Each student practises this many skills drawn at random (default: all).
    mean_length : float
        Mean responses per (student, skill), geometric distribution (>= 1).
    max_length : int, optional
        Truncate sequences at this length.
    student_sd_init, student_sd_transit : float
        Standard deviation of the per-student logit offsets.
    items_per_skill : int, optional
        Simulate this many items per skill and add an ``item_id`` column.
    item_sd_guess, item_sd_slip : float
        Standard deviation of the per-item logit offsets on guess and slip.
    seed : int or Generator, optional
        Same seed, same table.
    return_truth : bool
        Also return a :class:`SimulationTruth`.

    Returns
    -------
    DataFrame
        Columns ``user_id`` (int), ``skill`` (str), ``correct`` (int8),
        ``order`` (int64, the student's running position over all skills);
        plus the truth when asked.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if isinstance(params, BKTParams):
        if skills is None:
            skills = 1
        if isinstance(skills, int):
            skills = [f"s{i}" for i in range(skills)]
        table = ParamTable({str(s): params for s in skills}, params, model="simulation")
    else:
        table = params if isinstance(params, ParamTable) else ParamTable(params)
        if isinstance(skills, int):
            raise ValueError("skills=int is only meaningful with a single BKTParams")
        if skills is None:
            skills = list(table)
    skills = [str(s) for s in skills]
    if not skills:
        raise ValueError("no skills to simulate")
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    if mean_length < 1:
        raise ValueError(f"mean_length must be >= 1, got {mean_length}")
    if student_sd_init < 0 or student_sd_transit < 0:
        raise ValueError("student standard deviations must be >= 0")
    k = len(skills)
    per_user = k if skills_per_user is None else int(skills_per_user)
    if not 1 <= per_user <= k:
        raise ValueError(f"skills_per_user must lie in [1, {k}], got {skills_per_user}")

    mat = np.array([table.params_for(s).as_tuple() for s in skills])  # (k, 5)
    z_init = rng.standard_normal(n_users) * student_sd_init
    z_tr = rng.standard_normal(n_users) * student_sd_transit

    # Sequences: per student a random subset of skills in random order
    # (skill-builder style blocks), each with a geometric length.
    seq_user = np.repeat(np.arange(n_users), per_user)
    seq_skill = np.concatenate([rng.permutation(k)[:per_user] for _ in range(n_users)])
    lengths = rng.geometric(1.0 / mean_length, size=seq_user.size)
    if max_length is not None:
        lengths = np.minimum(lengths, int(max_length))
    n_seq = seq_user.size

    p_init = mat[seq_skill, 0]
    p_tr = mat[seq_skill, 1]
    if student_sd_init > 0:
        p_init = _expit(_logit(p_init) + z_init[seq_user])
    if student_sd_transit > 0:
        p_tr = _expit(_logit(p_tr) + z_tr[seq_user])
    p_guess = mat[seq_skill, 2]
    p_slip = mat[seq_skill, 3]
    p_forget = mat[seq_skill, 4]

    # Step all sequences in lockstep: sequence-major output positions.
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    n = int(lengths.sum())
    item_of = item_g = item_s = None
    if items_per_skill is not None:
        if items_per_skill < 1:
            raise ValueError(f"items_per_skill must be >= 1, got {items_per_skill}")
        if item_sd_guess < 0 or item_sd_slip < 0:
            raise ValueError("item standard deviations must be >= 0")
        m = int(items_per_skill)
        ig = _expit(_logit(mat[:, 2])[:, None] + item_sd_guess * rng.standard_normal((k, m)))
        x = -_logit(mat[:, 3] / (1.0 - mat[:, 2]))
        item_s = (1.0 - ig) * _expit(-(x[:, None] + item_sd_slip * rng.standard_normal((k, m))))
        item_g = ig
        item_of = rng.integers(0, m, n)  # per output position
    correct = np.empty(n, dtype=np.int8)
    state = rng.random(n_seq) < p_init
    for t in range(int(lengths.max())):
        active = np.flatnonzero(lengths > t)
        st = state[active]
        if item_of is None:
            pg_t, ps_t = p_guess[active], p_slip[active]
        else:
            it = item_of[starts[active] + t]
            pg_t = item_g[seq_skill[active], it]
            ps_t = item_s[seq_skill[active], it]
        p_c = np.where(st, 1.0 - ps_t, pg_t)
        correct[starts[active] + t] = rng.random(active.size) < p_c
        u = rng.random(active.size)
        state[active] = np.where(st, u >= p_forget[active], u < p_tr[active])

    user_col = np.repeat(seq_user, lengths)
    # Running position per student over all of their skills.
    user_start = np.zeros(n_users + 1, dtype=np.int64)
    np.add.at(user_start, seq_user + 1, lengths)
    user_start = np.cumsum(user_start)
    order = np.arange(n) - user_start[user_col]
    df = pd.DataFrame(
        {
            "user_id": user_col.astype(np.int64),
            "skill": pd.array(
                np.asarray(skills, dtype=object)[np.repeat(seq_skill, lengths)], dtype="string"
            ),
            "correct": correct,
            "order": order.astype(np.int64),
        }
    )
    items_truth = None
    if item_of is not None:
        sk_pos = np.repeat(seq_skill, lengths)
        df["item_id"] = pd.array(
            [f"{skills[a]}/i{b}" for a, b in zip(sk_pos, item_of, strict=True)], dtype="string"
        )
        items_truth = {
            s: {f"{s}/i{j}": (float(item_g[a, j]), float(item_s[a, j])) for j in range(m)}
            for a, s in enumerate(skills)
        }
    df.attrs["source_format"] = "simulation"
    if not return_truth:
        return df
    truth = SimulationTruth(
        params=ParamTable(
            {s: table.params_for(s) for s in skills}, table.default, model="simulation truth"
        ),
        init_offset=z_init,
        transit_offset=z_tr,
        users=np.arange(n_users),
        items=items_truth,
    )
    return df, truth
