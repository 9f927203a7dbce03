"""Shared helpers for the planning tests: hand-made signals, CSVs, contexts and simulations.

Kept out of ``conftest.py`` on purpose (that file belongs to the Ray fixtures); import what you
need with ``from planning_fixtures import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from curtail.config import POLICY_CONFIGS, CurtailmentRules, ExecutionConfig, SiteConfig
from curtail.planning.energy import PowerModel
from curtail.planning.policy import PolicyContext, make_policy
from curtail.planning.signals import Signal
from curtail.planning.simulator import Simulator
from curtail.planning.summary import summarize
from curtail.planning.trajectory import Trajectory
from curtail.planning.windows import CurtailmentCalendar

REPO = Path(__file__).resolve().parent.parent
TRACES = REPO / "data" / "traces"
PAPER_TOML = REPO / "experiments" / "paper.toml"

T0_S = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
"""A round UTC instant (2026-01-01T00:00:00Z) where hand-made traces start."""

STEP_S = 300.0
"""Hand-made traces are 5-minute traces, like WattTime MOER."""

LOW = 50.0  # gCO2/kWh: curtailed under the default 100 g/kWh threshold
HIGH = 400.0  # gCO2/kWh: gas on the margin

TRAINING_W = 2024.0
IDLE_W = 468.0
RATE = 1000.0  # tokens/s of every hand-made site


def at(minutes: float) -> float:
    """UTC epoch seconds ``minutes`` after :data:`T0_S`."""
    return T0_S + 60.0 * minutes


def make_signal(
    values: Sequence[float], *, region: str = "R", start_s: float = T0_S, step_s: float = STEP_S
) -> Signal:
    values = np.asarray(values, dtype=float)
    times = start_s + step_s * np.arange(len(values))
    return Signal(region, times, values, step_s, "marginal", f"<{region}>")


def pattern(spec: str) -> list[float]:
    """A trace from a string, one 5-minute sample per character: ``L`` low, ``H`` high,
    ``T`` exactly at the 100 g/kWh threshold."""
    table = {"L": LOW, "H": HIGH, "T": 100.0}
    return [table[c] for c in spec if not c.isspace()]


def site(tokens_per_s: float = RATE, region: str = "R") -> SiteConfig:
    return SiteConfig(
        region=region, training_power_w=TRAINING_W, idle_power_w=IDLE_W, tokens_per_s=tokens_per_s
    )


def make_context(
    traces: Mapping[str, Sequence[float] | Signal],
    *,
    rules: CurtailmentRules | None = None,
    execution: ExecutionConfig | None = None,
    token_budget: float = 1e15,
    start_s: float | None = None,
    deadline_s: float | None = None,
    rates: Mapping[str, float] | None = None,
) -> PolicyContext:
    """A policy context of hand-made sites (one region per site, named after the site)."""
    signals = {
        name: trace if isinstance(trace, Signal) else make_signal(trace, region=name)
        for name, trace in traces.items()
    }
    rules = rules or CurtailmentRules()
    rates = rates or {}
    return PolicyContext(
        sites={name: site(rates.get(name, RATE), name) for name in signals},
        signals=signals,
        calendar=CurtailmentCalendar(signals, rules),
        rules=rules,
        execution=execution or ExecutionConfig(),
        start_s=start_s if start_s is not None else max(s.start_s for s in signals.values()),
        deadline_s=deadline_s if deadline_s is not None else min(s.end_s for s in signals.values()),
        token_budget=token_budget,
    )


def simulate(context: PolicyContext, policy: str = "threshold") -> Trajectory:
    return Simulator(context, make_policy(POLICY_CONFIGS[policy](), context)).run()


def power_of(context: PolicyContext) -> dict[str, PowerModel]:
    return {name: PowerModel.of_site(cfg) for name, cfg in context.sites.items()}


def summary_of(context: PolicyContext, trajectory: Trajectory, policy: str = "threshold") -> dict:
    return summarize(
        trajectory,
        run="test",
        policy=policy,
        regions={name: cfg.region for name, cfg in context.sites.items()},
        power=power_of(context),
        signals=context.signals,
        calendar=context.calendar,
        token_budget=context.token_budget,
        executor="simulator",
    )


def seconds_in(trajectory: Trajectory, site_name: str, state) -> float:
    return sum(i.duration_s for i in trajectory.intervals_of(site_name) if i.state is state)


def isclose(a: float, b: float, rel: float = 1e-9, abs_: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)
