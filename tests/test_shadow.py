"""Shadow mode against the served paper trace: what it reports per site is the offline calendar's
state at that instant, the threshold policy's intent, and the state machine's site state."""

from __future__ import annotations

import math

import pytest
from planning_fixtures import TRACES

from curtail.config import TraceSource, parse_experiment
from curtail.planning.traces import load_trace
from curtail.planning.windows import CurtailmentCalendar, WindowState
from curtail.shadow import shadow
from curtail.sources.live_feed import read_readings
from curtail.sources.live_forecasts import FORECASTS_FILE, read_forecasts

PAPER_TRACE = TRACES / "watttime_moer_2026-01-11_4regions.csv"
SITES = {"caiso": "CAISO_NORTH", "texas": "SPP_TX", "sa": "NEM_SA"}


def live_experiment(duration_s: float, speedup: float):
    return parse_experiment({
        "name": "shadow-test",
        "token_budget": 1e12,
        "live": {"source": {"kind": "served_trace", "path": str(PAPER_TRACE)}, "duration_s": duration_s},
        "training": {"clock": "realtime", "realtime_speedup": speedup},
        "sites": {name: {"region": region, "tokens_per_s": 5.0, "training_power_w": 2024, "idle_power_w": 468}
                  for name, region in SITES.items()},
        "runs": [{"name": "r", "policy": {"kind": "threshold"}, "sites": list(SITES)}],
    })


def test_shadow_reports_the_calendar_the_policy_and_the_sites(tmp_path, capsys):
    # 6 h of grid in 12 s: a 5-minute sample lasts 167 ms of wall, room for a reading a loaded
    # machine serves late (at 7200x, 42 ms, a CI run once read another sample's value)
    experiment = live_experiment(duration_s=6 * 3600, speedup=1800)
    statuses = shadow(experiment, experiment.runs[0], tmp_path, interval_s=1800)
    signals = {site: load_trace(TraceSource(path=PAPER_TRACE)).signals[region] for site, region in SITES.items()}
    offline = CurtailmentCalendar(signals, experiment.rules)
    assert statuses[0].t_s == min(s.start_s for s in signals.values())
    assert statuses[-1].t_s >= statuses[0].t_s + 5 * 3600
    seen_windows = set()
    for status in statuses:
        assert status.next_change_s > status.t_s and math.isfinite(status.next_change_s)
        for site in status.sites:
            window = offline.state_at(site.site, status.t_s)
            assert site.window == window.value, (status.t_s, site)
            assert site.intent == ("off" if window is WindowState.OFF else "train")
            assert site.ci_g_per_kwh == pytest.approx(signals[site.site].value_at(status.t_s), rel=1e-12)
            if site.state == "training":
                assert window is not WindowState.OFF
            seen_windows.add(site.window)
    assert {"off", "ready"} <= seen_windows  # the first 6 h hold windows of the paper trace
    assert len(read_readings(tmp_path)) >= 3 * 6 * 12
    printed = capsys.readouterr().out
    assert "mode" in printed and "caiso" in printed and "g/kWh" in printed


def test_shadow_stops_after_the_reports_asked_for(tmp_path):
    experiment = live_experiment(duration_s=24 * 3600, speedup=7200)
    statuses = shadow(experiment, experiment.runs[0], tmp_path, interval_s=600, stop_after=3, on_status=lambda s: None)
    assert len(statuses) == 3


