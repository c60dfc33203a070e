"""Units of the SR pairs: normalising the HR and LR maps of a patch and undoing it.

Arrow: spots / highres counts -> **SR pairs** (build_sr_pairs): the statistics side of the pairs
(``normalisation`` of the package docstring: log1p, per-patch min-max, raw counts), shared by
the point-data, spot-grid and LR-only builders, by the models (:func:`retarget_log1p`) and by the
evaluation (:func:`pairs_denormaliser` for the truth, :func:`prediction_denormaliser` for a
prediction, with prediction-time statistics only).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np

NORMALISATIONS = ("minmax", "log1p", "none")
Normalisation = Literal["minmax", "log1p", "none"]


def minmax(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene min-max of (G, H, W) to [0, 1] (0 for a constant gene): (scaled, min, max)."""
    lo = maps.min(axis=(1, 2))
    hi = maps.max(axis=(1, 2))
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = (maps - lo[:, None, None]) / span[:, None, None]
    return scaled.astype(np.float32), lo.astype(np.float32), hi.astype(np.float32)


def log1p_normalise(maps: np.ndarray, library: np.ndarray, target_sum: float) -> np.ndarray:
    """log1p(counts / library * target_sum) per pixel, 0 where the library is 0."""
    factor = np.divide(target_sum, library, out=np.zeros_like(library, dtype=np.float64),
                       where=library > 0)
    return np.log1p(maps * factor[None]).astype(np.float32)


def denormalise(values: np.ndarray, kind: str, *, lo=None, hi=None, library=None,
                target_sum=None) -> np.ndarray:
    """Counts from normalised maps (G, H, W) of one patch (see the :mod:`histomap.data.srpairs`
    docstring)."""
    if kind == "minmax":
        lo, hi = np.asarray(lo)[:, None, None], np.asarray(hi)[:, None, None]
        return values * (hi - lo) + lo
    if kind == "log1p":
        return np.expm1(values) * np.asarray(library)[None] / float(target_sum)
    if kind == "none":
        return values
    raise ValueError(f"unknown normalisation {kind!r}")


def retarget_log1p(values, from_sum: float, to_sum: float):
    """Log1p maps stored with target sum ``from_sum`` re-expressed with ``to_sum`` (exact:
    ``log1p(expm1(v) * to / from)``); numpy arrays or torch tensors."""
    if to_sum is None or float(to_sum) == float(from_sum):
        return values
    ratio = float(to_sum) / float(from_sum)
    if isinstance(values, np.ndarray):
        return np.log1p(np.expm1(values.astype(np.float64)) * ratio).astype(values.dtype)
    return (values.double().expm1() * ratio).log1p().to(values.dtype)


def median_library(library: np.ndarray) -> float:
    """Median of the non-zero libraries (1 when there is none): the log1p storage scale."""
    positive = library[library > 0]
    return float(np.median(positive)) if positive.size else 1.0


def normalised_pair(kind: str, hr: np.ndarray, lr: np.ndarray, hr_library: np.ndarray,
                    lr_library: np.ndarray, target: float, scale: int
                    ) -> dict[str, np.ndarray]:
    """Normalised HR and LR maps of one patch; the LR map (sums of scale x scale HR pixels) in
    the HR map's units (:mod:`histomap.data.srpairs` docstring)."""
    low = normalised_lr(kind, lr, lr_library, target, scale)
    if kind == "minmax":
        hr_n, hr_lo, hr_hi = minmax(hr)
        return {"hr": hr_n, "hr_min": hr_lo, "hr_max": hr_hi, **low}
    if kind == "log1p":
        return {"hr": log1p_normalise(hr, hr_library, target),
                "hr_library": hr_library.astype(np.float32), **low}
    return {"hr": hr.astype(np.float32), **low}


