"""Connecting to Ray: an existing cluster, or a local one that emulates the sites.

On a real cluster every node of a site is started with its site's resource and label
(``ray start --address HEAD:6379 --resources '{"site_caiso_north": 4}' --labels site=caiso_north``)
and curtail only connects. On one machine, :func:`connect` starts a local cluster whose single
node declares one resource per site, so each site's worker group is pinned to "its" capacity
exactly as it would be on separate nodes.

:func:`check_capacity` is the run's preflight on the cluster: every site's nodes must be able
to host ``training.workers_per_site`` workers with the CPUs and GPUs the config asks for, else
the run would wait for resources that never come (Ray Train retries a worker group's start);
the error names the config key instead.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import ray

from curtail.config import TrainingConfig
from curtail.errors import PreflightError
from curtail.runtime.placement import BY_RESOURCES, SitePinning, site_resource

log = logging.getLogger(__name__)

MIN_OBJECT_STORE_BYTES = 512 * 2**20
RAY_DEFAULT_OBJECT_STORE_SHARE = 0.3  # Ray's own default: 30 % of the node's memory


def object_store_bytes(num_parameters: int, num_sites: int) -> int:
    """The object store of a local cluster for a run of this model and this many sites.

    A sync puts every site's pseudo-gradient and the new global weights through the store, and a
    checkpoint fetches the weights and the outer momentum: room for twice the sites' fp32 models
    plus two more, at least 512 MiB, at most Ray's default share of the machine's memory. An
    object larger than the store goes to disk: on 2 CPU cores a 540-MB model (d12) took 0.8–3.5 s
    per transfer through 512 MiB and 0.07–0.5 s through 4 GiB.
    """
    wanted = 4 * num_parameters * (2 * num_sites + 2)
    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(MIN_OBJECT_STORE_BYTES, min(wanted, int(RAY_DEFAULT_OBJECT_STORE_SHARE * memory_bytes)))

# Ray Train settings for small machines: a report blocks until the controller polls (every 2 s
# by default), so poll fast; short start timeouts; no preemption watcher. Set before the cluster
# starts so workers inherit them.
RAY_TRAIN_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


def apply_ray_defaults() -> None:
    for key, value in RAY_TRAIN_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _launchable(site: str, node_types: Iterable[dict[str, Any]], pinning: SitePinning) -> bool:
    return any(kind["max_count"] > 0 and pinning.on_node(site, kind["resources"], kind.get("labels", {}))
               for kind in node_types)


def missing_sites(sites: Iterable[str], pinning: SitePinning = BY_RESOURCES) -> list[str]:
    """Sites no live node serves and no node type of the autoscaler would bring."""
    up, node_types = set(sites_up(sites, pinning)), autoscaler_node_types()
    return [s for s in sites if s not in up and not _launchable(s, node_types, pinning)]


def sites_up(sites: Iterable[str], pinning: SitePinning = BY_RESOURCES) -> list[str]:
    """The sites with at least one live node."""
    alive = [node for node in ray.nodes() if node.get("Alive", True)]
    return [s for s in sites if any(pinning.node_of(s, node) for node in alive)]


def connect(
    sites: Iterable[str],
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    workers_per_site: int = 1,
    object_store_memory_bytes: int = MIN_OBJECT_STORE_BYTES,
    local_resources: dict[str, float] | None = None,
    autoscaled_sites: bool = False,
    pinning: SitePinning = BY_RESOURCES,
) -> bool:
    """Make sure Ray is up with nodes for every site; returns True if it started Ray.

    ``address=None`` joins the cluster named by ``RAY_ADDRESS`` (as under ``ray job
    submit``) or starts a local one declaring ``site_<name>`` resources (and
    ``local_resources``), its object store ``object_store_memory_bytes`` (see
    :func:`object_store_bytes`). A cluster that cannot
    be reached, or that has no node for a site (by ``pinning``), is a :class:`PreflightError`
    (and a local cluster started here is shut down again) — unless ``autoscaled_sites``: then
    its autoscaler brings a site's nodes when the site asks.
    """
    sites = list(sites)
    if pinning.by_labels and not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
        raise PreflightError(
            "training.site_pinning = \"labels\" needs a cluster with a node per site (ray start --labels "
            "site=NAME): a local one-node cluster cannot carry every site's label. Join a cluster with "
            "--address / RAY_ADDRESS, or pin by resources (training.site_pinning = \"resources\")"
        )
    apply_ray_defaults()
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            try:
                ray.init(address=address, namespace="curtail", log_to_driver=True)
            except ConnectionError as error:
                raise PreflightError(
                    f"cannot reach the Ray cluster at {address!r} ({str(error).splitlines()[0]}): check "
                    "--address / RAY_ADDRESS, or leave both unset to run on a local cluster"
                ) from None
        else:
            ray.init(
                address="local",
                num_cpus=num_cpus or os.cpu_count() or 2,
                resources={**{site_resource(s): workers_per_site for s in sites}, **(local_resources or {})},
                include_dashboard=False,
                object_store_memory=object_store_memory_bytes,
                namespace="curtail",
                log_to_driver=False,
            )
            started = True
    missing = [] if autoscaled_sites and not started else missing_sites(sites, pinning)
    if missing:
        if started:
            ray.shutdown()
        what = (", ".join(f"site={s}" for s in missing) if pinning.by_labels
                else ", ".join(site_resource(s) for s in missing))
        raise PreflightError(
            f"the Ray cluster has no node for {what}: start each site's nodes with "
            f"{pinning.how_to_start(missing[0])} (ray start --address ...), or run without "
            "RAY_ADDRESS to emulate the sites on a local cluster"
        )
    return started


def _slots(resources: dict[str, float], site: str, cpus_per_worker: float, gpus_per_worker: float,
           pinning: SitePinning) -> dict[str, int]:
    """How many of one site's workers a node can host, by each resource a worker asks for."""

    def fit(available: float, per_worker: float) -> int:
        return math.floor(available / per_worker + 1e-9) if per_worker > 0 else 1 << 30

    return {"site": fit(resources.get(site_resource(site), 0.0), 1.0) if not pinning.by_labels else 1 << 30,
            "CPU": fit(resources.get("CPU", 0.0), cpus_per_worker),
            "GPU": fit(resources.get("GPU", 0.0), gpus_per_worker)}


