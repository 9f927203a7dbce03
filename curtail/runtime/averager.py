"""The parameter-averaging actor: global fp32 weights and the outer optimizer.

Sites send pseudo-gradients (θ_global − θ_site, bf16 by default) with the tokens they
trained; at the end of a federated round the actor takes the token-weighted mean and applies
the outer optimizer (Nesterov by default). A site leaving mid-round submits its partial work
to the same round, so it still counts. In single-site mode the site's weights replace the
global state when another site joins or it leaves (:meth:`Averager.publish`).

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

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from curtail.training.averaging import make_outer_optimizer
from curtail.training.compression import CompressedState, WireFormat, compress, decompress


@ray.remote(num_cpus=0)
class Averager:
    def __init__(self, initial_params: dict[str, np.ndarray], outer_optimizer: str, outer_lr: float, outer_momentum: float,
                 broadcast: WireFormat | None = None):
        self._params = {name: np.array(value, dtype=np.float32) for name, value in initial_params.items()}
        self._broadcast = broadcast  # None: sites download the exact weights (fp32)
        self._view: dict[str, np.ndarray] = {}  # the weights as broadcast (what the sites hold)
        self._change: tuple[int, CompressedState] | None = None  # (from version, packed view change)
        kwargs = {"lr": outer_lr, "momentum": outer_momentum} if outer_optimizer == "nesterov" else {}
        self._optimizer = make_outer_optimizer(outer_optimizer, **kwargs)
        self._pending: dict[int, dict[str, tuple[dict[str, np.ndarray], float]]] = {}
        self._expected: dict[int, set[str]] = {}  # overlapped rounds: the sites still to submit
        self._outcomes: dict[int, dict[str, Any]] = {}  # overlapped rounds' outer steps, by round
        self.version = 0
        self.num_outer_steps = 0
        self._published_by: tuple[str, int] = ("", -1)  # (site, version) of the newest publish
        self._reset_view()

    def load_state(self, params: dict[str, np.ndarray], optimizer: dict[str, Any], version: int, num_outer_steps: int) -> int:
        """Restore from a run checkpoint (resume)."""
        self._params = {name: np.array(value, dtype=np.float32) for name, value in params.items()}
        self._optimizer.load_state_dict(optimizer)
        self._pending, self._expected, self._outcomes = {}, {}, {}
        self.version, self.num_outer_steps = int(version), int(num_outer_steps)
        self._reset_view()
        return self.version

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

    def submit(self, site: str, round_index: int, pseudo_grad: CompressedState, tokens: float) -> int:
        """Add a site's work to round ``round_index`` (idempotent per site and round)."""
        self._pending.setdefault(round_index, {})[site] = (decompress(pseudo_grad), float(tokens))
        count = len(self._pending[round_index])
        self._step_when_complete(round_index)
        return count

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

    def publish(self, site: str, params: dict[str, np.ndarray]) -> int:
        """Single-site hand-off: the site's weights become the global state."""
        for name, value in params.items():
            self._params[name][...] = value
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


class AveragerClient:
    """Blocking calls to the averaging actor: the coordinator's (outer steps, withdrawals, state)
    and a site's rank 0 (global weights in, pseudo-gradients and publishes out). Tests give the
    executor and the site worker autospecced fakes of it."""

    def __init__(self, handle: Any):
        self.handle = handle

    def get_global(self) -> tuple[int, dict[str, np.ndarray]]:
        """``(version, params)``: the newest global weights (read-only object-store arrays)."""
        return ray.get(self.handle.get_global.remote())

    def get_view(self, held_version: int) -> tuple[str, int, Any]:
        """The broadcast weights for a site holding ``held_version`` (:meth:`Averager.get_view`)."""
        return ray.get(self.handle.get_view.remote(held_version))

    def submit(self, site: str, round_index: int, pseudo_grad: CompressedState, tokens: float) -> int:
        return ray.get(self.handle.submit.remote(site, round_index, pseudo_grad, tokens))

    def publish(self, site: str, params: dict[str, np.ndarray]) -> int:
        """The global version the site's weights became."""
        return ray.get(self.handle.publish.remote(site, params))

    def published_by(self, site: str) -> int | None:
        return ray.get(self.handle.published_by.remote(site))

    def outer_step(self, round_index: int) -> dict[str, Any]:
        return ray.get(self.handle.outer_step.remote(round_index))

    def withdraw(self, round_index: int, sites: list[str]) -> list[str]:
        return ray.get(self.handle.withdraw.remote(round_index, sites))

    def expect(self, round_index: int, sites: list[str]) -> None:
        ray.get(self.handle.expect.remote(round_index, sites))

    def round_status(self, round_index: int) -> dict[str, Any]:
        return ray.get(self.handle.round_status.remote(round_index))

    def state(self) -> dict[str, Any]:
        return ray.get(self.handle.state.remote())

    def state_later(self) -> Callable[[], dict[str, Any]]:
        """The state of now, fetched when the returned function is called (the request is sent
        here and the actor serves it before any later change; the caller goes on meanwhile)."""
        ref = self.handle.state.remote()
        return lambda: ray.get(ref)

    def global_snapshot(self) -> Any:
        """A reference to the current ``(version, params)``, for the evaluator (no wait)."""
        return self.handle.get_global.remote()
