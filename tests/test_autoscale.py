"""Sites that scale to zero: a real run on a head whose autoscaler launches each site's node
when the site's window opens and removes it after the site drains.

The cluster is ``LocalSites(autoscale=True)`` (tests/local_sites.py): a head started with
``ray start --head --autoscaling-config`` on Ray's fake multi-node provider, whose node types are
the sites (their label and resource, 0 to 1 node each, a 3 s idle timeout); the provider launches
a node as a raylet on this machine. No site node is up when the run starts. The run is
``curtail run CONFIG`` joining through ``RAY_ADDRESS`` (``training.autoscaled_sites = true``):
the tiny two-site experiment, where a drains at 01:20 and b trains alone to the budget.
This pytest process never joins this cluster (see tests/local_sites.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd
import pytest
from local_sites import REPO, STEP_TOKENS, LocalSites, run_dir_of, write_tiny_experiment

pytestmark = pytest.mark.slow

BUDGET = 31 * STEP_TOKENS  # reached while b trains alone, after a drained


@pytest.fixture(scope="module")
def cluster():
    sites = LocalSites({"a": 1, "b": 1}, autoscale=True).start()
    yield sites
    sites.stop()


@pytest.fixture(scope="module")
def autoscaled_run(cluster, tmp_path_factory):
    config = write_tiny_experiment(tmp_path_factory.mktemp("autoscaled"), name="autoscaled", token_budget=BUDGET,
                                   autoscaled_sites=True)
    before = [node for node in cluster.nodes() if node["labels"].get("site")]
    done = subprocess.run([sys.executable, "-m", "curtail", "run", str(config)], check=False, cwd=REPO,
                          env=cluster.env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-8000:]
    run_dir = run_dir_of(config)
    after, deadline = [], time.monotonic() + 60
    while True:  # the autoscaler removes the idle site nodes after the run
        after = [node for node in cluster.nodes() if node["labels"].get("site")]
        if not after or time.monotonic() > deadline:
            break
        time.sleep(1)
    return json.loads((run_dir / "summary.json").read_text()), run_dir, before, after


def test_no_site_node_before_the_run_and_none_after(autoscaled_run):
    _, _, before, after = autoscaled_run
    assert before == [] and after == []


def test_the_run_reaches_its_budget_on_launched_nodes(autoscaled_run):
    summary, _, _, _ = autoscaled_run
    assert summary["completed"] and summary["tokens"] == BUDGET
    assert summary["ledger_trained_tokens"] == summary["tokens"]
    assert summary["ledger_trained_by_site"] == {k: int(v) for k, v in summary["tokens_by_site"].items()}
    [a], [b] = summary["site_nodes"]["a"], summary["site_nodes"]["b"]
    assert a != b and a.startswith("ffff") and b.startswith("ffff")  # ids the fake provider gives its nodes
    assert summary["site_failures"] == 0


def test_site_nodes_follow_the_calendar(cluster, autoscaled_run):
    """No site node before its request; at least one from its node's start to its drain; none
    once drained, after the autoscaler's idle timeout. docs/DEPLOYMENT.md quotes the times."""
    summary, run_dir, _, _ = autoscaled_run
    windows = pd.read_csv(run_dir / "site_capacity.csv")
    counts = pd.read_csv(run_dir / "site_node_counts.csv")
    print(windows.to_string())
    assert sorted(windows.site) == ["a", "b"] and (windows.nodes_before == 0).all()
    assert (windows.node_start_s > 0).all() and (windows.group_ready_s >= windows.node_start_s).all()
    slack_s = cluster.idle_timeout_s + 10  # the idle timeout, the autoscaler's polling, the raylet's exit
    for window in windows.itertuples():
        mine = counts[counts.site == window.site]
        assert (mine[mine.wall_s < window.requested_wall_s].nodes == 0).all()
        inside = mine[(mine.wall_s >= window.nodes_up_wall_s) & (mine.wall_s <= window.released_wall_s)]
        assert len(inside) >= 2 and (inside.nodes >= 1).all()
        assert (mine[mine.wall_s > window.released_wall_s + slack_s].nodes == 0).all()
    released = dict(zip(windows.site, windows.released_wall_s))
    assert released["a"] < released["b"]  # a drained while b trained on
    events = pd.read_csv(run_dir / "events.csv")
    assert list(events[events.event == "drain"].site) == ["a"]  # b stopped at the budget, not by a drain
    assert summary["site_capacity"]["a"]["windows"] == 1 and summary["site_capacity"]["a"]["node_start_s_max"] > 0
    # the start-ups are accounted as measured (request to group ready), beside the model's
    measured = summary["provisioning_measured"]
    for window in windows.itertuples():
        assert measured["by_site"][window.site]["measured_s"] == pytest.approx(window.group_ready_s)
    assert measured["total"]["num_windows"] == 2 and measured["total"]["measured_kwh"] > 0
    assert summary["emissions_kg_measured_provisioning"] == pytest.approx(
        summary["emissions_kg"] + measured["total"]["difference_kg"])


def test_a_site_whose_nodes_never_come_fails_and_the_run_goes_on(cluster, tmp_path):
    """Site c has no node type: when its window opens the autoscaler cannot launch anything, its
    worker group waits ``training.capacity_timeout_s`` and the site fails — a ``failure`` event
    naming the missing capacity, at most three per window, then benched — while a trains the
    budget alone. Its capacity windows are recorded, never ready, and accounted as such."""
    budget = 8 * STEP_TOKENS
    config = write_tiny_experiment(tmp_path, name="no-capacity", token_budget=budget, autoscaled_sites=True)
    config.write_text(config.read_text().replace("[sites.b]", "[sites.c]").replace('"a", "b"', '"a", "c"')
                      .replace("autoscaled_sites = true", "autoscaled_sites = true\ncapacity_timeout_s = 8"))
    done = subprocess.run([sys.executable, "-m", "curtail", "run", str(config)], check=False, cwd=REPO,
                          env=cluster.env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-8000:]
    run_dir = run_dir_of(config)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["tokens"] == budget == summary["ledger_trained_tokens"]
    assert summary["ledger_trained_by_site"] == {"a": budget}
    events = pd.read_csv(run_dir / "events.csv", keep_default_na=False)
    failures = [json.loads(d) for d in events[(events.event == "failure") & (events.site == "c")].details]
    assert 1 <= len(failures) <= 3
    assert all("no capacity" in f["reason"] and "capacity_timeout_s = 8" in f["reason"] for f in failures)
    assert failures[-1]["benched"] == (len(failures) == 3)
    windows = pd.read_csv(run_dir / "site_capacity.csv")
    mine = windows[windows.site == "c"]
    assert len(mine) == len(failures) and mine.group_ready_wall_s.isna().all() and mine.nodes_up_wall_s.isna().all()
    assert summary["provisioning_measured"]["by_site"]["c"]["num_never_ready"] == len(failures)
    print(f"no capacity: {len(failures)} failures of c, first after "
          f"{mine.released_wall_s.iloc[0] - mine.requested_wall_s.iloc[0]:.1f} s; a trained {summary['tokens']} tokens")
