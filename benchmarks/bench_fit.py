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
  skills, 325k responses), 4 x 1,000 draws (target <= 2 minutes);
  ``--student-effects init`` fits the same data with per-student offsets;
  ``--sampler pymc`` and ``--draws/--tune/--chains`` are for orientation
  runs only (the target is for nutpie's 4 x (1,000 + 1,000)).
* ``mode`` (not in ``all``): one skill's posterior given the population
  hyperparameters, 8 chains x 5,000 draws: is the high-transit region some
  bundled fits' chains sit in a real second mode, and how much mass has it?
  It also counts the chains' crossings between the modes and how often
  4 x 1,000-draw windows of them would pass R-hat <= 1.01.
* ``stan-subset`` (not in ``all``): bktbayes' side of the Stan comparison
  (``benchmarks/stan/bench_stan.py --full``): CPU time and ESS per CPU second
  on the same ~37k-response subset.
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
from bktbayes.diagnostics import rhat_rank
from bktbayes.models import BKTModel, ConvergenceWarning
from bktbayes.params import BKTParams, ParamTable
from bktbayes.simulate import simulate

MODE_SKILL = "Volume Sphere"
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
        f"{fi['init_seconds']:.1f} s + collapsed-skill draws "
        f"{fi.get('collapsed_draw_seconds', 0.0):.1f} s + "
        f"pointwise log-likelihood {fi['loglik_seconds']:.1f} s "
        f"+ diagnostics {fi['diagnostics_seconds']:.1f} s"
    )
    for skill, j in fi.get("collapsed", {}).items():
        print(
            f"  collapsed {skill!r} ({j.get('reason')}; {j.get('modes')} modes, valley "
            f"{j['valley']:.1f} nats; {j.get('nodes')} nodes): "
            f"share of draws per mode {np.round(j.get('share_of_draws', []), 4).tolist()}; "
            f"Metropolis acceptance {j.get('accept', float('nan')):.2f}"
        )
    print(
        f"  max R-hat {d['max_rhat']:.4f}; min bulk ESS {d['min_ess_bulk']:.0f}; "
        f"min tail ESS {d['min_ess_tail']:.0f}; divergences {d['divergences']}; "
        f"BFMI {[round(b, 2) for b in d['bfmi'] or []]}"
    )
    print(f"  worst R-hat {d['worst_rhat'][:3]}")
    print(
        f"  per-chain means of the worst: {[round(x, 4) for x in d['worst_rhat_chain_means']]}"
        + ("" if d["chain_apart"] is None else f" (chain {d['chain_apart']} sits apart)")
    )
    print(f"  worst bulk ESS {d['worst_ess_bulk'][:3]}")
    stats = m.idata["sample_stats"]
    if "n_steps" in stats:
        # What the step count is made of: NUTS doubles its trajectory until it
        # turns, so 15 vs 31 steps is tree depth 4 vs 5, set by the step size
        # against the posterior's longest scale (which grows with dimension).
        dim = sum(np.size(v) for v in m.model.initial_point().values())
        dname = "depth" if "depth" in stats else "tree_depth"  # nutpie / PyMC
        depth = np.bincount(stats[dname].values.ravel().astype(int))
        share = {k: round(float(v / depth.sum()), 3) for k, v in enumerate(depth) if v}
        print(
            f"  leapfrog steps per draw: mean {float(stats['n_steps'].mean()):.1f}; step size "
            f"{float(stats['step_size'].mean()):.3f}; tree depth shares {share}; "
            f"{dim:,} unconstrained dimensions"
        )


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


