"""Shared test setup: hypothesis profiles and the tiny-checkpoint fixture.

Profiles: ``ci`` (default under CI=true: few examples, no deadline), ``dev`` (default locally),
``thorough`` (many examples; choose with HYPOTHESIS_PROFILE=thorough).
"""
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def tiny_case(tmp_path_factory):
    """``get(name) -> (config, float64 roles as stored, reference model)`` for a tiny checkpoint of
    ``_builders.tiny_models.CASES``, written and loaded once per session (tests only read them)."""
    from _builders import tiny_models

    tmp = tmp_path_factory.mktemp("tiny")
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            cache[name] = tiny_models.build_case(name, tmp)
        return cache[name]

    return get
