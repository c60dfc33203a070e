"""The training inputs of an SR model from its fold's pairs: splits, datasets and statistics.

Arrow: SR pairs -> **SR model**: the pairs must agree (:func:`pairs_attrs`); validation patches
are spatial blocks of the TRAINING samples (:func:`split_patches`), the test fold is never seen;
statistics a model needs (its gene graph, its value range) come from its training patches only,
in its units (:func:`model_units`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histomap.data.srpairs.dataset import SRPairDataset
from histomap.data.srpairs.normalisation import retarget_log1p
from histomap.data.srpairs.store import read_sr_pairs
from histomap.errors import InputError
from histomap.evaluation.folds import validation_split

if TYPE_CHECKING:
    from torch.utils.data import Dataset

log = logging.getLogger(__name__)


def pairs_attrs(pairs_zarrs: Sequence[str | Path]) -> dict[str, Any]:
    """Attrs of the first zarr after checking that all agree on genes, grids and units."""
    if not pairs_zarrs:
        raise ValueError("no SR pairs given")
    first = None
    for path in pairs_zarrs:
        _, attrs = read_sr_pairs(path, lazy=True)
        if first is None:
            first, first_path = attrs, path
            continue
        for key in ("genes", "scale", "hr_shape", "lr_shape", "normalisation", "source"):
            if attrs.get(key) != first.get(key):
                raise InputError(path, f"SR pairs disagree with {first_path} on {key!r}: "
                                       f"{attrs.get(key)!r} vs {first.get(key)!r}")
    return dict(first)


def split_patches(pairs_zarrs: Sequence[str | Path], *, fraction: float, block_um: float,
                  seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) patch indices of each training zarr.

    Validation patches are whole spatial blocks
    (:func:`histomap.evaluation.folds.validation_split` on the patch origins, blocks at least one
    patch wide); training patches overlapping a validation patch are dropped (logged), so
    validation tissue is never seen in training.
    """
    splits = []
    for k, path in enumerate(pairs_zarrs):
        arrays, attrs = read_sr_pairs(path, lazy=True)
        origin = np.asarray(arrays["origin_um"][...], np.float64).reshape(-1, 2)
        n = len(origin)
        side = np.array([float(attrs["patch_um"]),
                         float(attrs.get("hr_um_row", attrs["hr_um"])) * attrs["hr_shape"][0]])
        val = validation_split(origin, fraction=float(fraction),
                               block_px=max(float(block_um), float(side.max())), seed=seed + k)
        overlaps = np.zeros(n, bool)
        if val.any():
            d = np.abs(origin[:, None, :] - origin[None, val, :])
            overlaps = ((d < side[None, None, :] - 1e-6).all(axis=2)).any(axis=1) & ~val
        train = ~val & ~overlaps
        if not train.any():
            log.warning("%s: validation would leave no training patch; all %d patches train", path,
                        n)
            train, val, overlaps = np.ones(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        log.info("%s: %d training, %d validation patches (blocks of %g um); %d patches "
                 "overlapping validation tissue dropped", Path(path).name, int(train.sum()),
                 int(val.sum()), max(float(block_um), float(side.max())), int(overlaps.sum()))
        splits.append((np.flatnonzero(train), np.flatnonzero(val)))
    return splits


def common_image_hw(pairs_zarrs: Sequence[str | Path]) -> tuple[int, int]:
    """One H&E patch size for pairs of several sections: the most common one (spot-grid
    sections differ by a pixel or two with their measured spot pitch)."""
    sizes = [tuple(int(v) for v in read_sr_pairs(p, lazy=True)[0]["he"].shape[-2:])
             for p in pairs_zarrs]
    common = max(sorted(set(sizes)), key=sizes.count)
    if len(set(sizes)) > 1:
        log.info("H&E patches of %s px are resized to %s px to stack in batches",
                 sorted(set(sizes)), common)
    return common


def limit_training_patches(splits: list[tuple[np.ndarray, np.ndarray]], max_patches: int | None,
                           seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """At most ``max_patches`` training patches over every zarr (a random subset drawn with
    ``seed``, the same for every method of a fold; validation patches unchanged): the points of
    a learning curve. None: all."""
    if max_patches is None:
        return splits
    if int(max_patches) < 1:
        raise ValueError(f"superres.train.max_patches must be a positive integer, got "
                         f"{max_patches!r}")
    owner = np.concatenate([np.full(len(tr), k) for k, (tr, _) in enumerate(splits)])
    if len(owner) <= int(max_patches):
        return splits
    keep = np.zeros(len(owner), bool)
    keep[np.random.default_rng(seed).choice(len(owner), int(max_patches), replace=False)] = True
    out, start = [], 0
    for tr, va in splits:
        out.append((tr[keep[start:start + len(tr)]], va))
        start += len(tr)
    log.info("learning curve: %d of %d training patches (max_patches)", int(max_patches),
             len(owner))
    return out


def training_datasets(pairs_zarrs, splits, upsample: str, image_hw: tuple[int, int],
                      target_sum: float | None = None,
                      augment: bool | str = False) -> tuple[Dataset, Dataset | None]:
    """(training, validation or None) datasets of the split patches of every training zarr, in
    the model's units and H&E size; ``augment``: random flips (``dihedral``: and quarter turns)
    of the training patches only."""
    from torch.utils.data import ConcatDataset

    train = [SRPairDataset(p, upsample=upsample, indices=tr, image_hw=image_hw,
                           target_sum=target_sum, augment=augment)
             for p, (tr, _) in zip(pairs_zarrs, splits) if len(tr)]
    val = [SRPairDataset(p, upsample=upsample, indices=va, image_hw=image_hw,
                         target_sum=target_sum)
           for p, (_, va) in zip(pairs_zarrs, splits) if len(va)]
    if not train:
        raise ValueError("no training patch in the given SR pairs")
    return ConcatDataset(train), (ConcatDataset(val) if val else None)


def training_pixels(pairs_zarrs: Sequence[str | Path], indices: Sequence[np.ndarray], *,
                    max_pixels: int = 50_000, seed: int = 0,
                    target_sum: float | None = None) -> np.ndarray:
    """(n, G) normalised HR values of tissue pixels of the given patches, at most
    ``max_pixels`` rows (an equal random share per patch, logged when subsampled)."""
    rng = np.random.default_rng(seed)
    n_patches = sum(len(i) for i in indices)
    if n_patches == 0:
        raise ValueError("no training patch to compute the gene graph from")
    per_patch = max(1, math.ceil(max_pixels / n_patches))
    rows, total = [], 0
    for path, idx in zip(pairs_zarrs, indices):
        arrays, attrs = read_sr_pairs(path, lazy=True)
        for i in idx:
            hr = model_units(np.asarray(arrays["hr"][int(i)], np.float64), attrs, target_sum)
            mask = np.asarray(arrays["mask"][int(i)], bool)
            values = hr[:, mask].T
            total += len(values)
            if len(values) > per_patch:
                values = values[rng.choice(len(values), per_patch, replace=False)]
            rows.append(values)
    out = np.concatenate(rows) if rows else np.zeros((0, 0))
    if len(out) < total:
        log.info("gene graph: %d of %d training tissue pixels sampled", len(out), total)
    return out


def training_adjacency(pairs_zarrs: Sequence[str | Path], indices: Sequence[np.ndarray], *,
                       max_pixels: int = 50_000, binarize: bool = False, seed: int = 0,
                       target_sum: float | None = None) -> np.ndarray:
    """Raw CIGC co-expression adjacency (G, G) from the training patches' HR tissue pixels."""
    pixels = training_pixels(pairs_zarrs, indices, max_pixels=max_pixels, seed=seed,
                             target_sum=target_sum)
    from histomap.models.diffst import coexpression_adjacency

    adj = coexpression_adjacency(np.clip(pixels, 0.0, None), binarize=binarize)
    log.info("CIGC gene graph from %d training pixels of %d patches: mean off-diagonal "
             "co-expression %.3f", len(pixels), sum(len(i) for i in indices),
             float((adj.sum() - np.trace(adj)) / max(1, adj.size - len(adj))))
    return adj


def model_units(values: np.ndarray, attrs: Mapping, target_sum: float | None) -> np.ndarray:
    """Stored pair values in a model's units (log1p: its training target sum)."""
    if attrs["normalisation"] != "log1p" or target_sum is None:
        return values
    return retarget_log1p(values, float(attrs["hr_target_sum"]), float(target_sum))
