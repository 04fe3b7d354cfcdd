"""Shared by the end-to-end modules: one embedded Ray per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    # logical CPUs: 2 samplers + learner + reward actor, each asking for one, on a 2-core machine
    ray.init(num_cpus=6, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()
