"""The trace server against the real WattTime client: the paper trace served at an accelerated
clock, read back exactly, never past the server's "now", and turned by the online calendar into
the offline calendar's windows. Injected faults (5xx bursts, slow answers, 429, refused
credentials, a killed server) reach the client as its typed source errors, and a RealtimePoller
in front of it degrades (stale, fallback) and recovers without raising. No Ray; ~20 seconds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from curtail.config import CurtailmentRules, TraceSource
from curtail.planning.online_calendar import OnlineCalendar
from curtail.planning.signals import Signal
from curtail.planning.traces import load_trace
from curtail.planning.windows import compute_windows
from curtail.sources.base import (
    SourceAuthError,
    SourceError,
    SourceRequestError,
    SourceUnavailable,
    TraceFileSource,
    make_forecast,
)
from curtail.sources.poller import RealtimePoller
from curtail.sources.trace_server import Faults, FaultsServed, TraceServer, TraceServerError
from curtail.sources.watttime import WattTimeSource

REPO = Path(__file__).resolve().parents[1]
PAPER_TRACE = REPO / "data/traces/watttime_moer_2026-01-11_4regions.csv"
STEP_S = 300.0


@pytest.fixture(scope="module")
def paper() -> dict[str, Signal]:
    return load_trace(TraceSource(path=PAPER_TRACE)).signals


@pytest.fixture
def credentials(monkeypatch):
    # a test server: any username and password log in
    monkeypatch.setenv("WATTTIME_USER", "anyone")
    monkeypatch.setenv("WATTTIME_PASSWORD", "anything-at-all")


def prefix(signal: Signal, now_s: float) -> Signal:
    """The trace's samples at or before ``now_s``: all a live reader may have seen."""
    keep = signal.times_s <= now_s
    return Signal(
        signal.region, signal.times_s[keep], signal.ci_g_per_kwh[keep], signal.resolution_s
    )


def test_client_polling_the_accelerated_server_sees_the_trace_and_nothing_later(paper, credentials):
    signal = paper["CAISO_NORTH"]
    with TraceServer(paper, speedup=3000) as server:  # one 5-min sample per 0.1 s
        source = WattTimeSource(base_url=server.url, timeout_s=5)
        seen = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            before = server.now_s()
            reading = source.latest("CAISO_NORTH")
            after = server.now_s()
            # the sample in force when the server answered: not older than at `before`, never after `after`
            assert prefix(signal, before).times_s[-1] <= reading.t_s <= after
            seen.append(reading)
            time.sleep(0.02)
        before = server.now_s()
        history = source.history("CAISO_NORTH", signal.start_s, signal.end_s)
        after = server.now_s()
        logins = server.logins

    times = [r.t_s for r in seen]
    assert times == sorted(times)
    assert len(set(times)) >= 5, "the server's clock did not advance"
    index = np.searchsorted(signal.times_s, times)
    np.testing.assert_array_equal(signal.times_s[index], times)  # only the trace's own instants
    # lbs/MWh on the wire, gCO2/kWh after the client's conversion: the trace's values
    np.testing.assert_allclose(
        [r.ci_g_per_kwh for r in seen], signal.ci_g_per_kwh[index], rtol=1e-12
    )
    # history: the trace from its start up to the server's clock, nothing later
    assert (
        len(prefix(signal, before).times_s)
        <= len(history.times_s)
        <= len(prefix(signal, after).times_s)
    )
    expected = prefix(signal, history.times_s[-1])
    np.testing.assert_array_equal(history.times_s, expected.times_s)
    np.testing.assert_allclose(history.ci_g_per_kwh, expected.ci_g_per_kwh, rtol=1e-12)
    assert history.times_s[-1] < signal.times_s[-1]  # the trace's future stayed unserved
    assert logins == 1  # one token for every call


