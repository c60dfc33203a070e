"""Training windows of the dense models (train_{model} for PixNet and iStar-style models): the
spots of a slide with their targets (:class:`SlideSpots`), the slide read once as uint8 blocks
around them, square image windows carrying every spot disc that lies wholly inside
(:class:`WindowDataset`, with jitter and dihedral augmentation), and PixNet's loss on a batch of
windows (:func:`pixnet_batch_loss`). The encoder-feature cache
(:mod:`histomap.tasks.feature_cache`) serves the same windows from cached features.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from histomap.compat import torch
from histomap.data.slide import open_slide, read_region, slide_mpp
from histomap.data.spot_patches import dihedral
from histomap.models.pixnet import pixnet_loss
from histomap.models.roi import discs_from_spots
from histomap.training.device import to_device

log = logging.getLogger(__name__)

LOSS_MODES = ("joint", "mse", "pcc")
BLOCK_PX = 256  # side of the cached image blocks (input pixels)


# --------------------------------------------------------------------------- spots of a slide
@dataclass
class SlideSpots:
    """The spots of one slide used for training windows.

    ``centres_px``: (n, 2) level-0 (x, y); ``diameter_um``: (n,) per-spot diameters (square
    bins: side); ``targets``: (n, genes) float32 log-normalised expression; ``square``: (n,)
    bool, square bins (Visium HD) rather than discs.
    """

    slide_path: Path
    centres_px: np.ndarray
    diameter_um: np.ndarray
    targets: np.ndarray
    name: str = ""
    square: np.ndarray | bool = False

    def __post_init__(self):
        self.slide_path = Path(self.slide_path)
        self.centres_px = np.asarray(self.centres_px, dtype=np.float64).reshape(-1, 2)
        n = len(self.centres_px)
        self.diameter_um = np.broadcast_to(np.asarray(self.diameter_um, np.float64), (n,)).copy()
        self.targets = np.ascontiguousarray(self.targets, dtype=np.float32)
        self.square = np.broadcast_to(np.asarray(self.square, bool), (n,)).copy()
        if self.targets.ndim != 2 or len(self.targets) != n:
            raise ValueError(f"targets must be ({n}, genes), got {self.targets.shape}")
        if not (np.isfinite(self.centres_px).all() and (self.diameter_um > 0).all()):
            raise ValueError(f"{self.name or self.slide_path}: spot centres must be finite and "
                             "diameters positive")
        self.name = self.name or self.slide_path.name

    def subset(self, keep: np.ndarray) -> SlideSpots:
        return SlideSpots(self.slide_path, self.centres_px[keep], self.diameter_um[keep],
                          self.targets[keep], self.name, self.square[keep])

    def concat(self, other: SlideSpots) -> SlideSpots:
        """These spots and ``other``'s (same slide, e.g. the same tissue measured with another
        spot or bin size), each keeping its own diameter."""
        if other.slide_path != self.slide_path:
            raise ValueError(f"{other.name}: spots of {other.slide_path} cannot join spots of "
                             f"{self.slide_path}")
        return SlideSpots(self.slide_path, np.concatenate([self.centres_px, other.centres_px]),
                          np.concatenate([self.diameter_um, other.diameter_um]),
                          np.concatenate([self.targets, other.targets]), self.name,
                          np.concatenate([self.square, other.square]))


def dihedral_points(xy: np.ndarray, k: int, side: float) -> np.ndarray:
    """Map (x, y) points of a ``side`` x ``side`` square (continuous coordinates, pixel j
    covering [j, j + 1)) the way :func:`histomap.data.spot_patches.dihedral` maps the image: ``k %
    4`` quarter turns of ``torch.rot90`` (x, y) -> (y, side - x), then a left-right flip
    x -> side - x when ``k >= 4``."""
    out = np.array(xy, dtype=np.float64, copy=True)
    for _ in range(k % 4):
        out = np.stack([out[..., 1], side - out[..., 0]], axis=-1)
    if k >= 4:
        out[..., 0] = side - out[..., 0]
    return out


# --------------------------------------------------------------------------- image blocks
class BlockCache:
    """The slide at ``input_mpp`` around the anchors, as uint8 blocks read once.

    Pixel (i, j) of the global input grid covers level-0 [j s, (j + 1) s) x [i s, (i + 1) s),
    s = input_mpp / slide_mpp; only blocks any training window can reach are read, so memory
    follows the spotted area, not the slide.
    """

    def __init__(self, slide_path: Path, px0_per_input: float, boxes: np.ndarray,
                 block_px: int = BLOCK_PX):
        self.block = block_px
        keys = set()
        for x0, y0, x1, y1 in boxes:  # input-pixel boxes [x0, x1) x [y0, y1)
            for by in range(int(y0 // block_px), int((y1 - 1) // block_px) + 1):
                for bx in range(int(x0 // block_px), int((x1 - 1) // block_px) + 1):
                    keys.add((by, bx))
        self.index = {key: i for i, key in enumerate(sorted(keys))}
        self.blocks = np.empty((len(keys), block_px, block_px, 3), dtype=np.uint8)
        side0 = block_px * px0_per_input
        with open_slide(slide_path) as slide:
            for (by, bx), i in tqdm(self.index.items(), desc="window blocks", unit="block",
                                    disable=None, leave=False):
                self.blocks[i] = read_region(slide, bx * side0, by * side0, side0, side0,
                                             block_px, block_px)

    def crop(self, x0: int, y0: int, side: int) -> np.ndarray:
        """(side, side, 3) uint8 of global input pixels [x0, x0 + side) x [y0, y0 + side)."""
        out = np.full((side, side, 3), 255, dtype=np.uint8)
        b = self.block
        for by in range(y0 // b, (y0 + side - 1) // b + 1):
            for bx in range(x0 // b, (x0 + side - 1) // b + 1):
                i = self.index.get((by, bx))
                if i is None:
                    continue
                ys, xs = max(y0, by * b), max(x0, bx * b)
                ye, xe = min(y0 + side, (by + 1) * b), min(x0 + side, (bx + 1) * b)
                out[ys - y0:ye - y0, xs - x0:xe - x0] = \
                    self.blocks[i, ys - by * b:ye - by * b, xs - bx * b:xe - bx * b]
        return out

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes


# --------------------------------------------------------------------------- dataset
class WindowDataset(Dataset):
    """Training windows: an image window and the spot discs lying wholly inside it.

    One window per anchor spot (every spot, or one per ``anchor_stride_um`` cell), centred on
    it; with ``augment`` the window is shifted by a uniform integer jitter that keeps the anchor's
    disc inside (capped by ``jitter_um``) and one of the 8 dihedral transforms is applied to the
    image and the disc centres together, and ``color`` (a
    :class:`histomap.data.stain.StainJitter`, or None) to the image. Images are cached once as
    uint8 blocks.

    Items are dicts: ``image`` uint8 (3, w, w) (RGB; divide by 255 for PixNet), ``centres``
    float32 (max_spots, 2) disc centres (x, y) in dense-map pixels of the window (map pixel =
    ``out_stride`` input pixels), ``radii`` float32 (max_spots,) in map pixels, ``valid`` bool
    (max_spots,), ``targets`` float32 (max_spots, genes). Padding entries are invalid zeros.
    ``max_spots`` (default: the most spots any window can hold) is the same for every item;
    pass the same value to datasets that are batched together.
    """

    def __init__(self, slides: Sequence[SlideSpots], *, window_px: int, input_mpp: float,
                 out_stride: int, augment: bool = False, jitter_um: float | None = None,
                 anchor_stride_um: float | None = None, max_spots: int | None = None,
                 block_px: int = BLOCK_PX, read_images: bool = True, color=None):
        if window_px < 1 or window_px % out_stride:
            raise ValueError(f"window_px ({window_px}) must be a positive multiple of "
                             f"out_stride ({out_stride})")
        if input_mpp <= 0:
            raise ValueError(f"input_mpp must be positive, got {input_mpp}")
        self.window_px, self.input_mpp, self.out_stride = int(window_px), float(input_mpp), \
            int(out_stride)
        self.augment = bool(augment)
        self.color = color if augment else None
        self.slides: list[SlideSpots] = []
        self._px0_per_input: list[float] = []
        self._slide_mpp: list[float] = []
        self._caches: list[BlockCache | None] = []
        self.read_images = bool(read_images)  # False: windows of cached features instead
        self._neighbours: list[list[np.ndarray]] = []
        anchors: list[tuple[int, int, int]] = []  # (slide, spot, jitter px)
        n_genes = {s.targets.shape[1] for s in slides}
        if len(n_genes) > 1:
            raise ValueError(f"slides have different gene counts {sorted(n_genes)}")
        for spots in slides:
            if len(spots.centres_px) == 0:
                log.info("%s: no spots in this split; no windows", spots.name)
                continue
            s_idx = len(self.slides)
            found = self._add_slide(spots, s_idx, jitter_um, anchor_stride_um, block_px)
            anchors += found
        if not anchors:
            raise ValueError("no training window: every slide is empty or its spots are larger "
                             f"than the {window_px} px window")
        self.anchors = np.array(anchors, dtype=np.int64)
        self._starts = np.searchsorted(self.anchors[:, 0], np.arange(len(self.slides)))
        self.n_genes = n_genes.pop()
        bound = max(len(nb) for nbs in self._neighbours for nb in nbs)
        self.max_spots = bound if max_spots is None else int(max_spots)
        if self.max_spots < bound:
            log.warning("max_spots=%d is below the %d spots a window can hold: extra spots of a "
                        "window are left out (first by distance order kept)", self.max_spots,
                        bound)
        log.info("window dataset: %d windows of %d px at %.3g um/px on %d slide(s), up to %d "
                 "spots each, %.1f MB of cached image blocks", len(self.anchors), window_px,
                 input_mpp, len(self.slides), self.max_spots,
                 sum(c.nbytes for c in self._caches if c is not None) / 1e6)

    def _add_slide(self, spots: SlideSpots, s_idx: int, jitter_um: float | None,
                   anchor_stride_um: float | None, block_px: int) -> list[tuple[int, int, int]]:
        with open_slide(spots.slide_path) as slide:
            mpp0 = slide_mpp(slide, spots.slide_path)
        s0 = self.input_mpp / mpp0
        centres = spots.centres_px / s0                      # input pixels
        radius = spots.diameter_um / (2.0 * self.input_mpp)  # input pixels
        half = self.window_px / 2.0
        fits = radius <= half - 1.0
        if not fits.all():
            log.warning("%s: %d spots are too large for the %d px window (diameter > %.1f um) "
                        "and never used", spots.name, int((~fits).sum()), self.window_px,
                        (self.window_px - 2) * self.input_mpp)
        candidates = np.flatnonzero(fits)
        if anchor_stride_um:
            cells = np.floor(spots.centres_px[candidates] * mpp0 / anchor_stride_um)
            _, first = np.unique(cells, axis=0, return_index=True)
            candidates = candidates[np.sort(first)]
        jitter = np.floor(np.maximum(half - radius[candidates] - 1.0, 0.0)).astype(np.int64)
        if jitter_um is not None:
            jitter = np.minimum(jitter, int(jitter_um / self.input_mpp))
        if not self.augment:
            jitter[:] = 0
        # spots that can lie wholly inside some window of each anchor
        tree = cKDTree(centres)
        reach = half + jitter + 1.0
        neighbours = []
        for a, j in zip(candidates, reach):
            near = np.asarray(tree.query_ball_point(centres[a], r=j, p=np.inf), dtype=np.int64)
            near = near[fits[near]]
            order = np.argsort(np.abs(centres[near] - centres[a]).max(axis=1), kind="stable")
            neighbours.append(near[order])
        starts = np.round(centres[candidates] - half).astype(np.int64)
        boxes = np.column_stack([starts - jitter[:, None],
                                 starts + jitter[:, None] + self.window_px]).astype(np.int64)
        cache = BlockCache(spots.slide_path, s0, boxes, block_px) if self.read_images else None
        self.slides.append(spots)
        self._px0_per_input.append(s0)
        self._slide_mpp.append(mpp0)
        self._caches.append(cache)
        self._neighbours.append(neighbours)
        log.info("%s: %d anchor windows over %d spots (jitter up to %d px)", spots.name,
                 len(candidates), len(centres), int(jitter.max()) if len(jitter) else 0)
        return [(s_idx, int(a), int(j)) for a, j in zip(candidates, jitter)]

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        jitter = int(self.anchors[i, 2])
        k, offset = 0, (0, 0)
        if self.augment:
            k = int(torch.randint(8, ()).item())
            if jitter > 0:
                offset = tuple(int(v) for v in torch.randint(-jitter, jitter + 1, (2,)))
        return self.window(i, k=k, offset=offset)

    def window_origin(self, i: int, offset: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """Global input-pixel (x, y) of the top-left of anchor ``i``'s window."""
        s_idx, a, _ = (int(v) for v in self.anchors[i])
        centre = self.slides[s_idx].centres_px[a] / self._px0_per_input[s_idx]
        start = np.round(centre - self.window_px / 2.0).astype(np.int64)
        return int(start[0] + offset[0]), int(start[1] + offset[1])

    def window(self, i: int, *, k: int = 0, offset: tuple[int, int] = (0, 0)
               ) -> dict[str, torch.Tensor]:
        """Anchor ``i``'s window shifted by ``offset`` input px, dihedral transform ``k``."""
        s_idx = int(self.anchors[i, 0])
        spots, s0 = self.slides[s_idx], self._px0_per_input[s_idx]
        x0, y0 = self.window_origin(i, offset)
        near = self._neighbours[s_idx][i - int(self._starts[s_idx])]
        side = self.window_px / self.out_stride
        centres, radii = discs_from_spots(spots.centres_px[near], spots.diameter_um[near],
                                          self._slide_mpp[s_idx], (x0 * s0, y0 * s0),
                                          self.input_mpp * self.out_stride)
        inside = ((centres - radii[:, None] >= -1e-6)
                  & (centres + radii[:, None] <= side + 1e-6)).all(axis=1)
        near, centres, radii = near[inside], centres[inside], radii[inside]
        if len(near) > self.max_spots:
            near, centres, radii = (near[:self.max_spots], centres[:self.max_spots],
                                    radii[:self.max_spots])
        centres = dihedral_points(centres, k, side)
        m = len(near)
        out_c = np.zeros((self.max_spots, 2), np.float32)
        out_r = np.zeros(self.max_spots, np.float32)
        out_s = np.zeros(self.max_spots, bool)
        out_t = np.zeros((self.max_spots, self.n_genes), np.float32)
        valid = np.zeros(self.max_spots, bool)
        out_c[:m], out_r[:m], out_t[:m], valid[:m] = centres, radii, spots.targets[near], True
        out_s[:m] = spots.square[near]
        item = {"centres": torch.from_numpy(out_c), "radii": torch.from_numpy(out_r),
                "valid": torch.from_numpy(valid), "square": torch.from_numpy(out_s),
                "targets": torch.from_numpy(out_t)}
        if self._caches[s_idx] is not None:
            image = self._caches[s_idx].crop(x0, y0, self.window_px)
            image = dihedral(torch.from_numpy(image).permute(2, 0, 1), k)
            if self.color is not None:
                image = self.color(image.float() / 255.0).mul_(255.0).round_().to(torch.uint8)
            item["image"] = image
        return item

    @property
    def targets(self) -> np.ndarray:
        """Targets of every spot of every slide (for the output-bias initialisation)."""
        return np.concatenate([s.targets for s in self.slides])


# --------------------------------------------------------------------------- loss
def make_loss_fn(mode: str = "joint", pcc_weight: float = 0.5, mse_weight: float = 1.0
                 ) -> Callable[..., torch.Tensor]:
    """PixNet's loss on (pred, target, valid) spots: joint (MSE + pcc_weight (1 - PCC)), mse
    or pcc."""
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}")
    return functools.partial(pixnet_loss, mode=mode, pcc_weight=float(pcc_weight),
                             mse_weight=float(mse_weight))


def pixnet_batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor],
                      device: torch.device, loss_fn: Callable[..., torch.Tensor] | None
                      ) -> torch.Tensor:
    """``fit``'s batch_to_loss for :class:`WindowDataset` batches: disc means of the dense map
    (``forward_spots`` mode "mean") against the spot targets; ``loss_fn(pred, target, valid)``
    defaults to the joint loss."""
    batch = to_device(batch, device)
    images = batch["image"].float().div_(255.0)
    _, pred = model.forward_spots(images, batch["centres"], batch["radii"], mode="mean",
                                  valid=batch["valid"], square=batch.get("square"))
    loss_fn = loss_fn or make_loss_fn()
    return loss_fn(pred, batch["targets"], batch["valid"])
