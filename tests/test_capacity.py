"""Site capacity under an autoscaler, against a fake cluster: what is asked for while a site is
provisioned, what is released when it drains, and the measured node-up and group-ready times."""

from __future__ import annotations

import csv
import time

import pytest

from curtail.runtime.capacity import (
    CAPACITY_FILE,
    NODES_FILE,
    SiteCapacity,
    live_site_nodes,
    site_bundles,
)


class FakeCluster:
    """``ray.nodes()`` and the autoscaler's standing request, by hand; a clock stepped by the test."""

    def __init__(self):
        self.nodes: list[dict] = [{"NodeID": "head", "Alive": True, "Resources": {"CPU": 0.0}}]
        self.requests: list[list[dict]] = []
        self.wall = 1000.0

    def launch(self, site: str) -> None:
        self.nodes.append({"NodeID": f"node-{len(self.nodes)}", "Alive": True,
                           "Resources": {"CPU": 1.0, f"site_{site}": 1.0}})

    def terminate(self, site: str) -> None:
        for node in self.nodes:
            if f"site_{site}" in node["Resources"]:
                node["Alive"] = False

    def capacity(self) -> SiteCapacity:
        return SiteCapacity(site_bundles(["a", "b"], 2, 0.5, 0.0), request=lambda bundles, selectors: self.requests.append(bundles),
                            list_nodes=lambda: self.nodes, clock=lambda: self.wall)


def test_bundles_are_what_a_site_worker_group_asks_for():
    assert site_bundles(["a"], 2, 0.5, 0.0) == {"a": [{"CPU": 0.5, "site_a": 1.0}] * 2}
    assert site_bundles(["b"], 1, 4, 1) == {"b": [{"CPU": 4, "GPU": 1, "site_b": 1.0}]}


def test_provisioned_sites_are_asked_for_and_drained_ones_released():
    cluster = FakeCluster()
    capacity = cluster.capacity()
    capacity.want("a", 0.0)
    capacity.want("a", 10.0)  # asked once per window
    capacity.want("b", 20.0)
    capacity.release("a")
    capacity.release("a")  # nothing more to release
    capacity.release_all()
    assert cluster.requests == [
        [{"CPU": 0.5, "site_a": 1.0}] * 2,
        [{"CPU": 0.5, "site_a": 1.0}] * 2 + [{"CPU": 0.5, "site_b": 1.0}] * 2,
        [{"CPU": 0.5, "site_b": 1.0}] * 2,
        [],
    ]
    assert [(w.site, w.requested_t_s) for w in capacity.windows] == [("a", 0.0), ("b", 20.0)]


def test_node_up_and_group_ready_are_measured_per_window(tmp_path):
    cluster = FakeCluster()
    capacity = cluster.capacity()
    capacity.want("a", 0.0)  # at wall 1000: no node of a yet
    cluster.wall = 1004.0
    assert capacity.sample() == {"a": 0, "b": 0}
    cluster.launch("a")
    cluster.wall = 1007.5
    assert capacity.sample() == {"a": 1, "b": 0}
    cluster.wall = 1012.0
    capacity.group_ready("a")
    cluster.wall = 1013.0
    capacity.group_ready("a")  # the first answer counts
    capacity.release("a")
    cluster.terminate("a")
    cluster.wall = 1100.0
    capacity.sample()
    capacity.want("a", 500.0)  # a second window: the node is gone, asked again
    [first, second] = capacity.windows
    assert (first.node_start_s, first.group_ready_s, first.released_wall_s) == (7.5, 12.0, 1013.0)
    assert second.nodes_before == 0 and second.node_start_s is None
    summary = capacity.summary()
    assert summary["a"] == {"windows": 2, "node_start_s_mean": 7.5, "node_start_s_max": 7.5,
                            "group_ready_s_mean": 12.0, "group_ready_s_max": 12.0}
    assert summary["b"]["windows"] == 0
    capacity.write(tmp_path)
    rows = list(csv.DictReader((tmp_path / CAPACITY_FILE).open()))
    assert [(r["site"], r["node_start_s"]) for r in rows] == [("a", "7.5"), ("a", "")]
    samples = list(csv.DictReader((tmp_path / NODES_FILE).open()))
    assert [(float(r["wall_s"]), r["site"], int(r["nodes"])) for r in samples if r["site"] == "a"] == [
        (1004.0, "a", 0), (1007.5, "a", 1), (1100.0, "a", 0)]


def test_a_site_whose_nodes_are_up_already_is_up_at_once():
    cluster = FakeCluster()
    cluster.launch("b")  # a fixed cluster: the site's node never goes
    capacity = cluster.capacity()
    capacity.want("b", 0.0)
    assert capacity.windows[0].nodes_before == 1 and capacity.windows[0].node_start_s == 0.0


def test_live_nodes_count_alive_nodes_declaring_the_site():
    nodes = [{"Alive": True, "Resources": {"site_a": 1}}, {"Alive": False, "Resources": {"site_a": 1}},
             {"Resources": {"site_a": 2, "site_b": 1}}]
    assert live_site_nodes(nodes, ["a", "b", "c"]) == {"a": 2, "b": 1, "c": 0}


def test_the_sampler_runs_in_the_background_and_stops():
    cluster = FakeCluster()
    capacity = SiteCapacity(site_bundles(["a"], 1, 1, 0), request=lambda bundles, selectors: cluster.requests.append(bundles),
                            list_nodes=lambda: cluster.nodes, sample_s=0.01)
    capacity.start()
    try:
        for _ in range(200):
            if len(capacity.samples) >= 3:
                break
            time.sleep(0.01)
    finally:
        capacity.stop()
    count = len(capacity.samples)
    assert count >= 3
    capacity.stop()
    assert len(capacity.samples) == count


@pytest.mark.parametrize("broken", [RuntimeError("the GCS went away")])
def test_a_failing_sample_does_not_stop_the_sampler(broken):
    calls = []

    def nodes():
        calls.append(1)
        if len(calls) == 1:
            raise broken
        return []

    capacity = SiteCapacity(site_bundles(["a"], 1, 1, 0), request=lambda bundles, selectors: None, list_nodes=nodes, sample_s=0.01)
    capacity.start()
    for _ in range(200):
        if len(calls) >= 3:
            break
        time.sleep(0.01)
    capacity.stop()
    assert len(calls) >= 3


def test_a_node_left_out_of_one_listing_is_still_counted_and_a_dead_one_is_not():
    """A busy GCS can answer ``ray.nodes()`` without a node that is up: the node is carried at its
    last state. Ray lists a node that died as dead, and then it counts no more."""
    head = {"NodeID": "h", "Alive": True, "Resources": {"CPU": 0.0}}
    b = {"NodeID": "n1", "Alive": True, "Resources": {"CPU": 1.0, "site_b": 1.0}}
    listings = iter([[head, b], [], [head], [head, {**b, "Alive": False}], [head]])
    capacity = SiteCapacity(site_bundles(["b"], 1, 0.5, 0.0), request=lambda bundles, selectors: None,
                            list_nodes=lambda: next(listings))
    assert [capacity.sample()["b"] for _ in range(5)] == [1, 1, 1, 0, 0]
