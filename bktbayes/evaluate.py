"""Evaluation: one-step-ahead predictions, metrics, cross-validation by
student, and PSIS-LOO model comparison.

Predictions are one-step-ahead: P(correct) of each response from the
responses before it only (the tracer's ``replay``), either with posterior-mean
parameters (what serving does) or averaged over posterior draws. Folds are by
student (no student in two folds): the bundled ASSISTments file's published
five-fold split (its ``fold`` column) when present, else a seeded assignment.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .params import BKTParams, ParamTable
from .tracing import replay

__all__ = [
    "CVResult",
    "assign_folds",
    "calibration_table",
    "compare_models",
    "cross_validate",
    "metrics",
    "ml_params",
    "one_step_predictions",
]


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Rank AUC (Mann-Whitney U), ties averaged; nan if one class is absent."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(p)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """AUC, RMSE, log loss (nats per response), accuracy (threshold 0.5) and n.

    Parameters
    ----------
    y : array of 0/1, shape (n,)
    p : array of P(correct), shape (n,)
    """
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    if y.shape != p.shape:
        raise ValueError(f"y has shape {y.shape}, p has shape {p.shape}")
    pc = np.clip(p, 1e-12, 1 - 1e-12)
    return {
        "auc": auc(y, p),
        "rmse": float(np.sqrt(np.mean((y - p) ** 2))),
        "log_loss": float(-np.mean(y * np.log(pc) + (1 - y) * np.log1p(-pc))),
        "accuracy": float(np.mean((p >= 0.5) == (y == 1))),
        "n": int(y.size),
    }


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Reliability table: responses binned by predicted P(correct) (equal-width
    bins on [0, 1]); mean prediction, observed rate and count per bin."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    df = pd.DataFrame({"bin": idx, "p": p, "y": y})
    g = df.groupby("bin").agg(predicted=("p", "mean"), observed=("y", "mean"), n=("y", "size"))
    g.insert(0, "lower", edges[g.index])
    g.insert(1, "upper", edges[g.index + 1])
    return g.reset_index(drop=True)


def _draw_tables(table: ParamTable) -> list[ParamTable]:
    names = ("p_init", "p_transit", "p_guess", "p_slip", "p_forget")
    out = []
    d = table.draws
    for k in range(table.n_draws):

        def at(entry: Mapping[str, list[float]], k: int = k) -> BKTParams:
            return BKTParams(**{n: float(entry[n][k]) for n in names})

        out.append(
            ParamTable(
                {s: at(v) for s, v in d["skills"].items()},
                at(d["default"]),
                students=table.students,
                # Item-level guess/slip are exported as posterior means only.
                items=table.item_params,
                model="draw",
                created=table.created,
            )
        )
    return out


def one_step_predictions(events: pd.DataFrame, params: ParamTable) -> pd.DataFrame:
    """One-step-ahead P(correct) of every response, in the input's row order.

    Returns a frame with ``p_mean`` (posterior-mean parameters, what serving
    uses) and, when ``params`` carries posterior draws, ``p_draws`` (the
    prediction averaged over the draws, each draw filtered on its own).
    """
    out = pd.DataFrame(index=events.index)
    out["p_mean"] = replay(events, params).p_correct
    if params.n_draws:
        acc = np.zeros(len(events))
        tables = _draw_tables(params)
        for t in tables:
            acc += replay(events, t).p_correct
        out["p_draws"] = acc / len(tables)
    return out


def assign_folds(events: pd.DataFrame, k: int = 5, *, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) per row, by student: the ``fold`` column when the
    data carry one (the published split), else a seeded random split of
    students. A student never appears in two folds."""
    if "fold" in events.columns:
        f = events["fold"].to_numpy()
        per_user = events.groupby("user_id")["fold"].nunique()
        if (per_user > 1).any():
            bad = per_user[per_user > 1].index[:5].tolist()
            raise ValueError(f"column 'fold': students in more than one fold, e.g. {bad}")
        uniq = np.unique(f)
        return np.searchsorted(uniq, f)
    users = np.unique(events["user_id"].to_numpy())
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(users, rng.permutation(np.arange(users.size) % k), strict=True))
    return events["user_id"].map(fold_of).to_numpy()


def ml_params(model: Any, events: pd.DataFrame) -> ParamTable:
    """Per-skill maximum-likelihood parameters (the model's fast estimate, what
    pyBKT's EM computes) as a table; the default for unseen skills is the mean
    over skills of the logit-scale estimates, said so in the metadata."""
    est = model.fast_estimate(events)
    nat = est["params"]
    skills = [str(s) for s in model._packed.skills]
    table = {}
    for i, s in enumerate(skills):
        table[s] = BKTParams(*(float(nat[n][i]) for n in _NAMES))
    lg = {n: np.log(nat[n]) - np.log1p(-nat[n]) for n in _NAMES if np.all(nat[n] > 0)}
    default = {n: float(1 / (1 + np.exp(-lg[n].mean()))) if n in lg else 0.0 for n in _NAMES}
    return ParamTable(
        table,
        BKTParams(**default),
        model="BKTModel.fast_estimate",
        metadata={
            "estimator": "per-skill maximum likelihood (Newton)",
            "default": "mean over skills of the logit-scale estimates",
            "loglik": est["loglik"],
        },
    )


