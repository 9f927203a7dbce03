"""Per-site Ray Train worker groups that persist across rounds.

While a site's window is open, one ``TorchTrainer`` run trains there: its workers ask for the
site's resource (``site_<name>``), so on a real cluster they land only on that site's nodes and
on one machine on the local node that declares the resource. The train function
(:func:`site_worker_loop`) builds the model and inner optimizer once and then executes the
coordinator's commands — train N steps, submit a pseudo-gradient, publish, load the global
weights, evaluate, stop — until the site drains. No respawn, reload or recompile per round.

Inside a site the ranks are plain data parallel (gloo on CPU, NCCL on GPU): rank 0 talks to the
coordinator (through the :class:`~curtail.runtime.mailbox.Mailbox`) and to the averaging actor,
then broadcasts commands and weights to the other ranks.

At drain the inner optimizer state is saved as a Ray Train checkpoint; the next window of the
same site re-runs ``fit()`` under the same run name, so ``ray.train.get_checkpoint()`` hands it
back (Ray Train V2's auto-resume).
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

COMMAND_POLL_S = 5.0


class SiteFailure(RuntimeError):
    """A site's worker group died or stopped answering; the coordinator handles it as an event."""

    def __init__(self, site: str, reason: str):
        self.site = site
        super().__init__(f"site {site!r}: {reason}")


def site_resource(site: str) -> str:
    """The custom resource that pins a site's workers to its nodes."""
    return f"site_{site}"


# --------------------------------------------------------------------------------------------
# Worker side (runs inside Ray Train workers)


