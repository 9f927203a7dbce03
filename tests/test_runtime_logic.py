"""The Ray executor's decisions, without a cluster: fake sites, a fake averaging actor.

:class:`~curtail.runtime.ray_executor.RayExecutor` runs the planning layer's state machine and
turns its hooks into commands to the sites' worker groups and calls on the averaging actor.
Here both collaborators are fakes behind autospecs of the real classes (a call that
``SiteGroup`` or ``AveragerClient`` would not accept fails), the policy is the threshold policy
over scripted curtailment traces, and the work account, ledger, journal and run checkpointer
are the real ones. The tests assert on what crossed the edges — every command each site got,
every averager call — and on the ledger, the journal, the checkpoints and the trajectory:
hand-off, joins, leaving mid-round, a site failing before and after its submission reached
the averager, checkpoint and resume, tokens in = tokens accounted. The slow end-to-end tests
(``test_runtime.py``, ``test_faults.py``, ``test_checkpoint.py``) then only prove the wiring.
"""

from __future__ import annotations

import collections
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import PropertyMock, create_autospec

import numpy as np
import pandas as pd
import pytest
from runtime_fixtures import STEP_TOKENS, tiny_experiment

from curtail.config import parse_experiment
from curtail.planning.plan import RunPlan, load_experiment_traces, plan_run
from curtail.planning.trajectory import RunMode, Trajectory
from curtail.run_store import RunStore
from curtail.runtime.averager import AveragerClient
from curtail.runtime.checkpoint import (
    RunCheckpoint,
    audit_journal,
    join_averager_parts,
    lost_since,
    read_checkpoint,
    read_journal,
    select_checkpoint,
    write_averager_part,
)
from curtail.runtime.protocol import (
    Command,
    Flush,
    Flushed,
    Load,
    Loaded,
    LoadOptimizer,
    OptimizerLoaded,
    OptimizerSaved,
    Publish,
    Published,
    Reply,
    SaveOptimizer,
    Stop,
    Stopped,
    Submit,
    Submitted,
    Train,
    Trained,
)
from curtail.runtime.ray_executor import ExecutorOptions, RayExecutor
from curtail.runtime.run_checkpointer import RunCheckpointer
from curtail.runtime.sites import SiteFailure, SiteGroup
from curtail.runtime.work_account import WorkAccount
from curtail.training.ledger import DataLedger

CORPUS_TOKENS = 1_000_000  # the fake sites never read it: only the ledger's positions matter


# ------------------------------------------------------------------------------------- the fakes


class FakeAverager:
    """The averaging actor's bookkeeping without weights: each round's submissions (site →
    tokens), the global version, how many tokens of work the global model holds, and every
    update built on weights older than the global ones (a site that missed a load)."""

    def __init__(self, version: int = 0, num_outer_steps: int = 0, tokens_in_model: float = 0.0):
        self.version = version
        self.num_outer_steps = num_outer_steps
        self.tokens_in_model = tokens_in_model  # tokens averaged in or published
        self.pending: dict[int, dict[str, float]] = {}
        self.stale: list[tuple[str, str, int | None, int]] = []  # (kind, site, its version, global)
        self.log: list[tuple[Any, ...]] = []
        self.newest_publish: tuple[str, int] = ("", -1)
        # overlapped rounds: the sites still to submit, the steps taken, and the submissions
        # still travelling (they arrive the next time anyone asks about a round, if the site lives)
        self.expected: dict[int, set[str]] = {}
        self.outcomes: dict[int, dict[str, Any]] = {}
        self.travelling: list[tuple[FakeSite, int, float, int | None]] = []

    @classmethod
    def from_checkpoint(cls, checkpoint: Any) -> FakeAverager:
        """As ``Averager.load_state`` does on resume."""
        return cls(checkpoint.averager["version"], checkpoint.averager["num_outer_steps"],
                   checkpoint.optimizer["tokens_in_model"])

    # called by the fake sites, as the real sites call the actor
    def submit(self, site: str, round_index: int, tokens: float, base_version: int | None) -> None:
        self._check_base("submit", site, base_version)
        self.pending.setdefault(round_index, {})[site] = tokens
        self.log.append(("submit", round_index, site, tokens))
        self._step_when_complete(round_index)

    def expect(self, round_index: int, sites: list[str]) -> None:
        self.expected[round_index] = set(sites)
        self._step_when_complete(round_index)

    def round_status(self, round_index: int) -> dict[str, Any]:
        for site, index, tokens, base_version in self.travelling:
            if site.running:  # a dead site's submission never arrives
                self.submit(site.name, index, tokens, base_version)
        self.travelling = []
        return {"outcome": self.outcomes.get(round_index), "arrived": sorted(self.pending.get(round_index, {})),
                "expected": sorted(self.expected.get(round_index, ()))}

    def _step_when_complete(self, round_index: int) -> None:
        expected = self.expected.get(round_index)
        if expected is not None and expected <= set(self.pending.get(round_index, {})):
            del self.expected[round_index]
            self.outcomes[round_index] = self.outer_step(round_index)

    def publish(self, site: str, tokens: float, base_version: int | None) -> int:
        self._check_base("publish", site, base_version)
        self.version += 1
        self.tokens_in_model += tokens
        self.log.append(("publish", site, tokens, self.version))
        self.newest_publish = (site, self.version)
        return self.version

    # the AveragerClient side, called by the executor
    def outer_step(self, round_index: int) -> dict[str, Any]:
        contributing = {s: t for s, t in self.pending.pop(round_index, {}).items() if t > 0}
        if contributing:
            self.version += 1
            self.num_outer_steps += 1
            self.tokens_in_model += sum(contributing.values())
        self.log.append(("outer_step", round_index, sorted(contributing), self.version))
        return {"version": self.version, "sites": sorted(contributing), "tokens": contributing}

    def withdraw(self, round_index: int, sites: list[str]) -> list[str]:
        pending = self.pending.get(round_index, {})
        withdrawn = [site for site in sites if pending.pop(site, None) is not None]
        self.log.append(("withdraw", round_index, list(sites), withdrawn))
        if round_index in self.expected:
            self.expected[round_index] -= set(sites)
            self._step_when_complete(round_index)
        return withdrawn

    def state(self) -> dict[str, Any]:
        return {"version": self.version, "num_outer_steps": self.num_outer_steps,
                "params": {"w": np.full(3, self.version, dtype=np.float32)},
                "optimizer": {"name": "fake", "tokens_in_model": self.tokens_in_model}}

    def global_snapshot(self) -> Any:
        return self.version

    def published_by(self, site: str) -> int | None:
        who, version = self.newest_publish
        return version if who == site and version == self.version else None

    def _check_base(self, kind: str, site: str, base_version: int | None) -> None:
        """A pseudo-gradient (or a published model) is only right on top of the global weights
        of now: a round's submissions all start from the version its members loaded."""
        if base_version != self.version:
            self.stale.append((kind, site, base_version, self.version))

    def calls(self, kind: str) -> list[tuple[Any, ...]]:
        return [entry[1:] for entry in self.log if entry[0] == kind]


