"""Placement without a cluster: the control plane's options, and both site pinnings (resources,
labels) through what the runtime asks of them — worker requests, autoscaler requests, which
nodes are a site's, capacity checks. tests/test_multinode.py runs a label-pinned run for real."""

from __future__ import annotations

import os

import pytest

from curtail.config import TrainingConfig
from curtail.runtime.capacity import SiteCapacity, live_site_nodes, site_bundles
from curtail.runtime.cluster import (
    MIN_OBJECT_STORE_BYTES,
    averager_problems,
    capacity_problems,
    object_store_bytes,
)
from curtail.runtime.placement import NODE_ID_LABEL, SitePinning, control_plane, labels_supported

LABELS = SitePinning("labels")
NODE = "ab" * 28  # a node id's form


def _node(labels: dict[str, str] | None = None, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": "n", "Alive": alive, "Resources": resources, "Labels": labels or {}}


def test_the_control_plane_is_pinned_by_the_node_id_label_where_ray_has_labels():
    assert control_plane(NODE, version="2.60.0") == {"label_selector": {NODE_ID_LABEL: NODE}}
    older = control_plane(NODE, version="2.48.1")["scheduling_strategy"]
    assert (older.node_id, older.soft) == (NODE, False)
    assert labels_supported("2.49.0") and not labels_supported("2.9.3")


def test_a_worker_asks_for_its_site_by_resource_or_by_label():
    by_resources = SitePinning().scaling("a", 2, 0.5, 0.0)
    assert by_resources == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 0.5, "site_a": 1.0}}
    assert LABELS.scaling("b", 1, 4, 1) == {"num_workers": 1, "use_gpu": True,
                                            "resources_per_worker": {"CPU": 4, "GPU": 1}, "label_selector": {"site": "b"}}
    assert site_bundles(["b"], 2, 4, 1, LABELS) == {"b": [{"CPU": 4, "GPU": 1}] * 2}


def test_the_autoscaler_is_asked_for_labelled_bundles_with_their_selectors():
    requests = []
    capacity = SiteCapacity(site_bundles(["a", "b"], 2, 0.5, 0.0, LABELS),
                            request=lambda bundles, selectors: requests.append((bundles, selectors)),
                            list_nodes=list, clock=lambda: 0.0, pinning=LABELS)
    capacity.want("b", 0.0)
    capacity.want("a", 1.0)
    capacity.release("b")
    assert requests == [
        ([{"CPU": 0.5}] * 2, [{"site": "b"}] * 2),
        ([{"CPU": 0.5}] * 4, [{"site": "a"}] * 2 + [{"site": "b"}] * 2),
        ([{"CPU": 0.5}] * 2, [{"site": "a"}] * 2),
    ]


def test_a_sites_nodes_are_the_ones_with_its_label():
    nodes = [_node({"site": "a"}, CPU=1), _node({"site": "a"}, alive=False, CPU=1), _node({"site": "b"}, CPU=1),
             _node({}, CPU=2, site_a=1)]  # a resource alone does not make a labelled site's node
    assert live_site_nodes(nodes, ["a", "b", "c"], LABELS) == {"a": 1, "b": 1, "c": 0}
    assert live_site_nodes(nodes, ["a", "b"]) == {"a": 1, "b": 0}  # pinned by resources


def test_capacity_of_label_pinned_sites_is_checked_on_their_labelled_nodes():
    training = TrainingConfig(site_pinning="labels", cpus_per_worker=1)
    nodes = [_node({"site": "a"}, CPU=2), _node({"site": "b"}, CPU=1), _node({"role": "head"}, CPU=0)]
    assert capacity_problems(nodes, ["a", "b"], training) == []
    (cpus,) = capacity_problems(nodes, ["b"], training.model_copy(update={"workers_per_site": 2}))
    assert cpus.startswith("training.cpus_per_worker = 1: site b needs 2 worker(s)")
    (missing,) = capacity_problems(nodes, ["c"], training)
    assert missing == "no node carries the label site=c: start the site's nodes with `ray start --labels site=c`"
    node_types = [{"resources": {"CPU": 1}, "labels": {"site": "c"}, "max_count": 2}]  # scales from zero
    assert capacity_problems(nodes, ["c"], training.model_copy(update={"workers_per_site": 2}), node_types) == []


def test_pinning_is_a_checked_config_key():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="site_pinning"):
        TrainingConfig(site_pinning="label")


def test_a_local_clusters_object_store_holds_the_models_a_sync_moves():
    assert object_store_bytes(164_672, 2) == MIN_OBJECT_STORE_BYTES  # tiny: the floor
    d12 = object_store_bytes(135_285_504, 3)
    assert d12 == 4 * 135_285_504 * 8  # three sites' fp32 models twice, the weights and momentum
    assert d12 > 4 * 2**30
    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert object_store_bytes(5_838_769_152, 8) == int(0.3 * memory_bytes)  # d48 × 8 sites: Ray's default cap


def test_the_averaging_actors_need_a_unit_of_their_resource_each():
    nodes = [{"Resources": {"CPU": 4, "averager": 1}}, {"Resources": {"CPU": 4, "averager": 1}},
             {"Alive": False, "Resources": {"averager": 4}}]
    assert averager_problems(nodes, TrainingConfig(averager_shards=2)) == []  # unset: beside the driver
    assert averager_problems(nodes, TrainingConfig(averager_shards=2, averager_resource="averager")) == []
    (short,) = averager_problems(nodes, TrainingConfig(averager_shards=3, averager_resource="averager"))
    assert short.startswith("training.averager_resource = 'averager': the run's 3 averaging actor(s) take one unit "
                            "each, but the nodes declare 2")
    assert "ray start --resources '{\"averager\": 1}'" in short
