import os

from hypothesis import HealthCheck, settings

# numba compiles on first use; no per-example deadline. Fixed derandomised
# profile so that a run is reproducible.
settings.register_profile(
    "bktbayes",
    deadline=None,
    derandomize=True,
    max_examples=int(os.environ.get("BKT_HYPOTHESIS_EXAMPLES", "200")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("bktbayes")