@dataclass(frozen=True)
class Fault:
    """A site's worker group dies at the ``nth`` command of type ``command`` it is sent: on
    ``send`` (it never got it), or on ``receive`` — before the command took effect, or with
    ``took_effect`` after (e.g. its submission reached the averager, then it died)."""

    command: type[Command]
    nth: int
    at: str = "receive"
    took_effect: bool = False


@dataclass
class Entry:
    """One thing a site's worker group was told: a command (and its reply, once answered), or
    ``start`` / ``abandon``."""

    site: str
    kind: str
    command: Command | None = None
    reply: Reply | None = None


@dataclass
class FakeSite:
    """One site's worker group: answers each command with its typed reply, as the real site
    worker does, and keeps what it holds (the global version it loaded, the tokens trained
    since) so a submission or publish carries exactly its own work."""

    name: str
    averager: FakeAverager
    tokens_per_step: int
    faults: tuple[Fault, ...] = ()
    world_log: list[Entry] = field(default_factory=list)  # every site's entries, in order
    running: bool = False
    version: int | None = None  # the global version its weights descend from
    unsent: float = 0.0  # tokens trained since its last load, submit or publish
    in_flight: int | None = None  # an overlapped round it submitted and has not merged yet
    staggered: bool = False  # its overlapped submission's last fragment goes only on a Flush
    held: list[tuple[FakeSite, int, float, int | None]] = field(default_factory=list)  # not sent yet
    discarded: float = 0.0  # tokens trained and then overwritten by a load (never delivered)
    log: list[Entry] = field(default_factory=list)
    _sent: collections.Counter = field(default_factory=collections.Counter)
    _awaiting: collections.deque = field(default_factory=collections.deque)

    # the SiteGroup surface
    def start(self) -> None:
        if not self.running:
            self.running, self.version, self.unsent, self.in_flight = True, None, 0.0, None
            self._record("start")

    def send(self, command: Command) -> None:
        entry = self._record(command.kind, command)
        if not self.running:
            raise SiteFailure(self.name, f"no worker group to send {command.kind!r} to")
        self._sent[type(command)] += 1
        fault = self._fault(command, self._sent[type(command)])
        if fault is not None and fault.at == "send":
            self._die()
        self._awaiting.append((entry, fault))

    def receive(self) -> Reply:
        entry, fault = self._awaiting.popleft()
        if fault is not None and not fault.took_effect:
            self._die()
        reply = self._execute(entry.command)
        if fault is not None:
            self._die()
        entry.reply = reply
        return reply

    def stop(self) -> Stopped | None:
        if not self.running:
            return None
        self._record("stop", Stop()).reply = Stopped(0.0, 0)
        self.running = False
        return self.log[-1].reply

    def abandon(self) -> None:
        self._awaiting.clear()
        self.running = False
        self._record("abandon")

    def _merge(self, wait: bool) -> None:
        """Merge its round in flight once it stepped (the steps since are kept: nothing discarded);
        ``wait``: it must have (a real site would wait here, and the executor lands it first)."""
        if self.in_flight is None:
            return
        outcome = self.averager.round_status(self.in_flight)["outcome"]
        if outcome is None:
            assert not wait, f"{self.name} would wait forever for round {self.in_flight} to land"
            return
        self.version, self.in_flight = outcome["version"], None

    # what each command does
    def _execute(self, command: Command) -> Reply:
        self._merge(wait=not isinstance(command, (Train, SaveOptimizer, Flush)))
        match command:
            case Train(chunks=chunks):
                steps = sum(num_steps for _, num_steps in chunks)
                self.unsent += steps * self.tokens_per_step
                return Trained(0.01 * steps, steps, steps * self.tokens_per_step, loss=5.0)
            case Load():
                self.discarded += self.unsent
                self.version, self.unsent = self.averager.version, 0.0
                return Loaded(0.0, self.version, f"v{self.version}", ("n",), pid=1000)
            case Submit(round_index=round_index, tokens=tokens, overlap=overlap):
                assert tokens == self.unsent, f"{self.name} submits {tokens} tokens, trained {self.unsent}"
                if overlap:  # it travels (or waits for a flush); the site trains on
                    queue = self.held if self.staggered else self.averager.travelling
                    queue.append((self, round_index, tokens, self.version))
                    self.in_flight = round_index
                else:
                    self.averager.submit(self.name, round_index, tokens, self.version)
                self.unsent = 0.0
                return Submitted(0.0, num_bytes=0 if overlap else 12)
            case Flush():
                self.averager.travelling.extend(self.held)
                self.held = []
                return Flushed(0.0)
            case Publish():
                self.version = self.averager.publish(self.name, self.unsent, self.version)
                self.unsent = 0.0
                return Published(0.0, self.version)
            case SaveOptimizer(path=path):
                Path(path).mkdir(parents=True, exist_ok=True)
                (Path(path) / "rank0.pt").write_bytes(b"adamw")
                return OptimizerSaved(0.0)
            case LoadOptimizer(path=path):
                return OptimizerLoaded(0.0, loaded=(Path(path) / "rank0.pt").is_file())
        raise AssertionError(f"the executor sent {command!r}, which no site handles")

    def _fault(self, command: Command, nth: int) -> Fault | None:
        return next((f for f in self.faults if isinstance(command, f.command) and f.nth == nth), None)

    def _die(self) -> None:
        self.running = False
        raise SiteFailure(self.name, "worker group failed: injected fault")

    def _record(self, kind: str, command: Command | None = None) -> Entry:
        entry = Entry(self.name, kind, command)
        self.log.append(entry)
        self.world_log.append(entry)
        return entry

    # reading the log
    def kinds(self) -> list[str]:
        return [entry.kind for entry in self.log]

    def entries(self, kind: str) -> list[Entry]:
        return [entry for entry in self.log if entry.kind == kind]

    def trained_tokens(self) -> int:
        return sum(entry.reply.tokens for entry in self.entries("train") if entry.reply is not None)

    def trained_since_load(self, until: Entry) -> list[Entry]:
        """The answered train commands between the last load before ``until`` and ``until``."""
        end = self.log.index(until)
        start = max((i for i in range(end) if self.log[i].kind in ("load", "start")), default=0)
        return [e for e in self.log[start:end] if e.kind == "train" and e.reply is not None]