@pytest.mark.parametrize("region", ["CAISO_NORTH", "SPP_TX", "NEM_SA"])
def test_online_calendar_on_served_readings_equals_the_offline_calendar(paper, credentials, region):
    signal = paper[region]
    wall = [0.0]
    rules = CurtailmentRules()
    calendar = OnlineCalendar(region, rules)
    compared = 0
    # speedup 300: one trace sample per (stepped) wall second
    with TraceServer(paper, speedup=STEP_S, clock=lambda: wall[0]) as server:
        source = WattTimeSource(base_url=server.url, timeout_s=5)
        for k in range(len(signal.times_s)):
            for offset in (0.0, 0.5):  # on the sample and between samples: the second is a repeat
                wall[0] = k + offset
                reading = source.latest(region)
                assert reading.t_s == signal.times_s[k] <= server.now_s()
                assert reading.ci_g_per_kwh == pytest.approx(signal.ci_g_per_kwh[k], rel=1e-12)
                assert calendar.add(reading.t_s, reading.ci_g_per_kwh) is (offset == 0.0)
            if k % 24 == 23 or k == len(signal.times_s) - 1:
                seen = prefix(signal, server.now_s())
                offline = compute_windows(region, seen, rules)
                assert calendar.windows(until_s=seen.end_s) == offline
                compared += 1
    assert compared == 10
    assert calendar.windows(until_s=signal.end_s) == compute_windows(region, signal, rules)
    assert len(calendar.windows(until_s=signal.end_s)) >= 1  # the comparison is not vacuous


def test_history_forecast_and_index_stop_at_the_server_clock(paper, credentials):
    signal = paper["CAISO_NORTH"]
    start_s = signal.start_s
    # recorded forecasts issued at half past every hour, 3 points ahead; the later ones are the future
    issues = [
        (issued, [issued + k * STEP_S for k in (1, 2, 3)], [50.0 + h] * 3)
        for h, issued in enumerate(start_s + 1800 + 3600 * np.arange(6))
    ]
    forecasts = {"CAISO_NORTH": make_forecast("recorded", "CAISO_NORTH", issues)}
    wall = [0.0]
    with TraceServer(paper, speedup=1.0, forecasts=forecasts, clock=lambda: wall[0]) as server:
        source = WattTimeSource(base_url=server.url, timeout_s=5)
        wall[0] = 2.5 * 3600  # trace now: 2 h 30 min in
        now_s = server.now_s()
        history = source.history("CAISO_NORTH", start_s, signal.end_s)
        np.testing.assert_array_equal(history.times_s, prefix(signal, now_s).times_s)

        forecast = source.forecast("CAISO_NORTH", horizon_s=3600)
        targets, values = forecast.latest(now_s)
        current = prefix(signal, now_s)
        # WattTime's "now" value first, then the forecast issued at 2 h 30 (not the one at 3 h 30)
        np.testing.assert_array_equal(targets, current.times_s[-1] + STEP_S * np.arange(4))
        np.testing.assert_allclose(values, [current.ci_g_per_kwh[-1], 52.0, 52.0, 52.0], rtol=1e-12)

        past = source.forecast_history("CAISO_NORTH", start_s, signal.end_s)
        np.testing.assert_array_equal(past.request_s, start_s + 1800 + 3600 * np.arange(3))

        index = source.signal_index("CAISO_NORTH")
        assert index.t_s == current.times_s[-1] and 0 <= index.percentile <= 100
        expected = 100 * np.mean(current.ci_g_per_kwh < current.ci_g_per_kwh[-1])
        assert index.percentile == pytest.approx(expected)

        with pytest.raises(SourceRequestError, match="no recorded forecasts for region 'SPP_TX'"):
            source.forecast_history("SPP_TX", start_s, signal.end_s)
        with pytest.raises(SourceRequestError, match="unknown region 'MARS'"):
            source.latest("MARS")


def test_the_token_flow_is_required_and_tokens_expire(paper, monkeypatch, credentials):
    wall = [0.0]
    with TraceServer(paper, speedup=60, token_lifetime_s=100, clock=lambda: wall[0]) as server:
        with pytest.raises(urllib.error.HTTPError) as refused:  # no token: 401
            urllib.request.urlopen(f"{server.url}/v3/forecast?region=CAISO_NORTH", timeout=5)
        assert refused.value.code == 401

        source = WattTimeSource(base_url=server.url, timeout_s=5)
        first = source.latest("CAISO_NORTH")
        source.latest("SPP_TX")
        assert server.logins == 1
        wall[0] = 101.0  # the server refuses the token now; the client logs in again by itself
        later = source.latest("CAISO_NORTH")
        assert server.logins == 2
        assert later.t_s == first.t_s + 6000  # 101 wall s x 60 = 6060 trace s: 20 samples on

        monkeypatch.delenv("WATTTIME_PASSWORD")
        with pytest.raises(SourceAuthError, match="WATTTIME_PASSWORD is not set"):
            WattTimeSource(base_url=server.url).latest("CAISO_NORTH")


