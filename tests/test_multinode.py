"""Multi-node sites: a real run on a head plus one raylet per site, each labelled with its site.

The cluster is started with ``ray start`` exactly as the README's real-cluster commands do
(tests/local_sites.py), and ``curtail run CONFIG --address HEAD`` joins it from a subprocess:
this pytest process never joins a Ray cluster, so the session fixture ``ray_cluster`` in
conftest.py and this cluster never share a process. The run directory records the Ray node of
every site's workers (``summary.json`` → ``site_nodes``); each must be its own raylet.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from local_sites import REPO, LocalSites, run_dir_of, write_tiny_experiment

pytestmark = pytest.mark.slow

# Subprocess timeouts catch hangs; they are not speed goals: the module takes about 2 minutes
# on an otherwise idle 2-core machine, several times that when other Ray jobs share the cores.


@pytest.fixture(scope="module")
def cluster():
    sites = LocalSites({"a": 1, "b": 1}).start()
    yield sites
    sites.stop()


@pytest.fixture(scope="module")
def multinode_run(cluster, tmp_path_factory):
    config = write_tiny_experiment(tmp_path_factory.mktemp("multinode"))
    env = cluster.env()
    del env["RAY_ADDRESS"]  # the address comes from --address, as on a laptop joining a cluster
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "curtail",
            "run",
            str(config),
            "--address",
            cluster.address,
            "--json",
        ],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, (
        f"curtail run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )
    run_dir = run_dir_of(config)
    return json.loads((run_dir / "summary.json").read_text()), run_dir, cluster.nodes()


def test_each_site_trained_only_on_its_own_raylet(multinode_run):
    summary, _, nodes = multinode_run
    by_site = {node["labels"].get("site"): node["node_id"] for node in nodes}
    head = by_site.pop(None)
    assert set(by_site) == {"a", "b"}
    assert summary["site_nodes"] == {"a": [by_site["a"]], "b": [by_site["b"]]}
    assert head not in summary["site_nodes"]["a"] + summary["site_nodes"]["b"]


def test_the_run_trained_federated_across_the_two_raylets(multinode_run):
    summary, run_dir, _ = multinode_run
    assert summary["executor"] == "ray"
    assert summary["mode_hours"]["FEDERATED"] > 0.5 and summary["mode_hours"]["SINGLE"] > 0
    assert summary["num_syncs"] >= 2
    assert summary["ledger_trained_tokens"] == summary["tokens"] > 0
    assert (
        set(summary["tokens_by_site"]) == {"a", "b"} and min(summary["tokens_by_site"].values()) > 0
    )
    events = pd.read_csv(run_dir / "events.csv")
    assert {"a", "b"} <= set(events[events.event == "provision"].site)
    assert (run_dir / "model" / "config.json").is_file()


def test_a_cluster_without_a_site_resource_is_refused_by_name(cluster, tmp_path):
    """A config naming a site no node declares fails before training, naming the resource."""
    config = write_tiny_experiment(tmp_path, name="missing")
    config.write_text(
        config.read_text().replace("[sites.b]", "[sites.c]").replace('"a", "b"', '"a", "c"')
    )
    env = cluster.env()
    done = subprocess.run(
        [sys.executable, "-m", "curtail", "run", str(config)],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "site_c" in done.stderr and "ray start --address" in done.stderr
