"""The perfect-foresight oracle: the least carbon any schedule can spend on a token budget.

Not a runnable policy: it reads the true future signal. It is the bound every comparison
shows beside the policies.

**The bound** (:func:`emissions_lower_bound_kg`). Any run trains its tokens at ``tokens_per_s``
per training site-second, with at most one stretch per site at a time, inside
``[start, deadline]``, drawing at least ``training_power_w`` while it trains (idle power and
carbon intensity are never negative). Its emissions are therefore at least those of the
cheapest set of training site-seconds that yields the same tokens: cut every site's signal
into its constant pieces, sort all pieces by carbon per token
(``training_power_w · ci / tokens_per_s``) and take them greedily, the last one in part. This
is exact for the relaxation (a fractional knapsack) and ignores every overhead, so no policy
— and no oracle run — can emit less for the same tokens. ``tests/test_oracle.py`` checks it
against every policy on random traces.

**The windows-only bound** (:func:`windows_only_bound`). The same greedy choice among the
pieces where the site is *curtailed* (its signal below the threshold in force: the calendar's
``curtailed``, which is also what ``share_energy_in_windows`` counts as inside windows). No run
that draws all its training energy inside windows can emit less for the same tokens: it is the
curtailment bound. The unconstrained bound is no such thing on average-intensity traces with
percentile curtailment, where it trains wherever intensity is lowest, windows or not. When the
windows cannot hold the tokens the bound is ``None``, and :class:`Bound` says how many they hold.
:func:`emission_bounds` gives both for a run's budget; the run's ``summary.json`` carries them
(:meth:`EmissionBounds.summary`) and ``curtail simulate`` prints them.

**The oracle run** (``kind = "oracle"``). The same greedy choice, re-planned at every piece
boundary for the tokens still missing (so sync pauses and start-ups are made up in the next
cheapest pieces), executed by the shared executor with its real overheads: a site trains in
its chosen pieces, idles (``STANDBY``) through gaps shorter than its start-up, and is
provisioned ahead of a chosen piece when idling through the grid's intensity before it costs
less than provisioning inside the piece and buying the lost tokens at the marginal price.
It plans to finish 10 µs before the deadline (instants near 1.7e9 s are ~0.2 µs apart, and a
budget completed in the executor's last microsecond counts as missed); with zero overheads the
run meets the bound to within that reserve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from curtail.config import OraclePolicyConfig
from curtail.planning.policy import (
    Decision,
    Intent,
    Observation,
    Policy,
    PolicyContext,
    SiteState,
    register_policy,
)

_EPS_S = 1e-6
_DEADLINE_MARGIN_S = 1e-5
_WS_PER_KWH = 3.6e6


@dataclass(frozen=True)
class Pieces:
    """Every site's constant-intensity pieces in a span, sorted by carbon per token, then time."""

    sites: tuple[str, ...]
    site_index: np.ndarray  # into sites
    start_s: np.ndarray
    end_s: np.ndarray
    ci_g_per_kwh: np.ndarray
    tokens_per_s: np.ndarray
    g_per_token: np.ndarray

    @property
    def tokens(self) -> np.ndarray:
        return self.tokens_per_s * (self.end_s - self.start_s)


def cheapest_pieces(
    context: PolicyContext,
    start_s: float | None = None,
    end_s: float | None = None,
    *,
    windows_only: bool = False,
    training_power_w: Mapping[str, float] | None = None,
) -> Pieces:
    """All sites' pieces in ``[start_s, end_s]`` (default: the run's span), cheapest first.

    ``windows_only`` keeps only the pieces where the site is curtailed (the calendar's
    ``curtailed``); ``training_power_w`` (by site) replaces the sites' configured training
    power, e.g. with a real run's measured power.
    """
    start_s = context.start_s if start_s is None else start_s
    end_s = context.deadline_s if end_s is None else end_s
    sites = tuple(context.sites)
    columns: list[list[np.ndarray]] = [[], [], [], [], [], []]
    for index, site in enumerate(sites):
        cfg, signal = context.sites[site], context.signals[site]
        times_s = signal.times_s
        if windows_only:
            times_s = np.union1d(times_s, context.calendar.curtailed(site).times_s)
        inner = times_s[(times_s > start_s) & (times_s < end_s)]
        edges = np.concatenate(([start_s], inner, [end_s]))
        starts, ends = edges[:-1], edges[1:]
        keep = ends > starts
        if windows_only:
            keep &= np.asarray(context.calendar.curtailed(site).value_at(starts)) > 0.5
        starts, ends = starts[keep], ends[keep]
        ci = np.asarray(signal.step.value_at(starts), dtype=float)
        power_w = cfg.site_training_power_w if training_power_w is None else training_power_w[site]
        g_per_token = power_w * ci / (_WS_PER_KWH * cfg.tokens_per_s)
        for column, values in zip(
            columns,
            (
                np.full(len(starts), index),
                starts,
                ends,
                ci,
                np.full(len(starts), cfg.tokens_per_s),
                g_per_token,
            ),
        ):
            column.append(values)
    site_index, starts, ends, ci, rates, cost = (np.concatenate(c) for c in columns)
    order = np.lexsort((site_index, starts, cost))
    return Pieces(
        sites, site_index[order], starts[order], ends[order], ci[order], rates[order], cost[order]
    )


