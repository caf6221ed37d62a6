import numpy as np
import pytest
import xarray as xr

from bktbayes.params import BKTParams, ParamTable
from bktbayes.plots import plot_forest, plot_mastery_trajectory
from bktbayes.tracing import BayesianKnowledgeTracer


def _idata(n_skill=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.05, 0.9, n_skill)
    draws = np.clip(centers + rng.normal(0, 0.02, (2, 50, n_skill)), 0.001, 0.999)
    post = xr.Dataset(
        {"p_transit": (("chain", "draw", "skill"), draws)},
        coords={"skill": [f"k{i}" for i in range(n_skill)]},
    )
    return xr.DataTree.from_dict({"posterior": post}), draws


def test_forest_plots_sorted_means_with_intervals():
    idata, draws = _idata()
    fig = plot_forest(idata, "p_transit", max_skills=None)
    ax = fig.axes[0]
    xs = ax.lines[0].get_xdata()
    np.testing.assert_allclose(xs, np.sort(draws.mean(axis=(0, 1))))
    assert len(ax.get_yticks()) == 12
    fig = plot_forest(idata, "p_transit", max_skills=5)
    assert len(fig.axes[0].get_yticks()) == 5


def test_trajectory_follows_the_tracer():
    table = ParamTable(
        {"fractions": BKTParams(0.2, 0.15, 0.2, 0.1)}, students={"init": {"u1": 1.0}}
    )
    resp = [0, 1, 1, 0, 1, 1, 1]
    fig = plot_mastery_trajectory(resp, table, skill="fractions", user="u1")
    line = fig.axes[0].lines[0].get_ydata()
    prm = table.params_for("fractions", user="u1")
    tr = BayesianKnowledgeTracer(prm)
    expected = [prm.p_init]
    for c in resp:
        expected.append(tr.update(expected[-1], bool(c)))
    np.testing.assert_allclose(line, expected, atol=1e-15)
    assert line[0] == pytest.approx(prm.p_init) and prm.p_init > 0.2  # the offset applied


def test_learning_curves_shrinkage_recovery_calibration():
    import matplotlib

    matplotlib.use("Agg")
    from bktbayes.evaluate import calibration_table, one_step_predictions
    from bktbayes.params import BKTParams, ParamTable, SkillStats
    from bktbayes.plots import (
        plot_calibration,
        plot_learning_curves,
        plot_recovery,
        plot_shrinkage,
    )
    from bktbayes.simulate import simulate

    truth = ParamTable({"0": BKTParams(0.2, 0.1, 0.2, 0.1), "1": BKTParams(0.4, 0.2, 0.15, 0.1)})
    ev = simulate(truth, 80, seed=4)
    names = ("p_init", "p_transit", "p_guess", "p_slip", "p_forget")
    entry = {n: [getattr(truth["0"], n) * f for f in (0.9, 1.0, 1.1)] for n in names}
    stats = {
        s: SkillStats(
            lower={"p_transit": truth[s].p_transit * 0.8},
            upper={"p_transit": truth[s].p_transit * 1.2},
            n_obs=100,
        )
        for s in truth
    }
    est = ParamTable(
        dict(truth.items()),
        truth["0"],
        stats=stats,
        draws={"n": 3, "skills": {"0": entry, "1": entry}, "default": entry},
    )
    fig = plot_learning_curves(ev, est, skill="0", max_opportunity=8)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and len(ax.collections) == 1  # mean, observed, band
    assert "100%" in plot_recovery(truth, est).axes[0].get_title()  # truth inside
    plot_shrinkage(truth, est)
    pr = one_step_predictions(ev, est)
    cal = calibration_table(ev["correct"], pr["p_mean"], bins=5)
    assert len(plot_calibration(cal).axes[0].lines) == 2
    with pytest.raises(ValueError, match="no events"):
        plot_learning_curves(ev, est, skill="nope")
