"""What a piece of work cost: time, memory, energy and emissions, and the bytes of Flower messages.

Both sides use it: a node meters each message it handles, the server meters each round. Energy is
**measured** where the machine exposes a counter (Intel RAPL under ``/sys/class/powercap``; NVIDIA
NVML through ``pynvml`` for a GPU the work used), otherwise **estimated** with a documented model:

    energy [J] = CPU seconds × watts per busy core  +  GPU seconds × watts per busy GPU

and every figure says which it is. Emissions are energy × the grid's carbon intensity (gCO2e/kWh),
set per node because nodes sit in different regions. Defaults (``EnergyModel``) are deliberately
round numbers an owner is expected to replace: 10 W per busy core (a 2-socket server CPU at TDP is
6–15 W per core), 250 W per busy GPU, 475 gCO2e/kWh (the IEA's world-average grid intensity).

codecarbon's ``OfflineEmissionsTracker`` was evaluated and not used: it made no network calls,
but its first ``start()`` in a process took ~2.8 s (hardware detection) and FedGuard starts a
fresh ``flwr-clientapp`` process per message, its CPU figure here is itself an estimate (no RAPL:
a TDP table × load), and it adds ~10 packages (rapidfuzz, authlib, questionary, prometheus-client…).

Message sizes are Flower 1.42's own wire format: a message travels as a tree of objects (the
message's metadata, its RecordDict, each record, each array and its ≤5 MB chunks), each object
serialized by ``deflate()`` and sent once per message (the message id, derived from the content,
is not part of it), so sender and receiver count the same bytes; gRPC/HTTP framing and TLS are not
counted, and a SuperLink that already holds an identical object (the same global model sent to
several nodes) stores it once, while every node still pulls its own copy.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message

from common.errors import ConfigError
from common.flower_internals import wire_object_sizes

#: Node-config (and server run-config) keys an owner sets for the energy model.
WATTS_PER_CORE_KEY = "watts-per-core"
GPU_WATTS_KEY = "gpu-watts"
CARBON_INTENSITY_KEY = "carbon-intensity"

_RAPL = Path("/sys/class/powercap")


@dataclass(frozen=True)
class EnergyModel:
    """How to turn busy time into energy where nothing is measured, and energy into emissions."""

    watts_per_core: float = 10.0
    gpu_watts: float = 250.0
    #: gCO2e per kWh of the grid that powers this machine.
    carbon_intensity: float = 475.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "node config") -> EnergyModel:
        """Read the owner's values (``watts-per-core``, ``gpu-watts``, ``carbon-intensity``); defaults otherwise."""
        values: dict[str, float] = {}
        for key, attr in (
            (WATTS_PER_CORE_KEY, "watts_per_core"),
            (GPU_WATTS_KEY, "gpu_watts"),
            (CARBON_INTENSITY_KEY, "carbon_intensity"),
        ):
            if key not in config:
                continue
            raw = config[key]
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = math.nan
            if isinstance(raw, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"{key} must be a non-negative number, got {raw!r}",
                    where=f"{where} '{key}'",
                    fix=f"e.g. {key}={getattr(cls, attr)} (watts, or gCO2e/kWh for carbon-intensity)",
                )
            values[attr] = value
        return cls(**values)


@dataclass
class Usage:
    """One metered piece of work. Exact figures: they stay where they were measured unless coarsened."""

    wall_seconds: float
    cpu_seconds: float
    peak_ram_bytes: int
    energy_joules: float
    #: "measured" only when every part used was read from a hardware counter; else "estimated".
    energy_label: str
    #: How the energy was obtained, e.g. "RAPL (CPU package)" or "CPU 3.1 s × 10 W/core".
    energy_source: str
    carbon_intensity: float
    gpu_seconds: float | None = None
    gpu_peak_bytes: int | None = None
    examples: int | None = None
    bytes_received: int | None = None
    bytes_sent: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def energy_wh(self) -> float:
        return self.energy_joules / 3600.0

    @property
    def emissions_g(self) -> float:
        return self.energy_joules / 3.6e6 * self.carbon_intensity

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["energy_wh"], out["emissions_g"] = self.energy_wh, self.emissions_g
        return out


def _rapl_domains() -> list[Path]:
    """Readable top-level RAPL package domains (``intel-rapl:N``), [] when the machine exposes none."""
    try:
        domains = sorted(p for p in _RAPL.glob("intel-rapl:*") if p.name.count(":") == 1)
        return [d for d in domains if os.access(d / "energy_uj", os.R_OK)]
    except OSError:
        return []


def _rapl_read(domains: list[Path]) -> list[tuple[int, int]] | None:
    try:
        return [
            (int((d / "energy_uj").read_text()), int((d / "max_energy_range_uj").read_text() or 0)) for d in domains
        ]
    except (OSError, ValueError):
        return None


