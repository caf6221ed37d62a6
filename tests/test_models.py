"""BKTModel: building, fitting with nutpie, diagnostics, export, save/load."""

import json
import subprocess
import sys
import warnings

import arviz as az
import numpy as np
import pandas as pd
import pytest

from bktbayes import models
from bktbayes.export import ExportError
from bktbayes.models import (
    CENTERED_MIN_LEARNING,
    CENTERED_MIN_OBS,
    BKTModel,
    ConvergenceWarning,
)
from bktbayes.ops import BKTLogLik, BKTPrefixLogLik, BKTSkillLogLik
from bktbayes.params import SCHEMA_VERSION, BKTParams, ParamTable
from bktbayes.simulate import simulate
from bktbayes.tracing import replay


def _expit(x):
    return float(1 / (1 + np.exp(-x)))


def _truth(n_skills, seed):
    rng = np.random.default_rng(seed)
    return ParamTable(
        {
            f"s{k}": BKTParams(
                _expit(rng.normal(-0.85, 0.5)),
                _expit(rng.normal(-2.0, 0.5)),
                _expit(rng.normal(-1.4, 0.4)),
                float(0.1 * np.exp(rng.normal(0, 0.3))),
            )
            for k in range(n_skills)
        }
    )


@pytest.fixture(scope="module")
def sim():
    truth = _truth(8, 0)
    return truth, simulate(truth, 250, seed=1)


@pytest.fixture(scope="module")
def fitted(sim):
    _, df = sim
    model = BKTModel()
    # 4 chains x 1,000 draws, the issue's own setting for the R-hat <= 1.01 bar:
    # the maximum of ~100 split R-hats fluctuates by about 0.005 at 500 draws
    # (chain means agreeing within 2 MCSE already gave 1.012), less at 1,000.
    idata = model.fit(df, draws=1000, tune=500, chains=4, random_seed=7, progressbar=False)
    return model, idata


