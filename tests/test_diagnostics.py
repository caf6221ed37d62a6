"""The vectorised diagnostics against ArviZ's (the reference they replace)."""

import arviz as az
import numpy as np
import pandas as pd
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


# ---------------------------------------------------------------------------
# skill_modes: the modes of each skill's posterior given the population.

BUNDLED = __import__("pathlib").Path(__file__).resolve().parent.parent / "data"


def _sequences(df, skills):
    """Responses sequence after sequence, with lengths and skill codes, from
    the events table alone (independent of the model's packing)."""
    d = df.sort_values(["user_id", "skill", "order"], kind="stable")
    code = pd.Categorical(d["skill"].astype(str), categories=skills).codes
    key = d["user_id"].to_numpy() * len(skills) + code
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    lens = np.diff(np.r_[starts, len(d)])
    return d["correct"].to_numpy().astype(np.uint8), lens, code[starts].astype(np.int64)


def _replicated_layout(correct, seq_len, n_rep):
    """Lockstep layout of one skill's sequences repeated n_rep times, replica
    r as "skill" r: the production kernel evaluates n_rep points at once (an
    evaluation independent of modes.skill_loglik_many's point kernel)."""
    from bktbayes.likelihood import LIKELIHOOD_BLOCK_SIZE
    from bktbayes.packing import pack_codes

    n_seq, n_obs = seq_len.size, correct.size
    pk = pack_codes(
        np.repeat(np.arange(n_seq * n_rep), np.tile(seq_len, n_rep)),
        np.repeat(np.arange(n_rep), n_obs),
        np.arange(n_obs * n_rep),
        np.tile(correct, n_rep),
        n_skill=n_rep,
        block_size=LIKELIHOOD_BLOCK_SIZE,
    )
    return (pk.lock_correct, pk.block_seq, pk.block_ev, pk.step_ptr, pk.step_count), pk.seq_skill


def _logpost_many(y, lens, x, mu, sd):
    """Log density of one skill's logits given the population, at many
    points x (n_par, n): the kernel on the skill's sequences replicated."""
    from bktbayes.likelihood import skill_logp_grad
    from bktbayes.models import _gs_modes

    out = np.empty(x.shape[1])
    chunk = 4000
    lay, sk = _replicated_layout(y, lens, chunk)
    for a in range(0, x.shape[1], chunk):
        xa = np.zeros((x.shape[0], chunk))
        xa[:, : min(chunk, x.shape[1] - a)] = x[:, a : a + chunk]
        lp = np.zeros(chunk)
        g = np.zeros_like(xa)
        skill_logp_grad(*lay, sk, xa, _gs_modes()["ordered"], lp, g)
        prior = -0.5 * (((xa - mu[:, None]) / sd[:, None]) ** 2).sum(axis=0)
        out[a : a + chunk] = (lp + prior)[: min(chunk, x.shape[1] - a)]
    return out


@pytest.mark.slow
def test_skill_modes_finds_volume_spheres_second_mode_and_its_share(volume_sphere):
    v = volume_sphere
    table = v["m"].skill_modes()
    vs = table[table["skill"] == "Volume Sphere"].reset_index(drop=True)
    # The two stories of the README's "A second mode": rarely learnt versus
    # learnt at the first attempt, a deep valley apart.
    assert len(vs) == 2
    assert vs.loc[0, "p_transit"] < 0.1 < 0.5 < vs.loc[1, "p_transit"]
    assert vs.loc[1, "log_density"] < 0 and vs.loc[1, "valley"] > 3.0
    assert 0 < vs.loc[1, "share"] < 0.5

    # The share against an independent integral: a Riemann sum over a grid
    # in each mode's Laplace-whitened coordinates (spacing 1 sd, +-8 sd), each
    # point counted for the mode nearest in Mahalanobis distance, as the
    # importance sampler counts its samples; the log density evaluated by
    # the lockstep kernel on replicated sequences, not the point kernel.
    modes, covs = v["modes"], v["covs"]
    prec = [np.linalg.inv(c) for c in covs]
    g1 = np.arange(-8.0, 9.0)
    u = np.stack(np.meshgrid(g1, g1, g1, g1, indexing="ij")).reshape(4, -1)
    mass = np.zeros(2)
    ref = None
    for j in range(2):
        chol = np.linalg.cholesky(covs[j])
        x = modes[j][:, None] + chol @ u
        lp = _logpost_many(v["y"], v["lens"], x, v["mu"], v["sd"])
        ref = lp.max() if ref is None else ref
        d = np.stack(
            [
                np.einsum("in,ij,jn->n", x - modes[k][:, None], prec[k], x - modes[k][:, None])
                for k in range(2)
            ]
        )
        own = np.argmin(d, axis=0) == j
        mass[j] = np.exp(lp[own] - ref).sum() * np.linalg.det(chol)
    share_grid = mass[1] / mass.sum()
    # Importance-sampling error of a share p from an effective sample size n:
    # sd sqrt(p (1 - p) / n); 4 sds (plus 10% of the share for the grid's
    # truncation and spacing) keeps a false alarm below 1e-4.
    p = v["share"]
    tol = 4 * np.sqrt(p * (1 - p) / v["ess"]) + 0.1 * share_grid
    assert abs(p - share_grid) < tol, (p, share_grid, tol)
    assert 0.005 < share_grid < 0.1


