"""The vectorised diagnostics against ArviZ's (the reference they replace)."""

import arviz as az
import numpy as np
import pytest
import xarray as xr

from bktbayes.diagnostics import ess_bulk, ess_tail, rhat_rank


def _ar1(rng, n_chain, n_draw, n_par, phi):
    x = rng.normal(size=(n_chain, n_draw, n_par))
    for t in range(1, n_draw):
        x[:, t] = phi * x[:, t - 1] + x[:, t]
    return x


@pytest.mark.parametrize(
    ("n_chain", "n_draw", "phi"),
    [(4, 1000, 0.0), (4, 1000, 0.9), (4, 600, 0.995), (4, 301, -0.7), (2, 50, 0.3), (1, 200, 0.5)],
)
def test_diagnostics_equal_arviz(n_chain, n_draw, phi):
    rng = np.random.default_rng(7)
    x = _ar1(rng, n_chain, n_draw, 12, phi)
    x[..., 1] = 3.0  # constant: ESS = number of draws, R-hat nan
    x[-1, :, 2] += 4.0  # one chain elsewhere
    x[..., 3] = np.round(x[..., 3])  # many ties in the ranks
    x[0, 2, 4] = np.nan  # nan in, nan out (for that parameter only)
    x[..., 5] = np.exp(x[..., 5])  # skewed
    da = xr.DataArray(x, dims=("chain", "draw", "p"))
    with np.errstate(divide="ignore", invalid="ignore"):
        pairs = [
            (az.rhat(da).values, rhat_rank(x)),
            (az.ess(da, method="bulk").values, ess_bulk(x)),
            (az.ess(da, method="tail").values, ess_tail(x, az.rcParams["stats.ci_prob"])),
            (az.ess(da, method="tail", prob=0.9).values, ess_tail(x, 0.9)),
        ]
    for ref, ours in pairs:
        # Same algorithm, same floating-point operations up to summation
        # order (FFT lengths and reductions are the same): rounding only.
        np.testing.assert_allclose(ours, ref, rtol=1e-9, equal_nan=True)
    assert np.isnan(pairs[0][1][4]) and np.isfinite(pairs[0][1][0]) == (n_chain > 1)


def test_diagnostics_detect_a_stuck_chain():
    rng = np.random.default_rng(3)
    x = _ar1(rng, 4, 500, 2, 0.5)
    x[0, :, 1] += 3.0
    r = rhat_rank(x)
    # sd of an AR(1) with phi 0.5 is 1.15: a 3-sd shift of one chain in four.
    assert r[0] < 1.01 < 1.3 < r[1]


def test_diagnostics_reject_bad_shapes():
    with pytest.raises(ValueError, match="n_chains, n_draws, n_params"):
        rhat_rank(np.zeros((4, 100)))
    with pytest.raises(ValueError, match="at least 4 draws"):
        ess_bulk(np.zeros((4, 3, 2)))


def test_check_diagnostics_warning_shows_the_chain_apart():
    # A fit where one chain of four sits elsewhere for one parameter: the
    # warning names that parameter and prints the per-chain means, so a
    # sojourn in a minor mode is told apart from chains drifting together.
    from bktbayes.models import BKTModel, ConvergenceWarning

    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 500, 3))
    x[2, :, 1] += 5.0
    x[:, :, 0] = 0.0  # a constant comes first: its R-hat is nan, not the worst
    post = xr.Dataset(
        {"p_transit": (("chain", "draw", "skill"), 0.05 + 0.01 * x)},
        coords={"skill": ["a", "b", "c"]},
    )
    stats = xr.Dataset(
        {
            "diverging": (("chain", "draw"), np.zeros((4, 500), dtype=bool)),
            "energy": (("chain", "draw"), rng.normal(size=(4, 500))),
        }
    )
    idata = xr.DataTree.from_dict({"posterior": post, "sample_stats": stats})
    with pytest.warns(ConvergenceWarning, match=r"per-chain means of p_transit\[b\]") as rec:
        out = BKTModel().check_diagnostics(idata)
    assert out["worst_rhat"][0][0] == "p_transit[b]" and not out["ok"]
    means = out["worst_rhat_chain_means"]
    np.testing.assert_allclose(means, 0.05 + 0.01 * x[:, :, 1].mean(axis=1), rtol=1e-12)
    assert f"{means[2]:.4g}" in str(rec[0].message)
    assert out["chain_apart"] == 2 and "chain 2 sits apart" in str(rec[0].message)


def test_chain_apart_tells_a_sojourn_from_slow_mixing():
    from bktbayes.models import chain_apart

    # The bundled fit's figures: seed 3 (one chain in Volume Sphere's second
    # mode) and seed 7 (four chains scattered on Prime Number's p_init).
    assert chain_apart([0.041, 0.040, 0.36, 0.042]) == 2
    assert chain_apart([-0.3759, -0.4446, -0.5242, -0.5597]) is None
    assert chain_apart([0.1, 0.1]) is None  # two chains: no majority to sit apart from
    assert chain_apart([1.0, 1.0, 1.0, 1.0]) is None


def test_check_diagnostics_constants_are_skipped_and_nan_draws_fail():
    # A constant quantity has no R-hat (ArviZ: nan) and must neither pass nor
    # fail a fit; nan among the draws is a failure that must be reported.
    from bktbayes.models import BKTModel, ConvergenceWarning

    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 400, 3))
    x[:, :, 0] = 0.25

    def fit(x):
        post = xr.Dataset(
            {"p_slip": (("chain", "draw", "skill"), x)}, coords={"skill": list("abc")}
        )
        stats = xr.Dataset({"diverging": (("chain", "draw"), np.zeros((4, 400), dtype=bool))})
        return xr.DataTree.from_dict({"posterior": post, "sample_stats": stats})

    out = BKTModel().check_diagnostics(fit(x), ess_min=100, warn=False)
    assert out["ok"] and np.isfinite(out["max_rhat"])
    assert all(name != "p_slip[a]" for name, _ in out["worst_rhat"])
    x[1, 7, 2] = np.nan
    with pytest.warns(ConvergenceWarning, match=r"p_slip\[c\]"):
        out = BKTModel().check_diagnostics(fit(x), ess_min=100)
    assert not out["ok"] and out["max_rhat"] == np.inf and out["min_ess_bulk"] == 0.0
    assert out["worst_rhat"][0][0] == "p_slip[c]"
