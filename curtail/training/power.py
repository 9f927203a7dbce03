"""Measured GPU power: an NVML sampler for the energy accounting of real runs.

:class:`PowerSampler` polls the board power of one GPU (NVML, via the ``nvidia-ml-py``
package, imported lazily) on a background thread and, where the GPU has one, reads its
cumulative energy counter, so a site can report the watts it actually drew instead of the
constant power model. Where there is no NVML (a CPU machine, the package missing, no driver)
:meth:`PowerSampler.create` returns ``None`` and callers keep the modelled power.

Several sites sharing one GPU (fractional GPU resources) each see the whole board's power.

Example::

    sampler = PowerSampler.create()          # None without NVML
    if sampler is not None:
        sampler.start()
        ...                                   # train
        reading = sampler.stop()              # PowerReading(mean_power_w=..., energy_j=...)
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PowerReading:
    """What one sampling interval measured on one GPU."""

    mean_power_w: float
    max_power_w: float
    energy_j: float
    duration_s: float
    num_samples: int
    gpu_name: str


class PowerSampler:
    """Samples one GPU's board power every ``interval_s`` seconds between start() and stop()."""

    def __init__(self, nvml: Any, handle: Any, interval_s: float = 0.1) -> None:
        self._nvml, self._handle, self.interval_s = nvml, handle, interval_s
        name = nvml.nvmlDeviceGetName(handle)
        self.gpu_name = name.decode() if isinstance(name, bytes) else str(name)
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_s = 0.0
        self._energy_start_mj: int | None = None

    @classmethod
    def create(cls, device_index: int | None = None, interval_s: float = 0.1) -> PowerSampler | None:
        """A sampler for CUDA device ``device_index`` (default: the first visible one), or
        ``None`` where NVML is unavailable."""
        try:
            import pynvml  # the nvidia-ml-py package

            pynvml.nvmlInit()
            handle = _handle(pynvml, device_index or 0)
            pynvml.nvmlDeviceGetPowerUsage(handle)  # raises where power is not readable
            return cls(pynvml, handle, interval_s)
        except Exception:  # noqa: BLE001 -- no NVML of any kind: fall back to the power model
            return None

    def power_w(self) -> float:
        """The board power now (W)."""
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the power sampler is already running; stop() it first")
        self._samples = []
        self._stop.clear()
        self._energy_start_mj = self._energy_mj()
        self._started_s = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="nvml-power", daemon=True)
        self._thread.start()

    def stop(self) -> PowerReading:
        if self._thread is None:
            raise RuntimeError("the power sampler was not started")
        self._stop.set()
        self._thread.join()
        self._thread = None
        duration_s = time.perf_counter() - self._started_s
        samples = self._samples or [self.power_w()]
        mean_w = sum(samples) / len(samples)
        end_mj = self._energy_mj()
        if self._energy_start_mj is not None and end_mj is not None and end_mj > self._energy_start_mj:
            energy_j = (end_mj - self._energy_start_mj) / 1000.0
        else:
            energy_j = mean_w * duration_s
        return PowerReading(mean_w, max(samples), energy_j, duration_s, len(samples), self.gpu_name)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._samples.append(self.power_w())
            except Exception:  # noqa: BLE001, S110 -- a failed read skips one sample
                pass
            self._stop.wait(self.interval_s)

    def _energy_mj(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:  # noqa: BLE001 -- older GPUs have no energy counter
            return None


def _handle(nvml: Any, device_index: int) -> Any:
    """The NVML handle of CUDA device ``device_index``, honouring CUDA_VISIBLE_DEVICES
    (indices or GPU UUIDs, as Ray sets it for fractional GPUs)."""
    visible = [item.strip() for item in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
    if device_index < len(visible):
        entry = visible[device_index]
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    return nvml.nvmlDeviceGetHandleByIndex(device_index)
