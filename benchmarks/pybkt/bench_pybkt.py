"""pyBKT (the reference EM implementation) on the bundled data's five published
folds: AUC, RMSE and fit time per variant. Runs in its own environment, never
as a dependency of bktbayes (pyBKT 1.4.3 needs scikit-learn < 1.9 and builds
its C++ extension only from source):

    python3.12 -m venv /tmp/pybktenv
    /tmp/pybktenv/bin/pip install numpy pandas pyarrow "scikit-learn==1.7.2" setuptools wheel
    /tmp/pybktenv/bin/pip install --no-build-isolation --no-binary pybkt pybkt==1.4.3
    OMP_NUM_THREADS=1 /tmp/pybktenv/bin/python benchmarks/pybkt/bench_pybkt.py

Prints one line per variant (mean +- sd over folds) and writes
``benchmarks/pybkt/results.json``. Same folds and rows as
``bktbayes evaluate data/assistments2009.parquet``: AUC over all test rows of a
fold, then the mean over the five folds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "standard": {},
    "forgets": {"forgets": True},
    "multigs (problem_id)": {"multigs": True},
    "multiprior": {"multiprior": True},
}


def main() -> None:
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: pyBKT is fastest here with OMP_NUM_THREADS=1", file=sys.stderr)
    from pyBKT.models import Model

    raw = pd.read_parquet(ROOT / "data" / "assistments2009.parquet")
    raw = raw.sort_values(["user_id", "position"]).reset_index(drop=True)
    df = pd.DataFrame(
        {
            "order_id": np.arange(len(raw)),
            "user_id": raw["user_id"].astype(str),
            "skill_name": raw["skill_name"].astype(str),
            "correct": raw["correct"].astype(int),
            "problem_id": raw["problem_id"].astype(str),
            "fold": raw["fold"],
        }
    )
    defaults = {
        "order_id": "order_id",
        "user_id": "user_id",
        "skill_name": "skill_name",
        "correct": "correct",
        "multigs": "problem_id",
        "multiprior": "correct",
    }
    results = {}
    for name, kw in VARIANTS.items():
        aucs, rmses, secs, errors = [], [], [], []
        for f in sorted(df["fold"].unique()):
            train, test = df[df["fold"] != f], df[df["fold"] == f]
            model = Model(seed=42, num_fits=1)
            t0 = time.perf_counter()
            try:
                model.fit(data=train.drop(columns="fold"), defaults=defaults, **kw)
                secs.append(time.perf_counter() - t0)
                auc, rmse = model.evaluate(data=test.drop(columns="fold"), metric=["auc", "rmse"])
            except Exception as e:  # reported in the table, not hidden
                errors.append(f"fold {f}: {type(e).__name__}: {e}"[:200])
                continue
            aucs.append(float(auc))
            rmses.append(float(rmse))
        r = {
            "auc_mean": float(np.mean(aucs)) if aucs else None,
            "auc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else None,
            "rmse_mean": float(np.mean(rmses)) if rmses else None,
            "fit_seconds_mean": float(np.mean(secs)) if secs else None,
            "folds_ok": len(aucs),
            "errors": errors,
        }
        results[name] = r
        if aucs:
            print(
                f"pyBKT {name:<22} AUC {r['auc_mean']:.4f} +- {r['auc_sd'] or 0:.4f}  "
                f"RMSE {r['rmse_mean']:.4f}  fit {r['fit_seconds_mean']:.1f} s/fold  "
                f"({len(aucs)}/5 folds)"
            )
        if errors:
            print(f"pyBKT {name:<22} failed on {len(errors)} fold(s): {errors[0]}")
    out = Path(__file__).with_name("results.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
