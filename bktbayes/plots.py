"""Plots (matplotlib): forest plot of skill parameters, a student's mastery
trajectory, posterior predictive learning curves, shrinkage, parameter
recovery and calibration.

Each function returns the matplotlib ``Figure``; nothing is shown or saved
unless the caller asks (``fig.savefig(path)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .params import BKTParams, ParamTable
from .tracing import MASTERED_THRESHOLD, NEEDS_FOCUS_THRESHOLD, BayesianKnowledgeTracer

__all__ = [
    "plot_calibration",
    "plot_forest",
    "plot_learning_curves",
    "plot_mastery_trajectory",
    "plot_recovery",
    "plot_shrinkage",
]


def plot_forest(
    idata: Any,
    param: str = "p_transit",
    *,
    prob: float = 0.94,
    max_skills: int | None = 40,
):
    """Forest plot of one skill parameter: posterior mean and central interval, sorted.

    Parameters
    ----------
    idata : DataTree
        A fit's output (``BKTModel.fit``), with ``posterior[param]`` over
        ``skill``.
    param : str
        ``"p_init"``, ``"p_transit"``, ``"p_guess"``, ``"p_slip"`` or ``"p_forget"``.
    prob : float
        Probability of the interval.
    max_skills : int, optional
        Show at most this many skills: sorted by mean, evenly subsampled.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    da = idata["posterior"][param]
    draws = da.stack(s=("chain", "draw")).transpose("skill", "s").values
    skills = np.asarray([str(s) for s in da["skill"].values])
    mean = draws.mean(axis=1)
    lo, hi = np.quantile(draws, [(1 - prob) / 2, (1 + prob) / 2], axis=1)
    order = np.argsort(mean)
    if max_skills is not None and order.size > max_skills:
        order = order[np.linspace(0, order.size - 1, max_skills).round().astype(int)]
    fig, ax = plt.subplots(figsize=(7, 0.22 * order.size + 1.2))
    y = np.arange(order.size)
    ax.hlines(y, lo[order], hi[order], color="0.4", lw=1.5)
    ax.plot(mean[order], y, "o", color="C0", ms=4)
    ax.set_yticks(y, [s[:40] for s in skills[order]], fontsize=7)
    ax.set_xlabel(f"{param} (posterior mean, {prob:.0%} interval)")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_mastery_trajectory(
    responses: Any,
    params: BKTParams | ParamTable,
    *,
    skill: Any = None,
    user: Any = None,
    mastered: float = MASTERED_THRESHOLD,
    needs_focus: float = NEEDS_FOCUS_THRESHOLD,
):
    """One student's P(mastery) over their responses, with the status thresholds.

    Parameters
    ----------
    responses : sequence of 0/1
        The student's responses to the skill, in order.
    params : BKTParams or ParamTable
        With a table, ``skill`` (and ``user`` for student offsets) selects the
        parameters.

    Returns
    -------
    matplotlib.figure.Figure
        Markers show each response (filled: correct); the line is P(mastery)
        after each response, starting from P(L0).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    prm = params if isinstance(params, BKTParams) else params.params_for(skill, user=user)
    tracer = BayesianKnowledgeTracer(prm)
    y = [int(r) for r in responses]
    p = [prm.p_init]
    for c in y:
        p.append(tracer.update(p[-1], bool(c)))
    x = np.arange(len(p))
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.axhspan(mastered, 1.0, color="C2", alpha=0.12, label=f"mastered (> {mastered})")
    ax.axhspan(0.0, needs_focus, color="C3", alpha=0.10, label=f"needs focus (< {needs_focus})")
    ax.plot(x, p, "-", color="C0", label="P(mastery)")
    ax.scatter(
        x[1:],
        [p[i + 1] for i in range(len(y))],
        c=["C0" if c else "white" for c in y],
        edgecolors="C0",
        zorder=3,
        s=25,
    )
    ax.set_ylim(0, 1)
    ax.set_xlabel("responses")
    ax.set_ylabel("P(mastery)")
    title = "mastery trajectory" + (f": {skill}" if skill is not None else "")
    ax.set_title(title + (f", student {user}" if user is not None else ""), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_learning_curves(
    events: Any,
    params: Any,
    *,
    skill: str | None = None,
    max_opportunity: int = 15,
    band: float = 0.9,
    ax: Any = None,
):
    """Posterior predictive learning curve: observed error rate by opportunity
    number against the model's predicted error rate, with a band over the
    table's posterior draws (one-step-ahead predictions, so the curve checks
    what serving would have said).

    Parameters
    ----------
    events : canonical events table
    params : ParamTable (with draws for the band)
    skill : one skill, or None to pool all skills
    max_opportunity : last opportunity shown (1-based)
    band : probability of the central band over draws
    """
    import pandas as pd

    from .evaluate import _draw_tables
    from .tracing import replay

    ev = events if skill is None else events[events["skill"].astype(str) == str(skill)]
    if len(ev) == 0:
        raise ValueError(f"no events for skill {skill!r}")
    opp = ev.sort_values("order").groupby(["user_id", "skill"]).cumcount().to_numpy() + 1
    opp = pd.Series(opp, index=ev.sort_values("order").index).reindex(ev.index).to_numpy()
    keep = opp <= max_opportunity
    x = np.arange(1, max_opportunity + 1)

    def curve(err: np.ndarray) -> np.ndarray:
        s = pd.Series(err[keep]).groupby(opp[keep]).mean()
        return s.reindex(x).to_numpy()

    obs = curve(1.0 - ev["correct"].to_numpy(dtype=float))
    mean = curve(1.0 - replay(ev, params).p_correct)
    fig, ax = _axes(ax)
    if getattr(params, "n_draws", 0):
        draws = np.array([curve(1.0 - replay(ev, t).p_correct) for t in _draw_tables(params)])
        lo, hi = np.nanquantile(draws, [(1 - band) / 2, (1 + band) / 2], axis=0)
        ax.fill_between(x, lo, hi, alpha=0.3, label=f"model, {band:.0%} band over draws")
    ax.plot(x, mean, "-", label="model (posterior mean)")
    ax.plot(x, obs, "o", color="k", label="observed")
    ax.set_xlabel("opportunity")
    ax.set_ylabel("error rate")
    ax.set_title(f"learning curve: {'all skills' if skill is None else skill}")
    ax.legend()
    return fig


def plot_shrinkage(no_pooling: Any, hierarchical: Any, param: str = "p_transit", *, ax: Any = None):
    """Per-skill estimates without pooling (x) against the hierarchical model's
    (y): sparse skills move towards the population mean (off the diagonal)."""

    skills = [s for s in hierarchical if s in no_pooling]
    x = np.array([getattr(no_pooling[s], param) for s in skills])
    y = np.array([getattr(hierarchical[s], param) for s in skills])
    n = np.array(
        [(hierarchical.stats[s].n_obs or 1) if s in hierarchical.stats else 1 for s in skills],
        dtype=float,
    )
    fig, ax = _axes(ax)
    ax.scatter(x, y, s=10 + 90 * np.sqrt(n / n.max()), alpha=0.6)
    lim = [0, max(x.max(), y.max()) * 1.05]
    ax.plot(lim, lim, "k--", lw=1, label="no shrinkage")
    ax.axhline(getattr(hierarchical.default, param), color="C1", lw=1, label="population mean")
    ax.set_xlabel(f"{param}, no pooling (per-skill ML)")
    ax.set_ylabel(f"{param}, hierarchical (posterior mean)")
    ax.legend()
    return fig


def plot_recovery(truth: Any, estimate: Any, param: str = "p_transit", *, ax: Any = None):
    """True against estimated skill parameters with the estimate's interval
    (from the exported table's stats); the diagonal is perfect recovery."""

    skills = [s for s in estimate if s in truth]
    t = np.array([getattr(truth[s], param) for s in skills])
    e = np.array([getattr(estimate[s], param) for s in skills])
    lo = np.array([estimate.stats[s].lower.get(param, np.nan) for s in skills])
    hi = np.array([estimate.stats[s].upper.get(param, np.nan) for s in skills])
    fig, ax = _axes(ax)
    ax.errorbar(t, e, yerr=[e - lo, hi - e], fmt="o", alpha=0.7, label="posterior mean, interval")
    lim = [min(t.min(), lo.min()) * 0.95, max(t.max(), hi.max()) * 1.05]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set_xlabel(f"true {param}")
    ax.set_ylabel(f"estimated {param}")
    inside = np.mean((t >= lo) & (t <= hi))
    ax.set_title(f"recovery of {param}: {inside:.0%} of intervals cover the truth")
    ax.legend()
    return fig


def plot_calibration(table: Any, *, ax: Any = None):
    """Reliability diagram from :func:`bktbayes.evaluate.calibration_table`."""
    fig, ax = _axes(ax)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot(table["predicted"], table["observed"], "o-", label="model")
    for _, r in table.iterrows():
        ax.annotate(f"{int(r['n'])}", (r["predicted"], r["observed"]), fontsize=7, alpha=0.6)
    ax.set_xlabel("predicted P(correct)")
    ax.set_ylabel("observed rate")
    ax.legend()
    return fig


def _axes(ax: Any):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    else:
        fig = ax.figure
    return fig, ax