def _broadcast_object(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _broadcast_params(trainer: Any, world: int) -> None:
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


def _node_ids(world: int) -> list[str]:
    """The Ray node of every rank of the site, so a run can show where each site trained."""
    return [str(n) for n in _gather_object(ray.get_runtime_context().get_node_id(), world)]


def _site_power_w(reading: Any, world: int) -> float | None:
    """The site's measured GPU watts: the sum over its ranks' GPUs, or None unless all measured."""
    # the board's energy counter over the command (exact) rather than the mean of ~1-s-averaged samples
    readings = _gather_object(None if reading is None else reading.energy_j / max(reading.duration_s, 1e-9), world)
    return None if any(r is None for r in readings) else float(sum(readings))


def site_worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train function of one site; see the module doc for the command protocol."""
    import ray.train
    import torch

    from curtail.training.data import TokenCorpus
    from curtail.training.loop import SiteTrainer
    from curtail.training.model import ModelSpec
    from curtail.training.power import PowerSampler
    from curtail.training.schedule import LRSchedule

    site: str = config["site"]
    mailbox = config["mailbox"]
    averager = config["averager"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["torch_threads"])
    use_gpu = config["use_gpu"]
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    train = TokenCorpus(ray.get(config["train_tokens"]), "train")
    heldout = TokenCorpus(ray.get(config["heldout_tokens"]), "heldout")
    schedule = LRSchedule(**config["schedule"])
    batch_size, seq_len = config["batch_size"], config["seq_len"]
    rank_tokens = batch_size * seq_len
    tokens_per_step = rank_tokens * world
    trainer = SiteTrainer(
        ModelSpec(**config["model_spec"]),
        config["vocab_size"],
        config["seed"],
        device=device,
        autocast_dtype=torch.bfloat16 if use_gpu else None,
        compile_model=config.get("compile_model", False),
        micro_batch_size=config.get("micro_batch_size"),
    )
    # Measured GPU power (NVML) for the train replies; None on CPUs or without nvidia-ml-py.
    power = PowerSampler.create(device.index) if use_gpu else None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a later window of this site: keep the inner optimizer's moments
        with checkpoint.as_directory() as folder:
            state_file = Path(folder) / f"inner_optimizer_rank{rank}.pt"
            if state_file.is_file():
                trainer.load_optimizer_state_dict(torch.load(state_file, weights_only=True))
    reference: dict[str, np.ndarray] | None = None  # the global weights this site started from
    steps_done = 0

    def reply(message: dict[str, Any]) -> None:
        if rank == 0:
            ray.get(mailbox.put.remote(site, "result", message))

    while True:
        command = None
        if rank == 0:
            while command is None:
                command = ray.get(mailbox.get.remote(site, "command", COMMAND_POLL_S))
        command = _broadcast_object(command, world)
        kind = command["kind"]
        started = time.perf_counter()
        try:
            if kind == "train":
                losses = []
                offset = 0
                if power is not None:
                    power.start()
                until_wall = command.get("until_wall")  # real-time clock: stop at this wall instant
                for start_token, num_steps in command["chunks"]:
                    for step in range(num_steps):
                        if until_wall is not None and not _broadcast_object(time.time() < until_wall, world):
                            break
                        position = start_token + step * tokens_per_step + rank * rank_tokens
                        input_ids, labels = train.batch(position, batch_size, seq_len)
                        progress = command["tokens_before"] + offset * tokens_per_step * command["concurrency"]
                        # sync=False: no host wait per step; the mean below waits once.
                        losses.append(trainer.train_step(input_ids, labels, schedule.lr_at(progress), sync=False))
                        offset += 1
                steps_done += offset
                mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
                # a collective only where there is something to measure (use_gpu is the same on every rank)
                power_w = _site_power_w(power.stop() if power is not None else None, world) if use_gpu else None
                reply({"kind": kind, "steps": offset, "tokens": offset * tokens_per_step, "loss": mean_loss,
                       "wall_s": time.perf_counter() - started, "power_w": power_w, "gpus": world})
            elif kind == "load":
                version = -1
                if rank == 0:
                    version, state = ray.get(averager.get_global.remote())
                    trainer.load_global(state)
                    reference = state  # read-only object-store arrays: no copy needed
                _broadcast_params(trainer, world)
                digest = trainer.weights_fingerprint() if rank == 0 else ""
                node_ids = sorted(set(_node_ids(world)))
                reply({"kind": kind, "version": version, "digest": digest, "node_ids": node_ids, "pid": os.getpid(),
                       "wall_s": time.perf_counter() - started})
            elif kind == "submit":
                num_bytes = 0
                if rank == 0:
                    if reference is None:
                        raise RuntimeError("submit before load: the site has no global reference weights")
                    # On the device against the kept start of the round; only bf16 crosses to the host.
                    packed = trainer.compressed_pseudo_gradient(reference, config["transfer_dtype"])
                    num_bytes = packed.num_bytes
                    ray.get(averager.submit.remote(site, command["round"], packed, command["tokens"]))
                reply({"kind": kind, "bytes": num_bytes, "wall_s": time.perf_counter() - started})
            elif kind == "publish":
                version = -1
                if rank == 0:
                    params = trainer.export_params()
                    version = ray.get(averager.publish.remote(site, params))
                    reference = params
                reply({"kind": kind, "version": version, "wall_s": time.perf_counter() - started})
            elif kind == "eval":
                loss = trainer.evaluate(heldout, config["eval_batches"], config["eval_batch_size"], seq_len)
                reply({"kind": kind, "loss": loss, "wall_s": time.perf_counter() - started})
            elif kind == "save_optimizer":  # with a run checkpoint: this rank's inner AdamW
                folder = Path(command["path"])
                folder.mkdir(parents=True, exist_ok=True)
                staged = folder / f".rank{rank}.pt.tmp"
                torch.save(trainer.optimizer_state_dict(), staged)
                os.replace(staged, folder / f"rank{rank}.pt")
                _gather_object(True, world)  # every rank has written before the reply
                reply({"kind": kind, "wall_s": time.perf_counter() - started})
            elif kind == "load_optimizer":  # resume: the inner AdamW of the run checkpoint
                state_file = Path(command["path"]) / f"rank{rank}.pt"
                found = state_file.is_file()
                if found:
                    trainer.load_optimizer_state_dict(torch.load(state_file, weights_only=True))
                loaded = all(_gather_object(found, world))
                reply({"kind": kind, "loaded": loaded, "wall_s": time.perf_counter() - started})
            elif kind == "digest":
                reply({"kind": kind, "digest": trainer.weights_fingerprint() if rank == 0 else ""})
            elif kind == "stop":
                with tempfile.TemporaryDirectory() as folder:
                    torch.save(trainer.optimizer_state_dict(), Path(folder) / f"inner_optimizer_rank{rank}.pt")
                    ray.train.report(
                        {"steps": steps_done}, checkpoint=ray.train.Checkpoint.from_directory(folder)
                    )
                reply({"kind": kind, "steps": steps_done})
                return {"site": site, "steps": steps_done}
            else:
                raise ValueError(f"unknown site command {kind!r}")
        except Exception:
            reply({"kind": "error", "command": kind, "error": traceback.format_exc()})
            raise


# --------------------------------------------------------------------------------------------
# Coordinator side


@ray.remote(num_cpus=0)
def _fit_site(loop_config: dict[str, Any], scaling: dict[str, Any], run_name: str, storage_path: str) -> dict[str, Any]:
    """Run one window of a site: ``TorchTrainer.fit()`` until the site is told to stop."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        site_worker_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(**scaling),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=3),
        ),
    )
    result = trainer.fit()
    return result.return_value or {}


