"""Telemetry of a real run: measured timings, weight fingerprints after each load, where sites ran.

Nothing here decides anything; the executor reports what happened and the run directory gets
``timings.csv`` (every command's wall seconds, steps and measured power), ``weight_digests``
(every site's weights after each sync: identical across sites, or the sync is broken),
``site_nodes`` (the Ray nodes each site trained on) and each site's measured watts per GPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curtail.runtime.protocol import Loaded, Published, Reply, Stopped, Submitted, Trained


@dataclass
class Timing:
    """One measured action (wall clock) of a real run, for benchmarks."""

    t_s: float
    site: str
    kind: str
    round: int
    wall_s: float
    steps: int = 0
    at_wall_s: float = field(default_factory=time.time)  # when the coordinator recorded it
    power_w: float | None = None  # NVML-measured GPU watts of the site's workers (train commands)
    gpus: int = 0  # how many GPUs power_w covers
    cpu_power_w: float | None = None  # the site's workers' CPU watts (CodeCarbon, [training] host_power)
    ram_power_w: float | None = None  # the site's workers' memory watts (CodeCarbon)
    num_bytes: int = 0  # bytes over the wire: sent (submit: pseudo-gradient; publish: weights), received (load)


def measured_power_per_gpu_w(timings: list[Timing], warmup_factor: float = 3.0) -> dict[str, float]:
    """Each site's time-weighted mean measured watts per GPU over its train commands (sites
    without readings are left out).

    Warm-up commands are left out: a command whose wall seconds per step exceed
    ``warmup_factor`` times the site's median is the first of a worker group (CUDA start-up
    and compilation, the board mostly idle), not the steady training the accounting prices.
    """
    train = [t for t in timings if t.kind == "train" and t.power_w is not None and t.gpus > 0]
    return {site: sum(t.power_w / t.gpus * t.wall_s for t in rows) / sum(t.wall_s for t in rows)
            for site, rows in _steady_train(train, warmup_factor).items()}


def measured_host_power_w(timings: list[Timing], warmup_factor: float = 3.0) -> dict[str, dict[str, float]]:
    """Each site's time-weighted mean CPU and memory watts (``{"cpu_w", "ram_w"}``, its workers
    together) over its steady train commands, as :func:`measured_power_per_gpu_w` selects them."""
    train = [t for t in timings if t.kind == "train" and t.cpu_power_w is not None and t.ram_power_w is not None]
    result = {}
    for site, rows in _steady_train(train, warmup_factor).items():
        seconds = sum(t.wall_s for t in rows)
        result[site] = {"cpu_w": sum(t.cpu_power_w * t.wall_s for t in rows) / seconds,
                        "ram_w": sum(t.ram_power_w * t.wall_s for t in rows) / seconds}
    return result


def _steady_train(train: list[Timing], warmup_factor: float) -> dict[str, list[Timing]]:
    """Per site, its train commands without the warm-up ones (see :func:`measured_power_per_gpu_w`)."""
    train = [t for t in train if t.wall_s > 0 and t.steps > 0]
    result = {}
    for site in sorted({t.site for t in train}):
        rows = [t for t in train if t.site == site]
        median_step_s = float(np.median([t.wall_s / t.steps for t in rows]))
        result[site] = [t for t in rows if t.wall_s / t.steps <= warmup_factor * median_step_s]
    return result


def sync_traffic(timings: list[Timing]) -> dict[str, dict[str, float]]:
    """Per site: ``bytes_sent`` (pseudo-gradients) over ``submits`` and ``bytes_received``
    (global weights) over ``loads`` (an overlapped sync's merge counts as one), in all and per
    command; ``bytes_published`` (single-site hand-offs: the whole weights); ``rounds`` it
    synchronised in and ``blocked_s_per_round``, the wall seconds its submit, load, merge, flush
    and publish commands, the staggered fragments it packed between steps (``pack``) and its waits for an overlapped round to land held it per such round (it
    does not train meanwhile), with the worst round's ``max_blocked_s``."""
    result = {}
    sync = [t for t in timings
            if t.kind in ("submit", "upload", "load", "merge", "pack", "flush", "landing_wait", "publish") and t.site]
    for site in sorted({t.site for t in sync}):
        rows = [t for t in sync if t.site == site]
        submits = [t for t in rows if t.kind == "submit"]
        loads = [t for t in rows if t.kind in ("load", "merge")]
        by_round: dict[int, float] = {}
        for t in rows:
            by_round[t.round] = by_round.get(t.round, 0.0) + t.wall_s
        rounds = len(by_round)
        sent = sum(t.num_bytes for t in rows if t.kind in ("submit", "upload"))
        received = sum(t.num_bytes for t in loads)
        result[site] = {
            "submits": len(submits), "bytes_sent": sent, "bytes_sent_per_submit": sent / max(len(submits), 1),
            "loads": len(loads), "bytes_received": received,
            "bytes_received_per_load": received / max(len(loads), 1),
            "bytes_published": sum(t.num_bytes for t in rows if t.kind == "publish"),
            "rounds": rounds, "blocked_s_per_round": sum(t.wall_s for t in rows) / rounds,
            "max_blocked_s": max(by_round.values()),
        }
    return result


class Telemetry:
    """What a real run measured, in the order it happened."""

    def __init__(self, sites: list[str]):
        self.timings: list[Timing] = []
        self.digests: list[dict[str, Any]] = []
        self.site_nodes: dict[str, set[str]] = {site: set() for site in sites}  # Ray node ids
        self.site_pids: dict[str, int] = {}  # rank-0 process of each site (fault injection)
        self.last_loss = math.nan

    def reply(self, t_s: float, site: str, kind: str, round_index: int, reply: Reply | None) -> None:
        """A site answered ``kind`` (None: it had nothing to answer, e.g. already stopped). An
        overlapped sync merged during the command adds a ``merge`` row (counted with the loads):
        its download, and inside training the seconds the merge held it (any other command's
        wall seconds already include its wait and merge); and an ``upload`` row, its
        pseudo-gradient's bytes (counted with the submits)."""
        if reply is not None and reply.merged is not None:
            merge_s = reply.merged.wall_s if isinstance(reply, Trained) else 0.0
            self.timings.append(Timing(t_s, site, "merge", round_index, merge_s, num_bytes=reply.merged.num_bytes))
            self.timings.append(Timing(t_s, site, "upload", round_index, 0.0, num_bytes=reply.merged.sent_bytes))
        match reply:
            case Trained():
                self.timings.append(Timing(t_s, site, kind, round_index, reply.wall_s, reply.steps,
                                           power_w=reply.power_w, gpus=reply.gpus,
                                           cpu_power_w=reply.host_power_w[0] if reply.host_power_w else None,
                                           ram_power_w=reply.host_power_w[1] if reply.host_power_w else None))
                if reply.pack_s:  # staggered fragments packed between its steps
                    self.timings.append(Timing(t_s, site, "pack", round_index, reply.pack_s))
                self.last_loss = reply.loss
            case Stopped():
                self.timings.append(Timing(t_s, site, kind, round_index, reply.wall_s, reply.steps))
            case Submitted() | Loaded() | Published():
                self.timings.append(Timing(t_s, site, kind, round_index, reply.wall_s, num_bytes=reply.num_bytes))
            case None:
                self.timings.append(Timing(t_s, site, kind, round_index, 0.0))
            case _:
                self.timings.append(Timing(t_s, site, kind, round_index, reply.wall_s))

    def action(self, t_s: float, kind: str, round_index: int, wall_s: float, site: str = "") -> None:
        """A run-level action (outer step, checkpoint, round start) took ``wall_s`` (``site``: it
        held that site, e.g. its wait for an overlapped round to land)."""
        self.timings.append(Timing(t_s, site, kind, round_index, wall_s))

    def loaded(self, t_s: float, round_index: int, version: int, replies: dict[str, Loaded]) -> None:
        """Sites loaded global weights ``version``: their fingerprints must all agree."""
        for site, reply in replies.items():
            self.site_nodes[site].update(reply.node_ids)
            self.site_pids[site] = reply.pid
            for phase, seconds in reply.startup_s:  # a group's first load: where its start-up went
                self.timings.append(Timing(t_s, site, f"start_{phase}", round_index, seconds))
        self.digests.append({
            "t_s": t_s, "round": round_index, "version": version, "sites": sorted(replies),
            "digests": sorted({reply.digest for reply in replies.values()}),
            "loaded_versions": [replies[site].version for site in sorted(replies)],
        })

    def state(self) -> dict[str, Any]:
        return {"digests": list(self.digests), "timings": [vars(t) for t in self.timings]}

    def restore(self, saved: dict[str, Any]) -> None:
        self.digests = saved["digests"]
        self.timings = [Timing(**t) for t in saved["timings"]]