def test_skill_modes_sees_one_mode_in_a_well_identified_skill():
    from bktbayes.modes import skill_modes
    from bktbayes.params import BKTParams, ParamTable
    from bktbayes.simulate import simulate

    truth = ParamTable({"a": BKTParams(0.3, 0.15, 0.2, 0.1), "b": BKTParams(0.5, 0.05, 0.25, 0.15)})
    df = simulate(truth, 1500, seed=4)
    y, lens, sk = _sequences(df, ["a", "b"])
    x0 = np.zeros((4, 2))
    res = skill_modes(
        y, lens, sk, np.array([-0.8, -2.0, -1.2, 2.0]), np.ones(4), x0, gs_mode=0, seed=0
    )
    assert list(res["n_modes"]) == [1, 1]
    assert np.all(res["share"][:, 0] == 1.0) and np.all(np.isnan(res["share"][:, 1:]))
    # The mode is the truth within a few standard errors: 1,500 students.
    from bktbayes.models import natural_params

    nat = natural_params(
        {g: res["logits"][:, 0, i] for i, g in enumerate(["init", "transit", "guess", "slip"])},
        "ordered",
    )
    se = np.sqrt(np.array([np.diag(c) for c in res["cov"][:, 0]]))  # logit scale
    assert np.all(se < 0.5)
    for k, name in enumerate(["a", "b"]):
        for f in ("p_init", "p_transit", "p_guess", "p_slip"):
            assert abs(nat[f][k] - getattr(truth[name], f)) < 0.1, (name, f)


def test_skill_modes_rejects_bad_input():
    from bktbayes.modes import skill_modes

    with pytest.raises(ValueError, match="sum\\(seq_len\\)"):
        skill_modes(
            np.ones(5, np.uint8),
            np.array([2, 2]),
            np.array([0, 0]),
            np.zeros(4),
            np.ones(4),
            np.zeros((4, 1)),
            gs_mode=0,
        )
    with pytest.raises(ValueError, match="prior_sd"):
        skill_modes(
            np.ones(4, np.uint8),
            np.array([2, 2]),
            np.array([0, 0]),
            np.zeros(4),
            np.r_[1, 1, 0, 1],
            np.zeros((4, 1)),
            gs_mode=0,
        )


def test_skill_modes_refuses_models_whose_skills_are_not_independent():
    from bktbayes import BKTModel

    m = BKTModel(student_effects="init")
    with pytest.raises(ValueError, match="student_effects"):
        m.skill_modes()


