"""Hierarchical BKT in PyMC: one model family with options.

``BKTModel(pooling="hierarchical" | "none", forgetting=False,
student_effects=None | "init" | "init+transit", item_effects=False,
parametrization="auto" | "centered" | "non_centered",
guess_slip="ordered" | "ordered_guess_first" | "bounded", priors=None,
item_min_obs=10, collapse_multimodal=True)``

Parameters live on the logit scale. Per skill ``s``:

* ``p_init = sigmoid(init[s])``, ``p_transit = sigmoid(transit[s])``;
* ``guess_slip="ordered"`` (default): ``1 - p_slip = sigmoid(slip[s])`` and
  ``p_guess = (1 - p_slip) sigmoid(guess[s])``, so ``p_guess + p_slip < 1``
  holds by construction and the mastered state cannot swap meaning. Slip comes
  first because it is what most sequences inform (every response after
  mastery), while guess rests on the few responses before it: built the other
  way round (``"ordered_guess_first"``: ``p_guess = sigmoid(guess[s])``,
  ``1 - p_slip = p_guess + (1 - p_guess) sigmoid(slip[s])``), a poorly
  informed guess drags the slip logit along (posterior correlation -0.95 on
  one bundled skill) and NUTS needed 30 leapfrog steps per draw on the
  bundled data instead of 16. ``"bounded"``: ``p_guess = 0.5 sigmoid(guess[s])`` and
  ``p_slip = 0.5 sigmoid(slip[s])`` (Baker, Corbett & Aleven 2008, against
  "degenerate" fits). The default is the ordering: on real data the 0.5 bound
  pins many guess parameters at the bound, costs predictive accuracy and
  mixes badly; the ordering alone already identifies the states;
* ``forgetting=True``: ``p_forget = (1 - p_transit) sigmoid(forget[s])``, so
  ``p_transit + p_forget < 1`` (the mastered state is the persistent one);
* ``student_effects``: per-student offsets added to ``init`` (and
  ``transit``), ``offset[u] = sigma_student * z[u]`` (Yudelson et al. 2013).
* ``item_effects=True`` (KT-IDEM, Pardos & Heffernan 2011): per (skill, item)
  offsets added to the skill's ``guess`` and ``slip`` logits,
  ``offset[i] ~ Normal(0, sigma_item)`` (centred for items with at least
  :data:`CENTERED_MIN_ITEM_OBS` responses, non-centred for the sparse rest),
  through the same ordering, so ``p_guess + p_slip < 1`` holds per item.
  Items with fewer than ``item_min_obs`` responses, and responses without an
  item, use the skill's guess and slip (so do items unseen in training when
  the fit is served).

Hierarchical pooling: each group ``init, transit, guess, slip, forget`` has a
population mean ``mu_*`` and scale ``sigma_*``. The parametrisation is chosen
per skill and group: centred (``x[s] ~ Normal(mu, sigma)``) for data-rich
skills, non-centred (``x[s] = mu + sigma z[s]``) for sparse ones. Rule of
``"auto"``: centred when the skill has at least :data:`CENTERED_MIN_SEQUENCES`
sequences (for ``init``, informed once per sequence) or
:data:`CENTERED_MIN_OBS` responses (the other groups); for ``transit`` also
at least :data:`CENTERED_MIN_LEARNING` expected learning events, since a
skill whose students mostly start mastered says little about learning
however many responses it has.

Multimodal skills (``collapse_multimodal=True``, the default, per-skill
hierarchical models): a skill whose posterior given the population has a
second mode behind a valley of at least :data:`COLLAPSE_MIN_VALLEY` nats
(BKT's identifiability problem; NUTS crosses such valleys too rarely to
weigh the modes) enters the likelihood with its logits integrated out by
importance sampling with fixed nodes, and each draw's logits for it are
then drawn from their conditional given that draw's population
(:mod:`bktbayes.modes`). Its logits are non-centred. Skills with fewer
than :data:`COLLAPSE_MAX_SEQUENCES` sequences but at least
:data:`COLLAPSE_MIN_RESPONSES` responses are collapsed the same way
(``collapse_sparse=True``, the default): a handful of students with long
records make the posterior a lumpy, heavy-tailed mixture over their hidden
histories, which NUTS explores slowly.

Whitened skill coordinates (``whiten_skills=True``, the default, per-skill
hierarchical models): the skills' variables are one ``skill_raw`` matrix
(skill x group; ``*_raw`` are its columns) sampled through a fixed affine
map per skill, ``raw = start + L z``, with ``L L^T`` the Laplace covariance
of the skill's variables given the starting population, for skills centred
in every group (the identity elsewhere). NUTS's diagonal mass matrix cannot
undo the correlations between a skill's guess, slip and init; the map does.
The model is unchanged; only the sampler's coordinates differ.

Partial centring (``partial_centering=True``, the default, per-skill
hierarchical models with ``"auto"``): a variable the rule leaves non-centred
gets a weight ``w`` in [0, 1], ``raw ~ Normal(w mu, sigma^w)`` and
``logit = mu + sigma^(1 - w) (raw - w mu)`` (``w = 1`` centred, ``w = 0``
non-centred), ``w`` set by how much of the prior's variance the skill's data
remove (Laplace approximation at its mode given the starting population).
A sparse skill whose data still inform its slip no longer ties ``mu_slip``
to its ``raw``. Every skill then starts at that mode and is whitened by its
posterior covariance given the starting population, by importance sampling
(the Laplace curvature is too narrow where the posterior is skewed or
heavy-tailed: :meth:`BKTModel._start_is_cov`). It applies when every
group's population scale is well determined
(:data:`PARTIAL_MAX_SD_LOG_SIGMA`, at least 13 skills) and some weight is
strictly partial; otherwise the binary rule's model is built unchanged, and
where some group's scale is that poorly determined NUTS
adapts its step size to a target acceptance of 0.9 instead of 0.8
(:data:`TARGET_ACCEPT_UNCERTAIN_SCALE`: with few skills the posterior spans
a wide range of sigma, and centred skills' wall in log sigma comes within
the trajectories' reach).

Fits compile the model with PyTensor's numba fast-math off, so that one seed
gives the same draws whether or not PyTensor's compile cache holds the model.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .data import EventsError, PackedEvents, pack_events
from .likelihood import (
    LIKELIHOOD_BLOCK_SIZE,
    draws_logp,
    draws_logp_items,
    draws_prefix_logp,
    draws_student_logp,
)
from .packing import pack_codes
from .params import jsonable

__all__ = [
    "CENTERED_MIN_ITEMS",
    "CENTERED_MIN_ITEM_OBS",
    "CENTERED_MIN_LEARNING",
    "CENTERED_MIN_OBS",
    "CENTERED_MIN_SEQUENCES",
    "DEFAULT_PRIORS",
    "BKTModel",
    "ConvergenceWarning",
]

GROUPS = ("init", "transit", "guess", "slip", "forget")
GUESS_SLIP = ("ordered", "ordered_guess_first", "bounded")
#: Version of the folder :meth:`BKTModel.save` writes (2: "ordered" is slip
#: first; folders of version 1 load with their guess-first ordering).
MODEL_FORMAT_VERSION = 2

#: "auto" parametrisation: centred for skills with at least this many sequences
#: (init group) or responses (other groups).
CENTERED_MIN_SEQUENCES = 100
CENTERED_MIN_OBS = 1500
#: ... and, for transit, at least this many expected learning events: under
#: the skill's per-skill maximum-likelihood parameters, the expected number of
#: sequences that start unmastered and learn before their last response,
#: sum over sequences of (1 - P(L0)) (1 - (1 - P(T))^(n - 1)). On the logit
#: scale a rate's Fisher information is about the number of events it
#: produces, so this counts what the data say about the skill's transit.
#: (On the bundled data "Volume Sphere", 1,706 responses but P(L0) 0.92 and
#: 2.8 expected learning events, mixed badly centred: R-hat 1.12 in one run.)
CENTERED_MIN_LEARNING = 10.0
# Skills whose posterior, given the population, has a second mode at least
# this many nats above the lowest point of the straight segment to the main
# mode are collapsed (BKTModel's ``collapse_multimodal``). On the bundled
# data NUTS crossed valleys of 0.04-0.44 nats freely (the fit's share of
# draws near each mode matched the importance-sampling share within 2
# points) and Volume Sphere's 4.2 not at all or for hundreds of draws
# (README, "A second mode").
COLLAPSE_MIN_VALLEY = 2.0
# ... and whose density there is within this many nats of the main mode's
# (further down, a mode holds a negligible share: "Counting Methods" on the
# bundled data has one 38 nats down, with no importance weight).
COLLAPSE_MAX_DROP = 12.0
#: ``collapse_sparse``: skills with fewer sequences than this and at least
#: :data:`COLLAPSE_MIN_RESPONSES` responses are collapsed. On the bundled
#: data "Polynomial Factors" (13 sequences, 392 responses) and "Angles -
#: Obtuse, Acute, and Right" (11, 305) held the worst R-hat in two fits of
#: seven (1.0108, 1.0122: one chain's stretch in a heavy tail); collapsed,
#: 1.0065 and 1.0075, and neither skill is among any seed's worst (README,
#: "Few long sequences").
COLLAPSE_MAX_SEQUENCES = 15
#: ... and with at least this many responses: below it a skill's posterior
#: is mostly its prior given the population, which NUTS samples well (the
#: bundled data's ten such skills: largest logit R-hat 1.0032-1.0081 over
#: seven fits).
COLLAPSE_MIN_RESPONSES = 200
#: A collapsed skill keeps as many of its 4,000 importance-sampling nodes
#: as give this many effective nodes (Kish's n_eff of the weights) at the
#: starting population: a relative error of about 3% in its marginal
#: likelihood, hundredths of a nat. On the bundled data Volume Sphere keeps
#: 3,675, the two skills of few long sequences 1,833 and 2,031.
COLLAPSE_EFFECTIVE_NODES = 1000
#: Importance-sampling nodes per skill for the whitening map's covariance
#: (partial centring; :meth:`BKTModel._start_is_cov`).
WHITEN_IS_NODES = 2000
# Nodes a collapsed skill's draws are first resampled from (of the 4,000).
_SIR_NODES = 512
#: ``partial_centering`` applies when, in every group, the skills determine
#: the population scale to within this sd of log sigma (normal-model Fisher
#: information at the start, sum of 2 kappa^2 over skills). The weights are
#: tuned to the starting sigma and hold while the posterior's stays near it.
#: At most 1 / sqrt(2 n_skills), so at least 13 skills are needed; the
#: bundled data give 0.08, the tests' 8-skill simulations 0.27-0.50 (on the
#: sparse one, partial weights gave 89-178 divergences in 4,000 draws
#: against 1-3 for the binary rule).
PARTIAL_MAX_SD_LOG_SIGMA = 0.2
#: ... and for item offsets, centred for items with at least this many responses.
CENTERED_MIN_ITEM_OBS = 200
#: ... and with item effects, a skill's guess and slip are centred only if it
#: has at least this many modelled items.
CENTERED_MIN_ITEMS = 20


#: NUTS's target acceptance rate (nutpie's and PyMC's default), which sets
#: the step size its adaptation settles on ...
TARGET_ACCEPT = 0.8
#: ... raised to this where some group's population scale is poorly
#: determined (sd of log sigma above :data:`PARTIAL_MAX_SD_LOG_SIGMA`, always
#: so with at most 12 skills). Its posterior then spans a wide range of
#: sigma, over which the skills' geometry changes: each centred skill adds
#: ``-log sigma - (x - mu)^2 / (2 sigma^2)``, a wall in log sigma whose
#: curvature grows as ``1 / sigma^2`` (8 skills: 4.5 times the mode's 3 sd
#: down), and trajectories run at the bulk's step size diverge there. On the
#: tests' recovery simulation (8 skills x 250 students, every skill centred,
#: 4 x (500 + 1,000), seeds 1-11) 4 of 22 fits had one divergence at 0.8,
#: each below ``sigma_init``'s 1% quantile; at 0.9, 0 of 11 (10.5 leapfrog
#: steps per draw instead of about 7, bulk ESS 2,000-3,000). The bundled
#: data (0.08) keep 0.8.
TARGET_ACCEPT_UNCERTAIN_SCALE = 0.9


def _sd_log_sigma(kappa: np.ndarray) -> np.ndarray:
    """Posterior sd of each group's log population scale implied by the
    skills' ``kappa`` (skill x group): in the normal model each skill
    carries Fisher information ``2 kappa^2`` about log sigma. Shape (group,)."""
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(2.0 * (np.asarray(kappa, float) ** 2).sum(axis=0))


def compile_flags():
    """The PyTensor configuration :meth:`BKTModel.fit` compiles the model
    under (a context manager): numba fast-math off.

    PyTensor compiles numba functions with fast-math by default. nutpie
    links the model's into its callback, where a freshly compiled graph is
    inlined and re-optimised but one loaded from PyTensor's cache is not:
    with fast-math the two rounded differently, and one seed gave different
    draws on a cold and a warm cache
    (``test_same_seed_same_draws_cold_or_warm_cache``). Compiling afresh
    every time instead would cost 35 s against 7-12 s on the bundled data;
    strict arithmetic costs about 1.6% per gradient.
    """
    import pytensor

    return pytensor.config.change_flags(numba__fastmath=False)


def _logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


# Prior means match the seed card's defaults (0.3, 0.09, 0.2, 0.1) and a small
# forgetting rate; the scales allow any plausible value while keeping the
# logits away from numerically meaningless extremes.
DEFAULT_PRIORS: dict[str, dict[str, float]] = {
    # population mean of each group's logit: Normal(mu, sd)
    "mu_init": {"mu": _logit(0.3), "sigma": 1.5},
    "mu_transit": {"mu": _logit(0.09), "sigma": 1.5},
    # ordered: 1 - slip = sigmoid(x_slip), guess = (1 - slip) sigmoid(x_guess)
    "mu_guess": {"mu": _logit(0.2 / 0.9), "sigma": 1.0},
    "mu_slip": {"mu": _logit(0.9), "sigma": 1.0},
    "mu_forget": {"mu": -3.0, "sigma": 1.5},
    # population scale of each group: HalfNormal(sigma)
    "sigma_init": {"sigma": 1.0},
    "sigma_transit": {"sigma": 1.0},
    "sigma_guess": {"sigma": 0.75},
    "sigma_slip": {"sigma": 0.75},
    "sigma_forget": {"sigma": 1.0},
    # student offsets: sigma_student_* ~ HalfNormal(sigma)
    "sigma_student_init": {"sigma": 1.0},
    "sigma_student_transit": {"sigma": 0.5},
    # item offsets on the guess and slip logits: sigma_item_* ~ HalfNormal(sigma)
    "sigma_item_guess": {"sigma": 0.5},
    "sigma_item_slip": {"sigma": 0.5},
}

# ordered_guess_first: 1 - slip = guess + (1 - guess) sigmoid(x); x = 1.95
# gives slip 0.1 at guess 0.2
_GUESS_FIRST_MU = {
    "mu_guess": {"mu": _logit(0.2), "sigma": 1.0},
    "mu_slip": {"mu": 1.95, "sigma": 1.0},
}

_BOUNDED_MU = {
    "mu_guess": {"mu": _logit(0.4), "sigma": 1.0},
    "mu_slip": {"mu": _logit(0.2), "sigma": 1.0},
}


def _require_rows(events: pd.DataFrame) -> None:
    # A model of no data samples its prior and exports it as if fitted.
    if len(events) == 0:
        raise EventsError("events has no rows: nothing to fit")


def _gs_modes() -> dict[str, int]:
    from .likelihood import GS_BOUNDED, GS_GUESS_FIRST, GS_ORDERED

    return {"ordered": GS_ORDERED, "ordered_guess_first": GS_GUESS_FIRST, "bounded": GS_BOUNDED}


class ConvergenceWarning(UserWarning):
    """A fit's diagnostics fail the thresholds (R-hat, ESS, divergences)."""


