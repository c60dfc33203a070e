"""What the benchmarks record of the machine they ran on (imported by the benchmark scripts)."""
from __future__ import annotations

import logging
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

from histomap.compat import torch


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo``; None where the file or the line is absent
    (the caller falls back, e.g. to ``platform.processor()``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), None)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``"2.0 / 1.6 / 1.5"``."""
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def machine() -> str:
    """One line: CPU model, core count, GPU (when CUDA is available) and the torch version."""
    cpu = cpu_model() or platform.processor() or "unknown CPU"
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Stage:
    """Times a stage and records its peak RSS (and CUDA peak) into ``rows``."""

    def __init__(self, rows: list[dict], name: str, device: torch.device,
                 tissue_mm2: float = np.nan, **extra):
        self.rows, self.name, self.device = rows, name, device
        self.tissue_mm2, self.extra = tissue_mm2, extra

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM to the current RSS
            self.rss_method = "VmHWM reset"
        except OSError:
            self.rss_method = "ru_maxrss"
        self.rss_before = _status_mib("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.start
        peak = _status_mib("VmHWM") if self.rss_method == "VmHWM reset" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row = {"stage": self.name, "seconds": seconds,
               "tissue_mm2": self.tissue_mm2,
               "mm2_per_s": self.tissue_mm2 / seconds if seconds > 0 else np.nan,
               "peak_rss_mib": peak, "rss_before_mib": self.rss_before,
               "cuda_max_allocated_mib": torch.cuda.max_memory_allocated(self.device) / 2 ** 20
               if self.device.type == "cuda" else np.nan, **self.extra}
        self.rows.append(row)
        logging.getLogger(__name__).info("%s: %.1f s, %.3g mm^2/s, peak RSS %.0f MiB",
                                         self.name, seconds, row["mm2_per_s"], peak)
        return False
