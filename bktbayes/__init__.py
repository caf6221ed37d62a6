"""bktbayes: Bayesian Knowledge Tracing, hierarchical in PyMC and fast for serving.

The package namespace is lazy: ``import bktbayes.tracing`` loads numpy and
numba only, while ``from bktbayes import BKTModel`` loads the research stack
on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access.
_LAZY: dict[str, str] = {
    "BKTParams": "bktbayes.params",
    "ParamTable": "bktbayes.params",
    "SkillStats": "bktbayes.params",
    "BayesianKnowledgeTracer": "bktbayes.tracing",
    "mastery_status": "bktbayes.tracing",
    "replay": "bktbayes.tracing",
    "load_events": "bktbayes.data",
    "simulate": "bktbayes.simulate",
    "BKTModel": "bktbayes.models",
    "export_params": "bktbayes.export",
}

__all__ = [  # noqa: RUF022 (grouped by module, as in _LAZY)
    "__version__",
    "BKTParams",
    "ParamTable",
    "SkillStats",
    "BayesianKnowledgeTracer",
    "mastery_status",
    "replay",
    "load_events",
    "simulate",
    "BKTModel",
    "export_params",
]

if TYPE_CHECKING:  # pragma: no cover
    from .data import load_events
    from .export import export_params
    from .models import BKTModel
    from .params import BKTParams, ParamTable, SkillStats
    from .simulate import simulate
    from .tracing import BayesianKnowledgeTracer, mastery_status, replay


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'bktbayes' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
