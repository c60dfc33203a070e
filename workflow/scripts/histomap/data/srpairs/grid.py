"""Patch geometry of the SR pairs: patch and stride sizes on the global LR/HR grids.

Arrow: highres counts or spots -> **SR pairs**: how a requested patch side becomes whole LR and
HR pixels (``edge`` "floor" or "ceil"), where patches start, LR maps as block sums of HR maps,
and the slide's level-0 geometry the pairs are placed on.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from histomap.data.slide import open_slide, slide_mpp
from histomap.errors import InputError

log = logging.getLogger(__name__)

Edge = Literal["floor", "ceil"]


@dataclass(frozen=True)
class PairGeometry:
    """Sizes of one pair, in pixels of each grid. ``n_cover = n_lr * scale`` HR pixels lie under
    the LR pixels (``>= n_hr``; equal for ``edge="floor"``)."""
    lr_um: float
    scale: int
    n_lr: int
    n_hr: int
    stride_lr: int

    @property
    def hr_um(self) -> float:
        return self.lr_um / self.scale

    @property
    def n_cover(self) -> int:
        return self.n_lr * self.scale

    @property
    def patch_um(self) -> float:
        return self.n_hr * self.hr_um


def pair_geometry(patch_um: float, lr_um: float, scale: int, stride_um: float | None = None,
                  edge: Edge = "floor") -> PairGeometry:
    """Pair sizes for a requested patch side (um); logs any flooring of the patch or stride."""
    if not (patch_um > 0 and lr_um > 0 and int(scale) == scale and scale >= 1):
        raise ValueError(f"need patch_um > 0, lr_um > 0, integer scale >= 1; got {patch_um}, "
                         f"{lr_um}, {scale}")
    scale = int(scale)
    hr_um = lr_um / scale
    if edge == "floor":
        n_lr = int(math.floor(patch_um / lr_um + 1e-9))
        n_hr = n_lr * scale
        if n_lr < 1:
            raise ValueError(f"patch_um {patch_um} is smaller than one LR pixel ({lr_um} um)")
        if not math.isclose(n_lr * lr_um, patch_um):
            log.warning("patch_um %g is not a multiple of lr_um %g: patches floored to %g um "
                        "(%d LR x %d HR pixels); edge='ceil' gives %d HR pixels instead",
                        patch_um, lr_um, n_lr * lr_um, n_lr, n_hr,
                        int(math.floor(patch_um / hr_um + 1e-9)))
    elif edge == "ceil":
        n_hr = int(math.floor(patch_um / hr_um + 1e-9))
        if n_hr < 1:
            raise ValueError(f"patch_um {patch_um} is smaller than one HR pixel ({hr_um} um)")
        n_lr = int(math.ceil(n_hr / scale))
        if not math.isclose(n_hr * hr_um, patch_um):
            log.warning("patch_um %g is not a multiple of hr_um %g: patches floored to %g um",
                        patch_um, hr_um, n_hr * hr_um)
        if n_lr * scale != n_hr:
            log.info("edge='ceil': %d HR pixels under %d LR pixels; the last LR row/column "
                     "extends %g um past the HR patch", n_hr, n_lr, (n_lr * scale - n_hr) * hr_um)
    else:
        raise ValueError(f"edge must be 'floor' or 'ceil', got {edge!r}")
    stride_um = n_lr * lr_um if stride_um is None else stride_um
    stride_lr = max(1, int(math.floor(stride_um / lr_um + 1e-9)))
    if not math.isclose(stride_lr * lr_um, stride_um):
        log.warning("stride_um %g floored to %g um, a multiple of lr_um so every patch sits on "
                    "the global LR grid", stride_um, stride_lr * lr_um)
    return PairGeometry(float(lr_um), scale, n_lr, n_hr, stride_lr)


def patch_starts(n_total: int, size: int, stride: int) -> np.ndarray:
    """Start indices of windows of ``size`` every ``stride`` covering ``n_total`` cells (the
    last window may run past the end)."""
    n = 1 + max(0, math.ceil((n_total - size) / stride))
    return np.arange(n, dtype=np.int64) * stride


def block_sum(maps: np.ndarray, factor: int) -> np.ndarray:
    """Sum (..., H, W) over non-overlapping ``factor x factor`` blocks (H, W divisible)."""
    *lead, h, w = maps.shape
    return maps.reshape(*lead, h // factor, factor, w // factor, factor).sum(axis=(-3, -1))


def slide_geometry(slide_path: Path, mpp: float | None) -> tuple[float, int, int]:
    """(mpp, level-0 width, height) of the slide; a given ``mpp`` (of the count coordinates)
    must agree with the slide's."""
    with open_slide(slide_path) as slide:
        found = slide_mpp(slide, slide_path)
        width0, height0 = slide.dimensions
    if mpp is not None and not math.isclose(float(mpp), found, rel_tol=1e-3):
        raise InputError(slide_path, f"slide mpp {found:g} differs from the given mpp {mpp:g} of "
                                     "the count coordinates; they must share level-0 pixels")
    return float(mpp or found), int(width0), int(height0)
