"""Fitting figures of issue 6: recovery, fit time and diagnostics, fast estimate.

Parts (``--part``, default all):

* ``recovery``: hierarchical simulation of 20 skills and ~150k observations,
  4 chains x 1,000 draws after 1,000 tuning steps; compile and sampling time
  separately (target: <= 45 s in all), max R-hat <= 1.01, bulk ESS >= 400,
  no divergences, and coverage of the true skill parameters by 90% intervals
  (target >= 80%).
* ``students``: the same with student effects on p_init, 1,000 students
  (target <= 2 minutes, same diagnostics).
* ``bundled``: the hierarchical model on the bundled ASSISTments data (110
  skills, 325k responses), 4 x 1,000 draws (target <= 2 minutes).
* ``fast``: per-skill maximum likelihood on each training fold (four of the
  five ``fold`` folds) of the bundled data: seconds (target <= 0.2 with the
  numba cache warm) and training log-likelihood.

Run: ``.venv/bin/python benchmarks/bench_fit.py --part recovery``
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

from bktbayes.data import load_events
from bktbayes.models import BKTModel, ConvergenceWarning
from bktbayes.params import BKTParams, ParamTable
from bktbayes.simulate import simulate

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "assistments2009.parquet"


def _expit(x):
    return float(1 / (1 + np.exp(-x)))


def truth_table(n_skills: int, seed: int) -> ParamTable:
    """Skill parameters drawn from a hierarchical population (logit scale)."""
    rng = np.random.default_rng(seed)
    return ParamTable(
        {
            f"skill{k:02d}": BKTParams(
                _expit(rng.normal(-0.85, 0.6)),
                _expit(rng.normal(-2.0, 0.5)),
                _expit(rng.normal(-1.4, 0.4)),
                float(np.clip(0.1 * np.exp(rng.normal(0, 0.4)), 0.01, 0.4)),
            )
            for k in range(n_skills)
        }
    )


def report(label: str, m: BKTModel, wall: float) -> None:
    d = m.diagnostics
    fi = m.fit_info
    print(
        f"{label}: wall {wall:.1f} s = compile {fi['compile_seconds']:.1f} s + sampling "
        f"{fi['sampling_seconds']:.1f} s + build {fi['build_seconds']:.1f} s + init "
        f"{fi['init_seconds']:.1f} s + pointwise log-likelihood {fi['loglik_seconds']:.1f} s "
        f"+ diagnostics {fi['diagnostics_seconds']:.1f} s"
    )
    print(
        f"  max R-hat {d['max_rhat']:.4f}; min bulk ESS {d['min_ess_bulk']:.0f}; "
        f"min tail ESS {d['min_ess_tail']:.0f}; divergences {d['divergences']}; "
        f"BFMI {[round(b, 2) for b in d['bfmi'] or []]}"
    )
    print(f"  worst R-hat {d['worst_rhat'][:3]}")
    print(f"  worst bulk ESS {d['worst_ess_bulk'][:3]}")
    stats = m.idata["sample_stats"]
    if "n_steps" in stats:
        print(f"  leapfrog steps per draw: mean {float(stats['n_steps'].mean()):.1f}")


def coverage(m: BKTModel, truth: ParamTable, prob: float = 0.9) -> float:
    post = m.idata["posterior"]
    hit = tot = 0
    for name in ("p_init", "p_transit", "p_guess", "p_slip"):
        draws = post[name].stack(s=("chain", "draw")).transpose("skill", "s").values
        lo, hi = np.quantile(draws, [(1 - prob) / 2, (1 + prob) / 2], axis=1)
        for i, s in enumerate(post[name]["skill"].values):
            tot += 1
            hit += lo[i] <= getattr(truth[str(s)], name) <= hi[i]
    return hit / tot


def timed_fit(m: BKTModel, df, seed: int) -> float:
    """Fit with the defaults (4 x 1000 + 1000); wall seconds. Diagnostics are
    reported by :func:`report`, so the warning is silenced here."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m.fit(df, random_seed=seed, progressbar=False)
    return time.perf_counter() - t0


def part_recovery(seed: int) -> None:
    truth = truth_table(20, seed)
    df = simulate(truth, 375, seed=seed)  # 20 skills x 375 students x mean 20
    print(f"simulation: {len(df):,} observations, 20 skills, 375 students")
    m = BKTModel()
    report("recovery fit", m, timed_fit(m, df, seed))
    print(
        f"  90% interval coverage of the 80 true skill parameters: {coverage(m, truth):.1%}"
        " (target >= 80%)"
    )


def part_students(seed: int) -> None:
    truth = truth_table(20, seed)
    df = simulate(truth, 1000, skills_per_user=8, student_sd_init=0.8, seed=seed)
    print(f"simulation with student effects: {len(df):,} observations, 1,000 students")
    m = BKTModel(student_effects="init")
    report("student-effects fit", m, timed_fit(m, df, seed))
    print(f"  90% interval coverage of the 80 true skill parameters: {coverage(m, truth):.1%}")


def part_bundled(seed: int) -> None:
    df = load_events(BUNDLED)
    m = BKTModel()
    report("bundled ASSISTments fit (110 skills, 325,589 responses)", m, timed_fit(m, df, seed))
    print(f"  centred skills per group: {m.fit_info['centered']}")


def part_fast() -> None:
    df = load_events(BUNDLED)
    m = BKTModel()
    m.fast_estimate(df[df["fold"] != 1])  # warm the numba cache
    for k in sorted(df["fold"].unique()):
        train = df[df["fold"] != k]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            est = BKTModel().fast_estimate(train)
            times.append(time.perf_counter() - t0)
        print(
            f"fold {k}: train {len(train):,} rows; per-skill ML in {min(times):.3f} s "
            f"(packing included; target <= 0.2), {est['n_eval']} evaluations, "
            f"training log-likelihood {est['loglik']:.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--part", choices=["recovery", "students", "bundled", "fast", "all"], default="all"
    )
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.part in ("fast", "all"):
        part_fast()
    if args.part in ("recovery", "all"):
        part_recovery(args.seed)
    if args.part in ("students", "all"):
        part_students(args.seed)
    if args.part in ("bundled", "all"):
        part_bundled(args.seed)


if __name__ == "__main__":
    main()
