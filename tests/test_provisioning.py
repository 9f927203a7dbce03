"""Measured provisioning: a run's recorded site windows charged at idle power and the grid's
intensity, against the model's start-up, worked by hand on two sites."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from planning_fixtures import STEP_S, T0_S, TRACES, at, make_signal

from curtail.config import parse_experiment
from curtail.errors import CurtailError
from curtail.planning.plan import plan_recorded
from curtail.planning.provisioning import (
    intensity_of,
    measured_provisioning,
    measured_provisioning_of,
)
from curtail.runtime.capacity import CAPACITY_FILE, SiteCapacity, site_bundles

IDLE_W = {"a": 468.0, "b": 1000.0}
MODELLED_S = 270.0  # the defaults' provisioning_s + group_start_s: 240 + 30
SIGNALS = {"a": make_signal([50.0, 400.0, 50.0, 50.0], region="A"), "b": make_signal([200.0] * 4, region="B")}

# a: ready 300 s after asking at 50 g/kWh; never ready, released 90 s after asking at 400 g/kWh.
# b: ready 360 s after asking at 200 g/kWh.
WINDOWS = pd.DataFrame({
    "site": ["a", "a", "b"],
    "requested_t_s": [at(0), at(7), at(1)],
    "requested_wall_s": [1000.0, 2000.0, 5000.0],
    "nodes_before": [0, 0, 0],
    "nodes_up_wall_s": [1100.0, None, 5200.0],
    "group_ready_wall_s": [1300.0, None, 5360.0],
    "released_wall_s": [4000.0, 2090.0, 9000.0],
})

EXPECTED = {
    "a": {"num_windows": 2, "num_never_ready": 1, "measured_s": 390.0, "modelled_s": 540.0,
          "difference_s": -150.0, "measured_kwh": 0.0507, "modelled_kwh": 0.0702, "difference_kwh": -0.0195,
          # 0.039 kWh * 50 g + 0.0117 kWh * 400 g; the model's 0.0351 kWh twice, at 50 and 400 g
          "measured_kg": 0.00663, "modelled_kg": 0.015795, "difference_kg": -0.009165},
    "b": {"num_windows": 1, "num_never_ready": 0, "measured_s": 360.0, "modelled_s": 270.0,
          "difference_s": 90.0, "measured_kwh": 0.1, "modelled_kwh": 0.075, "difference_kwh": 0.025,
          "measured_kg": 0.02, "modelled_kg": 0.015, "difference_kg": 0.005},
}
TOTAL = {"num_windows": 3, "num_never_ready": 1, "measured_s": 750.0, "modelled_s": 810.0,
         "difference_s": -60.0, "measured_kwh": 0.1507, "modelled_kwh": 0.1452, "difference_kwh": 0.0055,
         "measured_kg": 0.02663, "modelled_kg": 0.030795, "difference_kg": -0.004165}


def recorded_plan():
    """A two-site run on the hand-made signals, with the default start-up model (240 s + 30 s)."""
    config = parse_experiment({
        "traces": [{"path": str(TRACES / "watttime_moer_2026-01-11_4regions.csv")}],  # unread: the plan is on SIGNALS
        "token_budget": 1e9,
        "sites": {site: {"region": SIGNALS[site].region, "training_power_w": 2024, "idle_power_w": idle_w,
                         "tokens_per_s": 1000} for site, idle_w in IDLE_W.items()},
        "runs": [{"name": "r", "policy": {"kind": "threshold"}, "sites": ["a", "b"]}],
    })
    return plan_recorded(config, config.runs[0], SIGNALS, T0_S, T0_S + 4 * STEP_S)


def intensity(site: str, t_s: float) -> float:
    return SIGNALS[site].value_at(t_s)


def assert_figures(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(actual[key], value, rel_tol=1e-12, abs_tol=1e-15), (key, actual[key], value)


def test_measured_against_modelled_by_site_and_in_total():
    result = measured_provisioning(WINDOWS, modelled_start_s=MODELLED_S, idle_power_w=IDLE_W,
                                   intensity_g_per_kwh=intensity)
    assert result.keys() == {"modelled_start_s", "by_site", "total"}
    assert result["modelled_start_s"] == MODELLED_S
    assert result["by_site"].keys() == EXPECTED.keys()
    for site, expected in EXPECTED.items():
        assert_figures(result["by_site"][site], expected)
    assert_figures(result["total"], TOTAL)
    assert isinstance(result["total"]["num_never_ready"], int)


def test_the_plan_gives_the_model_the_idle_powers_and_the_intensity():
    plan = recorded_plan()
    assert intensity_of(plan)("a", at(7)) == 400.0
    assert intensity_of(plan)("b", at(1)) == 200.0
    with pytest.raises(CurtailError, match="site 'c' is not in run 'r'"):
        intensity_of(plan)("c", at(0))
    assert measured_provisioning_of(plan, WINDOWS) == measured_provisioning(
        WINDOWS, modelled_start_s=MODELLED_S, idle_power_w=IDLE_W, intensity_g_per_kwh=intensity)


def test_site_capacity_csv_as_the_run_writes_it(tmp_path):
    """The run's own file, None written as empty cells: window a never ready, b ready after 360 s."""
    wall = {"s": 2000.0}
    capacity = SiteCapacity(site_bundles(["a", "b"], 1, 0.5, 0.0), request=lambda bundles, selectors: None,
                            list_nodes=list, clock=lambda: wall["s"])
    capacity.want("a", at(7))
    wall["s"] = 2090.0
    capacity.release("a")
    wall["s"] = 5000.0
    capacity.want("b", at(1))
    wall["s"] = 5360.0
    capacity.group_ready("b")
    capacity.release_all()
    capacity.write(tmp_path)
    result = measured_provisioning_of(recorded_plan(), pd.read_csv(tmp_path / CAPACITY_FILE))
    assert result["by_site"]["a"]["num_never_ready"] == 1
    assert math.isclose(result["by_site"]["a"]["measured_kg"], 0.0117 * 400 / 1000, rel_tol=1e-12)
    assert_figures(result["by_site"]["b"], EXPECTED["b"])


@pytest.mark.parametrize("windows", [pd.DataFrame(), WINDOWS.iloc[:0]], ids=["no columns", "header only"])
def test_no_windows_is_all_zeros(windows):
    result = measured_provisioning(windows, modelled_start_s=MODELLED_S, idle_power_w=IDLE_W,
                                   intensity_g_per_kwh=intensity)
    zeros = dict.fromkeys(TOTAL, 0.0)
    assert_figures(result["total"], zeros)
    for site in IDLE_W:
        assert_figures(result["by_site"][site], zeros)


def test_a_missing_column_is_named():
    with pytest.raises(CurtailError, match="no column group_ready_wall_s .*site_capacity.csv"):
        measured_provisioning(WINDOWS.drop(columns="group_ready_wall_s"), modelled_start_s=MODELLED_S,
                              idle_power_w=IDLE_W, intensity_g_per_kwh=intensity)


def test_a_site_without_idle_power_and_an_open_window_are_refused():
    with pytest.raises(CurtailError, match="site window 3 is of site 'b', which has no idle power"):
        measured_provisioning(WINDOWS, modelled_start_s=MODELLED_S, idle_power_w={"a": 468.0},
                              intensity_g_per_kwh=intensity)
    open_window = WINDOWS.assign(released_wall_s=[4000.0, None, 9000.0])
    with pytest.raises(CurtailError, match="site window 2 .* never ready nor released"):
        measured_provisioning(open_window, modelled_start_s=MODELLED_S, idle_power_w=IDLE_W,
                              intensity_g_per_kwh=intensity)
