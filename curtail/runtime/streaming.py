"""Overlapped syncs: a site trains on while its round's transfers run (``[execution] overlap_sync``).

At a sync the site packs its pseudo-gradient ``g = θ_ref − θ_sent`` as always, keeps
``θ_sent`` (its weights at that instant) and goes straight back to training. A transfer thread
on rank 0 (:class:`SyncInFlight`) then

1. entropy-codes ``g`` (int8/int4, top-k) and uploads it (through the emulated link, if any)
   to the averaging actor,
2. waits until the round's outer step ran (every expected site's submission arrived, or the
   dead ones were withdrawn),
3. downloads the new global weights ``θ_global`` (the packed change, or the whole view) and
   stages them on the device.

Between two steps the site applies the arrival (:meth:`~curtail.training.loop.SiteTrainer.merge_global`)::

    θ ← θ_global + (θ − θ_sent)       reference ← θ_global

so the local steps taken while the sync was in flight are kept on top of the merged weights,
and the next pseudo-gradient ``θ_global − θ`` covers exactly those steps and the ones after
(they belong to the next round, and are accounted there). With no step in flight
``θ − θ_sent = 0`` exactly and the rule is today's blocking load, bit for bit; any command other
than training (submit, load, publish, save, stop) first waits for the arrival, so a sync never
overlaps the next one, a hand-off, a checkpoint or a drain. This is Streaming DiLoCo's
overlapping update (Douillard et al., 2025).

**Staggered fragments** (``[training] sync_fragments = N``, Streaming DiLoCo's fragments): the
parameters are split into N fragments, the averaging actors' shares
(:func:`~curtail.runtime.averager.shard_names`: equal sizes), and fragment ``p`` of a round is
packed and sent ``p · S / N`` local steps after the sync (``S``: the steps the site trained in
the round that just ended), so the sends are spread over the next round instead of leaving
together. Fragment ``p``'s pseudo-gradient is ``θ_ref[p] − θ[p]`` at its own send, weighted by
the member's tokens of the round (the same weight for every fragment); its actor steps it when
every member's fragment ``p`` arrived, and the site merges it on arrival with the rule above,
restricted to the fragment (``θ_sent[p]`` is kept per fragment). So fragment ``p``'s inner
window is the round shifted by ``p/N`` of a round. With one fragment this is the overlap above;
with one fragment and no step in flight, the blocking sync. A round has landed when every
fragment's actor stepped it. Anything but training first sends the fragments still due (a
*flush*) and waits for all of them, as for one fragment, and the coordinator flushes the members
before it waits for a landing (a round shorter than the last one would otherwise leave fragments
unsent). Because fragment ``p`` carries the first ``p/N`` of the next round's steps, a crash
resumed from the round's checkpoint re-trains work of which that share is already in the
checkpoint's weights of the later fragments; the ledger still counts every position once.

What a site is blocked for is the quantisation before it trains on (device passes and the
codes' copy to the host) and the merge (a few device passes): the submit's and the merge's
wall seconds; the coding and the transfers run beside training.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from curtail.planning.links import Link
    from curtail.runtime.averager import AveragerClient
    from curtail.training.compression import CompressedState

STATUS_POLL_S = 0.02  # how often the transfer thread asks whether its round has stepped


@dataclass(frozen=True)
class Fragment:
    """A part of the model synced on its own: its parameter names (None: all) and its averaging actor."""

    index: int
    names: tuple[str, ...] | None
    averager: AveragerClient


def fragments_of(averager: AveragerClient, staggered: bool) -> tuple[Fragment, ...]:
    """The fragments a site syncs: one per averaging actor when staggered, else the whole model."""
    parts = averager.parts() if staggered else [(None, averager)]
    return tuple(Fragment(index, names, client) for index, (names, client) in enumerate(parts))


class RoundInFlight:
    """An overlapped round on a site (see the module doc). Every rank keeps the schedule (which
    fragments were sent, the steps since the sync); rank 0 also keeps the transfers."""

    def __init__(self, round_index: int, tokens: float, num_fragments: int, interval_steps: int) -> None:
        self.round_index, self.tokens = round_index, tokens
        self.num_fragments = num_fragments
        self.interval_steps = interval_steps  # steps between two fragments' sends
        self.steps = 0  # local steps since the sync
        self.num_sent = 0  # fragments 0 .. num_sent - 1 were sent
        self.flights: dict[int, SyncInFlight] = {}  # rank 0: the sent fragments not merged yet
        self.merged: set[int] = set()
        self.version = -1  # the version the landed fragments carry

    def due(self) -> bool:
        """Whether the next fragment's time has come."""
        return self.num_sent < self.num_fragments and self.steps >= self.num_sent * self.interval_steps

    def flush(self) -> None:
        """Every fragment not sent yet is due now."""
        self.interval_steps = 0

    def unmerged(self) -> list[int]:
        """The sent fragments not merged yet (every rank knows them)."""
        return [index for index in range(self.num_sent) if index not in self.merged]

    @property
    def landed(self) -> bool:
        return len(self.merged) == self.num_fragments


