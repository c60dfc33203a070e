"""Where training and prediction run (train_{model}, predict_{model}, apply): the device
(CUDA when present, else the CPU), the mixed-precision dtype and its autocast context, the
gradient scaler that fp16 needs, and moving a batch to the device. One code path for GPU and CPU.

Mixed precision on CUDA: bf16 autocast where the GPU computes bf16 natively (compute capability
8.0 and later: A100, H100, L4, RTX 30xx and later); fp16 autocast with a
:class:`torch.amp.GradScaler` on older GPUs (V100, T4), whose bf16 is only emulated (slow).
bf16 has fp32's exponent range, so its gradients neither underflow nor overflow and need no
scaling; fp16's 5-bit exponent flushes small gradients to zero unless the loss is scaled up
first, and the scaler skips a step whose gradients overflowed (and halves its scale). The
numerics of both paths against fp32 are tested on the CPU (tests/test_amp.py).
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


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether ``device`` (a CUDA device) computes bf16 natively: compute capability 8 or later
    (ROCm: always). ``torch.cuda.is_bf16_supported()`` alone also says yes for the emulated bf16
    of older GPUs, which is slower than fp16 there."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def amp_dtype(device: torch.device, enabled: bool = True,
              cpu_bf16: bool = False) -> torch.dtype | None:
    """Autocast dtype: on CUDA bf16 where native (:func:`cuda_bf16_native`), else fp16 (train
    it with :func:`grad_scaler`); bf16 on the CPU only with ``cpu_bf16`` (prediction and
    sampling, see :func:`cpu_bf16_enabled`); else None (fp32)."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if cuda_bf16_native(device) else torch.float16
    if device.type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return None


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The loss scaler of a training under autocast ``dtype``: enabled for fp16 only (on any
    device type torch supports, the CPU included); a pass-through for bf16 and fp32."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


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
