"""A site's machines under Ray's autoscaler: asked for while the site is provisioned, let go when it
drains, and measured.

On a cluster whose site nodes scale to zero (KubeRay worker groups at ``minReplicas: 0``, a cloud
node type with ``min_workers: 0``, Ray's fake multi-node provider in the tests), nothing holds a
site's nodes but demand. :class:`SiteCapacity` turns the run's provisioning into that demand: when
a site starts provisioning its workers' bundles join the cluster's standing resource request
(``ray.autoscaler.sdk.request_resources``), so the autoscaler launches its nodes during the
provisioning delay instead of when the worker group asks; when the site drains (or fails, or the
run ends) they leave the request and the autoscaler removes the idle nodes after its idle
timeout. On a fixed cluster the request is a no-op.

It also measures what the configured ``provisioning_s`` models: a sampler counts each site's live
nodes every ``sample_s`` (wall seconds), and every window records when capacity was requested,
when the site's first node was up, when its worker group first answered, and when it was
released (:class:`CapacityWindow`; ``site_capacity.csv`` and ``site_node_counts.csv`` in the run
directory).
"""

from __future__ import annotations

import csv
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from curtail.planning.provisioning import CAPACITY_FILE
from curtail.runtime.placement import BY_RESOURCES, SitePinning

log = logging.getLogger(__name__)


NODES_FILE = "site_node_counts.csv"
"""Each site's live node count, sampled: ``wall_s, site, nodes``."""

Bundle = dict[str, float]


@dataclass
class CapacityWindow:
    """One provisioning of a site, in wall seconds (UTC epoch) and the run's clock."""

    site: str
    requested_t_s: float  # the run's clock
    requested_wall_s: float
    nodes_before: int  # live nodes of the site when asked (> 0: already up, e.g. a fixed cluster)
    nodes_up_wall_s: float | None = None
    group_ready_wall_s: float | None = None
    released_wall_s: float | None = None

    @property
    def node_start_s(self) -> float | None:
        """Wall seconds from the request to the site's first node (0 if one was up already)."""
        if self.nodes_up_wall_s is None:
            return None
        return max(0.0, self.nodes_up_wall_s - self.requested_wall_s)

    @property
    def group_ready_s(self) -> float | None:
        """Wall seconds from the request to the worker group's first answer."""
        if self.group_ready_wall_s is None:
            return None
        return self.group_ready_wall_s - self.requested_wall_s


def site_bundles(
    sites: Iterable[str], workers: int, cpus: float, gpus: float, pinning: SitePinning = BY_RESOURCES
) -> dict[str, list[Bundle]]:
    """Each site's worker bundles, as its Ray Train worker group asks for them."""
    return {site: [pinning.worker_resources(site, cpus, gpus) for _ in range(workers)] for site in sites}


def live_site_nodes(
    nodes: list[dict[str, Any]], sites: Iterable[str], pinning: SitePinning = BY_RESOURCES
) -> dict[str, int]:
    """Alive nodes of each site (``ray.nodes()``'s layout)."""
    alive = [node for node in nodes if node.get("Alive", True)]
    return {site: sum(1 for node in alive if pinning.node_of(site, node)) for site in sites}


def _request_resources(bundles: list[Bundle], label_selectors: list[dict[str, str]] | None) -> None:
    from ray.autoscaler.sdk import request_resources

    if label_selectors is None:
        request_resources(bundles=bundles)
    else:
        request_resources(bundles=bundles, bundle_label_selectors=label_selectors)


def _ray_nodes() -> list[dict[str, Any]]:
    import ray

    return ray.nodes()