def _skill_affine(shift: np.ndarray, chol: np.ndarray):
    """A fixed affine map of each skill's sampled variables (one row of
    ``shift``, one lower-triangular block of ``chol``), as a PyMC transform:
    the sampler moves ``z`` with ``raw = shift + chol @ z`` per skill.

    Parameters
    ----------
    shift : float64 array, shape (n_skills, n_groups)
    chol : float64 array, shape (n_skills, n_groups, n_groups)
    """
    import pytensor.tensor as pt
    from pymc.logprob.transforms import Transform

    chol_inv = np.linalg.inv(chol)
    log_det = np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)

    class SkillAffine(Transform):
        name = "skill_affine"
        ndim_supp = 1

        def forward(self, value, *inputs):
            return (pt.as_tensor(chol_inv) * (value - shift)[:, None, :]).sum(axis=-1)

        def backward(self, value, *inputs):
            return shift + (pt.as_tensor(chol) * value[:, None, :]).sum(axis=-1)

        def log_jac_det(self, value, *inputs):
            # Constant: one term per skill (the logp is summed over groups).
            return pt.zeros_like(value[:, 0]) + log_det

    return SkillAffine()


@dataclass(frozen=True)
class ModelConfig:
    pooling: Literal["hierarchical", "none"] = "hierarchical"
    forgetting: bool = False
    student_effects: Literal["init", "init+transit"] | None = None
    item_effects: bool = False
    parametrization: Literal["auto", "centered", "non_centered"] = "auto"
    guess_slip: Literal["ordered", "ordered_guess_first", "bounded"] = "ordered"
    priors: dict[str, dict[str, float]] = field(default_factory=dict)
    item_min_obs: int = 10
    collapse_multimodal: bool = True
    whiten_skills: bool = True
    partial_centering: bool = True
    collapse_sparse: bool = True

    def __post_init__(self) -> None:
        if self.pooling not in ("hierarchical", "none"):
            raise ValueError(f"pooling must be 'hierarchical' or 'none', got {self.pooling!r}")
        if self.student_effects not in (None, "init", "init+transit"):
            raise ValueError(
                "student_effects must be None, 'init' or 'init+transit', "
                f"got {self.student_effects!r}"
            )
        if self.parametrization not in ("auto", "centered", "non_centered"):
            raise ValueError(f"unknown parametrization {self.parametrization!r}")
        if self.guess_slip not in GUESS_SLIP:
            raise ValueError(f"guess_slip must be one of {GUESS_SLIP}, got {self.guess_slip!r}")
        if isinstance(self.item_min_obs, bool) or not isinstance(self.item_min_obs, int):
            raise ValueError(f"item_min_obs must be an integer, got {self.item_min_obs!r}")
        if self.item_min_obs < 1:
            raise ValueError(f"item_min_obs must be at least 1, got {self.item_min_obs}")
        bad = sorted(set(self.priors) - set(DEFAULT_PRIORS))
        if bad:
            raise ValueError(f"unknown prior(s) {bad}; known: {sorted(DEFAULT_PRIORS)}")

    @property
    def groups(self) -> tuple[str, ...]:
        return GROUPS if self.forgetting else GROUPS[:4]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def natural_params(logits: Mapping[str, np.ndarray], guess_slip: str) -> dict[str, np.ndarray]:
    """Map logit-scale group values to the five probabilities (numpy).

    The same transformation as the PyMC model, for exports and fast estimates.
    """
    out = {
        "p_init": _sigmoid(logits["init"]),
        "p_transit": _sigmoid(logits["transit"]),
    }
    if guess_slip == "ordered":
        out["p_slip"] = _sigmoid(-logits["slip"])
        out["p_guess"] = _sigmoid(logits["slip"]) * _sigmoid(logits["guess"])
    elif guess_slip == "ordered_guess_first":
        g = _sigmoid(logits["guess"])
        out["p_guess"] = g
        out["p_slip"] = (1.0 - g) * _sigmoid(-logits["slip"])
    else:
        out["p_guess"] = 0.5 * _sigmoid(logits["guess"])
        out["p_slip"] = 0.5 * _sigmoid(logits["slip"])
    if "forget" in logits:
        out["p_forget"] = (1.0 - out["p_transit"]) * _sigmoid(logits["forget"])
    else:
        out["p_forget"] = np.zeros_like(out["p_init"])
    return out


