"""emissions.csv in CodeCarbon's columns and units, and a site's PUE in the accounting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import curtail
from curtail.config import ConfigError, load_experiment
from curtail.planning.codecarbon import COLUMNS

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo.toml"
# CodeCarbon 2.x/3.x header, as its trackers write it
CODECARBON_HEADER = (
    "timestamp,project_name,run_id,duration,emissions,emissions_rate,cpu_power,gpu_power,ram_power,cpu_energy,"
    "gpu_energy,ram_energy,energy_consumed,country_name,country_iso_code,region,cloud_provider,cloud_region,os,"
    "python_version,codecarbon_version,cpu_count,cpu_model,gpu_count,gpu_model,longitude,latitude,ram_total_size,"
    "tracking_mode,on_cloud,pue"
)


def simulate(tmp_path: Path, **site_changes: dict):
    experiment = load_experiment(DEMO)
    sites = {name: site.replace(**site_changes.get(name, {})) for name, site in experiment.sites.items()}
    result = curtail.simulate(experiment.replace(sites=sites), output_dir=tmp_path)
    (record,) = result.records
    return record


def test_every_run_writes_codecarbons_file_and_its_totals_are_the_summarys(tmp_path: Path) -> None:
    record = simulate(tmp_path)
    path = record.path / "emissions.csv"
    assert path.read_text().splitlines()[0] == CODECARBON_HEADER == ",".join(COLUMNS)
    frame = pd.read_csv(path)
    summary = record.summary
    assert list(frame.run_id) == summary["sites"]
    assert frame.emissions.sum() == pytest.approx(summary["emissions_kg"], rel=1e-12)
    assert frame.energy_consumed.sum() == pytest.approx(summary["energy_kwh"], rel=1e-12)
    for _, row in frame.iterrows():
        hours = summary["site_hours"][row.run_id]
        assert row.duration == pytest.approx((hours["training"] + hours["provisioned_idle"]) * 3600)
        assert row.gpu_power * row.duration / 3.6e6 == pytest.approx(row.gpu_energy)  # W · s → kWh
        assert row.emissions_rate * row.duration == pytest.approx(row.emissions)
        assert row.pue == 1.0 and row.gpu_energy == pytest.approx(row.energy_consumed)


def test_a_sites_pue_scales_its_energy_and_emissions_and_nothing_else(tmp_path: Path) -> None:
    plain = simulate(tmp_path / "plain")
    scaled = simulate(tmp_path / "pue", nem_sa={"pue": 1.4})
    before, after = plain.summary, scaled.summary
    assert after["tokens"] == before["tokens"] and after["site_hours"] == before["site_hours"]  # same schedule
    for key in ("energy_kwh_by_site", "emissions_kg_by_site"):
        assert after[key]["nem_sa"] == pytest.approx(1.4 * before[key]["nem_sa"])
        assert after[key]["spp_tx"] == pytest.approx(before[key]["spp_tx"])
    row = pd.read_csv(scaled.path / "emissions.csv").set_index("run_id").loc["nem_sa"]
    assert row.pue == 1.4 and row.energy_consumed == pytest.approx(1.4 * row.gpu_energy)
    assert row.gpu_energy == pytest.approx(before["energy_kwh_by_site"]["nem_sa"])  # the IT energy is unchanged


def test_a_pue_below_one_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pue"):
        simulate(tmp_path, nem_sa={"pue": 0.9})


@pytest.mark.slow
def test_a_real_run_measures_its_workers_cpu_and_memory_and_emissions_csv_splits_them_out(two_runs) -> None:
    """conftest.py's second tiny run has ``host_power = "codecarbon"``: every worker measured its
    own process; the watts join the training power, and emissions.csv carries them as CPU and RAM."""
    plain, measured = two_runs
    summary = measured.summary
    host = summary["measured_host_power_w"]
    assert sorted(host) == sorted(summary["sites"]) and summary["host_power_source"] == "codecarbon"
    assert all(w["cpu_w"] > 0 and w["ram_w"] > 0 for w in host.values()), host
    assert "measured_host_power_w" not in plain.summary or plain.summary["measured_host_power_w"] == {}
    frame = pd.read_csv(measured.run_dir / "emissions.csv").set_index("run_id")
    assert frame.energy_consumed.sum() == pytest.approx(summary["energy_kwh"], rel=1e-9)
    assert frame.emissions.sum() == pytest.approx(summary["emissions_kg"], rel=1e-9)
    for site, watts in host.items():
        training_h = summary["site_hours"][site]["training"]
        assert frame.loc[site, "cpu_energy"] == pytest.approx(watts["cpu_w"] * training_h / 1000)
        assert frame.loc[site, "ram_energy"] == pytest.approx(watts["ram_w"] * training_h / 1000)
        it_kwh = frame.loc[site, "cpu_energy"] + frame.loc[site, "gpu_energy"] + frame.loc[site, "ram_energy"]
        assert it_kwh * frame.loc[site, "pue"] == pytest.approx(frame.loc[site, "energy_consumed"])
    # the measured watts were added: the second run's energy exceeds the first's by them
    assert summary["energy_kwh"] > plain.summary["energy_kwh"]

