"""A site worker's CPU and memory power, measured by CodeCarbon (``[training] host_power``).

NVML measures a site's GPUs (:mod:`curtail.training.power`); the hosts around them draw power
too. :class:`HostPowerMeter` runs one CodeCarbon tracker per worker process in its ``process``
mode, so each worker counts its own share of the machine — several sites or ranks on one node
are not counted twice: the CPU through RAPL where the kernel exposes it, else CodeCarbon's CPU
model (the processor's TDP from its table, times this process's CPU load); memory through
CodeCarbon's memory model for this process. Between :meth:`HostPowerMeter.start` and
:meth:`HostPowerMeter.stop` it returns the mean CPU and memory watts.

Needs CodeCarbon (``pip install 'curtail[host-power]'``); the tracker runs offline (no network,
nothing written: curtail writes the run's ``emissions.csv`` itself).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any

_J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class HostReading:
    """A worker process's CPU and memory over one measured interval."""

    cpu_power_w: float
    ram_power_w: float
    duration_s: float


def require_codecarbon() -> None:
    """Raise a message that says how to get CodeCarbon when it is missing."""
    try:
        import codecarbon  # noqa: F401
    except ImportError as missing:
        raise ImportError("host_power = \"codecarbon\" needs CodeCarbon: pip install 'curtail[host-power]' "
                          f"(or set host_power = \"off\") ({missing})") from missing


class HostPowerMeter:
    """CPU and memory watts of this process between :meth:`start` and :meth:`stop`."""

    def __init__(self, tracker: Any, measure_power_s: float) -> None:
        self._tracker = tracker
        self.measure_power_s = measure_power_s
        self._task = 0

    @classmethod
    def create(cls, measure_power_s: float = 1.0) -> HostPowerMeter:
        """A started CodeCarbon tracker of this process (offline; it samples every ``measure_power_s``)."""
        require_codecarbon()
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):  # its start-up banner
            tracker = OfflineEmissionsTracker(
                country_iso_code="USA",  # any: curtail prices emissions with the sites' own grid signals
                save_to_file=False, log_level="error", tracking_mode="process",
                measure_power_secs=measure_power_s, allow_multiple_runs=True,
            )
        return cls(tracker, measure_power_s)

    def start(self) -> None:
        self._task += 1
        self._tracker.start_task(f"command-{self._task}")

    def stop(self) -> HostReading:
        data = self._tracker.stop_task()
        duration_s = max(float(data.duration), 1e-9)
        return HostReading(cpu_power_w=float(data.cpu_energy) * _J_PER_KWH / duration_s,
                           ram_power_w=float(data.ram_energy) * _J_PER_KWH / duration_s, duration_s=duration_s)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a tracker that never started has nothing to stop
            self._tracker.stop()
