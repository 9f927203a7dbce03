"""The coordinator: the Ray driver actor that owns the calendar, the clock and the run.

:class:`Coordinator` builds one real run and hands it to its collaborators: it prepares the
tokenizer and the token arrays, starts the averaging actor, the command mailbox and the
held-out evaluator, makes one :class:`~curtail.runtime.sites.SiteGroup` per site, restores a
checkpoint when resuming, and lets the :class:`~curtail.runtime.ray_executor.RayExecutor`
execute the plan. At the end it evaluates and saves the final global model in the Hugging
Face format and returns what the run directory needs (:class:`RunArtifacts`).

``request_stop`` (from another thread of the actor) makes the run stop at its next safe point
with a checkpoint written there; the artifacts then say ``interrupted``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from curtail.config import ExperimentConfig, TrainingConfig
from curtail.planning.links import Links
from curtail.planning.plan import RunPlan, load_experiment_traces, plan_live_run, plan_run
from curtail.planning.signals import iso
from curtail.planning.trajectory import Trajectory
from curtail.preflight import resolve_data_path, shard_location
from curtail.run_store import BackgroundUpload, RunStore
from curtail.runtime.averager import Averager, AveragerClient, AveragerShards, shard_names
from curtail.runtime.capacity import SiteCapacity, site_bundles
from curtail.runtime.checkpoint import JOURNAL, RunCheckpoint, read_checkpoint, read_journal
from curtail.runtime.evaluator import Evaluator
from curtail.runtime.mailbox import Mailbox
from curtail.runtime.placement import SitePinning, control_plane
from curtail.runtime.protocol import (
    EvalConfig,
    ModelSetup,
    SiteLoopConfig,
    TokenArray,
    share_tokens,
)
from curtail.runtime.ray_executor import ExecutorOptions, RayExecutor
from curtail.runtime.run_checkpointer import RunCheckpointer
from curtail.runtime.sites import SiteFailure, SiteGroup
from curtail.runtime.telemetry import (
    Timing,
    measured_host_power_w,
    measured_power_per_gpu_w,
    sync_traffic,
)
from curtail.runtime.work_account import WorkAccount
from curtail.sources.live_feed import LiveSignal
from curtail.training.averaging import outer_momentum_for
from curtail.training.compression import WireFormat
from curtail.training.data import load_corpus
from curtail.training.ledger import DataLedger
from curtail.training.model import build_model, get_spec
from curtail.training.schedule import LRSchedule
from curtail.training.shards import ShardedTokens, tokenizer_folder
from curtail.training.tokenizer import load_tokenizer, train_tokenizer


def prepare_data(training: TrainingConfig, cache_dir: Path) -> tuple[Any, TokenArray, TokenArray]:
    """Tokenizer and the training and held-out tokens: a shard folder's, read lazily where they are
    used, or the corpus files' (tokenizer trained once per corpus and vocabulary, cached)."""
    if training.corpus_shards is not None:
        location = shard_location(training.corpus_shards)
        tokens = ShardedTokens.open(location)
        return load_tokenizer(tokenizer_folder(location, manifest=tokens.manifest)), tokens.train(), tokens.heldout()
    corpus = [resolve_data_path(p) for p in training.corpus]
    heldout = [resolve_data_path(p) for p in training.heldout] if training.heldout else None
    tokenizer = train_tokenizer(corpus, training.vocab_size, cache_dir)
    train, held = load_corpus(corpus, tokenizer, cache_dir, heldout_paths=heldout, heldout_fraction=training.heldout_fraction)
    return tokenizer, np.array(train.tokens), np.array(held.tokens)


def inner_steps_per_round(plan: RunPlan, tokens_per_step: int) -> float:
    """The inner steps a site trains in one federated round, the mean over the run's sites
    (``round_s`` of the represented hardware's ``tokens_per_s``)."""
    round_s = plan.context.execution.round_s
    return float(np.mean([round_s * site.tokens_per_s / tokens_per_step for site in plan.context.sites.values()]))


