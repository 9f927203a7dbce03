"""Connecting to Ray: an existing cluster, or a local one that emulates the sites.

On a real cluster every node of a site is started with its site's resource and label
(``ray start --address HEAD:6379 --resources '{"site_caiso_north": 4}' --labels site=caiso_north``)
and curtail only connects. On one machine, :func:`connect` starts a local cluster whose single
node declares one resource per site, so each site's worker group is pinned to "its" capacity
exactly as it would be on separate nodes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import ray

from curtail.runtime.sites import site_resource

# Ray Train settings for small machines (RAY_NOTES.md): fast report polling, short start
# timeouts, no preemption watcher. Set before the cluster starts so workers inherit them.
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


def missing_site_resources(sites: Iterable[str]) -> list[str]:
    total = ray.cluster_resources()
    return [site_resource(s) for s in sites if total.get(site_resource(s), 0) <= 0]


def connect(
    sites: Iterable[str],
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    workers_per_site: int = 1,
    object_store_memory_bytes: int = 512 * 2**20,
) -> bool:
    """Make sure Ray is up with a resource for every site; returns True if it started Ray.

    ``address=None`` joins the cluster named by ``RAY_ADDRESS`` (as under ``ray job
    submit``) or starts a local one declaring ``site_<name>`` resources.
    """
    sites = list(sites)
    apply_ray_defaults()
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, namespace="curtail", log_to_driver=True)
        else:
            ray.init(
                address="local",
                num_cpus=num_cpus or os.cpu_count() or 2,
                resources={site_resource(s): workers_per_site for s in sites},
                include_dashboard=False,
                object_store_memory=object_store_memory_bytes,
                namespace="curtail",
                log_to_driver=False,
            )
            started = True
    missing = missing_site_resources(sites)
    if missing:
        raise RuntimeError(
            f"the Ray cluster declares no {missing}: start each site's nodes with "
            f"`ray start --address ... --resources '{{\"{missing[0]}\": N}}'`, or run without "
            "RAY_ADDRESS to emulate the sites on a local cluster"
        )
    return started


def remove_stale_placement_groups(sites: Iterable[str]) -> int:
    """Remove placement groups that still reserve site resources after their owner died.

    Ray Train releases a worker group's placement group when ``fit()`` ends; if the process
    that called ``fit()`` is killed (a coordinator crash) it can stay reserved until the job
    ends, and a resumed run would wait for resources forever (RAY_NOTES gotcha 6). Only groups
    whose bundles ask for one of ``sites``' resources are touched. Returns how many were removed.
    """
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    wanted = {site_resource(s) for s in sites}
    removed = 0
    for group_id, info in ray.util.placement_group_table().items():
        if info.get("state") not in ("CREATED", "PENDING", "RESCHEDULING"):
            continue
        bundles = info.get("bundles", {}).values()
        if any(wanted & set(bundle) for bundle in bundles):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
            removed += 1
    return removed
