import os

import pytest
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


# Databases for the serving tests: SQLite always; PostgreSQL at the URL that
# `make test` / .ci/run export after starting a throwaway server on loopback.
PG_URL = os.environ.get("BKTBAYES_TEST_PG_URL")
REQUIRE_PG = os.environ.get("BKTBAYES_REQUIRE_PG") == "1"


def _reset_pg(url: str) -> None:
    import sqlalchemy as sa

    from bktbayes.store import metadata

    engine = sa.create_engine(url)
    metadata.drop_all(engine)
    engine.dispose()


def pytest_generate_tests(metafunc):
    if "db_url" in metafunc.fixturenames:
        metafunc.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


def _empty_pg() -> str:
    """The test PostgreSQL server with the bktbayes tables dropped (skipped
    when no server is configured, an error when BKTBAYES_REQUIRE_PG=1)."""
    if PG_URL is None:
        if REQUIRE_PG:
            pytest.fail("BKTBAYES_REQUIRE_PG=1 but BKTBAYES_TEST_PG_URL is not set")
        pytest.skip("no PostgreSQL server: set BKTBAYES_TEST_PG_URL (make test starts one)")
    _reset_pg(PG_URL)
    return PG_URL


@pytest.fixture
def db_url(request, tmp_path):
    """An empty database: a SQLite file, or the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mastery.db'}"
    return _empty_pg()


@pytest.fixture
def pg_url():
    """The test PostgreSQL server, emptied (for PostgreSQL-only features)."""
    return _empty_pg()