def autospec_group(site: FakeSite) -> SiteGroup:
    """A ``SiteGroup`` autospec whose methods are the fake's (and ``running`` its state)."""
    group = create_autospec(SiteGroup, instance=True, spec_set=True)
    group.ray_train_metrics = None  # no Ray Train run behind a fake group
    for method in ("start", "send", "receive", "stop", "abandon"):
        getattr(group, method).side_effect = getattr(site, method)
    group.alive.side_effect = lambda: site.running
    type(group).running = PropertyMock(side_effect=lambda: site.running)
    return group


def autospec_averager(averager: FakeAverager) -> AveragerClient:
    client = create_autospec(AveragerClient, instance=True, spec_set=True)
    for method in ("outer_step", "withdraw", "state", "global_snapshot", "published_by", "expect", "round_status"):
        getattr(client, method).side_effect = getattr(averager, method)
    client.save_later.side_effect = lambda folder: functools.partial(  # the state of now, written now
        join_averager_parts, [write_averager_part(folder, averager.state())])
    return client


# ---------------------------------------------------------------------------------- a run of them


def windows_csv(path: Path, windows: dict[str, list[tuple[int, int]]], hours: int) -> Path:
    """A 5-minute trace per site: curtailed (20 g/kWh) inside its windows, in minutes, else 400."""
    minutes = np.arange(hours * 12) * 5
    frame = pd.DataFrame({"time": pd.date_range("2026-01-11", periods=len(minutes), freq="5min", tz="UTC")
                          .strftime("%Y-%m-%dT%H:%M:%S+00:00")})
    for site, spans in windows.items():
        inside = np.zeros(len(minutes), dtype=bool)
        for start, end in spans:
            inside |= (minutes >= start) & (minutes < end)
        frame[site.upper()] = np.where(inside, 20.0, 400.0)
    frame.to_csv(path, index=False)
    return path


def make_plan(tmp_path: Path, windows: dict[str, list[tuple[int, int]]] | None = None, hours: int = 2) -> RunPlan:
    """The plan of ``tiny_experiment`` (a alone, b joins, a leaves mid-round, b alone, idle, a
    rejoins), or of the same experiment over ``windows``; planned afresh each call, as a
    resumed coordinator does."""
    experiment = tiny_experiment(tmp_path)
    if windows is not None:
        site = experiment["sites"]["a"]
        experiment["traces"] = [{"path": str(windows_csv(tmp_path / "windows.csv", windows, hours))}]
        experiment["sites"] = {name: {**site, "region": name.upper()} for name in windows}
        experiment["runs"] = [{**experiment["runs"][0], "sites": sorted(windows)}]
    config = parse_experiment(experiment, base_dir=tmp_path)
    traces, forecasts = load_experiment_traces(config)
    return plan_run(config, config.runs[0], traces, forecasts)


@dataclass
class FakeRun:
    plan: RunPlan
    averager: FakeAverager
    sites: dict[str, FakeSite]
    executor: RayExecutor
    log: list[Entry]  # every site's commands, in the order they were sent

    @property
    def ledger(self) -> DataLedger:
        return self.executor.account.ledger

    def events(self, trajectory: Trajectory, kind: str, site: str | None = None) -> list[Any]:
        return [e for e in trajectory.events if e.event == kind and (site is None or e.site == site)]

    def at(self, event: Any) -> float:
        """Seconds into the run."""
        return event.t_s - self.plan.context.start_s


def sequence(entries: list[Entry]) -> list[tuple[str, str]]:
    return [(entry.site, entry.kind) for entry in entries]


def fake_run(
    plan: RunPlan,
    *,
    faults: dict[str, tuple[Fault, ...]] | None = None,
    averager: FakeAverager | None = None,
    ledger: DataLedger | None = None,
    run_dir: Path | None = None,
    checkpoints: bool = True,
    on_progress: Any = None,
    publish_interval_s: float = 600.0,
    overlap: bool = False,
    fragments: int = 1,
) -> FakeRun:
    """A RayExecutor over fake sites and a fake averager; with ``run_dir``, the real ledger
    journal and (with ``checkpoints``) the real run checkpointer write there."""
    averager = averager or FakeAverager()
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    log: list[Entry] = []
    sites = {name: FakeSite(name, averager, STEP_TOKENS, (faults or {}).get(name, ()), world_log=log,
                            staggered=fragments > 1)
             for name in plan.context.sites}
    account = WorkAccount(ledger or DataLedger(CORPUS_TOKENS, block_tokens=STEP_TOKENS), STEP_TOKENS,
                          list(plan.context.sites), run_dir)
    executor = RayExecutor(
        plan.context, plan.policy,
        ExecutorOptions(tokens_per_step=STEP_TOKENS, clock="virtual", single_publish_interval_s=publish_interval_s,
                        deadline_is_trace_end=True, overlap_sync=overlap, sync_fragments=fragments,
                        landing_timeout_s=5.0),
        groups={name: autospec_group(site) for name, site in sites.items()},
        averager=autospec_averager(averager), account=account,
        checkpointer=RunCheckpointer(RunStore.at(run_dir), inner_optimizer=True) if run_dir and checkpoints else None,
        evaluator=None, on_progress=on_progress,
    )
    return FakeRun(plan, averager, sites, executor, log)