@pytest.fixture(scope="module")
def volume_sphere():
    """Volume Sphere's responses, its modes at the starting population."""
    from bktbayes import BKTModel
    from bktbayes.data import load_events
    from bktbayes.modes import skill_modes

    df = load_events(BUNDLED / "assistments2009.parquet")
    m = BKTModel()
    model = m.build_model(df)
    pop = m.skill_modes(n_samples=0).attrs["population"]
    groups = ["init", "transit", "guess", "slip"]
    mu = np.array([pop["mu"][g] for g in groups])
    sd = np.array([pop["sd"][g] for g in groups])
    skills = list(model.coords["skill"])
    y_all, lens_all, seq_skill = _sequences(df, skills)
    x0 = np.array([m.fast_estimate()["logits"][g] for g in groups])
    res = skill_modes(y_all, lens_all, seq_skill, mu, sd, x0, gs_mode=0, n_samples=20000, seed=5)
    s = skills.index("Volume Sphere")
    starts = np.r_[0, np.cumsum(lens_all)[:-1]]
    mine = np.flatnonzero(seq_skill == s)
    y = np.concatenate([y_all[starts[i] : starts[i] + lens_all[i]] for i in mine])
    return {
        "m": m,
        "y": y,
        "lens": lens_all[mine],
        "mu": mu,
        "sd": sd,
        "modes": res["logits"][s, :2],
        "covs": res["cov"][s, :2],
        "share": res["share"][s, 1],
        "ess": res["ess"][s],
    }


@pytest.mark.slow
def test_collapsed_marginal_likelihood_against_a_grid_integral(volume_sphere):
    """The fixed-node estimate of log p(y_s | mu, sigma), the likelihood a
    collapsed skill contributes, against a Riemann sum over grids in each
    mode's whitened coordinates, at the starting population and at two
    others a posterior sd or so away."""
    from bktbayes.modes import collapse_nodes, skill_loglik_many

    v = volume_sphere
    nodes, c = collapse_nodes(v["y"], v["lens"], v["modes"], v["covs"], gs_mode=0, seed=1)
    g1 = np.arange(-8.0, 9.0)
    u = np.stack(np.meshgrid(g1, g1, g1, g1, indexing="ij")).reshape(4, -1)
    prec = [np.linalg.inv(cv) for cv in v["covs"]]
    grid = []
    for j in range(2):
        chol = np.linalg.cholesky(v["covs"][j])
        x = (v["modes"][j][:, None] + chol @ u).T
        d = np.stack(
            [
                np.einsum("ni,ij,nj->n", x - m, p, x - m)
                for m, p in zip(v["modes"], prec, strict=True)
            ]
        )
        own = np.argmin(d, axis=0) == j
        grid.append((x[own], skill_loglik_many(v["y"], v["lens"], x[own], gs_mode=0), chol))

    def lognorm(x, mu, sd):
        return (-0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)).sum(axis=1)

    for shift in (0.0, 0.15, -0.15):
        mu, sd = v["mu"] + shift, v["sd"] * (1 + shift)
        est = np.logaddexp.reduce(c + lognorm(nodes, mu, sd)) - np.log(len(nodes))
        parts = [
            np.logaddexp.reduce(ll + lognorm(x, mu, sd)) + np.log(np.linalg.det(chol))
            for x, ll, chol in grid
        ]
        ref = np.logaddexp.reduce(parts)
        # Importance sampling with ~1,000+ effective nodes: a relative error
        # of a few per cent in the integral, i.e. a few hundredths of a nat.
        assert abs(est - ref) < 0.1, (shift, est, ref)


@pytest.mark.slow
def test_mode_jumps_give_the_minor_mode_its_share(volume_sphere):
    """Every draw starts in the main mode; after the independence Metropolis
    steps the minor mode's share matches the importance-sampling share."""
    from bktbayes.modes import mode_jumps

    v = volume_sphere
    n = 6000
    x0 = np.tile(v["modes"][0], (n, 1))
    mean = np.tile(v["mu"], (n, 1))
    sd = np.tile(v["sd"], (n, 1))
    x, acc = mode_jumps(v["y"], v["lens"], x0, mean, sd, v["modes"], v["covs"], gs_mode=0, seed=2)
    assert 0.1 < acc.mean() < 0.9
    prec = [np.linalg.inv(cv) for cv in v["covs"]]
    d = np.stack(
        [np.einsum("ni,ij,nj->n", x - m, p, x - m) for m, p in zip(v["modes"], prec, strict=True)]
    )
    share = (np.argmin(d, axis=0) == 1).mean()
    # Binomial error of n draws plus the importance-sampling error, 4 sds.
    p = v["share"]
    tol = 4 * np.sqrt(p * (1 - p) / n + p * (1 - p) / v["ess"])
    assert abs(share - p) < tol, (share, p, tol)
    # The same seed, the same draws.
    x2, _ = mode_jumps(v["y"], v["lens"], x0, mean, sd, v["modes"], v["covs"], gs_mode=0, seed=2)
    np.testing.assert_array_equal(x, x2)


