"""SR pairs as a torch dataset: what every SR method trains and predicts on.

Arrow: **SR pairs** -> models (``train_*`` / ``predict_*`` super-resolution rules). torch is
imported when an item is read, so the light jobs that only import this package stay torch-free.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histomap.data.srpairs.normalisation import retarget_log1p
from histomap.data.srpairs.store import read_sr_pairs


class SRPairDataset:
    """Map-style torch dataset of an SR-pairs zarr (usable with ``torch.utils.data.DataLoader``).

    Item: dict(``hr`` (G, h, w) float32, ``lr`` (G, h_lr, w_lr) float32, ``lr_up`` the LR map
    upsampled (``upsample``: "bicubic", "bilinear" or "nearest") onto the HR grid, ``image``
    (3, H, W) float32 in [0, 1], ``mask`` (h, w) bool, ``index`` int). The LR map is upsampled
    by ``scale`` and cropped to the HR patch, so ``edge="ceil"`` LR pixels stay in place.
    ``image_hw``: resize the H&E patch to this (H, W) (antialiased bilinear), so that the pairs
    of several sections stack in one batch (spot-grid sections differ by a pixel or two in
    their measured spot pitch). ``target_sum``: log1p pairs are re-expressed with this target
    sum (a model's, from its training pairs: :func:`.store.training_target_sum`); None keeps the
    stored one. ``hr`` and ``lr`` are in the same units (the LR map is stored in HR units).
    LR-only inputs (:func:`.lr_only.build_lr_pairs`) have no ``hr``; ``lr_up`` is cropped to the
    pairs' ``hr_shape``. ``augment`` (training only): ``flips`` (or ``True``): each item is
    flipped left-right and/or up-down at random (torch's global RNG, so a resumed training draws
    the same flips), every map and the H&E patch alike; ``dihedral``: also turned by a random
    number of quarter turns (the 8 symmetries of a square). It needs pairs whose LR grid covers
    the HR patch exactly (``scale`` x the LR shape = the HR shape), so the LR map moves onto the
    same ground; ``dihedral`` also needs square patches on a square lattice (a hexagonal spot
    lattice, ``stagger_px`` not zero, has no quarter-turn symmetry).
    """

    def __init__(self, path: str | Path, *, upsample: str = "bicubic",
                 indices: Sequence[int] | None = None,
                 image_hw: tuple[int, int] | None = None,
                 target_sum: float | None = None, augment: bool | str = False) -> None:
        if upsample not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"upsample must be bicubic, bilinear or nearest, got {upsample!r}")
        self.path = Path(path)
        arrays, self.attrs = read_sr_pairs(self.path, lazy=True)
        n = arrays["lr"].shape[0]
        self.augment = augment_mode(augment)
        if self.augment:
            lr_hw = tuple(int(v) * int(self.attrs["scale"]) for v in arrays["lr"].shape[-2:])
            hr_hw = tuple(int(v) for v in self.attrs["hr_shape"])
            if lr_hw != hr_hw:
                raise ValueError(f"{self.path}: flip augmentation needs an LR grid that covers "
                                 f"the HR patch exactly; {self.attrs['scale']} x the LR shape "
                                 f"is {lr_hw}, the HR patch {hr_hw} (edge: "
                                 f"{self.attrs.get('edge')})")
        if self.augment == "dihedral":
            he_hw = tuple(int(v) for v in arrays["he"].shape[-2:])
            if (hr_hw[0] != hr_hw[1] or he_hw[0] != he_hw[1]
                    or any(float(v) for v in self.attrs.get("stagger_px", ()))
                    or (image_hw is not None and image_hw[0] != image_hw[1])):
                raise ValueError(f"{self.path}: quarter-turn augmentation (augment: dihedral) "
                                 f"needs square patches on a square lattice; HR {hr_hw}, H&E "
                                 f"{he_hw}, odd-row stagger {self.attrs.get('stagger_px')}. Use "
                                 "augment: flips")
        self.indices = np.arange(n) if indices is None else np.asarray(indices, np.int64)
        self.upsample = upsample
        self.image_hw = tuple(int(v) for v in image_hw) if image_hw is not None else None
        self.genes = list(self.attrs["genes"])
        self.target_sum = (float(target_sum) if target_sum is not None
                           and self.attrs["normalisation"] == "log1p" else None)
        self._arrays: dict | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:  # DataLoader workers reopen the store
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, item: int) -> dict:
        import torch
        import torch.nn.functional as F

        if self._arrays is None:
            self._arrays = read_sr_pairs(self.path, lazy=True)[0]
        i = int(self.indices[item])
        a = self._arrays
        hr = (torch.from_numpy(np.asarray(a["hr"][i], np.float32)) if "hr" in a else None)
        lr = torch.from_numpy(np.asarray(a["lr"][i], np.float32))
        if self.target_sum is not None:
            stored = float(self.attrs["hr_target_sum"])
            hr = retarget_log1p(hr, stored, self.target_sum) if hr is not None else None
            lr = retarget_log1p(lr, stored, self.target_sum)
        scale = int(self.attrs["scale"])
        size = (lr.shape[-2] * scale, lr.shape[-1] * scale)
        kwargs = {} if self.upsample == "nearest" else {"align_corners": False}
        lr_up = F.interpolate(lr[None], size=size, mode=self.upsample, **kwargs)[0]
        h, w = (hr.shape[-2:] if hr is not None
                else (int(v) for v in self.attrs["hr_shape"]))
        lr_up = lr_up[:, :h, :w].contiguous()
        image = torch.from_numpy(np.asarray(a["he"][i])).float() / 255.0
        if self.image_hw is not None and tuple(image.shape[-2:]) != self.image_hw:
            image = F.interpolate(image[None], size=self.image_hw, mode="bilinear",
                                  antialias=True, align_corners=False)[0].clamp(0.0, 1.0)
        mask = torch.from_numpy(np.asarray(a["mask"][i], bool))
        item = {"lr": lr, "lr_up": lr_up, "image": image, "mask": mask, "index": i}
        if hr is not None:
            item = {"hr": hr, **item}
        if self.augment:
            dims = [d for d, flip in zip((-1, -2), torch.randint(0, 2, (2,)).tolist()) if flip]
            turns = int(torch.randint(0, 4, ()).item()) if self.augment == "dihedral" else 0
            item = {k: _moved(v, dims, turns) if isinstance(v, torch.Tensor) else v
                    for k, v in item.items()}
        return item


AUGMENT_MODES = ("flips", "dihedral")


def augment_mode(augment: bool | str | None) -> str | None:
    """``superres.train.augment``: false / None (off), true or ``flips``, ``dihedral``."""
    if augment in (None, False):
        return None
    if augment is True:
        return "flips"
    if augment not in AUGMENT_MODES:
        raise ValueError(f"superres.train.augment must be false, true, {' or '.join(AUGMENT_MODES)}"
                         f", got {augment!r}")
    return augment


def _moved(tensor, dims: list[int], turns: int):
    """``tensor`` flipped over ``dims``, then turned by ``turns`` quarter turns (last 2 axes)."""
    import torch

    if dims:
        tensor = tensor.flip(dims)
    if turns:
        tensor = torch.rot90(tensor, turns, dims=(-2, -1)).contiguous()
    return tensor
