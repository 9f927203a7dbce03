"""The link model: how long a sync's transfers take on each site's network link.

A site reaches the averaging actor over a link of ``link_mbit_per_s`` megabits per second with
a one-way latency of ``link_latency_ms`` (the site's own values, else ``[execution]``'s). Per
sync it sends ``execution.sync_mb_sent`` megabytes (its pseudo-gradient as the wire format packs
it) and receives ``execution.sync_mb_received`` (the global weights):

* upload  = latency + sent · 8 / bandwidth;
* download = latency + received · 8 / bandwidth.

A federated sync pauses every member for ``sync_s`` plus the slowest member's upload and
download (the outer step needs every submission; then every member fetches the result); a site
joining mid-round pauses for ``sync_s`` plus its own download. Without a link (the default) a
transfer takes no time and ``sync_s`` is the whole pause, as before links existed.

With ``execution.overlap_sync`` the members train on while the transfers run
(:mod:`curtail.runtime.streaming`): only the part of the slowest member's transfers longer than
the next round's local phase (``round_s``) still pauses them, ``sync_s + max(0, transfers −
round_s)``.

Reference sizes (MB per site per sync) for the d20 model (561M parameters): bf16 pseudo-gradient
1,122 sent, fp32 global weights 2,244 received; int4 with zstd ~250 sent (``docs/BENCHMARKS.md``).
Over 100 Mbit/s a bf16 upload takes ~90 s; over 1 Gbit/s ~9 s.

    link = Links(context.execution, context.sites)
    link.sync_pause_s(["a", "b"])   # sync_s + the slowest member's upload + download
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from curtail.config import ExecutionConfig, SiteConfig

_BITS_PER_MEGABYTE = 8e6


@dataclass(frozen=True)
class Link:
    """One site's link: bandwidth (``None``: unlimited) and one-way latency."""

    mbit_per_s: float | None
    latency_ms: float

    def transfer_s(self, megabytes: float) -> float:
        """Seconds to move ``megabytes`` one way (0 without a link or without bytes)."""
        if self.mbit_per_s is None or megabytes <= 0:
            return 0.0
        return self.latency_ms / 1000 + megabytes * _BITS_PER_MEGABYTE / (self.mbit_per_s * 1e6)


class Links:
    """Every site's :class:`Link` and the sync pauses they imply (see the module doc)."""

    def __init__(self, execution: ExecutionConfig, sites: Mapping[str, SiteConfig]):
        self.execution = execution
        self.by_site = {
            name: Link(
                cfg.link_mbit_per_s if cfg.link_mbit_per_s is not None else execution.link_mbit_per_s,
                cfg.link_latency_ms if cfg.link_latency_ms is not None else execution.link_latency_ms,
            )
            for name, cfg in sites.items()
        }

    def upload_s(self, site: str, megabytes: float | None = None) -> float:
        """``site``'s upload of ``megabytes`` (default: ``execution.sync_mb_sent``)."""
        return self.by_site[site].transfer_s(self.execution.sync_mb_sent if megabytes is None else megabytes)

    def download_s(self, site: str, megabytes: float | None = None) -> float:
        """``site``'s download of ``megabytes`` (default: ``execution.sync_mb_received``)."""
        return self.by_site[site].transfer_s(self.execution.sync_mb_received if megabytes is None else megabytes)

    def sync_pause_s(self, members: Iterable[str], moved_mb: Mapping[str, tuple[float, float]] | None = None,
                     overlapped: bool | None = None, fragments: int = 1) -> float:
        """A federated sync: ``sync_s`` plus the slowest member's upload and download (of the
        configured sizes, or of ``moved_mb[site] = (sent, received)``, what a real sync moved);
        overlapped (default: ``overlap_sync``) only what the next round's local phase does not hide.
        In ``fragments`` staggered over the round, the last leaves ``(N−1)/N`` of a round in with
        ``1/N`` of the bytes: ``(transfers − round_s) / N`` is left unhidden."""
        transfers_s = max((self._transfers_s(s, moved_mb) for s in members), default=0.0)
        if self.execution.overlap_sync if overlapped is None else overlapped:
            transfers_s = max(0.0, transfers_s - self.execution.round_s) / fragments
        return self.execution.sync_s + transfers_s

    def join_pause_s(self, site: str, moved_mb: Mapping[str, tuple[float, float]] | None = None) -> float:
        """A site joining mid-round: ``sync_s`` plus its download of the global weights (or, with
        ``moved_mb``, its transfers)."""
        if moved_mb is None:
            return self.execution.sync_s + self.download_s(site)
        return self.execution.sync_s + self._transfers_s(site, moved_mb)

    def _transfers_s(self, site: str, moved_mb: Mapping[str, tuple[float, float]] | None) -> float:
        if moved_mb is None:
            return self.upload_s(site) + self.download_s(site)
        sent, received = moved_mb.get(site, (0.0, 0.0))
        return self.upload_s(site, sent) + self.download_s(site, received)