@pytest.mark.slow
def test_a_fit_collapses_volume_sphere_and_keeps_its_draws_consistent(volume_sphere):
    """A short fit of the bundled data: Volume Sphere is collapsed, its draws
    are consistent across raw, logit and probability, and the pointwise
    log-likelihood of its sequences is that of the draws' parameters."""
    from bktbayes.modes import skill_loglik_many

    m = volume_sphere["m"]
    df = __import__("bktbayes.data", fromlist=["load_events"]).load_events(
        BUNDLED / "assistments2009.parquet"
    )
    idata = m.fit(df, draws=60, tune=60, chains=2, random_seed=4, progressbar=False, warn=False)
    # 110 skills determine every population scale: the default step-size target.
    assert m.fit_info["target_accept"] == 0.8
    # Volume Sphere for its second mode; the two skills with fewer than 15
    # sequences and at least 200 responses (collapse_sparse).
    assert sorted(m.fit_info["collapsed"]) == [
        "Angles - Obtuse, Acute, and Right",
        "Polynomial Factors",
        "Volume Sphere",
    ]
    info = m.fit_info["collapsed"]["Volume Sphere"]
    assert info["reason"] == "multimodal" and info["valley"] >= 2.0
    assert info["modes"] == 2 and 0 < info["accept"] < 1
    for s in ("Angles - Obtuse, Acute, and Right", "Polynomial Factors"):
        info = m.fit_info["collapsed"][s]
        assert info["reason"] == "few long sequences" and 0 < info["accept"] < 1
        n_seq = int((df["skill"] == s).groupby(df["user_id"]).any().sum())
        assert n_seq < 15 and int((df["skill"] == s).sum()) >= 200
    for s in m.fit_info["collapsed"]:
        post = idata["posterior"].sel(skill=s)
        for g in ("init", "transit", "guess", "slip"):
            raw = (post[f"{g}_logit"] - post[f"mu_{g}"]) / post[f"sigma_{g}"]
            np.testing.assert_allclose(post[f"{g}_raw"], raw, rtol=1e-10, atol=1e-10)
    post = idata["posterior"].sel(skill="Volume Sphere")
    np.testing.assert_allclose(post["p_transit"], 1 / (1 + np.exp(-post["transit_logit"])))
    # Its sequences' pointwise log-likelihood, summed, for a few draws.
    ll = idata["log_likelihood"]["loglik"]
    dim = next(d for d in ll.dims if d not in ("chain", "draw"))
    mine = [k for k in ll[dim].values if str(k).endswith("|Volume Sphere")]
    assert len(mine) == len(volume_sphere["lens"])
    for chain, draw in [(0, 0), (1, 59)]:
        x = np.array(
            [
                [
                    float(post[f"{g}_logit"].sel(chain=chain, draw=draw))
                    for g in ("init", "transit", "guess", "slip")
                ]
            ]
        )
        ref = skill_loglik_many(volume_sphere["y"], volume_sphere["lens"], x, gs_mode=0)[0]
        got = float(ll.sel(chain=chain, draw=draw, **{dim: mine}).sum())
        assert got == pytest.approx(ref, rel=1e-10, abs=1e-8)


def test_skill_responses_and_nearest_mode():
    from bktbayes.modes import nearest_mode, skill_responses

    rng = np.random.default_rng(3)
    lens = rng.integers(1, 6, 9)
    y = rng.integers(0, 2, lens.sum()).astype(np.uint8)
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    seqs = np.array([7, 2, 4])
    got, got_lens = skill_responses(y, lens, seqs)
    np.testing.assert_array_equal(
        got, np.concatenate([y[starts[i] : starts[i] + lens[i]] for i in seqs])
    )
    np.testing.assert_array_equal(got_lens, lens[seqs])
    # Mahalanobis, not Euclidean: a wide mode far away can be the nearer.
    modes = np.array([[0.0, 0.0], [3.0, 0.0]])
    covs = np.array([np.eye(2) * 0.01, np.eye(2) * 25.0])
    assert list(nearest_mode(np.array([[0.05, 0.0], [1.0, 0.0]]), modes, covs)) == [0, 1]


