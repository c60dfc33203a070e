"""Where training and prediction run (train_{model}, predict_{model}, apply): the device
(CUDA when present, else the CPU), the mixed-precision dtype and its autocast context, and moving
a batch to the device. One code path for GPU and CPU.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from histomap.compat import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first CUDA device if available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def amp_dtype(device: torch.device, enabled: bool = True,
              cpu_bf16: bool = False) -> torch.dtype | None:
    """Autocast dtype: bf16 (or fp16 where bf16 is unsupported) on CUDA; bf16 on the CPU only
    with ``cpu_bf16`` (prediction and sampling, see :func:`cpu_bf16_enabled`); else None."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX through oneDNN)."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_enabled(setting: bool | str | None, default: bool) -> bool:
    """Resolve a ``cpu_bf16`` config value: ``true`` / ``false`` as given; ``"auto"`` (or None)
    the task's measured ``default`` (benchmarks/cpu_bf16.py) on a CPU with native bf16."""
    if setting is None or (isinstance(setting, str) and setting.lower() == "auto"):
        return bool(default) and cpu_has_bf16()
    if isinstance(setting, str):
        if setting.lower() not in ("true", "false"):
            raise ValueError(f"cpu_bf16 must be auto, true or false, got {setting!r}")
        return setting.lower() == "true"
    return bool(setting)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for ``dtype``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested tuple/list/dict) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