def resolve_outer_momentum(training: TrainingConfig, inner_steps: float) -> float | None:
    """``training.outer_momentum``, or with ``"auto"`` the rule's for rounds of ``inner_steps``;
    None for plain averaging, which has no momentum."""
    if training.outer_optimizer == "average":
        return None
    if training.outer_momentum == "auto":
        return outer_momentum_for(inner_steps)
    return training.outer_momentum


def start_averager(initial: dict[str, np.ndarray], training: TrainingConfig, broadcast: WireFormat | None,
                   outer_momentum: float | None) -> Any:
    """The averaging actor, or ``training.averager_actors`` of them, each holding an equal share
    of the parameters (:class:`~curtail.runtime.averager.AveragerShards`; with staggered
    fragments, one fragment each): beside the driver, or each on a node declaring
    ``training.averager_resource``."""
    where = {"resources": {training.averager_resource: 1}} if training.averager_resource else control_plane()

    def actor(params: dict[str, np.ndarray]) -> Any:
        return Averager.options(**where).remote(
            params, training.outer_optimizer, training.outer_lr, outer_momentum, broadcast,
            reset_momentum_at_handoff=training.outer_momentum_at_handoff == "reset")

    if training.averager_actors == 1:
        return actor(initial)
    names = shard_names({name: value.size for name, value in initial.items()}, training.averager_actors)
    return AveragerShards(tuple(actor({name: initial[name] for name in group}) for group in names), names)


@dataclass
class RunArtifacts:
    """What the coordinator hands back to the driver."""

    trajectory: Trajectory
    summary_extra: dict[str, Any]
    timings: list[Timing] = field(default_factory=list)
    interrupted: bool = False  # stopped on request at a safe point; resume from ``checkpoint``
    checkpoint: str | None = None  # the newest checkpoint's folder name when interrupted


@dataclass
class RunSetup:
    """The prepared pieces of one run: data, model shape, actors."""

    tokenizer: Any
    model: ModelSetup
    num_train_tokens: int
    tokens_per_step: int
    num_parameters: int
    averager: Any  # the Averager actor's handle, or AveragerShards (training.averager_shards > 1)
    mailbox: Any
    evaluator: Any
    train_tokens: Any  # token source (share_tokens)
    inner_steps_per_round: float  # a site's inner steps per federated round (the outer-momentum rule's H)
    outer_momentum: float | None  # the averager's: training.outer_momentum, or the rule's for those rounds

    @property
    def actors(self) -> tuple[Any, ...]:
        return self.mailbox, *AveragerClient(self.averager).handles, self.evaluator