def _rapl_joules(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> float:
    total = 0
    for (e0, wrap), (e1, _) in zip(before, after, strict=True):
        total += e1 - e0 if e1 >= e0 else e1 + wrap - e0  # the counter wraps at max_energy_range_uj
    return total / 1e6


def _cpu_seconds() -> float:
    """This process's CPU time (all threads) plus that of its finished, waited-for children."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def _peak_ram() -> int:
    """High-water resident memory of this process or its largest child (Linux reports KiB)."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, child_kb) * (1 if sys.platform == "darwin" else 1024)


def _cuda() -> Any | None:
    """torch.cuda when this process already uses a GPU (never imports torch itself)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except Exception:  # noqa: BLE001 - a broken driver means no GPU figures, not a failed round
        return None


def _nvml_energy_mj() -> float | None:
    """Total energy counter (mJ) of the current GPU via NVML (Volta or newer), None when unavailable."""
    try:
        import pynvml  # type: ignore[import-not-found]  # optional: nvidia-ml-py

        pynvml.nvmlInit()
        cuda = _cuda()
        index = cuda.current_device() if cuda is not None else 0
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except Exception:  # noqa: BLE001 - no NVML, no permission, or an older GPU: estimate instead
        return None


class Meter:
    """Meters one piece of work from construction (or ``restart``) to ``stop``; cheap: a few syscalls."""

    def __init__(self, model: EnergyModel | None = None) -> None:
        self.model = model or EnergyModel()
        self.examples: int | None = None
        self._domains = _rapl_domains()
        self.restart()

    def restart(self) -> None:
        self._wall0 = time.perf_counter()
        self._cpu0 = _cpu_seconds()
        self._rapl0 = _rapl_read(self._domains) if self._domains else None
        cuda = _cuda()
        self._gpu0: Any = None
        self._nvml0: float | None = None
        if cuda is not None:
            cuda.reset_peak_memory_stats()
            self._gpu0 = cuda.Event(enable_timing=True)
            self._gpu0.record()
            self._nvml0 = _nvml_energy_mj()

    def stop(self) -> Usage:
        wall = time.perf_counter() - self._wall0
        cpu = max(0.0, _cpu_seconds() - self._cpu0)
        parts: list[str] = []
        measured = True
        rapl1 = _rapl_read(self._domains) if self._rapl0 is not None else None
        if self._rapl0 is not None and rapl1 is not None:
            joules = _rapl_joules(self._rapl0, rapl1)
            parts.append(f"RAPL {len(self._domains)} CPU package(s), whole package")
        else:
            joules = cpu * self.model.watts_per_core
            measured = False
            parts.append(f"CPU {cpu:.3g} s × {self.model.watts_per_core:g} W per busy core")
        gpu_s: float | None = None
        gpu_peak: int | None = None
        cuda = _cuda()
        if cuda is not None and self._gpu0 is not None:
            end = cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            gpu_s = self._gpu0.elapsed_time(end) / 1000.0
            gpu_peak = int(cuda.max_memory_allocated())
            nvml1 = _nvml_energy_mj() if self._nvml0 is not None else None
            if self._nvml0 is not None and nvml1 is not None:
                joules += (nvml1 - self._nvml0) / 1000.0
                parts.append("NVML GPU energy counter")
            else:
                joules += gpu_s * self.model.gpu_watts
                measured = False
                parts.append(f"GPU {gpu_s:.3g} s × {self.model.gpu_watts:g} W")
        return Usage(
            wall_seconds=wall,
            cpu_seconds=cpu,
            peak_ram_bytes=_peak_ram(),
            energy_joules=joules,
            energy_label="measured" if measured else "estimated",
            energy_source="; ".join(parts),
            carbon_intensity=self.model.carbon_intensity,
            gpu_seconds=gpu_s,
            gpu_peak_bytes=gpu_peak,
            examples=self.examples,
        )


def energy_available() -> str:
    """ "measured" when this machine exposes a readable RAPL counter, else "estimated"."""
    return "measured" if _rapl_domains() else "estimated"


def message_bytes(msg: Message) -> int:
    """Bytes of ``msg`` in Flower's wire format: every object of its tree, deflated (``Message.deflate``
    already leaves out the message id; the delivery time is never serialized)."""
    return sum(wire_object_sizes(msg).values())


def coarsen(value: float, digits: int = 2) -> float:
    """Round up to ``digits`` significant digits (1234 → 1300, 0.01234 → 0.013): never under-reports.

    What a node sends when its owner allows resource figures: time, examples and energy track the
    dataset's size, so the exact values stay on the node.
    """
    if not math.isfinite(value) or value <= 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return float(f"{math.ceil(round(value / scale, 9)) * scale:.{digits}g}")


def wire_figures(usage: Usage) -> dict[str, float | int]:
    """The coarsened figures a node may send with a training reply (common.records resource keys)."""
    from common import records as R

    out: dict[str, float | int] = {
        R.WALL_SECONDS: coarsen(usage.wall_seconds),
        R.CPU_SECONDS: coarsen(usage.cpu_seconds),
        R.PEAK_RAM_MB: coarsen(usage.peak_ram_bytes / 2**20),
        R.ENERGY_WH: coarsen(usage.energy_wh),
        R.ENERGY_MEASURED: int(usage.energy_label == "measured"),
        R.EMISSIONS_G: coarsen(usage.emissions_g),
        R.CARBON_INTENSITY: usage.carbon_intensity,  # the owner's declared grid value: not size-related
    }
    if usage.examples is not None:
        out[R.EXAMPLES_PROCESSED] = coarsen(usage.examples)
    if usage.gpu_seconds is not None:
        out[R.GPU_SECONDS] = coarsen(usage.gpu_seconds)
    if usage.gpu_peak_bytes is not None:
        out[R.GPU_PEAK_MB] = coarsen(usage.gpu_peak_bytes / 2**20)
    return out
