"""Mass consistency: predicted HR counts that add up to the measured LR map.

Arrow: SR model + pairs -> **HR maps** (predict_*, apply_sr): after sampling, a predicted HR map
in counts is projected so that, summed over the ``scale x scale`` HR pixels of an LR pixel, it
equals that LR pixel's measured counts (:func:`project_mass`). Only the LR patch enters, never
the truth. The projected counts are taken back to the model's units with the same LR-patch
statistics the counts came from (:func:`prediction_normaliser`, the inverse of
:func:`.normalisation.prediction_denormaliser`).

The projection is **multiplicative** per LR block: every HR pixel of a block is scaled by
(measured LR counts) / (predicted block sum). Counts stay non-negative (an additive shift would
push zero pixels below 0, and clipping them would break the sum again), zeros stay zeros, and
the relative pattern the method drew inside the block is kept. A block whose prediction sums
to 0 (or less) while the LR pixel measured counts gets the LR counts spread evenly over its
pixels. With ``edge="ceil"`` the last LR row and column reach past the HR patch: such a block
is held to the share of the LR counts that its in-patch pixels make of the block
(``n_in / scale^2``), an estimate (the measurement does not say where in the block the counts
lie); every full block is exact.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np


def block_sums(values: np.ndarray, scale: int, lr_hw: tuple[int, int]) -> np.ndarray:
    """(G, h, w) sums of (G, H, W) ``values`` over the ``scale x scale`` HR pixels of each LR
    pixel; HR pixels past the patch (``edge="ceil"``) count as 0."""
    g, (hh, ww) = values.shape[0], values.shape[-2:]
    h, w = lr_hw
    if hh > h * scale or ww > w * scale:
        raise ValueError(f"HR map {hh} x {ww} is larger than the LR map {h} x {w} x {scale}")
    padded = np.zeros((g, h * scale, w * scale), np.float64)
    padded[:, :hh, :ww] = values
    return padded.reshape(g, h, scale, w, scale).sum(axis=(2, 4))


def _on_hr(lr_values: np.ndarray, scale: int, hr_hw: tuple[int, int]) -> np.ndarray:
    """Each LR pixel's value on the HR pixels under it, cropped to the HR patch."""
    up = np.repeat(np.repeat(lr_values, scale, axis=-2), scale, axis=-1)
    return up[..., :hr_hw[0], :hr_hw[1]]


def project_mass(hr_counts: np.ndarray, lr_counts: np.ndarray, scale: int) -> np.ndarray:
    """Predicted HR counts (G, H, W) scaled per LR block so that every block sums to its LR
    pixel's counts (G, h, w) (module docstring: multiplicative, an even spread where the
    prediction sums to 0, the in-patch share for blocks cut by the patch edge). Negative
    predicted counts are set to 0 first."""
    hr = np.clip(np.asarray(hr_counts, np.float64), 0.0, None)
    lr = np.asarray(lr_counts, np.float64)
    scale = int(scale)
    hr_hw = tuple(hr.shape[-2:])
    n_in = block_sums(np.ones((1, *hr_hw)), scale, lr.shape[-2:])[0]
    target = lr * (n_in / scale ** 2)[None]
    sums = block_sums(hr, scale, lr.shape[-2:])
    positive = sums > 0
    factor = np.divide(target, sums, out=np.zeros_like(target), where=positive)
    even = np.where(positive, 0.0, np.divide(target, n_in[None], out=np.zeros_like(target),
                                              where=n_in[None] > 0))
    return hr * _on_hr(factor, scale, hr_hw) + _on_hr(even, scale, hr_hw)


def lr_counts_of(arrays: Mapping, attrs: Mapping) -> Callable[[int], np.ndarray]:
    """Patch i -> its measured LR counts (G, h, w): the stored LR map (in HR units,
    :mod:`histomap.data.srpairs` docstring) taken back to the sums of ``scale x scale`` HR
    pixels with the pairs' own LR statistics (the LR map is an input, never the truth)."""
    kind, scale = attrs["normalisation"], int(attrs["scale"])

    def counts(i: int) -> np.ndarray:
        lr = np.asarray(arrays["lr"][i], np.float64)
        if kind == "minmax":
            lo = np.asarray(arrays["lr_min"][i], np.float64)[:, None, None]
            hi = np.asarray(arrays["lr_max"][i], np.float64)[:, None, None]
            return lr * (hi - lo) + lo
        if kind == "log1p":
            target = float(attrs.get("lr_target_sum", attrs["hr_target_sum"]))
            library = np.asarray(arrays["lr_library"][i], np.float64)
            return np.expm1(lr) * library[None] / target
        if kind == "none":
            return lr * scale ** 2
        raise ValueError(f"unknown normalisation {kind!r}")

    return counts


def prediction_normaliser(arrays: Mapping, attrs: Mapping, target_sum: float | None
                          ) -> Callable[[np.ndarray, int], np.ndarray]:
    """Predicted counts (G, h, w) of patch i -> the model's units, with the statistics
    :func:`.normalisation.prediction_denormaliser` used (the LR patch and the model's training
    ``target_sum``): its inverse where that is defined (0 where the LR library or range is 0)."""
    from histomap.data.srpairs.normalisation import lr_library_on_hr, require_target_sum

    kind, scale = attrs["normalisation"], int(attrs["scale"])

    def values(counts: np.ndarray, i: int) -> np.ndarray:
        counts = np.asarray(counts, np.float64)
        if kind == "minmax":
            lo = np.asarray(arrays["lr_min"][i], np.float64)[:, None, None] / scale ** 2
            hi = np.asarray(arrays["lr_max"][i], np.float64)[:, None, None] / scale ** 2
            span = np.broadcast_to(hi - lo, counts.shape)
            return np.divide(counts - lo, span, out=np.zeros_like(counts), where=span > 0)
        if kind == "log1p":
            target = require_target_sum(attrs, target_sum)
            library = lr_library_on_hr(arrays["lr_library"][i], scale, counts.shape[-2:])
            factor = np.divide(target, library, out=np.zeros_like(library), where=library > 0)
            return np.log1p(counts * factor[None])
        if kind == "none":
            return counts
        raise ValueError(f"unknown normalisation {kind!r}")

    return values