def test_command_line_prints_its_url_and_serves():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "curtail.sources.trace_server",
            str(PAPER_TRACE),
            "--speedup",
            "600",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        url = line.split()[0]
        assert url.startswith("http://127.0.0.1:")
        request = urllib.request.Request(
            f"{url}/login", headers={"Authorization": "Basic dTpw"}
        )  # u:p
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read())["token"]
    finally:
        process.terminate()
        process.wait(timeout=10)


# ------------------------------------------------------------------------------ injected faults


@dataclass(frozen=True)
class Fault:
    """A fault armed for the next three data requests, and what the client must make of it."""

    arm: Callable[[TraceServer], None]
    error: type[SourceError]
    message: str  # a regex the client's error message must match
    served: FaultsServed  # what the server counts after three failed reads
    heals_by_itself: bool = True  # False: it lasts until faults.clear()
    timeout_s: float = 5.0  # the client's


def refuse_credentials(status: int) -> Callable[[TraceServer], None]:
    def arm(server: TraceServer) -> None:
        server.faults.revoke_tokens()
        server.faults.refuse_logins(status=status)

    return arm


FAULTS = {
    "503 burst": Fault(
        lambda server: server.faults.fail_next(3),
        SourceUnavailable,
        r"GET /v3/forecast\?.*: server error \(HTTP 503: service unavailable",
        FaultsServed(server_errors=3),
    ),
    "502 burst": Fault(
        lambda server: server.faults.fail_next(3, status=502),
        SourceUnavailable,
        r"server error \(HTTP 502",
        FaultsServed(server_errors=3),
    ),
    "slow answers": Fault(
        lambda server: server.faults.slow_next(3, delay_s=5.0),
        SourceUnavailable,
        r"GET /v3/forecast\?.*: no answer within 0.5 s",
        FaultsServed(slow_answers=3),
        timeout_s=0.5,
    ),
    "rate limited": Fault(
        lambda server: server.faults.rate_limit_next(3, retry_after_s=60),
        SourceUnavailable,
        r"rate limited \(HTTP 429: too many requests.*\), retry after 60 s",
        FaultsServed(rate_limited=3),
    ),
    # the first read meets the revoked token, then /login; each later read tries /login twice
    # (the client retries a refused call once with a fresh login): 1 + 2 + 2 refused logins
    "credentials refused (401)": Fault(
        refuse_credentials(401),
        SourceAuthError,
        r"GET /login was refused \(HTTP 401: credentials refused.*\): check the credentials",
        FaultsServed(refused_logins=5, revoked_tokens=1),
        heals_by_itself=False,
    ),
    "credentials forbidden (403)": Fault(
        refuse_credentials(403),
        SourceAuthError,
        r"GET /login was refused \(HTTP 403: credentials refused.*\): check the credentials",
        FaultsServed(refused_logins=5, revoked_tokens=1),
        heals_by_itself=False,
    ),
}


@pytest.mark.parametrize("name", FAULTS)
def test_each_fault_reaches_the_client_as_its_typed_error_then_passes(paper, credentials, name):
    fault = FAULTS[name]
    with TraceServer(paper, speedup=600) as server:
        source = WattTimeSource(base_url=server.url, timeout_s=fault.timeout_s)
        before = source.latest("CAISO_NORTH")
        fault.arm(server)
        for _ in range(3):
            with pytest.raises(fault.error, match=fault.message) as raised:
                source.latest("CAISO_NORTH")
            assert raised.value.source == "watttime"
        if not fault.heals_by_itself:
            server.faults.clear()
        after = source.latest("CAISO_NORTH")
        served = server.faults.served
    assert after.t_s >= before.t_s
    assert served == fault.served


