"""The parameter-averaging actor: global fp32 weights and the outer optimizer.

Sites send pseudo-gradients (θ_global − θ_site, bf16 by default) with the tokens they
trained; at the end of a federated round the actor takes the token-weighted mean and applies
the outer optimizer (plain averaging by default, or Nesterov). A site leaving mid-round submits
its partial work to the same round, so it still counts. In single-site mode the site's weights
replace the global state when another site joins or it leaves (:meth:`Averager.publish`).

Weights leave the actor as numpy arrays through the object store (zero-copy, read-only on the
same node). Every change bumps ``version``.

**Compressed broadcast** (``[training] broadcast_dtype`` other than fp32): the sites then hold
the *broadcast weights* (``view``), not the exact global ones. After every outer step the actor
packs ``θ − view`` in the broadcast format and adds what it decodes to the view; a site that
holds the previous view downloads only that packed change and adds the same decoded values, so
every site holds the view bit for bit (their weight fingerprints agree). What a packing loses
stays in ``θ − view`` and goes out with the next change (error feedback on the server side).
Sites train from the view and send ``view − local`` as their pseudo-gradients; the outer step
applies them to the exact ``θ``, which the evaluator scores and checkpoints keep. A site without
the previous view (joining, restarted, after a single-site hand-off or a resume) downloads the
whole view in fp32.

**Overlapped syncs** (``[execution] overlap_sync``): the coordinator announces which sites will
submit to a round (:meth:`Averager.expect`) and goes on; the sites' submissions arrive from
their transfer threads while they train, and the last expected one runs the outer step. A site
that dies is withdrawn from the round, which then steps on the others' submissions.
:meth:`Averager.round_status` tells the coordinator and the sites' threads when it has.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from curtail.runtime.checkpoint import (
    RunCheckpoint,
    join_averager_parts,
    outer_optimizer_state,
    read_tensors,
    write_averager_part,
)
from curtail.training.averaging import make_outer_optimizer
from curtail.training.compression import CompressedState, WireFormat, compress, decompress


@ray.remote(num_cpus=0)
class Averager:
    def __init__(self, initial_params: dict[str, np.ndarray], outer_optimizer: str, outer_lr: float, outer_momentum: float | None,
                 broadcast: WireFormat | None = None, reset_momentum_at_handoff: bool = False):
        self._params = {name: np.array(value, dtype=np.float32) for name, value in initial_params.items()}
        self._broadcast = broadcast  # None: sites download the exact weights (fp32)
        self._view: dict[str, np.ndarray] = {}  # the weights as broadcast (what the sites hold)
        self._change: tuple[int, CompressedState] | None = None  # (from version, packed view change)
        kwargs = {"lr": outer_lr, "momentum": outer_momentum} if outer_optimizer == "nesterov" else {}
        self._optimizer = make_outer_optimizer(outer_optimizer, **kwargs)
        self._reset_momentum_at_handoff = reset_momentum_at_handoff  # at every publish
        self._pending: dict[int, dict[str, tuple[dict[str, np.ndarray], float]]] = {}
        self._expected: dict[int, set[str]] = {}  # overlapped rounds: the sites still to submit
        self._outcomes: dict[int, dict[str, Any]] = {}  # overlapped rounds' outer steps, by round
        self._parts: dict[tuple[Any, ...], dict[int, dict[str, np.ndarray]]] = {}  # FSDP sites' rows, by rank
        self.version = 0
        self.num_outer_steps = 0
        self._published_by: tuple[str, int] = ("", -1)  # (site, version) of the newest publish
        self._reset_view()

    def load_state(self, params: dict[str, np.ndarray], optimizer: dict[str, Any], version: int, num_outer_steps: int) -> int:
        """Restore from a run checkpoint (resume)."""
        self._params = {name: np.array(value, dtype=np.float32) for name, value in params.items()}
        self._optimizer.load_state_dict(optimizer)
        self._pending, self._expected, self._outcomes, self._parts = {}, {}, {}, {}
        self.version, self.num_outer_steps = int(version), int(num_outer_steps)
        self._reset_view()
        return self.version

    def save_part(self, folder: str, index: int, count: int) -> dict[str, Any]:
        """Write this actor's weights and outer momentum into ``folder`` (a path or a URI) for a
        run checkpoint, as part ``index`` of ``count``; returns the JSON rest of its state."""
        return write_averager_part(folder, self.state(), index, count)

    def load_part(self, weights: str, momentum: str | None, optimizer: dict[str, Any], version: int,
                  num_outer_steps: int) -> int:
        """Restore from this actor's files of a run checkpoint (paths or URIs; resume)."""
        buffers = read_tensors(momentum) if momentum is not None else None
        return self.load_state(read_tensors(weights), outer_optimizer_state(optimizer, buffers), version, num_outer_steps)

    def get_global(self) -> tuple[int, dict[str, np.ndarray]]:
        return self.version, self._params

    def get_view(self, held_version: int) -> tuple[str, int, Any]:
        """What a site holding the view of ``held_version`` downloads: ``("change", version,
        packed)`` when it holds the previous view, else ``("full", version, view)`` (the exact
        weights when the broadcast is not compressed)."""
        if self._broadcast is None:
            return "full", self.version, self._params
        if self._change is not None and held_version == self._change[0]:
            return "change", self.version, self._change[1]
        return "full", self.version, self._view

    def _reset_view(self) -> None:
        """The view becomes the exact weights (no site holds a view to build on)."""
        if self._broadcast is not None:
            self._view = {name: value.copy() for name, value in self._params.items()}
        self._change = None

    def _advance_view(self, previous_version: int) -> None:
        """After an outer step: pack ``θ − view``, add what it decodes to the view."""
        if self._broadcast is None:
            return
        packed = compress({name: self._params[name] - self._view[name] for name in self._params}, self._broadcast)
        advance_view(self._view, packed)
        self._change = (previous_version, packed)

    def submit(self, site: str, round_index: int, pseudo_grad: CompressedState, tokens: float,
               part: tuple[int, int] = (0, 1)) -> int:
        """Add a site's work to round ``round_index`` (idempotent per site and round). ``part =
        (rank, world)``: an FSDP site's ranks each send their rows of every tensor, and the
        site's pseudo-gradient is complete once all ``world`` have arrived (:meth:`_joined_rows`)."""
        grads = self._joined_rows(("submit", round_index, site), decompress(pseudo_grad), part)
        if grads is not None:
            self._pending.setdefault(round_index, {})[site] = (grads, float(tokens))
            self._step_when_complete(round_index)
        return len(self._pending.get(round_index, {}))

    def _joined_rows(self, key: tuple[Any, ...], arrays: dict[str, np.ndarray],
                     part: tuple[int, int]) -> dict[str, np.ndarray] | None:
        """The whole tensors once every rank's rows of ``key`` arrived (rank order), else None."""
        rank, world = part
        if world == 1:
            return arrays
        parts = self._parts.setdefault(key, {})
        parts[rank] = arrays
        if len(parts) < world:
            return None
        del self._parts[key]
        return {name: np.concatenate([parts[r][name] for r in range(world)]) for name in arrays}

    def expect(self, round_index: int, sites: list[str]) -> None:
        """An overlapped round: step as soon as every one of ``sites`` has submitted."""
        self._expected[round_index] = set(sites)
        self._step_when_complete(round_index)

    def round_status(self, round_index: int) -> dict[str, Any]:
        """An overlapped round: its outer step's outcome (None until it ran) and which sites'
        submissions have arrived."""
        return {"outcome": self._outcomes.get(round_index),
                "arrived": sorted(self._pending.get(round_index, {})),
                "expected": sorted(self._expected.get(round_index, ()))}

    def _step_when_complete(self, round_index: int) -> None:
        expected = self._expected.get(round_index)
        if expected is not None and expected <= set(self._pending.get(round_index, {})):
            del self._expected[round_index]
            self._outcomes[round_index] = self.outer_step(round_index)

    def withdraw(self, round_index: int, sites: list[str]) -> list[str]:
        """Drop these sites' submissions to a round (a site that died after its update arrived
        but before the coordinator heard back: its tokens go back to the ledger and are trained
        again, so its update must not count too). Returns the sites actually dropped. An
        overlapped round no longer waits for them (and steps if the rest have arrived)."""
        pending = self._pending.get(round_index, {})
        for site in sites:  # an FSDP site's rows that arrived before it died
            self._parts.pop(("submit", round_index, site), None)
        dropped = [site for site in sites if pending.pop(site, None) is not None]
        if round_index in self._expected:
            self._expected[round_index] -= set(sites)
            self._step_when_complete(round_index)
        return dropped

    def outer_step(self, round_index: int) -> dict[str, Any]:
        """Average round ``round_index``'s submissions and apply the outer optimizer."""
        submissions = self._pending.pop(round_index, {})
        contributing = {site: item for site, item in submissions.items() if item[1] > 0}
        if contributing:
            self._optimizer.step(
                self._params,
                {site: grad for site, (grad, _) in contributing.items()},
                {site: tokens for site, (_, tokens) in contributing.items()},
            )
            self.version += 1
            self.num_outer_steps += 1
            self._advance_view(self.version - 1)
        return {
            "version": self.version,
            "sites": sorted(contributing),
            "tokens": {site: tokens for site, (_, tokens) in contributing.items()},
        }

    def publish(self, site: str, params: dict[str, np.ndarray], part: tuple[int, int] = (0, 1)) -> int:
        """Single-site hand-off: the site's weights become the global state (an FSDP site's
        ranks each send their rows, ``part = (rank, world)``). Returns the version they make."""
        joined = self._joined_rows(("publish", site), params, part)
        if joined is None:
            return self.version + 1  # (the last part's publish makes it: nothing else moves the version meanwhile)
        for name, value in joined.items():
            self._params[name][...] = value
        if self._reset_momentum_at_handoff:
            self._optimizer.forget_momentum()
        self.version += 1
        self._published_by = (site, self.version)
        self._reset_view()  # the publishing site holds the exact weights: the view is them
        return self.version

    def published_by(self, site: str) -> int | None:
        """The version ``site``'s publish made, if that publish is the newest change (a site that
        died before its publish was answered: did the weights arrive?)."""
        who, version = self._published_by
        return version if who == site and version == self.version else None

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def state(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "num_outer_steps": self.num_outer_steps,
            "params": self._params,
            "optimizer": self._optimizer.state_dict(),
        }


