"""Evaluation: metrics against brute force, folds by student, one-step-ahead
predictions, cross-validation and LOO comparison."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from bktbayes.cli import main
from bktbayes.evaluate import (
    assign_folds,
    auc,
    calibration_table,
    compare_models,
    cross_validate,
    metrics,
    one_step_predictions,
)
from bktbayes.models import BKTModel
from bktbayes.params import BKTParams, ParamTable
from bktbayes.simulate import simulate


def test_auc_equals_pair_counting():
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.5
    p = np.round(rng.random(60), 1)  # ties on purpose
    pos, neg = p[y], p[~y]
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg)]
    assert auc(y, p) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert np.isnan(auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_metrics_small_example():
    y = np.array([1, 0, 1, 1])
    p = np.array([0.9, 0.2, 0.4, 0.6])
    m = metrics(y, p)
    assert m["rmse"] == pytest.approx(np.sqrt((0.01 + 0.04 + 0.36 + 0.16) / 4))
    want = -(np.log(0.9) + np.log(0.8) + np.log(0.4) + np.log(0.6)) / 4
    assert m["log_loss"] == pytest.approx(want)
    assert m["accuracy"] == 0.75 and m["auc"] == 1.0 and m["n"] == 4
    with pytest.raises(ValueError, match="shape"):
        metrics(y, p[:3])


def test_calibration_table_bins():
    rng = np.random.default_rng(1)
    p = rng.random(10_000)
    y = rng.random(10_000) < p  # calibrated by construction
    t = calibration_table(y, p, bins=5)
    assert t["n"].sum() == 10_000 and len(t) == 5
    # Binomial sd of a bin's rate with ~2000 responses is ~0.011; 4 sd.
    assert np.allclose(t["observed"], t["predicted"], atol=0.045)


def test_folds_are_by_student():
    ev = simulate(BKTParams(), 60, skills=3, seed=3)
    f = assign_folds(ev, 4, seed=1)
    assert (pd.Series(f).groupby(ev["user_id"].to_numpy()).nunique() == 1).all()
    assert set(f) == {0, 1, 2, 3}
    assert np.array_equal(f, assign_folds(ev, 4, seed=1))  # reproducible
    with_col = ev.assign(fold=ev["user_id"].astype(str).str.len() % 2 + 7)
    assert set(assign_folds(with_col)) == {0, 1}
    bad = ev.assign(fold=np.arange(len(ev)) % 2)
    with pytest.raises(ValueError, match="more than one fold"):
        assign_folds(bad)


def test_predictions_use_only_earlier_responses():
    ev = simulate(BKTParams(), 30, skills=2, seed=5)
    table = ParamTable({"0": BKTParams(0.2, 0.1, 0.25, 0.1)})
    before = one_step_predictions(ev, table)["p_mean"].to_numpy()
    # Flip every user's last response on each skill: only that row's own
    # prediction could depend on it, and it must not.
    last = ev.sort_values("order").groupby(["user_id", "skill"]).tail(1).index
    flipped = ev.copy()
    flipped.loc[last, "correct"] = 1 - flipped.loc[last, "correct"]
    after = one_step_predictions(flipped, table)["p_mean"].to_numpy()
    assert np.array_equal(before, after)
    assert ev.equals(simulate(BKTParams(), 30, skills=2, seed=5))  # input not mutated


def test_draw_averaged_predictions_with_identical_draws_equal_point():
    ev = simulate(BKTParams(), 20, skills=2, seed=6)
    p = BKTParams(0.3, 0.1, 0.2, 0.1)
    names = ("p_init", "p_transit", "p_guess", "p_slip", "p_forget")
    entry = {n: [getattr(p, n)] * 3 for n in names}
    table = ParamTable(
        {"0": p, "1": p}, p, draws={"n": 3, "skills": {"0": entry, "1": entry}, "default": entry}
    )
    out = one_step_predictions(ev, table)
    assert np.allclose(out["p_draws"], out["p_mean"], atol=1e-14)


def test_cross_validate_ml_recovers_signal():
    truth = BKTParams(0.2, 0.15, 0.15, 0.08)
    ev = simulate(truth, 300, skills=4, seed=11)
    res = cross_validate(ev, lambda: BKTModel(pooling="none"), k=3, method="ml")
    assert len(res.folds) == 3
    assert set(res.predictions["fold"]) == {0, 1, 2}
    assert len(res.predictions) == len(ev)
    s = res.summary.loc["p_mean"]
    # Simulated BKT with these parameters is well predictable: the true
    # parameters reach AUC ~0.8 here; ML on two thirds must come close.
    true_auc = auc(ev["correct"], one_step_predictions(ev, ParamTable(default=truth))["p_mean"])
    assert s["auc_mean"] > true_auc - 0.02
    with pytest.raises(ValueError, match="method"):
        cross_validate(ev, BKTModel, method="em")


@pytest.mark.slow
def test_fit_evaluate_compare_cli(tmp_path):
    ev = simulate(BKTParams(0.3, 0.12, 0.2, 0.1), 150, skills=3, seed=21)
    path = tmp_path / "ev.csv"
    ev.to_csv(path, index=False)
    common = ["--draws", "150", "--tune", "150", "--chains", "2", "--export-draws", "20"]
    for name, model in (("hier", "hierarchical"), ("forget", "hierarchical+forgetting")):
        rc = main(
            ["fit", str(path), "--model", model, "--out", str(tmp_path / name), "--force", *common]
        )
        assert rc == 0
        assert (tmp_path / name / "params.json").exists()
        assert (tmp_path / name / "forest_p_slip.png").stat().st_size > 1000
    fits = {n: BKTModel.load(tmp_path / n / "fit") for n in ("hier", "forget")}
    table = compare_models(fits)
    assert set(table.index) == {"hier", "forget"}
    assert "n_bad_k" in table.columns and (table["n_bad_k"] >= 0).all()
    assert main(["compare", str(tmp_path / "hier"), str(tmp_path / "forget")]) == 0
    assert main(["evaluate", str(path), "--method", "ml", "--folds", "3"]) == 0
    assert main(["fit", str(path), "--model", "hierarchical+wat", "--out", str(tmp_path)]) == 2