class BKTModel:
    """Bayesian Knowledge Tracing as a marginalised HMM in PyMC.

    Parameters
    ----------
    pooling : {"hierarchical", "none"}
        Partial pooling of skill parameters (default) or independent skills.
    forgetting : bool
        Add ``p_forget``.
    student_effects : {None, "init", "init+transit"}
        Per-student logit offsets on ``p_init`` (and ``p_transit``).
    item_effects : bool
        Item-level guess and slip (KT-IDEM), partially pooled; needs the
        events' ``item_id`` column.
    parametrization : {"auto", "centered", "non_centered"}
        Of the hierarchical skill parameters (see the module docstring).
    guess_slip : {"ordered", "ordered_guess_first", "bounded"}
        Identifiability constraint on guess and slip (see the module
        docstring; "ordered" builds slip first, and mixes better).
    priors : mapping, optional
        Overrides of :data:`DEFAULT_PRIORS` entries, e.g.
        ``{"mu_transit": {"mu": -1.0, "sigma": 1.0}}``.
    item_min_obs : int
        With ``item_effects``, items with fewer responses share their skill's
        guess and slip (default 10: below that an offset is mostly its prior,
        and every item adds two parameters to sample and store).
    collapse_multimodal : bool
        Per-skill hierarchical models: a skill whose posterior, given the
        population, has modes a deep valley apart (at least
        ``COLLAPSE_MIN_VALLEY`` nats; :func:`bktbayes.modes.skill_modes` at
        the sampler's starting population) is not sampled by NUTS, which
        crosses such valleys rarely. Its logits are integrated out of the
        likelihood by importance sampling with fixed nodes
        (:func:`bktbayes.modes.collapse_nodes`), and after sampling each draw
        gets the skill's logits drawn from their conditional posterior given
        that draw's population (nodes resampled, then independence
        Metropolis steps, :func:`bktbayes.modes.mode_jumps`). The skills and
        what they hold are in ``fit_info["collapsed"]``.
    whiten_skills : bool
        Per-skill hierarchical models: sample the skills' variables (one
        ``skill_raw`` matrix, skill x group) through a fixed affine map per
        skill, ``raw = start + L z``, ``L L^T`` the Laplace covariance of the
        skill's variables given the starting population (likelihood Hessian
        at the start), for skills centred in every group; the others keep
        their coordinates. Same model, other sampler coordinates: on the
        bundled data the worst-mixing coupled skills ("Range", "Equation
        Solving More Than Two Steps") mixed no better through the diagonal
        mass matrix alone.
    partial_centering : bool
        With ``parametrization="auto"`` (per-skill hierarchical models):
        partially centre the variables the rule leaves non-centred, each
        with a weight from how much its skill's data inform it (see the
        module docstring), start every skill at its mode given the starting
        population and whiten every skill. Applies only where at least 13
        skills determine the population scales well; otherwise the binary
        rule's model. On the bundled data the population means' bulk ESS
        rose from 580-2,790 to 3,450-5,070 and the skills' tenth-percentile
        ESS by 30-80% (README, "Partial centring").
    collapse_sparse : bool
        Per-skill hierarchical models: also collapse (as
        ``collapse_multimodal`` does) skills with fewer than
        :data:`COLLAPSE_MAX_SEQUENCES` sequences but at least
        :data:`COLLAPSE_MIN_RESPONSES` responses. With so few students,
        each with a long record, the skill's posterior is a mixture over
        a handful of students' hidden histories: lumpy and heavy-tailed,
        which NUTS explores slowly (README, "Few long sequences").

    Examples
    --------
    >>> model = BKTModel()                         # doctest: +SKIP
    >>> idata = model.fit(events, random_seed=1)   # doctest: +SKIP
    >>> table = model.export_params()              # doctest: +SKIP
    """

    def __init__(
        self,
        pooling: Literal["hierarchical", "none"] = "hierarchical",
        forgetting: bool = False,
        student_effects: Literal["init", "init+transit"] | None = None,
        item_effects: bool = False,
        parametrization: Literal["auto", "centered", "non_centered"] = "auto",
        guess_slip: Literal["ordered", "ordered_guess_first", "bounded"] = "ordered",
        priors: Mapping[str, Mapping[str, float]] | None = None,
        item_min_obs: int = 10,
        collapse_multimodal: bool = True,
        whiten_skills: bool = True,
        partial_centering: bool = True,
        collapse_sparse: bool = True,
    ) -> None:
        self.config = ModelConfig(
            pooling=pooling,
            forgetting=forgetting,
            student_effects=student_effects,
            item_effects=item_effects,
            parametrization=parametrization,
            guess_slip=guess_slip,
            priors={k: dict(v) for k, v in (priors or {}).items()},
            item_min_obs=item_min_obs,
            collapse_multimodal=collapse_multimodal,
            whiten_skills=whiten_skills,
            partial_centering=partial_centering,
            collapse_sparse=collapse_sparse,
        )
        self.idata = None
        self._items: dict[str, np.ndarray] | None = None
        self.model = None
        self._packed: PackedEvents | None = None
        self._prefix = None  # the prefix layout of per-skill models (build_model)
        self._collapse: dict[str, Any] | None = None  # collapsed skills (build_model)
        self._whiten: dict[str, np.ndarray] | None = None  # per-skill affine map (build_model)
        # Centring weights (skill x group, 1 centred, 0 non-centred) where
        # some are partial (build_model); None where the mask says all.
        self._cweights: np.ndarray | None = None
        self._modes0: dict | None = None  # skills' modes given the starting population
        self._start_cov: np.ndarray | None = None  # Laplace covariances there (partial centring)
        self._target_accept = TARGET_ACCEPT  # NUTS's, as build_model chose it
        self._prefix_keep: np.ndarray | None = None
        self._fast = None  # the fast estimate of the packed data (build_model)
        self.diagnostics: dict[str, Any] | None = None
        self.fit_info: dict[str, Any] = {}
        # "kernel" (the numba Ops; per-skill models share prefixes), "lockstep"
        # (per-skill models stepping every sequence) or "scan" (the slow
        # pytensor.scan twin); the last two for benchmarks and tests only.
        self._likelihood = "kernel"

    def __repr__(self) -> str:
        c = self.config
        return (
            f"BKTModel(pooling={c.pooling!r}, forgetting={c.forgetting}, "
            f"student_effects={c.student_effects!r}, item_effects={c.item_effects}, "
            f"parametrization={c.parametrization!r}, guess_slip={c.guess_slip!r})"
        )

    # ------------------------------------------------------------------
    def prior(self, name: str) -> dict[str, float]:
        """The prior settings in force for ``name`` (defaults plus overrides)."""
        base = dict(DEFAULT_PRIORS[name])
        if self.config.guess_slip == "bounded" and name in _BOUNDED_MU:
            base = dict(_BOUNDED_MU[name])
        if self.config.guess_slip == "ordered_guess_first" and name in _GUESS_FIRST_MU:
            base = dict(_GUESS_FIRST_MU[name])
        base.update(self.config.priors.get(name, {}))
        return base

    def _centered_mask(self, group: str, n_seq: np.ndarray, n_obs: np.ndarray) -> np.ndarray:
        mask = self._centered_mask_rule(group, n_seq, n_obs)
        if self._collapse is not None and group != "item":
            # A collapsed skill's logits carry their prior only (the data
            # enter through the marginal): non-centred, they are independent
            # of the population scale and NUTS sees no funnel.
            mask = mask & ~self._collapse["mask"]
        return mask

    def _centered_mask_rule(self, group: str, n_seq: np.ndarray, n_obs: np.ndarray) -> np.ndarray:
        p = self.config.parametrization
        if p == "centered":
            return np.ones(n_seq.shape, dtype=bool)
        if p == "non_centered":
            return np.zeros(n_seq.shape, dtype=bool)
        if group == "init":
            return n_seq >= CENTERED_MIN_SEQUENCES
        if group == "item":
            return n_obs >= CENTERED_MIN_ITEM_OBS
        if group == "transit":
            base = n_obs >= CENTERED_MIN_OBS
            if base.any():
                base &= self._expected_learning() >= CENTERED_MIN_LEARNING
            return base
        if group in ("guess", "slip") and self._items is not None:
            # With item offsets, a skill's guess and slip are the centre of its
            # items' and are informed by how many items it has, not by its
            # responses.
            n_items = np.bincount(
                self._items["item_skill"][: int(self._items["n_real"])], minlength=n_obs.size
            )
            return (n_obs >= CENTERED_MIN_OBS) & (n_items >= CENTERED_MIN_ITEMS)
        return n_obs >= CENTERED_MIN_OBS

    def _expected_learning(self) -> np.ndarray:
        """Expected learning events per skill under the fast estimate (see
        :data:`CENTERED_MIN_LEARNING`), shape (n_skills,)."""
        est = self._fast_estimate_cached()
        pk = self._packed.packed
        sk = pk.seq_skill
        p0 = est["params"]["p_init"][sk]
        tr = est["params"]["p_transit"][sk]
        el = (1.0 - p0) * -np.expm1((pk.seq_len - 1) * np.log1p(-tr))
        return np.bincount(sk, weights=el, minlength=len(self._packed.skills))

    def _fast_estimate_cached(self) -> dict:
        """The fast estimate of the packed data, computed once per build."""
        if self._fast is None:
            self._fast = self.fast_estimate()
        return self._fast

    def _item_index(self, events: pd.DataFrame, pe: PackedEvents) -> dict[str, np.ndarray]:
        """Items of the item-level model: (skill, item) pairs with at least
        ``item_min_obs`` responses, then one skill-level entry per skill.

        Returns ``ev_item`` (per response, lockstep order), ``item_skill``,
        ``skill`` and ``item`` labels of the modelled pairs, and ``n_obs``.
        """
        if pe.item_code is None:
            raise ValueError("item_effects=True needs an 'item_id' column in the events")
        n_skill = len(pe.skills)
        s_codes = pd.factorize(events["skill"], sort=True)[0].astype(np.int64)
        ic = pe.item_code
        n_glob = len(pe.items)
        key = s_codes * (n_glob + 1) + (ic + 1)  # item code -1 (missing) -> 0
        pairs, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
        pair_skill = pairs // (n_glob + 1)
        pair_item = pairs % (n_glob + 1) - 1
        real = (pair_item >= 0) & (cnt >= self.config.item_min_obs)
        idx = np.full(pairs.size, -1, dtype=np.int64)
        idx[real] = np.arange(int(real.sum()))
        n_real = int(real.sum())
        row_item = idx[inv]
        row_item = np.where(row_item >= 0, row_item, n_real + s_codes)
        return {
            "row_item": row_item.astype(np.int64),
            "ev_item": pe.packed.to_lockstep(row_item).astype(np.int64),
            "item_skill": np.concatenate([pair_skill[real], np.arange(n_skill)]).astype(np.int64),
            "n_real": np.asarray(n_real),
            "skill": np.asarray([str(pe.skills[k]) for k in pair_skill[real]]),
            "item": np.asarray([str(pe.items[k]) for k in pair_item[real]]),
            "n_obs": cnt[real],
        }

    def build_model(self, events: pd.DataFrame):
        """Build the PyMC model for an events table (see :func:`bktbayes.data.load_events`).

        Returns
        -------
        pymc.Model
        """
        import pymc as pm
        import pytensor
        import pytensor.tensor as pt

        from .likelihood import LIKELIHOOD_BLOCK_SIZE
        from .ops import (
            bkt_collapsed_loglik,
            bkt_item_loglik,
            bkt_loglik,
            bkt_prefix_loglik,
            bkt_skill_loglik,
            bkt_student_loglik,
            layout_inputs,
            prefix_inputs,
            scan_loglik,
        )
        from .packing import prefix_layout

        _require_rows(events)
        pe = pack_events(events, block_size=LIKELIHOOD_BLOCK_SIZE)
        self._packed = pe
        self._prefix = None
        self._prefix_keep = None  # sequences in the prefix layout, if not all
        self._fast = None
        # Per-build state, reset before anything of this build reads it
        # (the collapse plan reads the start, which reads the weights).
        self._collapse = None
        self._modes0 = None
        self._whiten = None
        self._cweights = None
        self._start_cov = None
        pk = pe.packed
        cfg = self.config
        n_skill = len(pe.skills)
        n_seq_skill = np.bincount(pk.seq_skill, minlength=n_skill)
        n_obs_skill = np.bincount(pk.seq_skill, weights=pk.seq_len, minlength=n_skill)
        coords = {"skill": [str(s) for s in pe.skills]}
        if cfg.student_effects:
            coords["user"] = [str(u) for u in pe.users]
        if cfg.item_effects:
            self._items = self._item_index(events, pe)
            self._items["centered"] = self._centered_mask(
                "item", self._items["n_obs"], self._items["n_obs"]
            )
            coords["item"] = [
                f"{s}|{i}" for s, i in zip(self._items["skill"], self._items["item"], strict=True)
            ]
        seq_skill = pk.seq_skill
        self.fit_info["centered"] = {}
        self.fit_info.pop("whitened_skills", None)
        # Collapsing and whitening need per-skill parameters (hierarchical,
        # no student or item effects) and the kernel likelihood.
        per_skill_kernel = (
            cfg.pooling == "hierarchical"
            and not (cfg.student_effects or cfg.item_effects)
            and self._likelihood == "kernel"
        )
        if (cfg.collapse_multimodal or cfg.collapse_sparse) and per_skill_kernel:
            self._collapse = self._collapse_plan()
            self.fit_info["collapsed"] = {
                str(pe.skills[s]): {"reason": r, "valley": v, "nodes": len(c)}
                for s, r, v, c in zip(
                    self._collapse["skills"],
                    self._collapse["reason"],
                    self._collapse["valley"],
                    self._collapse["c"],
                    strict=True,
                )
            }

        self.fit_info.pop("partially_centered", None)
        cm = None  # centred (True) or not, per skill and group
        if cfg.pooling == "hierarchical":
            cm = np.stack(
                [self._centered_mask(g, n_seq_skill, n_obs_skill) for g in cfg.groups], axis=1
            )
            self.fit_info["centered"] = {g: int(cm[:, i].sum()) for i, g in enumerate(cfg.groups)}
        if cfg.partial_centering and per_skill_kernel and cfg.parametrization == "auto":
            found = self._partial_weights(self._initial_points(self._fast_estimate_cached()), cm)
            if found is not None:
                self._cweights, self._start_cov = found
                part = (self._cweights > 0.0) & (self._cweights < 1.0)
                self.fit_info["partially_centered"] = {
                    g: int(part[:, i].sum()) for i, g in enumerate(cfg.groups)
                }
        self._target_accept = TARGET_ACCEPT
        if cm is not None:
            if per_skill_kernel:
                pts0 = self._initial_points(self._fast_estimate_cached())
                sd_ls = _sd_log_sigma(self._start_kappa(pts0)[0])
            else:
                # No per-skill modes here: the bound of skills whose data fix
                # their logits (kappa = 1).
                sd_ls = _sd_log_sigma(np.ones(cm.shape))
            if (sd_ls > PARTIAL_MAX_SD_LOG_SIGMA).any():
                self._target_accept = TARGET_ACCEPT_UNCERTAIN_SCALE
        if cfg.whiten_skills and per_skill_kernel:
            wts = cm.astype(float) if self._cweights is None else self._cweights
            self._whiten = self._whitening(self._initial_points(self._fast_estimate_cached()), wts)
            self.fit_info["whitened_skills"] = int(self._whiten["mapped"].sum())
            coords["group"] = list(cfg.groups)
        with pm.Model(coords=coords) as model:
            logits = {}
            pop: dict[str, tuple] = {}
            raws = {}
            c = None if cm is None else pt.as_tensor_variable(cm.astype("float64"))
            cw = None
            if self._cweights is not None:
                cw = pt.as_tensor_variable(self._cweights)
            # Per skill and group: x ~ N(mu, sigma) where centred, x ~ N(0, 1)
            # and logit = mu + sigma x elsewhere.
            for i, g in enumerate(cfg.groups):
                mu_p = self.prior(f"mu_{g}")
                if cfg.pooling == "none":
                    logits[g] = pm.Normal(f"{g}_logit", mu_p["mu"], mu_p["sigma"], dims="skill")
                    continue
                mu = pm.Normal(f"mu_{g}", mu_p["mu"], mu_p["sigma"])
                sigma = pm.HalfNormal(f"sigma_{g}", self.prior(f"sigma_{g}")["sigma"])
                pop[g] = (mu, sigma)
                if self._whiten is None and cw is not None:
                    wi = cw[:, i]
                    raws[g] = pm.Normal(
                        f"{g}_raw", mu=wi * mu, sigma=pt.exp(wi * pt.log(sigma)), dims="skill"
                    )
                elif self._whiten is None:
                    ci = c[:, i]
                    raws[g] = pm.Normal(
                        f"{g}_raw", mu=ci * mu, sigma=ci * sigma + (1.0 - ci), dims="skill"
                    )
            if self._whiten is not None:
                # One matrix of the skills' variables, so that the sampler
                # moves each skill's variables together, whitened.
                mu_v = pt.stack([pop[g][0] for g in cfg.groups])
                sd_v = pt.stack([pop[g][1] for g in cfg.groups])
                if cw is None:
                    r_mu, r_sd = c * mu_v, c * sd_v + (1.0 - c)
                else:
                    r_mu, r_sd = cw * mu_v, pt.exp(cw * pt.log(sd_v))
                raw_all = pm.Normal(
                    "skill_raw",
                    mu=r_mu,
                    sigma=r_sd,
                    dims=("skill", "group"),
                    transform=_skill_affine(self._whiten["shift"], self._whiten["chol"]),
                )
                for i, g in enumerate(cfg.groups):
                    raws[g] = pm.Deterministic(f"{g}_raw", raw_all[:, i], dims="skill")
            for i, g in enumerate(cfg.groups):
                if g in raws:
                    mu, sigma = pop[g]
                    if cw is None:
                        lg = c[:, i] * raws[g] + (1.0 - c[:, i]) * (mu + sigma * raws[g])
                    else:
                        # Partially centred: raw ~ N(w mu, sigma^w) and
                        # logit = mu + sigma^(1 - w) (raw - w mu) ~ N(mu, sigma).
                        wi = cw[:, i]
                        lg = mu + pt.exp((1.0 - wi) * pt.log(sigma)) * (raws[g] - wi * mu)
                    logits[g] = pm.Deterministic(f"{g}_logit", lg, dims="skill")
            p_init_s = pm.Deterministic("p_init", pm.math.sigmoid(logits["init"]), dims="skill")
            p_tr_s = pm.Deterministic("p_transit", pm.math.sigmoid(logits["transit"]), dims="skill")
            if cfg.guess_slip == "ordered":
                s_s = pm.math.sigmoid(-logits["slip"])
                g_s = pm.math.sigmoid(logits["slip"]) * pm.math.sigmoid(logits["guess"])
            elif cfg.guess_slip == "ordered_guess_first":
                g_s = pm.math.sigmoid(logits["guess"])
                s_s = (1.0 - g_s) * pm.math.sigmoid(-logits["slip"])
            else:
                g_s = 0.5 * pm.math.sigmoid(logits["guess"])
                s_s = 0.5 * pm.math.sigmoid(logits["slip"])
            g_s = pm.Deterministic("p_guess", g_s, dims="skill")
            s_s = pm.Deterministic("p_slip", s_s, dims="skill")
            f_s = None
            if cfg.forgetting:
                f_s = pm.Deterministic(
                    "p_forget", (1.0 - p_tr_s) * pm.math.sigmoid(logits["forget"]), dims="skill"
                )

            # Indices as graph constants: PyTensor's indexing walks a numpy
            # index element by element looking for booleans (0.8 s here).
            sk_idx = pt.as_tensor_variable(seq_skill)
            init_seq_logit = logits["init"][sk_idx]
            tr_seq_logit = logits["transit"][sk_idx]
            if cfg.student_effects:
                seq_user = pt.as_tensor_variable(pk.seq_user)
                s_init = pm.HalfNormal(
                    "sigma_student_init", self.prior("sigma_student_init")["sigma"]
                )
                z_init = pm.Normal("student_init_z", 0.0, 1.0, dims="user")
                init_off = pm.Deterministic("student_init", s_init * z_init, dims="user")
                init_seq_logit = init_seq_logit + init_off[seq_user]
                tr_off = pt.zeros(len(pe.users))
                if cfg.student_effects == "init+transit":
                    s_tr = pm.HalfNormal(
                        "sigma_student_transit", self.prior("sigma_student_transit")["sigma"]
                    )
                    z_tr = pm.Normal("student_transit_z", 0.0, 1.0, dims="user")
                    tr_off = pm.Deterministic("student_transit", s_tr * z_tr, dims="user")
                    tr_seq_logit = tr_seq_logit + tr_off[seq_user]
                pi_seq = pm.math.sigmoid(init_seq_logit)
                pt_seq = pm.math.sigmoid(tr_seq_logit)
                f_seq = (
                    (1.0 - pt_seq) * pm.math.sigmoid(logits["forget"][sk_idx])
                    if cfg.forgetting
                    else None
                )
            else:
                pi_seq = p_init_s[sk_idx]
                pt_seq = p_tr_s[sk_idx]
                f_seq = f_s[sk_idx] if cfg.forgetting else None
            if cfg.item_effects:
                it = self._items
                sig_g = pm.HalfNormal("sigma_item_guess", self.prior("sigma_item_guess")["sigma"])
                sig_s = pm.HalfNormal("sigma_item_slip", self.prior("sigma_item_slip")["sigma"])
                # Per item, as for skills: centred offsets (item_*_z is then
                # the offset itself) for data-rich items, non-centred
                # (offset = sigma z) for sparse ones.
                cm = it["centered"]
                self.fit_info["centered"]["item"] = int(cm.sum())
                c = pt.as_tensor_variable(cm.astype("float64"))
                zeros = pt.zeros(n_skill)
                isk = it["item_skill"]
                offs = []
                for name, sig in (("guess", sig_g), ("slip", sig_s)):
                    z = pm.Normal(f"item_{name}_z", 0.0, c * sig + (1.0 - c), dims="item")
                    offs.append(pt.concatenate([c * z + (1.0 - c) * sig * z, zeros]))
                gl = logits["guess"][isk] + offs[0]
                sl = logits["slip"][isk] + offs[1]
                if cfg.guess_slip == "ordered":
                    s_i = pm.math.sigmoid(-sl)
                    g_i = pm.math.sigmoid(sl) * pm.math.sigmoid(gl)
                elif cfg.guess_slip == "ordered_guess_first":
                    g_i = pm.math.sigmoid(gl)
                    s_i = (1.0 - g_i) * pm.math.sigmoid(-sl)
                else:
                    g_i = 0.5 * pm.math.sigmoid(gl)
                    s_i = 0.5 * pm.math.sigmoid(sl)
            if self._likelihood == "scan":
                y_pad, m_pad = _padded(pk)
                if cfg.item_effects:
                    it_pad = _padded(pk, self._items["row_item"])[0]
                    g_arg, s_arg = g_i[it_pad], s_i[it_pad]
                else:
                    g_arg, s_arg = g_s[sk_idx], s_s[sk_idx]
                total = scan_loglik(y_pad, m_pad, pi_seq, pt_seq, g_arg, s_arg, f_seq).sum()
            elif cfg.item_effects:
                # Guess and slip per response: the item Op (backward adjoints).
                data = layout_inputs(pk)
                ev_item = pytensor.shared(self._items["ev_item"], name="bkt_ev_item")
                total = bkt_item_loglik(data, ev_item, pi_seq, pt_seq, g_i, s_i, f_seq)
            elif cfg.student_effects and self._likelihood == "lockstep":
                # Parameters differ per sequence: the per-sequence Op, with
                # PyTensor gathering and scattering (the reference for the
                # student Op; kept for tests and the benchmark).
                data = layout_inputs(pk)
                total = bkt_loglik(data, pi_seq, pt_seq, g_s[sk_idx], s_s[sk_idx], f_seq).sum()
            elif cfg.student_effects:
                # Parameters differ per sequence: the student Op gathers to
                # sequences and scatters the gradient to skills and students
                # inside its kernel.
                data = layout_inputs(pk)
                total = bkt_student_loglik(
                    data,
                    pytensor.shared(seq_skill.astype(np.int64), name="bkt_seq_skill"),
                    pytensor.shared(pk.seq_user.astype(np.int64), name="bkt_seq_user"),
                    logits["init"],
                    init_off,
                    logits["transit"],
                    tr_off,
                    g_s,
                    s_s,
                    pm.math.sigmoid(logits["forget"]) if cfg.forgetting else None,
                )
            elif self._likelihood == "lockstep":
                # Parameters per skill, every sequence stepped (the reference
                # for the prefix layout; kept for the benchmark).
                data = layout_inputs(pk)
                sk_data = pytensor.shared(seq_skill.astype(np.int64), name="bkt_seq_skill")
                total = bkt_skill_loglik(data, sk_data, p_init_s, p_tr_s, g_s, s_s, f_s)
            else:
                # Parameters per skill: sequences of a skill that start alike
                # share those steps (a prefix trie), the rest runs lockstep.
                y_csr = pk.from_lockstep(pk.lock_correct)[pk.csr_row]
                keep = np.ones(pk.n_seqs, dtype=bool)
                if self._collapse is not None:
                    keep = ~self._collapse["mask"][seq_skill]
                layout = prefix_layout(
                    seq_skill[keep],
                    pk.seq_start[keep],
                    pk.seq_len[keep],
                    y_csr,
                    block_size=LIKELIHOOD_BLOCK_SIZE,
                )
                total = bkt_prefix_loglik(prefix_inputs(layout), p_init_s, p_tr_s, g_s, s_s, f_s)
                self._prefix = layout
                if not keep.all():
                    self._prefix_keep = np.flatnonzero(keep)
                    # Collapsed skills: their likelihood with their logits
                    # integrated out, a function of the population only.
                    total = total + bkt_collapsed_loglik(
                        self._collapse["nodes"],
                        self._collapse["c"],
                        pt.stack([pop[g][0] for g in cfg.groups]),
                        pt.stack([pop[g][1] for g in cfg.groups]),
                    )
            pm.Potential("loglik", total)
        self.model = model
        return model

    # ------------------------------------------------------------------
    # Fast estimates and initialisation.

    def fast_estimate(self, events: pd.DataFrame | None = None, *, max_iter: int = 30):
        """Per-skill maximum likelihood (what pyBKT's EM computes), by Newton steps.

        Every skill's logit-scale parameters are fitted at once with
        :func:`bktbayes.likelihood.skill_newton`: block-diagonal Newton steps
        whose Hessian blocks come from finite differences of the kernel's exact
        gradient, under the same constraints as the model (ordered or bounded
        guess/slip, ``p_transit + p_forget < 1``). A weak Normal(prior mean, 3)
        penalty on the logits keeps skills whose likelihood is flat at finite
        values. Student offsets are not estimated (zero). A joint MAP of the
        hierarchical model is deliberately not used: it collapses or inflates
        the population scales.

        Returns
        -------
        dict
            ``logits`` (group -> array over skills), ``params`` (the five
            natural parameters per skill), ``loglik`` (nats, at the optimum,
            without the penalty), ``n_eval``, ``n_iter``, ``seconds`` (packing
            included when ``events`` is given) and ``converged``.
        """
        import time

        from .likelihood import skill_newton

        t0 = time.perf_counter()
        if events is not None:
            _require_rows(events)
            self._packed = pack_events(events, block_size=LIKELIHOOD_BLOCK_SIZE)
            self._prefix = self._fast = None
        if self._packed is None:
            raise ValueError("no data: pass events or call build_model first")
        pk = self._packed.packed
        groups = self.config.groups
        n_skill = len(self._packed.skills)
        layout = (pk.lock_correct, pk.block_seq, pk.block_ev, pk.step_ptr, pk.step_count)
        mu0 = np.array([[self.prior(f"mu_{g}")["mu"]] for g in groups])
        correct = self._packed.correct

        def subset(mask):
            # The sequences of the skills in mask, re-packed (O(their events)).
            seqs = np.flatnonzero(mask[pk.seq_skill])
            lens = pk.seq_len[seqs]
            offs = np.repeat(pk.seq_start[seqs] - np.cumsum(lens) + lens, lens)
            rows = pk.csr_row[offs + np.arange(int(lens.sum()))]
            sub = pack_codes(
                np.repeat(np.arange(seqs.size), lens),
                np.repeat(pk.seq_skill[seqs], lens),
                np.arange(rows.size),
                correct[rows],
                n_skill=n_skill,
                block_size=LIKELIHOOD_BLOCK_SIZE,
            )
            lay = (sub.lock_correct, sub.block_seq, sub.block_ev, sub.step_ptr, sub.step_count)
            return lay, sub.seq_skill

        res = skill_newton(
            layout,
            pk.seq_skill,
            np.repeat(mu0, n_skill, axis=1),
            gs_mode=_gs_modes()[self.config.guess_slip],
            prior_mean=mu0,
            max_iter=max_iter,
            subset=subset,
        )
        lg = {g: res["x"][i] for i, g in enumerate(groups)}
        out = {
            "logits": lg,
            "params": natural_params(lg, self.config.guess_slip),
            "loglik": float(res["loglik"].sum()),
            "n_eval": res["n_eval"],
            "n_iter": res["n_iter"],
            "seconds": time.perf_counter() - t0,
            "converged": res["converged"],
        }
        self.fit_info["fast_estimate"] = {
            k: out[k] for k in ("loglik", "n_eval", "n_iter", "seconds", "converged")
        }
        return out

    def _initial_points(self, est: dict) -> dict[str, np.ndarray]:
        """Start values for the sampler from a fast estimate."""
        cfg = self.config
        pts: dict[str, np.ndarray] = {}
        pk = self._packed.packed
        n_skill = len(self._packed.skills)
        n_seq = np.bincount(pk.seq_skill, minlength=n_skill)
        n_obs = np.bincount(pk.seq_skill, weights=pk.seq_len, minlength=n_skill)
        for i, g in enumerate(cfg.groups):
            x = np.asarray(est["logits"][g], dtype=float)
            if cfg.pooling == "none":
                pts[f"{g}_logit"] = x
                continue
            w = np.minimum(n_obs / 200.0, 1.0)  # trust well-informed skills more
            mu = float(np.sum(w * x) / max(w.sum(), 1e-9))
            sigma = float(max(np.sqrt(np.sum(w * (x - mu) ** 2) / max(w.sum(), 1e-9)), 0.1))
            cmask = self._centered_mask(g, n_seq, n_obs)
            # Sparse skills start near the population mean, not at their noisy MLE.
            if self._cweights is not None:
                # Partial centring: every skill starts at its mode given the
                # starting population (collapsed skills at the mean).
                xm = self._start_modes()["logits"][:, 0, i]
                keep = np.isfinite(xm)
                if self._collapse is not None:
                    keep &= ~self._collapse["mask"]
                x = np.where(keep, xm, mu)
            else:
                x = np.where(n_obs >= 50, x, mu)
            pts[f"mu_{g}"] = np.asarray(mu)
            pts[f"sigma_{g}"] = np.asarray(sigma)
            if self._cweights is None:
                pts[f"{g}_raw"] = np.where(cmask, x, (x - mu) / sigma)
            else:
                wg = self._cweights[:, i]
                pts[f"{g}_raw"] = wg * mu + (x - mu) / sigma ** (1.0 - wg)
        if self._whiten is not None:
            pts["skill_raw"] = np.stack([pts.pop(f"{g}_raw") for g in cfg.groups], axis=1)
        if cfg.student_effects:
            n_user = len(self._packed.users)
            pts["sigma_student_init"] = np.asarray(0.3)
            pts["student_init_z"] = np.zeros(n_user)
            if cfg.student_effects == "init+transit":
                pts["sigma_student_transit"] = np.asarray(0.2)
                pts["student_transit_z"] = np.zeros(n_user)
        if cfg.item_effects:
            n_item = int(self._items["n_real"])
            for g in ("guess", "slip"):
                pts[f"sigma_item_{g}"] = np.asarray(0.2)
                pts[f"item_{g}_z"] = np.zeros(n_item)
        return pts

    # ------------------------------------------------------------------
    # Fitting.

    def fit(
        self,
        events: pd.DataFrame,
        draws: int = 1000,
        tune: int = 1000,
        chains: int = 4,
        sampler: Literal["nutpie", "pymc"] = "nutpie",
        random_seed: int | None = None,
        progressbar: bool = True,
        init: Literal["fast_estimate", "default"] = "fast_estimate",
        warn: bool = True,
        adaptation: str = "diag",
        target_accept: float | None = None,
    ):
        """Sample the posterior with NUTS.

        Parameters
        ----------
        events : DataFrame
            Canonical events table.
        draws, tune, chains : int
            Posterior draws and tuning steps per chain, number of chains.
        sampler : {"nutpie", "pymc"}
            nutpie (compiled in PyTensor's NUMBA mode; default) or PyMC's NUTS.
        random_seed : int, optional
            Same seed, same draws.
        progressbar : bool
            Show the sampler's progress.
        init : {"fast_estimate", "default"}
            Start chains (jittered) from the per-skill maximum likelihood, or
            from PyMC's default initial point (can stall on real data).
        warn : bool
            Emit a :class:`ConvergenceWarning` when diagnostics fail.
        adaptation : str
            nutpie's mass-matrix adaptation (``"diag"``; ``"low_rank"`` did not
            help on the bundled data).
        target_accept : float, optional
            NUTS's target acceptance rate. By default
            :data:`TARGET_ACCEPT` (0.8), or
            :data:`TARGET_ACCEPT_UNCERTAIN_SCALE` (0.9) where some group's
            population scale is poorly determined (few skills); recorded in
            ``fit_info["target_accept"]``.

        Returns
        -------
        xarray.DataTree
            Groups ``posterior``, ``sample_stats``, ``log_likelihood``
            (per (user, skill) sequence, for LOO), ``observed_data`` and
            ``constant_data``.
        """
        import time

        if target_accept is not None and not 0.0 < target_accept < 1.0:
            raise ValueError(f"target_accept must be in (0, 1), got {target_accept!r}")
        tb = time.perf_counter()
        model = self.build_model(events)
        ti = time.perf_counter()
        pts = None
        if init == "fast_estimate":
            pts = self._initial_points(self._fast_estimate_cached())
        if target_accept is None:
            target_accept = self._target_accept
        t0 = time.perf_counter()
        with compile_flags():
            if sampler == "nutpie":
                import nutpie

                # nutpie jitters every start value by U(-1, 1) on the
                # unconstrained scale around the fast estimate. (Restricting
                # the jitter to some variables made nutpie 0.16 reject every
                # initial point here.)
                compiled = nutpie.compile_pymc_model(model, initial_points=pts)
                t1 = time.perf_counter()
                idata = nutpie.sample(
                    compiled,
                    draws=draws,
                    tune=tune,
                    chains=chains,
                    seed=random_seed,
                    progress_bar=progressbar,
                    adaptation=adaptation,
                    target_accept=target_accept,
                )
            elif sampler == "pymc":
                import pymc as pm

                t1 = time.perf_counter()
                with model:
                    idata = pm.sample(
                        draws=draws,
                        tune=tune,
                        chains=chains,
                        random_seed=random_seed,
                        progressbar=progressbar,
                        initvals=pts,
                        nuts_sampler="pymc",
                        target_accept=target_accept,
                        compute_convergence_checks=False,
                    )
            else:
                raise ValueError(f"sampler must be 'nutpie' or 'pymc', got {sampler!r}")
        t2 = time.perf_counter()
        if self._collapse is not None and self._collapse["skills"].size:
            idata = self._draw_collapsed(idata, random_seed)
        t2b = time.perf_counter()
        self.fit_info.update(
            sampler=sampler,
            draws=draws,
            tune=tune,
            chains=chains,
            random_seed=random_seed,
            target_accept=target_accept,
            compile_seconds=t1 - t0,
            sampling_seconds=t2 - t1,
        )
        idata = self._complete(idata)
        t3 = time.perf_counter()
        self.idata = idata
        self.diagnostics = self.check_diagnostics(warn=warn)
        self.fit_info.update(
            build_seconds=ti - tb,
            init_seconds=t0 - ti,
            collapsed_draw_seconds=t2b - t2,
            loglik_seconds=t3 - t2b,
            diagnostics_seconds=time.perf_counter() - t3,
        )
        return idata

    def _rest_loglik(self, nat, pf, keep: np.ndarray, ll: np.ndarray) -> None:
        """Pointwise log-likelihood of the sequences not in ``keep``."""
        from .likelihood import LIKELIHOOD_BLOCK_SIZE, draws_logp
        from .modes import skill_responses
        from .packing import pack_codes

        correct, lens, seq_skill = self._sequences()
        rest = np.setdiff1d(np.arange(lens.size), keep)
        y, rest_lens = skill_responses(correct, lens, rest)
        sub = pack_codes(
            np.repeat(rest, rest_lens),
            np.repeat(seq_skill[rest], rest_lens),
            np.arange(y.size),
            y,
            n_skill=len(self._packed.skills),
            block_size=LIKELIHOOD_BLOCK_SIZE,
        )
        out = np.empty((ll.shape[0], sub.n_seqs))
        c = np.ascontiguousarray
        draws_logp(
            sub.lock_correct, sub.block_seq, sub.block_ev, sub.step_ptr, sub.step_count,
            *(c(nat[k]) for k in ("p_init", "p_transit", "p_guess", "p_slip")),
            pf,
            out,
            sub.seq_skill.astype(np.int64),
        )  # fmt: skip
        ll[:, sub.seq_user] = out

    def _skill_natural(self, post) -> dict[str, np.ndarray]:
        """Per-draw, per-skill natural parameters, shape (n_draws, n_skills)
        (models without student or item effects)."""
        names = ["p_init", "p_transit", "p_guess", "p_slip"]
        if self.config.forgetting:
            names.append("p_forget")
        return {name: _draw_rows(post, name) for name in names}

    def _seq_natural(self, post) -> dict[str, np.ndarray]:
        """Per-draw, per-sequence natural parameters, shape (n_draws, n_seqs)."""
        pk = self._packed.packed
        sk = pk.seq_skill

        # C-contiguous (sample, dim) rows: indexing their columns by sequence
        # then yields C-contiguous (sample, n_seqs).
        out = {}
        if self.config.student_effects:
            init = np.take(_draw_rows(post, "init_logit"), sk, axis=1) + np.take(
                _draw_rows(post, "student_init"), pk.seq_user, axis=1
            )
            tr = np.take(_draw_rows(post, "transit_logit"), sk, axis=1)
            if self.config.student_effects == "init+transit":
                tr = tr + np.take(_draw_rows(post, "student_transit"), pk.seq_user, axis=1)
            out["p_init"] = _sigmoid(init)
            out["p_transit"] = _sigmoid(tr)
            if self.config.forgetting:
                out["p_forget"] = (1 - out["p_transit"]) * _sigmoid(
                    np.take(_draw_rows(post, "forget_logit"), sk, axis=1)
                )
        else:
            out["p_init"] = np.take(_draw_rows(post, "p_init"), sk, axis=1)
            out["p_transit"] = np.take(_draw_rows(post, "p_transit"), sk, axis=1)
            if self.config.forgetting:
                out["p_forget"] = np.take(_draw_rows(post, "p_forget"), sk, axis=1)
        if not self.config.item_effects:  # item models: item_natural() instead
            out["p_guess"] = np.take(_draw_rows(post, "p_guess"), sk, axis=1)
            out["p_slip"] = np.take(_draw_rows(post, "p_slip"), sk, axis=1)
        return out

    def item_natural(self, post) -> tuple[np.ndarray, np.ndarray]:
        """Per-draw guess and slip of every item, shape (n_draws, n_items).

        Columns: the modelled (skill, item) pairs (the ``item`` coordinate),
        then one skill-level column per skill.
        """
        it = self._items

        n = _draw_rows(post, "guess_logit").shape[0]
        out = []
        for g in ("guess", "slip"):
            z = _draw_rows(post, f"item_{g}_z")
            off = np.where(it["centered"], z, _draw_rows(post, f"sigma_item_{g}") * z)
            off = np.concatenate([off, np.zeros((n, len(self._packed.skills)))], axis=1)
            out.append(np.take(_draw_rows(post, f"{g}_logit"), it["item_skill"], axis=1) + off)
        nat = natural_params(
            {"init": out[0], "transit": out[0], "guess": out[0], "slip": out[1]},
            self.config.guess_slip,
        )
        return nat["p_guess"], nat["p_slip"]

    def _student_loglik(self, post, data: tuple, out: np.ndarray) -> None:
        """Pointwise log-likelihood of a student-effects model into ``out``
        (n_draws, n_seqs): skill logits and student offsets per draw; the
        kernel forms each sequence's parameters itself, as the gradient Op
        does, instead of (n_draws, n_seqs) parameter arrays."""
        pk = self._packed.packed
        cfg = self.config
        nat = self._skill_natural(post)
        draws_student_logp(
            *data,
            pk.seq_skill.astype(np.int64),
            pk.seq_user.astype(np.int64),
            _draw_rows(post, "init_logit"),
            _draw_rows(post, "student_init"),
            _draw_rows(post, "transit_logit"),
            _draw_rows(post, "student_transit") if cfg.student_effects == "init+transit" else None,
            nat["p_guess"],
            nat["p_slip"],
            _sigmoid(_draw_rows(post, "forget_logit")) if cfg.forgetting else None,
            out,
        )

    def _complete(self, idata):
        """Add log_likelihood, observed_data and constant_data groups."""
        import xarray as xr

        pe = self._packed
        pk = pe.packed
        post = (
            idata["posterior"].to_dataset()
            if hasattr(idata["posterior"], "to_dataset")
            else idata["posterior"]
        )
        n_chain, n_draw = post.sizes["chain"], post.sizes["draw"]
        per_skill = not (self.config.item_effects or self.config.student_effects)
        ll = _empty_small_pages((n_chain * n_draw, pk.n_seqs))
        data = (pk.lock_correct, pk.block_seq, pk.block_ev, pk.step_ptr, pk.step_count)
        c = np.ascontiguousarray
        if self.config.student_effects and not self.config.item_effects:
            self._student_loglik(post, data, ll)
        else:
            nat = self._skill_natural(post) if per_skill else self._seq_natural(post)
            pf = np.ascontiguousarray(nat["p_forget"]) if "p_forget" in nat else None
            if self.config.item_effects:
                ig, isl = self.item_natural(post)
                draws_logp_items(
                    *data, self._items["ev_item"], c(nat["p_init"]), c(nat["p_transit"]),
                    c(ig), c(isl), pf, ll,
                )  # fmt: skip
            elif per_skill and self._prefix is not None:
                # Shared prefixes stepped once per draw (as in the gradient).
                lay = self._prefix
                sp = lay.suffix
                keep = self._prefix_keep
                seq_node, suf_seq = lay.seq_node, lay.suf_seq
                if keep is not None:
                    # The layout holds the sequences in keep: its columns
                    # mapped onto all sequences' (the others get node 0's
                    # value here and their own just below). A (draws x
                    # sequences) array is 1.3 GB on the bundled data, too
                    # big to fill twice.
                    seq_node = np.zeros(pk.n_seqs, dtype=lay.seq_node.dtype)
                    seq_node[keep] = lay.seq_node
                    suf_seq = keep[lay.suf_seq].astype(lay.suf_seq.dtype)
                draws_prefix_logp(
                    lay.node_parent, lay.node_skill, lay.node_y,
                    sp.lock_correct, sp.block_seq, sp.block_ev, sp.step_ptr, sp.step_count,
                    lay.suf_node, lay.suf_skill, seq_node, suf_seq,
                    *(c(nat[k]) for k in ("p_init", "p_transit", "p_guess", "p_slip")),
                    pf,
                    ll,
                )  # fmt: skip
                if keep is not None:
                    # The collapsed skills' sequences, not in the prefix
                    # layout: stepped on their own.
                    self._rest_loglik(nat, pf, keep, ll)
            else:
                draws_logp(
                    *data,
                    *(c(nat[k]) for k in ("p_init", "p_transit", "p_guess", "p_slip")),
                    pf,
                    ll,
                    pk.seq_skill.astype(np.int64) if per_skill else None,
                )
        seq_labels = [
            f"{pe.users[u]}|{pe.skills[s]}" for u, s in zip(pk.seq_user, pk.seq_skill, strict=True)
        ]
        ll_ds = xr.Dataset(
            {"loglik": (("chain", "draw", "sequence"), ll.reshape(n_chain, n_draw, pk.n_seqs))},
            coords={
                "chain": post["chain"].values,
                "draw": post["draw"].values,
                "sequence": seq_labels,
            },
        )
        obs = xr.Dataset({"correct": (("event",), pe.correct.astype(np.int8))})
        const = xr.Dataset(
            {
                "seq_user": (("sequence",), np.asarray([str(u) for u in pe.users[pk.seq_user]])),
                "seq_skill": (("sequence",), np.asarray([str(s) for s in pe.skills[pk.seq_skill]])),
                "seq_len": (("sequence",), pk.seq_len),
                "seq_correct": (("sequence",), pk.seq_correct),
            },
            coords={"sequence": seq_labels},
        )
        if self.config.item_effects:
            it = self._items
            const = const.assign(
                item_skill=(("item",), it["skill"]),
                item_id=(("item",), it["item"]),
                item_n_obs=(("item",), it["n_obs"]),
                item_centered=(("item",), it["centered"]),
            )
        idata["log_likelihood"] = xr.DataTree(ll_ds)
        idata["observed_data"] = xr.DataTree(obs)
        idata["constant_data"] = xr.DataTree(const)
        return idata

    # ------------------------------------------------------------------
    # Diagnostics.

    def check_diagnostics(
        self,
        idata=None,
        *,
        rhat_max: float = 1.01,
        ess_min: float = 400,
        warn: bool = True,
    ) -> dict[str, Any]:
        """Max R-hat, min bulk/tail ESS, divergences and BFMI of a fit.

        Returns a dict with the figures, the worst parameters and ``ok``;
        warns (:class:`ConvergenceWarning`) naming the worst parameters when
        R-hat > ``rhat_max``, ESS < ``ess_min`` or any divergence.
        """
        import arviz as az

        from .diagnostics import ess_bulk, ess_tail, rhat_rank

        idata = self.idata if idata is None else idata
        post = idata["posterior"]
        # The sampled skill variables (``*_raw``, hyperparameters) and the
        # probabilities the model reports. ``*_logit`` are left out: equal to
        # ``*_raw`` for centred skills and, for init, transit and slip, a
        # monotone map of ``p_*`` (same rank-based ESS and R-hat).
        names = [
            v
            for v in post.data_vars
            if not v.endswith(("_z", "_logit"))
            and v not in ("student_init", "student_transit", "skill_raw")
        ]
        # ArviZ's rank-normalised R-hat and bulk/tail ESS, computed for all
        # parameters at once (bktbayes.diagnostics; equal to az.rhat/az.ess
        # to rounding, tested): ArviZ takes ~4 ms per parameter and method.
        labels: list[str] = []
        cols = []
        for v in names:
            da = post[v]
            n_chain, n_draw = da.sizes["chain"], da.sizes["draw"]
            da = da.transpose("chain", "draw", ...)
            cols.append(np.asarray(da.values, dtype=float).reshape(n_chain, n_draw, -1))
            labels += _labels(da.isel(chain=0, draw=0, drop=True))
        draws = np.concatenate(cols, axis=2)
        with np.errstate(divide="ignore", invalid="ignore"):  # constants: 0 / 0
            rh = rhat_rank(draws)
            ess_b = ess_bulk(draws)
            ess_t = ess_tail(draws, float(az.rcParams["stats.ci_prob"]))
        # R-hat is nan for a quantity every draw of which is the same number
        # (nothing to mix: left out) and for draws holding nan (a failure:
        # counted as infinite so that it is reported, not skipped).
        flat = draws.reshape(-1, draws.shape[2])
        constant = np.all(flat == flat[:1], axis=0)
        rh = np.where(np.isnan(rh) & ~constant, np.inf, rh)
        keep = ~np.isnan(rh)
        r_items = [(n, r) for n, r, k in zip(labels, rh, keep, strict=True) if k]
        # ESS is nan only for draws holding nan: counted as none.
        eb_items = list(zip(labels, np.nan_to_num(ess_b, nan=0.0), strict=True))
        et_items = list(zip(labels, np.nan_to_num(ess_t, nan=0.0), strict=True))
        stats = idata["sample_stats"]
        div = int(np.asarray(stats["diverging"]).sum()) if "diverging" in stats else 0
        energy = np.asarray(stats["energy"]) if "energy" in stats else None
        bfmi = None
        if energy is not None:
            de = np.diff(energy, axis=1)
            bfmi = [float(np.mean(d**2) / np.var(e)) for d, e in zip(de, energy, strict=True)]
        max_r = max((r for _, r in r_items), default=1.0)
        min_eb = min(e for _, e in eb_items)
        min_et = min(e for _, e in et_items)
        worst_r = sorted(r_items, key=lambda x: -x[1])[:5]
        worst_e = sorted(eb_items, key=lambda x: x[1])[:5]
        ok = max_r <= rhat_max and min_eb >= ess_min and min_et >= ess_min and div == 0
        # Per-chain means of the worst parameter: one chain apart from the
        # others (a sojourn in a minor mode) reads differently from all chains
        # drifting together (too few draws).
        j = int(np.argmax(np.where(keep, rh, -np.inf)))
        chain_means = [float(x) for x in draws[:, :, j].mean(axis=1)]
        apart = chain_apart(chain_means)
        out = {
            "max_rhat": float(max_r),
            "min_ess_bulk": float(min_eb),
            "min_ess_tail": float(min_et),
            "divergences": div,
            "bfmi": bfmi,
            "worst_rhat": [(n, float(r)) for n, r in worst_r],
            "worst_ess_bulk": [(n, float(e)) for n, e in worst_e],
            "worst_rhat_chain_means": chain_means,
            "chain_apart": apart,
            "ok": bool(ok),
        }
        if warn and not ok:
            hint = ""
            if apart is not None and max_r > rhat_max:
                hint = (
                    f"; chain {apart} sits apart from the others: a second mode, which more "
                    "draws will not fix (README, 'A second mode'; skill_modes() finds a "
                    "skill's modes and their shares; student_effects='init' may remove it)"
                )
            warnings.warn(
                f"fit diagnostics fail: max R-hat {max_r:.3f} (worst {worst_r[:3]}; per-chain "
                f"means of {labels[j]}: {', '.join(f'{m:.4g}' for m in chain_means)}{hint}), "
                f"min bulk ESS {min_eb:.0f} (worst {worst_e[:3]}), min tail ESS {min_et:.0f}, "
                f"{div} divergences",
                ConvergenceWarning,
                stacklevel=2,
            )
        return out

    def _sequences(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Responses sequence after sequence (uint8), sequence lengths and
        skill codes, in the packing's sequence order."""
        pk = self._packed.packed
        lens = pk.seq_len
        offs = np.repeat(pk.seq_start - np.cumsum(lens) + lens, lens)
        correct = self._packed.correct[pk.csr_row[offs + np.arange(int(lens.sum()))]]
        return np.ascontiguousarray(correct, dtype=np.uint8), lens, pk.seq_skill

    def _skill_hessian(self, x: np.ndarray) -> np.ndarray:
        """Minus the likelihood's Hessian in each skill's logits at ``x``
        (skill x group), by finite differences of the exact gradient, its
        negative part dropped; zero for collapsed skills (their likelihood is
        integrated out). Shape (n_skill, n_group, n_group)."""
        from .likelihood import skill_logp_grad

        n_g = len(self.config.groups)
        pk = self._packed.packed
        n_skill = len(self._packed.skills)
        layout = (pk.lock_correct, pk.block_seq, pk.block_ev, pk.step_ptr, pk.step_count)
        gs = _gs_modes()[self.config.guess_slip]

        def grad(xx):
            lp, gg = np.zeros(n_skill), np.zeros((n_g, n_skill))
            skill_logp_grad(*layout, pk.seq_skill, np.ascontiguousarray(xx.T), gs, lp, gg)
            return gg.T

        g0, h = grad(x), 1e-5
        hess = np.empty((n_skill, n_g, n_g))
        for k in range(n_g):
            xk = x.copy()
            xk[:, k] += h
            hess[:, :, k] = -(grad(xk) - g0) / h
        hess = 0.5 * (hess + hess.transpose(0, 2, 1))
        w, u = np.linalg.eigh(hess)
        hess = np.einsum("sij,sj,skj->sik", u, np.maximum(w, 0.0), u)
        if self._collapse is not None:
            hess[self._collapse["mask"]] = 0.0
        return hess

    def _partial_weights(self, pts: dict, cm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Centring weights (skill x group) of the ``"auto"`` rule's
        non-centred variables: ``w`` with ``w sigma^(1 - w) = 1 - v / sigma^2``,
        ``v`` the Laplace variance of the skill's logit at its mode given the
        starting population (the share of the prior's variance the data
        remove). In a normal model that ``w`` makes raw and ``mu``
        independent a posteriori (Papaspiliopoulos, Roberts and Sköld 2007),
        so a sparse skill with some data no longer ties ``mu`` to its
        ``raw``. Centred variables keep weight 1; collapsed skills get 0.
        Returns the weights and those Laplace covariances (skill x group x
        group; the prior's for collapsed skills), which the whitening map
        uses.

        ``None`` (keep the binary rule) where no weight is strictly between
        0 and 1, or unless every group's population
        scale is well determined (:data:`PARTIAL_MAX_SD_LOG_SIGMA`): the
        weights are tuned to the starting sigma, and where the posterior's
        sigma can be far smaller a partially centred variable sits in a
        funnel."""
        groups = self.config.groups
        n_g = len(groups)
        sd0 = np.array([float(pts[f"sigma_{g}"]) for g in groups])
        kappa, cov, prior_only = self._start_kappa(pts)
        if _sd_log_sigma(kappa).max() > PARTIAL_MAX_SD_LOG_SIGMA:
            return None
        # w sigma^(1 - w) runs from 0 to 1 on [0, 1]: bisection for the root.
        lo, hi = np.zeros_like(kappa), np.ones_like(kappa)
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            below = mid * sd0 ** (1.0 - mid) < kappa
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        w = np.where(cm, 1.0, 0.5 * (lo + hi))
        w[prior_only] = np.where(cm[prior_only], 1.0, 0.0)
        if not ((w > 0.0) & (w < 1.0)).any():
            return None  # nothing partial: the binary rule's model as it is
        return w.reshape(-1, n_g), cov

    def _start_kappa(self, pts: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Share of each skill's prior variance its data remove, ``kappa =
        1 - v / sigma^2`` (skill x group; ``v`` the Laplace variance at its
        mode given the starting population ``pts``, clipped to [0, 1]), with
        those Laplace covariances (skill x group x group; the prior's where
        the skill's likelihood is integrated out or has no finite Hessian)
        and a mask of those prior-only skills."""
        groups = self.config.groups
        sd0 = np.array([float(pts[f"sigma_{g}"]) for g in groups])
        cov = np.array(self._start_modes()["cov"][:, 0], dtype=float)
        prior_only = ~np.isfinite(cov).all(axis=(1, 2))
        if self._collapse is not None:
            prior_only |= self._collapse["mask"]
        cov[prior_only] = np.diag(sd0**2)
        v = np.diagonal(cov, axis1=1, axis2=2)
        return np.clip(1.0 - v / sd0**2, 0.0, 1.0), cov, prior_only

    def _whitening(self, pts: dict, wts: np.ndarray) -> dict[str, np.ndarray]:
        """The per-skill affine map of ``whiten_skills``: at the start
        ``pts`` (per-group ``*_raw``), the Laplace approximation of each
        skill's variables given the starting population (likelihood Hessian
        by :meth:`_skill_hessian`; a collapsed skill's likelihood is
        integrated out, so prior only), or under partial centring each
        skill's importance-sampled posterior covariance there
        (:meth:`_start_is_cov`); ``wts`` are the centring weights
        (skill x group, 1 centred, 0 non-centred). Returns ``shift`` (the
        start) and ``chol`` (Cholesky factor of the covariance), each with a
        row per skill, and ``mapped`` (the skills whose map is not the
        identity)."""
        groups = self.config.groups
        n_g = len(groups)
        sd0 = np.array([float(pts[f"sigma_{g}"]) for g in groups])
        shift = np.stack([np.asarray(pts[f"{g}_raw"], float) for g in groups], axis=1)
        if self._start_cov is not None:
            # Partial centring: each skill's posterior covariance given the
            # starting population, in raw coordinates. The conditional scale
            # of a partially centred raw barely moves with sigma, so every
            # skill is mapped.
            d = sd0 ** (1.0 - wts)
            chol = np.linalg.cholesky(self._start_is_cov() / d[:, :, None] / d[:, None, :])
            mapped = np.ones(len(shift), dtype=bool)
            if self._collapse is not None:
                mapped &= ~self._collapse["mask"]
            chol[~mapped] = np.eye(n_g)
            return {"shift": shift, "chol": chol, "mapped": mapped}
        # The binary rule: the likelihood's Hessian at the start.
        cm = wts == 1.0
        mu0 = np.array([float(pts[f"mu_{g}"]) for g in groups])
        hess = self._skill_hessian(np.where(cm, shift, mu0 + sd0 * shift))
        d = np.where(cm, 1.0, sd0)  # d logit / d raw
        prec = d[:, :, None] * hess * d[:, None, :]
        prec += np.where(cm, 1.0 / sd0**2, 1.0)[:, :, None] * np.eye(n_g)
        chol = np.linalg.cholesky(np.linalg.inv(prec))
        # Only skills centred in every group: where a variable is
        # non-centred its scale in the map is the starting population
        # scale's, off when the posterior's differs (with every skill
        # whitened, sparse skills' guess mixed worst: bulk ESS 269-349 on
        # the bundled data, R-hat up to 1.019); the rest keep their own
        # coordinates, scaled by the sampler's mass matrix.
        mapped = cm.all(axis=1)
        chol[~mapped] = np.eye(n_g)
        return {"shift": shift, "chol": chol, "mapped": mapped}

    def _start_is_cov(self) -> np.ndarray:
        """Each skill's posterior covariance of its logits given the starting
        population (skill x group x group), by importance sampling with
        :data:`WHITEN_IS_NODES` nodes from the t mixture at its modes
        (:func:`bktbayes.modes.collapse_nodes`); the Laplace covariance
        (``_start_cov``) for collapsed skills and where the modes have none.

        The Laplace covariance is the curvature at the mode. Where a skill's
        posterior is skewed or heavy-tailed it is too narrow, and the
        whitening map built from it leaves NUTS a long, curved direction: on
        the bundled data "Order of Operations +,-,/,* () positive reals"
        (worst R-hat of two fits in seven) has a guess sd 1.83 times its
        Laplace sd, "Range" 1.86, "Volume Cylinder" 2.02."""
        from concurrent.futures import ThreadPoolExecutor

        from .modes import collapse_nodes, skill_responses

        cov = np.array(self._start_cov, dtype=float)
        found = self._start_modes()
        correct, lens, seq_skill = self._sequences()
        gs = _gs_modes()[self.config.guess_slip]
        order = np.argsort(seq_skill, kind="stable")
        bounds = np.searchsorted(seq_skill[order], np.arange(cov.shape[0] + 1))

        def one(s: int) -> None:
            seqs = order[bounds[s] : bounds[s + 1]]
            k = int(found["n_modes"][s])
            modes, covs = found["logits"][s, :k], found["cov"][s, :k]
            if seqs.size == 0 or k == 0 or not np.isfinite(covs).all():
                return
            if self._collapse is not None and self._collapse["mask"][s]:
                return
            y, y_lens = skill_responses(correct, lens, seqs)
            nodes, c = collapse_nodes(
                y, y_lens, modes, covs, gs_mode=gs, n_nodes=WHITEN_IS_NODES, seed=s
            )
            z = (nodes - found["prior_mean"]) / found["prior_sd"]
            lw = c - 0.5 * (z**2).sum(axis=1)
            w = np.exp(lw - lw.max())
            w /= w.sum()
            if 1.0 / (w**2).sum() < 50.0:
                return  # too few effective nodes for a covariance: keep Laplace's
            dev = nodes - w @ nodes
            cov[s] = (w[:, None] * dev).T @ dev

        # The likelihood kernel releases the GIL: skills in parallel.
        with ThreadPoolExecutor() as pool:
            list(pool.map(one, range(cov.shape[0])))
        return cov

    def _start_modes(self) -> dict:
        """Each skill's modes given the starting population
        (:func:`bktbayes.modes.skill_modes`), computed once per build."""
        if self._modes0 is None:
            from .modes import skill_modes

            groups = self.config.groups
            est = self._fast_estimate_cached()
            pts = self._initial_points(est)
            correct, lens, seq_skill = self._sequences()
            self._modes0 = skill_modes(
                correct,
                lens,
                seq_skill,
                np.array([float(pts[f"mu_{g}"]) for g in groups]),
                np.array([float(pts[f"sigma_{g}"]) for g in groups]),
                np.array([est["logits"][g] for g in groups]),
                gs_mode=_gs_modes()[self.config.guess_slip],
                n_samples=0,
            )
            self._modes0["prior_mean"] = np.array([float(pts[f"mu_{g}"]) for g in groups])
            self._modes0["prior_sd"] = np.array([float(pts[f"sigma_{g}"]) for g in groups])
        return self._modes0

    def _collapse_plan(self) -> dict[str, Any]:
        """Skills to integrate out (see ``collapse_multimodal`` and
        ``collapse_sparse``): modes and importance-sampling nodes of each, at
        the sampler's starting population."""
        from .modes import collapse_nodes, skill_responses

        cfg = self.config
        n_skill = len(self._packed.skills)
        correct, lens, seq_skill = self._sequences()
        gs = _gs_modes()[cfg.guess_slip]
        found = self._start_modes()
        # A second mode counts if a deep valley separates it and it is not
        # negligible (within COLLAPSE_MAX_DROP nats of the main mode's density).
        minor = (found["valley"][:, 1:] >= COLLAPSE_MIN_VALLEY) & (
            found["log_density"][:, 1:] >= found["log_density"][:, :1] - COLLAPSE_MAX_DROP
        )
        multimodal = np.nan_to_num(minor, nan=0).any(axis=1) & cfg.collapse_multimodal
        n_seq = np.bincount(seq_skill, minlength=n_skill)
        n_obs = np.bincount(seq_skill, weights=lens, minlength=n_skill)
        sparse = (n_seq < COLLAPSE_MAX_SEQUENCES) & (n_obs >= COLLAPSE_MIN_RESPONSES)
        sparse &= cfg.collapse_sparse
        skills = np.flatnonzero(multimodal | sparse)
        plan: dict[str, Any] = {
            "mask": np.isin(np.arange(n_skill), skills),
            "skills": skills,
            "reason": ["multimodal" if multimodal[s] else "few long sequences" for s in skills],
            "valley": [],
            "modes": [],
            "covs": [],
            "nodes": [],
            "c": [],
            "data": [],
        }
        for s in skills:
            k = int(found["n_modes"][s])
            y, y_lens = skill_responses(correct, lens, np.flatnonzero(seq_skill == s))
            modes, covs = found["logits"][s, :k], found["cov"][s, :k]
            nodes, c = collapse_nodes(y, y_lens, modes, covs, gs_mode=gs, seed=int(s))
            # The nodes are an iid sample: keep the first ones, as many as
            # give COLLAPSE_EFFECTIVE_NODES effective nodes at the starting
            # population (each costs the gradient ~7 ns).
            z = (nodes - found["prior_mean"]) / found["prior_sd"]
            lw = c - 0.5 * (z**2).sum(axis=1)
            w = np.exp(lw - lw.max())
            ess = w.sum() ** 2 / (w**2).sum()
            keep = min(len(c), int(np.ceil(len(c) * COLLAPSE_EFFECTIVE_NODES / ess)))
            nodes, c = nodes[:keep], c[:keep]
            # The deepest valley to a second mode (0 with one mode).
            v = found["valley"][s, 1:k]
            plan["valley"].append(float(np.nanmax(v)) if np.isfinite(v).any() else 0.0)
            plan["modes"].append(modes)
            plan["covs"].append(covs)
            plan["nodes"].append(nodes)
            plan["c"].append(c)
            plan["data"].append((y, y_lens))
        return plan

    def _draw_collapsed(self, idata, seed: int | None):
        """Give each draw the collapsed skills' logits, drawn from their
        posterior given that draw's population: a node resampled by its
        importance weight, then 20 independence Metropolis steps (exact for
        the conditional whatever the start); returns the updated DataTree."""
        from .modes import mode_jumps, nearest_mode

        cfg = self.config
        groups = cfg.groups
        plan = self._collapse
        post = idata["posterior"].to_dataset().copy(deep=True)
        n_chain, n_draw = post.sizes["chain"], post.sizes["draw"]
        n = n_chain * n_draw

        def flat(v):
            return np.asarray(post[v].transpose("chain", "draw", ...).values, float).reshape(n, -1)

        mean = np.concatenate([flat(f"mu_{g}") for g in groups], axis=1)
        sd = np.concatenate([flat(f"sigma_{g}") for g in groups], axis=1)
        logit = {g: flat(f"{g}_logit") for g in groups}
        rng = np.random.default_rng(seed)
        for q, s in enumerate(plan["skills"]):
            nodes, c = plan["nodes"][q], plan["c"][q]
            modes, covs = plan["modes"][q], plan["covs"][q]
            # The start only needs to be near the conditional (the Metropolis
            # steps below make the draw exact whatever it is): resample from
            # a random subset of the nodes, which is itself an importance
            # sample, at an eighth of the cost.
            sub = rng.choice(len(c), size=min(len(c), _SIR_NODES), replace=False)
            nodes_s, c_s = nodes[sub], c[sub]
            x0 = np.empty((n, len(groups)))
            for a in range(0, n, 256):
                b = min(a + 256, n)
                z = (nodes_s[None, :, :] - mean[a:b, None, :]) / sd[a:b, None, :]
                lw = c_s[None, :] - 0.5 * (z**2).sum(axis=2) - np.log(sd[a:b]).sum(axis=1)[:, None]
                pick = np.argmax(lw + rng.gumbel(size=lw.shape), axis=1)
                x0[a:b] = nodes_s[pick]
            y, lens = plan["data"][q]
            x, acc = mode_jumps(
                y,
                lens,
                x0,
                mean,
                sd,
                modes,
                covs,
                gs_mode=_gs_modes()[cfg.guess_slip],
                seed=int(rng.integers(2**31)),
            )
            for i, g in enumerate(groups):
                logit[g][:, s] = x[:, i]
            share = np.bincount(nearest_mode(x, modes, covs), minlength=len(modes)) / n
            self.fit_info["collapsed"][str(self._packed.skills[s])].update(
                modes=len(modes), share_of_draws=share.tolist(), accept=float(acc.mean())
            )
        shape = (n_chain, n_draw, len(self._packed.skills))
        cols = plan["skills"]
        for i, g in enumerate(groups):
            post[f"{g}_logit"].values[...] = logit[g].reshape(shape)
            raw = flat(f"{g}_raw")
            # Collapsed skills are non-centred: raw = (logit - mu) / sigma.
            raw[:, cols] = (logit[g][:, cols] - mean[:, i : i + 1]) / sd[:, i : i + 1]
            post[f"{g}_raw"].values[...] = raw.reshape(shape)
            if "skill_raw" in post:
                post["skill_raw"].values[..., i] = raw.reshape(shape)
        for name, v in natural_params(logit, cfg.guess_slip).items():
            if name in post:
                post[name].values[...] = v.reshape(shape)
        idata["posterior"] = post
        return idata

    def skill_modes(
        self, *, n_samples: int = 4000, seed: int = 0, min_share: float = 1e-3
    ) -> pd.DataFrame:
        """Skills whose posterior, given the population parameters, has
        more than one mode, and the share of each mode.

        R-hat sees a second mode only when some chains visit it and others
        do not; a fit whose chains all stay in the main mode passes while
        missing the rest. This looks for the modes directly (see
        :func:`bktbayes.modes.skill_modes`): the population means and
        scales are the posterior means of the fit (before a fit, the
        starting values the sampler would use); with ``pooling="none"`` the
        priors of the logits. Modes holding less than ``min_share`` of a
        skill's posterior are left out (a local maximum tens of nats down
        changes no estimate).

        Returns
        -------
        DataFrame
            One row per mode of each multimodal skill, main mode first:
            ``skill``, ``mode``, ``share`` (of that skill's conditional
            posterior), ``fit_share`` (of the fit's draws nearest that mode;
            nan before a fit), ``log_density`` (nats, relative to the main mode),
            ``valley`` (nats from that mode down to the lowest point of the
            straight segment to the main mode: NUTS crosses a valley of a
            nat or two freely, one of several nats rarely), ``ess`` (of
            the importance samples behind the shares) and the natural
            parameters at the mode. Empty if every skill has one.
        """
        from .modes import nearest_mode, skill_modes

        cfg = self.config
        if cfg.student_effects or cfg.item_effects:
            raise ValueError(
                "skill_modes needs skills that are independent given the population "
                "parameters: not available with student_effects or item_effects"
            )
        if self._packed is None:
            raise ValueError("no data: call build_model or fit first")
        groups = cfg.groups
        if cfg.pooling == "none":
            mu = [self.prior(f"mu_{g}")["mu"] for g in groups]
            sd = [self.prior(f"mu_{g}")["sigma"] for g in groups]
            source = "priors"
        elif self.idata is not None and "posterior" in self.idata:
            post = self.idata["posterior"]
            mu = [float(post[f"mu_{g}"].mean()) for g in groups]
            sd = [float(post[f"sigma_{g}"].mean()) for g in groups]
            source = "posterior means"
        else:
            pts = self._initial_points(self._fast_estimate_cached())
            mu = [float(pts[f"mu_{g}"]) for g in groups]
            sd = [float(pts[f"sigma_{g}"]) for g in groups]
            source = "starting values"
        correct, lens, seq_skill = self._sequences()
        x0 = np.array([self._fast_estimate_cached()["logits"][g] for g in groups])
        res = skill_modes(
            correct,
            lens,
            seq_skill,
            np.array(mu),
            np.array(sd),
            x0,
            gs_mode=_gs_modes()[cfg.guess_slip],
            n_samples=n_samples,
            seed=seed,
        )
        post = None
        if self.idata is not None and "posterior" in self.idata:
            post = self.idata["posterior"]
        rows = []
        for s in np.flatnonzero(res["n_modes"] >= 2):
            k = int(res["n_modes"][s])
            fit_share = np.full(k, np.nan)
            if post is not None:
                # The fit's draws of this skill, each counted for the mode
                # nearest in Mahalanobis distance (as the shares count).
                x = np.stack(
                    [post[f"{g}_logit"].isel(skill=s).values.ravel() for g in groups], axis=1
                )
                near = nearest_mode(x, res["logits"][s, :k], res["cov"][s, :k])
                fit_share = np.bincount(near, minlength=k) / x.shape[0]
            # A mode counts if the posterior or the fit puts weight on it.
            keep = (res["share"][s, :k] >= min_share) | (fit_share >= min_share)
            keep[0] = True
            if keep.sum() < 2:
                continue
            for j in np.flatnonzero(keep):
                lg = {g: res["logits"][s, j, i : i + 1] for i, g in enumerate(groups)}
                nat = natural_params(lg, cfg.guess_slip)
                rows.append(
                    {
                        "skill": self._packed.skills[s],
                        "mode": int(j),
                        "share": float(res["share"][s, j]),
                        "fit_share": float(fit_share[j]),
                        "log_density": float(res["log_density"][s, j] - res["log_density"][s, 0]),
                        "valley": float(res["valley"][s, j]),
                        "ess": float(res["ess"][s]),
                        **{
                            name: float(v[0])
                            for name, v in nat.items()
                            if name != "p_forget" or cfg.forgetting
                        },
                    }
                )
        cols = ["skill", "mode", "share", "fit_share", "log_density", "valley", "ess"]
        cols += ["p_init", "p_transit", "p_slip", "p_guess"] + (
            ["p_forget"] if cfg.forgetting else []
        )
        out = pd.DataFrame(rows, columns=cols)
        out.attrs["population"] = {
            "source": source,
            "mu": dict(zip(groups, mu, strict=True)),
            "sd": dict(zip(groups, sd, strict=True)),
        }
        return out

    # ------------------------------------------------------------------
    # Export and persistence.

    def export_params(self, *, force: bool = False, n_draws: int = 0, interval_prob: float = 0.94):
        """The fitted parameters as the serving system's :class:`ParamTable`.

        See :func:`bktbayes.export.export_params`.
        """
        from .export import export_params

        return export_params(self, force=force, n_draws=n_draws, interval_prob=interval_prob)

    def save(self, path: str | Path) -> Path:
        """Write the fit to a folder: ``posterior.zarr`` (the DataTree) and ``model.json``."""
        if self.idata is None:
            raise ValueError("nothing to save: fit the model first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.idata.to_zarr(path / "posterior.zarr", mode="w", consolidated=False)
        meta = {
            "format": "bktbayes-model",
            "format_version": MODEL_FORMAT_VERSION,
            "config": asdict(self.config),
            "fit_info": jsonable(self.fit_info),
            "diagnostics": jsonable(self.diagnostics),
            "skills": [str(s) for s in self._packed.skills],
            "users": [str(u) for u in self._packed.users],
        }
        (path / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> BKTModel:
        """Read a fit written by :meth:`save` (no pickle: zarr plus JSON)."""
        import xarray as xr

        path = Path(path)
        meta = json.loads((path / "model.json").read_text())
        version = meta.get("format_version")
        if meta.get("format") != "bktbayes-model" or version not in (1, MODEL_FORMAT_VERSION):
            raise ValueError(
                f"{path}: not a bktbayes model folder (format_version 1 or "
                f"{MODEL_FORMAT_VERSION}, got {version!r})"
            )
        cfg = dict(meta["config"])
        # Folders written before partial centring describe the binary rule's
        # model, which their draws come from.
        cfg.setdefault("partial_centering", False)
        cfg.setdefault("collapse_sparse", False)
        if version == 1 and cfg.get("guess_slip") == "ordered":
            # Version 1 built "ordered" guess first; its draws mean that.
            cfg["guess_slip"] = "ordered_guess_first"
        m = cls(**cfg)
        m.idata = xr.open_datatree(
            path / "posterior.zarr", engine="zarr", consolidated=False
        ).load()
        m.fit_info = meta.get("fit_info", {})
        m.diagnostics = meta.get("diagnostics")
        m._saved_skills = meta["skills"]
        return m


def chain_apart(chain_means: Sequence[float], ratio: float = 3.0) -> int | None:
    """The chain whose mean sits apart from the others', if one does.

    Parameters
    ----------
    chain_means : sequence of float, length n_chains
        One parameter's mean per chain.
    ratio : float
        A chain is apart when its mean is further from the nearest other
        chain's than ``ratio`` times the spread (max - min) of the others.

    Returns
    -------
    int or None
        Its index; None with fewer than three chains or no such chain.

    Notes
    -----
    One chain in a minor mode for part of the run moves its mean away while
    the others agree (seed 3 of the bundled fit: 0.04, 0.04, 0.36, 0.04);
    chains that all mix slowly scatter together (seed 7: -0.38, -0.44, -0.52,
    -0.56) and are not flagged.
    """
    m = np.asarray(chain_means, dtype=float)
    if m.size < 3 or not np.all(np.isfinite(m)):
        return None
    med = np.median(m)
    i = int(np.argmax(np.abs(m - med)))
    rest = np.delete(m, i)
    gap = float(np.min(np.abs(rest - m[i])))
    return i if gap > ratio * float(rest.max() - rest.min()) else None


def _empty_small_pages(shape: tuple[int, ...]) -> np.ndarray:
    """``np.empty(shape)`` without numpy's advice to use huge pages.

    numpy advises the kernel to back large arrays with 2 MiB pages. Where the
    kernel then compacts memory synchronously to find them (transparent huge
    pages' defrag setting "madvise", as on the benchmark machine), filling
    the bundled data's 1.3 GB pointwise log-likelihood took 3.3-4.3 s against
    1.9-2.1 s with ordinary pages (``draws_prefix_logp`` into a fresh array).
    """
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # a numpy without the switch: its default
        return np.empty(shape)
    previous = _set_madvise_hugepage(False)
    try:
        return np.empty(shape)
    finally:
        _set_madvise_hugepage(previous)


def _draw_rows(post, name: str) -> np.ndarray:
    """A posterior variable as C-contiguous (chain * draw, dim) rows."""
    v = np.asarray(post[name].transpose("chain", "draw", ...).values)
    return np.ascontiguousarray(v.reshape(v.shape[0] * v.shape[1], -1), dtype=np.float64)


def _padded(pk, values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Time-major padded responses (or ``values``, per input row) and mask
    for the scan twin."""
    length = int(pk.seq_len.max()) if pk.n_seqs else 0
    y = np.zeros((length, pk.n_seqs), dtype=np.int64)
    m = np.zeros((length, pk.n_seqs))
    if values is None:
        correct = np.empty(pk.n_events, dtype=np.int64)
        correct[pk.lock_row] = pk.lock_correct
    else:
        correct = np.asarray(values, dtype=np.int64)
    for q in range(pk.n_seqs):
        rows = pk.csr_row[pk.seq_start[q] : pk.seq_start[q] + pk.seq_len[q]]
        y[: rows.size, q] = correct[rows]
        m[: rows.size, q] = 1.0
    return y, m


def _labels(da) -> list[str]:
    dims = [d for d in da.dims]
    if not dims:
        return [da.name]
    idx = [da[d].values for d in dims]
    if len(dims) == 1:
        return [f"{da.name}[{v}]" for v in idx[0]]
    import itertools

    return [f"{da.name}[{','.join(map(str, t))}]" for t in itertools.product(*idx)]