def advance_view(view: dict[str, np.ndarray], packed: CompressedState) -> dict[str, np.ndarray]:
    """Add a packed view change to ``view`` in place (the actor and every site do exactly this,
    so they hold the same bits)."""
    for name, change in decompress(packed).items():
        np.add(view[name], change, out=view[name])
    return view


def download_view(averager: AveragerClient, held_version: int,
                  reference: dict[str, np.ndarray] | None) -> tuple[int, dict[str, np.ndarray], int]:
    """A site's download of the broadcast weights: ``(version, weights, bytes moved)``. Holding
    the previous view (``reference``, of ``held_version``) it gets the packed change and adds it
    to a copy; otherwise the whole weights (read-only object-store arrays: no copy needed)."""
    kind, version, payload = averager.get_view(held_version)
    if kind == "change":
        assert reference is not None
        return version, advance_view({name: np.array(array) for name, array in reference.items()}, payload), \
            payload.num_bytes
    return version, payload, sum(array.nbytes for array in payload.values())


def shard_names(sizes: Mapping[str, int], num_shards: int) -> tuple[tuple[str, ...], ...]:
    """Parameter names split into ``num_shards`` groups of about equal size (largest tensor to the
    lightest group first; deterministic), each group in the parameters' own order."""
    if not 1 <= num_shards <= len(sizes):
        raise ValueError(f"averager_shards must be between 1 and the model's {len(sizes)} parameter tensors, "
                         f"got {num_shards}")
    loads, owner = [0] * num_shards, {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        lightest = loads.index(min(loads))
        owner[name] = lightest
        loads[lightest] += sizes[name]
    return tuple(tuple(name for name in sizes if owner[name] == shard) for shard in range(num_shards))


@dataclass(frozen=True)
class AveragerShards:
    """The averaging actors of a run whose global state is split across several: each holds the
    weights, the broadcast view and the outer-optimizer state of its parameter names only."""

    handles: tuple[Any, ...]
    names: tuple[tuple[str, ...], ...]  # per actor, the parameters it owns

    def split(self, state: Mapping[str, Any]) -> list[dict[str, Any]]:
        """A state keyed by parameter name, one part per actor."""
        return [{name: state[name] for name in names} for names in self.names]

    def split_packed(self, packed: CompressedState) -> list[CompressedState]:
        """A packed state, one part per actor (every field is per tensor: nothing is re-encoded)."""
        return [dataclasses.replace(packed, **{field: {n: part[n] for n in names if n in part}
                                               for field, part in _per_tensor(packed).items()})
                for names in self.names]

    def split_optimizer(self, state: Mapping[str, Any]) -> list[dict[str, Any]]:
        """An outer optimizer's state, one part per actor (its per-parameter buffers split)."""
        if "momentum_buffers" not in state:  # (plain averaging keeps none)
            return [dict(state) for _ in self.names]
        return [{**state, "momentum_buffers": part} for part in self.split(state["momentum_buffers"])]


def _per_tensor(packed: CompressedState) -> dict[str, dict[str, Any]]:
    return {"arrays": packed.arrays, "shapes": packed.shapes, "scales": packed.scales,
            "indices": packed.indices, "counts": packed.counts}


def _joined(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {name: value for part in parts for name, value in part.items()}


def _join_packed(parts: list[CompressedState]) -> CompressedState:
    fields = {field: _joined([_per_tensor(part)[field] for part in parts]) for field in _per_tensor(parts[0])}
    return dataclasses.replace(parts[0], **fields)


def _join_snapshots(snapshots: list[tuple[int, dict[str, np.ndarray]]]) -> tuple[int, dict[str, np.ndarray]]:
    return _same("version", [version for version, _ in snapshots]), _joined([params for _, params in snapshots])


def _join_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The actors' :meth:`Averager.state` as one (what a single actor would return)."""
    optimizer = dict(states[0]["optimizer"])
    if "momentum_buffers" in optimizer:
        optimizer["momentum_buffers"] = _joined([s["optimizer"]["momentum_buffers"] for s in states])
    return {"version": _same("version", [s["version"] for s in states]),
            "num_outer_steps": states[0]["num_outer_steps"],
            "params": _joined([s["params"] for s in states]), "optimizer": optimizer}


def _join_outcomes(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """The actors' outer steps of one round as one. Unstaggered they are equal; with staggered
    fragments a member that died between two fragments' sends is in the earlier actors' steps
    only: the round delivers the work of the members every actor stepped on."""
    sites = sorted(set.intersection(*(set(outcome["sites"]) for outcome in outcomes)))
    return {"version": _same("version", [outcome["version"] for outcome in outcomes]), "sites": sites,
            "tokens": {site: outcomes[0]["tokens"][site] for site in sites}}


def _same(what: str, values: list[Any]) -> Any:
    if any(value != values[0] for value in values[1:]):
        raise RuntimeError(f"the averaging actors disagree on {what}: {values} (an internal error)")
    return values[0]


@ray.remote(num_cpus=0)
def _joined_global(*snapshots: tuple[int, dict[str, np.ndarray]]) -> tuple[int, dict[str, np.ndarray]]:
    return _join_snapshots(list(snapshots))


class AveragerClient:
    """Blocking calls to the averaging actor — or to the actors of a sharded global state
    (:class:`AveragerShards`), which then look like one: the coordinator's (outer steps,
    withdrawals, state) and a site's rank 0 (global weights in, pseudo-gradients and publishes
    out). Every actor steps its own parameters on the same submissions, so the result is the
    single actor's bit for bit (every part of the outer step and of the codecs is per tensor).
    One actor is the case of one part: nothing is split or joined. Tests give the executor and
    the site worker autospecced fakes of it."""

    def __init__(self, handle: Any):
        self.shards = handle if isinstance(handle, AveragerShards) else None
        self.handles = self.shards.handles if self.shards else (handle,)
        self.handle = self.handles[0]

    def _all(self, method: str, *args: Any) -> list[Any]:
        """``method`` on every actor, at once."""
        return ray.get([getattr(h, method).remote(*args) for h in self.handles])

    def _each(self, method: str, parts: list[tuple[Any, ...]], *args: Any) -> list[Any]:
        """``method`` on every actor with its own leading arguments ``parts[i]``, at once."""
        return ray.get([getattr(h, method).remote(*part, *args) for h, part in zip(self.handles, parts, strict=True)])

    def _split(self, state: Mapping[str, Any]) -> list[Any]:
        return self.shards.split(state) if self.shards else [state]

    def parts(self) -> list[tuple[tuple[str, ...] | None, AveragerClient]]:
        """Each actor's parameter names and a client of that actor alone (one actor: all names, None)."""
        if self.shards is None:
            return [(None, self)]
        return [(names, AveragerClient(handle)) for handle, names in zip(self.handles, self.shards.names, strict=True)]

    def get_global(self) -> tuple[int, dict[str, np.ndarray]]:
        """``(version, params)``: the newest global weights (read-only object-store arrays)."""
        snapshots = self._all("get_global")
        return snapshots[0] if len(snapshots) == 1 else _join_snapshots(snapshots)

    def get_view(self, held_version: int) -> tuple[str, int, Any]:
        """The broadcast weights for a site holding ``held_version`` (:meth:`Averager.get_view`)."""
        views = self._all("get_view", held_version)
        if len(views) == 1:
            return views[0]
        kind = _same("the kind of view", [kind for kind, _, _ in views])
        version = _same("version", [version for _, version, _ in views])
        payloads = [payload for _, _, payload in views]
        return kind, version, _join_packed(payloads) if kind == "change" else _joined(payloads)

    def submit(self, site: str, round_index: int, pseudo_grad: CompressedState, tokens: float,
               part: tuple[int, int] = (0, 1)) -> int:
        """``part = (rank, world)``: this FSDP rank's rows (:meth:`Averager.submit`)."""
        packs = self.shards.split_packed(pseudo_grad) if self.shards else [pseudo_grad]
        return min(self._each("submit", [(site, round_index, pack) for pack in packs], tokens, part))

    def publish(self, site: str, params: dict[str, np.ndarray], part: tuple[int, int] = (0, 1)) -> int:
        """The global version the site's weights became (``part``: this FSDP rank's rows)."""
        return _same("version", self._each("publish", [(site, rows) for rows in self._split(params)], part))

    def published_by(self, site: str) -> int | None:
        versions = self._all("published_by", site)
        return versions[0] if all(v == versions[0] for v in versions) else None

    def outer_step(self, round_index: int) -> dict[str, Any]:
        return _join_outcomes(self._all("outer_step", round_index))

    def withdraw(self, round_index: int, sites: list[str]) -> list[str]:
        dropped = self._all("withdraw", round_index, sites)
        return dropped[0] if len(dropped) == 1 else sorted({site for part in dropped for site in part})

    def expect(self, round_index: int, sites: list[str]) -> None:
        self._all("expect", round_index, sites)

    def round_status(self, round_index: int) -> dict[str, Any]:
        """The round's outcome once every actor stepped it; the sites whose submissions every actor has."""
        statuses = self._all("round_status", round_index)
        if len(statuses) == 1:
            return statuses[0]
        outcomes = [status["outcome"] for status in statuses]
        waiting = [status for status in statuses if status["outcome"] is None]
        return {"outcome": None if waiting else _join_outcomes(outcomes),
                "arrived": sorted(set.intersection(*(set(s["arrived"]) for s in waiting))) if waiting else [],
                "expected": sorted(set.union(*(set(s["expected"]) for s in waiting))) if waiting else []}

    def load_state(self, params: dict[str, np.ndarray], optimizer: dict[str, Any], version: int,
                   num_outer_steps: int) -> int:
        """Restore every actor's part from a run checkpoint (resume)."""
        optimizers = self.shards.split_optimizer(optimizer) if self.shards else [optimizer]
        return _same("version", self._each("load_state", list(zip(self._split(params), optimizers, strict=True)),
                                           version, num_outer_steps))

    def state(self) -> dict[str, Any]:
        """Every actor's state, joined (what a single actor's :meth:`Averager.state` returns)."""
        states = self._all("state")
        return states[0] if len(states) == 1 else _join_states(states)

    def save_later(self, folder: str) -> Callable[[], dict[str, Any]]:
        """Each actor writes its part of the state of now into ``folder`` (a path or a URI);
        the returned function waits for them and gives ``averager.json``'s content. Nothing of
        the weights passes through the caller."""
        count = len(self.handles)
        refs = [h.save_part.remote(folder, index, count) for index, h in enumerate(self.handles)]
        return lambda: join_averager_parts(ray.get(refs))

    def load_checkpoint(self, checkpoint: RunCheckpoint, where: Callable[[Path], str]) -> int:
        """Restore every actor from a run checkpoint; returns the version. Where the checkpoint
        has one part per actor with the actor's parameter names, each actor reads its own files
        (``where(path)``: how the actors' nodes reach them); otherwise (the number of actors
        changed) the parts are joined here and split anew."""
        parts = checkpoint.parts
        names = self.shards.names if self.shards else None
        version, steps = checkpoint.averager["version"], checkpoint.averager["num_outer_steps"]
        if len(parts) == len(self.handles) and (
                names is None or all(checkpoint.part_names(i) == set(owned) for i, owned in enumerate(names))):
            return _same("version", self._each("load_part", [
                (where(checkpoint.path / weights), None if momentum is None else where(checkpoint.path / momentum))
                for weights, momentum in parts], checkpoint.optimizer, version, steps))
        return self.load_state(checkpoint.params, checkpoint.outer_optimizer_state(), version, steps)

    def global_snapshot(self) -> Any:
        """A reference to the current ``(version, params)``, for the evaluator (no wait)."""
        refs = [h.get_global.remote() for h in self.handles]
        return refs[0] if len(refs) == 1 else _joined_global.options(num_cpus=0).remote(*refs)

    def pids(self) -> list[int]:
        return self._all("pid")

    def node_ids(self) -> list[str]:
        """The Ray node of each averaging actor."""
        return self._all("node_id")
