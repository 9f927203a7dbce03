"""Scheduling policies: at each decision point, what every site should be doing.

A policy is a small class with one method, :meth:`Policy.decide`: given the time and what the
executor observes (site states, tokens trained), it returns an :class:`Intent` per site and the
latest time at which it wants to be asked again. The simulator and the Ray coordinator call the
same policy objects, so a policy tuned in simulation is exactly the policy that runs.

Executors own the physics: an ``OFF → TRAIN`` intent starts provisioning (``provisioning_s``),
then the worker group; ``TRAIN → OFF`` drains the site at the next step boundary.

Built-ins: ``threshold`` (the prior system: train whenever the calendar window is open) and
``always_on`` (centralized and always-on federated baselines) live here; ``forecast``
(:mod:`curtail.planning.forecast_policy`: pre-provisions from honest forecasts), ``budget``
(:mod:`curtail.planning.budget`: cleanest windows for a token budget and deadline), ``mpc``
(:mod:`curtail.planning.mpc_policy`: re-plans the budget over forecasts and the past's days at
every decision) and the perfect-foresight ``oracle`` (:mod:`curtail.planning.oracle`: a bound,
not a runnable policy) live beside it and register on first use. A policy is built from its
validated config (:func:`make_policy`; the config models, their defaults and the list of kinds
live in :mod:`curtail.config`). New policies subclass :class:`Policy` and register with
:func:`register_policy`.
"""

from __future__ import annotations

import enum
import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import BaseModel

from curtail.config import (
    POLICY_CONFIGS,
    CurtailmentRules,
    ExecutionConfig,
    PolicyConfig,
    SiteConfig,
)
from curtail.planning.forecast import IssuedForecasts
from curtail.planning.live_calendar import LiveCalendar
from curtail.planning.signals import Signal
from curtail.planning.windows import CurtailmentCalendar


class Intent(enum.StrEnum):
    OFF = "off"  # release the site's nodes
    STANDBY = "standby"  # keep nodes provisioned, do not train (pre-provisioning)
    TRAIN = "train"


class SiteState(enum.StrEnum):
    """What a site is physically doing (the executor's state, not the policy's wish)."""

    OFF = "off"
    PROVISIONING = "provisioning"
    STARTING = "starting"  # worker group starting on ready nodes
    WAITING = "waiting"  # ready, not training (standby, or waiting for the next round)
    TRAINING = "training"
    SYNCING = "syncing"

    @property
    def provisioned(self) -> bool:
        return self is not SiteState.OFF


@dataclass(frozen=True)
class Observation:
    """What the executor tells the policy at a decision point."""

    now_s: float
    site_states: Mapping[str, SiteState]
    tokens_trained: float
    token_budget: float

    @property
    def tokens_remaining(self) -> float:
        return max(0.0, self.token_budget - self.tokens_trained)


@dataclass(frozen=True)
class Decision:
    intents: Mapping[str, Intent]
    next_decision_s: float = math.inf  # ask again by then at the latest (executors also ask on events)


@dataclass(frozen=True)
class PolicyContext:
    """Everything a policy may consult. Signals are the truth: honest policies read them only
    up to ``now`` (or through forecasts); the oracle is the exception that proves the bound."""

    sites: Mapping[str, SiteConfig]
    signals: Mapping[str, Signal]  # by site
    calendar: CurtailmentCalendar | LiveCalendar  # live: known up to now only (threshold, always_on)
    rules: CurtailmentRules
    execution: ExecutionConfig
    start_s: float
    deadline_s: float
    token_budget: float
    forecasts: Mapping[str, IssuedForecasts] = field(default_factory=dict)  # by site (live: arriving)


class Policy(ABC):
    """Base class: decide every site's intent at ``now_s``.

    ``config`` is the policy's validated config model (``kind`` equal to the policy's); left
    out, the model's defaults (:data:`curtail.config.POLICY_CONFIGS`).
    """

    kind: ClassVar[str]

    def __init__(self, context: PolicyContext, config: BaseModel | None = None):
        if config is None:
            if self.kind not in POLICY_CONFIGS:
                raise TypeError(f"policy {self.kind!r} has no config model in curtail.config; pass its config")
            config = POLICY_CONFIGS[self.kind]()
        if getattr(config, "kind", None) != self.kind:
            raise TypeError(f"policy {self.kind!r} was given the config of {getattr(config, 'kind', config)!r}")
        self.context = context
        self.config = config

    @abstractmethod
    def decide(self, now_s: float, observation: Observation) -> Decision:
        """Intents for every site at ``now_s`` (UTC epoch seconds)."""


class ThresholdPolicy(Policy):
    """The prior system: a site trains exactly while its calendar window is open."""

    kind = "threshold"

    def decide(self, now_s: float, observation: Observation) -> Decision:
        calendar = self.context.calendar
        intents = {
            site: Intent.TRAIN if calendar.window_at(site, now_s) is not None else Intent.OFF
            for site in self.context.sites
        }
        next_change = calendar.next_change_after(now_s)
        return Decision(intents, next_change if next_change is not None else math.inf)


class AlwaysOnPolicy(Policy):
    """Every site trains from the start, whatever the grid (the baselines)."""

    kind = "always_on"

    def decide(self, now_s: float, observation: Observation) -> Decision:
        return Decision({site: Intent.TRAIN for site in self.context.sites})


_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator making a policy available by its ``kind`` in configs."""
    _REGISTRY[cls.kind] = cls
    return cls


for _builtin in (ThresholdPolicy, AlwaysOnPolicy):
    register_policy(_builtin)

_BUILTIN_MODULES = (
    "curtail.planning.forecast_policy",
    "curtail.planning.budget",
    "curtail.planning.mpc_policy",
    "curtail.planning.oracle",
)
"""Modules whose policies register themselves when imported (they import this module)."""


def registered_policies() -> dict[str, type[Policy]]:
    """Every known policy kind, built-ins included."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


def make_policy(config: PolicyConfig, context: PolicyContext) -> Policy:
    """The policy ``config`` describes (e.g. ``BudgetPolicyConfig(max_ci_g_per_kwh=40)``), for ``context``."""
    registry = registered_policies()
    if config.kind not in registry:
        raise ValueError(f"unknown policy kind {config.kind!r}; known: {sorted(registry)}")
    return registry[config.kind](context, config)