def _greedy_kg(pieces: Pieces, tokens: float) -> float:
    """Emissions (kg) of ``tokens`` taken from ``pieces`` in order, the last one in part (or
    of all of them, if they hold fewer)."""
    cumulative = np.cumsum(pieces.tokens)
    full = int(np.searchsorted(cumulative, tokens, side="left"))
    grams = float(np.sum(pieces.tokens[:full] * pieces.g_per_token[:full]))
    if full < len(cumulative):
        taken = tokens - (cumulative[full - 1] if full > 0 else 0.0)
        grams += taken * float(pieces.g_per_token[full])
    return float(grams) / 1000.0


def emissions_lower_bound_kg(
    context: PolicyContext,
    tokens: float | None = None,
    *,
    start_s: float | None = None,
    end_s: float | None = None,
) -> float:
    """The least training emissions (kg) of ``tokens`` (default: the budget) in the span.

    If the span cannot hold ``tokens`` even with every site training throughout, the bound is
    that of everything the span can hold.
    """
    tokens = context.token_budget if tokens is None else tokens
    return _greedy_kg(cheapest_pieces(context, start_s, end_s), tokens)


@dataclass(frozen=True)
class Bound:
    """A bound on the emissions of ``tokens`` in a run's span, over the pieces it may use.

    ``capacity_tokens`` is what those pieces hold with every site training through all of
    them; when it is less than ``tokens`` no such schedule trains the tokens and
    ``emissions_kg`` is None.
    """

    tokens: float
    capacity_tokens: float
    emissions_kg: float | None

    @property
    def holds_tokens(self) -> bool:
        return self.emissions_kg is not None


def _bound(pieces: Pieces, tokens: float) -> Bound:
    capacity = float(np.sum(pieces.tokens))
    # a budget that needs every last piece may exceed the float sum by a rounding error
    holds = capacity >= tokens * (1 - 1e-12)
    return Bound(tokens, capacity, _greedy_kg(pieces, tokens) if holds else None)


def windows_only_bound(
    context: PolicyContext,
    tokens: float | None = None,
    *,
    training_power_w: Mapping[str, float] | None = None,
) -> Bound:
    """The least training emissions of ``tokens`` (default: the budget) in ``[start, deadline]``
    training only while a site is curtailed (see the module doc): None, with the tokens the
    windows hold, when they cannot hold ``tokens``.

    >>> bound = windows_only_bound(context)
    >>> bound.emissions_kg if bound.holds_tokens else f"windows hold {bound.capacity_tokens:.3g} tokens"
    """
    tokens = context.token_budget if tokens is None else tokens
    pieces = cheapest_pieces(context, windows_only=True, training_power_w=training_power_w)
    return _bound(pieces, tokens)


@dataclass(frozen=True)
class EmissionBounds:
    """Both bounds on a run's token budget: ``unconstrained`` (any piece of the span) and
    ``windows_only`` (curtailed pieces only)."""

    unconstrained: Bound
    windows_only: Bound

    def summary(self, emissions_kg: float) -> dict[str, float | None]:
        """The ``summary.json`` keys of a run that emitted ``emissions_kg``.

        ``emissions_over_windows_only_bound`` is None where the bound is None or 0 (a ratio to
        a bound of ~0 says nothing: California has hours of zero MOER).
        """
        windows = self.windows_only.emissions_kg
        return {
            "emissions_bound_kg": self.unconstrained.emissions_kg,
            "emissions_bound_windows_only_kg": windows,
            "windows_only_capacity_tokens": self.windows_only.capacity_tokens,
            "emissions_over_windows_only_bound": emissions_kg / windows if windows else None,
        }


def emission_bounds(
    context: PolicyContext, *, training_power_w: Mapping[str, float] | None = None
) -> EmissionBounds:
    """Both bounds on ``context``'s token budget in ``[start, deadline]`` (``training_power_w``:
    see :func:`cheapest_pieces`)."""
    tokens = context.token_budget
    return EmissionBounds(
        unconstrained=_bound(cheapest_pieces(context, training_power_w=training_power_w), tokens),
        windows_only=windows_only_bound(context, tokens, training_power_w=training_power_w),
    )


