"""The run state machine with real training: the simulator's executor, driving Ray sites.

:class:`RayExecutor` is the planning layer's :class:`~curtail.planning.executor.Executor` — the
same state machine the simulator runs, driven by the same policy — with real work: each
training stretch becomes :class:`~curtail.runtime.protocol.Train` commands to the sites'
persistent worker groups (how many steps: the :class:`~curtail.runtime.clock.RunClock`), and
every sync, join, hand-off and leave becomes submissions to the averaging actor and loads of
the global weights. It only orchestrates; each job belongs to one collaborator:

* the sites (:class:`~curtail.runtime.sites.SiteGroup`): commands and typed replies;
* the averaging actor: outer steps, publishes, withdrawals;
* the work account (:class:`~curtail.runtime.work_account.WorkAccount`): claims, pending
  work, deliveries, the ledger and its journal;
* the checkpointer (:class:`~curtail.runtime.run_checkpointer.RunCheckpointer`);
* telemetry (:class:`~curtail.runtime.telemetry.Telemetry`) and the held-out evaluator.

With ``[execution] overlap_sync`` a federated sync only hands each member's packed round to its
transfer thread (:mod:`curtail.runtime.streaming`) and the next round starts at once; the round
*lands* when the averaging actor has stepped on it (:meth:`RayExecutor._land`): its work is
delivered then, the global version moves and the evaluator scores it. Everything that must see
the landed round first (the next sync, a join, a leave, a hand-off, a drain, a checkpoint) waits
for it; a site that dies meanwhile is withdrawn from the round, which lands on the others.
A checkpoint due at an overlapped sync is *deferred* (:class:`DeferredCheckpoint`): its state
is captured at the sync (the state machine, the ledger, the journal mark) and written when the
round lands, with that round's work recorded as delivered and the averaging actor's weights
after its step, so no site waits for it. A member lost before the landing drops that
checkpoint (the next sync takes one). The price of overlap: a crash while a round is in flight
loses that round and what was trained since its sync (at most two rounds; one without overlap).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from curtail.planning.executor import Executor, RoundView
from curtail.planning.policy import Policy, PolicyContext, SiteState
from curtail.planning.trajectory import LossPoint, RunMode, Trajectory, TrajectoryRecorder
from curtail.run_store import join
from curtail.runtime.averager import AveragerClient
from curtail.runtime.capacity import SiteCapacity
from curtail.runtime.checkpoint import RunCheckpoint
from curtail.runtime.clock import RunClock
from curtail.runtime.protocol import (
    Command,
    Flush,
    Load,
    LoadOptimizer,
    Publish,
    Reply,
    SaveOptimizer,
    Submit,
    Train,
)
from curtail.runtime.run_checkpointer import RunCheckpointer
from curtail.runtime.sites import SiteFailure, SiteGroup
from curtail.runtime.telemetry import Telemetry
from curtail.runtime.work_account import WorkAccount
from curtail.training.ledger import DataLedger, TokenRange


@dataclass(frozen=True)
class ExecutorOptions:
    """How the real executor behaves beyond the planning context."""

    tokens_per_step: int
    clock: str = "virtual"  # or "realtime"
    realtime_speedup: float = 1.0
    single_publish_interval_s: float = 600.0  # a single site delivers (and so checkpoints) this often
    deadline_is_trace_end: bool = False  # the run's deadline is where its carbon signal ends
    report_interval_s: float = 10.0  # a site reports its progress to Ray Train at most this often (wall)
    overlap_sync: bool = False  # members train on while their sync is in flight (streaming.py)
    sync_fragments: int = 1  # >1: in fragments sent at staggered points of the next round (streaming.py)
    landing_timeout_s: float = 600.0  # an overlapped round's submissions must arrive within this (wall)


@dataclass
class DeferredCheckpoint:
    """A checkpoint of the instant of an overlapped sync, written when its round lands."""

    round_index: int
    executor: dict[str, Any]  # the state machine at the sync
    ledger: DataLedger  # a copy at the sync: the round's ranges still claimed
    in_flight: dict[str, list[tuple[TokenRange, int]]]  # each member's round: completed at the landing
    bookkeeping: dict[str, Any]  # the coordinator's, with the journal mark of the sync
    scoring: list[tuple[float, float, Any]]  # held-out scores still running at the sync (added when written)


def scores(scoring: list[tuple[float, float, Any]]) -> list[LossPoint]:
    """The held-out scores of syncs being evaluated, ``(t_s, tokens, ref)`` each (waits for them)."""
    return [LossPoint(t_s, "", tokens, float(ray.get(ref)["loss"]), kind="eval") for t_s, tokens, ref in scoring]


def add_scores(executor_state: dict[str, Any], scoring: list[tuple[float, float, Any]]) -> None:
    """Add the held-out scores still running when a checkpoint was taken to its executor state
    (in the checkpoint writer, off the coordinator's thread: a resume keeps every sync's score)."""
    executor_state["recorder"]["losses"] += [TrajectoryRecorder.loss_state(scored) for scored in scores(scoring)]


class RayExecutor(Executor):
    """The executor state machine with real training on Ray; see the module doc."""

    max_segment_s = 600.0  # progress at least every 10 minutes of the run's clock

    def __init__(
        self,
        context: PolicyContext,
        policy: Policy,
        options: ExecutorOptions,
        *,
        groups: dict[str, SiteGroup],
        averager: AveragerClient,
        account: WorkAccount,
        checkpointer: RunCheckpointer | None = None,
        evaluator: Any = None,
        on_progress: Callable[[RayExecutor, float, float], None] | None = None,
        capacity: SiteCapacity | None = None,
    ):
        super().__init__(context, policy)
        self.capacity = capacity
        self.options = options
        self.groups = groups
        self.averager = averager
        self.account = account
        self.checkpointer = checkpointer
        self.evaluator = evaluator
        self.on_progress = on_progress
        step_s = {name: options.tokens_per_step / cfg.tokens_per_s for name, cfg in context.sites.items()}
        self.clock = RunClock(options.clock, options.realtime_speedup, context.start_s, step_s)
        self.telemetry = Telemetry(list(context.sites))
        self.loaded_version = dict.fromkeys(context.sites, -1)
        self.global_version = 0
        self.last_publish_s: dict[str, float] = {}
        self.sync_bytes: dict[str, list[int]] = {}  # this sync's [sent, received] per site (the link's charge)
        self.last_report_wall: dict[str, float] = {}  # when each site last reported to Ray Train
        self.ray_train_metrics: dict[str, dict[str, Any]] = {}  # each site's Result metrics at its last drain
        self.max_segment_s = min(self.max_segment_s, options.single_publish_interval_s)
        self.pending_evals: list[tuple[float, float, Any]] = []
        self.in_flight: tuple[int, list[str]] | None = None  # an overlapped round not landed: (index, sites)
        self.deferred: DeferredCheckpoint | None = None
        self.stop_requested = threading.Event()  # set from another thread: stop at the next safe point
        self.interrupted = False
        self._resume_note: dict[str, Any] = {}
        self._resume_inner_dir: Path | None = None

    # ------------------------------------------------------------------ run, resume, checkpoints

    def run(self, resume_from: RunCheckpoint | None = None, *, resume_at_s: float | None = None) -> Trajectory:  # type: ignore[override]
        """Run, or resume from a checkpoint: at its own instant (a trace's clock), or (a live
        run: ``resume_at_s``, now on the grid's clock) after the lost stretch since it, with every
        site released (its nodes went with the coordinator)."""
        if resume_from is None:
            self.clock.start()
            return super().run()
        saved = resume_from.coordinator
        self._restore_bookkeeping(saved)
        self._resume_note = self.account.resume(
            int(saved.get("journal_seq", 0)), resume_from.path.name, float(resume_from.executor["t_s"]),
            saved.get("wall_time"),
        )
        self._resume_inner_dir = resume_from.inner_dir
        if resume_at_s is not None:
            self._resume_inner_dir = None  # no site is up to take them: each starts its next window afresh
            self.clock.start(at_s=resume_at_s)
            return super().run(resume_from=resume_from.executor,
                               lost_time=[(float(resume_from.executor["t_s"]), resume_at_s)])
        self.clock.start()
        t_s = float(resume_from.executor["t_s"])
        for name, state in resume_from.executor["recorder"]["state"].items():
            if SiteState(state) is not SiteState.OFF and self.capacity is not None:
                self.capacity.want(name, t_s)  # provisioned when the checkpoint was taken: its nodes again
            if SiteState(state) not in (SiteState.OFF, SiteState.PROVISIONING):  # its group was up: bring it back
                self.groups[name].start()
        return super().run(resume_from=resume_from.executor)

    def restore(self, state: dict[str, Any]) -> tuple[float, float]:
        t_s, next_decision_s = super().restore(state)
        if self._resume_note:  # the recorder is the checkpoint's again: add the event now
            self.recorder.event(t_s, "", "retrained", **self._resume_note)
            self._resume_note = {}
        if self._resume_inner_dir is not None:
            self._load_inner_optimizers(Path(self._resume_inner_dir), t_s)
            self._resume_inner_dir = None
        return t_s, next_decision_s

    def _bookkeeping(self) -> dict[str, Any]:
        return {
            "global_version": self.global_version, "last_publish_s": dict(self.last_publish_s),
            "checkpoint_sequence": self.checkpointer.sequence if self.checkpointer is not None else 0,
            "journal_seq": self.account.journal_seq, "wall_time": time.time(),
            **self.clock.state(), **self.telemetry.state(),
        }

    def _restore_bookkeeping(self, saved: dict[str, Any]) -> None:
        self.global_version = saved["global_version"]
        self.last_publish_s = {k: float(v) for k, v in saved["last_publish_s"].items()}
        self.clock.restore(saved)
        self.telemetry.restore(saved)
        if self.checkpointer is not None:
            self.checkpointer.restore(saved["checkpoint_sequence"], self.global_version)

    def at_safe_point(self, t_s: float, next_decision_s: float, current: RoundView | None) -> bool:
        """Checkpoint after every sync or hand-off, when no site holds undelivered work. On a
        stop request: a single site delivers first; a federated round runs to its sync."""
        stopping = self.stop_requested.is_set()
        if stopping and current is not None and current.kind is RunMode.SINGLE:
            for site in current.members:
                if self.account.undelivered(site):
                    self._publish(site, t_s, current.index)
        if self.checkpointer is None:
            return stopping
        if self.in_flight is not None and stopping:
            self._land(t_s, wait=True)  # a checkpoint holds no work in flight
        if self.in_flight is not None:
            if self.deferred is None and self.account.settled_but_in_flight:
                self.deferred = DeferredCheckpoint(
                    self.in_flight[0], self.snapshot(t_s, next_decision_s),
                    DataLedger.from_dict(self.account.ledger.to_dict()),
                    {site: list(pending) for site, (pending, _) in self.account.in_flight.items()},
                    self._bookkeeping(), list(self.pending_evals),
                )
            return False
        if not self.account.settled:
            return False
        if stopping or self.checkpointer.due(self.global_version):
            self._checkpoint(t_s, next_decision_s)
        return stopping

    def _checkpoint(self, t_s: float, next_decision_s: float) -> None:
        assert self.checkpointer is not None
        started = time.perf_counter()
        scoring = list(self.pending_evals)
        self.checkpointer.save(
            self.global_version,
            save_averager=self.averager.save_later,
            save_inner=lambda folder: self._save_inner_optimizers(folder, t_s),
            state=lambda: {"ledger": self.account.ledger.to_dict(),
                           "executor": self.snapshot(t_s, next_decision_s), "coordinator": self._bookkeeping()},
            complete_executor=lambda executor: add_scores(executor, scoring),
        )
        self.telemetry.action(t_s, "checkpoint", self.num_rounds, time.perf_counter() - started)

    def _checkpoint_landed(self, outcome: dict[str, Any], t_s: float) -> None:
        """Write the checkpoint deferred at the sync of the round that just landed (see the module doc)."""
        assert self.checkpointer is not None and self.deferred is not None
        deferred, self.deferred = self.deferred, None
        if set(deferred.in_flight) - set(outcome["sites"]):  # a member was lost: its ranges are not in
            return
        for site, pending in deferred.in_flight.items():
            for token_range, trained in pending:
                deferred.ledger.complete(site, token_range, trained)
        started = time.perf_counter()
        self.checkpointer.save(
            self.global_version, save_averager=self.averager.save_later,
            save_inner=lambda folder: self._save_inner_optimizers(folder, t_s),
            state=lambda: {"ledger": deferred.ledger.to_dict(), "executor": deferred.executor,
                           "coordinator": {**deferred.bookkeeping, "global_version": self.global_version}},
            complete_executor=lambda executor: add_scores(executor, deferred.scoring),
        )
        self.telemetry.action(t_s, "checkpoint", deferred.round_index, time.perf_counter() - started)

    def _save_inner_optimizers(self, folder: str, t_s: float) -> bool:
        """Every running site saves its inner AdamW into ``folder/<site>`` (all ranks; a path or a URI)."""
        running = [site for site, group in self.groups.items() if group.running]
        return bool(self._exchange({site: SaveOptimizer(join(folder, site)) for site in running}, t_s, self.num_rounds))

    def _load_inner_optimizers(self, inner: Path, t_s: float) -> None:
        """Resume: the restarted sites take the inner AdamW saved with the checkpoint (newer
        than their Ray Train checkpoints, which are written only when a site drains)."""
        assert self.checkpointer is not None  # a resume's inner states come with its checkpoint
        where = self.checkpointer.store.location  # where the sites' nodes read the working copy's files
        commands = {site: LoadOptimizer(where(inner / site))
                    for site, group in self.groups.items() if group.running and (inner / site).is_dir()}
        replies = self._exchange(commands, t_s, self.num_rounds)
        self.recorder.event(t_s, "", "inner_optimizer_restored",
                            sites=sorted(site for site, reply in replies.items() if reply.loaded))

    def pass_time(self, start_s: float, end_s: float) -> None:
        self.clock.pass_time(start_s, end_s)

    # ------------------------------------------------------------------ talking to sites

    def _exchange(self, commands: dict[str, Command], t_s: float, round_index: int) -> dict[str, Any]:
        """Send each site its command, then collect the replies; failed sites drop out."""
        replies, failures = self._send_all(commands, t_s, round_index)
        for site, error in failures.items():
            self._fail(site, error, t_s)
        if self.capacity is not None:
            for site in replies:  # its worker group answers: measured group-ready time
                self.capacity.group_ready(site)
        return replies

    def _send_all(
        self, commands: dict[str, Command], t_s: float, round_index: int
    ) -> tuple[dict[str, Any], dict[str, SiteFailure]]:
        """Send each site its command, then collect the replies and the failures."""
        failures: dict[str, SiteFailure] = {}
        for site, command in commands.items():
            try:
                self.groups[site].send(command)
            except SiteFailure as error:
                failures[site] = error
        replies: dict[str, Reply] = {}
        for site in [site for site in commands if site not in failures]:
            try:
                replies[site] = self.groups[site].receive()
            except SiteFailure as error:
                failures[site] = error
                continue
            self.telemetry.reply(t_s, site, commands[site].kind, round_index, replies[site])
        return replies, failures

    def _fail(self, site: str, error: Exception, t_s: float) -> None:
        """Hand a site failure to the state machine; its undelivered round work is lost (and a
        submission still in flight is withdrawn: its round lands on the others)."""
        self._land(t_s, wait=False)  # landed already: that work is delivered, not lost
        if self.in_flight is not None and site in self.in_flight[1]:
            self.in_flight[1].remove(site)
            self.averager.withdraw(self.in_flight[0], [site])
        self.report_failure(site, str(error), lost_tokens=self.account.lose_round(site))

    def _send_overlapped(self, sites: list[str], round_index: int, t_s: float) -> None:
        """An overlapped sync: every member packs its round and trains on; it lands later (:meth:`_land`)."""
        commands = {site: Submit(round_index, self.account.undelivered(site), overlap=True) for site in sites}
        self.averager.expect(round_index, list(commands))
        replies = self._exchange(commands, t_s, round_index)
        for site, reply in replies.items():
            self.account.send(site)
            self._count_bytes(site, sent=reply.num_bytes)
        failed = sorted(set(commands) - set(replies))
        if failed:  # never sent (or sent and then lost): not waited for, not counted
            self.averager.withdraw(round_index, failed)
        self.in_flight = (round_index, sorted(replies))
        self._land(t_s, wait=False)

    def _land(self, t_s: float, *, wait: bool) -> None:
        """If the round in flight has stepped: deliver its work, move the global version, score
        it. With ``wait``, wait for that (the members idle meanwhile: recorded as their
        ``landing_wait``), failing members that died or whose submission does not arrive within
        ``landing_timeout_s``."""
        if self.in_flight is None:
            return
        round_index, sites = self.in_flight
        status = self.averager.round_status(round_index)
        if status["outcome"] is None:
            if not wait:
                return
            status = self._wait_for_landing(round_index, t_s)
            if status is None:  # withdrawing the dead let it land (inside _fail)
                return
        self.in_flight = None
        outcome = status["outcome"]
        for site in outcome["sites"]:
            if site in self.account.in_flight:
                self.account.arrived(site, t_s)
        self.global_version = outcome["version"]
        for site in sites:
            if self.groups[site].running:  # it merges this version before anything but training
                self.loaded_version[site] = self.global_version
        self.telemetry.action(t_s, "landed", round_index, 0.0)
        self._evaluate(t_s)
        if self.deferred is not None and self.deferred.round_index == round_index:
            self._checkpoint_landed(outcome, t_s)

    def _wait_for_landing(self, round_index: int, t_s: float) -> dict[str, Any] | None:
        """The in-flight round's status once it stepped (None: it landed meanwhile, see :meth:`_land`)."""
        assert self.in_flight is not None
        started = time.monotonic()
        waiting = [site for site in self.in_flight[1] if self.groups[site].running]
        if self.options.sync_fragments > 1:  # fragments a short round left unsent go now
            self._exchange(dict.fromkeys(waiting, Flush()), t_s, round_index)
            if self.in_flight is None:  # a member failed, and withdrawing it let the round land
                return None
        status = self.averager.round_status(round_index)
        while status["outcome"] is None:
            late = time.monotonic() - started > self.options.landing_timeout_s
            for site in sorted(set(status["expected"]) - set(status["arrived"])):
                if late or not self.groups[site].alive():
                    reason = (f"its round {round_index} did not reach the averager within landing_timeout_s = "
                              f"{self.options.landing_timeout_s:g} s" if late else f"died with round {round_index} in flight")
                    self.groups[site].abandon()
                    self._fail(site, SiteFailure(site, reason), t_s)
            if self.in_flight is None:
                return None
            time.sleep(0.05)
            status = self.averager.round_status(round_index)
        for site in waiting:
            self.telemetry.action(t_s, "landing_wait", round_index, time.monotonic() - started, site=site)
        return status

    def _load(self, sites: list[str], t_s: float, round_index: int) -> None:
        sites = [s for s in sites if self.loaded_version[s] != self.global_version]
        if not sites:
            return
        replies = self._exchange(dict.fromkeys(sites, Load()), t_s, round_index)
        for site, reply in replies.items():
            self.loaded_version[site] = reply.version
            self._count_bytes(site, received=reply.num_bytes)
        self.telemetry.loaded(t_s, round_index, self.global_version, replies)

    def _outer_step(self, round_index: int, t_s: float) -> None:
        started = time.perf_counter()
        outcome = self.averager.outer_step(round_index)
        self.global_version = outcome["version"]
        self.telemetry.action(t_s, "outer_step", round_index, time.perf_counter() - started)

    def _submit(self, sites: list[str] | tuple[str, ...], round_index: int, t_s: float) -> None:
        commands = {site: Submit(round_index, self.account.undelivered(site))
                    for site in sites if self.account.undelivered(site) > 0}
        delivered = self._exchange(commands, t_s, round_index)
        for site, reply in delivered.items():
            self.account.delivered(site, t_s)
            self._count_bytes(site, sent=reply.num_bytes)
        failed = sorted(set(commands) - set(delivered))
        if failed:  # their ranges went back to the ledger: their updates, if they arrived, must not count
            withdrawn = self.averager.withdraw(round_index, failed)
            if withdrawn:
                self.recorder.event(t_s, "", "withdrawn", round=round_index, sites=withdrawn)

    def _publish(self, site: str, t_s: float, round_index: int) -> bool:
        """Single-site delivery: the site's weights become global (nothing to do without new work).
        A site that dies after its weights reached the averager still delivered them. Whether
        the global weights changed."""
        self._land(t_s, wait=True)
        if not self.account.undelivered(site):
            return False
        replies, failures = self._send_all({site: Publish()}, t_s, round_index)
        if site in replies:
            self._count_bytes(site, sent=replies[site].num_bytes)
        version = replies[site].version if site in replies else self.averager.published_by(site)
        delivered = version is not None and version > self.global_version
        if delivered:
            self.global_version = version
            self.loaded_version[site] = version
            self.last_publish_s[site] = t_s
            self.account.delivered(site, t_s)
            if site in failures:
                self.recorder.event(t_s, site, "publish_arrived", version=version)
        if site in failures:
            self._fail(site, failures[site], t_s)
        return delivered

    def _evaluate(self, t_s: float) -> None:
        """Score this sync's global weights in the background (no site waits for it)."""
        if self.evaluator is not None:
            snapshot = self.averager.global_snapshot()
            self.pending_evals.append((t_s, self.tokens, self.evaluator.evaluate.remote(snapshot)))

    def collect_evaluations(self) -> None:
        """Record the held-out scores of every sync (waits for those still running)."""
        for scored in scores(self.pending_evals):
            self.recorder.loss(scored)
        self.pending_evals = []

    # ------------------------------------------------------------------ executor hooks

    def work(self, sites: list[str], start_s: float, end_s: float, current: RoundView | None) -> dict[str, float]:
        index = current.index if current is not None else 0
        rates = {s: self.context.sites[s].tokens_per_s for s in sites}
        total_rate = sum(rates.values())
        claims, commands = {}, {}
        # the real-time clock trains as many steps as the wall allows: never claim past the budget
        left_steps = math.ceil(max(0.0, self.context.token_budget - self.tokens) / self.options.tokens_per_step - 1e-9)
        for site in sites:
            steps = self.clock.steps_for(site, start_s, end_s)
            if self.clock.realtime:
                steps = min(steps, left_steps)
                left_steps -= steps
            if steps == 0:
                continue
            claims[site] = self.account.claim(site, steps)
            chunks = tuple((r.start, r.num_tokens // self.options.tokens_per_step) for r in claims[site])
            report = time.time() - self.last_report_wall.get(site, -math.inf) >= self.options.report_interval_s
            if report:
                self.last_report_wall[site] = time.time()
            commands[site] = Train(chunks, tokens_before=self.tokens, concurrency=total_rate / rates[site],
                                   until_wall=self.clock.until_wall(end_s), report=report)
        self._load([s for s in commands if self.loaded_version[s] < 0], start_s, index)  # e.g. after a resume
        commands = {s: c for s, c in commands.items() if self.groups[s].running}
        tokens: dict[str, float] = {}
        for site, reply in self._exchange(commands, end_s, index).items():
            self.account.trained(site, claims[site], reply.tokens, end_s)
            self.clock.observe(site, reply.steps, reply.wall_s)
            tokens[site] = float(reply.tokens)
            self.recorder.loss(LossPoint(end_s, site, self.tokens + sum(tokens.values()), reply.loss))
        self.clock.pass_time(start_s, end_s)  # real time: never ahead of the wall (sites may stop early)
        self._land(end_s, wait=False)
        if current is not None and current.kind is RunMode.SINGLE:
            for site in set(current.members) & set(tokens):  # single site: deliver periodically
                since_s = self.last_publish_s.setdefault(site, start_s)  # never delivered: since it began
                due = end_s - since_s >= self.options.single_publish_interval_s
                if due and self._publish(site, end_s, index):  # a single site's sync: score it too
                    self._evaluate(end_s)
        if self.on_progress is not None:
            self.on_progress(self, end_s, self.tokens + sum(tokens.values()))
        return tokens

    def on_provision(self, site: str, t_s: float) -> None:
        if self.capacity is not None:  # an autoscaler launches the site's nodes meanwhile
            self.capacity.want(site, t_s)

    def on_nodes_ready(self, site: str, t_s: float) -> None:
        self.groups[site].start()

    def on_round_start(self, started: RoundView, t_s: float) -> None:
        if self.in_flight is None or set(started.members) - set(self.in_flight[1]):
            self._land(t_s, wait=True)  # a member without the round in flight loads the landed weights
        self._load([s for s in started.members if not self._merging(s)], t_s, started.index)
        self.telemetry.action(t_s, "round_start", started.index, 0.0)

    def _count_bytes(self, site: str, *, sent: int = 0, received: int = 0) -> None:
        counted = self.sync_bytes.setdefault(site, [0, 0])
        counted[0] += sent
        counted[1] += received

    def sync_pause_s(self, members: list[str]) -> float:
        """The link model charged on the bytes this sync really moved (overlapped only if it was:
        a sync with a joiner, or with a member that trained nothing, blocks)."""
        return self.links.sync_pause_s(members, self._moved_mb(), overlapped=self.in_flight is not None,
                                       fragments=self.options.sync_fragments)

    def join_pause_s(self, site: str) -> float:
        return self.links.join_pause_s(site, self._moved_mb())

    def _moved_mb(self) -> dict[str, tuple[float, float]]:
        return {site: (sent / 1e6, received / 1e6) for site, (sent, received) in self.sync_bytes.items()}

    def _merging(self, site: str) -> bool:
        """``site`` has a round in flight: it merges the result itself (no load)."""
        return self.in_flight is not None and site in self.in_flight[1]

    def on_sync(self, ended: RoundView, members: list[str], t_s: float) -> None:
        self._land(t_s, wait=True)  # the previous round in flight first
        self.sync_bytes = {}
        submitters = [site for site in ended.members if self.account.undelivered(site) > 0]
        if ended.kind is RunMode.SINGLE:  # hand-off: the single site's weights become global
            for site in ended.members:
                self._publish(site, t_s, ended.index)
        elif self.options.overlap_sync and members and set(members) <= set(submitters):
            self._send_overlapped(submitters, ended.index, t_s)  # lands during the next round
            return
        else:
            self._submit(ended.members, ended.index, t_s)
            self._outer_step(ended.index, t_s)
        self._load(members, t_s, ended.index)
        self._evaluate(t_s)

    def on_join(self, site: str, index: int, t_s: float) -> None:
        self._land(t_s, wait=True)  # a joiner starts from the landed weights
        self.sync_bytes.pop(site, None)
        self._load([site], t_s, index)

    def on_leave(self, site: str, current: RoundView, t_s: float) -> None:
        self._land(t_s, wait=True)
        if current.kind is RunMode.SINGLE:
            self._publish(site, t_s, current.index)
            return
        self._submit([site], current.index, t_s)
        if not current.members:  # the last one out averages
            self._outer_step(current.index, t_s)

    def on_drain(self, site: str, t_s: float) -> None:
        self._land(t_s, wait=True)
        if self.capacity is not None:
            self.capacity.release(site)
        try:
            self.telemetry.reply(t_s, site, "stop", 0, self.groups[site].stop())
            if self.groups[site].ray_train_metrics:
                self.ray_train_metrics[site] = self.groups[site].ray_train_metrics
        except SiteFailure as error:  # it died while draining: its handed-over work is safe
            self.recorder.event(t_s, site, "stop_failed", reason=str(error)[-300:])
            self.groups[site].abandon()
        self.loaded_version[site] = -1

    def on_failure(self, site: str, t_s: float) -> None:
        if self.capacity is not None:
            self.capacity.release(site)
        self.recorder.event(t_s, site, "ledger_release", **self.account.release(site, t_s))
        self.clock.reset(site)
        self.loaded_version[site] = -1
        self.groups[site].abandon()

    def on_finish(self, t_s: float, completed: bool, open_round: RoundView | None) -> None:
        if not completed and self.options.deadline_is_trace_end:
            # the carbon signal ran out before the budget: the fallback is to stop here and keep
            # the global model trained so far (final, saved, evaluated); nothing is extrapolated
            self.recorder.event(t_s, "", "trace_end", tokens=round(self.tokens),
                                token_budget=self.context.token_budget,
                                missing_tokens=round(max(0.0, self.context.token_budget - self.tokens)),
                                fallback="stop")
        self._land(t_s, wait=True)
        if open_round is not None and open_round.members:
            if open_round.kind is RunMode.SINGLE:
                self._publish(open_round.members[0], t_s, open_round.index)
            else:
                self._submit(open_round.members, open_round.index, t_s)
                self._outer_step(open_round.index, t_s)
        self._drain_all(t_s)

    def on_interrupt(self, t_s: float) -> None:
        self.interrupted = True
        self._land(t_s, wait=True)
        self._drain_all(t_s)

    def _drain_all(self, t_s: float) -> None:
        for site, group in self.groups.items():
            if group.running:
                self.on_drain(site, t_s)
        self.collect_evaluations()
        if self.checkpointer is not None:
            self.checkpointer.wait()
