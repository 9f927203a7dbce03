"""Executing a policy: the run state machine both executors share.

:class:`Executor` turns a policy's intents into what sites physically do, with the execution
model of :class:`~curtail.config.ExecutionConfig`:

* ``OFF → TRAIN`` intent: provisioning (``rules.provisioning_s``), worker-group start
  (``group_start_s``), then the site is ready;
* one ready site trains alone in an open-ended SINGLE round; a second ready site ends it
  with a hand-off sync and FEDERATED rounds of ``round_s`` begin;
* every federated round ends with a sync (``sync_s`` paused per participating site, plus the
  slowest member's transfers over its link, :mod:`curtail.planning.links`); a site ready
  mid-round joins at once (``join = "immediate"``, paying one ``sync_s`` and its download to
  fetch the global weights) or waits for the next round (``"next_round"``, the prior system);
* ``round_restart_s`` is lost at the start of every round (the prior system's respawn);
* a site told to stop drains at the next step boundary; its partial round still counts.

Time only jumps between events (policy decisions, timers, round ends, budget completion).
Subclasses supply the work: :class:`~curtail.planning.simulator.Simulator` multiplies
throughput by time; the Ray coordinator trains real models for the same segments and performs
the syncs, through the ``on_*`` hooks below (no-ops here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from curtail.planning.links import Links
from curtail.planning.policy import Intent, Observation, Policy, PolicyContext, SiteState
from curtail.planning.trajectory import RunMode, Trajectory, TrajectoryRecorder

_EPS_S = 1e-6


class PolicyProtocolError(RuntimeError):
    """A policy returned something the executor cannot act on."""


@dataclass
class _Site:
    name: str
    tokens_per_s: float
    intent: Intent = Intent.OFF
    until_s: float = math.inf  # end of the current timed phase
    member: bool = False  # in the current round (or the sync after it)
    failures: int = 0  # consecutive failures in the current window
    benched: bool = False  # failed too often: stays off until its window closes


@dataclass(frozen=True)
class RoundView:
    """A round as the hooks see it: a frozen copy, never the executor's live state."""

    index: int
    kind: RunMode
    members: tuple[str, ...]  # sorted


@dataclass
class _Round:
    index: int
    kind: RunMode
    start_s: float
    end_s: float  # inf for SINGLE
    members: set[str] = field(default_factory=set)

    def view(self) -> RoundView:
        return RoundView(self.index, self.kind, tuple(sorted(self.members)))


