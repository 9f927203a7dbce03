"""A recorded trace served as the WattTime v3 API, on an accelerated clock: the live path on one machine.

:class:`TraceServer` answers the endpoints :class:`~curtail.sources.watttime.WattTimeSource`
calls — ``/login``, ``/v3/forecast``, ``/v3/signal-index``, ``/v3/historical`` and
``/v3/forecast/historical`` — with the JSON shapes of the real API, from a trace loaded by
:func:`curtail.planning.traces.load_trace` (and, optionally, a forecast loaded by
``load_forecast``). Values go out in ``lbs_co2_per_mwh`` as WattTime's do, so the client's unit
conversion is exercised too.

Its clock runs ``speedup`` times faster than the wall::

    trace_now_s = start_s + (wall_now - wall_at_start) * speedup

and it never answers past ``trace_now_s``: ``/v3/historical`` stops at the newest sample at or
before it, ``/v3/forecast`` starts with that sample (WattTime's "now" value) followed only by a
recorded forecast issued at or before ``trace_now_s``. After the trace ends its last sample holds.

A test server: ``/login`` accepts any username and password (HTTP basic auth) and hands out a
random bearer token; the data endpoints still refuse a missing or unknown token (401), and
tokens expire after ``token_lifetime_s`` wall seconds, as WattTime's do after 30 minutes.

Example::

    from curtail.sources.trace_server import TraceServer
    from curtail.sources.watttime import WattTimeSource

    with TraceServer.from_csv("data/traces/watttime_moer_2026-01-11_4regions.csv", speedup=600) as server:
        source = WattTimeSource(base_url=server.url)   # WATTTIME_USER / WATTTIME_PASSWORD: anything
        source.latest("CAISO_NORTH")                   # the sample in force at server.now_s()

Command line (prints the URL, serves until interrupted)::

    python -m curtail.sources.trace_server data/traces/watttime_moer_2026-01-11_4regions.csv --speedup 600 --port 0
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import numpy as np

from curtail.planning.signals import Signal
from curtail.planning.traces import LBS_PER_MWH_TO_G_PER_KWH, Forecast, load_trace

SIGNAL_TYPE = "co2_moer"
UNITS = "lbs_co2_per_mwh"
SIGNAL_INDEX_WINDOW_S = 30 * 24 * 3600  # the signal index ranks "now" among this trailing span
HOST = "127.0.0.1"


class _Refusal(Exception):
    """An HTTP error answer: ``status`` and a WattTime-style ``{"error": message}`` body."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(message)


