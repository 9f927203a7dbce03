"""Measured GPU power in the accounting of real runs (``training.power = "measured"``).

The readings arrive with each train command (NVML watts summed over a site's GPUs); the run
accounts each site at its time-weighted mean watts per GPU times the site's ``num_gpus``.
"""

from __future__ import annotations

import pytest
from runtime_fixtures import ROOT

from curtail.api import _with_measured_power, parse_experiment
from curtail.planning.plan import load_experiment_traces, plan_run
from curtail.runtime.telemetry import Timing, measured_power_per_gpu_w


def _timing(site: str, wall_s: float, power_w: float | None, gpus: int, kind: str = "train") -> Timing:
    return Timing(0.0, site, kind, 0, wall_s, steps=1, power_w=power_w, gpus=gpus)


def test_mean_power_is_time_weighted_and_per_gpu():
    timings = [
        _timing("a", 10.0, 1400.0, 2),  # 700 W per GPU for 10 s
        _timing("a", 30.0, 1000.0, 2),  # 500 W per GPU for 30 s
        _timing("a", 5.0, 9999.0, 2, kind="load"),  # not training: ignored
        _timing("b", 4.0, None, 1),  # no NVML at b
    ]
    assert measured_power_per_gpu_w(timings) == {"a": pytest.approx((700 * 10 + 500 * 30) / 40)}


def test_warm_up_commands_are_left_out():
    """The first command of a worker group compiles with the board mostly idle (as measured on
    an H100: 12 s at 160 W, then 0.64-s commands at 650-760 W)."""
    steady = [_timing("a", 0.64, watts, 1) for watts in (680.0, 646.0, 761.0, 675.0)]
    timings = [_timing("a", 11.9, 160.0, 1), *steady]
    assert measured_power_per_gpu_w(timings)["a"] == pytest.approx((680 + 646 + 761 + 675) / 4)


def _paper_plan(training: dict):
    config = parse_experiment(
        {
            "name": "power",
            "token_budget": 1e9,
            "traces": [{"path": str(ROOT / "data/traces/watttime_moer_2026-01-11_4regions.csv")}],
            "training": training,
            "sites": {
                "caiso_north": {"region": "CAISO_NORTH", "num_gpus": 4, "training_power_w": 2024, "idle_power_w": 200, "tokens_per_s": 1e5},
                "nem_sa": {"region": "NEM_SA", "num_gpus": 2, "training_power_w": 1012, "idle_power_w": 100, "tokens_per_s": 5e4},
            },
            "runs": [{"name": "r", "policy": {"kind": "threshold"}, "sites": ["caiso_north", "nem_sa"]}],
        },
        base_dir=ROOT,
    )
    traces, forecasts = load_experiment_traces(config)
    return config, plan_run(config, config.runs[0], traces, forecasts)


def test_measured_watts_replace_the_training_power_model():
    config, plan = _paper_plan({"power": "measured"})
    measured, note = _with_measured_power(plan, config, {"caiso_north": 650.0, "nem_sa": 600.0}, {})
    assert measured.power["caiso_north"].training_w == pytest.approx(4 * 650.0)
    assert measured.power["nem_sa"].training_w == pytest.approx(2 * 600.0)
    assert measured.power["nem_sa"].idle_w == plan.power["nem_sa"].idle_w  # idle stays modelled
    assert note["power_source"] == "measured" and "power_warning" not in note


def test_sites_without_readings_keep_the_model_and_say_so():
    config, plan = _paper_plan({"power": "measured"})
    measured, note = _with_measured_power(plan, config, {"caiso_north": 650.0}, {})
    assert measured.power["nem_sa"] == plan.power["nem_sa"]
    assert note["power_source"] == "measured where available"
    assert "nem_sa" in note["power_warning"] and "caiso_north" not in note["power_warning"]


def test_the_default_ignores_readings():
    config, plan = _paper_plan({})
    same, note = _with_measured_power(plan, config, {"caiso_north": 650.0}, {})
    assert same.power == plan.power and note == {"power_source": "model"}


def test_measured_host_watts_add_to_the_training_power_times_pue():
    config, plan = _paper_plan({"host_power": "codecarbon"})
    host = {"caiso_north": {"cpu_w": 40.0, "ram_w": 10.0}}
    summed, note = _with_measured_power(plan, config, {}, host)
    pue = config.sites["caiso_north"].pue
    assert summed.power["caiso_north"].training_w == pytest.approx(plan.power["caiso_north"].training_w + 50.0 * pue)
    assert summed.power["caiso_north"].idle_w == plan.power["caiso_north"].idle_w
    assert summed.power["nem_sa"] == plan.power["nem_sa"] and "nem_sa" in note["host_power_warning"]
    assert note["host_power_source"] == "codecarbon" and note["measured_host_power_w"] == host
    both, _ = _with_measured_power(_paper_plan({"power": "measured", "host_power": "codecarbon"})[1],
                                   _paper_plan({"power": "measured", "host_power": "codecarbon"})[0],
                                   {"caiso_north": 650.0}, host)
    assert both.power["caiso_north"].training_w == pytest.approx(4 * 650.0 * pue + 50.0 * pue)


def test_a_worker_measures_its_own_cpu_and_memory_watts_with_codecarbon():
    """The real CodeCarbon tracker, in this process: CPU watts follow the load."""
    import time

    from curtail.training.host_power import HostPowerMeter

    meter = HostPowerMeter.create(measure_power_s=0.2)
    try:
        readings = []
        for busy in (True, False):
            meter.start()
            started, spins = time.perf_counter(), 0
            while time.perf_counter() - started < 1.0:
                if busy:
                    spins += 1
                else:
                    time.sleep(0.05)
            readings.append(meter.stop())
    finally:
        meter.close()
    busy, idle = readings
    assert busy.cpu_power_w > 0 and busy.cpu_power_w > 2 * idle.cpu_power_w
    assert busy.ram_power_w > 0 and busy.duration_s == pytest.approx(1.0, abs=0.3)


def test_micro_batch_must_divide_the_batch():
    with pytest.raises(ValueError, match="micro_batch_size"):
        _paper_plan({"batch_size": 8, "micro_batch_size": 3})
