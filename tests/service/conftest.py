"""Fixtures shared by the service test modules: one Ray session, one tiny base and its datasets."""

import pytest
from service_testlib import make_tiny_base, write_classification, write_completion


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
