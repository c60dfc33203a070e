"""What the benchmarks record of the machine they ran on (imported by the benchmark scripts)."""
from __future__ import annotations

import os
from pathlib import Path


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
