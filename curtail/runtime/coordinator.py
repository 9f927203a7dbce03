"""The coordinator: the Ray driver actor that owns the calendar, the clock and the run.

:class:`RayExecutor` is the planning layer's :class:`~curtail.planning.executor.Executor`
state machine — the same one the simulator runs, driven by the same policy — with real work:
each training segment becomes "train N steps" commands to the sites' persistent Ray Train
worker groups (N from the virtual clock: the step time of the hardware a site represents),
and every sync, join, hand-off and leave becomes pseudo-gradient submissions to the averaging
actor and global-weight loads. The data ledger hands each site disjoint token ranges and
records a site's work as trained once it has entered the global model.

:class:`Coordinator` is the actor wrapper: prepares tokenizer and corpus, creates the
averaging actor and the command mailbox, runs the executor, evaluates and saves the final
global model in the Hugging Face format.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from curtail.config import ExperimentConfig, TrainingConfig, project_root
from curtail.planning.executor import Executor
from curtail.planning.plan import RunPlan, load_experiment_traces, plan_run
from curtail.planning.policy import Policy, PolicyContext
from curtail.planning.signals import iso
from curtail.planning.trajectory import LossPoint, RunMode, Trajectory
from curtail.runtime.averager import Averager
from curtail.runtime.checkpoint import (
    JOURNAL,
    LedgerJournal,
    inner_staging_dir,
    latest_checkpoint,
    lost_since,
    read_checkpoint,
    read_journal,
    write_checkpoint,
)
from curtail.runtime.evaluator import Evaluator
from curtail.runtime.mailbox import Mailbox
from curtail.runtime.sites import SiteFailure, SiteGroup, site_resource
from curtail.training.data import load_corpus
from curtail.training.ledger import DataLedger, TokenRange
from curtail.training.model import build_model, get_spec
from curtail.training.schedule import LRSchedule
from curtail.training.tokenizer import train_tokenizer

HEAD_NODE = {"node:__internal_head__": 0.001}
"""Resource request that keeps the coordinator, averager and fit() drivers on the head node."""


def resolve_data_path(path: Path) -> Path:
    """Relative corpus paths: the working directory first, then the project root."""
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (project_root() / path).resolve()


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


def measured_power_per_gpu_w(timings: list[Timing], warmup_factor: float = 3.0) -> dict[str, float]:
    """Each site's time-weighted mean measured watts per GPU over its train commands (sites
    without readings are left out).

    Warm-up commands are left out: a command whose wall seconds per step exceed
    ``warmup_factor`` times the site's median is the first of a worker group (CUDA start-up
    and compilation, the board mostly idle), not the steady training the accounting prices.
    """
    train = [t for t in timings if t.kind == "train" and t.power_w is not None and t.gpus > 0
             and t.wall_s > 0 and t.steps > 0]
    result = {}
    for site in sorted({t.site for t in train}):
        rows = [t for t in train if t.site == site]
        median_step_s = float(np.median([t.wall_s / t.steps for t in rows]))
        steady = [t for t in rows if t.wall_s / t.steps <= warmup_factor * median_step_s]
        seconds = sum(t.wall_s for t in steady)
        result[site] = sum(t.power_w / t.gpus * t.wall_s for t in steady) / seconds
    return result


@dataclass
class RunArtifacts:
    """What the coordinator hands back to the driver."""

    trajectory: Trajectory
    summary_extra: dict[str, Any]
    timings: list[Timing] = field(default_factory=list)


class RayExecutor(Executor):
    """The executor state machine with real training on Ray; see the module doc."""

    max_segment_s = 600.0  # progress at least every 10 minutes of the run's clock

    def __init__(
        self,
        context: PolicyContext,
        policy: Policy,
        *,
        groups: dict[str, SiteGroup],
        averager: Any,
        ledger: DataLedger,
        tokens_per_step: int,
        evaluator: Any = None,
        clock: str = "virtual",
        realtime_speedup: float = 1.0,
        single_publish_interval_s: float = 600.0,
        checkpoint_dir: Path | None = None,
        checkpoint_inner_optimizer: bool = True,
        on_progress: Any = None,
        deadline_is_trace_end: bool = False,
    ):
        super().__init__(context, policy)
        self.groups = groups
        self.averager = averager
        self.ledger = ledger
        self.tokens_per_step = tokens_per_step
        self.step_s = {name: tokens_per_step / cfg.tokens_per_s for name, cfg in context.sites.items()}
        self.carry_steps = dict.fromkeys(context.sites, 0.0)
        self.pending: dict[str, list[tuple[TokenRange, int]]] = {name: [] for name in context.sites}
        self.round_tokens = dict.fromkeys(context.sites, 0.0)
        self.loaded_version = dict.fromkeys(context.sites, -1)
        self.global_version = 0
        self.timings: list[Timing] = []
        self.digests: list[dict[str, Any]] = []
        self.on_progress = on_progress
        self.last_loss = math.nan
        self.site_nodes: dict[str, set[str]] = {name: set() for name in context.sites}  # Ray node ids
        self.evaluator = evaluator
        self.pending_evals: list[tuple[float, float, Any]] = []
        self.clock = clock
        self.realtime_speedup = realtime_speedup
        self.wall_start = time.time()
        self.step_wall_s = dict.fromkeys(context.sites, 0.05)  # measured, for real-time claims
        self.last_publish_s: dict[str, float] = {}
        self.site_pids: dict[str, int | None] = {}  # rank-0 process of each site (fault injection)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_sequence = 0
        self.checkpointed_version = 0
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._checkpoint_write: concurrent.futures.Future | None = None
        # single-site mode delivers (and so checkpoints) at least this often on the run's clock
        self.single_publish_interval_s = single_publish_interval_s
        self.max_segment_s = min(self.max_segment_s, single_publish_interval_s)
        self.journal = LedgerJournal(checkpoint_dir) if checkpoint_dir is not None else None
        self.deadline_is_trace_end = deadline_is_trace_end
        self._resume_note: dict[str, Any] | None = None
        self.checkpoint_inner_optimizer = checkpoint_inner_optimizer
        self._resume_inner_dir: Path | None = None

    def run(self, resume_from: dict[str, Any] | None = None) -> Trajectory:
        self.wall_start = time.time()
        if resume_from is not None:
            self._restore_bookkeeping(resume_from["coordinator"])
            self._journal_resume(resume_from)
            self._resume_inner_dir = resume_from.get("inner_dir")
            for name, saved in resume_from["executor"]["recorder"]["state"].items():
                if saved != "off":  # its nodes were up: bring the worker group back
                    self.groups[name].start()
            return super().run(resume_from=resume_from["executor"])
        return super().run()

    # ------------------------------------------------------------------ checkpoints

    def _bookkeeping(self) -> dict[str, Any]:
        return {
            "global_version": self.global_version, "carry_steps": dict(self.carry_steps),
            "last_publish_s": dict(self.last_publish_s), "digests": list(self.digests),
            "checkpoint_sequence": self.checkpoint_sequence,
            "timings": [vars(t) for t in self.timings],
            "journal_seq": self.journal.seq if self.journal is not None else 0,
            "wall_time": time.time(),
        }

    def _journal(self, kind: str, site: str, ranges: list[list[int]], t_s: float, **details: Any) -> None:
        if self.journal is not None and ranges:
            self.journal.append(kind, site, ranges, t_s=t_s, wall=time.time(), **details)

    def _journal_resume(self, resume_from: dict[str, Any]) -> None:
        """The work journaled after the checkpoint is lost with the crash: record it in the
        ledger as re-trained (its ranges are back in the pool, lowest first, so they are the
        next to train) and say so in the journal and, once the recorder is back, the events."""
        if self.journal is None:
            return
        saved, checkpoint_t_s = resume_from["coordinator"], float(resume_from["executor"]["t_s"])
        lost = lost_since(read_journal(self.journal.path), int(saved.get("journal_seq", 0)))
        cause = f"resume:{resume_from.get('checkpoint', '')}"
        for site, epoch, start, end in lost["site_failures"]:  # recorded after the checkpoint: again
            self.ledger.record_retrained(f"site_failure:{site}", [(epoch, start, end)])
        self.ledger.record_retrained(cause, [tuple(r) for r in lost["ranges"]])
        saved_wall = saved.get("wall_time")
        note = {
            "checkpoint": resume_from.get("checkpoint", ""), "ranges": lost["ranges"], "tokens": lost["tokens"],
            "delivered_tokens": lost["delivered_tokens"], "checkpoint_t_s": checkpoint_t_s,
            "virtual_s_lost": max(0.0, (lost["last_t_s"] or checkpoint_t_s) - checkpoint_t_s),
            "wall_s_lost": None if saved_wall is None else time.time() - float(saved_wall),
        }
        self.journal.append("resume", "", [], t_s=checkpoint_t_s, wall=time.time(),
                            **{k: v for k, v in note.items() if k != "ranges"}, lost_ranges=lost["ranges"])
        self._resume_note = note

    def restore(self, state: dict[str, Any]) -> tuple[float, float]:
        t_s, next_decision_s = super().restore(state)
        if self._resume_note is not None:  # the recorder is the checkpoint's again: add the event now
            self.recorder.event(t_s, "", "retrained", **self._resume_note)
            self._resume_note = None
        if self._resume_inner_dir is not None:
            self._load_inner_optimizers(Path(self._resume_inner_dir), t_s)
            self._resume_inner_dir = None
        return t_s, next_decision_s

    def _save_inner_optimizers(self, sequence: int, t_s: float) -> Path | None:
        """Every running site saves its inner AdamW for checkpoint ``sequence`` (all ranks)."""
        folder = inner_staging_dir(self.checkpoint_dir, sequence)
        running = [site for site, group in self.groups.items() if group.running]
        commands = {site: {"kind": "save_optimizer", "path": str(folder / site)} for site in running}
        saved = self._exchange(commands, t_s, self.num_rounds)
        return folder if saved else None

    def _load_inner_optimizers(self, inner: Path, t_s: float) -> None:
        """Resume: the restarted sites take the inner AdamW saved with the checkpoint (newer
        than their Ray Train checkpoints, which are written only when a site drains)."""
        commands = {
            site: {"kind": "load_optimizer", "path": str(inner / site)}
            for site, group in self.groups.items() if group.running and (inner / site).is_dir()
        }
        results = self._exchange(commands, t_s, self.num_rounds)
        self.recorder.event(t_s, "", "inner_optimizer_restored",
                            sites=sorted(site for site, result in results.items() if result.get("loaded")))

    def _restore_bookkeeping(self, saved: dict[str, Any]) -> None:
        self.global_version = self.checkpointed_version = saved["global_version"]
        self.carry_steps = {k: float(v) for k, v in saved["carry_steps"].items()}
        self.last_publish_s = {k: float(v) for k, v in saved["last_publish_s"].items()}
        self.digests = saved["digests"]
        self.checkpoint_sequence = saved["checkpoint_sequence"]
        self.timings = [Timing(**t) for t in saved["timings"]]

    def at_safe_point(self, t_s: float, next_decision_s: float) -> None:
        """Checkpoint after every sync or hand-off, when no site holds undelivered work."""
        if self.checkpoint_dir is None or self.global_version == self.checkpointed_version:
            return
        if any(self.round_tokens.values()) or self.ledger.outstanding_tokens:
            return
        started = time.perf_counter()
        self.wait_for_checkpoint()  # at most one write in flight
        self.checkpoint_sequence += 1
        sequence = self.checkpoint_sequence
        # fetched now (zero-copy arrays from the object store), not in the writer: once this safe
        # point is passed, the checkpoint no longer depends on the averaging actor staying alive
        averager_state = ray.get(self.averager.state.remote())
        inner_dir = self._save_inner_optimizers(sequence, t_s) if self.checkpoint_inner_optimizer else None
        ledger_state, executor_state = self.ledger.to_dict(), self.snapshot(t_s, next_decision_s)
        coordinator_state = self._bookkeeping()
        # the files are written in the background: the sites go on training meanwhile
        self._checkpoint_write = self._writer.submit(
            lambda: write_checkpoint(
                self.checkpoint_dir, sequence, averager_state=averager_state,
                ledger_state=ledger_state, executor_state=executor_state, coordinator_state=coordinator_state,
                inner_dir=inner_dir,
            )
        )
        self.checkpointed_version = self.global_version
        self.timings.append(Timing(t_s, "", "checkpoint", self.num_rounds, time.perf_counter() - started))

    def wait_for_checkpoint(self) -> None:
        if self._checkpoint_write is not None:
            self._checkpoint_write.result()
            self._checkpoint_write = None

    def wall_at(self, t_s: float) -> float:
        """The wall-clock instant of run time ``t_s`` under the real-time clock."""
        return self.wall_start + (t_s - self.context.start_s) / self.realtime_speedup

    def pass_time(self, start_s: float, end_s: float) -> None:
        if self.clock == "realtime":
            time.sleep(max(0.0, self.wall_at(end_s) - time.time()))

    # ------------------------------------------------------------------ helpers

    def _timed(self, t_s: float, site: str, kind: str, round_index: int, result: dict[str, Any]) -> None:
        self.timings.append(Timing(
            t_s, site, kind, round_index, float(result.get("wall_s", 0.0)), int(result.get("steps", 0)),
            power_w=result.get("power_w"), gpus=int(result.get("gpus", 0)),
        ))

    def _fail(self, site: str, error: Exception) -> None:
        """Hand a site failure to the state machine; its undelivered round work is lost."""
        self.report_failure(site, str(error), lost_tokens=self.round_tokens[site])
        self.round_tokens[site] = 0.0

    def _exchange(self, commands: dict[str, dict[str, Any]], t_s: float, round_index: int) -> dict[str, dict[str, Any]]:
        """Send each site its command, then collect the answers; failed sites drop out."""
        sent = []
        for site, command in commands.items():
            try:
                self.groups[site].send(command)
                sent.append(site)
            except SiteFailure as error:
                self._fail(site, error)
        results = {}
        for site in sent:
            try:
                results[site] = self.groups[site].receive()
            except SiteFailure as error:
                self._fail(site, error)
                continue
            self._timed(t_s, site, commands[site]["kind"], round_index, results[site])
        return results

    def _broadcast(self, sites: list[str], command: dict[str, Any], t_s: float, round_index: int) -> dict[str, dict[str, Any]]:
        return self._exchange({site: command for site in sites}, t_s, round_index)

    def _complete_ledger(self, site: str, t_s: float) -> None:
        """The site's work has entered the global model: record its ranges as trained."""
        for token_range, trained in self.pending[site]:
            self.ledger.complete(site, token_range, trained)
        self._journal("delivered", site, [[r.epoch, r.start, r.start + n] for r, n in self.pending[site] if n],
                      t_s)
        self.pending[site] = []
        self.round_tokens[site] = 0.0

    def _load(self, sites: list[str], t_s: float, round_index: int) -> None:
        sites = [s for s in sites if self.loaded_version[s] != self.global_version]
        if not sites:
            return
        results = self._broadcast(sites, {"kind": "load"}, t_s, round_index)
        for site, result in results.items():
            self.loaded_version[site] = result["version"]
            self.site_nodes[site].update(result.get("node_ids", ()))
            self.site_pids[site] = result.get("pid")
        digests = {result["digest"] for result in results.values()}
        self.digests.append({"t_s": t_s, "round": round_index, "version": self.global_version,
                             "sites": sorted(results), "digests": sorted(digests),
                             "loaded_versions": [results[s]["version"] for s in sorted(results)]})

    def _outer_step(self, round_index: int, t_s: float) -> None:
        started = time.perf_counter()
        outcome = ray.get(self.averager.outer_step.remote(round_index))
        self.global_version = outcome["version"]
        self.timings.append(Timing(t_s, "", "outer_step", round_index, time.perf_counter() - started))

    def _submit(self, sites: list[str], round_index: int, t_s: float) -> None:
        commands = {
            site: {"kind": "submit", "round": round_index, "tokens": self.round_tokens[site]}
            for site in sites
            if self.round_tokens[site] > 0
        }
        delivered = self._exchange(commands, t_s, round_index)
        for site in delivered:
            self._complete_ledger(site, t_s)
        failed = sorted(set(commands) - set(delivered))
        if failed:  # their ranges went back to the ledger: their updates, if they arrived, must not count
            withdrawn = ray.get(self.averager.withdraw.remote(round_index, failed))
            if withdrawn:
                self.recorder.event(t_s, "", "withdrawn", round=round_index, sites=withdrawn)

    def _publish(self, site: str, t_s: float, round_index: int) -> None:
        for result in self._exchange({site: {"kind": "publish"}}, t_s, round_index).values():
            self.global_version = result["version"]
            self.loaded_version[site] = self.global_version
            self.last_publish_s[site] = t_s
            self._complete_ledger(site, t_s)

    def _evaluate(self, t_s: float) -> None:
        """Score this sync's global weights in the background (no site waits for it)."""
        if self.evaluator is not None:
            snapshot = self.averager.get_global.remote()
            self.pending_evals.append((t_s, self.tokens, self.evaluator.evaluate.remote(snapshot)))

    def collect_evaluations(self) -> None:
        for t_s, tokens, ref in self.pending_evals:
            self.recorder.loss(LossPoint(t_s, "", tokens, float(ray.get(ref)["loss"]), kind="eval"))
        self.pending_evals = []

    def _claim(self, site: str, num_steps: int) -> list[TokenRange]:
        ranges = []
        remaining = num_steps * self.tokens_per_step
        while remaining > 0:
            token_range = self.ledger.claim(site, remaining)
            ranges.append(token_range)
            remaining -= token_range.num_tokens
        return ranges

    def _record_trained(self, site: str, ranges: list[TokenRange], trained_tokens: int, t_s: float) -> None:
        """Split the trained tokens over the claimed ranges in order; the rest goes back later."""
        journaled = []
        for token_range in ranges:
            trained = min(token_range.num_tokens, trained_tokens)
            self.pending[site].append((token_range, trained))
            trained_tokens -= trained
            if trained:
                journaled.append([token_range.epoch, token_range.start, token_range.start + trained])
        self._journal("trained", site, journaled, t_s)

    # ------------------------------------------------------------------ executor hooks

    def work(self, sites: list[str], start_s: float, end_s: float) -> dict[str, float]:
        rates = {s: self.context.sites[s].tokens_per_s for s in sites}
        total_rate = sum(rates.values())
        claims: dict[str, list[TokenRange]] = {}
        commands: dict[str, dict[str, Any]] = {}
        realtime = self.clock == "realtime"
        for site in sites:
            if realtime:  # train until the wall clock reaches end_s; claim generously
                wall_s = max(0.0, self.wall_at(end_s) - time.time())
                steps = 1 + math.ceil(1.5 * wall_s / self.step_wall_s[site])
            else:  # virtual clock: the steps the represented hardware does in this stretch
                carry = self.carry_steps[site] + (end_s - start_s) / self.step_s[site]
                steps = int(carry + 1e-9)
                self.carry_steps[site] = carry - steps
            if steps == 0:
                continue
            claims[site] = self._claim(site, steps)
            command = {"kind": "train", "chunks": [(r.start, r.num_tokens // self.tokens_per_step) for r in claims[site]],
                       "tokens_before": self.tokens, "concurrency": total_rate / rates[site]}
            if realtime:
                command["until_wall"] = self.wall_at(end_s)
            commands[site] = command
        tokens = {}
        index = self.round.index if self.round is not None else 0
        self._load([s for s in commands if self.loaded_version[s] < 0], start_s, index)  # e.g. after a resume
        commands = {s: c for s, c in commands.items() if self.groups[s].running}
        for site, result in self._exchange(commands, end_s, index).items():
            self._record_trained(site, claims[site], int(result["tokens"]), end_s)
            if result["steps"]:
                self.step_wall_s[site] = result["wall_s"] / result["steps"]
            tokens[site] = float(result["tokens"])
            self.round_tokens[site] += tokens[site]
            self.last_loss = float(result["loss"])
            self.recorder.loss(LossPoint(end_s, site, self.tokens + sum(tokens.values()), self.last_loss))
        if self.round is not None and self.round.kind is RunMode.SINGLE:
            for site in self.round.members & set(tokens):  # single site: deliver periodically
                if end_s - self.last_publish_s.get(site, start_s) >= self.single_publish_interval_s:
                    self._publish(site, end_s, index)
        if self.on_progress is not None:
            self.on_progress(self, end_s, self.tokens + sum(tokens.values()))
        return tokens

    def on_nodes_ready(self, site: str, t_s: float) -> None:
        self.groups[site].start()

    def on_round_start(self, index: int, members: list[str], t_s: float) -> None:
        self._load(members, t_s, index)
        self.timings.append(Timing(t_s, "", "round_start", index, 0.0))

    def on_sync(self, index: int, members: list[str], kind: RunMode, t_s: float) -> None:
        trained = sorted(self.round.members) if self.round is not None else []
        if kind is RunMode.SINGLE:  # hand-off: the single site's weights become global
            for site in trained:
                self._publish(site, t_s, index)
        else:
            self._submit(trained, index, t_s)
            self._outer_step(index, t_s)
        self._load(members, t_s, index)
        self._evaluate(t_s)

    def on_join(self, site: str, index: int, t_s: float) -> None:
        self._load([site], t_s, index)

    def on_leave(self, site: str, index: int, kind: RunMode, t_s: float) -> None:
        if kind is RunMode.SINGLE:
            self._publish(site, t_s, index)
            return
        self._submit([site], index, t_s)
        if self.round is not None and not self.round.members:  # the last one out averages
            self._outer_step(index, t_s)

    def on_drain(self, site: str, t_s: float) -> None:
        try:
            self._timed(t_s, site, "stop", 0, self.groups[site].stop())
        except SiteFailure as error:  # it died while draining: its handed-over work is safe
            self.recorder.event(t_s, site, "stop_failed", reason=str(error)[-300:])
            self.groups[site].abandon()
        self.loaded_version[site] = -1

    def on_failure(self, site: str, t_s: float) -> None:
        lost = [(r.epoch, r.start, r.start + n) for r, n in self.pending[site] if n]  # trained, never delivered
        self.ledger.record_retrained(f"site_failure:{site}", lost)
        released = self.ledger.release(site)
        self._journal("released", site, [[r.epoch, r.start, r.end] for r in released], t_s)
        self.recorder.event(t_s, site, "ledger_release", ranges=[[r.start, r.end, r.epoch] for r in released],
                            tokens=sum(r.num_tokens for r in released),
                            retrained_tokens=sum(end - start for _, start, end in lost))
        self.pending[site] = []
        self.round_tokens[site] = 0.0
        self.carry_steps[site] = 0.0
        self.loaded_version[site] = -1
        self.groups[site].abandon()

    def on_finish(self, t_s: float, completed: bool) -> None:
        if not completed and self.deadline_is_trace_end:
            # the carbon signal ran out before the budget: the fallback is to stop here and keep
            # the global model trained so far (final, saved, evaluated); nothing is extrapolated
            self.recorder.event(t_s, "", "trace_end", tokens=round(self.tokens),
                                token_budget=self.context.token_budget,
                                missing_tokens=round(max(0.0, self.context.token_budget - self.tokens)),
                                fallback="stop")
        if self.round is not None and self.round.members:
            members = sorted(self.round.members)
            if self.round.kind is RunMode.SINGLE:
                self._publish(members[0], t_s, self.round.index)
            else:
                self._submit(members, self.round.index, t_s)
                self._outer_step(self.round.index, t_s)
        for site, group in self.groups.items():
            if group.running:
                self.on_drain(site, t_s)
        self.collect_evaluations()
        self.wait_for_checkpoint()


def prepare_data(training: TrainingConfig, cache_dir: Path) -> tuple[Any, np.ndarray, np.ndarray]:
    """Tokenizer (trained once per corpus and vocabulary, cached) and the token arrays."""
    corpus = [resolve_data_path(p) for p in training.corpus]
    heldout = [resolve_data_path(p) for p in training.heldout] if training.heldout else None
    tokenizer = train_tokenizer(corpus, training.vocab_size, cache_dir)
    train, held = load_corpus(corpus, tokenizer, cache_dir, heldout_paths=heldout, heldout_fraction=training.heldout_fraction)
    return tokenizer, np.array(train.tokens), np.array(held.tokens)


@ray.remote(num_cpus=0, max_concurrency=2)
class Coordinator:
    """The driver actor of one real run (see the module doc)."""

    def __init__(self, experiment: dict[str, Any], run_name: str, run_dir: str, resume: bool = False):
        self.config = ExperimentConfig.model_validate(experiment)
        self.run_spec = self.config.run(run_name)
        self.run_dir = Path(run_dir)
        self.resume = resume
        self._averager_pid: int | None = None
        self._progress: dict[str, Any] = {"phase": "starting"}

    def progress(self) -> dict[str, Any]:
        return dict(self._progress)

    def _report_progress(self, executor: RayExecutor, t_s: float, tokens: float) -> None:
        self._progress = {
            "phase": "training",
            "clock": iso(t_s),
            "mode": executor.recorder.mode.value,
            "active_sites": sorted(s for s, g in executor.groups.items() if g.running),
            "tokens": tokens,
            "token_budget": executor.context.token_budget,
            "loss": executor.last_loss,
            "site_pids": {s: pid for s, pid in executor.site_pids.items() if executor.groups[s].running},
            "coordinator_pid": os.getpid(),
            "averager_pid": self._averager_pid,
        }

    def run(self) -> RunArtifacts:
        config, training = self.config, self.config.training
        traces, forecasts = load_experiment_traces(config)
        plan: RunPlan = plan_run(config, self.run_spec, traces, forecasts)
        self._progress = {"phase": "preparing data"}
        cache_dir = resolve_data_path(training.cache_dir) if not training.cache_dir.is_absolute() else training.cache_dir
        tokenizer, train_tokens, heldout_tokens = prepare_data(training, cache_dir)
        vocab_size = len(tokenizer)
        spec = get_spec(training.preset)
        seq_len = training.seq_len or spec.seq_len
        tokens_per_step = training.batch_size * seq_len * training.workers_per_site
        initial = {n: p.detach().numpy().copy() for n, p in build_model(spec, vocab_size, config.seed).named_parameters()}
        averager = Averager.options(resources=HEAD_NODE).remote(
            initial, training.outer_optimizer, training.outer_lr, training.outer_momentum
        )
        self._averager_pid = ray.get(averager.pid.remote())
        mailbox = Mailbox.options(resources=HEAD_NODE).remote()
        schedule = LRSchedule.from_fractions(
            training.peak_lr, int(plan.context.token_budget), training.warmup_fraction,
            training.warmdown_fraction, training.final_lr_fraction,
        )
        loop_config = {
            "mailbox": mailbox, "averager": averager,
            "train_tokens": ray.put(train_tokens), "heldout_tokens": ray.put(heldout_tokens),
            "model_spec": spec.model_dump(), "vocab_size": vocab_size, "seed": config.seed,
            "batch_size": training.batch_size, "seq_len": seq_len,
            "schedule": schedule.model_dump(), "transfer_dtype": training.transfer_dtype,
            "torch_threads": training.torch_threads_per_worker, "use_gpu": training.gpus_per_worker > 0,
            "eval_batches": training.eval_batches, "eval_batch_size": training.eval_batch_size,
            "compile_model": training.compile_model, "micro_batch_size": training.micro_batch_size,
        }
        storage = str((self.run_dir / "ray_train").resolve())
        groups = {}
        for site in plan.context.sites:
            resources = {"CPU": training.cpus_per_worker, site_resource(site): 1}
            if training.gpus_per_worker > 0:
                resources["GPU"] = training.gpus_per_worker
            groups[site] = SiteGroup(
                site=site, mailbox=mailbox, loop_config={**loop_config, "site": site},
                scaling={"num_workers": training.workers_per_site, "use_gpu": training.gpus_per_worker > 0,
                         "resources_per_worker": resources},
                run_name=f"{self.run_spec.name}-{site}", storage_path=storage,
                head_resources=HEAD_NODE, timeout_s=training.command_timeout_s,
            )
        latest = latest_checkpoint(self.run_dir) if self.resume else None
        checkpoint = read_checkpoint(latest) if latest is not None else None
        if checkpoint is not None:
            ray.get(averager.load_state.remote(
                checkpoint.params, checkpoint.optimizer, checkpoint.averager["version"],
                checkpoint.averager["num_outer_steps"],
            ))
            ledger = DataLedger.from_dict(checkpoint.ledger)
            ledger.release_all()
        else:
            ledger = DataLedger(len(train_tokens) - 1, block_tokens=tokens_per_step)
        evaluator = Evaluator.options(resources=HEAD_NODE).remote(
            spec.model_dump(), vocab_size, config.seed, loop_config["heldout_tokens"],
            training.eval_batches, training.eval_batch_size, seq_len, training.torch_threads_per_worker,
        )
        executor = RayExecutor(
            plan.context, plan.policy, groups=groups, averager=averager, ledger=ledger,
            tokens_per_step=tokens_per_step, evaluator=evaluator, clock=training.clock,
            realtime_speedup=training.realtime_speedup, checkpoint_dir=self.run_dir,
            single_publish_interval_s=training.checkpoint_interval_s,
            checkpoint_inner_optimizer=training.checkpoint_inner_optimizer,
            on_progress=self._report_progress, deadline_is_trace_end=self.run_spec.deadline is None,
        )
        started = time.perf_counter()
        try:
            trajectory = executor.run(
                resume_from=None if checkpoint is None else {
                    "executor": checkpoint.executor, "coordinator": checkpoint.coordinator, "checkpoint": checkpoint.path.name,
                    "inner_dir": checkpoint.inner_dir,
                }
            )
        finally:
            for group in groups.values():
                if group.running:
                    try:
                        group.stop()
                    except SiteFailure:
                        pass
            if executor.journal is not None:
                executor.journal.close()
        wall_s = time.perf_counter() - started
        self._progress = {"phase": "evaluating the final global model"}
        final = averager.get_global.remote()
        final_eval_loss = ray.get(evaluator.evaluate.remote(final))["loss"]
        model_dir = Path(ray.get(evaluator.save.remote(final, str(self.run_dir / "model"), None)))
        tokenizer.save_pretrained(model_dir)
        ledger.check_invariants()
        (self.run_dir / "ledger.json").write_text(json.dumps(ledger.to_dict()))
        journal = read_journal(self.run_dir / JOURNAL)
        extra = {
            "final_eval_loss": final_eval_loss,
            "model_dir": str(model_dir),
            "preset": spec.name,
            "num_parameters": int(sum(v.size for v in initial.values())),
            "tokens_per_step": tokens_per_step,
            "virtual_step_s": executor.step_s,
            "ledger_trained_tokens": ledger.trained_tokens,
            "ledger_trained_by_site": ledger.trained_by_site,
            "ledger_epochs": ledger.epoch + 1 if ledger.trained_tokens else 0,
            "ledger_retrained_tokens": ledger.retrained_tokens,
            "ledger_retrained": [[r.cause, r.epoch, r.start, r.end] for r in ledger.retrained],
            "resumes": [{k: v for k, v in e.items() if k not in ("seq", "kind", "site", "ranges")}
                        for e in journal if e["kind"] == "resume"],
            "stop_reason": "budget_reached" if trajectory.completed
            else ("trace_end" if executor.deadline_is_trace_end else "deadline"),
            "wall_s": wall_s,
            "site_failures": sum(1 for e in trajectory.events if e.event == "failure"),
            "tokens_lost_to_failures": sum(e.details.get("lost_tokens", 0.0) for e in trajectory.events if e.event == "failure"),
            "global_version": executor.global_version,
            "weight_digests": executor.digests,
            "site_nodes": {site: sorted(nodes) for site, nodes in executor.site_nodes.items()},
            "measured_power_per_gpu_w": measured_power_per_gpu_w(executor.timings),
        }
        for actor in (mailbox, averager, evaluator):
            ray.kill(actor)
        self._progress = {"phase": "done"}
        return RunArtifacts(trajectory, extra, executor.timings)