@dataclass(frozen=True)
class Arrival:
    """The merged round as it reached the site: the new reference and its staged device copy."""

    round_index: int
    version: int
    state: dict[str, np.ndarray]  # the whole model's or the fragment's weights
    staged: Any  # the device tensors of ``state`` (SiteTrainer.stage_global)
    num_bytes: int  # downloaded
    sent_bytes: int  # uploaded (the coded pseudo-gradient)


def hold_for_link(link: Link | None, num_bytes: int) -> None:
    """With an emulated link, wait for a transfer's time on it (latency + bytes / bandwidth)
    after the bytes went through the object store."""
    if link is not None:
        time.sleep(link.transfer_s(num_bytes / 1e6))


class SyncInFlight:
    """One round's overlapped sync on a site's rank 0 (see the module doc).

    Example::

        flight = SyncInFlight(averager, "a", 3, packed, 4096.0, reference, 7, link, trainer.stage_global)
        ...                                # train on
        if flight.arrived():
            arrival = flight.wait()        # raises if the transfer failed
    """

    def __init__(
        self,
        averager: AveragerClient,
        site: str,
        round_index: int,
        packed: CompressedState,
        tokens: float,
        reference: dict[str, np.ndarray],
        held_version: int,
        link: Link | None,
        stage: Callable[[dict[str, np.ndarray]], Any],
        part: tuple[int, int] = (0, 1),
    ) -> None:
        self.round_index = round_index
        self._averager, self._site, self._link, self._stage, self._part = averager, site, link, stage, part
        self._done = threading.Event()
        self._arrival: Arrival | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(packed, tokens, reference, held_version), daemon=True,
            name=f"curtail-sync-{site}-{round_index}",
        )
        self._thread.start()

    def arrived(self) -> bool:
        """Whether the merged weights are staged (or the transfer failed): :meth:`wait` returns at once."""
        return self._done.is_set()

    def wait(self) -> Arrival:
        """The arrival (waits for it); the transfer's error if it failed."""
        self._done.wait()
        if self._error is not None:
            raise RuntimeError(f"round {self.round_index}'s overlapped sync failed: {self._error!r}") from self._error
        assert self._arrival is not None
        return self._arrival

    def _run(self, packed: CompressedState, tokens: float, reference: dict[str, np.ndarray], held_version: int) -> None:
        try:
            from curtail.training.compression import entropy_code

            packed = entropy_code(packed)
            from curtail.runtime.averager import download_view

            hold_for_link(self._link, packed.num_bytes)
            self._averager.submit(self._site, self.round_index, packed, tokens, part=self._part)
            while self._averager.round_status(self.round_index)["outcome"] is None:
                time.sleep(STATUS_POLL_S)
            version, state, num_bytes = download_view(self._averager, held_version, reference)
            hold_for_link(self._link, num_bytes)
            self._arrival = Arrival(self.round_index, version, state, self._stage(state), num_bytes, packed.num_bytes)
        except BaseException as error:  # noqa: BLE001 -- surfaced to the training thread by wait()
            self._error = error
        finally:
            self._done.set()
