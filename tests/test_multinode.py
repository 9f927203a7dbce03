"""Multi-node sites and ``ray job submit``: a real run on a head plus one raylet per site.

The cluster is started with ``ray start`` exactly as the README's real-cluster commands do
(tests/local_sites.py): a head with the dashboard (the job server) plus one raylet per site,
each labelled with its site, with token authentication on and a token of its own (Ray ≥ 2.59's
default; without it ``ray job submit`` fails with "Missing authentication token"): the client
must say ``RAY_AUTH_MODE=token`` and find the token (here ``RAY_AUTH_TOKEN_PATH``).

The run is ``ray job submit --working-dir . -- python -m curtail run CONFIG``: the job's driver
joins the cluster through the ``RAY_ADDRESS`` Ray sets for it, and the tests read the run
directory it wrote. The run directory records the Ray node of every site's workers
(``summary.json`` → ``site_nodes``); each must be its own raylet. The run's two averaging actors
ask for the ``averager`` resource each raylet declares, so each runs on its own raylet too
(``averager_nodes``). ``curtail run CONFIG`` joining
through ``RAY_ADDRESS`` from a subprocess is checked with a config whose site no node declares.
This pytest process never joins this cluster, so the session fixture ``ray_cluster`` in
conftest.py and this cluster never share a process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from local_sites import RAY, REPO, LocalSites, run_dir_of, write_tiny_experiment

pytestmark = pytest.mark.slow

# Subprocess timeouts catch hangs; they are not speed goals: the module takes about 2 minutes
# on an otherwise idle 2-core machine, several times that when other Ray jobs share the cores.


@pytest.fixture(scope="module")
def cluster():
    sites = LocalSites({"a": 1, "b": 1}, node_resources={"averager": 1}).start()
    yield sites
    sites.stop()


@pytest.fixture(scope="module")
def submitted_run(cluster, tmp_path_factory):
    config = write_tiny_experiment(tmp_path_factory.mktemp("submitted"), name="submitted",
                                   training='averager_shards = 2\naverager_resource = "averager"')
    env = cluster.env()
    del env["RAY_ADDRESS"]  # the client names the dashboard, the job gets RAY_ADDRESS from Ray
    command = [
        RAY, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
        "--submission-id", "curtail-submit-test", "--", "python", "-m", "curtail", "run", str(config),
    ]
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    logs = "\n".join(line for line in (done.stdout + done.stderr).splitlines() if "packaging.py" not in line)
    assert done.returncode == 0, logs[-8000:]
    run_dir = run_dir_of(config)
    return json.loads((run_dir / "summary.json").read_text()), run_dir, cluster.nodes(), logs, env


def test_job_submit_runs_the_uploaded_working_directory(cluster, submitted_run):
    summary, _, _, logs, env = submitted_run
    assert "succeeded" in logs.lower()
    assert summary["executor"] == "ray"
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
        check=False, env=env, capture_output=True, text=True, timeout=120,
    )
    info = json.loads(status.stdout.strip().splitlines()[-1])
    assert info["status"].endswith("SUCCEEDED")
    assert info["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")  # not the installed package


def test_each_site_trained_only_on_its_own_raylet(submitted_run):
    summary, _, nodes, _, _ = submitted_run
    by_site = {node["labels"].get("site"): node["node_id"] for node in nodes}
    head = by_site.pop(None)
    assert set(by_site) == {"a", "b"}
    assert summary["site_nodes"] == {"a": [by_site["a"]], "b": [by_site["b"]]}
    assert head not in summary["site_nodes"]["a"] + summary["site_nodes"]["b"]


def test_the_averaging_actors_ran_on_the_nodes_declaring_their_resource(submitted_run):
    summary, _, nodes, _, _ = submitted_run
    declaring = {node["node_id"] for node in nodes if node["resources"].get("averager")}
    assert len(summary["averager_shards"]) == 2
    assert len(set(summary["averager_nodes"])) == 2 and set(summary["averager_nodes"]) == declaring


def test_the_run_trained_federated_across_the_two_raylets(submitted_run):
    summary, run_dir, _, _, _ = submitted_run
    assert summary["mode_hours"]["FEDERATED"] > 0.5 and summary["mode_hours"]["SINGLE"] > 0
    assert summary["num_syncs"] >= 2
    assert summary["ledger_trained_tokens"] == summary["tokens"] > 0
    assert set(summary["tokens_by_site"]) == {"a", "b"} and min(summary["tokens_by_site"].values()) > 0
    events = pd.read_csv(run_dir / "events.csv")
    assert {"a", "b"} <= set(events[events.event == "provision"].site)
    assert (run_dir / "model" / "config.json").is_file()


def test_job_submit_without_the_token_is_refused(cluster):
    env = cluster.env(RAY_AUTH_MODE="disabled")
    del env["RAY_ADDRESS"]
    done = subprocess.run(
        [RAY, "job", "list", "--address", cluster.dashboard_url],
        check=False, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "authentication" in (done.stdout + done.stderr).lower()


def test_a_cluster_without_a_site_resource_is_refused_by_name(cluster, tmp_path):
    """A config naming a site no node declares fails before training, naming the resource."""
    config = write_tiny_experiment(tmp_path, name="missing")
    config.write_text(
        config.read_text().replace("[sites.b]", "[sites.c]").replace('"a", "b"', '"a", "c"')
    )
    done = subprocess.run(
        [sys.executable, "-m", "curtail", "run", str(config)],
        check=False, cwd=REPO, env=cluster.env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    assert "site_c" in done.stderr and "ray start --address" in done.stderr


def test_sites_pinned_by_labels_train_on_their_labelled_raylets(cluster, tmp_path):
    """``training.site_pinning = "labels"``: each site's two workers ask for CPUs and the label
    ``site=NAME`` only. The nodes declare ``site_NAME: 1``, so the same run pinned by resources
    is refused (two workers, one site resource: tests/test_reliability.py); by labels both
    workers of each site train on its own raylet, the control plane on the head. The two
    workers shard the model (``parallelism = "fsdp"``, gloo): each loads, sends and publishes
    its rows, and every sync leaves the sites with the same weights."""
    config = write_tiny_experiment(tmp_path, name="labelled")
    config.write_text(config.read_text().replace(
        "cpus_per_worker = 0.5\n",
        'cpus_per_worker = 0.5\nworkers_per_site = 2\nsite_pinning = "labels"\nparallelism = "fsdp"\n'))
    done = subprocess.run([sys.executable, "-m", "curtail", "run", str(config), "--json"],
                          check=False, cwd=REPO, env=cluster.env(), capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout)
    by_site = {node["labels"].get("site"): node["node_id"] for node in cluster.nodes()}
    assert summary["site_nodes"] == {"a": [by_site["a"]], "b": [by_site["b"]]}
    assert summary["ledger_trained_tokens"] == summary["tokens"] > 0
    assert summary["num_syncs"] >= 1 and min(summary["tokens_by_site"].values()) > 0
    assert summary["weight_digests"] and all(len(entry["digests"]) == 1 for entry in summary["weight_digests"])
