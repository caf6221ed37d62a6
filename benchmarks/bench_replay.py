"""Replay throughput: the lockstep kernel, the whole replay, and the seed's loop.

Targets (issue 2), on 10 million events on this machine:

* lockstep kernel alone, one core: >= 300 M events/s
* whole replay from integer-coded columns in arbitrary row order to per-event
  outputs in input row order plus the per-(user, skill) table: >= 20 M events/s

Factorising string ids is timed and printed separately. The seed card's
pure-Python loop runs on a slice in the same process and the speed-ups are
printed as ratios.

Data look like real data: sequence lengths geometric with mean 20, 50 skills,
users practising a random subset of skills, rows shuffled.

Run: ``.venv/bin/python benchmarks/bench_replay.py [--events N] [--repeat R]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bktbayes.packing import pack_codes
from bktbayes.params import BKTParams, ParamTable
from bktbayes.tracing import lockstep_filter, replay, sequential_filter


def seed_update(p_mastery, correct, p):
    """The seed card's BayesianKnowledgeTracer.update, verbatim maths."""
    if correct:
        p_correct_given_L = 1 - p.p_slip
        p_correct_given_notL = p.p_guess
        p_correct = p_correct_given_L * p_mastery + p_correct_given_notL * (1 - p_mastery)
        p_L_given_correct = (p_correct_given_L * p_mastery) / p_correct
    else:
        p_incorrect_given_L = p.p_slip
        p_incorrect_given_notL = 1 - p.p_guess
        p_incorrect = p_incorrect_given_L * p_mastery + p_incorrect_given_notL * (1 - p_mastery)
        p_L_given_correct = (p_incorrect_given_L * p_mastery) / p_incorrect
    return p_L_given_correct + (1 - p_L_given_correct) * p.p_transit


