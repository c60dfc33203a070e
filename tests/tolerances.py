"""Float tolerances derived from the dtype and the size of the computation, never read off one
machine's result.

Two evaluations of the same network that differ only in how the CPU kernels order their sums
(batch size, thread count, SIMD width: Intel and AMD machines pick different kernels) agree up
to the rounding of their longest dot products. A float sum of ``n`` terms is exact to within
``n * eps * sum|terms|`` (the standard bound gamma_n), so two orders differ by at most twice
that. With activations of order one, a network whose longest reduction has ``n`` terms differs
by about ``2 * n * eps`` per evaluation, and a sampler that evaluates it ``k`` times (each step
contracting, or clipping, what came before) by ``k`` times that.
"""
from __future__ import annotations

import torch


def longest_reduction(model: torch.nn.Module) -> int:
    """Terms of the longest dot product the model computes: the largest fan-in of a weight
    (``in_channels * kernel area`` of a convolution, ``in_features`` of a linear layer)."""
    return max(int(p[0].numel()) for p in model.parameters() if p.dim() >= 2)


def reordering_atol(model: torch.nn.Module, *, evaluations: int = 1,
                    dtype: torch.dtype = torch.float32, scale: float = 1.0) -> float:
    """Absolute tolerance between two runs of ``model`` (``evaluations`` times in a chain) that
    differ only in summation order, for outputs of magnitude ``scale``."""
    return 2.0 * evaluations * longest_reduction(model) * torch.finfo(dtype).eps * scale