@pytest.mark.parametrize("name", FAULTS)
def test_a_poller_in_front_degrades_through_each_fault_and_recovers(paper, credentials, name):
    fault = FAULTS[name]
    backup = TraceFileSource.from_csv(PAPER_TRACE)
    now = [paper["CAISO_NORTH"].start_s + 3600]  # the poller's clock: trace time, for the backup
    with TraceServer(paper, speedup=600) as server:
        source = WattTimeSource(base_url=server.url, timeout_s=fault.timeout_s)
        poller = RealtimePoller(
            source,
            ["CAISO_NORTH"],
            refresh_s=300,
            max_stale_s=900,
            retry_s=60,
            fallback=backup,
            clock=lambda: now[0],
        )
        first = poller.read("CAISO_NORTH")
        fault.arm(server)
        degraded = []
        # refresh due (value 300 s old: stale), a retry (360 s: stale), past max_stale_s: fallback
        for step_s in (300, 60, 900):
            now[0] += step_s
            degraded.append(poller.read("CAISO_NORTH"))  # never raises
        if not fault.heals_by_itself:
            server.faults.clear()
        now[0] += 60
        recovered = poller.read("CAISO_NORTH")
        served = server.faults.served

    kinds = [event.kind for event in poller.events]
    assert kinds == ["failed", "stale", "failed", "stale", "failed", "fallback", "recovered"]
    for event in poller.events:
        if event.kind == "failed":
            assert re.search(fault.message, event.detail), event.detail
    assert degraded[:2] == [replace(first, stale=True)] * 2
    assert degraded[2].fallback and degraded[2].source == backup.name
    assert degraded[2].ci_g_per_kwh == backup.latest("CAISO_NORTH", now[0] - 60).ci_g_per_kwh
    assert not recovered.stale and not recovered.fallback and recovered.source == "watttime"
    assert served == fault.served


def test_revoked_tokens_make_the_client_log_in_again(paper, credentials):
    with TraceServer(paper, speedup=600) as server:
        source = WattTimeSource(base_url=server.url, timeout_s=5)
        source.latest("NEM_SA")
        server.faults.revoke_tokens()
        source.latest("NEM_SA")  # refused once, then a fresh login: the caller sees nothing
        assert server.logins == 2
        assert server.faults.served == FaultsServed(revoked_tokens=1)
        source.latest("NEM_SA")  # the new token is not revoked
        assert server.faults.served == FaultsServed(revoked_tokens=1)


def test_answers_held_until_cleared_go_out_at_once(paper, credentials):
    with TraceServer(paper, speedup=600) as server:
        source = WattTimeSource(base_url=server.url, timeout_s=30)
        source.latest("DE")
        server.faults.slow_next(None, delay_s=60)  # every data answer, until cleared
        assert str(server.faults) == "every data answer: held 60 s"
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(source.latest, "DE")
            deadline = time.monotonic() + 10
            while server.faults.served.slow_answers == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.faults.served.slow_answers == 1
            assert not pending.done()  # held
            server.faults.clear()
            assert pending.result(timeout=10).region == "DE"
        assert str(server.faults) == "none armed"


def test_concurrent_clients_meet_exactly_the_armed_number_of_failures(paper, credentials):
    def read(_: int) -> object:
        try:
            return WattTimeSource(base_url=server.url, timeout_s=5).latest("SPP_TX")
        except SourceUnavailable as error:
            return error

    with TraceServer(paper, speedup=600) as server:
        server.faults.fail_next(5)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(read, range(20)))
        served, logins = server.faults.served, server.logins
    failures = [r for r in results if isinstance(r, SourceUnavailable)]
    assert len(failures) == 5 and all("HTTP 503" in str(f) for f in failures)
    assert served == FaultsServed(server_errors=5)
    assert logins == 20  # /login is never failed by fail_next