class Executor:
    """The run state machine. Subclasses implement :meth:`work`; hooks default to no-ops."""

    max_segment_s: float = math.inf
    """Longest stretch handed to :meth:`work` at once (real runs report progress between)."""

    max_site_failures: int = 3
    """Failures of one site within one window before it is benched until the window closes."""

    def __init__(self, context: PolicyContext, policy: Policy):
        self.context = context
        self.policy = policy
        self.execution = context.execution
        self.links = Links(context.execution, context.sites)
        self.sites = {name: _Site(name, cfg.tokens_per_s) for name, cfg in context.sites.items()}
        self.recorder = TrajectoryRecorder(list(context.sites), context.start_s)
        self.round: _Round | None = None
        self.sync_until_s: float | None = None  # a run-level sync between rounds
        self.sync_members: set[str] = set()
        self.num_rounds = 0
        self.tokens = 0.0
        self._failures: dict[str, tuple[str, float]] = {}

    # ---------------------------------------------------------------- work and hooks

    def work(self, sites: list[str], start_s: float, end_s: float, current: RoundView | None) -> dict[str, float]:
        """Train ``sites`` over ``[start_s, end_s)`` of the run's clock, inside round ``current`` (None
        between rounds); tokens trained per site."""
        raise NotImplementedError

    def pass_time(self, start_s: float, end_s: float) -> None:
        """No site trains over ``[start_s, end_s)`` (a real-time clock waits here)."""

    def sync_pause_s(self, members: list[str]) -> float:
        """How long the sync that just happened pauses its members: the link model on the
        configured sizes (a real run charges the bytes it sent and received)."""
        return self.links.sync_pause_s(members)

    def join_pause_s(self, site: str) -> float:
        """How long joining a running round pauses ``site`` (its download; see :meth:`sync_pause_s`)."""
        return self.links.join_pause_s(site)

    def on_provision(self, site: str, t_s: float) -> None:
        """``site`` starts provisioning: ask for its nodes (they are ready ``provisioning_s`` on)."""

    def on_nodes_ready(self, site: str, t_s: float) -> None:
        """A site's nodes are provisioned: start its worker group."""

    def on_round_start(self, started: RoundView, t_s: float) -> None:
        """A round begins; its members must hold the newest global weights."""

    def on_sync(self, ended: RoundView, members: list[str], t_s: float) -> None:
        """``ended`` is over: average its members' work (FEDERATED) or hand off (SINGLE), then
        ``members`` (its members and any joiners) load the result."""

    def on_join(self, site: str, index: int, t_s: float) -> None:
        """A site joins a running federated round: load the newest global weights."""

    def on_leave(self, site: str, current: RoundView, t_s: float) -> None:
        """``site`` leaves ``current`` mid-way (``current.members`` are those still in it): keep its
        partial work."""

    def on_drain(self, site: str, t_s: float) -> None:
        """A site is released: stop its worker group at the next step boundary."""

    def on_finish(self, t_s: float, completed: bool, open_round: RoundView | None) -> None:
        """The run ends (``open_round`` is the round still running, if any): make the global
        model final."""

    def on_interrupt(self, t_s: float) -> None:
        """The run stopped at a safe point on request (:meth:`at_safe_point` returned True)."""

    def on_failure(self, site: str, t_s: float) -> None:
        """A failed site has been taken out of the run: release what it held."""

    def on_lost_time(self, from_s: float, to_s: float) -> None:
        """The run was down over ``[from_s, to_s)``; every site has been released at ``from_s``."""

    def at_safe_point(self, t_s: float, next_decision_s: float, current: RoundView | None) -> bool:
        """Between two stretches of work, with the state machine settled: checkpoint here.
        Returning True stops the run here (an interrupt; :meth:`on_interrupt` follows)."""
        return False

    # ---------------------------------------------------------------- checkpoints

    def snapshot(self, t_s: float, next_decision_s: float) -> dict[str, Any]:
        """The whole state machine as JSON-safe data (resume with ``run(resume_from=...)``)."""
        return {
            "t_s": t_s,
            "next_decision_s": next_decision_s if math.isfinite(next_decision_s) else None,
            "sites": {
                name: {"intent": site.intent.value, "until_s": site.until_s if math.isfinite(site.until_s) else None,
                       "member": site.member, "failures": site.failures, "benched": site.benched}
                for name, site in self.sites.items()
            },
            "round": None if self.round is None else {
                "index": self.round.index, "kind": self.round.kind.value, "start_s": self.round.start_s,
                "end_s": self.round.end_s if math.isfinite(self.round.end_s) else None,
                "members": sorted(self.round.members),
            },
            "sync_until_s": self.sync_until_s,
            "sync_members": sorted(self.sync_members),
            "num_rounds": self.num_rounds,
            "tokens": self.tokens,
            "recorder": self.recorder.snapshot(),
        }

    def restore(self, state: dict[str, Any]) -> tuple[float, float]:
        """Load :meth:`snapshot`; returns ``(t_s, next_decision_s)`` to continue from."""

        def time_or_inf(value: float | None) -> float:
            return math.inf if value is None else float(value)

        for name, saved in state["sites"].items():
            site = self.sites[name]
            site.intent = Intent(saved["intent"])
            site.until_s = time_or_inf(saved["until_s"])
            site.member, site.failures, site.benched = saved["member"], saved["failures"], saved["benched"]
        saved_round = state["round"]
        self.round = None if saved_round is None else _Round(
            saved_round["index"], RunMode(saved_round["kind"]), saved_round["start_s"],
            time_or_inf(saved_round["end_s"]), set(saved_round["members"]),
        )
        self.sync_until_s = state["sync_until_s"]
        self.sync_members = set(state["sync_members"])
        self.num_rounds = state["num_rounds"]
        self.tokens = float(state["tokens"])
        self.recorder = TrajectoryRecorder.restore(state["recorder"])
        return float(state["t_s"]), time_or_inf(state["next_decision_s"])

    # ---------------------------------------------------------------- failures

    def report_failure(self, site: str, reason: str, lost_tokens: float = 0.0) -> None:
        """A site's workers died or stopped answering. Subclasses call this from hooks or
        :meth:`work`; the state machine takes the site out at the next safe point, discounts
        the ``lost_tokens`` it trained but never delivered, and re-provisions it if its window
        is still open (up to :attr:`max_site_failures` times per window)."""
        previous = self._failures.get(site, ("", 0.0))
        self._failures[site] = (previous[0] or reason, previous[1] + lost_tokens)

    def _apply_failures(self, t_s: float) -> bool:
        if not self._failures:
            return False
        failures, self._failures = self._failures, {}
        for name, (reason, lost_tokens) in failures.items():
            site = self.sites[name]
            self._leave(site, t_s, hand_over=False)
            site.failures += 1
            site.benched = site.failures >= self.max_site_failures
            self.recorder.event(
                t_s, name, "failure", reason=reason[-500:], lost_tokens=lost_tokens,
                attempt=site.failures, benched=site.benched,
            )
            if lost_tokens:
                self.recorder.add_tokens(name, -lost_tokens)
                self.tokens -= lost_tokens
            self._set(site, SiteState.OFF, t_s)
            self.on_failure(name, t_s)
        return True

    # ---------------------------------------------------------------- state helpers

    def _round_view(self) -> RoundView | None:
        return None if self.round is None else self.round.view()

    def _state(self, site: _Site) -> SiteState:
        return self.recorder.state(site.name)

    def _set(self, site: _Site, state: SiteState, t_s: float, until_s: float = math.inf) -> None:
        self.recorder.set_state(site.name, state, t_s)
        site.until_s = until_s

    def _update_mode(self, t_s: float) -> None:
        if self.round is not None:
            count = len(self.round.members)
        elif self.sync_until_s is not None:
            count = len(self.sync_members)
        else:
            count = 0
        self.recorder.set_mode(RunMode.of(count), t_s)

    # ---------------------------------------------------------------- rounds

    def _start_round(self, t_s: float, members: set[str]) -> None:
        self.num_rounds += 1
        kind = RunMode.of(len(members))
        end_s = t_s + self.execution.round_s if kind is RunMode.FEDERATED else math.inf
        self.round = _Round(self.num_rounds, kind, t_s, end_s, set(members))
        self.recorder.event(t_s, "", "round_start", round=self.num_rounds, mode=kind.value, sites=sorted(members))
        self.on_round_start(self.round.view(), t_s)
        restart_s = self.execution.round_restart_s
        for name in members:
            site = self.sites[name]
            site.member = True
            if restart_s > 0:
                self._set(site, SiteState.STARTING, t_s, t_s + restart_s)
            else:
                self._set(site, SiteState.TRAINING, t_s)
        self._update_mode(t_s)

    def _end_round_with_sync(self, t_s: float, extra: set[str]) -> None:
        """Close the current round and pause its members (plus joiners) for one sync."""
        assert self.round is not None
        members = set(self.round.members) | extra
        self.recorder.event(t_s, "", "round_end", round=self.round.index, mode=self.round.kind.value)
        self.recorder.num_syncs += 1
        self.recorder.event(t_s, "", "sync", round=self.round.index, sites=sorted(members))
        self.on_sync(self.round.view(), sorted(members), t_s)
        self.round = None
        self.sync_until_s = t_s + self.sync_pause_s(sorted(members))
        self.sync_members = members
        for name in members:
            self.sites[name].member = True
            self._set(self.sites[name], SiteState.SYNCING, t_s, self.sync_until_s)
        self._update_mode(t_s)

    def _finish_sync(self, t_s: float) -> None:
        members = {n for n in self.sync_members if self.sites[n].intent is Intent.TRAIN}
        self.sync_until_s, self.sync_members = None, set()
        for name in self.sites:
            self.sites[name].member = False
        if members:
            self._start_round(t_s, members)
        else:
            self._update_mode(t_s)

    def _leave(self, site: _Site, t_s: float, hand_over: bool = True) -> None:
        """Remove a site from the round or sync it is in; with ``hand_over`` its partial work
        goes to the global model (a graceful leave), without it is lost (a failure)."""
        if not site.member:
            return
        site.member = False
        if self.round is not None and site.name in self.round.members:
            self.round.members.discard(site.name)
            self.recorder.event(t_s, site.name, "leave_round", round=self.round.index, handed_over=hand_over)
            if hand_over:
                self.on_leave(site.name, self.round.view(), t_s)
            if not self.round.members:
                self.recorder.event(t_s, "", "round_end", round=self.round.index, mode=self.round.kind.value)
                self.round = None
        if site.name in self.sync_members:
            self.sync_members.discard(site.name)
            if not self.sync_members:
                self.sync_until_s = None
        self._update_mode(t_s)

    # ---------------------------------------------------------------- transitions

    def _apply_intents(self, t_s: float) -> None:
        for site in self.sites.values():
            state = self._state(site)
            if site.intent is Intent.OFF and state is not SiteState.OFF:
                self._leave(site, t_s)
                self.recorder.event(t_s, site.name, "drain", previous=state.value)
                self._set(site, SiteState.OFF, t_s)
                self.on_drain(site.name, t_s)
            elif site.intent is Intent.STANDBY and site.member:
                self._leave(site, t_s)
                self._set(site, SiteState.WAITING, t_s)
            elif site.intent is Intent.OFF and state is SiteState.OFF and (site.failures or site.benched):
                site.failures, site.benched = 0, False  # its window closed: a fresh start next time
            elif site.intent is not Intent.OFF and state is SiteState.OFF and not site.benched:
                self.recorder.event(t_s, site.name, "provision", intent=site.intent.value)
                self._set(site, SiteState.PROVISIONING, t_s, t_s + self.context.rules.provisioning_s)
                self.on_provision(site.name, t_s)

    def _join_ready_sites(self, t_s: float) -> None:
        joiners = {
            s.name
            for s in self.sites.values()
            if s.intent is Intent.TRAIN and not s.member and self._state(s) is SiteState.WAITING
        }
        if not joiners:
            return
        if self.sync_until_s is not None:  # fetch the new global weights with everyone else
            for name in joiners:
                self.sites[name].member = True
                self._set(self.sites[name], SiteState.SYNCING, t_s, self.sync_until_s)
                self.on_join(name, self.num_rounds, t_s)
            self.sync_members |= joiners
            self._update_mode(t_s)
        elif self.round is None:
            self._start_round(t_s, joiners)
        elif self.round.kind is RunMode.SINGLE:  # hand-off: the single site's weights become global
            self._end_round_with_sync(t_s, joiners)
        elif self.execution.join == "immediate":
            for name in joiners:
                site = self.sites[name]
                site.member = True
                self.round.members.add(name)
                self.recorder.event(t_s, name, "join_round", round=self.round.index)
                self.on_join(name, self.round.index, t_s)
                self._set(site, SiteState.SYNCING, t_s, t_s + self.join_pause_s(name))
            self._update_mode(t_s)

    def _expire_timers(self, t_s: float) -> bool:
        """Advance every phase that ends at ``t_s``; True if a site became ready."""
        changed = False
        for site in self.sites.values():
            if site.until_s > t_s + _EPS_S:
                continue
            state = self._state(site)
            if state is SiteState.PROVISIONING:
                group_start_s = self.execution.group_start_s
                self.recorder.event(t_s, site.name, "nodes_ready")
                self.on_nodes_ready(site.name, t_s)
                if group_start_s > 0:
                    self._set(site, SiteState.STARTING, t_s, t_s + group_start_s)
                else:
                    self.recorder.event(t_s, site.name, "ready")
                    self._set(site, SiteState.WAITING, t_s)
                    changed = True
            elif state is SiteState.STARTING and not site.member:
                self.recorder.event(t_s, site.name, "ready")
                self._set(site, SiteState.WAITING, t_s)
                changed = True
            elif state in (SiteState.STARTING, SiteState.SYNCING) and self.round is not None:
                self._set(site, SiteState.TRAINING, t_s)
            else:
                site.until_s = math.inf
        if self.sync_until_s is not None and self.sync_until_s <= t_s + _EPS_S:
            self._finish_sync(t_s)
        if (
            self.round is not None
            and self.round.kind is RunMode.FEDERATED
            and self.round.end_s <= t_s + _EPS_S
        ):
            self._end_round_with_sync(t_s, set())
        return changed

    def _timers_due(self, t_s: float) -> bool:
        due = t_s + _EPS_S
        return (
            any(site.until_s <= due for site in self.sites.values())
            or (self.sync_until_s is not None and self.sync_until_s <= due)
            or (self.round is not None and self.round.end_s <= due)
        )

    def _decide(self, t_s: float) -> float:
        observation = Observation(
            now_s=t_s,
            site_states={name: self._state(s) for name, s in self.sites.items()},
            tokens_trained=self.tokens,
            token_budget=self.context.token_budget,
        )
        decision = self.policy.decide(t_s, observation)
        for name, site in self.sites.items():
            site.intent = Intent(decision.intents.get(name, Intent.OFF))
        if decision.next_decision_s <= t_s:
            raise PolicyProtocolError(
                f"policy {self.policy.kind!r} asked to decide again at {decision.next_decision_s} "
                f"which is not after now ({t_s}); return math.inf when nothing is planned"
            )
        return decision.next_decision_s

    def _settle(self, t_s: float, next_decision_s: float, ask: bool) -> float:
        """Advance timers, ask the policy when due, apply, until this instant is steady.

        The policy is asked at the time it requested and whenever a site became ready; round
        ends and syncs are the executor's business.
        """
        for _ in range(100):
            failed = self._apply_failures(t_s)
            ask = self._expire_timers(t_s) or ask or failed or t_s >= next_decision_s - _EPS_S
            if ask:
                next_decision_s = self._decide(t_s)
                ask = False
            self._apply_intents(t_s)
            self._join_ready_sites(t_s)
            if not self._timers_due(t_s) and not self._failures:
                return next_decision_s
        raise PolicyProtocolError(f"no steady state at t={t_s}: the policy and timers keep flipping")

    def _lose_time(self, t_s: float, from_s: float, to_s: float) -> tuple[float, float]:
        """The run was down over ``[from_s, to_s)``: release every site at ``t_s`` (= ``from_s``),
        close the round without a sync, and decide afresh at ``to_s`` (see :meth:`run`)."""
        to_s = max(to_s, t_s)
        self.recorder.event(t_s, "", "lost_time", from_s=from_s, to_s=to_s, lost_s=to_s - from_s,
                            tokens=round(self.tokens))
        self.round, self.sync_until_s, self.sync_members = None, None, set()
        for site in self.sites.values():
            site.intent, site.member, site.failures, site.benched = Intent.OFF, False, 0, False
            if self._state(site) is not SiteState.OFF:
                self._set(site, SiteState.OFF, t_s)
                self.on_drain(site.name, t_s)  # nothing to stop: its group went with the coordinator
            site.until_s = math.inf
        self._failures.clear()
        self._update_mode(t_s)
        self.on_lost_time(from_s, to_s)
        return to_s, self._settle(to_s, math.inf, ask=True)

    # ---------------------------------------------------------------- main loop

    def run(
        self, resume_from: dict[str, Any] | None = None, *, lost_time: Sequence[tuple[float, float]] = ()
    ) -> Trajectory:
        """Execute the run to its budget or deadline (from a :meth:`snapshot` if given).

        ``lost_time``: stretches ``(from_s, to_s)`` of the run's clock in which it was down (a live
        run whose coordinator died after its checkpoint at ``from_s`` and resumed at ``to_s``: the
        clock never rewinds). At ``from_s`` every site is released and the round closed without a
        sync (what was trained since the checkpoint is lost; the ledger trains it again); nothing
        runs until ``to_s``, where the policy decides afresh. A replay passes the run's stretches.
        """
        context = self.context
        budget = context.token_budget
        lost = sorted(lost_time)
        if resume_from is None:
            t_s = context.start_s
            next_decision_s = self._settle(t_s, math.inf, ask=True)
        else:
            t_s, next_decision_s = self.restore(resume_from)
            self.recorder.event(t_s, "", "resume", tokens=round(self.tokens))
        while True:
            if lost and t_s >= lost[0][0] - _EPS_S:
                t_s, next_decision_s = self._lose_time(t_s, *lost.pop(0))
                continue
            if self.at_safe_point(t_s, next_decision_s, self._round_view()):
                self.recorder.event(t_s, "", "interrupted", tokens=round(self.tokens))
                self.on_interrupt(t_s)
                return self.recorder.finish(t_s, completed=False)
            training = [s for s in self.sites.values() if self._state(s) is SiteState.TRAINING]
            rate = sum(s.tokens_per_s for s in training)
            candidates = [next_decision_s, context.deadline_s, t_s + self.max_segment_s]
            candidates += [lost[0][0]] if lost else []
            candidates += [s.until_s for s in self.sites.values()]
            if self.round is not None:
                candidates.append(self.round.end_s)
            if self.sync_until_s is not None:
                candidates.append(self.sync_until_s)
            if rate > 0:  # never less than one float step: tiny remainders must still advance time
                candidates.append(max(t_s + (budget - self.tokens) / rate, math.nextafter(t_s, math.inf)))
            t_next = max(min(candidates), t_s)
            if training and t_next > t_s:
                for name, tokens in self.work([s.name for s in training], t_s, t_next, self._round_view()).items():
                    self.recorder.add_tokens(name, tokens)
                    self.tokens += tokens
            elif t_next > t_s:
                self.pass_time(t_s, t_next)
            t_s = t_next
            self._apply_failures(t_s)
            if self.tokens >= budget * (1 - 1e-12):
                self.recorder.event(t_s, "", "budget_reached", tokens=round(self.tokens))
                self.on_finish(t_s, True, self._round_view())
                return self.recorder.finish(t_s, completed=True)
            if t_s >= context.deadline_s - _EPS_S:
                self.recorder.event(t_s, "", "deadline", tokens=round(self.tokens))
                self.on_finish(t_s, False, self._round_view())
                return self.recorder.finish(t_s, completed=False)
            next_decision_s = self._settle(t_s, next_decision_s, ask=False)