def timed_fit(m: BKTModel, df, seed: int, **fit_kw) -> float:
    """Fit with the defaults (4 x 1000 + 1000) unless ``fit_kw`` says otherwise;
    wall seconds. Diagnostics are reported by :func:`report`, so the warning is
    silenced here."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m.fit(df, random_seed=seed, progressbar=False, **fit_kw)
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


def part_bundled(seed: int, student_effects: str | None = None, **fit_kw) -> None:
    df = load_events(BUNDLED)
    m = BKTModel(student_effects=student_effects)
    label = "bundled ASSISTments fit (110 skills, 325,589 responses)"
    if student_effects:
        label += f", student effects {student_effects!r}"
    if fit_kw:
        label += f", {fit_kw}"
    report(label, m, timed_fit(m, df, seed, **fit_kw))
    print(
        f"  centred skills per group: {m.fit_info['centered']}; partially centred: "
        f"{m.fit_info.get('partially_centered', 'none (binary rule)')}; skills whitened: "
        f"{m.fit_info.get('whitened_skills', 0)}"
    )
    # Which chains visited the second mode of "Volume Sphere" (see --part mode).
    post = m.idata["posterior"]
    if MODE_SKILL in post["skill"].values:
        tr = post["p_transit"].sel(skill=MODE_SKILL).values
        print(
            f"  {MODE_SKILL}: share of draws with p_transit > 0.2 per chain "
            f"{np.round((tr > 0.2).mean(axis=1), 3).tolist()}"
        )
    # Every skill's modes given the fit's population means, the share of the
    # posterior each holds and the share of the fit's draws nearest it.
    t0 = time.perf_counter()
    modes = m.skill_modes()
    print(
        f"  skills with more than one mode given the population ({time.perf_counter() - t0:.1f} s):"
    )
    cols = ["skill", "mode", "share", "fit_share", "log_density", "valley", "p_init", "p_transit"]
    print("    " + modes[cols].round(4).to_string(index=False).replace("\n", "\n    "))


def part_mode(skill: str, seed: int, fit_dir: str | None) -> None:
    """One skill's posterior given the population hyperparameters, sampled long.

    The bundled fit's R-hat misses (some seeds) are one chain of four sitting
    at a high transit of "Volume Sphere" for hundreds of draws. This part asks
    whether that is a real second mode and how much mass it holds: the skill's
    logits get the hierarchical prior Normal(mu_g, sigma_g) with the
    hyperparameters fixed (posterior means of a saved fit, ``--fit DIR``, or
    else the population moments of the per-skill ML estimates that start the
    chains), and 8 chains x 5,000 draws are run on that skill's data alone.
    """
    df = load_events(BUNDLED)
    if fit_dir:
        post = BKTModel.load(fit_dir).idata["posterior"]
        hyper = {
            g: (float(post[f"mu_{g}"].mean()), float(post[f"sigma_{g}"].mean()))
            for g in ("init", "transit", "guess", "slip")
        }
        source = f"posterior means of {fit_dir}"
    else:
        m = BKTModel()
        m.build_model(df)
        pts = m._initial_points(m._fast_estimate_cached())
        hyper = {
            g: (float(pts[f"mu_{g}"]), float(pts[f"sigma_{g}"]))
            for g in ("init", "transit", "guess", "slip")
        }
        source = "population moments of the per-skill ML estimates"
    print(
        f"hyperparameters ({source}): "
        + ", ".join(f"{g} {mu:.2f}/{sd:.2f}" for g, (mu, sd) in hyper.items())
    )
    one = df[df["skill"] == skill]
    if one.empty:
        raise SystemExit(f"no skill {skill!r} in the bundled data")
    # What the skill's sequences look like, and the per-skill ML estimate
    # the full fit's chains start from.
    seqs = (
        one.sort_values(["user_id", "order"])
        .groupby("user_id")["correct"]
        .agg(lambda c: "".join(map(str, c.astype(int))))
    )
    top = ", ".join(f"{k} x{v}" for k, v in seqs.value_counts().head(6).items())
    print(
        f"{skill}: {seqs.size} students, responses per student median "
        f"{int(seqs.str.len().median())}, {int((seqs.str.len() == 1).sum())} answered once, "
        f"{int(seqs.str.endswith('111').sum())} sequences end in three correct; most common: {top}"
    )
    full = BKTModel()
    full.build_model(df)
    est = full._fast_estimate_cached()["params"]
    k = list(full._packed.skills).index(skill)
    print(
        "  per-skill ML estimate (where the full fit's chains start): "
        + ", ".join(f"{n} {v[k]:.3f}" for n, v in est.items() if n != "p_forget")
    )
    pri = {f"mu_{g}": {"mu": mu, "sigma": sd} for g, (mu, sd) in hyper.items()}
    m1 = BKTModel(pooling="none", priors=pri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        idata = m1.fit(one, draws=5000, tune=1000, chains=8, random_seed=seed, progressbar=False)
    p = idata["posterior"]
    tr = p["p_transit"].values[:, :, 0]
    init = p["p_init"].values[:, :, 0].ravel()
    guess = p["p_guess"].values[:, :, 0].ravel()
    lt = np.log(tr / (1 - tr)).ravel()
    print(
        f"{skill}: {len(one):,} responses; 8 chains x 5,000 draws; "
        f"max R-hat {m1.diagnostics['max_rhat']:.4f}"
    )
    hist, edges = np.histogram(lt, bins=np.arange(-7.0, 4.01, 0.5))
    print(
        "  logit p_transit histogram (bin start: draws): "
        + ", ".join(f"{e:.1f}: {h}" for e, h in zip(edges, hist, strict=False) if h)
    )
    hi = lt > np.log(0.2 / 0.8)
    per_chain = np.round((tr > 0.2).mean(axis=1), 3).tolist()
    print(
        f"  P(p_transit > 0.2) = {hi.mean():.4f} (per chain {per_chain}); "
        f"below 0.2: mean p_init {init[~hi].mean():.3f}, p_guess {guess[~hi].mean():.3f}, "
        f"p_transit {tr.ravel()[~hi].mean():.3f}; above: p_init {init[hi].mean():.3f}, "
        f"p_guess {guess[hi].mean():.3f}, p_transit {tr.ravel()[hi].mean():.3f}"
    )
    mode_windows(tr > 0.2, tr, seed)


def mode_windows(in_small: np.ndarray, values: np.ndarray, seed: int, n: int = 1000) -> None:
    """How often would a 4 x 1,000-draw fit pass R-hat <= 1.01 if its chains
    moved between the modes as these long chains do?

    ``in_small`` and ``values``: (n_chains, n_draws) from the long run. Each
    of ``n`` windows takes four different chains and one 1,000-draw segment
    of each (non-overlapping segments), as four chains of a fit would be.
    """
    step = np.diff(in_small.astype(np.int8), axis=1)
    flips = np.abs(step).sum(axis=1)
    visits = (step == 1).sum(axis=1) + in_small[:, 0]  # runs of draws in the small mode
    n_vis = int(visits.sum())
    dwell = in_small.sum() / max(n_vis, 1)
    print(
        f"  crossings between the modes per chain {flips.tolist()}: {n_vis} visits to the "
        f"small mode in {in_small.size:,} draws (one per {in_small.size / max(n_vis, 1):,.0f}), "
        f"{dwell:.0f} draws each on average"
    )
    n_chain, n_draw = values.shape
    seg = values[:, : n_draw // 1000 * 1000].reshape(n_chain, -1, 1000)
    rng = np.random.default_rng(seed)
    rh = np.empty(n)
    for i in range(n):
        ch = rng.choice(n_chain, 4, replace=False)
        sg = rng.integers(0, seg.shape[1], 4)
        rh[i] = rhat_rank(seg[ch, sg][:, :, None])[0]
    print(
        f"  4 x 1,000-draw windows of these chains ({n} drawn): R-hat of p_transit <= 1.01 in "
        f"{(rh <= 1.01).mean():.0%}, median {np.median(rh):.4f}, 90th percentile "
        f"{np.quantile(rh, 0.9):.3f}"
    )


def part_stan_subset(seed: int) -> None:
    """bktbayes' side of the Stan comparison: the same ~37k-response subset
    (``benchmarks/stan/bench_stan.py``), 4 x 1,000 + 1,000, CPU seconds (nutpie
    samples in threads of this process) and min bulk ESS of the population
    means per CPU second."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location(
        "bench_stan", Path(__file__).resolve().parent / "stan" / "bench_stan.py"
    )
    bench_stan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_stan)
    keep = bench_stan.subset_users(pd.read_parquet(BUNDLED), 37_000)
    df = load_events(BUNDLED)
    df = df[df["user_id"].isin(set(keep))]
    if len(df) == 0:
        raise SystemExit("the subset is empty: user ids do not match the raw file")
    m = BKTModel()
    c0 = time.process_time()
    wall = timed_fit(m, df, seed)
    cpu = time.process_time() - c0
    report(f"Stan subset ({len(df):,} responses, {df['skill'].nunique()} skills)", m, wall)
    from bktbayes.diagnostics import ess_bulk

    post = m.idata["posterior"]
    mus = np.stack([post[f"mu_{g}"].values for g in ("init", "transit", "guess", "slip")], -1)
    ess = float(ess_bulk(mus).min())
    print(
        f"  CPU {cpu:.1f} s (fit, compile included); min bulk ESS of mu {ess:.0f} = "
        f"{ess / cpu:.1f} per CPU second"
    )
    # The log-density gradient alone, as bench_likelihood.py times it (NUMBA
    # mode, one core, best of 200), for the per-observation column.
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_likelihood import compiled_logp_dlogp, time_fn

    f, args = compiled_logp_dlogp(BKTModel().build_model(df), "NUMBA")
    t = time_fn(f, args, 200)
    print(f"  log-density gradient: {t * 1e3:.3f} ms = {t / len(df) * 1e9:.1f} ns per observation")


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
        "--part",
        choices=["recovery", "students", "bundled", "fast", "mode", "stan-subset", "all"],
        default="all",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skill", default=MODE_SKILL, help="mode: the skill to sample")
    ap.add_argument("--fit", default=None, help="mode: a saved fit whose hyperparameters to use")
    ap.add_argument(
        "--student-effects",
        choices=["init", "init+transit"],
        default=None,
        help="bundled: fit with per-student offsets (the model without the second mode)",
    )
    # Only for orientation runs of --part bundled: the targets are for the
    # defaults (nutpie, 4 x 1,000 + 1,000).
    ap.add_argument("--sampler", choices=["nutpie", "pymc"], default=None, help="bundled")
    for n in ("draws", "tune", "chains"):
        ap.add_argument(f"--{n}", type=int, default=None, help="bundled")
    args = ap.parse_args()
    fit_kw = {
        n: getattr(args, n)
        for n in ("sampler", "draws", "tune", "chains")
        if getattr(args, n) is not None
    }
    if args.part in ("fast", "all"):
        part_fast()
    if args.part in ("recovery", "all"):
        part_recovery(args.seed)
    if args.part in ("students", "all"):
        part_students(args.seed)
    if args.part in ("bundled", "all"):
        part_bundled(args.seed, args.student_effects, **fit_kw)
    if args.part == "stan-subset":
        part_stan_subset(args.seed)
    if args.part == "mode":
        part_mode(args.skill, args.seed, args.fit)


if __name__ == "__main__":
    main()