def assert_consistent(run: FakeRun, trajectory: Trajectory, before: int = 0) -> None:
    """Tokens the sites trained (plus those the run had ``before`` a resume) minus those lost
    with failures = the ledger's = the trajectory's = the work the global model holds, with
    nothing left pending or claimed; every update was built on the global weights of its
    time, and every load gave the sites the version the executor believes is global."""
    lost = sum(e.details["lost_tokens"] for e in run.events(trajectory, "failure"))
    trained = before + sum(site.trained_tokens() for site in run.sites.values())
    assert trained - lost == run.ledger.trained_tokens == trajectory.tokens == run.averager.tokens_in_model
    assert run.ledger.trained_by_site == {s: int(t) for s, t in trajectory.tokens_by_site.items() if t}
    assert sum(site.discarded for site in run.sites.values()) == 0
    assert run.executor.account.settled
    run.ledger.check_invariants()
    assert run.averager.stale == []
    for loaded in run.executor.telemetry.digests:
        assert loaded["loaded_versions"] == [loaded["version"]] * len(loaded["sites"]), loaded


def single_run(tmp_path: Path, **kwargs: Any) -> tuple[FakeRun, Trajectory]:
    run = fake_run(make_plan(tmp_path), **kwargs)
    return run, run.executor.run()


# ------------------------------------------------------------------------------------------ tests


def test_hand_off_publishes_the_single_site_and_the_joiner_loads_that_version(tmp_path):
    run, trajectory = single_run(tmp_path)
    (sync,) = [e for e in run.events(trajectory, "sync") if e.details["round"] == 1]
    assert run.at(sync) == 2670 and sync.details["sites"] == ["a", "b"]
    # from b's start on (its nodes are ready at 2640 s, its workers at 2670 s): a publishes, b
    # loads what a published, and only then does anyone train, in federated round 2
    first = sequence(run.log).index(("b", "start"))
    window = run.log[first:first + 7]
    assert sequence(window) == [("b", "start"), ("a", "publish"), ("b", "load"), ("a", "train"),
                                ("b", "train"), ("a", "submit"), ("b", "submit")]
    published, loaded = window[1].reply.version, window[2].reply.version
    assert loaded == published == 4  # a's 4th publish: three periodic ones, then the hand-off
    assert next(d for d in run.executor.telemetry.digests if d["sites"] == ["b"]) == {
        "t_s": sync.t_s, "round": 1, "version": 4, "sites": ["b"], "digests": ["v4"], "loaded_versions": [4]}
    assert run.averager.log[:5] == [("publish", "a", 640.0, 1), ("publish", "a", 640.0, 2), ("publish", "a", 640.0, 3),
                                    ("publish", "a", 256.0, published), ("submit", 2, "a", 640.0)]
    assert run.averager.calls("outer_step")[0] == (2, ["a", "b"], published + 1)
    assert all(round_index != 1 for round_index, *_ in run.averager.calls("submit"))
    modes = trajectory.modes
    assert [(m.mode, m.start_s - run.plan.context.start_s) for m in modes[:3]] == [
        (RunMode.IDLE, 0), (RunMode.SINGLE, 570), (RunMode.FEDERATED, 2670)]
    round_two = [e for e in run.events(trajectory, "round_start") if e.details["round"] == 2]
    assert round_two[0].details == {"round": 2, "mode": "FEDERATED", "sites": ["a", "b"]}


THREE_SITES = {"a": [(5, 55)], "b": [(5, 55)], "c": [(20, 55)]}
"""a and b train federated from 570 s (rounds of 600 s, then a 5-s sync); c is ready at 1470 s,
in the middle of round 2; all three windows close at 3900 s, in the middle of round 6."""


def test_a_site_joining_a_federated_round_loads_the_newest_global_version(tmp_path):
    run = fake_run(make_plan(tmp_path, THREE_SITES))
    trajectory = run.executor.run()
    (join,) = run.events(trajectory, "join_round", "c")
    assert run.at(join) == 1470 and join.details == {"round": 2}
    assert run.averager.log[:3] == [("submit", 1, "a", 640.0), ("submit", 1, "b", 640.0),
                                    ("outer_step", 1, ["a", "b"], 1)]  # round 1 made version 1
    c = run.sites["c"]
    assert c.kinds()[:4] == ["start", "load", "train", "submit"]
    assert c.log[1].reply.version == 1
    # c loaded when it joined (at its joining instant, in round 2), not at its first stretch
    assert [d for d in run.executor.telemetry.digests if d["sites"] == ["c"]] == [
        {"t_s": join.t_s, "round": 2, "version": 1, "sites": ["c"], "digests": ["v1"], "loaded_versions": [1]}]
    # its part of round 2 went into round 2's outer step with the others'
    assert c.log[3].command.round_index == 2
    assert run.averager.calls("outer_step")[1] == (2, ["a", "b", "c"], 2)
    assert_consistent(run, trajectory)


def test_a_single_site_delivers_every_interval_from_its_first_step(tmp_path):
    """Alone from the start, a delivers (and so checkpoints) every 1,000 s of the run's clock
    (longer than one of its 600-s stretches), before any hand-off: not only once another site
    joins (a crash in a long single-site stretch would otherwise lose all of it)."""
    run, trajectory = single_run(tmp_path, publish_interval_s=1000)
    start = run.at(run.events(trajectory, "round_start")[0])
    publishes = [run.at(t) for t in run.executor.telemetry.timings if t.kind == "publish" and t.site == "a"]
    assert [t - start for t in publishes[:2]] == [1200, 2100]  # the 2nd stretch's end, then the hand-off
    assert_consistent(run, trajectory)


