"""Side by side with Stan (pystan 3): gradient cost per observation, and a full fit.

Stan is never a dependency of bktbayes: run this in its own environment,

    python3.12 -m venv .venv-stan && .venv-stan/bin/pip install pystan pandas pyarrow scipy
    .venv-stan/bin/python benchmarks/stan/bench_stan.py [--responses 37000] [--full]

The model (``bkt_hier.stan``) is bktbayes' default hierarchical model with a
scalar forward filter per sequence. The short run (1 chain) gives the cost of
one log-density gradient per observation: sampling wall time (one core) over
the number of leapfrog steps and observations. ``--full`` runs 4 chains of
1,000 draws after 1,000 warm-up steps and prints the CPU time and the minimum
bulk ESS per CPU second (ESS from the split-R-hat definitions, computed here
with numpy to stay independent of ArviZ versions).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
BUNDLED = HERE.parent.parent / "data" / "assistments2009.parquet"


def stan_data(n_target: int) -> tuple[dict, int]:
    df = pd.read_parquet(BUNDLED)
    users = df["user_id"].drop_duplicates().sample(frac=1.0, random_state=0)
    counts = df.groupby("user_id").size().loc[users].cumsum()
    keep = counts.index[counts <= n_target]
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


def main() -> None:
    import stan

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--responses", type=int, default=37_000)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    data, n = stan_data(args.responses)
    code = (HERE / "bkt_hier.stan").read_text()
    t0 = time.perf_counter()
    post = stan.build(code, data=data, random_seed=1)
    print(
        f"{n:,} responses, {data['S']:,} sequences, {data['K']} skills; "
        f"compile {time.perf_counter() - t0:.1f} s"
    )
    t0 = time.perf_counter()
    fit = post.sample(num_chains=1, num_samples=args.samples, num_warmup=args.warmup)
    wall = time.perf_counter() - t0
    steps = float(np.sum(fit["n_leapfrog__"]))
    # n_leapfrog__ covers the kept draws only; warm-up steps are estimated
    # with the same mean (the warm-up's early phases take more).
    total_steps = steps * (args.samples + args.warmup) / args.samples
    print(
        f"short run: {wall:.1f} s for about {total_steps:,.0f} leapfrog steps = "
        f"{wall / total_steps / n * 1e9:.0f} ns per observation per gradient"
    )
    if args.full:
        t0 = time.process_time()
        w0 = time.perf_counter()
        fit = post.sample(num_chains=4, num_samples=1000, num_warmup=1000)
        cpu = time.process_time() - t0
        wall = time.perf_counter() - w0
        ess = min(ess_bulk(fit["mu"][i].reshape(4, -1)) for i in range(4))
        print(
            f"full fit: wall {wall:.0f} s, CPU {cpu:.0f} s (this process), min bulk ESS of "
            f"mu {ess:.0f}, {ess / max(wall, 1e-9):.2f} per wall second"
        )


if __name__ == "__main__":
    main()
