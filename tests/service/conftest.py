"""Fixtures shared by the service test modules: one Ray session, one tiny base and its datasets,
and a job-store database URL per backend (``db_url``: SQLite, PostgreSQL)."""

import os

import pytest
from postgres_testlib import ENV_REQUIRE, PostgresServer, PostgresUnavailable
from service_testlib import make_tiny_base, write_classification, write_completion

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, namespace="ferrytune", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("svc")
    base = make_tiny_base(d / "base")
    write_classification(d / "cls.jsonl", 40, seed=1)
    write_completion(d / "cmp.jsonl", 40, seed=2)
    return d, base


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the session (see postgres_testlib), stopped at its end whatever happened.

    Where none can be started the PostgreSQL tests skip, saying why; with
    FERRYTUNE_REQUIRE_POSTGRES=1 (CI) they fail instead.
    """
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as e:
        if os.environ.get(ENV_REQUIRE) == "1":
            pytest.fail(f"{ENV_REQUIRE}=1 but no PostgreSQL server: {e}", pytrace=False)
        pytest.skip(f"PostgreSQL job store not tested: {e}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """A job-store URL of an empty database: a SQLite file in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ferrytune.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(url)
