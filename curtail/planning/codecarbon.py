"""A run's energy and emissions as CodeCarbon writes them: ``emissions.csv``, one row per site.

People compare training emissions through CodeCarbon's ``emissions.csv``; every run directory
carries one with its columns, in its units (``duration`` s, ``emissions`` kg CO2eq,
``emissions_rate`` kg/s, powers W, energies kWh). curtail's accounting fills it:

- one row per site of the run, ``project_name`` = ``EXPERIMENT/RUN``, ``run_id`` = the site;
- ``duration``: the site's provisioned seconds (training and provisioned idle);
- ``cpu_energy`` / ``ram_energy``: the site's workers' CPU and memory energy while training,
  where ``[training] host_power = "codecarbon"`` measured them (``measured_host_power_w`` of the
  summary × the site's training hours), else 0; ``gpu_energy``: the rest of the site's IT energy
  (the configured or measured power of its accelerators — and of their hosts, where not measured
  apart); ``energy_consumed`` = (``cpu_energy + gpu_energy + ram_energy``) × ``pue``, the energy
  the grid supplied;
- ``region`` the site's grid region; ``pue`` the site's;
- ``codecarbon_version`` is empty: curtail wrote the file, not CodeCarbon.

The rows sum to the run's ``energy_kwh`` and ``emissions_kg`` in ``summary.json``.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Any

import pandas as pd

from curtail.config import SiteConfig

FILE = "emissions.csv"
COLUMNS = (
    "timestamp", "project_name", "run_id", "duration", "emissions", "emissions_rate", "cpu_power", "gpu_power",
    "ram_power", "cpu_energy", "gpu_energy", "ram_energy", "energy_consumed", "country_name", "country_iso_code",
    "region", "cloud_provider", "cloud_region", "os", "python_version", "codecarbon_version", "cpu_count",
    "cpu_model", "gpu_count", "gpu_model", "longitude", "latitude", "ram_total_size", "tracking_mode", "on_cloud",
    "pue",
)
_S_PER_H = 3600.0
_J_PER_KWH = 3.6e6


def emissions_frame(summary: Mapping[str, Any], sites: Mapping[str, SiteConfig], experiment: str) -> pd.DataFrame:
    """CodeCarbon's ``emissions.csv`` rows for a run's ``summary`` (one per site)."""
    rows = []
    for site in summary["sites"]:
        config = sites[site]
        hours = summary["site_hours"][site]
        duration_s = (hours["training"] + hours["provisioned_idle"]) * _S_PER_H
        energy_kwh, emissions_kg = summary["energy_kwh_by_site"][site], summary["emissions_kg_by_site"][site]
        it_energy_kwh = energy_kwh / config.pue
        host_w = summary.get("measured_host_power_w", {}).get(site, {"cpu_w": 0.0, "ram_w": 0.0})
        cpu_kwh, ram_kwh = (host_w[key] * hours["training"] / 1000 for key in ("cpu_w", "ram_w"))
        gpu_kwh = it_energy_kwh - cpu_kwh - ram_kwh
        rows.append({
            "timestamp": summary["finish"].removesuffix("Z"),
            "project_name": f"{experiment}/{summary['run']}",
            "run_id": site,
            "duration": duration_s,
            "emissions": emissions_kg,
            "emissions_rate": emissions_kg / duration_s if duration_s > 0 else 0.0,
            "cpu_power": _mean_w(cpu_kwh, duration_s),
            "gpu_power": _mean_w(gpu_kwh, duration_s),
            "ram_power": _mean_w(ram_kwh, duration_s),
            "cpu_energy": cpu_kwh,
            "gpu_energy": gpu_kwh,
            "ram_energy": ram_kwh,
            "energy_consumed": energy_kwh,
            "country_name": "", "country_iso_code": "",
            "region": config.region,
            "cloud_provider": "", "cloud_region": "",
            "os": platform.platform(),
            "python_version": platform.python_version(),
            "codecarbon_version": "",
            "cpu_count": "", "cpu_model": "",
            "gpu_count": config.num_gpus,
            "gpu_model": "",
            "longitude": "", "latitude": "", "ram_total_size": "",
            "tracking_mode": "machine",
            "on_cloud": "N",
            "pue": config.pue,
        })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _mean_w(energy_kwh: float, duration_s: float) -> float:
    return energy_kwh * _J_PER_KWH / duration_s if duration_s > 0 else 0.0