class SiteCapacity:
    """Ask for provisioned sites' nodes, release drained ones, and measure (see the module doc).

    >>> capacity = SiteCapacity(site_bundles(["a", "b"], 1, 0.5, 0.0))
    >>> capacity.start()              # the node sampler
    >>> capacity.want("a", t_s)       # a starts provisioning: its bundles join the request
    >>> capacity.group_ready("a")     # its worker group answered
    >>> capacity.release("a")         # drained: its nodes go after the autoscaler's idle timeout
    >>> capacity.stop(); capacity.write(run_dir)
    """

    def __init__(
        self,
        bundles: Mapping[str, list[Bundle]],
        *,
        request: Callable[[list[Bundle], list[dict[str, str]] | None], None] = _request_resources,
        list_nodes: Callable[[], list[dict[str, Any]]] = _ray_nodes,
        sample_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        pinning: SitePinning = BY_RESOURCES,
    ):
        self.bundles = {site: list(b) for site, b in bundles.items()}
        self.pinning = pinning
        self.request = request
        self.list_nodes = list_nodes
        self.sample_s = sample_s
        self.clock = clock
        self.windows: list[CapacityWindow] = []
        self.samples: list[tuple[float, str, int]] = []  # (wall_s, site, live nodes)
        self._open: dict[str, CapacityWindow] = {}  # the sites asked for now
        self._known: dict[str, dict[str, Any]] = {}  # every node listed so far, by id, as last listed
        self._lock = threading.Lock()
        self._known_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ demand

    def want(self, site: str, t_s: float) -> None:
        """``site`` starts provisioning at run time ``t_s``: ask for its bundles."""
        with self._lock:
            if site in self._open:
                return
            nodes = self._count().get(site, 0)
            now = self.clock()
            window = CapacityWindow(site, t_s, now, nodes, nodes_up_wall_s=now if nodes else None)
            self._open[site] = window
            self.windows.append(window)
            self._send()

    def group_ready(self, site: str) -> None:
        """``site``'s worker group answered for the first time in this window."""
        with self._lock:
            window = self._open.get(site)
            if window is not None and window.group_ready_wall_s is None:
                window.group_ready_wall_s = self.clock()

    def release(self, site: str) -> None:
        """``site`` drained or failed: its bundles leave the request."""
        with self._lock:
            window = self._open.pop(site, None)
            if window is None:
                return
            window.released_wall_s = self.clock()
            self._send()

    def release_all(self) -> None:
        for site in list(self._open):
            self.release(site)

    def _send(self) -> None:
        self.request(*self.pinning.request(self.bundles, self._open))

    # ------------------------------------------------------------------ measurement

    def _count(self) -> dict[str, int]:
        return live_site_nodes(self._listed(), self.bundles, self.pinning)

    def _listed(self) -> list[dict[str, Any]]:
        """The cluster's nodes, each as last listed. Ray keeps a node that died in its table,
        marked dead; a node left out of one listing (a busy GCS answered without it) is carried
        at its last state instead of being counted as gone."""
        nodes = self.list_nodes()
        with self._known_lock:
            self._known.update({node["NodeID"]: node for node in nodes})
            return list(self._known.values())

    def sample(self) -> dict[str, int]:
        """Count every site's live nodes now; the first node of an asked-for site marks it up."""
        counts = self._count()
        now = self.clock()
        with self._lock:
            for site, count in counts.items():
                self.samples.append((now, site, count))
                window = self._open.get(site)
                if window is not None and window.nodes_up_wall_s is None and count > 0:
                    window.nodes_up_wall_s = now
        return counts

    def start(self) -> None:
        """Sample every ``sample_s`` on a background thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.sample()
                except Exception as error:  # noqa: BLE001 -- the cluster going away must not kill the run
                    log.debug("site node sample failed: %s", error)
                self._stop.wait(self.sample_s)

        self._thread = threading.Thread(target=loop, name="site-capacity", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ------------------------------------------------------------------ the record

    def summary(self) -> dict[str, Any]:
        """Measured node start and group-ready times per site (wall seconds): mean and max.
        Their idle energy and emissions are accounted by
        :func:`curtail.planning.provisioning.measured_provisioning` from ``site_capacity.csv``."""
        result: dict[str, Any] = {}
        for site in self.bundles:
            mine = [w for w in self.windows if w.site == site]
            starts = [w.node_start_s for w in mine if w.node_start_s is not None]
            ready = [w.group_ready_s for w in mine if w.group_ready_s is not None]
            result[site] = {
                "windows": len(mine),
                "node_start_s_mean": sum(starts) / len(starts) if starts else None,
                "node_start_s_max": max(starts) if starts else None,
                "group_ready_s_mean": sum(ready) / len(ready) if ready else None,
                "group_ready_s_max": max(ready) if ready else None,
            }
        return result

    def write(self, run_dir: Path) -> None:
        """``site_capacity.csv`` (one row per window) and ``site_node_counts.csv`` (the samples)."""
        run_dir = Path(run_dir)
        names = [f.name for f in fields(CapacityWindow)] + ["node_start_s", "group_ready_s"]
        with (run_dir / CAPACITY_FILE).open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=names)
            writer.writeheader()
            for window in self.windows:
                writer.writerow({**asdict(window), "node_start_s": window.node_start_s,
                                 "group_ready_s": window.group_ready_s})
        with (run_dir / NODES_FILE).open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["wall_s", "site", "nodes"])
            writer.writerows(self.samples)


__all__ = [
    "CAPACITY_FILE", "NODES_FILE", "CapacityWindow", "SiteCapacity", "live_site_nodes", "site_bundles",
]