@pytest.mark.slow
def test_collapse_plan_nodes_against_a_large_importance_sample(volume_sphere):
    """Every collapsed skill of the bundled build keeps just enough nodes for
    1,000 effective ones at the starting population; its fixed-node marginal
    likelihood agrees with an independent importance sample 20 times larger
    (other nodes, same proposal family) there and a population sd away."""
    from bktbayes.models import COLLAPSE_EFFECTIVE_NODES
    from bktbayes.modes import collapse_nodes

    m = volume_sphere["m"]
    plan = m._collapse
    start = m._start_modes()
    mu0, sd0 = start["prior_mean"], start["prior_sd"]
    assert len(plan["skills"]) == 3

    def est(nodes, c, mu, sd):
        z = (nodes - mu) / sd
        lw = c - 0.5 * (z**2).sum(axis=1) - np.log(sd).sum() - 2 * np.log(2 * np.pi)
        return np.logaddexp.reduce(lw) - np.log(len(c))

    for q, s in enumerate(plan["skills"]):
        nodes, c = plan["nodes"][q], plan["c"][q]
        y, lens = plan["data"][q]
        z = (nodes - mu0) / sd0
        lw = c - 0.5 * (z**2).sum(axis=1)
        w = np.exp(lw - lw.max())
        ess = w.sum() ** 2 / (w**2).sum()
        assert 0.9 * COLLAPSE_EFFECTIVE_NODES <= ess or len(c) == 4000, (s, ess, len(c))
        big_nodes, big_c = collapse_nodes(
            y, lens, plan["modes"][q], plan["covs"][q], gs_mode=0, n_nodes=80_000, seed=99
        )
        for shift in (0.0, 0.3, -0.3):
            mu, sd = mu0 + shift * sd0, sd0 * (1 + shift)
            # ~1,000 effective nodes: a relative error of ~3% in the
            # integral (hundredths of a nat); 20x more for the reference.
            assert abs(est(nodes, c, mu, sd) - est(big_nodes, big_c, mu, sd)) < 0.1, (s, shift)


def test_whitening_covariance_against_a_large_importance_sample(volume_sphere):
    """The whitening map's covariance per skill (partial centring) is the
    skill's posterior covariance given the starting population by importance
    sampling. Against an independent sample 20 times larger, the sds agree
    within 25% (the map's 2,000 nodes keep 128-1,100 effective ones on these
    skills: a sd's relative error of roughly 1 / sqrt(2 n_eff), 2-6%, more for
    heavy tails). Where the posterior is heavy-tailed the map is wider than
    the Laplace curvature's (guess of "Order of Operations" and "Range":
    1.83 and 1.86 times); collapsed skills keep their prior covariance."""
    from bktbayes.modes import collapse_nodes, skill_responses

    m = volume_sphere["m"]
    lap = m._start_cov
    cov = m._start_is_cov()
    assert cov.shape == lap.shape
    np.linalg.cholesky(cov)  # every skill's matrix positive definite
    for s in m._collapse["skills"]:
        np.testing.assert_array_equal(cov[s], lap[s])
    start = m._start_modes()
    correct, lens, seq_skill = m._sequences()
    skills = list(m._packed.skills)
    for name in ("Order of Operations +,-,/,* () positive reals", "Range", "Counting Methods"):
        s = skills.index(name)
        k = int(start["n_modes"][s])
        y, y_lens = skill_responses(correct, lens, np.flatnonzero(seq_skill == s))
        nodes, c = collapse_nodes(
            y,
            y_lens,
            start["logits"][s, :k],
            start["cov"][s, :k],
            gs_mode=0,
            n_nodes=40_000,
            seed=99,
        )
        z = (nodes - start["prior_mean"]) / start["prior_sd"]
        lw = c - 0.5 * (z**2).sum(axis=1)
        w = np.exp(lw - lw.max())
        w /= w.sum()
        ref_sd = np.sqrt(w @ (nodes - w @ nodes) ** 2)
        sd = np.sqrt(np.diag(cov[s]))
        np.testing.assert_allclose(sd, ref_sd, rtol=0.25, err_msg=name)
        if name != "Counting Methods":
            assert sd[2] > 1.4 * np.sqrt(lap[s, 2, 2]), name  # guess
