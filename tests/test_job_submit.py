"""``ray job submit --working-dir . -- python -m curtail run CONFIG`` against a local multi-node cluster.

The cluster (tests/local_sites.py) is a head with the dashboard (the job server) plus one raylet
per site, with token authentication on and a token of its own (Ray ≥ 2.59's default; without
it ``ray job submit`` fails with "Missing authentication token"): the client must say
``RAY_AUTH_MODE=token`` and find the token (here ``RAY_AUTH_TOKEN_PATH``). The
job's driver joins the cluster through the ``RAY_ADDRESS`` Ray sets for it; the test reads the
run directory the job wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from local_sites import RAY, REPO, LocalSites, run_dir_of, write_tiny_experiment

pytestmark = pytest.mark.slow

# Subprocess timeouts catch hangs; they are not speed goals: the module takes about 2 minutes
# on an otherwise idle 2-core machine, several times that when other Ray jobs share the cores.


@pytest.fixture(scope="module")
def cluster():
    sites = LocalSites({"a": 1, "b": 1}).start()
    yield sites
    sites.stop()


def test_job_submit_runs_curtail_on_the_cluster(cluster, tmp_path):
    config = write_tiny_experiment(tmp_path, name="submitted")
    env = cluster.env()
    del env["RAY_ADDRESS"]  # the client names the dashboard, the job gets RAY_ADDRESS from Ray
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--working-dir",
        str(REPO),
        "--submission-id",
        "curtail-submit-test",
        "--",
        "python",
        "-m",
        "curtail",
        "run",
        str(config),
    ]
    done = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=540
    )
    logs = "\n".join(
        line for line in (done.stdout + done.stderr).splitlines() if "packaging.py" not in line
    )
    assert done.returncode == 0, logs[-8000:]
    assert "succeeded" in logs.lower()
    summary = json.loads((run_dir_of(config) / "summary.json").read_text())
    assert summary["executor"] == "ray"
    assert summary["tokens"] > 0 and summary["mode_hours"]["FEDERATED"] > 0
    nodes = {node["labels"].get("site"): node["node_id"] for node in cluster.nodes()}
    assert summary["site_nodes"] == {"a": [nodes["a"]], "b": [nodes["b"]]}
    # the job ran the uploaded working directory, not the installed package
    status = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import json; from ray.job_submission import JobSubmissionClient as C; "
                f"info = C({cluster.dashboard_url!r}).get_job_info('curtail-submit-test'); "
                "print(json.dumps({'status': str(info.status), 'runtime_env': info.runtime_env}))"
            ),
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    info = json.loads(status.stdout.strip().splitlines()[-1])
    assert info["status"].endswith("SUCCEEDED")
    assert info["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")


def test_job_submit_without_the_token_is_refused(cluster):
    env = cluster.env(RAY_AUTH_MODE="disabled")
    del env["RAY_ADDRESS"]
    done = subprocess.run(
        [RAY, "job", "list", "--address", cluster.dashboard_url],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "authentication" in (done.stdout + done.stderr).lower()