def capacity_problems(
    nodes: list[dict[str, Any]],
    sites: Iterable[str],
    training: TrainingConfig,
    node_types: Iterable[dict[str, Any]] = (),
) -> list[str]:
    """Why the cluster's ``nodes`` (as ``ray.nodes()`` lists them) cannot host each site's
    ``workers_per_site`` workers, one line per site, naming the config key to change; [] if
    they can. Each site is checked on its own (sites sharing a node may still take turns).

    A site with no node up is checked against the autoscaler's ``node_types``
    (``{"resources": ..., "max_count": n}``, :func:`autoscaler_node_types`): a site that scales
    from zero is checked on the nodes the autoscaler may launch for it."""
    workers, cpus, gpus = training.workers_per_site, training.cpus_per_worker, training.gpus_per_worker
    pinning = SitePinning(training.site_pinning)
    alive = [node for node in nodes if node.get("Alive", True)]
    launchable = [{"Resources": dict(kind["resources"]), "Labels": dict(kind.get("labels", {}))}
                  for kind in node_types for _ in range(int(kind.get("max_count", 0)))]
    problems = []
    for site in sites:
        own = [node.get("Resources", {}) for node in alive if pinning.node_of(site, node)]
        if not own:
            own = [node["Resources"] for node in launchable if pinning.node_of(site, node)]
        if not own:
            named = f"carries the label site={site}" if pinning.by_labels else f"declares {site_resource(site)}"
            problems.append(f"no node {named}: start the site's nodes with {pinning.how_to_start(site)}")
            continue
        slots = [_slots(resources, site, cpus, gpus, pinning) for resources in own]
        if sum(min(s.values()) for s in slots) >= workers:
            continue

        def without(key: str, slots: list[dict[str, int]] = slots) -> int:
            return sum(min(v for k, v in s.items() if k != key) for s in slots)

        offered = {key: sum(r.get(key, 0.0) for r in own) for key in ("GPU", "CPU")}
        if gpus > 0 and without("GPU") >= workers:
            problems.append(
                f"training.gpus_per_worker = {gpus:g}: site {site} needs {workers} worker(s) with {gpus:g} GPU "
                f"each, but its nodes offer {offered['GPU']:g} GPU(s). Set training.gpus_per_worker = 0 "
                "to train on CPUs, or start the site's nodes with GPUs (ray start --num-gpus N)"
            )
        elif cpus > 0 and without("CPU") >= workers:
            problems.append(
                f"training.cpus_per_worker = {cpus:g}: site {site} needs {workers} worker(s) with {cpus:g} CPU "
                f"each, but its nodes offer {offered['CPU']:g} CPU(s). Lower training.cpus_per_worker, or "
                "give the site's nodes more CPUs (ray start --num-cpus N)"
            )
        else:
            declared = sum(r.get(site_resource(site), 0.0) for r in own)
            problems.append(
                f"training.workers_per_site = {workers}: the nodes of site {site} can host "
                f"{sum(min(s.values()) for s in slots)} (they declare {declared:g} {site_resource(site)}, "
                f"{offered['CPU']:g} CPU, {offered['GPU']:g} GPU; a worker takes 1, {cpus:g} and {gpus:g}). "
                "Lower training.workers_per_site, or add nodes to the site"
            )
    return problems


