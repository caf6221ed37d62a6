"""Plots (matplotlib): skill-parameter forest plot and a student's mastery trajectory.

Each function returns the matplotlib ``Figure``; nothing is shown or saved
unless the caller asks (``fig.savefig(path)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .params import BKTParams, ParamTable
from .tracing import MASTERED_THRESHOLD, NEEDS_FOCUS_THRESHOLD, BayesianKnowledgeTracer

__all__ = ["plot_forest", "plot_mastery_trajectory"]


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
