"""Per-site Ray Train worker groups that persist across rounds.

While a site's window is open, one ``TorchTrainer`` run trains there: its workers ask for the
site's resource (``site_<name>``), so on a real cluster they land only on that site's nodes and
on one machine on the local node that declares the resource. The train function
(:func:`site_worker_loop`) builds a :class:`SiteWorker` once (model, inner optimizer, data) and
then executes the coordinator's commands (:mod:`curtail.runtime.protocol`: train N steps, load
the global weights, submit a pseudo-gradient, publish, save or load the inner optimizer, stop)
until the site drains. No respawn, reload or recompile per round.

Inside a site the ranks are plain data parallel (gloo on CPU, NCCL on GPU): rank 0 talks to the
coordinator (through the :class:`~curtail.runtime.mailbox.Mailbox`) and to the averaging actor,
then broadcasts commands and weights to the other ranks. The coordinator holds one
:class:`SiteGroup` per site: it starts the group, sends commands, checks each reply against the
command's reply type, and turns a dead or silent group into a :class:`SiteFailure`.

At drain the inner optimizer state is saved as a Ray Train checkpoint; the next window of the
same site re-runs ``fit()`` under the same run name, so ``ray.train.get_checkpoint()`` hands it
back (Ray Train V2's auto-resume).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from curtail.run_store import is_uri, join, open_location, read_bytes, write_bytes
from curtail.runtime.protocol import (
    Command,
    CommandFailed,
    Flush,
    Flushed,
    Load,
    Loaded,
    LoadOptimizer,
    Merge,
    OptimizerLoaded,
    OptimizerSaved,
    Publish,
    Published,
    Reply,
    SaveOptimizer,
    SiteLoopConfig,
    Stop,
    Stopped,
    Submit,
    Submitted,
    Train,
    Trained,
    open_tokens,
)
from curtail.runtime.streaming import RoundInFlight, SyncInFlight, fragments_of

if TYPE_CHECKING:  # the worker side imports torch lazily: the coordinator side needs none of it
    import torch

    from curtail.runtime.averager import AveragerClient
    from curtail.training.data import TokenCorpus
    from curtail.training.host_power import HostPowerMeter
    from curtail.training.loop import SiteTrainer
    from curtail.training.power import PowerSampler

COMMAND_POLL_S = 5.0


class SiteFailure(RuntimeError):
    """A site's worker group died or stopped answering; the coordinator handles it as an event."""

    def __init__(self, site: str, reason: str):
        self.site = site
        super().__init__(f"site {site!r}: {reason}")


# --------------------------------------------------------------------------------------------
# Worker side (runs inside Ray Train workers)


