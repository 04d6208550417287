"""Machine load for the adaptive controllers: live telemetry (psutil, pynvml when a GPU is there) or a simulated load.

A controller sees one number, `Telemetry.load` in [0, 1]: the busiest of CPU, memory and GPU utilisation. The
simulated mode draws that load from a seeded generator instead (`SimulatedLoad`), so a run is repeatable and the
load the controllers face does not depend on what else the machine happens to run.

Energy is read where the machine exposes a counter, never estimated: Linux RAPL (`/sys/class/powercap/intel-rapl:N/
energy_uj`, the CPU packages' energy, the whole machine's and not this process's alone; root-only on recent kernels),
NVML (the GPU's energy counter, or its power draw times the time where the counter is missing) and the battery level
(`psutil.sensors_battery`). `EnergyMeter.source` says which counter a reading came from, 'n/a' where none is there.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

RAPL_ROOT = Path("/sys/class/powercap")


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


# ---------------------------------------------------------------------------------------------------------- energy


def rapl_zones(root: str | Path = RAPL_ROOT) -> list[Path]:
    """Return the top-level RAPL zones (`intel-rapl:N`, one per CPU package; their sub-zones `intel-rapl:N:M` are
    part of the package's count, so they are left out)."""
    root = Path(root)
    return sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1) if root.is_dir() else []


def read_rapl(root: str | Path = RAPL_ROOT) -> dict[str, tuple[int, int]] | None:
    """Return `{zone: (energy_uj, max_energy_range_uj)}` of every package, or None where there is no zone or a
    counter cannot be read (no RAPL, or root-only as on Linux >= 5.10)."""
    zones = rapl_zones(root)
    try:
        out = {z.name: (int((z / "energy_uj").read_text()), int((z / "max_energy_range_uj").read_text()))
               for z in zones}
    except (OSError, ValueError):
        return None
    return out or None


def rapl_joules(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> float:
    """Return the joules between two `read_rapl` readings, summed over packages; a counter that wrapped past its
    `max_energy_range_uj` (once) is unwrapped."""
    total = 0
    for zone, (e0, span) in before.items():
        delta = after[zone][0] - e0
        total += delta + span if delta < 0 else delta  # wrapped at max_energy_range_uj
    return total / 1e6


def _nvml_handle(index: int = 0):
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # pynvml without a driver or without that GPU: no reading
        return None


def _nvml_reading(handle) -> tuple[float | None, float | None]:
    """Return (energy counter in J or None where unsupported, power draw in W or None)."""
    import pynvml

    energy = power = None
    try:
        energy = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000  # mJ since the driver loaded (Volta+)
    except Exception:
        pass
    try:
        power = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000  # mW
    except Exception:
        pass
    return energy, power


def battery() -> dict | None:
    """Return `{'battery_percent', 'power_plugged'}` from `psutil.sensors_battery()`, or None without a battery."""
    try:
        import psutil

        b = psutil.sensors_battery()
    except (ImportError, AttributeError, OSError, NotImplementedError):
        return None
    return None if b is None else dict(battery_percent=float(b.percent), power_plugged=b.power_plugged)


@dataclass
class EnergySpan:
    """The energy of one measured span: joules (None where no counter is there), seconds, the counter's name."""

    source: str
    joules: float | None = None
    seconds: float = 0.0


class EnergyMeter:
    """Reads the machine's energy counter around a span of work (`measure`): RAPL, NVML or none ('n/a').

    `prefer_gpu`: NVML first (the model runs on the GPU), else RAPL first. A counter that fails mid-run gives None
    for that span, not a figure.
    """

    def __init__(self, prefer_gpu: bool = False, gpu_index: int = 0, rapl_root: str | Path = RAPL_ROOT):
        self.rapl_root = rapl_root
        rapl = read_rapl(rapl_root) is not None
        self.handle = _nvml_handle(gpu_index) if prefer_gpu or not rapl else None
        nvml = self.handle is not None and any(v is not None for v in _nvml_reading(self.handle))
        order = ("nvml", "rapl") if prefer_gpu else ("rapl", "nvml")
        self.source = next((s for s in order if {"rapl": rapl, "nvml": nvml}[s]), "n/a")

    def _read(self):
        if self.source == "rapl":
            return read_rapl(self.rapl_root)
        if self.source == "nvml":
            return _nvml_reading(self.handle)
        return None

    def _joules(self, before, after, seconds: float) -> float | None:
        if before is None or after is None:
            return None
        if self.source == "rapl":
            return rapl_joules(before, after) if before.keys() == after.keys() else None
        (e0, p0), (e1, p1) = before, after
        if e0 is not None and e1 is not None:
            return e1 - e0
        return (p0 + p1) / 2 * seconds if p0 is not None and p1 is not None else None

    @contextmanager
    def measure(self) -> Iterator[EnergySpan]:
        """Yield an `EnergySpan` whose `joules` and `seconds` are set when the block ends."""
        span = EnergySpan(self.source)
        before, t0 = self._read(), time.perf_counter()
        try:
            yield span
        finally:
            span.seconds = time.perf_counter() - t0
            span.joules = self._joules(before, self._read(), span.seconds)


def power_status(rapl_root: str | Path = RAPL_ROOT) -> dict:
    """Return what the machine exposes: the energy counter `EnergyMeter` uses ('rapl', 'nvml' or 'n/a') and the
    battery's level and plug state (None without a battery)."""
    return dict(energy_source=EnergyMeter(rapl_root=rapl_root).source,
                **(battery() or dict(battery_percent=None, power_plugged=None)))
