"""The site protocol: what crosses between the coordinator and a site's worker group.

Everything that crosses the process edge is a frozen dataclass:

* :class:`SiteLoopConfig` — how a site's train function builds its model, data and channels
  (once per window; no dict of string keys);
* commands (coordinator → site rank 0, then broadcast to the site's ranks): :class:`Train`,
  :class:`Load`, :class:`Submit`, :class:`Publish`, :class:`SaveOptimizer`,
  :class:`LoadOptimizer`, :class:`Stop` — the site worker has one method per command;
* replies (site rank 0 → coordinator): one per command, every one with the wall seconds it
  took, or :class:`CommandFailed` with the worker's traceback.

Each command names its reply type (``reply_type``), so the coordinator side can check that the
answer it received belongs to the question it asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from curtail.training.shards import ShardedTokens

if TYPE_CHECKING:  # annotations only: the coordinator side (cluster.py) imports no torch
    from curtail.planning.links import Link
    from curtail.training.compression import WireFormat
    from curtail.training.model import ModelSpec
    from curtail.training.schedule import LRSchedule


TokenArray = np.ndarray | ShardedTokens
"""A corpus part in memory, or a shard folder's range read lazily where it is used."""

def share_tokens(tokens: TokenArray) -> Any:
    """How ``tokens`` reach a rank (a *token source*): an array through the object store
    (zero-copy), a shard folder's range as itself (its location; read shard by shard there)."""
    import ray

    return tokens if isinstance(tokens, ShardedTokens) else ray.put(np.asarray(tokens))


def open_tokens(source: Any) -> TokenArray:
    """The tokens a token source names (a ref nested in a config is not resolved by Ray)."""
    import ray

    return source if isinstance(source, ShardedTokens) else ray.get(source)


@dataclass(frozen=True)
class ModelSetup:
    """What builds the same model anywhere (a site's ranks, the evaluator)."""

    spec: ModelSpec
    vocab_size: int
    seed: int
    seq_len: int
    torch_threads: int = 1


@dataclass(frozen=True)
class SiteLoopConfig:
    """One site's train function config (``TorchTrainer(train_loop_config=...)``)."""

    site: str
    model: ModelSetup
    mailbox: Any  # Mailbox actor handle: commands in, replies out
    averager: Any  # Averager actor handle, or AveragerShards: global weights, submissions, publishes
    train_tokens: Any  # token source (share_tokens): the training tokens
    batch_size: int  # sequences per rank per step
    schedule: LRSchedule
    wire: WireFormat  # how the pseudo-gradient travels (codec, top-k, error feedback)
    use_gpu: bool
    compile_model: bool = False
    micro_batch_size: int | None = None
    emulated_link: Link | None = None  # hold each transfer for its time on this link (emulation)
    staggered: bool = False  # the averager's shards are fragments synced at staggered points (sync_fragments)
    parallelism: str = "ddp"  # or "fsdp": each rank holds, and exchanges, its rows of every parameter
    activation_checkpointing: bool = False
    fp8_linear: bool = False  # the decoder's linear layers in float8 (curtail.training.float8)
    fp8_recipe: str = "tensorwise"  # its scaling recipe
    host_power: bool = False  # measure the workers' CPU and memory watts (curtail.training.host_power)


@dataclass(frozen=True)
class EvalConfig:
    """The evaluator's config: the model, the held-out tokens and how much of them to score."""

    model: ModelSetup
    heldout_tokens: Any  # token source (share_tokens): the held-out tokens
    num_batches: int
    batch_size: int
    device: str = "cpu"  # "cuda": the evaluator holds a share of a GPU (training.eval_gpus)


# ------------------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class Merge:
    """An overlapped sync the site merged during a command (:mod:`curtail.runtime.streaming`)."""

    version: int  # the global version merged
    num_bytes: int  # what its download moved
    sent_bytes: int  # what its upload moved (the coded pseudo-gradient; the submit reported none)
    wall_s: float  # seconds the merge itself took (inside the command's wall_s)


@dataclass(frozen=True)
class Reply:
    wall_s: float
    merged: Merge | None = field(default=None, kw_only=True)  # an overlapped sync landed during the command


@dataclass(frozen=True)
class Trained(Reply):
    steps: int
    tokens: int
    loss: float  # mean training loss over the steps (nan when no step ran)
    power_w: float | None = None  # NVML-measured watts of the site's GPUs over the command
    gpus: int = 0  # how many GPUs power_w covers
    host_power_w: tuple[float, float] | None = None  # the site's workers' (CPU, memory) watts (CodeCarbon)
    pack_s: float = 0.0  # seconds spent packing staggered fragments between the steps (not training)


