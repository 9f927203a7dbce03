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
        resources={**{f"site_{s}": 2 for s in TEST_SITES}, "averager": 4},  # averager: training.averager_resource
        include_dashboard=False,
        object_store_memory=300 * 2**20,
        namespace="curtail-test",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def two_runs(ray_cluster, tmp_path_factory, request):
    """The tiny two-site run, twice with the same seed (uninterrupted baselines); the second
    also logs to TensorBoard and MLflow (tests/test_tracking.py reads it back) and measures its
    workers' CPU and memory power with CodeCarbon (tests/test_codecarbon.py)."""
    from runtime_fixtures import LIVE_READS, read_live_tracking, tiny_experiment

    import curtail

    tmp = tmp_path_factory.mktemp("runtime")
    experiment = tiny_experiment(tmp)
    first = curtail.run(experiment, output_dir=tmp / "first")
    tracked = {**experiment, "tracking": {"tensorboard": True, "mlflow": True},
               "training": {**experiment["training"], "host_power": "codecarbon"}}  # tests/test_codecarbon.py
    reads = request.config.stash.setdefault(LIVE_READS, [])

    # tests/test_tracking.py: visible while it runs. Read at the first report of trained tokens: a
    # federated phase of this run lasts under a second of wall on an idle machine (torch 2.13),
    # the site start-ups before it several seconds, and the coordinator reports after each exchange.
    def read_while_training(progress: dict) -> None:
        if not reads and progress.get("phase") == "training" and progress.get("tokens", 0) > 0:
            try:
                reads.append(read_live_tracking(tmp / "second"))
            except Exception as error:  # noqa: BLE001 -- the test reports it; the run goes on
                reads.append({"error": repr(error)})

    second = curtail.run(tracked, output_dir=tmp / "second", on_progress=read_while_training, progress_interval_s=0.5)
    return first, second


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) on 127.0.0.1 with bucket ``curtail-runs``; yields the
    URI prefix a run directory there is named by (credentials and endpoint in the URI, so Ray's
    workers need no environment)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="curtail-runs")
    yield f"s3://testing:testing@curtail-runs/{{path}}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()