def test_a_rejoining_site_starts_from_the_newest_global_version(tmp_path):
    # publishing every 240 s, b's last stretch before its window closes (11280 s to 11400 s)
    # is delivered by its leaving, not by a periodic publish
    run, trajectory = single_run(tmp_path, publish_interval_s=240)
    b, a = run.sites["b"], run.sites["a"]
    assert b.kinds()[-4:] == ["publish", "train", "publish", "stop"]
    left = b.log[-2]
    (leave,) = run.events(trajectory, "leave_round", "b")
    assert [t.t_s for t in run.executor.telemetry.timings if t.site == "b" and t.kind == "publish"][-1] == leave.t_s
    assert [c for c in run.averager.calls("publish") if c[0] == "b"][-1] == ("b", b.log[-3].reply.tokens,
                                                                            left.reply.version)
    rejoin = [e for e in run.events(trajectory, "round_start") if e.details["sites"] == ["a"]][-1]
    assert run.at(rejoin) == 12270
    second_life = a.log[a.kinds().index("stop") + 1:]
    assert [e.kind for e in second_life[:3]] == ["start", "load", "train"]
    assert second_life[1].reply.version == left.reply.version  # exactly what b left behind
    assert_consistent(run, trajectory)


def test_a_site_leaving_mid_round_submits_its_partial_work_once(tmp_path):
    run, trajectory = single_run(tmp_path)
    (leave,) = run.events(trajectory, "leave_round", "a")
    assert run.at(leave) == 7800 and leave.details == {"round": 10, "handed_over": True}
    a = run.sites["a"]
    (submit,) = [e for e in a.entries("submit") if e.command.round_index == 10]  # once, to the round it left
    partial = sum(e.reply.tokens for e in a.trained_since_load(submit))
    assert submit.command.tokens == partial > 0
    assert a.kinds()[a.log.index(submit):][:2] == ["submit", "stop"]  # then it drains
    # b finishes round 10 alone; its outer step counts a's partial round once
    round_ten = [c for c in run.averager.log if c[1] == 10]
    (b_submit,) = [e for e in run.sites["b"].entries("submit") if e.command.round_index == 10]
    assert round_ten == [("submit", 10, "a", partial), ("submit", 10, "b", b_submit.command.tokens),
                         ("outer_step", 10, ["a", "b"], round_ten[-1][3])]
    assert run.ledger.trained_by_site["a"] == trajectory.tokens_by_site["a"] == a.trained_tokens()
    assert_consistent(run, trajectory)


def test_the_last_site_out_of_a_round_averages_it(tmp_path):
    run = fake_run(make_plan(tmp_path, THREE_SITES))
    trajectory = run.executor.run()
    leaves = run.events(trajectory, "leave_round")
    assert [(run.at(e), e.site, e.details["round"]) for e in leaves] == [(3900, s, 6) for s in "abc"]
    round_six = [c for c in run.averager.log if c[1] == 6]
    assert [c[:3] for c in round_six] == [("submit", 6, "a"), ("submit", 6, "b"), ("submit", 6, "c"),
                                         ("outer_step", 6, ["a", "b", "c"])]
    assert run.averager.log[-1] == round_six[-1]  # c, the last out, averaged it; nothing after
    assert run.averager.pending == {}
    assert run.executor.global_version == run.averager.version == round_six[-1][3] == 6
    assert_consistent(run, trajectory)


def _failed_window(site: FakeSite) -> tuple[Entry, list[Entry]]:
    """The command the site died at, and every train since the load before it."""
    failed = next(e for e in site.log if e.kind in ("train", "submit") and e.reply is None)
    index = site.log.index(failed)
    start = max(i for i in range(index) if site.log[i].kind in ("load", "start"))
    return failed, [e for e in site.log[start:index + 1] if e.kind == "train"]


def trained_ranges(trains: list[Entry]) -> list[list[int]]:
    """The ``[epoch, start, end]`` each answered train covered: its tokens fill its chunks in order."""
    ranges = []
    for entry in trains:
        left = entry.reply.tokens if entry.reply is not None else 0
        for start, steps in entry.command.chunks:
            if (tokens := min(left, steps * STEP_TOKENS)) > 0:
                ranges.append([0, start, start + tokens])
            left -= tokens
    return ranges


# b dies at its 3rd submission (the sync of federated round 4: on sending it, or on waiting for
# its answer, before it reached the averager), or at its 9th train (round 9's second stretch,
# with the first one trained and not yet delivered)
@pytest.mark.parametrize("fault", [Fault(Submit, 3, at="send"), Fault(Submit, 3), Fault(Train, 9)],
                         ids=["submit-send", "submit-receive", "train"])
def test_a_site_failing_before_its_work_reached_the_averager_gives_its_ranges_back(tmp_path, fault):
    run, trajectory = single_run(tmp_path, run_dir=tmp_path / "run", checkpoints=False, faults={"b": (fault,)})
    b = run.sites["b"]
    (failure,) = run.events(trajectory, "failure", "b")
    failed, trains = _failed_window(b)
    assert failed.kind == fault.command.kind
    # what b trained since its round began is lost; every claim it held goes back to the pool
    lost = sum(e.reply.tokens for e in trains if e.reply is not None)
    assert failure.details["lost_tokens"] == lost > 0
    claims = [[0, start, start + steps * STEP_TOKENS] for e in trains for start, steps in e.command.chunks]
    (release,) = run.events(trajectory, "ledger_release", "b")
    assert release.t_s == failure.t_s
    assert release.details == {"ranges": claims, "tokens": sum(e - s for _, s, e in claims), "retrained_tokens": lost}
    assert claims == sorted(claims) and len(claims) == len(trains)  # (epoch, start, end), in order
    assert [[r.cause, r.epoch, r.start, r.end] for r in run.ledger.retrained] == [
        ["site_failure:b", *r] for r in trained_ranges(trains)]
    # the averager never had b's work: nothing to withdraw, its round averages a alone
    if fault.command is Submit:
        assert [c[:3] for c in run.averager.log if c[1] == 4] == [
            ("submit", 4, "a"), ("withdraw", 4, ["b"]), ("outer_step", 4, ["a"])]
        assert run.averager.calls("withdraw") == [(4, ["b"], [])]
    else:
        assert run.averager.calls("withdraw") == []
    assert not run.events(trajectory, "withdrawn")
    # b comes back (its window is still open) from the newest weights
    after = b.kinds()[b.kinds().index("abandon"):]
    assert after[:4] == ["abandon", "start", "load", "train"]
    assert trajectory.tokens_by_site["b"] == b.trained_tokens() - lost == run.ledger.trained_by_site["b"]
    assert_consistent(run, trajectory)
    run.executor.account.close()
    released = [e for e in read_journal(tmp_path / "run" / "ledger_journal.jsonl") if e["kind"] == "released"]
    assert [(e["site"], e["ranges"]) for e in released] == [("b", claims)]
    (tmp_path / "run" / "ledger.json").write_text(json.dumps(run.ledger.to_dict()))
    assert audit_journal(tmp_path / "run")["mismatched_tokens"] == 0