@dataclass(frozen=True)
class Loaded(Reply):
    version: int  # the global version now held by every rank
    digest: str  # fingerprint of rank 0's weights
    node_ids: tuple[str, ...]  # Ray nodes the site's ranks run on
    pid: int  # rank 0's process (fault-injection tests kill it)
    num_bytes: int = 0  # global weights received from the averager
    # the first load of a worker group: seconds of each phase of its start-up (STARTUP_PHASES)
    startup_s: tuple[tuple[str, float], ...] = ()


STARTUP_PHASES = {
    "ray_train": "from the coordinator's start to the train function: Ray Train's controller, placement "
                 "group and worker processes, the imports, the process group",
    "corpus": "opening the training tokens",
    "model": "building the model and its inner optimizer on the device",
    "optimizer": "the inner optimizer of the site's last window (its drain checkpoint)",
}
"""What a worker group's start-up spends its time on (``timings.csv`` rows ``start_<phase>``)."""


@dataclass(frozen=True)
class Submitted(Reply):
    num_bytes: int  # pseudo-gradient bytes sent to the averager (overlapped: 0, counted at the merge)


@dataclass(frozen=True)
class Published(Reply):
    version: int  # the global version the site's weights became
    num_bytes: int = 0  # the weights sent to the averager


@dataclass(frozen=True)
class Flushed(Reply):
    pass


@dataclass(frozen=True)
class OptimizerSaved(Reply):
    pass


@dataclass(frozen=True)
class OptimizerLoaded(Reply):
    loaded: bool  # every rank found and loaded its state


@dataclass(frozen=True)
class Stopped(Reply):
    steps: int  # optimizer steps over the whole window


@dataclass(frozen=True)
class CommandFailed(Reply):
    command: str
    error: str  # the worker's traceback


# ------------------------------------------------------------------------------------ commands


@dataclass(frozen=True)
class Command:
    kind: ClassVar[str]
    reply_type: ClassVar[type[Reply]]


@dataclass(frozen=True)
class Train(Command):
    """Train the listed chunks: ``(first token position, number of steps)`` each."""

    kind: ClassVar[str] = "train"
    reply_type: ClassVar[type[Reply]] = Trained
    chunks: tuple[tuple[int, int], ...]
    tokens_before: float  # tokens trained by the whole run before this command (LR schedule)
    concurrency: float  # all active sites' rate / this site's: the schedule advances this much faster
    until_wall: float | None = None  # real-time clock: stop at this wall-clock instant
    report: bool = False  # report the site's progress to Ray Train after it (every rank; the dashboard shows it)


@dataclass(frozen=True)
class Load(Command):
    """Take the averager's newest global weights (every rank)."""

    kind: ClassVar[str] = "load"
    reply_type: ClassVar[type[Reply]] = Loaded


@dataclass(frozen=True)
class Submit(Command):
    """Send this round's pseudo-gradient (global at load − local now) and its token weight."""

    kind: ClassVar[str] = "submit"
    reply_type: ClassVar[type[Reply]] = Submitted
    round_index: int
    tokens: float
    overlap: bool = False  # pack, then train on while it travels (curtail.runtime.streaming)


@dataclass(frozen=True)
class Flush(Command):
    """Send the staggered fragments of the round in flight not sent yet; do not wait for them."""

    kind: ClassVar[str] = "flush"
    reply_type: ClassVar[type[Reply]] = Flushed


@dataclass(frozen=True)
class Publish(Command):
    """Single-site hand-off: the site's weights become the global weights."""

    kind: ClassVar[str] = "publish"
    reply_type: ClassVar[type[Reply]] = Published


@dataclass(frozen=True)
class SaveOptimizer(Command):
    """Save every rank's inner optimizer state into ``path`` (``rank<r>.pt``)."""

    kind: ClassVar[str] = "save_optimizer"
    reply_type: ClassVar[type[Reply]] = OptimizerSaved
    path: str


@dataclass(frozen=True)
class LoadOptimizer(Command):
    """Load every rank's inner optimizer state from ``path`` (resume)."""

    kind: ClassVar[str] = "load_optimizer"
    reply_type: ClassVar[type[Reply]] = OptimizerLoaded
    path: str


@dataclass(frozen=True)
class Stop(Command):
    """Drain: save the inner optimizer as a Ray Train checkpoint and end ``fit()``."""

    kind: ClassVar[str] = "stop"
    reply_type: ClassVar[type[Reply]] = Stopped
