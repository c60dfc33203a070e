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


def unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative error of rounding a value to ``dtype`` (half its machine epsilon)."""
    return torch.finfo(dtype).eps / 2


def stored_rounding_atol(fn, inputs: dict, keys, *, model: torch.nn.Module,
                         dtype: torch.dtype = torch.float16, probes: int = 2,
                         factor: float = 4.0) -> dict:
    """Per-output absolute tolerance between ``fn`` on inputs stored in ``dtype`` (a feature
    cache) and ``fn`` on the float32 values they were rounded from (the encoder run again).

    Storing rounds each value ``f`` to ``f (1 + r)`` with ``|r| <= u = u(dtype)``; the encoder
    run again in another batch or tile layout moves ``f`` by its reordering bound, relative
    ``e = reordering_atol(model)`` for features of order one. How much the outputs move under
    such a rounding is the computation's own property, so it is measured rather than guessed:
    ``fn`` is run on the stored inputs rounded to ``dtype`` once more on a shifted grid
    (``round(f c) / c`` for ``c`` in [1, 2): a fresh rounding error of the same size and
    structure: equal values get equal errors) and the largest change of each output over
    ``probes`` such roundings is kept, scaled by ``(u + e) / u`` for the reordering. ``factor``
    (4) times that covers the one rounding the cache made with room for the probes' scatter;
    ``e`` times each output's magnitude is added for outputs that hardly respond.
    ``fn(inputs) -> {name: tensor}``; returns ``{name: atol}`` in the outputs' units."""
    u, e = unit_roundoff(dtype), reordering_atol(model)
    base = fn(inputs)
    change = {name: 0.0 for name in base}
    for i in range(probes):
        c = 1.0 + (i + 0.5) / probes / 1.7   # irrational-ish shifts of the grid in [1, 2)
        probe = dict(inputs)
        for k in keys:
            f = inputs[k].float()
            probe[k] = (f * c).to(dtype).float() / c
        for name, value in fn(probe).items():
            change[name] = max(change[name], float((value - base[name]).abs().max()))
    return {name: factor * ch * (u + e) / u + e * float(base[name].abs().max())
            for name, ch in change.items()}