def averager_problems(nodes: list[dict[str, Any]], training: TrainingConfig) -> list[str]:
    """Why the cluster's ``nodes`` cannot host the run's averaging actors on the nodes that
    declare ``training.averager_resource`` (one unit each); [] if they can, or if unset."""
    resource = training.averager_resource
    if resource is None:
        return []
    declared = sum(node.get("Resources", {}).get(resource, 0.0) for node in nodes if node.get("Alive", True))
    if declared >= training.averager_actors:
        return []
    problem = (f"training.averager_resource = {resource!r}: the run's {training.averager_actors} averaging actor(s) "
               f"take one unit each, but the nodes declare {declared:g}. Start the nodes that should hold them with "
               f"ray start --resources '{{\"{resource}\": 1}}', or leave training.averager_resource unset to keep "
               "them beside the driver")
    return [problem]


def autoscaler_node_types() -> list[dict[str, Any]]:
    """The node types Ray's autoscaler may launch (``resources``, ``max_count``), as it published
    them to the cluster; [] on a cluster without an autoscaler (or a Ray that does not say)."""
    try:  # the autoscaler's published config: no public API for it in Ray 2.60
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as error:  # noqa: BLE001 -- an older or newer Ray: check the live nodes only
        log.debug("no autoscaler config: %s", error)
        return []
    if config is None:
        return []
    return [{"resources": dict(group.resources), "labels": dict(getattr(group, "labels", {}) or {}),
             "max_count": int(group.max_count)} for group in config.node_group_configs]


def check_capacity(sites: Iterable[str], training: TrainingConfig) -> None:
    """Raise :class:`PreflightError` unless the connected cluster can host every site's
    worker group, now or once its autoscaler launches the site's nodes (see :func:`capacity_problems`).
    With ``training.autoscaled_sites`` a site with no node up (and no node type the autoscaler
    published) is left to its first window: its nodes are checked when they come."""
    sites = list(sites)
    node_types = autoscaler_node_types()
    if training.autoscaled_sites:
        pinning = SitePinning(training.site_pinning)
        up = set(sites_up(sites, pinning))
        sites = [s for s in sites if s in up or _launchable(s, node_types, pinning)]
    nodes = ray.nodes()
    problems = capacity_problems(nodes, sites, training, node_types) + averager_problems(nodes, training)
    if problems:
        raise PreflightError("the Ray cluster cannot run this config: " + "; ".join(problems))


def remove_stale_placement_groups(sites: Iterable[str], pinning: SitePinning = BY_RESOURCES) -> int:
    """Remove placement groups that still reserve site nodes after their owner died.

    Ray Train releases a worker group's placement group when ``fit()`` ends; if the process
    that called ``fit()`` is killed (a coordinator crash) it can stay reserved until the job
    ends (without the dashboard, Ray Train's placement-group cleaner cannot run), and a resumed
    run would wait for resources forever. Pinned by resources, only groups whose bundles ask for
    one of ``sites``' resources are touched; pinned by labels, groups placed wholly on the sites'
    nodes (the site nodes are the run's own). Returns how many were removed.
    """
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    sites = list(sites)
    wanted = {site_resource(s) for s in sites}
    site_nodes = {node["NodeID"] for node in ray.nodes() if any(pinning.node_of(s, node) for s in sites)}
    removed = 0
    for group_id, info in ray.util.placement_group_table().items():
        if info.get("state") not in ("CREATED", "PENDING", "RESCHEDULING"):
            continue
        bundles = info.get("bundles", {}).values()
        placed = set(info.get("bundles_to_node_id", {}).values())
        ours = (placed and placed <= site_nodes) if pinning.by_labels else any(wanted & set(b) for b in bundles)
        if ours:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
            removed += 1
    return removed