def _stamp(t_s: float) -> str:
    return datetime.fromtimestamp(float(t_s), tz=UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def _instant(query: Mapping[str, str], key: str) -> float:
    if key not in query:
        raise _Refusal(400, f"missing query parameter {key!r}")
    try:
        stamp = datetime.fromisoformat(query[key])
    except ValueError:
        raise _Refusal(400, f"{key}={query[key]!r} is not an ISO-8601 instant") from None
    if stamp.tzinfo is None:
        raise _Refusal(400, f"{key}={query[key]!r} has no time zone")
    return stamp.timestamp()


class TraceServer:
    """Serve ``signals`` (region -> :class:`Signal`, gCO2/kWh) as WattTime v3 at ``speedup`` × the wall.

    Args:
        signals: the regions served, by WattTime region name (looked up case-insensitively).
        speedup: trace seconds per wall second (> 0).
        start_s: trace time (UTC epoch s) when the server starts; default the earliest sample.
        forecasts: optional recorded forecasts by region (``load_forecast``'s type, gCO2/kWh).
        port: 0 picks a free port on 127.0.0.1.
        token_lifetime_s: wall seconds a login token is accepted.
        clock: the wall clock (seconds, monotonic); injectable so tests step it.

    Use as a context manager (``with TraceServer(...) as server``) or ``start()`` / ``stop()``.
    ``logins`` counts successful logins; ``requests`` lists ``(path, trace_now_s)`` per request.
    """

    def __init__(
        self,
        signals: Mapping[str, Signal],
        *,
        speedup: float = 600.0,
        start_s: float | None = None,
        forecasts: Mapping[str, Forecast] | None = None,
        port: int = 0,
        token_lifetime_s: float = 30 * 60,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not signals:
            raise ValueError("no signals to serve; load a trace with at least one region")
        if not speedup > 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        self.signals = {region.upper(): signal for region, signal in signals.items()}
        self.forecasts = {region.upper(): f for region, f in (forecasts or {}).items()}
        unknown = sorted(set(self.forecasts) - set(self.signals))
        if unknown:
            raise ValueError(
                f"forecasts for {unknown} have no trace; served: {sorted(self.signals)}"
            )
        self.speedup = float(speedup)
        self.start_s = (
            min(s.start_s for s in self.signals.values()) if start_s is None else float(start_s)
        )
        self.token_lifetime_s = token_lifetime_s
        self.clock = clock
        self.logins = 0
        self.requests: list[tuple[str, float]] = []
        self._tokens: dict[str, float] = {}  # token -> wall time it expires
        self._lock = threading.Lock()
        self._wall_at_start: float | None = None
        self._port = port
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        *,
        naive_timezone: str | None = None,
        forecast_path: str | Path | None = None,
        forecast_region: str | None = None,
        **options: Any,
    ) -> TraceServer:
        """Serve a trace CSV (``[[traces]]`` layout, gCO2/kWh), optionally with a forecast CSV."""
        from curtail.config import ForecastSource, TraceSource
        from curtail.planning.traces import load_forecast

        signals = load_trace(TraceSource(path=Path(path), naive_timezone=naive_timezone)).signals
        forecasts = {}
        if forecast_path is not None:
            if forecast_region is None:
                if len(signals) != 1:
                    raise ValueError(
                        f"{path} has regions {sorted(signals)}: name the forecast's with forecast_region"
                    )
                forecast_region = next(iter(signals))
            forecasts[forecast_region] = load_forecast(
                ForecastSource(
                    path=Path(forecast_path), region=forecast_region, naive_timezone=naive_timezone
                )
            )
        return cls(signals, forecasts=forecasts, **options)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._http is None:
            raise RuntimeError("the trace server is not running; call start() first")
        return f"http://{HOST}:{self._http.server_address[1]}"

    def start(self) -> TraceServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._handle(self)

            def log_message(self, *args: object) -> None:
                pass  # requests are in server.requests; never log headers

        self._http = ThreadingHTTPServer((HOST, self._port), Handler)
        self._http.daemon_threads = True
        self._wall_at_start = self.clock()
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.05,), name="trace-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def now_s(self) -> float:
        """The server's trace time (UTC epoch seconds): it answers nothing after it."""
        if self._wall_at_start is None:
            return self.start_s
        return self.start_s + (self.clock() - self._wall_at_start) * self.speedup

    # ------------------------------------------------------------------ HTTP

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(request.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        now_s = self.now_s()
        with self._lock:
            self.requests.append((url.path, now_s))
        routes: dict[str, Callable[[Mapping[str, str], float], dict[str, Any]]] = {
            "/v3/forecast": self._forecast,
            "/v3/signal-index": self._signal_index,
            "/v3/historical": self._historical,
            "/v3/forecast/historical": self._forecast_historical,
        }
        try:
            authorization = request.headers.get("Authorization", "")
            if url.path == "/login":
                body: dict[str, Any] = self._login(authorization)
            elif url.path in routes:
                self._check_token(authorization)
                body = routes[url.path](query, now_s)
            else:
                raise _Refusal(404, f"no endpoint {url.path}; served: /login, {', '.join(routes)}")
            status = 200
        except _Refusal as refusal:
            status, body = refusal.status, {"error": refusal.message}
        data = json.dumps(body).encode()
        try:
            request.send_response(status)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first

    def _login(self, authorization: str) -> dict[str, str]:
        scheme, _, encoded = authorization.partition(" ")
        try:
            user, colon, _ = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            colon, user = "", ""
        if scheme != "Basic" or not colon or not user:
            raise _Refusal(401, "log in with HTTP basic auth (any username and password)")
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = self.clock() + self.token_lifetime_s
            self.logins += 1
        return {"token": token}

    def _check_token(self, authorization: str) -> None:
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            expires = self._tokens.get(token) if scheme == "Bearer" else None
        if expires is None:
            raise _Refusal(401, "missing or unknown bearer token; GET /login first")
        if self.clock() >= expires:
            raise _Refusal(401, "the token has expired; GET /login again")

    def _signal(self, query: Mapping[str, str]) -> tuple[str, Signal]:
        if query.get("signal_type", SIGNAL_TYPE) != SIGNAL_TYPE:
            raise _Refusal(
                400, f"signal_type {query['signal_type']!r}: only {SIGNAL_TYPE} is served"
            )
        region = query.get("region", "")
        if region.upper() not in self.signals:
            raise _Refusal(400, f"unknown region {region!r}; served: {sorted(self.signals)}")
        return region.upper(), self.signals[region.upper()]

    def _meta(self, region: str, signal: Signal, **extra: Any) -> dict[str, Any]:
        return {
            "data_point_period_seconds": int(signal.resolution_s),
            "region": region,
            "signal_type": SIGNAL_TYPE,
            "units": UNITS,
            "warnings": [],
            "model": {"date": "trace-server"},
            **extra,
        }

    @staticmethod
    def _point(t_s: float, ci_g_per_kwh: float) -> dict[str, Any]:
        return {"point_time": _stamp(t_s), "value": float(ci_g_per_kwh) / LBS_PER_MWH_TO_G_PER_KWH}

    @staticmethod
    def _current(signal: Signal, now_s: float) -> int:
        index = int(np.searchsorted(signal.times_s, now_s, side="right")) - 1
        if index < 0:
            raise _Refusal(404, f"no data yet: the trace starts at {_stamp(signal.start_s)}")
        return index

    def _forecast(self, query: Mapping[str, str], now_s: float) -> dict[str, Any]:
        region, signal = self._signal(query)
        index = self._current(signal, now_s)
        t_s = float(signal.times_s[index])
        points = [self._point(t_s, signal.ci_g_per_kwh[index])]
        horizon_s = float(query.get("horizon_hours", 24)) * 3600
        issued = self.forecasts[region].latest(now_s) if region in self.forecasts else None
        if issued is not None:
            targets, values = issued
            ahead = (targets > t_s) & (targets <= t_s + horizon_s)
            points += [self._point(t, v) for t, v in zip(targets[ahead], values[ahead])]
        return {
            "data": points,
            "meta": self._meta(
                region,
                signal,
                generated_at=_stamp(t_s),
                generated_at_period_seconds=int(signal.resolution_s),
            ),
        }

    def _signal_index(self, query: Mapping[str, str], now_s: float) -> dict[str, Any]:
        region, signal = self._signal(query)
        index = self._current(signal, now_s)
        t_s = float(signal.times_s[index])
        first = int(np.searchsorted(signal.times_s, t_s - SIGNAL_INDEX_WINDOW_S, side="right"))
        recent = signal.ci_g_per_kwh[first : index + 1]
        percentile = 100.0 * float(np.mean(recent < signal.ci_g_per_kwh[index]))
        return {
            "data": [{"point_time": _stamp(t_s), "value": percentile}],
            "meta": {**self._meta(region, signal), "units": "percentile"},
        }

    def _historical(self, query: Mapping[str, str], now_s: float) -> dict[str, Any]:
        region, signal = self._signal(query)
        start_s, end_s = _instant(query, "start"), _instant(query, "end")
        times = signal.times_s
        keep = (times >= start_s) & (times <= min(end_s, now_s))
        return {
            "data": [self._point(t, v) for t, v in zip(times[keep], signal.ci_g_per_kwh[keep])],
            "meta": self._meta(region, signal),
        }

    def _forecast_historical(self, query: Mapping[str, str], now_s: float) -> dict[str, Any]:
        region, signal = self._signal(query)
        if region not in self.forecasts:
            raise _Refusal(404, f"no recorded forecasts for region {region!r}")
        forecast = self.forecasts[region]
        start_s, end_s = _instant(query, "start"), _instant(query, "end")
        horizon_s = float(query.get("horizon_hours", 24)) * 3600
        issues = []
        for i, request_s in enumerate(forecast.request_s):
            if not start_s <= request_s <= min(end_s, now_s):
                continue
            rows = slice(forecast.offsets[i], forecast.offsets[i + 1])
            targets, values = forecast.target_s[rows], forecast.ci_g_per_kwh[rows]
            ahead = targets <= request_s + horizon_s
            issues.append(
                {
                    "generated_at": _stamp(request_s),
                    "forecast": [self._point(t, v) for t, v in zip(targets[ahead], values[ahead])],
                }
            )
        return {"data": issues, "meta": self._meta(region, signal)}


def main(argv: list[str] | None = None) -> None:
    """``python -m curtail.sources.trace_server TRACE [--speedup N] [--port P]``: serve until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m curtail.sources.trace_server",
        description="Serve a recorded trace as the WattTime v3 API (a test server: any credentials).",
    )
    parser.add_argument("trace", type=Path, help="trace CSV (gCO2/kWh, one column per region)")
    parser.add_argument(
        "--speedup", type=float, default=600.0, help="trace seconds per wall second"
    )
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--start", help="trace instant to start at (ISO-8601 with zone)")
    parser.add_argument("--naive-timezone", help="zone of naive timestamps in the files, e.g. UTC")
    parser.add_argument(
        "--forecast", type=Path, help="recorded forecast CSV (request_time, forecast_time, value)"
    )
    parser.add_argument("--forecast-region", help="the trace region the forecast is for")
    args = parser.parse_args(argv)
    try:
        start_s = _instant({"start": args.start}, "start") if args.start else None
    except _Refusal as refusal:
        parser.error(refusal.message)
    server = TraceServer.from_csv(
        args.trace,
        naive_timezone=args.naive_timezone,
        forecast_path=args.forecast,
        forecast_region=args.forecast_region,
        speedup=args.speedup,
        port=args.port,
        start_s=start_s,
    )
    with server:
        print(
            f"{server.url}  serving {sorted(server.signals)} from {_stamp(server.start_s)} "
            f"at {server.speedup:g}x (WATTTIME_USER / WATTTIME_PASSWORD: any value)",
            flush=True,
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
