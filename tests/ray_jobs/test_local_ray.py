"""The local Ray instance localcl starts (``trainer.start_local_ray``) while another Ray
instance runs on the same host.

Regression: Ray Train V2's ``PlacementGroupCleaner`` (a detached actor that removes a run's
placement group when its controller dies, e.g. a Tune trial stopped by ASHA) calls the State
API with no address. In a plain ``ray.init()`` instance that lookup fails with "Found multiple
active Ray instances" as soon as a second instance runs on the host, the cleaner dies, and the
dead run's CPUs stay reserved for good: the next trials of a campaign wait forever (seen as a
hung ``localcl tune --resume``). ``start_local_ray`` puts the instance's own address in its
workers' environment.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ray_jobs.cluster.local_head import LocalHead


@pytest.fixture(scope="module")
def second_instance(ray_cluster):
    with LocalHead(num_cpus=1) as head:
        yield head


@pytest.mark.ray
def test_worker_state_api__finds_its_own_cluster_beside_another_instance(ray_cluster, second_instance) -> None:
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    def lookup() -> tuple[str | None, str]:
        import os

        from ray.util.state import list_nodes

        return os.environ.get("RAY_ADDRESS"), list_nodes()[0].node_id

    env_address, node_id = ray.get(lookup.remote())
    assert env_address == ray.get_runtime_context().gcs_address
    assert node_id == ray.get_runtime_context().get_node_id()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_train_run_whose_controller_dies__releases_its_cpus(ray_cluster, second_instance, tmp_path: Path) -> None:
    """A TorchTrainer fitted inside an actor (as a Tune trial does) that is killed mid-run gives
    its worker's CPU back: the placement-group cleaner works with two instances on the host."""
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Trial:
        def fit(self, storage: str, started: str) -> None:
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            def loop() -> None:
                Path(started).touch()
                time.sleep(600)

            TorchTrainer(
                loop,
                scaling_config=ScalingConfig(num_workers=1),
                run_config=RunConfig(storage_path=storage, name="killed"),
            ).fit()

    total = ray.cluster_resources()["CPU"]
    trial = Trial.remote()
    trial.fit.remote(str(tmp_path / "runs"), str(tmp_path / "started"))
    # Ray registers the run's placement group with the cleaner once the worker group has
    # started (a run killed before that leaks it whatever the address): wait for the loop.
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (tmp_path / "started").exists(), "the Train worker never started"
    time.sleep(2)
    ray.kill(trial)  # the controller (owned by the trial) dies ungracefully with it
    deadline = time.monotonic() + 90
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == total, (
        f"the dead run's placement group still holds CPUs: {ray.available_resources()}"
    )