_NAMES = ("p_init", "p_transit", "p_guess", "p_slip", "p_forget")


@dataclass
class CVResult:
    """Cross-validation results.

    ``folds``: one row per fold and prediction kind (metrics);
    ``skills``: per skill and fold; ``predictions``: per test row
    (fold, y, p_mean, p_draws); ``summary``: mean and sd over folds;
    ``info``: fit times and diagnostics per fold.
    """

    folds: pd.DataFrame
    skills: pd.DataFrame
    predictions: pd.DataFrame
    info: list[dict[str, Any]] = field(default_factory=list)

    @property
    def summary(self) -> pd.DataFrame:
        cols = ["auc", "rmse", "log_loss", "accuracy"]
        g = self.folds.groupby("prediction")[cols]
        return g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_sd"))

    def calibration(self, kind: str = "p_mean", bins: int = 10) -> pd.DataFrame:
        return calibration_table(self.predictions["y"], self.predictions[kind], bins)


def cross_validate(
    events: pd.DataFrame,
    make_model: Callable[[], Any],
    *,
    k: int = 5,
    method: str = "nuts",
    fit_kwargs: Mapping[str, Any] | None = None,
    n_draws: int = 50,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> CVResult:
    """K-fold cross-validation by student.

    Parameters
    ----------
    events : canonical events table (``fold`` column used when present)
    make_model : callable returning a fresh :class:`~bktbayes.models.BKTModel`
    k : folds when the data carry no ``fold`` column
    method : {"nuts", "ml"}
        ``"nuts"``: fit the posterior on the training folds, predict with the
        posterior mean and averaged over ``n_draws`` draws (the export is
        forced when diagnostics fail and recorded in ``info``). ``"ml"``:
        per-skill maximum likelihood (fast; no draws).
    fit_kwargs : passed to ``fit`` (draws, tune, chains, random_seed, ...)
    """
    if method not in ("nuts", "ml"):
        raise ValueError(f"method must be 'nuts' or 'ml', got {method!r}")
    fold = assign_folds(events, k, seed=seed)
    fold_rows, skill_rows, preds, info = [], [], [], []
    for f in np.unique(fold):
        train, test = events[fold != f], events[fold == f]
        model = make_model()
        t0 = time.perf_counter()
        if method == "ml":
            table = ml_params(model, train)
            fold_info: dict[str, Any] = {"fold": int(f), "fit_seconds": time.perf_counter() - t0}
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(train, progressbar=False, **dict(fit_kwargs or {}))
            table = model.export_params(force=True, n_draws=n_draws)
            d = model.diagnostics
            fold_info = {
                "fold": int(f),
                "fit_seconds": time.perf_counter() - t0,
                "max_rhat": d["max_rhat"],
                "min_ess_bulk": d["min_ess_bulk"],
                "divergences": d["divergences"],
                "diagnostics_ok": d["ok"],
            }
        pr = one_step_predictions(test, table)
        y = test["correct"].to_numpy()
        kinds = [c for c in ("p_mean", "p_draws") if c in pr]
        for kind in kinds:
            fold_rows.append({"fold": int(f), "prediction": kind, **metrics(y, pr[kind])})
        for skill, idx in test.groupby("skill").indices.items():
            for kind in kinds:
                skill_rows.append(
                    {
                        "fold": int(f),
                        "skill": skill,
                        "prediction": kind,
                        **metrics(y[idx], pr[kind].to_numpy()[idx]),
                    }
                )
        preds.append(pr.assign(fold=int(f), y=y, skill=test["skill"].to_numpy()))
        info.append(fold_info)
        if progress is not None:
            m = fold_rows[-len(kinds)]
            progress(f"fold {f}: AUC {m['auc']:.4f}, RMSE {m['rmse']:.4f}")
    return CVResult(
        folds=pd.DataFrame(fold_rows),
        skills=pd.DataFrame(skill_rows),
        predictions=pd.concat(preds),
        info=info,
    )


def compare_models(fits: Mapping[str, Any]) -> pd.DataFrame:
    """PSIS-LOO comparison of fitted models on the per-sequence log-likelihood.

    Parameters
    ----------
    fits : mapping of name to a fitted BKTModel or its DataTree (with a
        ``log_likelihood`` group over the same sequences)

    Returns
    -------
    DataFrame from :func:`arviz.compare` plus ``n_bad_k``: the number of
    sequences whose Pareto k exceeds 0.7 (PSIS-LOO unreliable for them). A
    warning names the models that have any; they are not hidden.
    """
    import arviz as az

    data = {name: getattr(fit, "idata", fit) for name, fit in fits.items()}
    loos = {name: az.loo(d, pointwise=True) for name, d in data.items()}
    table = az.compare(data)
    bad = {}
    for name, lo in loos.items():
        k = np.asarray(lo.pareto_k)
        bad[name] = int((k > 0.7).sum())
    table["n_bad_k"] = pd.Series(bad)
    worst = {n: b for n, b in bad.items() if b}
    if worst:
        warnings.warn(
            f"PSIS-LOO: Pareto k > 0.7 for some sequences (unreliable there): {worst}",
            UserWarning,
            stacklevel=2,
        )
    return table
