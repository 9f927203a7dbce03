"""A run's energy and emissions as CodeCarbon writes them: ``emissions.csv``, one row per site.

People compare training emissions through CodeCarbon's ``emissions.csv``; every run directory
carries one with its columns, in its units (``duration`` s, ``emissions`` kg CO2eq,
``emissions_rate`` kg/s, powers W, energies kWh). curtail's accounting fills it:

- one row per site of the run, ``project_name`` = ``EXPERIMENT/RUN``, ``run_id`` = the site;
- ``duration``: the site's provisioned seconds (training and provisioned idle);
- ``gpu_energy``: the site's IT energy (the configured or measured power model covers the site's
  accelerators and their hosts; curtail does not split CPU and memory out, so ``cpu_*`` and
  ``ram_*`` are 0); ``energy_consumed`` = ``gpu_energy × pue``, the energy the grid supplied;
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
        rows.append({
            "timestamp": summary["finish"].removesuffix("Z"),
            "project_name": f"{experiment}/{summary['run']}",
            "run_id": site,
            "duration": duration_s,
            "emissions": emissions_kg,
            "emissions_rate": emissions_kg / duration_s if duration_s > 0 else 0.0,
            "cpu_power": 0.0,
            "gpu_power": it_energy_kwh * _J_PER_KWH / duration_s if duration_s > 0 else 0.0,
            "ram_power": 0.0,
            "cpu_energy": 0.0,
            "gpu_energy": it_energy_kwh,
            "ram_energy": 0.0,
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