def normalised_lr(kind: str, lr: np.ndarray, lr_library: np.ndarray, target: float,
                   scale: int) -> dict[str, np.ndarray]:
    """The LR map of one patch (counts: sums over ``scale x scale`` HR pixels) in the HR map's
    units, with its de-normalisation arrays (:mod:`histomap.data.srpairs` docstring)."""
    if kind == "minmax":
        lr_n, lr_lo, lr_hi = minmax(lr)
        return {"lr": lr_n, "lr_min": lr_lo, "lr_max": lr_hi}
    if kind == "log1p":
        # the library fraction of an LR pixel, scaled like an HR pixel's (HR target sum)
        return {"lr": log1p_normalise(lr, lr_library, target),
                "lr_library": lr_library.astype(np.float32)}
    return {"lr": (lr / float(scale) ** 2).astype(np.float32)}


def check_normalisation(kind: str) -> None:
    """Raise a ValueError unless ``kind`` is one of :data:`NORMALISATIONS`."""
    if kind not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {kind!r}")


def pairs_denormaliser(arrays: Mapping, attrs: Mapping) -> Callable[[np.ndarray, int], np.ndarray]:
    """Stored truth values (G, h, w) of patch i -> counts, with the patch's own HR statistics
    (recovers the measured counts; for the truth only, never for a prediction)."""
    kind = attrs["normalisation"]

    def counts(values: np.ndarray, i: int) -> np.ndarray:
        if kind == "minmax":
            return denormalise(values, kind, lo=np.asarray(arrays["hr_min"][i]),
                               hi=np.asarray(arrays["hr_max"][i]))
        if kind == "log1p":
            return denormalise(values, kind, library=np.asarray(arrays["hr_library"][i]),
                               target_sum=attrs["hr_target_sum"])
        return denormalise(values, kind)

    return counts


def lr_library_on_hr(lr_library: np.ndarray, scale: int, hr_shape: Sequence[int]) -> np.ndarray:
    """HR-pixel library estimated from the LR patch: each LR pixel's library / scale^2 on the
    scale x scale HR pixels under it (cropped to ``hr_shape``)."""
    up = np.repeat(np.repeat(np.asarray(lr_library, np.float64), scale, axis=0), scale, axis=1)
    return up[:hr_shape[0], :hr_shape[1]] / float(scale) ** 2


def require_target_sum(attrs: Mapping, target_sum: float | None) -> float:
    """The model's training target sum of log1p units; an error without one. The pairs' stored
    ``hr_target_sum`` is the median library of the sections they were built from (the test
    section's, for a test fold's pairs): taking it would put a statistic of the truth into the
    prediction's counts."""
    if target_sum is None:
        raise ValueError(
            f"log1p pairs (stored with target sum {attrs.get('hr_target_sum')!r}) need the "
            "model's training target_sum to turn a prediction into counts; the model has none "
            "(retrain it: its model.pt records pairs.target_sum)")
    return float(target_sum)


def prediction_denormaliser(arrays: Mapping, attrs: Mapping, target_sum: float | None = None
                            ) -> Callable[[np.ndarray, int], np.ndarray]:
    """Predicted values (G, h, w) of patch i (in the model's units) -> counts, with statistics
    available at prediction time only: the LR patch and the model's training ``target_sum``
    (required for log1p pairs: :func:`require_target_sum`). Min-max: the LR patch's per-gene
    range / scale^2; log1p: each HR pixel's library estimated from its LR pixel
    (:func:`lr_library_on_hr`)."""
    kind, scale = attrs["normalisation"], int(attrs["scale"])
    target = require_target_sum(attrs, target_sum) if kind == "log1p" else None

    def counts(values: np.ndarray, i: int) -> np.ndarray:
        if kind == "minmax":
            return denormalise(values, kind, lo=np.asarray(arrays["lr_min"][i]) / scale ** 2,
                               hi=np.asarray(arrays["lr_max"][i]) / scale ** 2)
        if kind == "log1p":
            library = lr_library_on_hr(arrays["lr_library"][i], scale, values.shape[-2:])
            return denormalise(values, kind, library=library, target_sum=target)
        return denormalise(values, kind)

    return counts
