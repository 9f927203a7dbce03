"""The trajectory of a run: what every site did when, as both executors record it.

The simulator and the Ray coordinator both fill a :class:`TrajectoryRecorder`; the resulting
:class:`Trajectory` (state intervals, events, run-mode intervals, tokens per site, losses) is
the only input of the accounting in :mod:`curtail.planning.summary`. That is what makes
simulated and real run directories comparable line by line.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from curtail.planning.energy import Interval
from curtail.planning.policy import SiteState


class RunMode(enum.StrEnum):
    IDLE = "IDLE"
    SINGLE = "SINGLE"
    FEDERATED = "FEDERATED"

    @classmethod
    def of(cls, num_training_sites: int) -> RunMode:
        if num_training_sites <= 0:
            return cls.IDLE
        return cls.SINGLE if num_training_sites == 1 else cls.FEDERATED


@dataclass(frozen=True)
class Event:
    t_s: float
    site: str  # "" for run-level events
    event: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModeInterval:
    mode: RunMode
    start_s: float
    end_s: float


@dataclass(frozen=True)
class LossPoint:
    t_s: float
    site: str  # "" for the global model
    tokens: float  # total tokens trained across sites at that moment
    loss: float
    kind: str = "train"  # train | eval


@dataclass(frozen=True)
class Trajectory:
    sites: tuple[str, ...]
    start_s: float
    finish_s: float
    completed: bool  # token budget reached
    intervals: tuple[Interval, ...]
    events: tuple[Event, ...]
    modes: tuple[ModeInterval, ...]
    tokens_by_site: dict[str, float]
    num_syncs: int
    losses: tuple[LossPoint, ...] = ()

    @property
    def tokens(self) -> float:
        return sum(self.tokens_by_site.values())

    def intervals_of(self, site: str) -> list[Interval]:
        return [i for i in self.intervals if i.site == site]


class TrajectoryRecorder:
    """Accumulates state changes, events, modes and tokens as a run unfolds."""

    def __init__(self, sites: list[str], start_s: float):
        self.sites = tuple(sites)
        self.start_s = start_s
        self._state = {site: SiteState.OFF for site in sites}
        self._since = {site: start_s for site in sites}
        self._intervals: list[Interval] = []
        self._events: list[Event] = []
        self._mode = RunMode.IDLE
        self._mode_since = start_s
        self._modes: list[ModeInterval] = []
        self.tokens_by_site = {site: 0.0 for site in sites}
        self.num_syncs = 0
        self._losses: list[LossPoint] = []

    def state(self, site: str) -> SiteState:
        return self._state[site]

    def set_state(self, site: str, state: SiteState, t_s: float) -> None:
        if self._state[site] is state:
            return
        if t_s > self._since[site]:
            self._intervals.append(Interval(site, self._state[site], self._since[site], t_s))
        self._state[site] = state
        self._since[site] = t_s

    def event(self, t_s: float, site: str, event: str, **details: Any) -> None:
        self._events.append(Event(t_s, site, event, details))

    def set_mode(self, mode: RunMode, t_s: float) -> None:
        if mode is self._mode:
            return
        if t_s > self._mode_since:
            self._modes.append(ModeInterval(self._mode, self._mode_since, t_s))
        self.event(t_s, "", "mode", mode=mode.value, previous=self._mode.value)
        self._mode, self._mode_since = mode, t_s

    @property
    def mode(self) -> RunMode:
        return self._mode

    def add_tokens(self, site: str, tokens: float) -> None:
        self.tokens_by_site[site] += tokens

    def loss(self, point: LossPoint) -> None:
        self._losses.append(point)

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe state, for run checkpoints (:meth:`restore` is the inverse)."""
        return {
            "sites": list(self.sites),
            "start_s": self.start_s,
            "state": {site: state.value for site, state in self._state.items()},
            "since": dict(self._since),
            "intervals": [[i.site, i.state.value, i.start_s, i.end_s] for i in self._intervals],
            "events": [[e.t_s, e.site, e.event, e.details] for e in self._events],
            "mode": self._mode.value,
            "mode_since": self._mode_since,
            "modes": [[m.mode.value, m.start_s, m.end_s] for m in self._modes],
            "tokens_by_site": dict(self.tokens_by_site),
            "num_syncs": self.num_syncs,
            "losses": [self.loss_state(p) for p in self._losses],
        }

    @staticmethod
    def loss_state(point: LossPoint) -> list[Any]:
        """One loss point as :meth:`snapshot` holds it."""
        return [point.t_s, point.site, point.tokens, point.loss, point.kind]

    @classmethod
    def restore(cls, state: dict[str, Any]) -> TrajectoryRecorder:
        recorder = cls(state["sites"], state["start_s"])
        recorder._state = {site: SiteState(value) for site, value in state["state"].items()}
        recorder._since = {site: float(t) for site, t in state["since"].items()}
        recorder._intervals = [Interval(a, SiteState(b), c, d) for a, b, c, d in state["intervals"]]
        recorder._events = [Event(a, b, c, d) for a, b, c, d in state["events"]]
        recorder._mode = RunMode(state["mode"])
        recorder._mode_since = state["mode_since"]
        recorder._modes = [ModeInterval(RunMode(a), b, c) for a, b, c in state["modes"]]
        recorder.tokens_by_site = {site: float(v) for site, v in state["tokens_by_site"].items()}
        recorder.num_syncs = state["num_syncs"]
        recorder._losses = [LossPoint(a, b, c, d, e) for a, b, c, d, e in state["losses"]]
        return recorder

    def finish(self, t_s: float, completed: bool) -> Trajectory:
        for site in self.sites:
            self.set_state(site, SiteState.OFF, t_s)
        self.set_mode(RunMode.IDLE, t_s)
        # close the open intervals too: a run that ends idle (deadline) still spent that time idle
        for site in self.sites:
            if t_s > self._since[site]:
                self._intervals.append(Interval(site, self._state[site], self._since[site], t_s))
                self._since[site] = t_s
        if t_s > self._mode_since:
            self._modes.append(ModeInterval(self._mode, self._mode_since, t_s))
            self._mode_since = t_s
        return Trajectory(
            sites=self.sites,
            start_s=self.start_s,
            finish_s=t_s,
            completed=completed,
            intervals=tuple(sorted(self._intervals, key=lambda i: (i.start_s, i.site))),
            events=tuple(self._events),
            modes=tuple(self._modes),
            tokens_by_site=dict(self.tokens_by_site),
            num_syncs=self.num_syncs,
            losses=tuple(self._losses),
        )
