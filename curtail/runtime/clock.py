"""The run's clock on real hardware: how much work fits a stretch of it, and when it is now.

Two modes (``training.clock``):

* ``virtual`` — every optimizer step at a site advances that site's time by the step time of
  the hardware it represents (``tokens_per_step / tokens_per_s``); a stretch of the run's
  clock holds a whole number of steps, the fractions carried to the next stretch. Runs are
  deterministic and as fast as the real hardware here allows.
* ``realtime`` — the run's clock follows the wall clock at ``realtime_speedup``; a site trains
  until the wall instant a stretch ends, and idle stretches are slept through.
"""

from __future__ import annotations

import math
import time
from typing import Any


class RunClock:
    def __init__(self, mode: str, speedup: float, start_s: float, step_s: dict[str, float]):
        if mode not in ("virtual", "realtime"):
            raise ValueError(f"clock {mode!r}: use 'virtual' or 'realtime'")
        self.mode = mode
        self.speedup = speedup
        self.start_s = start_s
        self.step_s = step_s  # run-clock seconds per step at each site (the represented hardware)
        self.carry_steps = dict.fromkeys(step_s, 0.0)
        self.step_wall_s = dict.fromkeys(step_s, 0.05)  # measured wall seconds per step (realtime)
        self.wall_start = time.time()

    @property
    def realtime(self) -> bool:
        return self.mode == "realtime"

    def start(self, at_s: float | None = None) -> None:
        """The run (or its resume) begins now on the wall clock, at run time ``at_s`` (default
        the run's start; a live run resumed after lost time: the instant it resumes at)."""
        if at_s is not None:
            self.start_s = at_s
        self.wall_start = time.time()

    def wall_at(self, t_s: float) -> float:
        """The wall-clock instant of run time ``t_s`` under the real-time clock."""
        return self.wall_start + (t_s - self.start_s) / self.speedup

    def until_wall(self, end_s: float) -> float | None:
        """The wall instant a site must stop training at (real-time clock only)."""
        return self.wall_at(end_s) if self.realtime else None

    def steps_for(self, site: str, start_s: float, end_s: float) -> int:
        """Steps ``site`` trains over ``[start_s, end_s)``: the represented hardware's (virtual),
        or generously more than the wall time allows (real-time: the site stops at the instant)."""
        if self.realtime:
            wall_s = max(0.0, self.wall_at(end_s) - time.time())
            return 1 + math.ceil(1.5 * wall_s / self.step_wall_s[site])
        carry = self.carry_steps[site] + (end_s - start_s) / self.step_s[site]
        steps = int(carry + 1e-9)
        self.carry_steps[site] = carry - steps
        return steps

    def observe(self, site: str, steps: int, wall_s: float) -> None:
        """A site took ``wall_s`` for ``steps`` steps (sizes the next real-time claim)."""
        if steps:
            self.step_wall_s[site] = wall_s / steps

    def reset(self, site: str) -> None:
        """A failed site starts its next window without carried fractions."""
        self.carry_steps[site] = 0.0

    def pass_time(self, start_s: float, end_s: float) -> None:
        """Nobody trains over ``[start_s, end_s)``: the real-time clock waits it out."""
        if self.realtime:
            time.sleep(max(0.0, self.wall_at(end_s) - time.time()))

    def state(self) -> dict[str, Any]:
        return {"carry_steps": dict(self.carry_steps)}

    def restore(self, saved: dict[str, Any]) -> None:
        self.carry_steps = {site: float(value) for site, value in saved["carry_steps"].items()}