@ray.remote(num_cpus=0, max_concurrency=2)
class Coordinator:
    """The driver actor of one real run (see the module doc)."""

    def __init__(self, experiment: dict[str, Any], run_name: str, store: RunStore, checkpoint: str | None = None):
        self.config = ExperimentConfig.model_validate(experiment)
        self.run_spec = self.config.run(run_name)
        self.store = store  # the run directory: its working copy here, and a URI the sites write to
        self.run_dir = store.local
        self.checkpoint = None if checkpoint is None else Path(checkpoint)  # chosen and verified by the driver
        self._averager_pids: list[int] = []
        self._executor: RayExecutor | None = None
        self._stop_requested = False
        self._progress: dict[str, Any] = {"phase": "starting"}

    def progress(self) -> dict[str, Any]:
        return dict(self._progress)

    def request_stop(self) -> None:
        """Stop at the next safe point, with a checkpoint written there (Ctrl-C)."""
        self._stop_requested = True
        if self._executor is not None:
            self._executor.stop_requested.set()

    def _report_progress(self, executor: RayExecutor, t_s: float, tokens: float) -> None:
        running = {s for s, g in executor.groups.items() if g.running}
        self._progress = {
            "phase": "training", "clock": iso(t_s), "mode": executor.recorder.mode.value,
            "active_sites": sorted(running), "tokens": tokens, "token_budget": executor.context.token_budget,
            "loss": executor.telemetry.last_loss,
            "site_pids": {s: pid for s, pid in executor.telemetry.site_pids.items() if s in running},
            "coordinator_pid": os.getpid(), "averager_pid": self._averager_pids[0] if self._averager_pids else None,
            "averager_pids": self._averager_pids,
        }

    def _signal_event(self, t_s: float, site: str, event: str, details: dict[str, Any]) -> None:
        if self._executor is not None:
            self._executor.recorder.event(t_s, site, event, **details)

    def _plan(self) -> tuple[RunPlan, LiveSignal | None]:
        """The run's plan: from its traces, or (``[live]``) from a live signal that grows."""
        if self.config.live is None:
            traces, forecasts = load_experiment_traces(self.config)
            return plan_run(self.config, self.run_spec, traces, forecasts), None
        live = LiveSignal(self.config, self.run_spec, self.run_dir, on_event=self._signal_event)
        plan = plan_live_run(self.config, self.run_spec, live.calendar, live.planned_start_s(), live.site_forecasts())
        return plan, live

    def run(self) -> RunArtifacts:
        training = self.config.training
        plan, live = self._plan()
        self._progress = {"phase": "preparing data"}
        setup = self._prepare(plan)
        checkpoint = read_checkpoint(self.checkpoint) if self.checkpoint is not None else None
        uploads = BackgroundUpload(self.store)  # a run on object storage: the journal goes up as it grows
        pinning = SitePinning(training.site_pinning)
        capacity = SiteCapacity(site_bundles(plan.context.sites, training.workers_per_site, training.cpus_per_worker,
                                             training.gpus_per_worker, pinning), pinning=pinning)
        executor = RayExecutor(
            plan.context, plan.policy,
            ExecutorOptions(
                tokens_per_step=setup.tokens_per_step, clock=training.clock,
                realtime_speedup=training.realtime_speedup,
                single_publish_interval_s=training.checkpoint_interval_s,
                deadline_is_trace_end=self.run_spec.deadline is None,
                report_interval_s=training.report_interval_s,
                overlap_sync=plan.context.execution.overlap_sync, landing_timeout_s=training.command_timeout_s,
                sync_fragments=training.sync_fragments,
            ),
            groups=self._site_groups(plan, setup), averager=AveragerClient(setup.averager),
            account=WorkAccount(self._ledger(setup, checkpoint), setup.tokens_per_step, list(plan.context.sites),
                                self.run_dir, on_journal=lambda: uploads.changed(JOURNAL)),
            checkpointer=RunCheckpointer(self.store, inner_optimizer=training.checkpoint_inner_optimizer),
            evaluator=setup.evaluator, on_progress=self._report_progress, capacity=capacity,
        )
        self._executor = executor
        if self._stop_requested:
            executor.stop_requested.set()
        started = time.perf_counter()
        capacity.start()
        try:
            resume_at_s = None
            if live is None:
                pass
            elif checkpoint is None:
                live.begin(plan.context.start_s)  # a served trace's clock starts with the run's
            else:  # the grid's clock moved on while the run was down: resume now, the stretch is lost
                resume_at_s = live.resume()
            trajectory = executor.run(resume_from=checkpoint, resume_at_s=resume_at_s)
        finally:
            self._stop_groups(executor.groups)
            capacity.release_all()  # an autoscaler lets the sites' nodes go after its idle timeout
            capacity.stop()
            capacity.write(self.run_dir)
            executor.account.close()
            uploads.close()
            if live is not None:
                live.close()
        wall_s = time.perf_counter() - started
        if executor.interrupted:
            self._kill(setup)
            return RunArtifacts(trajectory, {"wall_s": wall_s}, executor.telemetry.timings, interrupted=True,
                                checkpoint=executor.checkpointer.last_written if executor.checkpointer else None)
        extra = self._finish(setup, executor, trajectory, wall_s)
        self._kill(setup)
        self._progress = {"phase": "done"}
        return RunArtifacts(trajectory, extra, executor.telemetry.timings)

    # ------------------------------------------------------------------ building the run

    def _prepare(self, plan: RunPlan) -> RunSetup:
        """Tokenizer, token arrays, the initial model, and the run's actors."""
        config, training = self.config, self.config.training
        cache_dir = resolve_data_path(training.cache_dir)
        tokenizer, train_tokens, heldout_tokens = prepare_data(training, cache_dir)
        spec = get_spec(training.preset)
        model = ModelSetup(spec, len(tokenizer), config.seed, training.seq_len or spec.seq_len,
                           training.torch_threads_per_worker)
        initial = {n: p.detach().numpy().copy() for n, p in build_model(spec, model.vocab_size, config.seed).named_parameters()}
        broadcast = (None if training.broadcast_dtype == "fp32"
                     else WireFormat(training.broadcast_dtype, block_size=training.transfer_block_size))  # type: ignore[arg-type]
        tokens_per_step = training.batch_size * model.seq_len * training.workers_per_site
        inner_steps = inner_steps_per_round(plan, tokens_per_step)
        outer_momentum = resolve_outer_momentum(training, inner_steps)
        averager = start_averager(initial, training, broadcast, outer_momentum)
        self._averager_pids = AveragerClient(averager).pids()
        evaluator = Evaluator.options(**control_plane(), num_gpus=training.eval_gpus).remote(
            EvalConfig(model, share_tokens(heldout_tokens), training.eval_batches, training.eval_batch_size,
                       device="cuda" if training.eval_gpus > 0 else "cpu")
        )
        return RunSetup(
            tokenizer=tokenizer, model=model, num_train_tokens=len(train_tokens),
            tokens_per_step=tokens_per_step,
            num_parameters=int(sum(v.size for v in initial.values())), averager=averager,
            mailbox=Mailbox.options(**control_plane()).remote(), evaluator=evaluator,
            train_tokens=share_tokens(train_tokens),
            inner_steps_per_round=inner_steps, outer_momentum=outer_momentum,
        )

    def _site_groups(self, plan: RunPlan, setup: RunSetup) -> dict[str, SiteGroup]:
        """One persistent worker group per site, pinned to the site's nodes (``training.site_pinning``)."""
        training = self.config.training
        schedule = LRSchedule.from_fractions(
            training.peak_lr, int(plan.context.token_budget), training.warmup_fraction,
            training.warmdown_fraction, training.final_lr_fraction,
        )
        use_gpu = training.gpus_per_worker > 0
        storage = self.store.location(self.run_dir / "ray_train")
        pinning = SitePinning(training.site_pinning)
        links = Links(plan.context.execution, plan.context.sites)
        groups = {}
        for site in plan.context.sites:
            loop_config = SiteLoopConfig(
                site=site, model=setup.model, mailbox=setup.mailbox, averager=setup.averager,
                train_tokens=setup.train_tokens, batch_size=training.batch_size, schedule=schedule,
                wire=WireFormat(training.transfer_dtype, training.transfer_topk_fraction,  # type: ignore[arg-type]
                                training.transfer_block_size, training.error_feedback, training.transfer_topk_chunk,
                                training.error_feedback_decay), use_gpu=use_gpu, compile_model=training.compile_model,
                micro_batch_size=training.micro_batch_size,
                emulated_link=links.by_site[site] if training.emulate_link else None,
                staggered=training.sync_fragments > 1,
                parallelism=training.parallelism, activation_checkpointing=training.activation_checkpointing,
                fp8_linear=training.fp8_linear, fp8_recipe=training.fp8_recipe,
                host_power=training.host_power == "codecarbon",
            )
            groups[site] = SiteGroup(
                site=site, mailbox=setup.mailbox, loop_config=loop_config,
                scaling=pinning.scaling(site, training.workers_per_site, training.cpus_per_worker,
                                        training.gpus_per_worker),
                run_name=f"{self.run_spec.name}-{site}", storage_path=storage,
                placement=control_plane(), timeout_s=training.command_timeout_s,
                capacity_timeout_s=training.capacity_timeout_s,
            )
        return groups

    def _ledger(self, setup: RunSetup, checkpoint: RunCheckpoint | None) -> DataLedger:
        """A fresh ledger, or the checkpoint's with every claim back in the pool."""
        if checkpoint is None:
            return DataLedger(setup.num_train_tokens - 1, block_tokens=setup.tokens_per_step)
        AveragerClient(setup.averager).load_checkpoint(checkpoint, self.store.location)
        ledger = DataLedger.from_dict(checkpoint.ledger)
        ledger.release_all()
        return ledger

    # ------------------------------------------------------------------ ending the run

    @staticmethod
    def _stop_groups(groups: dict[str, SiteGroup]) -> None:
        for group in groups.values():
            if group.running:
                try:
                    group.stop()
                except SiteFailure:
                    pass

    @staticmethod
    def _kill(setup: RunSetup) -> None:
        for actor in setup.actors:
            ray.kill(actor)

    def _finish(self, setup: RunSetup, executor: RayExecutor, trajectory: Trajectory, wall_s: float) -> dict[str, Any]:
        """Evaluate and save the final global model; the summary's runtime figures."""
        self._progress = {"phase": "evaluating the final global model"}
        final = AveragerClient(setup.averager).global_snapshot()
        final_eval_loss = ray.get(setup.evaluator.evaluate.remote(final))["loss"]
        model_dir = Path(ray.get(setup.evaluator.save.remote(final, str(self.run_dir / "model"), None)))
        setup.tokenizer.save_pretrained(model_dir)
        ledger = executor.account.ledger
        ledger.check_invariants()
        (self.run_dir / "ledger.json").write_text(json.dumps(ledger.to_dict()))
        journal = read_journal(self.run_dir / JOURNAL)
        failures = [e for e in trajectory.events if e.event == "failure"]
        return {
            "final_eval_loss": final_eval_loss,
            "model_dir": str(model_dir),
            "preset": setup.model.spec.name,
            "num_parameters": setup.num_parameters,
            "tokens_per_step": setup.tokens_per_step,
            "virtual_step_s": executor.clock.step_s,
            "inner_steps_per_round": setup.inner_steps_per_round,
            "outer_momentum": setup.outer_momentum,
            "ledger_trained_tokens": ledger.trained_tokens,
            "ledger_trained_by_site": ledger.trained_by_site,
            "ledger_epochs": ledger.epoch + 1 if ledger.trained_tokens else 0,
            "ledger_retrained_tokens": ledger.retrained_tokens,
            "ledger_retrained": [[r.cause, r.epoch, r.start, r.end] for r in ledger.retrained],
            "resumes": [{k: v for k, v in e.items() if k not in ("seq", "kind", "site", "ranges")}
                        for e in journal if e["kind"] == "resume"],
            "stop_reason": "budget_reached" if trajectory.completed
            else ("trace_end" if executor.options.deadline_is_trace_end else "deadline"),
            "wall_s": wall_s,
            "site_failures": len(failures),
            "tokens_lost_to_failures": sum(e.details.get("lost_tokens", 0.0) for e in failures),
            "global_version": executor.global_version,
            "weight_digests": executor.telemetry.digests,
            "ray_train_metrics": executor.ray_train_metrics,
            "site_capacity": executor.capacity.summary() if executor.capacity is not None else {},
            "site_nodes": {site: sorted(nodes) for site, nodes in executor.telemetry.site_nodes.items()},
            "measured_power_per_gpu_w": measured_power_per_gpu_w(executor.telemetry.timings),
            "measured_host_power_w": measured_host_power_w(executor.telemetry.timings),
            "sync_traffic": sync_traffic(executor.telemetry.timings),
            "link": {"emulated": self.config.training.emulate_link, "overlap_sync": self.config.execution.overlap_sync,
                     "sync_fragments": self.config.training.sync_fragments,
                     "sites": {site: vars(link) for site, link in executor.links.by_site.items()}},
            "transfer": {"dtype": self.config.training.transfer_dtype,
                         "topk_fraction": self.config.training.transfer_topk_fraction,
                         "block_size": self.config.training.transfer_block_size,
                         "broadcast_dtype": self.config.training.broadcast_dtype,
                         "error_feedback": self.config.training.error_feedback,
                         "topk_chunk": self.config.training.transfer_topk_chunk,
                         "error_feedback_decay": self.config.training.error_feedback_decay},
            "averager_shards": [list(names) for names in setup.averager.names]
            if isinstance(setup.averager, AveragerShards) else None,
            "averager_nodes": AveragerClient(setup.averager).node_ids(),
        }