def test_a_stopped_server_refuses_connections_and_restart_serves_on(paper, credentials):
    signal = paper["CAISO_NORTH"]
    wall = [0.0]
    now = [signal.start_s]
    server = TraceServer(paper, speedup=300, clock=lambda: wall[0]).start()
    try:
        url = server.url
        source = WattTimeSource(base_url=url, timeout_s=5)
        poller = RealtimePoller(
            source, ["CAISO_NORTH"], refresh_s=300, max_stale_s=900, retry_s=60,
            clock=lambda: now[0],
        )  # fmt: skip
        before = poller.read("CAISO_NORTH")
        server.stop()
        assert not server.running
        wall[0] = 10.0  # the trace clock runs on while the server is down
        # refused at once: a hanging server would read "no answer within 5 s"
        with pytest.raises(
            SourceUnavailable, match=rf"cannot connect to {re.escape(url)} .*refused"
        ):
            source.latest("CAISO_NORTH")
        now[0] += 300
        assert poller.read("CAISO_NORTH") == replace(before, stale=True)
        server.restart()
        assert server.url == url and server.running
        now[0] += 60
        after = poller.read("CAISO_NORTH")
        assert after.t_s == signal.times_s[10]  # 10 wall s x 300 = 10 samples on
        assert server.logins == 1  # tokens survive a restart, as WattTime's signed tokens do
    finally:
        server.stop()
    assert [event.kind for event in poller.events] == ["failed", "stale", "recovered"]

    with TraceServer(paper, speedup=600) as server:  # leaving the with block kills it too
        source = WattTimeSource(base_url=server.url, timeout_s=5)
        source.latest("CAISO_NORTH")
    with pytest.raises(SourceUnavailable, match="cannot connect to .*refused"):
        source.latest("CAISO_NORTH")


def test_a_taken_port_is_an_error_that_says_what_to_do(paper):
    with TraceServer(paper) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with pytest.raises(TraceServerError, match=rf"port {port} on 127.0.0.1 is taken.*or 0"):
            TraceServer(paper, port=port).start()


