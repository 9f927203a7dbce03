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

Faults for tests of a live run's signal are scripted through ``server.faults`` (:class:`Faults`):
a burst of 5xx answers, slow answers, HTTP 429, refused logins and revoked tokens, each counted
in ``server.faults.served``; :meth:`TraceServer.stop` is a killed server (connections refused)
and :meth:`TraceServer.restart` brings it back on the same port.

Example::

    from curtail.sources.trace_server import TraceServer
    from curtail.sources.watttime import WattTimeSource

    with TraceServer.from_csv("data/traces/watttime_moer_2026-01-11_4regions.csv", speedup=600) as server:
        source = WattTimeSource(base_url=server.url)   # WATTTIME_USER / WATTTIME_PASSWORD: anything
        source.latest("CAISO_NORTH")                   # the sample in force at server.now_s()

Command line (prints the URL, serves until interrupted; ``--fail-first N`` and the other fault
options arm :class:`Faults` at start)::

    curtail serve-trace data/traces/watttime_moer_2026-01-11_4regions.csv --speedup 600 --port 0
    python -m curtail.sources.trace_server ...   # the same
"""

from __future__ import annotations

import argparse
import base64
import binascii
import errno
import json
import math
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import numpy as np

from curtail.errors import CurtailError
from curtail.planning.signals import Signal
from curtail.planning.traces import LBS_PER_MWH_TO_G_PER_KWH, Forecast, load_trace

SIGNAL_TYPE = "co2_moer"
UNITS = "lbs_co2_per_mwh"
SIGNAL_INDEX_WINDOW_S = 30 * 24 * 3600  # the signal index ranks "now" among this trailing span
HOST = "127.0.0.1"


class TraceServerError(CurtailError, ValueError):
    """The trace server cannot start as asked (an option, a forecast's region, a taken port)."""


class _Refusal(Exception):
    """An HTTP error answer: ``status``, a WattTime-style ``{"error": message}`` body, headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
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


# ------------------------------------------------------------------------------------ faults


@dataclass(frozen=True)
class FaultsServed:
    """How many requests each injected fault has answered so far (a snapshot)."""

    server_errors: int = 0  # data requests answered 5xx (fail_next)
    slow_answers: int = 0  # data answers held back (slow_next)
    rate_limited: int = 0  # data requests answered 429 (rate_limit_next)
    refused_logins: int = 0  # /login answered 401/403 (refuse_logins)
    revoked_tokens: int = 0  # data requests refused for a revoked token (revoke_tokens)

    @property
    def total(self) -> int:
        return (
            self.server_errors
            + self.slow_answers
            + self.rate_limited
            + self.refused_logins
            + self.revoked_tokens
        )


def _check_count(count: int, what: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{what}: count must be a whole number >= 1, got {count!r}")


class Faults:
    """Scripted failures of a :class:`TraceServer` (``server.faults``), armed while clients poll.

    The count-based faults apply to the next ``count`` *data* requests (the ``/v3/...``
    endpoints), in arrival order, then the server answers normally again; ``/login`` is touched
    only by :meth:`refuse_logins`. On one data request they apply in this order: the delay, then
    429, then 5xx, then the token check — as a gateway in front of the API answers before the
    API looks at the token. Every request a fault shapes is counted in :attr:`served`.

    Thread-safe: arm or clear from any thread while the handler threads consume the faults.

    Example::

        server.faults.fail_next(3)                 # the next 3 data requests: HTTP 503
        server.faults.slow_next(2, delay_s=2.0)    # ...held 2 s each (a client timeout < 2 s fires)
        server.faults.rate_limit_next(1, retry_after_s=60)
        server.faults.revoke_tokens()              # tokens handed out so far: 401
        server.faults.refuse_logins(status=403)    # /login: 403 until clear()
        server.faults.served.server_errors         # how many 5xx answers went out
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set to cut the current delays short (clear, stop)
        self._errors_left = 0
        self._error_status = 503
        self._slow_left: int | None = 0  # None: every data answer until clear()
        self._delay_s = 0.0
        self._rate_limited_left = 0
        self._retry_after_s: float | None = None
        self._login_status: int | None = None
        self._token_epoch = 0  # tokens issued in an earlier epoch were revoked
        self._served = FaultsServed()  # replaced, never mutated: a snapshot to hand out

    # -------------------------------------------------------------- arming (tests)

    def fail_next(self, count: int, *, status: int = 503) -> None:
        """Answer the next ``count`` data requests with HTTP ``status`` (500..599)."""
        _check_count(count, "fail_next")
        if not 500 <= status <= 599:
            raise ValueError(f"fail_next: status must be a 5xx server error, got {status}")
        with self._lock:
            self._errors_left, self._error_status = count, status

    def slow_next(self, count: int | None, *, delay_s: float) -> None:
        """Hold the next ``count`` data answers (``None``: every one until :meth:`clear`) ``delay_s``
        wall seconds before answering; a client whose timeout is shorter gives up first."""
        if count is not None:
            _check_count(count, "slow_next")
        if not (math.isfinite(delay_s) and delay_s > 0):
            raise ValueError(f"slow_next: delay_s must be > 0 seconds, got {delay_s!r}")
        with self._lock:
            self._slow_left, self._delay_s = count, float(delay_s)

    def rate_limit_next(self, count: int, *, retry_after_s: float | None = None) -> None:
        """Answer the next ``count`` data requests HTTP 429, with ``Retry-After`` if given."""
        _check_count(count, "rate_limit_next")
        if retry_after_s is not None and not (math.isfinite(retry_after_s) and retry_after_s >= 0):
            raise ValueError(f"rate_limit_next: retry_after_s must be >= 0, got {retry_after_s!r}")
        with self._lock:
            self._rate_limited_left, self._retry_after_s = count, retry_after_s

    def refuse_logins(self, *, status: int = 401) -> None:
        """Answer every ``/login`` with ``status`` (401 or 403) until :meth:`clear`. Tokens handed
        out before stay valid: add :meth:`revoke_tokens` to lock a client out at once."""
        if status not in (401, 403):
            raise ValueError(f"refuse_logins: status must be 401 or 403, got {status}")
        with self._lock:
            self._login_status = status

    def revoke_tokens(self) -> None:
        """Refuse (401) every token handed out so far, as after a server-side logout; a client
        logs in again (unless :meth:`refuse_logins` is armed). Not undone by :meth:`clear`."""
        with self._lock:
            self._token_epoch += 1

    def clear(self) -> None:
        """Disarm every fault (answers held back now go out at once); the counts stay."""
        with self._lock:
            self._errors_left = self._rate_limited_left = 0
            self._slow_left, self._login_status = 0, None
        self._wake_sleepers()

    @property
    def served(self) -> FaultsServed:
        """How many requests each fault has answered so far."""
        with self._lock:
            return self._served

    def __str__(self) -> str:
        with self._lock:
            armed = []
            if self._errors_left:
                armed.append(f"next {self._errors_left} data requests: HTTP {self._error_status}")
            if self._slow_left is None or self._slow_left:
                which = (
                    "every data answer"
                    if self._slow_left is None
                    else f"next {self._slow_left} data answers"
                )
                armed.append(f"{which}: held {self._delay_s:g} s")
            if self._rate_limited_left:
                armed.append(f"next {self._rate_limited_left} data requests: HTTP 429")
            if self._login_status is not None:
                armed.append(f"/login: HTTP {self._login_status}")
        return "; ".join(armed) or "none armed"

    # -------------------------------------------------------------- serving (handler threads)

    def _wake_sleepers(self) -> None:
        """End the delays now in progress; later ones wait on a fresh event."""
        with self._lock:
            self._wake.set()
            self._wake = threading.Event()

    def _hold(self) -> None:
        """Delay this data answer if a slow answer is armed."""
        with self._lock:
            if self._slow_left is not None and self._slow_left <= 0:
                return
            if self._slow_left is not None:
                self._slow_left -= 1
            self._served = replace(self._served, slow_answers=self._served.slow_answers + 1)
            delay_s, wake = self._delay_s, self._wake
        wake.wait(delay_s)

    def _refuse_data(self) -> None:
        """Raise the armed 429 or 5xx answer for this data request, if any."""
        with self._lock:
            if self._rate_limited_left > 0:
                self._rate_limited_left -= 1
                self._served = replace(self._served, rate_limited=self._served.rate_limited + 1)
                retry = self._retry_after_s
                raise _Refusal(
                    429,
                    "too many requests (injected fault)",
                    {} if retry is None else {"Retry-After": str(math.ceil(retry))},
                )
            if self._errors_left > 0:
                self._errors_left -= 1
                self._served = replace(self._served, server_errors=self._served.server_errors + 1)
                raise _Refusal(self._error_status, "service unavailable (injected fault)")

    def _refuse_login(self) -> None:
        with self._lock:
            if self._login_status is None:
                return
            self._served = replace(self._served, refused_logins=self._served.refused_logins + 1)
            raise _Refusal(self._login_status, "credentials refused (injected fault)")

    def _token_epoch_now(self) -> int:
        with self._lock:
            return self._token_epoch

    def _revoked(self, token_epoch: int) -> bool:
        """Whether a token issued in ``token_epoch`` was revoked (counted when it was)."""
        with self._lock:
            if token_epoch >= self._token_epoch:
                return False
            self._served = replace(self._served, revoked_tokens=self._served.revoked_tokens + 1)
            return True


# ------------------------------------------------------------------------------------ the server


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

    Use as a context manager (``with TraceServer(...) as server``) or ``start()`` / ``stop()``;
    after ``stop()`` connections are refused (a killed server) until ``restart()``.
    ``logins`` counts successful logins; ``requests`` lists ``(path, trace_now_s)`` per request;
    ``faults`` (:class:`Faults`) scripts failures.
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
            raise TraceServerError("no signals to serve; load a trace with at least one region")
        if not speedup > 0:
            raise TraceServerError(
                f"speedup must be > 0 trace seconds per wall second, got {speedup}"
            )
        self.signals = {region.upper(): signal for region, signal in signals.items()}
        self.forecasts = {region.upper(): f for region, f in (forecasts or {}).items()}
        unknown = sorted(set(self.forecasts) - set(self.signals))
        if unknown:
            raise TraceServerError(
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
        self.faults = Faults()
        self._tokens: dict[str, tuple[float, int]] = {}  # token -> (wall time it expires, epoch)
        self._lock = threading.Lock()
        self._wall_at_start: float | None = None
        self._port = port
        self._bound_port: int | None = None  # the port it serves on, kept for restart()
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        *,
        naive_timezone: str | None = None,
        forecast_path: str | Path | None = None,
        forecast_region: str | None = None,
        synthetic_forecast_seed: int | None = None,
        **options: Any,
    ) -> TraceServer:
        """Serve a trace CSV (``[[traces]]`` layout, gCO2/kWh), optionally with a forecast CSV,
        or (``synthetic_forecast_seed``) with forecasts the calibrated error model makes from the
        trace for every region (:func:`~curtail.planning.forecast.synthesize_forecast`: what a
        WattTime-like forecast of this trace would have said; the server knows the trace's future)."""
        from curtail.config import ForecastSource, TraceSource
        from curtail.planning.forecast import synthesize_forecast
        from curtail.planning.traces import load_forecast

        signals = load_trace(TraceSource(path=Path(path), naive_timezone=naive_timezone)).signals
        forecasts = {}
        if forecast_path is not None and synthetic_forecast_seed is not None:
            raise TraceServerError("serve recorded forecasts (forecast_path) or synthetic ones, not both")
        if synthetic_forecast_seed is not None:
            forecasts = {
                region: synthesize_forecast(signals[region], seed=synthetic_forecast_seed, site=region)
                for region in sorted(signals)
            }
        if forecast_path is not None:
            if forecast_region is None:
                if len(signals) != 1:
                    raise TraceServerError(
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
        """``http://127.0.0.1:PORT``; it stays the same after ``stop()`` and ``restart()``."""
        if self._bound_port is None:
            raise RuntimeError("the trace server has not started; call start() first")
        return f"http://{HOST}:{self._bound_port}"

    @property
    def running(self) -> bool:
        return self._http is not None

    def start(self) -> Self:
        """Serve on ``port`` (0: a free one) and start the clock at ``start_s``."""
        if self._http is not None:
            raise RuntimeError(f"the trace server is already running at {self.url}")
        self._wall_at_start = self.clock()
        self._serve(self._port)
        return self

    def stop(self) -> None:
        """Stop serving: new connections are refused at once, as from a killed server, and
        answers still held back by a slow-answer fault are dropped unanswered."""
        if self._http is None:
            return
        self._stopped.set()
        self.faults._wake_sleepers()
        self._http.shutdown()
        self._http.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._http = self._thread = None

    def restart(self) -> Self:
        """Serve again on the same port after :meth:`stop` (a killed API coming back). The
        trace clock kept running while it was down; tokens handed out before stay valid, as
        WattTime's signed tokens do (``faults.revoke_tokens()`` models a server that forgot them)."""
        if self._bound_port is None or self._wall_at_start is None:
            raise RuntimeError("the trace server never started; call start(), not restart()")
        self.stop()
        self._serve(self._bound_port)
        return self

    def _serve(self, port: int) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._handle(self)

            def log_message(self, *args: object) -> None:
                pass  # requests are in server.requests; never log headers

        try:
            http = ThreadingHTTPServer((HOST, port), Handler)
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise TraceServerError(
                f"port {port} on {HOST} is taken ({error.strerror}): pick another port, "
                "or 0 for a free one"
            ) from None
        http.daemon_threads = True
        self._http, self._bound_port = http, http.server_address[1]
        self._stopped.clear()
        self._thread = threading.Thread(
            target=http.serve_forever, args=(0.05,), name="trace-server", daemon=True
        )
        self._thread.start()

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
        headers: Mapping[str, str] = {}
        try:
            authorization = request.headers.get("Authorization", "")
            if url.path == "/login":
                self.faults._refuse_login()
                body: dict[str, Any] = self._login(authorization)
            elif url.path in routes:
                self.faults._hold()
                if self._stopped.is_set():
                    return  # killed while the answer was held back: the connection drops
                self.faults._refuse_data()
                self._check_token(authorization)
                body = routes[url.path](query, now_s)
            else:
                raise _Refusal(404, f"no endpoint {url.path}; served: /login, {', '.join(routes)}")
            status = 200
        except _Refusal as refusal:
            status, body, headers = refusal.status, {"error": refusal.message}, refusal.headers
        data = json.dumps(body).encode()
        try:
            request.send_response(status)
            for name, value in headers.items():
                request.send_header(name, value)
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
        epoch = self.faults._token_epoch_now()
        with self._lock:
            self._tokens[token] = (self.clock() + self.token_lifetime_s, epoch)
            self.logins += 1
        return {"token": token}

    def _check_token(self, authorization: str) -> None:
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            issued = self._tokens.get(token) if scheme == "Bearer" else None
        if issued is None:
            raise _Refusal(401, "missing or unknown bearer token; GET /login first")
        expires, epoch = issued
        if self.faults._revoked(epoch):
            raise _Refusal(401, "the token was revoked (injected fault); GET /login again")
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _start_instant(text: str) -> float:
    try:
        return _instant({"start": text}, "start")
    except _Refusal as refusal:
        raise argparse.ArgumentTypeError(refusal.message) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line's options (``curtail serve-trace`` and ``python -m`` this module)."""
    parser.add_argument("trace", type=Path, help="trace CSV (gCO2/kWh, one column per region)")
    parser.add_argument(
        "--speedup", type=_positive_float, default=600.0, help="trace seconds per wall second"
    )
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument(
        "--start", type=_start_instant, help="trace instant to start at (ISO-8601 with zone)"
    )
    parser.add_argument("--naive-timezone", help="zone of naive timestamps in the files, e.g. UTC")
    parser.add_argument(
        "--forecast", type=Path, help="recorded forecast CSV (request_time, forecast_time, value)"
    )
    parser.add_argument("--forecast-region", help="the trace region the forecast is for")
    parser.add_argument(
        "--synthetic-forecast-seed",
        type=int,
        metavar="SEED",
        help="publish forecasts the calibrated error model makes from the trace (every region)",
    )
    faults = parser.add_argument_group("injected faults (for tests of a live run's signal)")
    faults.add_argument(
        "--fail-first", type=_count, metavar="N", help="answer the first N data requests HTTP 503"
    )
    faults.add_argument(
        "--fail-status", type=int, metavar="STATUS", help="with --fail-first: the 5xx (default 503)"
    )
    faults.add_argument(
        "--slow-first", type=_count, metavar="N", help="hold the first N data answers back"
    )
    faults.add_argument(
        "--slow-delay-s",
        type=_positive_float,
        metavar="S",
        help="with --slow-first: seconds each answer is held (default 30; the client waits 10)",
    )
    faults.add_argument(
        "--rate-limit-first", type=_count, metavar="N", help="answer the first N data requests 429"
    )
    faults.add_argument(
        "--refuse-logins",
        type=int,
        nargs="?",
        const=401,
        choices=(401, 403),
        metavar="STATUS",
        help="answer every /login 401 (or the STATUS given: 401, 403)",
    )


def serve(args: argparse.Namespace) -> None:
    """Serve as ``args`` (from :func:`add_arguments`) say: print the URL line, serve until Ctrl-C."""
    if args.fail_status is not None and not args.fail_first:
        raise TraceServerError("--fail-status is the status of --fail-first N: add --fail-first")
    if args.slow_delay_s is not None and not args.slow_first:
        raise TraceServerError("--slow-delay-s is the delay of --slow-first N: add --slow-first")
    server = TraceServer.from_csv(
        args.trace,
        naive_timezone=args.naive_timezone,
        forecast_path=args.forecast,
        forecast_region=args.forecast_region,
        synthetic_forecast_seed=args.synthetic_forecast_seed,
        speedup=args.speedup,
        port=args.port,
        start_s=args.start,
    )
    try:
        if args.fail_first:
            server.faults.fail_next(args.fail_first, status=args.fail_status or 503)
        if args.slow_first:
            server.faults.slow_next(args.slow_first, delay_s=args.slow_delay_s or 30.0)
        if args.rate_limit_first:
            server.faults.rate_limit_next(args.rate_limit_first)
        if args.refuse_logins:
            server.faults.refuse_logins(status=args.refuse_logins)
    except ValueError as error:
        raise TraceServerError(str(error)) from None
    with server:
        armed = str(server.faults)
        print(
            f"{server.url}  serving {sorted(server.signals)} from {_stamp(server.start_s)} "
            f"at {server.speedup:g}x (WATTTIME_USER / WATTTIME_PASSWORD: any value)"
            + ("" if armed == "none armed" else f"; injected faults: {armed}"),
            flush=True,
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


def main(argv: list[str] | None = None) -> None:
    """``python -m curtail.sources.trace_server TRACE [--speedup N] [--port P] ...``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m curtail.sources.trace_server",
        description="Serve a recorded trace as the WattTime v3 API (a test server: any credentials).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        serve(args)
    except CurtailError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