def test_public_entry_point_is_lazy():
    code = (
        "import sys\n"
        "import bktbayes.tracing\n"
        "assert 'pymc' not in sys.modules\n"
        "from bktbayes import BKTModel\n"
        "assert 'pymc' not in sys.modules  # loaded when a model is built\n"
        "print(BKTModel.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "BKTModel"


def test_options_are_validated():
    with pytest.raises(ValueError, match="pooling"):
        BKTModel(pooling="partial")
    with pytest.raises(ValueError, match="student_effects"):
        BKTModel(student_effects="items")
    with pytest.raises(ValueError, match="unknown prior"):
        BKTModel(priors={"mu_nothing": {"mu": 0}})


def test_no_rows_is_an_error_not_a_prior_fit(sim):
    # An empty table would otherwise sample the prior and export it as a fit.
    from bktbayes.data import EventsError

    empty = sim[1].iloc[:0]
    with pytest.raises(EventsError, match="no rows"):
        BKTModel().build_model(empty)
    with pytest.raises(EventsError, match="no rows"):
        BKTModel().fast_estimate(empty)
    with pytest.raises(EventsError, match="no rows"):
        BKTModel().fit(empty, draws=10, tune=10, chains=1, progressbar=False)


def test_build_model_coords_and_prior_predictive(sim):
    import pymc as pm

    _, df = sim
    model = BKTModel(forgetting=True, student_effects="init").build_model(df)
    assert list(model.coords["skill"]) == sorted(df["skill"].unique())
    assert len(model.coords["user"]) == df["user_id"].nunique()
    with model, pytest.warns(UserWarning, match="Potentials"):
        prior = pm.sample_prior_predictive(draws=50, random_seed=1)
    p = prior["prior"]["p_slip"].values
    g = prior["prior"]["p_guess"].values
    assert np.all(g + p < 1)  # ordered guess/slip by construction
    t = prior["prior"]["p_transit"].values
    f = prior["prior"]["p_forget"].values
    assert np.all(t + f < 1)


def test_fast_estimate_is_fast_and_beats_the_prior_mean(sim):
    _, df = sim
    m = BKTModel()
    est = m.fast_estimate(df)
    assert est["converged"]
    # The optimum is better than the seed defaults by far.
    base = replay(df, BKTParams())
    y = df["correct"].to_numpy()
    ll_default = float(np.sum(np.log(np.where(y == 1, base.p_correct, 1 - base.p_correct))))
    assert est["loglik"] > ll_default + 100


@pytest.mark.slow
def test_pointwise_loglik_equals_serving_replay(sim, fitted):
    """The log_likelihood group (prefix-shared kernel) = the serving tracer's
    predictions under the same draw's parameters, summed per sequence."""
    _, df = sim
    _, idata = fitted
    post = idata["posterior"]
    ll = idata["log_likelihood"]["loglik"]
    y = df["correct"].to_numpy()
    for chain, draw in [(0, 0), (3, 999)]:
        table = ParamTable(
            {
                str(s): BKTParams(
                    *(
                        float(post[n].sel(chain=chain, draw=draw, skill=s))
                        for n in ("p_init", "p_transit", "p_guess", "p_slip")
                    )
                )
                for s in post["skill"].values
            }
        )
        pc = replay(df, table).p_correct
        lp = np.log(np.where(y == 1, pc, 1 - pc))
        ref = pd.Series(lp).groupby([df["user_id"].astype(str), df["skill"].astype(str)]).sum()
        got = ll.sel(chain=chain, draw=draw).to_series()
        got.index = pd.MultiIndex.from_tuples([tuple(k.split("|")) for k in got.index])
        got = got.reindex(ref.index)
        # Same maths in another order of operations: rounding only.
        np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_fit_recovers_parameters_and_converges(sim, fitted):
    truth, _ = sim
    model, idata = fitted
    for group in ("posterior", "sample_stats", "log_likelihood", "observed_data", "constant_data"):
        assert group in idata.children
    d = model.diagnostics
    assert d["ok"], d
    assert d["max_rhat"] <= 1.01 and d["divergences"] == 0
    # 8 skills, all centred: the population scales are too uncertain for the
    # bulk's step size near their lower wall.
    assert model.fit_info["target_accept"] == models.TARGET_ACCEPT_UNCERTAIN_SCALE
    post = idata["posterior"]
    # The reported figures are ArviZ's, over the same variables.
    names = [v for v in post.data_vars if not v.endswith(("_z", "_logit"))]
    ds = post.to_dataset()[names]
    ref_r = max(float(az.rhat(ds)[v].max()) for v in names)
    ref_t = min(float(az.ess(ds, method="tail")[v].min()) for v in names)
    assert d["max_rhat"] == pytest.approx(ref_r, rel=1e-9)
    assert d["min_ess_tail"] == pytest.approx(ref_t, rel=1e-9)
    covered = total = 0
    for name in ("p_init", "p_transit", "p_guess", "p_slip"):
        draws = post[name].stack(s=("chain", "draw")).transpose("skill", "s").values
        skills = [str(s) for s in post[name]["skill"].values]
        lo, hi = np.quantile(draws, [0.05, 0.95], axis=1)
        for i, s in enumerate(skills):
            total += 1
            covered += lo[i] <= getattr(truth[s], name) <= hi[i]
    # 90% intervals on 32 parameters: expected 28.8 covered (sd 1.7); the
    # issue's bar is 80%.
    assert covered / total >= 0.8, (covered, total)


@pytest.mark.slow
def test_perform_is_never_called_while_nutpie_samples(sim, monkeypatch):
    _, df = sim

    def boom(*args, **kwargs):
        raise AssertionError("object-mode fallback: BKTLogLik.perform called")

    monkeypatch.setattr(BKTLogLik, "perform", boom)
    monkeypatch.setattr(BKTSkillLogLik, "perform", boom)
    monkeypatch.setattr(BKTPrefixLogLik, "perform", boom)
    m = BKTModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        idata = m.fit(df.iloc[:3000], draws=30, tune=30, chains=1, random_seed=1, progressbar=False)
    assert idata["posterior"].sizes["draw"] == 30


@pytest.mark.slow
def test_export_round_trip_into_the_tracer(fitted, sim, tmp_path):
    _, df = sim
    model, idata = fitted
    table = model.export_params()
    path = table.to_json(tmp_path / "params.json")
    back = ParamTable.from_json(path)
    assert back == table
    assert back.metadata["forced"] is False
    assert back.metadata["config"]["pooling"] == "hierarchical"
    post = idata["posterior"]
    for s in back:
        assert back[s].p_init == pytest.approx(float(post["p_init"].sel(skill=s).mean()), abs=1e-12)
        assert back.stats[s].n_obs == int((df["skill"] == s).sum())
    # Filtering with the exported table equals filtering with posterior means.
    means = {
        s: BKTParams(
            *(
                float(post[k].sel(skill=s).mean())
                for k in ("p_init", "p_transit", "p_guess", "p_slip")
            )
        )
        for s in back
    }
    a = replay(df, back)
    b = replay(df, means)
    np.testing.assert_allclose(a.p_mastery, b.p_mastery, atol=1e-12)


@pytest.mark.slow
def test_export_refuses_failing_diagnostics_unless_forced(fitted):
    model, _ = fitted
    saved = model.diagnostics
    try:
        model.diagnostics = dict(saved, max_rhat=1.2, ok=False)
        with pytest.raises(ExportError, match="R-hat 1.200"):
            model.export_params()
        table = model.export_params(force=True)
        assert table.metadata["forced"] is True
    finally:
        model.diagnostics = saved


@pytest.mark.slow
def test_skill_modes_after_a_fit_uses_the_posterior_population(fitted):
    model, idata = fitted
    table = model.skill_modes()
    pop = table.attrs["population"]
    assert pop["source"] == "posterior means"
    assert pop["mu"]["transit"] == pytest.approx(float(idata["posterior"]["mu_transit"].mean()))
    assert list(table.columns[:4]) == ["skill", "mode", "share", "fit_share"]
    # Simulated skills of 250 students: any second mode found must come with
    # the fit's own share of draws near it, between 0 and 1.
    assert table["fit_share"].between(0, 1).all()


@pytest.mark.slow
def test_save_and_load(fitted, tmp_path):
    model, idata = fitted
    path = model.save(tmp_path / "fit")
    assert not list(path.rglob("*.pkl")) and not list(path.rglob("*.pickle"))
    back = BKTModel.load(path)
    assert back.config == model.config
    np.testing.assert_array_equal(
        back.idata["posterior"]["p_init"].values, idata["posterior"]["p_init"].values
    )
    assert back.export_params().to_dict()["skills"] == model.export_params().to_dict()["skills"]
    # A folder of format version 1 built "ordered" guess first: it loads with
    # that mapping (the logits it holds mean that), not today's slip-first one.
    meta_path = path / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    assert BKTModel.load(path).config.guess_slip == "ordered_guess_first"
    # A folder written before partial centring holds the binary rule's draws.
    # ... and one written before collapse_sparse, draws with those skills
    # sampled by NUTS.
    assert back.config.partial_centering and back.config.collapse_sparse
    del meta["config"]["partial_centering"]
    del meta["config"]["collapse_sparse"]
    meta["format_version"] = 2
    meta_path.write_text(json.dumps(meta))
    old = BKTModel.load(path).config
    assert not old.partial_centering and not old.collapse_sparse
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version"):
        BKTModel.load(path)


@pytest.mark.slow
def test_export_with_draws_serves_intervals(fitted, sim, tmp_path):
    _, df = sim
    model, _ = fitted
    table = model.export_params(n_draws=40)
    back = ParamTable.from_json(table.to_json(tmp_path / "p.json"))
    assert back.n_draws == 40 and back.to_dict()["schema_version"] == SCHEMA_VERSION
    m = replay(df, back, interval=0.9).mastery
    assert np.all(m["p_mastery_lower"] <= m["p_mastery_upper"])
    assert (m["p_mastery_upper"] - m["p_mastery_lower"]).max() > 0.0


@pytest.mark.slow
def test_student_effects_export_offsets(sim):
    _, df = sim
    small = df[df["user_id"] < 60]
    m = BKTModel(student_effects="init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m.fit(small, draws=200, tune=200, chains=2, random_seed=3, progressbar=False)
    table = m.export_params(force=True)
    assert set(table.students["init"]) == {str(u) for u in small["user_id"].unique()}
    # A known student's offset changes p_init; a new one gets the skill's value.
    u = str(small["user_id"].iloc[0])
    s = str(small["skill"].iloc[0])
    assert table.params_for(s, user=u).p_init != table[s].p_init
    assert table.params_for(s, user="new student") == table[s]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"forgetting": True},
        {"pooling": "none"},
        {"student_effects": "init"},
        {"student_effects": "init+transit", "forgetting": True},
    ],
)
def test_prefix_likelihood_equals_lockstep_and_scan_twin(sim, kw):
    # Per-skill models share response prefixes (the default likelihood); the
    # same model stepping every sequence, and its plain-scan twin, are the
    # references. With student effects the default is the student Op (gathers
    # and scatters inside its kernel); "lockstep" is then the per-sequence Op
    # with PyTensor gathering and scattering.
    _, df = sim
    sub = df[df["user_id"] < 80]
    ms = {}
    for lk in ("kernel", "lockstep", "scan"):
        # Whitened skill coordinates (the default with the kernel) are
        # another parametrisation: tested on their own below.
        m = BKTModel(**kw, whiten_skills=False)
        m._likelihood = lk
        ms[lk] = m.build_model(sub)
    rng = np.random.default_rng(3)
    ip = ms["kernel"].initial_point()
    pt_ = {k: v + rng.normal(0, 0.3, np.shape(v)) for k, v in ip.items()}
    ref = ms["scan"].compile_logp()(pt_)
    gref = ms["scan"].compile_dlogp()(pt_)
    for lk in ("kernel", "lockstep"):
        assert ms[lk].compile_logp()(pt_) == pytest.approx(ref, rel=1e-12)
        np.testing.assert_allclose(ms[lk].compile_dlogp()(pt_), gref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("forgetting", [False, True])
def test_whitened_skills_are_only_a_reparametrisation(sim, forgetting):
    """whiten_skills changes the sampler's coordinates, not the model: at
    any point the log density equals the plain model's at the mapped point
    plus the constant log-Jacobian, sum over skills of log det L_s."""
    import pymc as pm

    _, df = sim
    sub = df[df["user_id"] < 150]
    mw, mp = BKTModel(forgetting=forgetting), BKTModel(forgetting=forgetting, whiten_skills=False)
    modw, modp = mw.build_model(sub), mp.build_model(sub)
    w = mw._whiten
    assert w is not None and mp._whiten is None
    assert mw.fit_info["whitened_skills"] == int(w["mapped"].sum())
    assert "whitened_skills" not in mp.fit_info
    n_g = len(mw.config.groups)
    mapped = w["mapped"]
    assert mw.fit_info["centered"] == mp.fit_info["centered"]
    assert mapped.any()
    # A real map where every group is centred, the identity elsewhere.
    assert not np.allclose(w["chol"][mapped], np.eye(n_g))
    np.testing.assert_array_equal(
        w["chol"][~mapped], np.broadcast_to(np.eye(n_g), (int((~mapped).sum()), n_g, n_g))
    )
    zname = modw.rvs_to_values[modw["skill_raw"]].name
    ip = modw.initial_point()
    # The sampler's start (the fast estimate's point) is z = 0, and the map
    # inverts.
    start = mw._initial_points(mw._fast_estimate_cached())["skill_raw"]
    tr = modw.rvs_to_transforms[modw["skill_raw"]]
    np.testing.assert_allclose(tr.forward(start).eval(), 0.0, atol=1e-12)
    x = np.random.default_rng(4).normal(size=start.shape)
    np.testing.assert_allclose(tr.backward(tr.forward(x)).eval(), x, atol=1e-10)
    fw, fp = modw.compile_logp(), modp.compile_logp()
    const = np.log(np.diagonal(w["chol"], axis1=1, axis2=2)).sum()
    rng = np.random.default_rng(5)
    for _ in range(3):
        pw = {k: v + rng.normal(0, 0.5, np.shape(v)) for k, v in ip.items()}
        raw = w["shift"] + np.einsum("sij,sj->si", w["chol"], pw[zname])
        pp = {k: v for k, v in pw.items() if k != zname}
        for i, g in enumerate(mw.config.groups):
            pp[f"{g}_raw"] = raw[:, i]
        # Sums of ~1e4 terms of size ~1: rounding well below 1e-8.
        assert fw(pw) - fp(pp) == pytest.approx(const, abs=1e-8)
    with modw, pytest.warns(UserWarning, match="Potentials"):
        prior = pm.sample_prior_predictive(draws=20, random_seed=1)
    assert prior["prior"]["skill_raw"].shape[-2:] == (sub["skill"].nunique(), n_g)


def _logit_fn(model, group: str):
    """A group's skill logits as a function of a point (value variables)."""
    import pytensor

    (out,) = model.replace_rvs_by_values([model[f"{group}_logit"]])
    f = pytensor.function(model.value_vars, out, on_unused_input="ignore")
    return lambda point: f(*(point[v.name] for v in model.value_vars))


def test_partial_centering_is_only_a_reparametrisation(sim, monkeypatch):
    """partial_centering gives "auto"'s non-centred variables a weight w in
    [0, 1]: raw ~ N(w mu, sigma^w), logit = mu + sigma^(1 - w) (raw - w mu).
    The model in logits is unchanged: at the same logits, population and
    data, the log density differs from the binary model's by the log-Jacobians
    alone, sum (1 - w) log sigma against sum over non-centred log sigma."""

    _, df = sim
    sub = df[df["user_id"] < 60]  # 60 sequences per skill: none centred for init
    # 8 skills determine the population scales too loosely (sd of log sigma
    # >= 1 / sqrt(16)): the binary rule, the very same model, is kept.
    m8, m8b = BKTModel(whiten_skills=False), BKTModel(whiten_skills=False, partial_centering=False)
    mod8, mod8b = m8.build_model(sub), m8b.build_model(sub)
    assert m8._cweights is None and "partially_centered" not in m8.fit_info
    ip = mod8b.initial_point()
    assert mod8.compile_logp()(ip) == mod8b.compile_logp()(ip)
    # Lift the guard to test the weights on these data.
    monkeypatch.setattr(models, "PARTIAL_MAX_SD_LOG_SIGMA", np.inf)
    mq = BKTModel(partial_centering=True, whiten_skills=False)
    mb = BKTModel(whiten_skills=False, partial_centering=False)
    modq, modb = mq.build_model(sub), mb.build_model(sub)
    groups = mq.config.groups
    w = mq._cweights
    assert mb._cweights is None and "partially_centered" not in mb.fit_info
    n_skill = sub["skill"].nunique()
    # Weights in [0, 1], 1 exactly where the rule centres; some strictly between.
    assert w.shape == (n_skill, len(groups))
    assert ((w >= 0.0) & (w <= 1.0)).all()
    part = (w > 0.0) & (w < 1.0)
    assert part.any()
    assert mq.fit_info["partially_centered"] == {
        g: int(part[:, i].sum()) for i, g in enumerate(groups)
    }
    assert mq.fit_info["centered"] == mb.fit_info["centered"]
    # The sampler starts at each skill's mode given the starting population.
    sq = mq._initial_points(mq._fast_estimate_cached())
    modes = mq._start_modes()["logits"][:, 0]
    for i, g in enumerate(groups):
        mu, sigma, wi = sq[f"mu_{g}"], sq[f"sigma_{g}"], w[:, i]
        np.testing.assert_allclose(
            mu + sigma ** (1.0 - wi) * (sq[f"{g}_raw"] - wi * mu), modes[:, i], atol=1e-10
        )
    fq, fb = modq.compile_logp(), modb.compile_logp()
    ip = modb.initial_point()
    rng = np.random.default_rng(6)
    for _ in range(3):
        pb = {k: v + rng.normal(0, 0.4, np.shape(v)) for k, v in ip.items()}
        pq = dict(pb)
        const = 0.0
        for i, g in enumerate(groups):
            logit = _logit_fn(modb, g)(pb)
            mu, sigma = pb[f"mu_{g}"], np.exp(pb[f"sigma_{g}_log__"])
            pq[f"{g}_raw"] = w[:, i] * mu + (logit - mu) / sigma ** (1.0 - w[:, i])
            centred = w[:, i] == 1.0
            const += np.sum((1.0 - w[:, i]) * np.log(sigma)) - np.sum(~centred) * np.log(sigma)
        for g in groups:
            np.testing.assert_allclose(
                _logit_fn(modq, g)(pq),
                _logit_fn(modb, g)(pb),
                atol=1e-10,
            )
        # Sums of ~1e4 terms of size ~1: rounding well below 1e-8.
        assert fq(pq) - fb(pb) == pytest.approx(const, abs=1e-8)
    # With whitening every skill is mapped, by its importance-sampled
    # posterior covariance given the starting population (seeded, so the
    # same on every call) in raw coordinates; the start is z = 0.
    mw = BKTModel(partial_centering=True)
    modw = mw.build_model(sub)
    assert mw._whiten["mapped"].all()
    d = np.array([sq[f"sigma_{g}"] for g in groups]) ** (1.0 - w)
    chol = mw._whiten["chol"]
    np.testing.assert_allclose(
        np.einsum("sij,skj->sik", chol, chol) * d[:, :, None] * d[:, None, :],
        mw._start_is_cov(),
        rtol=1e-10,
    )
    start = mw._initial_points(mw._fast_estimate_cached())["skill_raw"]
    tr = modw.rvs_to_transforms[modw["skill_raw"]]
    np.testing.assert_allclose(tr.forward(start).eval(), 0.0, atol=1e-12)
    # Building again, on other data, starts afresh (a refit of the same
    # object once read the previous build's weights).
    sub2 = df[df["user_id"] < 45]
    fresh = BKTModel(partial_centering=True)
    again, ref = mw.build_model(sub2), fresh.build_model(sub2)
    np.testing.assert_array_equal(mw._cweights, fresh._cweights)
    p2 = ref.initial_point()
    assert again.compile_logp()(p2) == ref.compile_logp()(p2)


@pytest.mark.parametrize(
    "kw", [{"student_effects": "init"}, {"student_effects": "init+transit", "forgetting": True}]
)
def test_student_pointwise_loglik_equals_per_sequence_parameters(sim, kw):
    # The log_likelihood group of a student-effects model comes from skill
    # logits and student offsets per draw (draws_student_logp); the reference
    # forms (n_draws, n_seqs) parameter arrays and runs the per-sequence kernel.
    import pymc as pm

    from bktbayes.likelihood import draws_logp

    _, df = sim
    sub = df[df["user_id"] < 60]
    m = BKTModel(**kw)
    model = m.build_model(sub)
    with model, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the Potential's prior-predictive note
        post = pm.sample_prior_predictive(draws=40, random_seed=2)["prior"].to_dataset()
    pk = m._packed.packed
    data = (pk.lock_correct, pk.block_seq, pk.block_ev, pk.step_ptr, pk.step_count)
    got = np.empty((40, pk.n_seqs))
    m._student_loglik(post, data, got)
    nat = {k: np.ascontiguousarray(v) for k, v in m._seq_natural(post).items()}
    ref = np.empty_like(got)
    names = ("p_init", "p_transit", "p_guess", "p_slip")
    draws_logp(*data, *(nat[k] for k in names), nat.get("p_forget"), ref)
    assert np.isfinite(ref).all()
    # sigmoid(a + b) as 1 / (1 + e^-a e^-b) against the direct form: rounding only.
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


# --- item-level guess and slip (KT-IDEM) ----------------------------------


@pytest.fixture(scope="module")
def item_sim():
    truth = _truth(6, 5)
    df, tr = simulate(
        truth, 300, items_per_skill=8, item_sd_guess=0.8, item_sd_slip=0.6, seed=6,
        return_truth=True,
    )  # fmt: skip
    return df, tr


def test_item_model_logp_and_gradient_equal_the_scan_twin(item_sim):
    df, _ = item_sim
    sub = df[df["user_id"] < 60]
    a = BKTModel(item_effects=True, forgetting=True)
    b = BKTModel(item_effects=True, forgetting=True)
    b._likelihood = "scan"
    ma, mb = a.build_model(sub), b.build_model(sub)
    assert len(ma.coords["item"]) == sub.groupby(["skill", "item_id"]).ngroups
    rng = np.random.default_rng(0)
    pt_ = {k: v + rng.normal(0, 0.3, np.shape(v)) for k, v in ma.initial_point().items()}
    assert ma.compile_logp()(pt_) == pytest.approx(mb.compile_logp()(pt_), rel=1e-12)
    np.testing.assert_allclose(
        ma.compile_dlogp()(pt_), mb.compile_dlogp()(pt_), rtol=1e-8, atol=1e-9
    )


def test_item_effects_need_an_item_column(sim):
    _, df = sim
    with pytest.raises(ValueError, match="item_id"):
        BKTModel(item_effects=True).build_model(df)
    with pytest.raises(ValueError, match="item_min_obs"):
        BKTModel(item_effects=True, item_min_obs=0)


@pytest.mark.slow
def test_item_model_recovers_items_and_serves_them(item_sim, tmp_path, monkeypatch):
    from bktbayes.ops import BKTItemLogLik
    from bktbayes.tracing import BayesianKnowledgeTracer

    df, tr = item_sim

    def boom(*args, **kwargs):
        raise AssertionError("object-mode fallback: BKTItemLogLik.perform called")

    monkeypatch.setattr(BKTItemLogLik, "perform", boom)
    m = BKTModel(item_effects=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m.fit(df, draws=300, tune=300, chains=2, random_seed=2, progressbar=False)
    table = ParamTable.from_json(m.export_params(force=True).to_json(tmp_path / "p.json"))
    est = np.array([table.item_params[s][i] for s in tr.items for i in tr.items[s]])
    true = np.array([tr.items[s][i] for s in tr.items for i in tr.items[s]])
    # 48 items with ~700 responses each, true logit spreads 0.8 / 0.6: the
    # posterior means correlate ~0.96 with the truth here; a model without
    # items scores 0 by construction, so 0.8 separates the two with margin.
    assert np.corrcoef(est[:, 0], true[:, 0])[0, 1] > 0.8
    assert np.corrcoef(est[:, 1], true[:, 1])[0, 1] > 0.8
    assert table.metadata["config"]["item_effects"] is True
    # The batch replay applies the items; the scalar tracer, stepping with
    # params_for(skill, item=...), is the independent reference.
    res = replay(df, table)
    assert res.n_item_level == len(df)
    for user, skill in [(0, "s0"), (7, "s3"), (123, "s5")]:
        rows = df[(df["user_id"] == user) & (df["skill"] == skill)].sort_values("order")
        p = table.params_for(skill).p_init
        for idx, item, y in zip(rows.index, rows["item_id"], rows["correct"], strict=True):
            p = BayesianKnowledgeTracer(table.params_for(skill, item=item)).update(p, bool(y))
            assert res.p_mastery[idx] == pytest.approx(p, abs=1e-12)
    # Intervals carry the items' uncertainty: the exported item draws (schema
    # 4) replayed draw by draw, each as a plain table, give the same bounds.
    drawn = ParamTable.from_json(
        m.export_params(force=True, n_draws=20).to_json(tmp_path / "d.json")
    )
    assert drawn.n_draws == 20 and set(drawn.draws["items"]) == set(drawn.item_params)
    some = df[df["user_id"] < 40]
    res_iv = replay(some, drawn, interval=0.8)
    finals = []
    for d in range(20):
        cols = {s: drawn.draw_matrix(s) for s in drawn}
        one = ParamTable(
            {s: BKTParams(*(c[d] for c in cols[s])) for s in drawn},
            drawn.default,
            model="x",
            items={
                s: {i: {"p_guess": g[d], "p_slip": sl[d]} for i, (g, sl) in
                    ((i, drawn.item_draws(s, i)) for i in its)}
                for s, its in drawn.item_params.items()
            },
        )  # fmt: skip
        finals.append(replay(some, one).mastery["p_mastery"])
    lo, hi = np.quantile(np.array(finals), [0.1, 0.9], axis=0)
    np.testing.assert_allclose(res_iv.mastery["p_mastery_lower"], lo, atol=1e-12)
    np.testing.assert_allclose(res_iv.mastery["p_mastery_upper"], hi, atol=1e-12)
    # Unseen items (and a table without items) fall back to the skill's.
    renamed = df.assign(item_id=df["item_id"] + "-new")
    res_new = replay(renamed, table)
    skill_only = ParamTable(dict(table), table.default, model="x")
    assert res_new.n_item_level == 0
    np.testing.assert_array_equal(res_new.p_mastery, replay(df, skill_only).p_mastery)


def test_auto_rule_centres_transit_by_expected_learning_events():
    """Two data-rich skills (~2,400 responses each); in one almost every
    student starts mastered, so its responses say little about learning:
    its transit stays non-centred, every other group is centred."""
    truth = ParamTable(
        {"learners": BKTParams(0.3, 0.1, 0.2, 0.1), "masters": BKTParams(0.97, 0.1, 0.2, 0.1)}
    )
    df = simulate(truth, 200, mean_length=12, seed=3)
    m = BKTModel()
    m.build_model(df)
    skills = [str(s) for s in m._packed.skills]
    est = m.fast_estimate()["params"]
    # The count by hand: sum over sequences of (1 - P(L0)) (1 - (1 - P(T))^(n - 1)).
    lens = df.groupby(["user_id", "skill"], observed=True).size()
    ref = {s: 0.0 for s in skills}
    for (_, s), n in lens.items():
        k = skills.index(str(s))
        ref[str(s)] += (1 - est["p_init"][k]) * (1 - (1 - est["p_transit"][k]) ** (n - 1))
    el = m._expected_learning()
    np.testing.assert_allclose(el, [ref[s] for s in skills], rtol=1e-12)
    li, ma = skills.index("learners"), skills.index("masters")
    assert el[li] >= CENTERED_MIN_LEARNING > el[ma]
    pk = m._packed.packed
    n_seq = np.bincount(pk.seq_skill, minlength=2)
    n_obs = np.bincount(pk.seq_skill, weights=pk.seq_len, minlength=2)
    assert (n_obs >= CENTERED_MIN_OBS).all()
    assert m._centered_mask("transit", n_seq, n_obs).tolist() == [k == li for k in range(2)]
    for g in ("init", "guess", "slip"):
        assert m._centered_mask(g, n_seq, n_obs).all(), g
    assert BKTModel(parametrization="centered")._centered_mask("transit", n_seq, n_obs).all()


@pytest.mark.slow
def test_auto_parametrisation_mixes_on_sparse_data():
    # 8 skills x 40 students with ~6 responses per sequence: the data barely
    # inform each skill, so "auto" (here by its counts: 40 sequences, ~240
    # responses per skill) must choose non-centred groups; the data-rich
    # simulation above is fitted centred and passes every diagnostic.
    # Measured here: auto 1 divergence in 4,000 draws, R-hat 1.009, bulk ESS
    # ~600; all-centred 246 divergences, R-hat 1.025. Since session 17 (fit
    # compiled with fast-math off, target acceptance 0.9 for 8 skills; the
    # draws no longer depend on the compile cache): auto 0 divergences, R-hat
    # 1.006, slowest bulk ESS 402 (sigma_guess; 389 at 0.8), close to the bar.
    # The guess-first ordering: on data this sparse (~6 responses a sequence)
    # guess is better informed than slip, and the slip-first default mixes
    # sigma_guess worse (bulk ESS 263-369 at 4 x 1,000 over two seeds, against
    # 458-546 guess first; README, "Identifiability"). This test is about the
    # parametrisation rule, so it fixes the ordering that suits the data.
    truth = _truth(8, 0)
    df = simulate(truth, 40, mean_length=6, seed=4)
    fits = {}
    for par in ("auto", "centered"):
        m = BKTModel(parametrization=par, guess_slip="ordered_guess_first")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m.fit(df, draws=1000, tune=1000, chains=4, random_seed=5, progressbar=False)
        fits[par] = m
    auto, centred = fits["auto"], fits["centered"]
    assert sum(auto.fit_info["centered"].values()) <= 2, auto.fit_info["centered"]
    d = auto.diagnostics
    # The max over ~70 split R-hats at bulk ESS ~550 varies by about 0.005
    # between runs (1.009 and 1.013 seen here); 1.02 still fails a fit that
    # has not mixed, as the centred one (1.025). The minimum tail ESS (of the
    # 5%/95%-style indicators, noisier than bulk) was 374 and 536 with seeds
    # 5 and 6 of the same fit (sigma_slip, p_slip of the sparsest skill), so
    # its bar is 300.
    assert d["max_rhat"] <= 1.02 and d["min_ess_bulk"] >= 400, d
    assert d["min_ess_tail"] >= 300, d
    # A few divergences remain in a sparse hierarchical posterior even
    # non-centred (at most 0.1% of draws); the centred fit has ~50x more.
    assert d["divergences"] <= 4
    assert centred.diagnostics["divergences"] >= 10 * max(d["divergences"], 1)


_DRAWS_SCRIPT = """
import sys, numpy as np, pandas as pd
from bktbayes import BKTModel
m = BKTModel()
m.fit(pd.read_parquet(sys.argv[1]), draws=40, tune=40, chains=2, random_seed=3,
      progressbar=False, warn=False)
np.save(sys.argv[2], m.idata["posterior"]["mu_init"].values)
"""


@pytest.mark.slow
def test_same_seed_same_draws_cold_or_warm_cache(sim, tmp_path):
    """A fixed seed gives the same draws whether or not PyTensor's on-disk
    compile cache already holds the model. nutpie inlines a freshly compiled
    graph into its callback and re-optimises it, a cached one not; with
    PyTensor's numba fast-math the two rounded differently (draws apart by
    5e-8 after 80 iterations here, then drifting: on the sparse simulation
    bulk ESS 548 cold against 430 warm with one seed). Two processes share a
    new, empty cache directory, so the first compiles cold and the second
    finds its graph cached; without ``fit``'s ``numba__cache=False`` their
    draws differ."""
    import os
    import subprocess
    import sys

    _, df = sim
    data = tmp_path / "events.parquet"
    df.to_parquet(data)
    env = dict(os.environ)
    env["PYTENSOR_FLAGS"] = ",".join(
        f for f in (env.get("PYTENSOR_FLAGS", ""), f"base_compiledir={tmp_path / 'cache'}") if f
    )
    outs = []
    for k in range(2):
        out = tmp_path / f"draws{k}.npy"
        subprocess.run(
            [sys.executable, "-c", _DRAWS_SCRIPT, str(data), str(out)], check=True, env=env
        )
        outs.append(np.load(out))
    assert (tmp_path / "cache" / "numba").is_dir()  # the second process had a cache to use
    np.testing.assert_array_equal(outs[0], outs[1])


def test_target_accept_rule_and_validation(sim):
    """At most 12 skills cannot determine a population scale to within 0.2
    in log sigma even if their data fixed every logit (kappa = 1); 13 can."""
    assert models._sd_log_sigma(np.ones((12, 1)))[0] > models.PARTIAL_MAX_SD_LOG_SIGMA
    assert models._sd_log_sigma(np.ones((13, 1)))[0] <= models.PARTIAL_MAX_SD_LOG_SIGMA
    _, df = sim
    with pytest.raises(ValueError, match="target_accept"):
        BKTModel().fit(df, target_accept=1.0, progressbar=False)
    # No population, no wall: the default stays.
    m = BKTModel(pooling="none")
    m.build_model(df)
    assert m._target_accept == models.TARGET_ACCEPT
