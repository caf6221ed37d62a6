"""Side by side with Stan (pystan 3): gradient cost per observation, and a full fit.

Stan is never a dependency of bktbayes: run this in its own environment,

    python3.12 -m venv .venv-stan && .venv-stan/bin/pip install pystan pandas pyarrow scipy
    .venv-stan/bin/python benchmarks/stan/bench_stan.py [--responses 37000] [--full]

The model (``bkt_hier.stan``) is bktbayes' default hierarchical model with a
scalar forward filter per sequence (per-skill probabilities computed once per
gradient, not once per sequence: the first version did that and took twice
as long per gradient). The short run (1 chain) gives the cost of one
log-density gradient per observation: CPU time over all leapfrog steps,
warm-up included (``save_warmup``; an earlier version extrapolated the
warm-up's steps from the sampling phase's mean, which undercounts them since
early warm-up takes far longer trajectories), over the observations. CPU time
is this process's plus its children's: httpstan samples in a pool of forked
worker processes. ``--full`` runs 4 chains of 1,000 draws after 1,000
warm-up steps and prints the CPU time and the minimum bulk ESS of the
population means per CPU second (ESS from the split-R-hat definitions,
computed here with numpy to stay independent of ArviZ versions).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
BUNDLED = HERE.parent.parent / "data" / "assistments2009.parquet"


def subset_users(df: pd.DataFrame, n_target: int) -> pd.Index:
    """Users, in a fixed random order, whose responses add up to at most n_target
    (also used by ``bench_fit.py --part stan-subset`` for bktbayes' side)."""
    users = df["user_id"].drop_duplicates().sample(frac=1.0, random_state=0)
    counts = df.groupby("user_id").size().loc[users].cumsum()
    return counts.index[counts <= n_target]


def stan_data(n_target: int) -> tuple[dict, int]:
    df = pd.read_parquet(BUNDLED)
    keep = subset_users(df, n_target)
    sub = df[df["user_id"].isin(keep)].sort_values(["user_id", "skill_name", "position"])
    skills = {s: i + 1 for i, s in enumerate(sorted(sub["skill_name"].unique()))}
    grp = sub.groupby(["user_id", "skill_name"], sort=False)
    lens = grp.size().to_numpy()
    starts = np.concatenate([[1], 1 + np.cumsum(lens)[:-1]])
    seq_skill = [skills[s] for _, s in grp.size().index]
    data = {
        "K": len(skills),
        "S": int(lens.size),
        "N": int(lens.sum()),
        "skill": seq_skill,
        "start": starts.tolist(),
        "len": lens.tolist(),
        "y": sub["correct"].astype(int).tolist(),
    }
    return data, int(lens.sum())


def ess_bulk(x: np.ndarray) -> float:
    """Bulk ESS of draws (chains, draws): rank-normalised split chains (Vehtari et al. 2021)."""
    from scipy.special import ndtri
    from scipy.stats import rankdata

    n = x.shape[1]
    half = n // 2
    x = np.concatenate([x[:, :half], x[:, half : 2 * half]], axis=0)
    r = rankdata(x, method="average").reshape(x.shape)
    z = ndtri((r - 0.375) / (r.size + 0.25))
    m, n = z.shape
    mean = z.mean(axis=1)
    var_w = z.var(axis=1, ddof=1).mean()
    var_b = n * mean.var(ddof=1)
    var_plus = (n - 1) / n * var_w + var_b / n
    rho = np.ones(n)
    acov = np.array([np.correlate(zz - zz.mean(), zz - zz.mean(), "full")[n - 1 :] / n for zz in z])
    for t in range(1, n):
        rho[t] = 1 - (var_w - acov[:, t].mean()) / var_plus
        if t > 1 and rho[t] + rho[t - 1] < 0:
            rho = rho[:t]
            break
    tau = -1 + 2 * rho.sum()
    return float(m * n / max(tau, 1e-9))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children
    (httpstan's forked sampling workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    total = sum(os.times()[:2])
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def short_run(post, samples: int, warmup: int, n: int) -> None:
    """1 chain: CPU seconds per leapfrog step (warm-up included) per observation."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    fit = post.sample(num_chains=1, num_samples=samples, num_warmup=warmup, save_warmup=True)
    cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    steps = np.asarray(fit["n_leapfrog__"]).ravel()
    if steps.size != samples + warmup:
        raise RuntimeError(f"expected warm-up draws in the fit, got {steps.size} draws")
    total_steps = float(steps.sum())
    print(
        f"short run: CPU {cpu:.1f} s (wall {wall:.1f} s) for {total_steps:,.0f} leapfrog steps "
        f"(warm-up {steps[:warmup].sum():,.0f}) = "
        f"{cpu / total_steps / n * 1e9:.0f} ns per observation per gradient"
    )


def main() -> None:
    import stan

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--responses", type=int, default=37_000)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--no-short", action="store_true", help="skip the short run")
    args = ap.parse_args()
    data, n = stan_data(args.responses)
    code = (HERE / "bkt_hier.stan").read_text()
    t0 = time.perf_counter()
    post = stan.build(code, data=data, random_seed=1)
    print(
        f"{n:,} responses, {data['S']:,} sequences, {data['K']} skills; "
        f"compile {time.perf_counter() - t0:.1f} s"
    )
    if not args.no_short:
        short_run(post, args.samples, args.warmup, n)
    if args.full:
        c0, w0 = cpu_seconds(), time.perf_counter()
        fit = post.sample(num_chains=4, num_samples=1000, num_warmup=1000, save_warmup=True)
        cpu, wall = cpu_seconds() - c0, time.perf_counter() - w0
        # pystan stacks draws sample-major (chain index fastest): (draws, chains);
        # the first 1,000 draws of each chain are the warm-up.
        ess = min(ess_bulk(fit["mu"][i].reshape(-1, 4).T[:, 1000:]) for i in range(4))
        steps = np.asarray(fit["n_leapfrog__"]).reshape(-1, 4).T
        print(
            f"full fit (4 x 1,000 + 1,000): wall {wall:.0f} s, CPU {cpu:.0f} s, "
            f"{steps.sum():,.0f} leapfrog steps ({steps[:, 1000:].mean():.1f} per draw after "
            f"warm-up) = {cpu / steps.sum() / n * 1e9:.0f} ns per observation per gradient; "
            f"min bulk ESS of mu {ess:.0f} = {ess / max(cpu, 1e-9):.3f} per CPU second"
        )


if __name__ == "__main__":
    main()