def test_a_site_back_from_a_failure_within_the_round_loads_the_global_weights_again(tmp_path):
    # progress every 120 s: c dies at its 3rd train (1900 s, in round 3) and, restarted, joins
    # round 3 again at 2170 s; the global version has not moved, but its new workers hold nothing
    run = fake_run(make_plan(tmp_path, THREE_SITES), faults={"c": (Fault(Train, 3),)}, publish_interval_s=120)
    trajectory = run.executor.run()
    (failure,) = run.events(trajectory, "failure", "c")
    joins = run.events(trajectory, "join_round", "c")
    assert run.at(failure) == 1900 and [(run.at(e), e.details["round"]) for e in joins] == [(1470, 2), (2170, 3)]
    c = run.sites["c"]
    back = c.log[c.kinds().index("abandon"):]
    assert [e.kind for e in back[:5]] == ["abandon", "start", "load", "train", "submit"]
    assert run.averager.calls("outer_step")[1] == (2, ["a", "b", "c"], 2)
    assert back[2].reply.version == 2 and back[4].command == Submit(3, back[3].reply.tokens)
    assert run.averager.calls("outer_step")[2] == (3, ["a", "b", "c"], 3)
    assert_consistent(run, trajectory)  # c's round-3 update was built on version 2


def test_a_site_failing_after_its_submission_arrived_is_withdrawn(tmp_path):
    # b's 3rd submission (federated round 4) reaches the averager, then b dies before answering
    run, trajectory = single_run(tmp_path, faults={"b": (Fault(Submit, 3, took_effect=True),)})
    (failure,) = run.events(trajectory, "failure", "b")
    assert run.at(failure) == 4485 and failure.details["lost_tokens"] > 0
    round_four = [c for c in run.averager.log if c[1] == 4]
    assert round_four == [("submit", 4, "a", 640.0), ("submit", 4, "b", failure.details["lost_tokens"]),
                          ("withdraw", 4, ["b"], ["b"]), ("outer_step", 4, ["a"], round_four[-1][3])]
    (withdrawn,) = run.events(trajectory, "withdrawn")
    assert withdrawn.t_s == failure.t_s and withdrawn.details == {"round": 4, "sites": ["b"]}
    (release,) = run.events(trajectory, "ledger_release", "b")
    assert release.details["retrained_tokens"] == failure.details["lost_tokens"]
    # b's round is re-trained and counted once: in the ledger, the trajectory and the model
    assert_consistent(run, trajectory)


def test_a_site_failing_after_its_publish_arrived_counts_its_work_once(tmp_path):
    # a's 2nd publish (alone, at 1770 s) replaces the global weights, then a dies before answering:
    # its work is in the global model, so it is delivered, not lost and trained again
    run, trajectory = single_run(tmp_path, faults={"a": (Fault(Publish, 2, took_effect=True),)})
    (failure,) = run.events(trajectory, "failure", "a")
    (arrived,) = run.events(trajectory, "publish_arrived", "a")
    assert run.at(failure) == run.at(arrived) == 1770 and failure.details["lost_tokens"] == 0
    assert arrived.details["version"] > 0
    assert run.ledger.retrained_tokens == 0
    assert run.ledger.trained_tokens == trajectory.tokens == run.averager.tokens_in_model
    assert_consistent(run, trajectory)


def test_a_site_failing_before_its_publish_arrived_gives_its_ranges_back(tmp_path):
    run, trajectory = single_run(tmp_path, faults={"a": (Fault(Publish, 2, took_effect=False),)})
    (failure,) = run.events(trajectory, "failure", "a")
    assert run.at(failure) == 1770 and failure.details["lost_tokens"] == 640
    assert not run.events(trajectory, "publish_arrived", "a")
    assert run.ledger.retrained_tokens == 640
    assert run.ledger.trained_tokens == trajectory.tokens == run.averager.tokens_in_model
    assert_consistent(run, trajectory)


def test_tokens_trained_equal_tokens_accounted_over_the_whole_run(tmp_path):
    run, trajectory = single_run(tmp_path, run_dir=tmp_path / "run", checkpoints=False)
    assert trajectory.tokens > 0 and not trajectory.completed
    assert {m.mode for m in trajectory.modes} == {RunMode.IDLE, RunMode.SINGLE, RunMode.FEDERATED}
    assert {name: site.trained_tokens() for name, site in run.sites.items()} == run.ledger.trained_by_site
    assert_consistent(run, trajectory)
    run.executor.account.close()
    journal = read_journal(tmp_path / "run" / "ledger_journal.jsonl")
    trained = sum(e - s for entry in journal if entry["kind"] == "trained" for _, s, e in entry["ranges"])
    delivered = sum(e - s for entry in journal if entry["kind"] == "delivered" for _, s, e in entry["ranges"])
    assert trained == delivered == trajectory.tokens
    (tmp_path / "run" / "ledger.json").write_text(json.dumps(run.ledger.to_dict()))
    assert audit_journal(tmp_path / "run")["mismatched_tokens"] == 0


# --------------------------------------------------------------------------- checkpoint and resume


class SimulatedCrash(Exception):
    """The coordinator died (nothing after this point survives but the files it wrote)."""


IGNORED_ON_RESUME = {"resume", "retrained", "interrupted", "inner_optimizer_restored"}


def comparable(trajectory: Trajectory) -> list[tuple[Any, ...]]:
    return [(e.t_s, e.site, e.event, json.dumps(e.details, sort_keys=True))
            for e in trajectory.events if e.event not in IGNORED_ON_RESUME]


def newest_checkpoint(run_dir: Path) -> RunCheckpoint:
    path, skipped = select_checkpoint(run_dir)
    assert path is not None and skipped == []
    return read_checkpoint(path)