@pytest.mark.parametrize(
    "arm, message",
    [
        (lambda faults: faults.fail_next(0), "count must be a whole number >= 1, got 0"),
        (lambda faults: faults.fail_next(2, status=404), "a 5xx server error, got 404"),
        (lambda faults: faults.slow_next(1, delay_s=0), "delay_s must be > 0 seconds, got 0"),
        (lambda faults: faults.rate_limit_next(1, retry_after_s=-1), "retry_after_s must be >= 0"),
        (lambda faults: faults.refuse_logins(status=500), "status must be 401 or 403, got 500"),
    ],
)
def test_fault_arguments_are_checked(arm, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        arm(Faults())


def test_curtail_serve_trace_serves_the_trace_with_its_faults(paper, credentials):
    script = Path(sys.executable).with_name("curtail")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "curtail"]
    process = subprocess.Popen(
        [*command, "serve-trace", str(PAPER_TRACE), "--speedup", "600", "--port", "0"]
        + ["--fail-first", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line, "curtail serve-trace printed nothing (see its stderr above)"
        url = line.split()[0]
        assert url.startswith("http://127.0.0.1:")
        assert "injected faults: next 1 data requests: HTTP 503" in line
        source = WattTimeSource(base_url=url, timeout_s=5)
        with pytest.raises(SourceUnavailable, match=r"server error \(HTTP 503"):
            source.latest("CAISO_NORTH")
        reading = source.latest("CAISO_NORTH")
        assert reading.t_s in paper["CAISO_NORTH"].times_s
        assert process.poll() is None  # still serving
    finally:
        process.terminate()
        process.wait(timeout=10)


# ------------------------------------------------------------------------- synthetic forecasts


def served_forecasts(seed: int, wall_s: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every region's /v3/forecast, read through the WattTime client at ``wall_s`` (speedup 300:
    one 5-min sample per wall second) from a server publishing synthetic forecasts of ``seed``."""
    wall = [wall_s]
    server = TraceServer.from_csv(
        PAPER_TRACE, synthetic_forecast_seed=seed, speedup=STEP_S, clock=lambda: wall[0]
    )
    with server:
        source = WattTimeSource(base_url=server.url, timeout_s=5)
        return {
            region: source.forecast(region, horizon_s=24 * 3600).latest(server.now_s())
            for region in sorted(server.signals)
        }


def test_synthetic_forecasts_are_served_for_every_region(paper, credentials):
    wall = [12.0]  # 1 h into the trace
    server = TraceServer.from_csv(
        PAPER_TRACE, synthetic_forecast_seed=3, speedup=STEP_S, clock=lambda: wall[0]
    )
    assert sorted(server.forecasts) == sorted(paper)
    with server:
        source = WattTimeSource(base_url=server.url, timeout_s=5)
        now_s = server.now_s()
        read = {}
        for region, signal in paper.items():
            forecast = read[region] = source.forecast(region, horizon_s=24 * 3600)
            issued_s = float(forecast.request_s[-1])
            targets, values = forecast.latest(now_s)
            current = prefix(signal, now_s)
            assert issued_s == current.times_s[-1] <= now_s
            # WattTime's "now" value, then the synthetic forecast's points ahead of it
            assert targets[0] == issued_s
            assert values[0] == pytest.approx(current.ci_g_per_kwh[-1], rel=1e-12)
            ahead = targets > issued_s
            assert ahead.sum() > 1, region
            assert np.all(np.diff(targets) > 0)
            assert np.all(np.isfinite(values)) and np.all(values >= 0), region
            # exactly the server's forecast issued by now, through the lbs/MWh round trip
            published_targets, published_values = server.forecasts[region].latest(now_s)
            mine = (published_targets > issued_s) & (published_targets <= issued_s + 24 * 3600)
            np.testing.assert_array_equal(targets[ahead], published_targets[mine])
            np.testing.assert_allclose(values[ahead], published_values[mine], rtol=1e-12)

        wall[0] += 3.0  # 15 min later: a newer forecast, reaching further
        later = source.forecast("CAISO_NORTH", horizon_s=24 * 3600)
        assert later.request_s[-1] == prefix(paper["CAISO_NORTH"], server.now_s()).times_s[-1]
        before = read["CAISO_NORTH"]
        assert later.request_s[-1] == before.request_s[-1] + 3 * STEP_S
        assert later.target_s[-1] == before.target_s[-1] + 3 * STEP_S


def test_synthetic_forecasts_are_deterministic_per_seed(credentials):
    first, again = served_forecasts(3, 12.0), served_forecasts(3, 12.0)
    other = served_forecasts(4, 12.0)
    assert first.keys() == again.keys() == other.keys()
    for region in first:
        np.testing.assert_array_equal(first[region][0], again[region][0])
        np.testing.assert_array_equal(first[region][1], again[region][1])
        np.testing.assert_array_equal(first[region][0], other[region][0])  # same instants
    assert any(not np.array_equal(first[r][1], other[r][1]) for r in first), "seed 4 = seed 3"


def test_recorded_and_synthetic_forecasts_are_exclusive():
    recorded = PAPER_TRACE.parent / "watttime_moer_2023-06_caiso-north_forecast.csv.gz"
    with pytest.raises(TraceServerError, match="not both"):
        TraceServer.from_csv(
            PAPER_TRACE,
            forecast_path=recorded,
            forecast_region="CAISO_NORTH",
            synthetic_forecast_seed=3,
        )


def test_curtail_serve_trace_publishes_synthetic_forecasts(paper, credentials):
    script = Path(sys.executable).with_name("curtail")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "curtail"]
    serve = [*command, "serve-trace", str(PAPER_TRACE), "--port", "0"]
    serve += ["--synthetic-forecast-seed", "3"]
    recorded = PAPER_TRACE.parent / "watttime_moer_2023-06_caiso-north_forecast.csv.gz"
    both = subprocess.run(
        [*serve, "--forecast", str(recorded), "--forecast-region", "CAISO_NORTH"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr

    process = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line, "curtail serve-trace printed nothing (see its stderr above)"
        source = WattTimeSource(base_url=line.split()[0], timeout_s=5)
        for region in paper:
            targets, values = source.forecast(region).latest(float("inf"))
            assert (targets > targets[0]).sum() > 1, region
            assert np.all(np.isfinite(values)) and np.all(values >= 0), region
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_run_behind_the_server_reads_no_forecast_issued_after_its_now(paper, credentials):
    from curtail.sources.live_forecasts import LiveForecasts

    wall = [0.0]
    server = TraceServer.from_csv(
        PAPER_TRACE, synthetic_forecast_seed=3, speedup=STEP_S, clock=lambda: wall[0]
    )
    with server:
        wall[0] = 2.0  # the server is two samples ahead of the run (a served run's startup lag)
        run_now_s = server.start_s
        forecasts = LiveForecasts(
            {"caiso": "CAISO_NORTH"}, WattTimeSource(base_url=server.url, timeout_s=5)
        )
        forecasts.begin(run_now_s)
    assert forecasts.received  # the one issued at the run's now, from the source's history
    assert all(f.issued_t_s <= f.effective_t_s for f in forecasts.received), forecasts.received