def _broadcast_object(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _broadcast_params(trainer: SiteTrainer, world: int) -> None:
    if world == 1:
        return
    import torch.distributed as dist

    for param in trainer.model.parameters():
        dist.broadcast(param.data, src=0)


def _gather_object(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective: all ranks call it)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _summed_over_ranks(watts: tuple[float, ...] | None, world: int) -> tuple[float, ...] | None:
    """The site's measured watts: each rank's summed over the ranks, or None unless all measured."""
    readings = _gather_object(watts, world)
    return None if any(r is None for r in readings) else tuple(float(sum(column)) for column in zip(*readings))


def _load_optimizer_file(trainer: SiteTrainer, state_file: Path) -> bool:
    """Load the inner optimizer from ``state_file`` if it exists; whether it did."""
    return _load_optimizer_bytes(trainer, state_file.read_bytes() if state_file.is_file() else None)


def _load_optimizer_bytes(trainer: SiteTrainer, state: bytes | None) -> bool:
    """Load the inner optimizer from a saved state (None: there was none); whether it did."""
    import torch

    if state is None:
        return False
    trainer.load_optimizer_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    return True


class MailboxChannel:
    """Rank 0's end of its site's mailbox: commands in, replies out."""

    def __init__(self, mailbox: Any, site: str) -> None:
        self._mailbox = mailbox
        self._site = site

    def next_command(self) -> Command:
        """The coordinator's next command (waits; polls so a dead mailbox surfaces as an error)."""
        command = None
        while command is None:
            command = ray.get(self._mailbox.get.remote(self._site, "command", COMMAND_POLL_S))
        return command

    def reply(self, reply: Reply) -> None:
        ray.get(self._mailbox.put.remote(self._site, "result", reply))


def report_to_ray_train(metrics: dict[str, Any], folder: str) -> None:
    """Report ``metrics`` with ``folder`` as this rank's part of the run's Ray Train checkpoint."""
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def report_metrics_to_ray_train(metrics: dict[str, Any]) -> None:
    """Report a site's progress to Ray Train (its run's metrics: the dashboard's Train view, the
    ``Result``); every rank calls it, Ray keeps rank 0's."""
    import ray.train

    ray.train.report(metrics)


class SiteWorker:
    """One rank of a site's worker group: the trainer and the round's state, one method per command.

    Every rank executes every command, so the collectives inside line up; only rank 0 talks to
    the averager, and only rank 0's replies are sent. ``report_checkpoint(metrics, folder)``
    saves the drain checkpoint (Ray Train's ``report`` in a real run).

    Example (one process, no Ray)::

        worker = SiteWorker(config, site_trainer(config, torch.device("cpu")), corpus, averager)
        worker.execute(Load())
        worker.execute(Train(chunks=((0, 10),), tokens_before=0.0, concurrency=1.0))
    """

    def __init__(
        self,
        config: SiteLoopConfig,
        trainer: SiteTrainer,
        train: TokenCorpus,
        averager: AveragerClient,
        *,
        rank: int = 0,
        world: int = 1,
        node_id: str = "",
        power: PowerSampler | None = None,
        host_power: HostPowerMeter | None = None,
        report_checkpoint: Callable[[dict[str, Any], str], None] = report_to_ray_train,
        report_metrics: Callable[[dict[str, Any]], None] = report_metrics_to_ray_train,
        startup_s: dict[str, float] | None = None,
    ) -> None:
        self.config = config
        self.startup_s = dict(startup_s or {})  # the group's start-up phases, sent with its first load
        self.trainer = trainer
        self.train_corpus = train
        self.averager = averager
        self.rank, self.world = rank, world
        self.node_id = node_id
        self.power = power  # NVML sampler of this rank's GPU; None on CPUs or without NVML
        self.host_power = host_power  # CodeCarbon meter of this process's CPU and memory ([training] host_power)
        self.report_checkpoint = report_checkpoint
        self.report_metrics = report_metrics
        self.metrics: dict[str, Any] = {}  # the site's progress as last reported
        self.reference: dict[str, np.ndarray] | None = None  # the global weights the round started from
        self.held_version = -1  # the global version ``reference`` is (a compressed broadcast builds on it)
        self.steps_done = 0  # optimizer steps over the window
        # FSDP: every rank exchanges its own rows with the averager; else rank 0 does, and broadcasts
        self.sharded = config.parallelism == "fsdp"
        self.talks = self.sharded or rank == 0
        self.part = (rank, world) if self.sharded else (0, 1)
        self.fragments = fragments_of(averager, config.staggered)  # what an overlapped sync sends, and when
        self.round: RoundInFlight | None = None  # an overlapped sync not merged yet (streaming.py)
        self.steps_since_sync = 0  # local steps since the last load or submit (spaces the fragments' sends)
        self.pack_s = 0.0  # seconds the current command spent packing fragments
        self.merged: Merge | None = None  # merged during the current command (its reply says so)
        self.rank_tokens = config.batch_size * config.model.seq_len
        self.tokens_per_step = self.rank_tokens * world
        self.handlers: dict[type[Command], Callable[[Any], Reply]] = {
            Train: self.train,
            Load: self.load,
            Submit: self.submit,
            Publish: self.publish,
            SaveOptimizer: self.save_optimizer,
            LoadOptimizer: self.load_optimizer,
            Stop: self.stop,
            Flush: self.flush,
        }
        self._started = time.perf_counter()

    def serve(self, channel: MailboxChannel) -> int:
        """Execute commands until :class:`Stop`; returns the window's optimizer steps.

        A failing command is answered with :class:`CommandFailed` (its traceback) and then
        raised, so ``fit()`` fails too.
        """
        while True:
            command = _broadcast_object(channel.next_command() if self.rank == 0 else None, self.world)
            try:
                reply = self.execute(command)
            except Exception:
                kind = getattr(command, "kind", type(command).__name__)
                self._send(channel, CommandFailed(wall_s=self._elapsed_s(), command=kind, error=traceback.format_exc()))
                raise
            self._send(channel, reply)
            if isinstance(command, Stop):
                return self.steps_done

    def execute(self, command: Command) -> Reply:
        """Run one command on this rank through the handler table; its reply."""
        self._started = time.perf_counter()
        handler = self.handlers.get(type(command))
        if handler is None:
            raise ValueError(f"unknown site command {command!r}")
        self.merged = None
        if not isinstance(command, (Train, SaveOptimizer, Flush)):  # a sync in flight lands before all but these
            self._merge(wait=True)
        reply = handler(command)
        return dataclasses.replace(reply, merged=self.merged) if self.merged is not None else reply

    def train(self, command: Train) -> Trained:
        """Train the chunks in order (until ``until_wall``, if set), with the run's LR schedule."""
        import torch

        losses = []
        steps = 0
        self.pack_s = 0.0
        if self.power is not None:
            self.power.start()
        if self.host_power is not None:
            self.host_power.start()
        for start_token, num_steps in command.chunks:
            for step in range(num_steps):
                if command.until_wall is not None and not _broadcast_object(time.time() < command.until_wall, self.world):
                    break
                self._merge(wait=False)
                # the schedule runs on the whole run's tokens: all active sites train meanwhile
                progress = command.tokens_before + steps * self.tokens_per_step * command.concurrency
                losses.append(self._step(start_token + step * self.tokens_per_step, progress))
                steps += 1
                self.steps_since_sync += 1
                if self.round is not None:
                    self.round.steps += 1
                    self._send_due()
        self.steps_done += steps
        mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        power_w = None
        if self.config.use_gpu:  # a collective only where there is something to measure (same on every rank)
            reading = self.power.stop() if self.power is not None else None
            # the board's energy counter over the command (exact) rather than the mean of ~1-s-averaged samples
            gpu_w = _summed_over_ranks(None if reading is None else (reading.energy_j / max(reading.duration_s, 1e-9),),
                                       self.world)
            power_w = gpu_w[0] if gpu_w is not None else None
        host_power_w = None
        if self.config.host_power:  # (the same on every rank: a collective)
            host = self.host_power.stop() if self.host_power is not None else None
            host_power_w = _summed_over_ranks(None if host is None else (host.cpu_power_w, host.ram_power_w),
                                              self.world)
        if command.report:  # every rank reports (Ray Train's report is a barrier); the controller keeps rank 0's
            run_tokens = command.tokens_before + steps * self.tokens_per_step * command.concurrency
            self.metrics = {
                "site": self.config.site, "window_steps": self.steps_done,
                "window_tokens": self.steps_done * self.tokens_per_step, "run_tokens": run_tokens,
                "loss": mean_loss, "lr": self.config.schedule.lr_at(run_tokens),
                **({"power_w": power_w} if power_w is not None else {}),
                **({"cpu_power_w": host_power_w[0], "ram_power_w": host_power_w[1]} if host_power_w else {}),
            }
            self.report_metrics(self.metrics)
        return Trained(wall_s=self._elapsed_s(), steps=steps, tokens=steps * self.tokens_per_step, loss=mean_loss,
                       power_w=power_w, gpus=self.world, host_power_w=host_power_w, pack_s=self.pack_s)

    def load(self, command: Load) -> Loaded:
        """Take the averager's newest global weights on rank 0 and broadcast them."""
        version, num_bytes = -1, 0
        if self.talks:
            from curtail.runtime.averager import download_view

            version, state, num_bytes = download_view(self.averager, self.held_version, self.reference)
            self._emulate_transfer(num_bytes)
            self.trainer.load_global(state)  # (FSDP: this rank's rows)
            self.reference, self.held_version = state, version
        self.steps_since_sync = 0
        if not self.sharded:
            _broadcast_params(self.trainer, self.world)
        digest = self.trainer.weights_fingerprint() if self.talks else ""  # (FSDP: a collective)
        node_ids = tuple(sorted(set(_gather_object(self.node_id, self.world))))
        startup, self.startup_s = tuple(self.startup_s.items()), {}
        return Loaded(wall_s=self._elapsed_s(), version=version, digest=digest, node_ids=node_ids, pid=os.getpid(),
                      num_bytes=num_bytes, startup_s=startup)

    def submit(self, command: Submit) -> Submitted:
        """Send the round's pseudo-gradient (reference − local weights) with its token weight;
        with ``overlap``, hand it (its first fragment, when staggered) to a transfer thread and
        return (:mod:`curtail.runtime.streaming`)."""
        if self.talks and self.reference is None:
            raise RuntimeError("submit before load: the site has no global reference weights")
        if command.overlap:
            interval = self.steps_since_sync // len(self.fragments)
            self.round = RoundInFlight(command.round_index, command.tokens, len(self.fragments), interval)
            self.steps_since_sync = 0
            self._send_due()
            return Submitted(wall_s=self._elapsed_s(), num_bytes=0)  # the bytes are counted at the merge
        num_bytes = 0
        if self.talks:
            # On the device against the kept start of the round; only the packed result crosses to the host.
            packed = self.trainer.compressed_pseudo_gradient(self.reference, self.config.wire)
            num_bytes = packed.num_bytes
            self.averager.submit(self.config.site, command.round_index, packed, command.tokens, part=self.part)
            self._emulate_transfer(num_bytes)
        self.steps_since_sync = 0
        return Submitted(wall_s=self._elapsed_s(), num_bytes=num_bytes)

    def flush(self, command: Flush) -> Flushed:
        """Send the fragments of the round in flight that are not due yet (the coordinator waits for its landing)."""
        self._send_rest()
        return Flushed(wall_s=self._elapsed_s())

    def _send_rest(self) -> None:
        """Every fragment of the round in flight not sent yet goes now."""
        if self.round is not None:
            self.round.flush()
            self._send_due()

    def _send_due(self) -> None:
        """Pack the round's due fragments (rank 0) and hand each to a transfer thread; the
        coding, upload, outer step and download run beside training."""
        round_ = self.round
        assert round_ is not None
        while round_.due():
            fragment = self.fragments[round_.num_sent]
            started = time.perf_counter()
            if self.talks:
                assert self.reference is not None
                # the transfer thread entropy-codes it (and reports the bytes at the merge)
                packed = self.trainer.compressed_pseudo_gradient(self.reference, self.config.wire, frame=False,
                                                                 names=fragment.names)
                self.trainer.hold_sent(fragment.names)
                reference = self.reference if fragment.names is None else {n: self.reference[n] for n in fragment.names}
                round_.flights[fragment.index] = SyncInFlight(
                    fragment.averager, self.config.site, round_.round_index, packed, round_.tokens, reference,
                    self.held_version, self.config.emulated_link, self.trainer.stage_global, self.part,
                )
            round_.num_sent += 1
            self.pack_s += time.perf_counter() - started

    def _merge(self, *, wait: bool) -> None:
        """Apply the overlapped sync in flight where it arrived (``wait``: send what is left and
        wait for all of it) and note it in :attr:`merged` for the command's reply. A collective:
        every rank calls it at the same point."""
        round_ = self.round
        if round_ is None:
            return
        if wait:
            self._send_rest()
            arrived = round_.unmerged()
        elif self.sharded:  # merged where every rank's rows arrived
            mine = [index for index, flight in round_.flights.items() if flight.arrived()]
            arrived = sorted(set.intersection(*(set(ranks) for ranks in _gather_object(mine, self.world))))
        else:
            arrived = _broadcast_object(
                [index for index, flight in round_.flights.items() if flight.arrived()] if self.rank == 0 else None,
                self.world)
        if not arrived:
            return
        started = time.perf_counter()
        num_bytes = sent_bytes = 0
        for index in arrived:
            if self.talks:
                arrival = round_.flights.pop(index).wait()
                assert self.reference is not None
                self.reference = {**self.reference, **arrival.state}
                self.trainer.merge_global(arrival.staged, self.reference)
                round_.version = arrival.version
                num_bytes, sent_bytes = num_bytes + arrival.num_bytes, sent_bytes + arrival.sent_bytes
            round_.merged.add(index)
        if not self.sharded:
            _broadcast_params(self.trainer, self.world)
        if round_.landed:
            self.held_version, self.round = round_.version, None
        merge = Merge(version=round_.version, num_bytes=num_bytes, sent_bytes=sent_bytes,
                      wall_s=time.perf_counter() - started)
        self.merged = merge if self.merged is None else Merge(
            version=max(self.merged.version, merge.version), num_bytes=self.merged.num_bytes + num_bytes,
            sent_bytes=self.merged.sent_bytes + sent_bytes, wall_s=self.merged.wall_s + merge.wall_s)

    def publish(self, command: Publish) -> Published:
        """Single-site hand-off: rank 0's weights become the global weights (and the new reference);
        under FSDP every rank sends its rows, and the joined weights become the reference."""
        version, num_bytes = -1, 0
        if self.sharded:
            rows = self.trainer.export_rows()
            self.averager.publish(self.config.site, rows, part=self.part)
            _gather_object(None, self.world)  # every rank's rows are in
            self.held_version, self.reference = self.averager.get_global()
            version, num_bytes = self.held_version, sum(array.nbytes for array in rows.values())
            self._emulate_transfer(num_bytes)
        elif self.rank == 0:
            params = self.trainer.export_params()
            version = self.averager.publish(self.config.site, params)
            self.reference, self.held_version = params, version
            num_bytes = sum(array.nbytes for array in params.values())
            self._emulate_transfer(num_bytes)
        return Published(wall_s=self._elapsed_s(), version=version, num_bytes=num_bytes)

    def _emulate_transfer(self, num_bytes: int) -> None:
        """With an emulated link, hold rank 0 for the transfer's time on it (latency + bytes /
        bandwidth) after the bytes went through the object store; the other ranks wait for it at
        the next collective, as they would for a real transfer."""
        from curtail.runtime.streaming import hold_for_link

        hold_for_link(self.config.emulated_link, num_bytes)

    def save_optimizer(self, command: SaveOptimizer) -> OptimizerSaved:
        """With a run checkpoint: this rank's inner AdamW into ``path/rank<r>.pt`` (atomically)."""
        import torch

        buffer = io.BytesIO()
        torch.save(self.trainer.optimizer_state_dict(), buffer)
        write_bytes(join(command.path, f"rank{self.rank}.pt"), buffer.getvalue())  # a path or a URI
        _gather_object(True, self.world)  # every rank has written before the reply
        return OptimizerSaved(wall_s=self._elapsed_s())

    def load_optimizer(self, command: LoadOptimizer) -> OptimizerLoaded:
        """Resume: this rank's inner AdamW from ``path/rank<r>.pt``; loaded only if every rank found its file."""
        found = _load_optimizer_bytes(self.trainer, read_bytes(join(command.path, f"rank{self.rank}.pt")))
        loaded = all(_gather_object(found, self.world))
        return OptimizerLoaded(wall_s=self._elapsed_s(), loaded=loaded)

    def stop(self, command: Stop) -> Stopped:
        """Drain: report the inner optimizer as the window's checkpoint (the next window resumes it)."""
        import torch

        with tempfile.TemporaryDirectory() as folder:
            torch.save(self.trainer.optimizer_state_dict(), Path(folder) / f"inner_optimizer_rank{self.rank}.pt")
            self.report_checkpoint({**self.metrics, "steps": self.steps_done}, folder)
        return Stopped(wall_s=self._elapsed_s(), steps=self.steps_done)

    def _step(self, position: int, progress: float) -> torch.Tensor:
        """One optimizer step on this rank's rows of the batch at ``position`` (``progress``: run tokens)."""
        input_ids, labels = self.train_corpus.batch(
            position + self.rank * self.rank_tokens, self.config.batch_size, self.config.model.seq_len
        )
        # sync=False: no host wait per step; the mean in train() waits once.
        return self.trainer.train_step(input_ids, labels, self.config.schedule.lr_at(progress), sync=False)

    def _send(self, channel: MailboxChannel, reply: Reply) -> None:
        if self.rank == 0:
            channel.reply(reply)

    def _elapsed_s(self) -> float:
        """Wall seconds since the current command started."""
        return time.perf_counter() - self._started


def site_trainer(config: SiteLoopConfig, device: torch.device) -> SiteTrainer:
    """The site's model and inner optimizer, as every rank builds it."""
    import torch

    from curtail.training.loop import SiteTrainer

    return SiteTrainer(
        config.model.spec,
        config.model.vocab_size,
        config.model.seed,
        device=device,
        autocast_dtype=torch.bfloat16 if config.use_gpu else None,
        compile_model=config.compile_model,
        micro_batch_size=config.micro_batch_size,
        parallelism=config.parallelism,
        activation_checkpointing=config.activation_checkpointing,
        fp8_linear=config.fp8_linear,
        fp8_recipe=config.fp8_recipe,
    )


def _ray_train_worker(config: SiteLoopConfig, launched_at_s: float) -> SiteWorker:
    """This Ray Train rank's worker, with the inner optimizer of the site's last window if any;
    ``launched_at_s`` (wall clock) is when the coordinator started the group."""
    import ray.train
    import torch

    from curtail.runtime.averager import AveragerClient
    from curtail.training.data import TokenCorpus
    from curtail.training.host_power import HostPowerMeter
    from curtail.training.power import PowerSampler

    phases = {"ray_train": time.time() - launched_at_s}  # (its imports included: they run in this process)
    started = time.perf_counter()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.model.torch_threads)
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    train = TokenCorpus(open_tokens(config.train_tokens), "train")
    phases["corpus"], started = time.perf_counter() - started, time.perf_counter()
    trainer = site_trainer(config, device)
    # Measured GPU power (NVML) for the train replies; None on CPUs or without nvidia-ml-py.
    power = PowerSampler.create(device.index) if config.use_gpu else None
    host_power = HostPowerMeter.create() if config.host_power else None
    phases["model"], started = time.perf_counter() - started, time.perf_counter()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a later window of this site: keep the inner optimizer's moments
        with checkpoint.as_directory() as folder:
            _load_optimizer_file(trainer, Path(folder) / f"inner_optimizer_rank{rank}.pt")
    phases["optimizer"] = time.perf_counter() - started
    node_id = str(ray.get_runtime_context().get_node_id())  # where the site trained, shown in the run
    return SiteWorker(config, trainer, train, AveragerClient(config.averager), rank=rank, world=world,
                      node_id=node_id, power=power, host_power=host_power, startup_s=phases)


