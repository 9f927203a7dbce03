"""Discrete-event simulator: calendar × policy × throughput/overhead model → trajectory.

It runs the shared :class:`~curtail.planning.executor.Executor` state machine with a work
model in place of hardware: a training site trains ``tokens_per_s`` tokens every second.
Because time only jumps between events, a year of 5-minute data takes well under a second
(``experiments/bench_simulator.py``).
"""

from __future__ import annotations

from curtail.planning.executor import Executor, PolicyProtocolError, RoundView

__all__ = ["PolicyProtocolError", "Simulator"]


class Simulator(Executor):
    """Replay one run. ``Simulator(context, policy).run()`` returns a :class:`Trajectory`."""

    def work(self, sites: list[str], start_s: float, end_s: float, current: RoundView | None) -> dict[str, float]:
        return {name: self.sites[name].tokens_per_s * (end_s - start_s) for name in sites}
