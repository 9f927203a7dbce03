"""Where curtail's processes run: the control plane beside the driver, each site's workers on its nodes.

**The control plane** — the coordinator, the averaging actor, the mailbox, the evaluator and
each site's ``fit()`` driver — runs on the node of the process that called :func:`curtail.run`
(under ``ray job submit`` the head node, or where ``--entrypoint-label-selector`` puts the job).
:func:`control_plane` pins it there by the node's ``ray.io/node-id`` label (Ray ≥ 2.49, the
way Ray Train pins its own controller); on older Ray by node affinity. Neither names an internal
Ray resource.

**A site's workers** go to the site's nodes, by one of two pinnings (``training.site_pinning``):

* ``"resources"`` (default, any Ray 2.x): every node of the site declares a custom resource
  ``site_<name>`` (``ray start --resources '{"site_<name>": N}'``) and each worker asks for one.
  Works with every autoscaler (v1 and v2 launch node types by resources) and on a one-node local
  cluster, where one node declares every site's resource.
* ``"labels"`` (Ray ≥ 2.49): the site's nodes carry the label ``site=<name>`` (``ray start
  --labels site=<name>``, KubeRay ``rayStartParams.labels``) and each worker group asks for it with
  ``ScalingConfig.label_selector``; the autoscaler is asked for capacity with the same selector.
  An autoscaler launches nodes for a label selector only as autoscaler v2 (Ray ≥ 2.50; KubeRay
  ``RAY_enable_autoscaler_v2=1``). Needs one node per site (a node has one value per label).

:class:`SitePinning` answers every question the runtime asks about a site's placement: what a
worker requests, what to ask the autoscaler for, which nodes are the site's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import ray

SITE_LABEL = "site"
NODE_ID_LABEL = "ray.io/node-id"  # a label Ray gives every node (Ray ≥ 2.49)
LABELS_SINCE = (2, 49)
"""Node labels, ``label_selector`` on tasks, actors and ``ScalingConfig``, labelled resource requests."""
LABEL_AUTOSCALING_SINCE = (2, 50)
"""Autoscaler v2 launches nodes for a label selector."""

Pinning = Literal["resources", "labels"]
Bundle = dict[str, float]


def ray_version(version: str | None = None) -> tuple[int, int]:
    major, minor, *_ = (version or ray.__version__).split(".")
    return int(major), int(minor)


def labels_supported(version: str | None = None) -> bool:
    return ray_version(version) >= LABELS_SINCE


def site_resource(site: str) -> str:
    """The custom resource that pins a site's workers to its nodes (``resources`` pinning)."""
    return f"site_{site}"


def control_plane(node_id: str | None = None, *, version: str | None = None) -> dict[str, Any]:
    """Ray options (``.options(**control_plane())``) that keep an actor or task on ``node_id``
    (default: the calling process's node)."""
    if node_id is None:
        if not ray.is_initialized():  # the runtime context would start a local Ray of its own
            raise RuntimeError("control_plane(): connect to Ray first (curtail.runtime.cluster.connect)")
        node_id = ray.get_runtime_context().get_node_id()
    if labels_supported(version):
        return {"label_selector": {NODE_ID_LABEL: node_id}}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


@dataclass(frozen=True)
class SitePinning:
    """How a site's workers find its nodes (see the module doc)."""

    mode: Pinning = "resources"

    @property
    def by_labels(self) -> bool:
        return self.mode == "labels"

    def worker_resources(self, site: str, cpus: float, gpus: float) -> Bundle:
        """One worker's resource request (``ScalingConfig.resources_per_worker``)."""
        resources: Bundle = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
        return resources if self.by_labels else {**resources, site_resource(site): 1.0}

    def scaling(self, site: str, workers: int, cpus: float, gpus: float) -> dict[str, Any]:
        """The site's ``ray.train.ScalingConfig`` arguments."""
        scaling = {"num_workers": workers, "use_gpu": gpus > 0,
                   "resources_per_worker": self.worker_resources(site, cpus, gpus)}
        return scaling | ({"label_selector": self.selector(site)} if self.by_labels else {})

    def selector(self, site: str) -> dict[str, str]:
        return {SITE_LABEL: site}

    def request(
        self, bundles: Mapping[str, list[Bundle]], sites: Iterable[str]
    ) -> tuple[list[Bundle], list[dict[str, str]] | None]:
        """What to ask the autoscaler for (``request_resources(bundles, bundle_label_selectors)``):
        the sites' worker bundles and, pinned by labels, each bundle's selector."""
        sites = sorted(sites)
        flat = [bundle for site in sites for bundle in bundles[site]]
        return flat, ([self.selector(s) for s in sites for _ in bundles[s]] if self.by_labels else None)

    def on_node(self, site: str, resources: Mapping[str, float], labels: Mapping[str, str]) -> bool:
        """Whether a node (its resources and labels) is one of ``site``'s."""
        if self.by_labels:
            return labels.get(SITE_LABEL) == site
        return resources.get(site_resource(site), 0) > 0

    def node_of(self, site: str, node: Mapping[str, Any]) -> bool:
        """:meth:`on_node` for a node as ``ray.nodes()`` lists it (alive or not)."""
        return self.on_node(site, node.get("Resources", {}), node.get("Labels", {}) or {})

    def how_to_start(self, site: str) -> str:
        """The ``ray start`` flag that makes a node one of ``site``'s."""
        if self.by_labels:
            return f"`ray start --labels {SITE_LABEL}={site}`"
        return f"`ray start --resources '{{\"{site_resource(site)}\": N}}'`"


BY_RESOURCES = SitePinning("resources")


__all__ = [
    "BY_RESOURCES", "LABELS_SINCE", "LABEL_AUTOSCALING_SINCE", "NODE_ID_LABEL", "SITE_LABEL", "SitePinning", "control_plane",
    "labels_supported", "site_resource",
]
