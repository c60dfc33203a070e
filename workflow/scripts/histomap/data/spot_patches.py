"""H&E patches centred on spots, and the torch dataset that feeds them to spot regressors.

Patches are square crops of ``crop_um`` micrometres centred on each spot's level-0 pixel centre,
resampled to ``out_mpp`` (so every model sees the same physical scale whatever the slide's mpp).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from histomap.compat import torch
from histomap.data.slide import open_slide, read_patch, slide_mpp
from histomap.errors import InputError
from histomap.imagenorm import ImageNormalize

log = logging.getLogger(__name__)



def patch_side_px(crop_um: float, out_mpp: float) -> int:
    """Side in pixels of a ``crop_um`` patch at ``out_mpp`` (as ``slide.read_patch`` makes it)."""
    return max(1, int(round(crop_um / out_mpp)))


def extract_spot_patches(slide_path: str | Path, centres_px: np.ndarray, *, crop_um: float,
                         out_mpp: float) -> np.ndarray:
    """RGB uint8 patches (n, s, s, 3), s = round(crop_um / out_mpp), one per spot centre.

    ``centres_px``: (n, 2) spot centres as (x, y) level-0 pixels of the slide. The slide is opened
    once and read spot by spot; crop parts outside the slide come back white. Centres outside the
    slide are logged (all outside: the geometry is wrong, so :class:`InputError`).
    """
    centres = np.asarray(centres_px, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] != 2:
        raise ValueError(f"centres_px must be (n, 2) (x, y) level-0 pixels, got {centres.shape}")
    if not np.isfinite(centres).all():
        raise ValueError(f"centres_px has {int((~np.isfinite(centres)).any(axis=1).sum())} "
                         "non-finite spot centres")
    if crop_um <= 0 or out_mpp <= 0:
        raise ValueError(f"crop_um and out_mpp must be positive, got {crop_um}, {out_mpp}")
    side = patch_side_px(crop_um, out_mpp)
    patches = np.empty((len(centres), side, side, 3), dtype=np.uint8)
    slide = open_slide(slide_path)
    try:
        mpp = slide_mpp(slide, slide_path)
        _check_centres(centres, slide.dimensions, crop_um / mpp, slide_path)
        for i, (cx, cy) in enumerate(tqdm(centres, desc="spot patches", unit="spot",
                                          disable=None, leave=False)):
            patches[i] = read_patch(slide, cx, cy, crop_um, mpp, out_mpp)
    finally:
        slide.close()
    return patches


def _check_centres(centres: np.ndarray, dims: tuple[int, int], side0: float,
                   slide_path: str | Path) -> None:
    width, height = dims
    x, y = centres[:, 0], centres[:, 1]
    outside = (x < 0) | (y < 0) | (x >= width) | (y >= height)
    if len(centres) and outside.all():
        raise InputError(slide_path, f"all {len(centres)} spot centres lie outside the "
                                     f"{width}x{height} px slide: spot coordinates and slide "
                                     "do not match (wrong scale factor or mpp?)")
    if outside.any():
        log.warning("%s: %d of %d spot centres lie outside the %dx%d px slide; their patches are "
                    "white", slide_path, int(outside.sum()), len(centres), width, height)
    half = side0 / 2
    partial = ~outside & ((x - half < 0) | (y - half < 0) | (x + half > width)
                          | (y + half > height))
    if partial.any():
        log.info("%s: %d spot patches extend past the slide edge (padded white)", slide_path,
                 int(partial.sum()))


class SpotDataset(Dataset):
    """Spot patches as normalised float tensors (3, s, s), with their targets when given.

    ``patches``: uint8 (n, s, s, 3); ``targets``: float32 (n, genes) log-normalised expression or
    None (prediction: items are the patch tensor alone). ``augment`` applies one of the eight
    dihedral transforms (90-degree rotations and flips) per item, drawn from torch's RNG (which
    the DataLoader seeds per worker), then ``color`` (a :class:`histomap.data.stain.StainJitter`
    or None: colours untouched) to the RGB in [0, 1].
    """

    def __init__(self, patches: np.ndarray, targets: np.ndarray | None = None, *,
                 augment: bool = False, color=None):
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[3] != 3 or patches.dtype != np.uint8:
            raise ValueError(f"patches must be uint8 (n, s, s, 3), got {patches.dtype} "
                             f"{patches.shape}")
        self.patches = torch.from_numpy(np.ascontiguousarray(patches))
        self.targets = None
        if targets is not None:
            targets = np.asarray(targets, dtype=np.float32)
            if targets.ndim != 2 or len(targets) != len(patches):
                raise ValueError(f"targets must be (n={len(patches)}, genes), got "
                                 f"{targets.shape}")
            self.targets = torch.from_numpy(np.ascontiguousarray(targets))
        self.augment = bool(augment)
        self.color = color if augment else None
        self._normalize = ImageNormalize()

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int):
        image = self.patches[i].permute(2, 0, 1).float().div_(255.0)
        if self.augment:
            image = dihedral(image, int(torch.randint(8, ()).item()))
        if self.color is not None:
            image = self.color(image)
        image = self._normalize(image)
        if self.targets is None:
            return image
        return image, self.targets[i]


def dihedral(image: torch.Tensor, k: int) -> torch.Tensor:
    """Transform ``k`` in 0..7 of the dihedral group on the last two axes: rotate by
    ``k % 4`` quarter turns, then flip left-right when ``k >= 4``."""
    out = torch.rot90(image, k % 4, dims=(-2, -1))
    if k >= 4:
        out = torch.flip(out, dims=(-1,))
    return out.contiguous()