def resume(tmp_path: Path, run_dir: Path, checkpoint: RunCheckpoint, overlap: bool = False) -> tuple[FakeRun, Trajectory]:
    """As a restarted coordinator does: the averager restored from the checkpoint, its ledger
    with every claim back in the pool, fresh sites and executor."""
    ledger = DataLedger.from_dict(checkpoint.ledger)
    ledger.release_all()
    run = fake_run(make_plan(tmp_path), averager=FakeAverager.from_checkpoint(checkpoint), ledger=ledger,
                   run_dir=run_dir, publish_interval_s=PROGRESS_S, overlap=overlap)
    trajectory = run.executor.run(resume_from=checkpoint)
    run.executor.account.close()
    (run_dir / "ledger.json").write_text(json.dumps(run.ledger.to_dict()))
    return run, trajectory


PROGRESS_S = 240
"""Resume tests: publish (and report progress) every 240 s of the run's clock, not only at the
round ends, so that the crash or stop can land mid-round (as the slow fault tests do)."""


def train_timings(executor: RayExecutor) -> list[tuple[float, str, int]]:
    return [(t.t_s, t.site, t.steps) for t in executor.telemetry.timings if t.kind == "train"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run, trajectory = single_run(tmp, run_dir=tmp / "run", publish_interval_s=PROGRESS_S)
    run.executor.checkpointer.wait()
    run.executor.account.close()
    assert run.executor.checkpointer.sequence > 10
    return run, trajectory


@pytest.mark.parametrize(("how", "after_s"), [("crash", 3500), ("stop", 1500), ("stop", 3500)])
def test_a_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(tmp_path, uninterrupted, how, after_s):
    baseline_run, baseline = uninterrupted
    start_s = baseline_run.plan.context.start_s
    fault: dict[str, Any] = {}

    def crash_or_stop(executor: RayExecutor, t_s: float, tokens: float) -> None:
        """After ``after_s``, at the first progress with work not yet delivered."""
        if fault or t_s - start_s < after_s or executor.account.settled:
            return
        assert executor.checkpointer.sequence > 0
        fault.update(t_s=t_s, tokens=tokens, mode=executor.recorder.mode)
        if how == "crash":
            raise SimulatedCrash
        executor.stop_requested.set()

    run_dir = tmp_path / "interrupted"
    first = fake_run(make_plan(tmp_path), run_dir=run_dir, on_progress=crash_or_stop, publish_interval_s=PROGRESS_S)
    if how == "crash":
        with pytest.raises(SimulatedCrash):
            first.executor.run()
    else:
        stopped = first.executor.run()
        assert first.executor.interrupted and not stopped.completed
        (interrupted,) = [e for e in stopped.events if e.event == "interrupted"]
        if fault["mode"] is RunMode.SINGLE:  # the single site delivers, and the run stops at once
            assert interrupted.t_s == fault["t_s"]
            assert first.sites["a"].kinds()[-3:] == ["publish", "save_optimizer", "stop"]
        else:  # a federated round runs to its sync
            assert interrupted.t_s == min(e.t_s for e in stopped.events if e.event == "sync" and e.t_s > fault["t_s"])
    first.executor.checkpointer.wait()
    first.executor.account.close()
    journal_mark = len(read_journal(run_dir / "ledger_journal.jsonl"))

    checkpoint = newest_checkpoint(run_dir)
    assert checkpoint.path.name == first.executor.checkpointer.last_written
    saved_inner = sorted(folder.name for folder in (checkpoint.path / "inner").iterdir())
    saved_weights = checkpoint.params  # read before the resumed run's checkpoints replace this one
    run, resumed = resume(tmp_path, run_dir, checkpoint)
    # the same run: the same events, modes, stretches of work and tokens, and the clock where it was
    assert comparable(resumed) == comparable(baseline)
    assert resumed.modes == baseline.modes
    assert train_timings(run.executor) == train_timings(baseline_run.executor)
    assert run.executor.clock.carry_steps == pytest.approx(baseline_run.executor.clock.carry_steps)
    assert resumed.tokens_by_site == baseline.tokens_by_site
    assert_consistent(run, resumed, before=DataLedger.from_dict(checkpoint.ledger).trained_tokens)
    # the work trained after the checkpoint is exactly what the resume trains again
    (note,) = run.events(resumed, "retrained")
    lost = lost_since(read_journal(run_dir / "ledger_journal.jsonl")[:journal_mark],
                      checkpoint.coordinator["journal_seq"])
    assert note.details["ranges"] == lost["ranges"]
    assert note.details["tokens"] == (fault["tokens"] - checkpoint.executor["tokens"] if how == "crash" else 0)
    assert [[r.epoch, r.start, r.end] for r in run.ledger.retrained] == lost["ranges"]
    assert audit_journal(run_dir)["mismatched_tokens"] == 0
    # the sites whose workers were up at the checkpoint (it holds their inner optimizers) came
    # back at once, took their inner optimizer, then the checkpoint's global weights
    states = checkpoint.executor["recorder"]["state"]
    up = sorted(name for name, state in states.items() if state not in ("off", "provisioning"))
    assert up == (["a"] if fault["mode"] is RunMode.SINGLE else ["a", "b"])
    assert saved_inner == up
    for name, site in run.sites.items():
        if name not in up:
            assert site.entries("load_optimizer") == []
            continue
        assert site.kinds()[:4] == ["start", "load_optimizer", "load", "train"]
        (restore,) = site.entries("load_optimizer")
        assert Path(restore.command.path) == checkpoint.path / "inner" / name and restore.reply.loaded
        assert site.log[2].reply.version == checkpoint.averager["version"]
    (restored,) = run.events(resumed, "inner_optimizer_restored")
    assert restored.details == {"sites": up}
    assert saved_weights["w"].tolist() == [checkpoint.averager["version"]] * 3


# ------------------------------------------------------------------------------ overlapped syncs


def overlapped(site: FakeSite) -> list[Entry]:
    return [e for e in site.entries("submit") if e.command.overlap]


def test_overlapped_syncs_deliver_every_round_once_and_keep_the_steps_in_flight(tmp_path):
    """The same run with overlap_sync: members submit and train on (no load after the sync: they
    merge the landed round, keeping their steps since), every round lands once, nothing is
    discarded or built on stale weights, and the run trains what the blocking run trains."""
    _, blocking_trajectory = single_run(tmp_path)
    run, trajectory = single_run(tmp_path, run_dir=tmp_path / "run", overlap=True)
    assert trajectory.tokens_by_site == blocking_trajectory.tokens_by_site
    assert comparable(trajectory) == comparable(blocking_trajectory)
    for site in run.sites.values():
        assert len(overlapped(site)) >= 3
        for entry in overlapped(site):  # trains on at once (after saving its inner optimizer for a checkpoint)
            following = [e.kind for e in site.log[site.log.index(entry) + 1:] if e.kind != "save_optimizer"]
            assert following[0] == "train"
    landed = [t.round for t in run.executor.telemetry.timings if t.kind == "landed"]
    sent = sorted({e.command.round_index for site in run.sites.values() for e in overlapped(site)})
    assert landed == sent  # every overlapped round landed, once
    assert run.averager.expected == {} and run.averager.travelling == []
    assert_consistent(run, trajectory)
    # a checkpoint per landing, each of its sync's instant with the landed round delivered
    assert run.executor.checkpointer.sequence >= len(landed)
    run.executor.checkpointer.wait()
    run.executor.account.close()
    (tmp_path / "run" / "ledger.json").write_text(json.dumps(run.ledger.to_dict()))
    assert audit_journal(tmp_path / "run")["mismatched_tokens"] == 0


def test_staggered_fragments_a_short_round_left_unsent_are_flushed_before_the_landing(tmp_path):
    """With staggered fragments a member may not have sent its last fragment when the coordinator
    needs the round landed (the fakes send it only when told): the coordinator flushes the
    members first, so every round lands, once, and the run trains what the overlapped run does
    (without the flush the landing would time out and fail both sites)."""
    _, overlapped_trajectory = single_run(tmp_path, overlap=True)
    run, trajectory = single_run(tmp_path, overlap=True, fragments=2)
    assert trajectory.tokens_by_site == overlapped_trajectory.tokens_by_site
    assert not run.events(trajectory, "failure")
    for site in run.sites.values():
        assert site.held == [] and len(overlapped(site)) >= 3
        for entry in overlapped(site):  # its round's fragments were flushed before anything else but training
            following = [e.kind for e in site.log[site.log.index(entry) + 1:] if e.kind not in ("train", "save_optimizer")]
            assert following[0] == "flush", following[:3]
    landed = [t.round for t in run.executor.telemetry.timings if t.kind == "landed"]
    assert landed == sorted({e.command.round_index for site in run.sites.values() for e in overlapped(site)})
    assert_consistent(run, trajectory)


def test_a_site_dying_with_its_round_in_flight_is_withdrawn_and_the_round_lands_on_the_others(tmp_path):
    """b dies right after its first overlapped submit was handed to its transfer thread, before
    the submission arrived: the round lands on a alone, b's round goes back to the ledger, and
    every token is accounted once."""
    plan = make_plan(tmp_path)
    probe, _ = single_run(tmp_path, overlap=True)
    nth = next(i for i, e in enumerate(probe.sites["b"].entries("submit"), 1) if e.command.overlap)
    run = fake_run(plan, overlap=True, faults={"b": (Fault(Submit, nth, took_effect=True),)})
    trajectory = run.executor.run()
    (failure,) = run.events(trajectory, "failure", "b")
    failed = run.sites["b"].entries("submit")[nth - 1]
    round_index = failed.command.round_index
    assert failed.command.overlap and failed.reply is None  # handed to its thread, then it died
    assert [c[:3] for c in run.averager.log if c[1] == round_index] == [
        ("withdraw", round_index, ["b"]), ("submit", round_index, "a"), ("outer_step", round_index, ["a"])]
    assert failure.details["lost_tokens"] == failed.command.tokens > 0
    assert run.ledger.retrained_tokens == failed.command.tokens
    assert_consistent(run, trajectory)


def test_a_crashed_overlapped_run_resumes_from_a_landed_checkpoint(tmp_path):
    """A crash mid-round of an overlapped run: the newest checkpoint is of a sync whose round had
    landed; the resume trains exactly the work after it again and ends as the uninterrupted run."""
    baseline_run, baseline = single_run(tmp_path, publish_interval_s=PROGRESS_S, overlap=True)
    start_s = baseline_run.plan.context.start_s
    fault: dict[str, Any] = {}

    def crash(executor: RayExecutor, t_s: float, tokens: float) -> None:
        if not fault and t_s - start_s >= 3500 and executor.in_flight is None and not executor.account.settled:
            fault.update(t_s=t_s, tokens=tokens)
            raise SimulatedCrash

    run_dir = tmp_path / "interrupted"
    first = fake_run(make_plan(tmp_path), run_dir=run_dir, on_progress=crash, publish_interval_s=PROGRESS_S,
                     overlap=True)
    with pytest.raises(SimulatedCrash):
        first.executor.run()
    first.executor.checkpointer.wait()
    first.executor.account.close()
    checkpoint = newest_checkpoint(run_dir)
    run, resumed = resume(tmp_path, run_dir, checkpoint, overlap=True)
    assert resumed.tokens_by_site == baseline.tokens_by_site
    assert_consistent(run, resumed, before=DataLedger.from_dict(checkpoint.ledger).trained_tokens)
    (note,) = run.events(resumed, "retrained")
    assert note.details["tokens"] == fault["tokens"] - checkpoint.executor["tokens"] > 0
    assert audit_journal(run_dir)["mismatched_tokens"] == 0


@pytest.mark.parametrize(("outer", "expected"), [
    ({"outer_optimizer": "nesterov"}, 0.9 * 110 / 120), ({"outer_optimizer": "nesterov", "outer_momentum": 0.5}, 0.5),
    ({}, None)])
def test_the_reported_outer_momentum_is_the_one_the_averager_applies(outer, expected):
    """``summary.json``'s ``outer_momentum``: the rule's, the set one, or none for plain averaging."""
    from curtail.config import TrainingConfig
    from curtail.runtime.coordinator import resolve_outer_momentum

    got = resolve_outer_momentum(TrainingConfig(**outer), inner_steps=110)
    assert got == (pytest.approx(expected) if expected is not None else None)
