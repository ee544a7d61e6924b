"""Shared pytest fixtures.

- ``acdc_dir``: the real ACDC copy in ``../shared/data/acdc`` (skipped with a reason if absent;
  override with ``LOCALCL_ACDC``).
- ``ray_cluster``: ONE local Ray instance on 127.0.0.1 for the whole session (every ``fit()``
  costs ~20 s of start-up; a second ``ray.init`` would cost more). Tests that need a clean
  ``ray start --head`` (Jobs) start their own on other ports.
- ``--runslow`` enables tests marked ``slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Loopback only, no auth token, no usage stats: set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

REPO = Path(__file__).resolve().parents[1]
ACDC = Path(os.environ.get("LOCALCL_ACDC", REPO.parent / "shared" / "data" / "acdc"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def acdc_dir() -> Path:
    if not (ACDC / "dataset.json").is_file():
        pytest.skip(f"ACDC data not found at {ACDC} (set LOCALCL_ACDC)")
    return ACDC


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the session: 2 CPUs, capped object store, 127.0.0.1."""
    import ray

    from ray_jobs.train.trainer import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=2, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