def site_worker_loop(config: SiteLoopConfig, launched_at_s: float) -> dict[str, Any]:
    """The Ray Train function of one site: build the worker, serve commands until Stop."""
    worker = _ray_train_worker(config, launched_at_s)
    try:
        steps = worker.serve(MailboxChannel(config.mailbox, config.site))
    finally:
        if worker.host_power is not None:
            worker.host_power.close()
    return {"site": config.site, "steps": steps}


def _site_train_function(train_loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry point. Its config must be a dict: with ``RAY_TRAIN_ENABLE_STATE_TRACKING=1``
    (the dashboard's Train view) Ray validates ``train_loop_config`` as one and fails the run."""
    return site_worker_loop(train_loop_config["site_config"], train_loop_config["launched_at_s"])


# --------------------------------------------------------------------------------------------
# Coordinator side


START_ATTEMPTS = 4  # Ray Train's tries to start a worker group: the first and controller_failure_limit = 3 more


@ray.remote(num_cpus=0)
def _fit_site(loop_config: SiteLoopConfig, scaling: dict[str, Any], run_name: str, storage_path: str,
              launched_at_s: float) -> dict[str, Any]:
    """Run one window of a site: ``TorchTrainer.fit()`` until the site is told to stop."""
    import ray.train
    from ray.train.torch import TorchTrainer

    filesystem = None
    if is_uri(storage_path):  # the run directory is on object storage: Ray Train writes there too
        filesystem, storage_path = open_location(storage_path)
    trainer = TorchTrainer(
        _site_train_function,
        train_loop_config={"site_config": loop_config, "launched_at_s": launched_at_s},
        scaling_config=ray.train.ScalingConfig(**scaling),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=START_ATTEMPTS - 1),
        ),
    )
    result = trainer.fit()
    return {**(result.return_value or {}), "ray_train_metrics": dict(result.metrics or {})}


