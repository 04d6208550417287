"""Machine load for the adaptive controllers: live telemetry (psutil, pynvml when a GPU is there) or a simulated load.

A controller sees one number, `Telemetry.load` in [0, 1]: the busiest of CPU, memory and GPU utilisation. The
simulated mode draws that load from a seeded generator instead (`SimulatedLoad`), so a run is repeatable and the
load the controllers face does not depend on what else the machine happens to run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Telemetry:
    """One reading: utilisations in [0, 1] (GPU fields None without a GPU) and whether they were simulated."""

    cpu: float
    memory: float
    gpu: float | None = None
    gpu_memory: float | None = None
    simulated: bool = False

    @property
    def load(self) -> float:
        """Return the load a controller reads: the busiest resource."""
        return max(v for v in (self.cpu, self.memory, self.gpu, self.gpu_memory) if v is not None)

    def to_dict(self) -> dict:
        """Return the reading and its load as a flat dict."""
        return {**asdict(self), "load": self.load}


def _gpu() -> tuple[float | None, float | None]:
    try:
        import pynvml
    except ImportError:
        return None, None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return util, mem.used / mem.total
    except Exception:  # pynvml without a driver (a CPU machine): no GPU reading
        return None, None


def read_telemetry() -> Telemetry:
    """Return a live reading: CPU utilisation since the previous call, memory in use, GPU when pynvml finds one."""
    import psutil

    gpu, gpu_mem = _gpu()
    return Telemetry(cpu=psutil.cpu_percent(interval=None) / 100, memory=psutil.virtual_memory().percent / 100,
                     gpu=gpu, gpu_memory=gpu_mem)


class SimulatedLoad:
    """Seeded load readings drawn uniformly from [low, high]: the 'simulated load on' mode of the evaluation."""

    def __init__(self, seed: int = 0, low: float = 0.0, high: float = 0.9):
        if not 0 <= low <= high <= 1:
            raise ValueError(f"simulated load needs 0 <= low <= high <= 1, got low={low}, high={high}")
        self.rng = np.random.default_rng(seed)
        self.low, self.high = low, high

    def __call__(self) -> Telemetry:
        """Return the next simulated reading (CPU carries the load; memory stays below it)."""
        load = float(self.rng.uniform(self.low, self.high))
        return Telemetry(cpu=load, memory=load * 0.5, simulated=True)

    def loads(self, n: int) -> list[float]:
        """Return the next `n` simulated loads."""
        return [self().load for _ in range(n)]
