"""From a fitted posterior to the serving system's parameter table (JSON).

Per skill: the posterior mean of each probability (what the tracer uses), its
median, sd and a central interval (94% by default), and the observation
counts behind it. The population-level parameters become the default for
skills the table has never seen: for a hierarchical fit, the posterior mean of
the probabilities implied by the population means (``mu_*``); without pooling,
the mean over skills of the per-skill estimates (the file's metadata says
which). The model configuration, the fit's diagnostics and the data's
provenance go into the metadata.

Export refuses a fit whose diagnostics fail (R-hat > 1.01 or divergences)
unless ``force=True``, which is then recorded in the file.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from .params import PARAM_NAMES, BKTParams, ParamTable, SkillStats, jsonable

if TYPE_CHECKING:  # pragma: no cover
    from .models import BKTModel

__all__ = ["ExportError", "export_params"]


class ExportError(ValueError):
    """The fit is not fit for serving (diagnostics fail) and export was not forced."""


def _draws(post, name: str) -> np.ndarray:
    da = post[name]
    return da.stack(sample=("chain", "draw")).transpose("sample", ...).values


def export_params(
    model: BKTModel,
    *,
    force: bool = False,
    n_draws: int = 0,
    interval_prob: float = 0.94,
) -> ParamTable:
    """Build the :class:`~bktbayes.params.ParamTable` of a fitted model.

    Parameters
    ----------
    model : BKTModel
        A fitted model (``model.idata`` set).
    force : bool
        Export even if the diagnostics fail; recorded as ``metadata.forced``.
    n_draws : int
        Also export this many posterior draws (evenly thinned) of every
        skill's and the default's parameters (and of the items' guess and
        slip, for an item-level fit), so the tracer can report credible
        intervals of P(mastery) (``replay(..., interval=0.9)``).
    interval_prob : float
        Probability of the central interval stored per parameter.

    Returns
    -------
    ParamTable
    """
    from .models import GROUPS, natural_params

    if model.idata is None:
        raise ExportError("the model has not been fitted")
    if n_draws < 0 or n_draws == 1:
        raise ValueError("n_draws must be 0 (none) or at least 2")
    diag = model.diagnostics or model.check_diagnostics(warn=False)
    failing = diag["max_rhat"] > 1.01 or diag["divergences"] > 0
    if failing and not force:
        raise ExportError(
            f"refusing to export a fit with max R-hat {diag['max_rhat']:.3f} and "
            f"{diag['divergences']} divergences; fix the fit or pass force=True "
            "(recorded in the file)"
        )
    post = model.idata["posterior"]
    const = model.idata["constant_data"]
    skills = [str(s) for s in post["p_init"]["skill"].values]
    cfg = model.config
    draws = {}
    for name in PARAM_NAMES:
        if name in post:
            draws[name] = _draws(post, name)
        else:
            draws[name] = np.zeros_like(draws["p_init"])
    seq_skill = np.asarray(const["seq_skill"].values).astype(str)
    seq_len = np.asarray(const["seq_len"].values)
    lo_q, hi_q = (1 - interval_prob) / 2, 1 - (1 - interval_prob) / 2
    table_skills: dict[str, BKTParams] = {}
    stats: dict[str, SkillStats] = {}
    for i, s in enumerate(skills):
        col = {k: v[:, i] for k, v in draws.items()}
        mean = {k: float(np.mean(v)) for k, v in col.items()}
        table_skills[s] = BKTParams(**mean)
        in_skill = seq_skill == s
        stats[s] = SkillStats(
            sd={k: float(np.std(v)) for k, v in col.items()},
            median={k: float(np.median(v)) for k, v in col.items()},
            lower={k: float(np.quantile(v, lo_q)) for k, v in col.items()},
            upper={k: float(np.quantile(v, hi_q)) for k, v in col.items()},
            interval_prob=interval_prob,
            n_obs=int(seq_len[in_skill].sum()),
            n_sequences=int(in_skill.sum()),
        )
    if cfg.pooling == "hierarchical":
        groups = GROUPS if cfg.forgetting else GROUPS[:4]
        mu = {g: _draws(post, f"mu_{g}") for g in groups}
        nat = natural_params(mu, cfg.guess_slip)
        default = BKTParams(**{k: float(np.mean(nat[k])) for k in PARAM_NAMES})
        default_source = "posterior mean of the population-level parameters (mu_*)"
    else:
        default = BKTParams(
            **{
                k: float(np.mean([getattr(p, k) for p in table_skills.values()]))
                for k in PARAM_NAMES
            }
        )
        default_source = "mean over skills of the per-skill posterior means (pooling='none')"
    n_total = draws["p_init"].shape[0]
    draws_doc = None
    idx = None
    if n_draws:
        idx = np.linspace(0, n_total - 1, min(n_draws, n_total)).round().astype(int)
        if cfg.pooling == "hierarchical":
            dflt = {k: np.asarray(nat[k])[idx] for k in PARAM_NAMES}
        else:
            dflt = {k: draws[k][idx].mean(axis=1) for k in PARAM_NAMES}
        draws_doc = {
            "n": len(idx),
            "default": {k: [float(v) for v in dflt[k]] for k in PARAM_NAMES},
            "skills": {
                s: {k: [float(v) for v in draws[k][idx, i]] for k in PARAM_NAMES}
                for i, s in enumerate(skills)
            },
        }
    students = None
    if cfg.student_effects:
        students = {}
        for kind in ("init", "transit"):
            name = f"student_{kind}"
            if name in post:
                mean = post[name].mean(("chain", "draw"))
                users = [str(u) for u in mean["user"].values]
                students[kind] = {u: float(v) for u, v in zip(users, mean.values, strict=True)}
    items = None
    if cfg.item_effects:
        # The items' draws travel with the skills' (the same thinned draws),
        # so intervals from the tracer carry the items' uncertainty too.
        items, item_draws = _export_items(post, const, skills, cfg.guess_slip, idx)
        if draws_doc is not None:
            draws_doc["items"] = item_draws
    metadata: dict[str, Any] = {
        "config": asdict(cfg),
        "diagnostics": jsonable(diag),
        "fit": jsonable(model.fit_info),
        "default_source": default_source,
        "estimate": "posterior mean",
        "forced": bool(force and failing),
        "n_observations": int(seq_len.sum()),
        "n_sequences": len(seq_len),
    }
    metadata["items"] = (
        "posterior-mean guess and slip of the (skill, item) pairs with at least "
        f"{cfg.item_min_obs} training responses; other items use their skill's"
        if items is not None
        else None
    )
    metadata["students"] = (
        "posterior-mean logit offsets for the students in the fit; new students get 0"
        if students
        else None
    )
    return ParamTable(
        table_skills,
        default,
        stats=stats,
        model="bktbayes.BKTModel",
        metadata=metadata,
        students=students,
        draws=draws_doc,
        items=items,
    )


def _export_items(
    post, const, skills: list[str], guess_slip: str, idx: np.ndarray | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]] | None]:
    """Posterior-mean guess and slip per (skill, item) of an item-level fit,
    and (with ``idx``, the thinned draw indices) their draws."""
    from .models import natural_params

    item_skill = np.asarray(const["item_skill"].values).astype(str)
    item_id = np.asarray(const["item_id"].values).astype(str)
    pos = {s: i for i, s in enumerate(skills)}
    sk = np.array([pos[s] for s in item_skill], dtype=np.int64)
    lg = {}
    for g in ("guess", "slip"):
        z = _draws(post, f"item_{g}_z")
        centered = np.asarray(const["item_centered"].values).astype(bool)
        off = np.where(centered, z, _draws(post, f"sigma_item_{g}")[:, None] * z)
        lg[g] = _draws(post, f"{g}_logit")[:, sk] + off
    nat = natural_params({"init": lg["guess"], "transit": lg["guess"], **lg}, guess_slip)
    g_mean = nat["p_guess"].mean(axis=0)
    s_mean = nat["p_slip"].mean(axis=0)
    out: dict[str, dict[str, Any]] = {}
    drawn: dict[str, dict[str, Any]] | None = {} if idx is not None else None
    for k, (s, i, g, sl) in enumerate(zip(item_skill, item_id, g_mean, s_mean, strict=True)):
        out.setdefault(s, {})[i] = {"p_guess": float(g), "p_slip": float(sl)}
        if drawn is not None:
            drawn.setdefault(s, {})[i] = {
                "p_guess": [float(v) for v in nat["p_guess"][idx, k]],
                "p_slip": [float(v) for v in nat["p_slip"][idx, k]],
            }
    return out, drawn