@dataclass
class SiteGroup:
    """The coordinator's handle on one site's worker group.

    Example::

        group.start()
        loaded = group.call(Load())          # a Loaded, or SiteFailure
        group.send(Train(chunks=((0, 10),), tokens_before=0.0, concurrency=1.0))
        trained = group.receive()            # a Trained
        group.stop()
    """

    site: str
    mailbox: Any
    loop_config: SiteLoopConfig
    scaling: dict[str, Any]
    run_name: str
    storage_path: str
    placement: dict[str, Any]  # Ray options for the fit() driver: the control plane's node
    timeout_s: float
    capacity_timeout_s: float  # the first answer after a start may take this much longer: nodes, start-up
    fit_ref: Any = None
    # commands sent and not yet answered, oldest first: each reply is checked against its command
    awaiting: collections.deque[Command] = field(default_factory=collections.deque, repr=False)
    ray_train_metrics: dict[str, Any] | None = None  # what Ray Train's Result held at the last drain
    starting: bool = False  # started, and no reply yet: the first may take capacity_timeout_s longer

    @property
    def running(self) -> bool:
        return self.fit_ref is not None

    def alive(self) -> bool:
        """Running, and its ``fit()`` has not ended (died) — without sending it anything."""
        return self.fit_ref is not None and not ray.wait([self.fit_ref], timeout=0)[0]

    def start(self) -> None:
        if self.fit_ref is not None:
            return
        ray.get(self.mailbox.clear.remote(self.site))
        self.awaiting.clear()
        # Ray Train's controller gives up a start attempt after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
        # (read in its own process: the task's runtime env carries it down)
        attempt_s = str(self.capacity_timeout_s / START_ATTEMPTS)
        self.starting = True
        self.fit_ref = _fit_site.options(
            **self.placement, runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": attempt_s}},
        ).remote(
            self.loop_config, self.scaling, self.run_name, self.storage_path, time.time()
        )

    def send(self, command: Command) -> None:
        if self.fit_ref is None:
            raise SiteFailure(self.site, f"no worker group to send {command.kind!r} to")
        ray.get(self.mailbox.put.remote(self.site, "command", command))
        self.awaiting.append(command)

    def receive(self) -> Reply:
        """The answer to the oldest command sent; :class:`SiteFailure` if the group failed it,
        died, stayed silent for ``timeout_s`` or answered with the wrong reply type."""
        if not self.awaiting:
            raise RuntimeError(f"site {self.site!r}: receive() without a command sent")
        command = self.awaiting.popleft()
        reply = self._wait_for_reply()
        if isinstance(reply, CommandFailed):
            raise SiteFailure(self.site, f"{reply.command} failed:\n{reply.error}")
        if not isinstance(reply, command.reply_type):
            raise SiteFailure(
                self.site, f"answered {type(command).__name__} with {type(reply).__name__}, "
                f"expected {command.reply_type.__name__}"
            )
        return reply

    def call(self, command: Command) -> Reply:
        self.send(command)
        return self.receive()

    def abandon(self) -> None:
        """Forget a failed worker group; a hung one is cancelled (its actors go with it)."""
        if self.fit_ref is not None:
            ray.cancel(self.fit_ref, force=True)
            self.fit_ref = None
        self.awaiting.clear()

    def stop(self) -> Stopped | None:
        """Drain: the worker saves its inner optimizer and ``fit()`` returns (None: not running)."""
        if self.fit_ref is None:
            return None
        reply = self.call(Stop())
        try:
            outcome = ray.get(self.fit_ref, timeout=self.timeout_s)
            self.ray_train_metrics = dict(outcome.get("ray_train_metrics", {}))
        except Exception as error:  # noqa: BLE001 -- fit() failing after the stop reply
            raise SiteFailure(self.site, f"worker group failed while stopping: {error}") from None
        finally:
            self.fit_ref = None
        assert isinstance(reply, Stopped)  # receive() checked the reply type
        return reply

    def _wait_for_reply(self) -> Reply:
        """The next reply; the first after :meth:`start` may take the group's start-up too."""
        timeout_s = self.timeout_s + (self.capacity_timeout_s if self.starting else 0.0)
        deadline = time.monotonic() + timeout_s
        while True:
            reply = ray.get(self.mailbox.get.remote(self.site, "result", min(COMMAND_POLL_S, self.timeout_s)))
            if reply is not None:
                self.starting = False
                return reply
            done, _ = ray.wait([self.fit_ref], timeout=0)
            if done:
                self.fit_ref = None
                try:
                    ray.get(done[0])
                    reason = "worker group exited without answering"
                except Exception as error:  # noqa: BLE001 -- any fit() error says what broke
                    reason = f"worker group failed: {error}"
                    timed_out = [line for line in reason.splitlines() if "startup timed out" in line]
                    if self.starting and timed_out:  # Ray Train's own message ends in advice that does not apply
                        reason = (f"no capacity: its worker group did not start within training.capacity_timeout_s"
                                  f" = {self.capacity_timeout_s:g} s (its nodes never came): {timed_out[0][:200]}")
                raise SiteFailure(self.site, reason)
            if time.monotonic() > deadline:
                raise SiteFailure(self.site, f"no answer within {timeout_s:.0f} s" + (
                    " (training.capacity_timeout_s + command_timeout_s: the worker group never started)"
                    if self.starting else ""))