def make_events(n_target: int, n_skills: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_seq_guess = int(n_target / 20 * 1.05) + 10
    lengths = rng.geometric(1 / 20, n_seq_guess)
    lengths = lengths[np.cumsum(lengths) <= n_target]
    n_seq = len(lengths)
    # Each user practises about 10 of the skills: distinct (user, skill) pairs.
    per_user = 10
    n_users = (n_seq + per_user - 1) // per_user
    seq_user = np.arange(n_seq) // per_user
    seq_skill = np.empty(n_seq, dtype=np.int64)
    for u0 in range(0, n_seq, per_user):
        k = min(per_user, n_seq - u0)
        seq_skill[u0 : u0 + k] = rng.choice(n_skills, size=k, replace=False)
    n = int(lengths.sum())
    user = np.repeat(seq_user, lengths)
    skill = np.repeat(seq_skill, lengths)
    order = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    correct = (rng.random(n) < 0.65).astype(np.uint8)
    perm = rng.permutation(n)
    return (user[perm], skill[perm], correct[perm], order[perm], n_users, n_seq)


def _fake_draws(table, n, rng):
    """Draws scattered around each skill's values (valid parameter sets)."""

    def cols(p):
        out = {k: [] for k in p.to_dict()}
        for _ in range(n):
            v = p.to_dict()
            for k in ("p_init", "p_transit", "p_guess", "p_slip"):
                v[k] = float(np.clip(v[k] * np.exp(rng.normal(0, 0.1)), 1e-3, 0.45))
            for k in out:
                out[k].append(v[k])
        return out

    return {"n": n, "default": cols(table.default), "skills": {s: cols(table[s]) for s in table}}


def best(f, repeat):
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--skills", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seed-slice", type=int, default=200_000)
    args = ap.parse_args()

    import numba

    print(
        f"kernels: one core; whole replay: {numba.config.NUMBA_NUM_THREADS} threads for the "
        "sort and the scatter (also timed with threads=1)"
    )
    user, skill, correct, order, n_users, n_seq = make_events(args.events, args.skills)
    n = len(user)
    print(f"events {n:,}  sequences {n_seq:,}  users {n_users:,}  skills {args.skills}")
    rng = np.random.default_rng(1)
    table = ParamTable(
        {
            str(k): BKTParams(
                p_init=rng.uniform(0.1, 0.6),
                p_transit=rng.uniform(0.02, 0.3),
                p_guess=rng.uniform(0.05, 0.3),
                p_slip=rng.uniform(0.05, 0.2),
            )
            for k in range(args.skills)
        }
    )

    # Kernel alone (lockstep layout prepared outside the timing).
    packed = pack_codes(user, skill, order, correct)
    mat = np.array([table.params_for(str(k)).as_tuple() for k in range(args.skills)])
    sp = [np.ascontiguousarray(mat[packed.seq_skill, i]) for i in range(5)]
    pred = np.empty(n)
    mast = np.empty(n)
    final = np.empty(packed.n_seqs)
    lay = (packed.block_seq, packed.block_ev, packed.step_ptr, packed.step_count)

    def kernel():
        lockstep_filter(packed.lock_correct, *lay, *sp, pred, mast, final)

    kernel()
    t_k, t_km, _ = best(kernel, args.repeat)

    # Sequential (per-sequence) kernel on the same events, same process.
    csr_c = packed.to_csr(correct)
    spc = [np.ascontiguousarray(x) for x in sp]
    pred2 = np.empty(n)
    mast2 = np.empty(n)

    # sequential_filter walks CSR in sequence order; seq_start points into it.
    def seq_kernel():
        sequential_filter(csr_c, packed.seq_start, packed.seq_len, *spc, pred2, mast2)

    seq_kernel()
    t_s, _, _ = best(seq_kernel, max(3, args.repeat // 2))

    # Whole replay from integer-coded columns in arbitrary row order.
    events = {"user_id": user, "skill": skill, "correct": correct, "order": order}
    skill_tab = ParamTable({k: table[str(k)] for k in range(args.skills)})

    def whole():
        return replay(events, skill_tab)

    whole()
    t_w, t_wm, res = best(whole, args.repeat)
    assert res.p_correct.shape == (n,) and len(res.mastery["p_mastery"]) == n_seq

    # Factorising string ids, separately: numpy only (what the tracer does in
    # a process without pandas) and pandas' hash table (used when loaded).
    m = min(n, 2_000_000)
    user_s = np.array([f"u{x}" for x in user[:m]], dtype=object)
    t0 = time.perf_counter()
    np.unique(user_s, return_inverse=True)
    t_fact = (time.perf_counter() - t0) * n / m
    import pandas as pd

    t0 = time.perf_counter()
    pd.factorize(user_s, sort=True)
    t_fact_pd = (time.perf_counter() - t0) * n / m

    # The seed's pure-Python loop on a slice of sequences.
    seed_params = {k: table[str(k)] for k in range(args.skills)}
    lim = np.searchsorted(np.cumsum(packed.seq_len), args.seed_slice)
    rows_by_seq = [
        packed.csr_row[packed.seq_start[q] : packed.seq_start[q] + packed.seq_len[q]]
        for q in range(lim)
    ]
    n_slice = int(sum(len(r) for r in rows_by_seq))
    t0 = time.perf_counter()
    for q, rows in enumerate(rows_by_seq):
        p = seed_params[int(packed.seq_skill[q])]
        pm = p.p_init
        for r in rows:
            pm = seed_update(pm, correct[r], p)
    t_seed = time.perf_counter() - t0
    seed_rate = n_slice / t_seed

    # One core, for the record: the same whole replay with threads=1.
    t_w1, _, _ = best(lambda: replay(events, skill_tab, threads=1), max(3, args.repeat // 2))

    # Credible intervals over 100 posterior draws (schema-2 table) on a slice.
    m_int = min(n, 1_000_000)
    ev_int = {k: v[:m_int] for k, v in events.items()}
    draws = _fake_draws(skill_tab, 100, np.random.default_rng(3))
    tab_d = ParamTable(dict(skill_tab), skill_tab.default, draws=draws)
    t_pt, _, _ = best(lambda: replay(ev_int, tab_d), 3)
    t_int, _, _ = best(lambda: replay(ev_int, tab_d, interval=0.9), 2)

    k_rate = n / t_k
    w_rate = n / t_w
    print(
        f"lockstep kernel         : {t_k * 1e3:8.1f} ms  {k_rate / 1e6:8.1f} M events/s"
        f"  (median {n / t_km / 1e6:.1f})   target >= 300"
    )
    print(f"sequential kernel       : {t_s * 1e3:8.1f} ms  {n / t_s / 1e6:8.1f} M events/s")
    print(
        f"whole replay (int codes): {t_w * 1e3:8.1f} ms  {w_rate / 1e6:8.1f} M events/s"
        f"  (median {n / t_wm / 1e6:.1f})   target >= 20"
    )
    print(f"whole replay, threads=1 : {t_w1 * 1e3:8.1f} ms  {n / t_w1 / 1e6:8.1f} M events/s")
    print(
        f"credible interval over 100 draws ({m_int:,} events): {t_int / m_int * 1e9:.1f} ns"
        f"/event against {t_pt / m_int * 1e9:.1f} for the point replay (x{t_int / t_pt:.0f})"
    )
    print(
        f"factorising string user ids, extrapolated to {n:,}: np.unique {t_fact:.2f} s, "
        f"pandas.factorize {t_fact_pd:.2f} s"
    )
    print(
        f"seed pure-Python loop   : {n_slice:,} events in {t_seed:.2f} s "
        f"= {seed_rate / 1e6:.3f} M events/s"
    )
    print(
        f"speed-up over the seed loop: kernel x{k_rate / seed_rate:,.0f}, "
        f"whole replay x{w_rate / seed_rate:,.0f}, lockstep/sequential x{t_s / t_k:.1f}"
    )
    ok = k_rate >= 300e6 and w_rate >= 20e6
    print("targets met" if ok else "TARGET MISSED")


if __name__ == "__main__":
    main()