class OraclePolicy(Policy):
    """Perfect foresight: train in the cheapest pieces for the tokens still missing."""

    kind = "oracle"

    def __init__(self, context: PolicyContext, config: OraclePolicyConfig | None = None):
        super().__init__(context, config)
        # the plan keeps the last 10 µs in reserve: a budget that needs every last piece would
        # otherwise complete in the executor's final microsecond, i.e. (in floats, ~0.2 µs
        # apart near 1.7e9 s) at the deadline, and count as missed; the reserve trains the
        # float dust a plan that ends there leaves (see decide)
        self.pieces = cheapest_pieces(context, end_s=context.deadline_s - _DEADLINE_MARGIN_S)
        self._reserve = cheapest_pieces(context)
        self.startup_s = context.rules.provisioning_s + context.execution.group_start_s
        self._boundaries = np.unique(np.concatenate((self.pieces.start_s, self.pieces.end_s)))

    def _plan(
        self, now_s: float, tokens_missing: float, pieces: Pieces
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """The chosen ``pieces`` from now on (mask, in their order), when to stop training in
        each (the marginal piece only in part), and the marginal price (g per token)."""
        begin_s = np.maximum(pieces.start_s, now_s)
        length_s = np.maximum(pieces.end_s - begin_s, 0.0)
        tokens = pieces.tokens_per_s * length_s
        cumulative = np.cumsum(tokens)
        last = int(np.searchsorted(cumulative, tokens_missing * (1 - 1e-12), side="left"))
        chosen = (np.arange(len(tokens)) <= last) & (length_s > 0)
        until_s = pieces.end_s.copy()
        if last < len(tokens):
            before = cumulative[last - 1] if last > 0 else 0.0
            partial_s = max(tokens_missing - before, 0.0) / pieces.tokens_per_s[last]
            # 10 µs more than needed (the executor stops the moment the budget is reached):
            # instants near 1.7e9 s resolve only ~0.2 µs, and the float dust a stop leaves
            # must not be left for a piece that ends at the deadline
            partial_s += 1e-5
            until_s[last] = min(begin_s[last] + partial_s, pieces.end_s[last])
        marginal = float(pieces.g_per_token[min(last, len(tokens) - 1)])
        return chosen, until_s, marginal

    def decide(self, now_s: float, observation: Observation) -> Decision:
        pieces = self.pieces
        left_s = pieces.end_s - np.maximum(pieces.start_s, now_s)
        capacity = float(np.sum(pieces.tokens_per_s * np.where(left_s > 2 * _EPS_S, left_s, 0.0)))
        if capacity < observation.tokens_remaining:  # only the reserve is left: float dust
            pieces = self._reserve
        chosen, until_s, marginal_g_per_token = self._plan(
            now_s, observation.tokens_remaining, pieces
        )
        index = int(np.searchsorted(self._boundaries, now_s + _EPS_S, side="right"))
        wake_s = float(self._boundaries[index]) if index < len(self._boundaries) else math.inf
        intents: dict[str, Intent] = {}
        for site_index, site in enumerate(pieces.sites):
            mine = chosen & (pieces.site_index == site_index)
            starts, ends = pieces.start_s[mine], until_s[mine]
            current = (starts <= now_s + _EPS_S) & (ends > now_s + _EPS_S)
            if np.any(current):
                intents[site] = Intent.TRAIN
                stop_s = float(ends[current].max())
                if stop_s < float(pieces.end_s[mine][current].max()):  # the marginal piece, in part
                    wake_s = min(wake_s, stop_s)
                continue
            later = starts[starts > now_s + _EPS_S]
            next_s = float(later.min()) if len(later) else math.inf
            provisioned = observation.site_states.get(site, SiteState.OFF) is not SiteState.OFF
            if next_s - now_s <= self.startup_s + _EPS_S and (
                provisioned or self._preprovision_pays(site, now_s, next_s, marginal_g_per_token)
            ):
                intents[site] = Intent.STANDBY
            else:
                intents[site] = Intent.OFF
                if (
                    not provisioned
                    and math.isfinite(next_s)
                    and next_s - self.startup_s > now_s + _EPS_S
                ):
                    wake_s = min(wake_s, next_s - self.startup_s)
        return Decision(intents, wake_s)

    def _preprovision_pays(
        self, site: str, now_s: float, opens_s: float, marginal_g_per_token: float
    ) -> bool:
        """Idling through the grid before ``opens_s`` vs provisioning inside the piece and
        buying the start-up's lost tokens at the marginal price."""
        cfg, signal = self.context.sites[site], self.context.signals[site]
        startup_s = self.startup_s
        before = signal.step.mean(opens_s - startup_s, opens_s)
        inside = signal.step.mean(opens_s, opens_s + startup_s)
        idle_kwh = cfg.site_idle_power_w * startup_s / _WS_PER_KWH
        lost_g = cfg.tokens_per_s * startup_s * marginal_g_per_token
        return idle_kwh * before <= idle_kwh * inside + lost_g


register_policy(OraclePolicy)