def test_the_shadow_command(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "live.toml"
    config.write_text(f"""
name = "shadow-cli"
token_budget = 1e12
output_dir = "{tmp_path / 'runs'}"
[live]
duration_s = 7200
source = {{ kind = "served_trace", path = "{PAPER_TRACE}" }}
[training]
clock = "realtime"
realtime_speedup = 7200
[sites.caiso]
region = "CAISO_NORTH"
tokens_per_s = 5
training_power_w = 2024
idle_power_w = 468
[[runs]]
name = "r"
policy = {{ kind = "threshold" }}
sites = ["caiso"]
""")
    done = subprocess.run([sys.executable, "-m", "curtail.cli", "shadow", str(config), "--reports", "2"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reports = [line for line in done.stdout.splitlines() if "next change" in line]
    assert len(reports) == 2 and reports[0].startswith("2026-01-11T")
    assert "window" in done.stdout and "policy" in done.stdout
    assert (tmp_path / "runs" / "shadow-cli" / "shadow-r" / "live_readings.jsonl").is_file()


def test_served_faults_become_signal_events_and_the_feed_degrades(tmp_path):
    """A served trace scripted to fail: a 5xx burst, answers slower than the timeout, refused
    credentials, then the server down. Each is a typed signal event with what failed; the last
    good value bridges short faults, the lost value covers long ones, and the readings come back.
    (A timed-out request costs the run wall time: the trace's clock runs ahead meanwhile.)"""
    data = live_experiment(duration_s=3 * 3600, speedup=1800).model_dump(mode="json")
    data["live"]["max_stale_s"] = 900
    data["live"]["retry_s"] = 120
    data["live"]["source"]["timeout_s"] = 0.2
    data["live"]["source"]["faults"] = [
        {"at_s": 1200, "kind": "server_errors", "count": 3},
        {"at_s": 2400, "kind": "slow", "count": 2, "delay_s": 1.0},
        {"at_s": 3600, "kind": "refuse_credentials", "duration_s": 600},
        {"at_s": 6000, "kind": "down", "duration_s": 2400},
    ]
    experiment = parse_experiment(data)
    events = []
    shadow(experiment, experiment.runs[0], tmp_path, interval_s=1800, on_status=lambda s: None,
           on_event=lambda t_s, site, event, details: events.append((t_s, site, event, details)))
    kinds = {event for _, _, event, _ in events}
    assert {"signal_failed", "signal_stale", "signal_lost", "signal_recovered", "signal_reading"} <= kinds
    failures = [str(d["detail"]) for _, _, e, d in events if e == "signal_failed"]
    for cause in ("HTTP 503", "no answer within 0.2 s", "credentials", "cannot connect"):
        assert any(cause in detail for detail in failures), cause
    readings = read_readings(tmp_path)
    lost = [r for r in readings if r.origin == "lost"]
    assert lost, "the outage outlasted max_stale_s: the lost value must be assumed"
    for site in SITES:
        mine = [r for r in readings if r.site == site]
        last_lost = max((i for i, r in enumerate(mine) if r.origin == "lost"), default=None)
        if last_lost is not None:  # the signal came back after it was lost
            assert any(r.origin == "source" for r in mine[last_lost + 1:]), site
    assert [r.effective_t_s for r in readings if r.site == "caiso"] == sorted(
        r.effective_t_s for r in readings if r.site == "caiso")


def test_a_forecast_policy_shadow_reads_and_records_the_served_forecasts(tmp_path):
    """A forecast policy's shadow of a served trace publishing synthetic forecasts fetches every
    site's forecast as it begins and then every forecast_refresh_s of its clock, and records each."""
    data = live_experiment(duration_s=2 * 3600, speedup=7200).model_dump(mode="json")  # 1 s
    data["live"]["source"]["synthetic_forecast_seed"] = 3
    data["live"]["forecast_refresh_s"] = 600  # not the readings' 300 s step
    data["runs"][0]["policy"] = {"kind": "forecast"}
    experiment = parse_experiment(data)
    statuses = shadow(experiment, experiment.runs[0], tmp_path, interval_s=1800,
                      on_status=lambda s: None, on_event=lambda *event: None)
    assert statuses and any(site.intent != "off" for status in statuses for site in status.sites)
    assert (tmp_path / FORECASTS_FILE).is_file()
    forecasts = read_forecasts(tmp_path)
    assert {f.site for f in forecasts} == set(SITES)
    first_s = forecasts[0].effective_t_s
    assert first_s == statuses[0].t_s  # fetched as the shadow began
    for site in SITES:
        mine = [f for f in forecasts if f.site == site]
        # one forecast per refresh, on the grid from the first, none skipped
        assert [f.effective_t_s for f in mine] == [first_s + 600 * k for k in range(len(mine))], site
        assert len(mine) >= 6, site
        for forecast in mine:
            assert sum(t > forecast.issued_t_s for t in forecast.targets_s) > 1, forecast
            assert all(math.isfinite(v) and v >= 0 for v in forecast.ci_g_per_kwh), forecast
