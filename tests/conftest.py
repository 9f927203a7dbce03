"""Shared fixtures: one small local Ray cluster per test session (Ray tests are marked slow)."""

from __future__ import annotations

import os

import pytest

TEST_SITES = ("a", "b", "c")


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray cluster declaring one resource per test site, shared by all Ray tests."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        resources={f"site_{s}": 2 for s in TEST_SITES},
        include_dashboard=False,
        object_store_memory=300 * 2**20,
        namespace="curtail-test",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def two_runs(ray_cluster, tmp_path_factory):
    """The tiny two-site run, twice with the same seed (uninterrupted baselines); the second
    also logs to TensorBoard and MLflow (tests/test_tracking.py reads it back)."""
    from runtime_fixtures import tiny_experiment

    import curtail

    tmp = tmp_path_factory.mktemp("runtime")
    experiment = tiny_experiment(tmp)
    first = curtail.run(experiment, output_dir=tmp / "first")
    tracked = {**experiment, "tracking": {"tensorboard": True, "mlflow": True}}
    second = curtail.run(tracked, output_dir=tmp / "second")
    return first, second
