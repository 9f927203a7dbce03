"""Carbon signals from live APIs and files behind one interface (no torch, no ray).

- ``base.py``             the :class:`CarbonSource` seam, :class:`Reading`, typed errors,
                          :class:`Secret`, :class:`TraceFileSource`, ``write_trace_csv``
- ``http.py``             JSON over HTTP (standard library) with timeouts and scrubbed errors
- ``watttime.py``         WattTime API v3: MOER latest / forecast / history, signal index
- ``electricitymaps.py``  Electricity Maps API v3: average intensity latest / forecast / past range
- ``vessim.py``           a Vessim software-in-the-loop HTTP API
- ``poller.py``           :class:`RealtimePoller`: cache, typed events, fallback
- ``trace_server.py``     a recorded trace served as WattTime v3 on an accelerated clock (tests, demos)

Every source returns the planning layer's own types (:class:`~curtail.planning.signals.Signal`,
:class:`~curtail.planning.traces.Forecast`) in gCO2/kWh and UTC, like the file loaders::

    from curtail.sources import RealtimePoller, TraceFileSource, WattTimeSource

    live = WattTimeSource()                       # WATTTIME_USER / WATTTIME_PASSWORD from the env
    backup = TraceFileSource.from_csv("data/traces/watttime_moer_2026-01-11_4regions.csv")
    poller = RealtimePoller(live, ["CAISO_NORTH"], fallback=backup).start(interval_s=10)
    poller.read("CAISO_NORTH")                    # fresh, cached, stale or fallback — never a crash
"""

from __future__ import annotations

from curtail.sources.base import (
    CarbonSource,
    Reading,
    Secret,
    SignalIndex,
    SourceAuthError,
    SourceDataError,
    SourceError,
    SourceRequestError,
    SourceUnavailable,
    TraceFileSource,
    write_trace_csv,
)
from curtail.sources.electricitymaps import ElectricityMapsSource
from curtail.sources.poller import RealtimePoller, SignalLost, SourceEvent
from curtail.sources.vessim import VessimHttpSource
from curtail.sources.watttime import WattTimeSource

__all__ = [
    "CarbonSource",
    "ElectricityMapsSource",
    "Reading",
    "RealtimePoller",
    "Secret",
    "SignalIndex",
    "SignalLost",
    "SourceAuthError",
    "SourceDataError",
    "SourceError",
    "SourceEvent",
    "SourceRequestError",
    "SourceUnavailable",
    "TraceFileSource",
    "VessimHttpSource",
    "WattTimeSource",
    "write_trace_csv",
]