@dataclass
class SiteGroup:
    """The coordinator's handle on one site's worker group."""

    site: str
    mailbox: Any
    loop_config: dict[str, Any]
    scaling: dict[str, Any]
    run_name: str
    storage_path: str
    head_resources: dict[str, float]
    timeout_s: float
    fit_ref: Any = None

    @property
    def running(self) -> bool:
        return self.fit_ref is not None

    def start(self) -> None:
        if self.fit_ref is not None:
            return
        ray.get(self.mailbox.clear.remote(self.site))
        self.fit_ref = _fit_site.options(resources=self.head_resources).remote(
            self.loop_config, self.scaling, self.run_name, self.storage_path
        )

    def send(self, command: dict[str, Any]) -> None:
        if self.fit_ref is None:
            raise SiteFailure(self.site, f"no worker group to send {command['kind']!r} to")
        ray.get(self.mailbox.put.remote(self.site, "command", command))

    def receive(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            result = ray.get(self.mailbox.get.remote(self.site, "result", min(COMMAND_POLL_S, self.timeout_s)))
            if result is not None:
                break
            done, _ = ray.wait([self.fit_ref], timeout=0)
            if done:
                self.fit_ref = None
                try:
                    ray.get(done[0])
                    reason = "worker group exited without answering"
                except Exception as error:  # noqa: BLE001 -- any fit() error says what broke
                    reason = f"worker group failed: {error}"
                raise SiteFailure(self.site, reason)
            if time.monotonic() > deadline:
                raise SiteFailure(self.site, f"no answer within {self.timeout_s:.0f} s")
        if result.get("kind") == "error":
            raise SiteFailure(self.site, f"{result['command']} failed:\n{result['error']}")
        return result

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        self.send(command)
        return self.receive()

    def abandon(self) -> None:
        """Forget a failed worker group; a hung one is cancelled (its actors go with it)."""
        if self.fit_ref is not None:
            ray.cancel(self.fit_ref, force=True)
            self.fit_ref = None

    def stop(self) -> dict[str, Any]:
        """Drain: the worker saves its inner optimizer and ``fit()`` returns."""
        if self.fit_ref is None:
            return {}
        result = self.call({"kind": "stop"})
        try:
            ray.get(self.fit_ref, timeout=self.timeout_s)
        except Exception as error:  # noqa: BLE001 -- fit() failing after the stop reply
            raise SiteFailure(self.site, f"worker group failed while stopping: {error}") from None
        finally:
            self.fit_ref = None
        return result
