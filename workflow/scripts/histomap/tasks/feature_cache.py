"""The frozen encoder's features, computed once per slide: the "(encoder features, cached)" box.

``encode_slide`` (rule of the same name, per sample x encoder x mpp) writes
``results/features/{encoder}/{mpp}/{sample}.zarr``:

* ``level{i}``: float16 (C_i, H_i, W_i), the encoder's ``features_only`` pyramid (all levels,
  finest first; for a ViT encoder such as UNI2-h, the token maps of its tapped blocks, one level
  per tap, all at its token stride) on the slide's global input grid at ``mpp`` um/px, input pixel (r, c) covering
  level-0 [c s, (c + 1) s) x [r s, (r + 1) s), s = mpp / slide mpp; level pixel (r, c) covers
  input pixels [c t_i, (c + 1) t_i) x ..., t_i the level's stride. Attributes: ``encoder``,
  ``mpp``, ``slide_mpp``, ``strides``, ``channels``, ``origin_px`` (input-pixel (x, y) of
  level pixel (0, 0), a multiple of the coarsest stride), ``tile_px``, ``margin_px``.
* ``encoded``: uint8 mask on the grid of ``tile_px`` cells: 1 where features were computed. The
  slide is encoded in tiles of ``tile_px`` input pixels (each read with ``margin_px`` of context
  on every side, only the centre kept), for every tile that touches tissue (the tile index of
  ``tile_slide``) or lies within ``context_um`` of a spot; elsewhere the features are 0.
* ``spots``: float16 (n_spots, F) the encoder's globally pooled features of each spot's crop
  (``crop_um`` at ``mpp``, centred on the spot) with ``spot_names``: the linear probe's input.

The same frozen encoder with the same standardisation (:func:`encoder_mean_std`) as the models
use, so training from the cache equals training with the frozen encoder run on the fly (up to
float16 rounding and the context a window border cuts off; a ViT's tokens also attend over the
whole cache tile rather than the window). Only an encoder with fixed weights is cached (a named
pretrained encoder, or a timm / ViT name with a local checkpoint): a random network differs in
every model. Attributes ``encoder_cfg`` record a ViT's taps, token stride and architecture
overrides; a model trains from the cache only with the same.

Consumers: :class:`CachedWindowDataset` serves :class:`histomap.tasks.dense_windows.WindowDataset`'s
training windows as crops of the cached pyramid instead of images (PixNet with a frozen encoder,
the iStar-style MLP on encoder features; :func:`cached_datasets`, batch loss
:func:`cached_dense_batch_loss`). Window origins snap to the coarsest stride, jitter moves in
steps of it, and the dihedral augmentation turns the feature maps and the disc centres together
(an approximation: a CNN's features of a turned image are not exactly its turned features).
Only the levels a model uses are read, into memory up to 2 GB, else per window from the store.
:func:`cached_spot_datasets` gives the spots' pooled crop features to the head of a
frozen-backbone ST-Net-style model; :mod:`histomap.tasks.probe` reads them for the probe.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from histomap.checked_io import (check_feature_cache, checked_array, read_h5ad_checked,
                                 read_parquet_checked)
from histomap.compat import torch
from histomap.data.slide import open_slide, read_patch, read_region, slide_mpp
from histomap.data.spot_patches import dihedral
from histomap.errors import InputError
from histomap.models.encoder_specs import frozen_encoder_config, is_vit_name
from histomap.models.encoders import create_encoder, encoder_mean_std, is_pretrained
from histomap.models.roi import roi_aggregate
from histomap.outputs import atomic_output
from histomap.tasks.dense_windows import SlideSpots, WindowDataset, make_loss_fn
from histomap.training.device import to_device

log = logging.getLogger(__name__)

FORMAT = "histomap.features/1"
DEFAULT_TILE_PX = 512
DEFAULT_MARGIN_PX = 64


class SlideEncoder(nn.Module):
    """Frozen encoder for the cache: [0, 1] RGB -> (frozen maps, pooled vector).

    A CNN gives its ``features_only`` pyramid and its pooled features; a ViT (``uni2-h``, a timm
    ``vit_*``) the token maps of its tapped blocks (all at ``token_stride``, one level per tap:
    PixNet's neck turns them into its pyramid, iStar resamples them) and its pooled embedding,
    both from one copy of the network. ``encoder_cfg``: a ViT's ``tap_blocks``,
    ``token_stride`` and architecture overrides (:func:`frozen_encoder_config`).
    """

    def __init__(self, encoder: str, checkpoint: str | Path | None = None,
                 encoder_cfg: dict | None = None):
        super().__init__()
        if checkpoint is None and not is_pretrained(encoder):
            raise ValueError(f"encoder {encoder!r} has no weights to cache (a random network "
                             "differs in every model): name a pretrained encoder or give its "
                             "local weights file (the model's `checkpoint`, or "
                             "features.checkpoints)")
        self.frozen_cfg = frozen_encoder_config(encoder, encoder_cfg)
        if is_vit_name(encoder):
            from histomap.models.foundation import resize_to_tokens

            cfg = self.frozen_cfg
            self.pyramid = create_encoder(encoder, checkpoint=checkpoint, features_only=True,
                                          tap_blocks=cfg["tap_blocks"],
                                          token_stride=cfg["token_stride"],
                                          vit_kwargs=cfg["vit_kwargs"])
            self.frozen_cfg = {**cfg, "tap_blocks": list(self.pyramid.tap_blocks)}
            vit, patch, stride = self.pyramid.vit, self.pyramid.patch_size, cfg["token_stride"]
            self.pooled = None
            self._pool = lambda x: vit(resize_to_tokens(x, patch, stride))
            self.num_features = int(vit.num_features)
            self.strides = [int(s) for s in self.pyramid.strides]
            self.channels = [int(c) for c in self.pyramid.channels]
        else:
            if encoder_cfg:
                raise ValueError(f"the feature cache holds every level of the plain encoder "
                                 f"{encoder!r}; it takes no encoder_cfg {encoder_cfg}")
            self.pyramid = create_encoder(encoder, checkpoint=checkpoint, features_only=True)
            self.pooled = create_encoder(encoder, checkpoint=checkpoint, num_classes=0)
            self._pool = self.pooled
            self.num_features = int(self.pooled.num_features)
            self.strides = [int(r) for r in self.pyramid.feature_info.reduction()]
            self.channels = [int(c) for c in self.pyramid.feature_info.channels()]
        mean, std = encoder_mean_std(encoder)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.to(self.device)
        return [m.float().cpu() for m in self.pyramid((x - self.mean) / self.std)]

    def pool(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        return self._pool((x - self.mean) / self.std).float().cpu()


def _encode_device(device: str | None) -> torch.device:
    """``auto`` (or None): the GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() / 255.0


def _tiles_to_encode(width_in: int, height_in: int, tile: int, s0: float,
                     tissue: pd.DataFrame | None, spots_px: np.ndarray, context_px0: float
                     ) -> np.ndarray:
    """(rows, cols) bool grid of ``tile``-px cells to encode: those touching a tissue tile box
    or within ``context_px0`` level-0 px of a spot centre."""
    rows, cols = -(-height_in // tile), -(-width_in // tile)
    want = np.zeros((rows, cols), bool)
    boxes = []
    if tissue is not None and len(tissue):
        boxes.append(tissue[["x0_px", "y0_px", "size_px0", "size_px0"]].to_numpy(float))
    if len(spots_px):
        boxes.append(np.column_stack([spots_px - context_px0,
                                      np.full((len(spots_px), 2), 2 * context_px0)]))
    for x0, y0, w, h in (np.concatenate(boxes) if boxes else np.zeros((0, 4))):
        c0, c1 = int(max(x0 / s0 // tile, 0)), int(min((x0 + w) / s0 // tile, cols - 1))
        r0, r1 = int(max(y0 / s0 // tile, 0)), int(min((y0 + h) / s0 // tile, rows - 1))
        want[r0:r1 + 1, c0:c1 + 1] = True
    return want


@torch.no_grad()
def encode_slide(slide_path: str | Path, st_path: str | Path, out_zarr: str | Path, *,
                 encoder: str, mpp: float, tiles_parquet: str | Path | None = None,
                 checkpoint: str | Path | None = None, crop_um: float | None = None,
                 tile_px: int = DEFAULT_TILE_PX, margin_px: int = DEFAULT_MARGIN_PX,
                 context_um: float = 300.0, batch_size: int = 32,
                 encoder_cfg: dict | None = None, device: str | None = "auto") -> Path:
    """Write the feature cache of one slide (module docstring); returns the zarr path.

    ``crop_um``: side of the spot crops pooled into ``spots`` (default: the spot diameter).
    ``encoder_cfg``: a ViT's taps, token stride and architecture overrides (recorded; a model
    trains from the cache only with the same). ``device``: ``auto`` (the GPU when present),
    ``cpu`` or ``cuda[:i]``; the encoder runs in float32 either way.
    """
    from histomap.data.sample import geometry

    out_zarr = Path(out_zarr)
    enc = SlideEncoder(encoder, checkpoint, encoder_cfg).to(_encode_device(device))
    coarse = max(enc.strides)
    if tile_px % coarse or margin_px % coarse:
        raise ValueError(f"tile_px ({tile_px}) and margin_px ({margin_px}) must be multiples of "
                         f"the coarsest stride {coarse}")
    spots = read_h5ad_checked(st_path, what="spot table")
    centres = np.asarray(spots.obsm["spatial"], dtype=np.float64)
    crop_um = float(crop_um or geometry(spots)["spot_diameter_um"])
    tissue = read_parquet_checked(tiles_parquet) if tiles_parquet else None
    t0 = time.time()
    with atomic_output(out_zarr) as tmp:
        with open_slide(slide_path) as slide:
            mpp0 = slide_mpp(slide, slide_path)
            recorded = float(geometry(spots)["mpp"])
            if abs(recorded - mpp0) > 1e-3 * mpp0:
                raise InputError(st_path, f"spots are in pixels of a {recorded} um/px image but "
                                          f"the slide {slide_path} is {mpp0} um/px")
            s0 = float(mpp) / mpp0
            width_in = int(np.ceil(slide.dimensions[0] / s0 / coarse)) * coarse
            height_in = int(np.ceil(slide.dimensions[1] / s0 / coarse)) * coarse
            want = _tiles_to_encode(width_in, height_in, tile_px, s0, tissue, centres,
                                    context_um / mpp0)
            root = zarr.open_group(str(tmp), mode="w")
            _encode_tiles(slide, enc, root, want, (height_in, width_in), s0, tile_px, margin_px)
            pooled = _pool_spot_crops(slide, enc, centres, crop_um, mpp0, float(mpp), batch_size)
        root.create_array("spots", data=pooled, chunks=pooled.shape or (1, 1))
        names = root.create_array("spot_names", shape=(len(centres),), dtype=str)
        names[:] = np.asarray(spots.obs_names, dtype=object)
        root.create_array("encoded", data=want.astype(np.uint8))
        root.attrs.update({
            "format": FORMAT, "encoder": encoder, "checkpoint": None if checkpoint is None
            else str(checkpoint), "mpp": float(mpp), "slide_mpp": mpp0,
            "slide": str(slide_path), "strides": enc.strides, "channels": enc.channels,
            "origin_px": [0, 0], "tile_px": int(tile_px), "margin_px": int(margin_px),
            "crop_um": crop_um, "context_um": float(context_um),
            "encoder_cfg": enc.frozen_cfg})
    log.info("%s: %s features at %g um/px, %d of %d tiles encoded, %d spot crops, %.1f s",
             slide_path, encoder, mpp, int(want.sum()), want.size, len(centres),
             time.time() - t0)
    return out_zarr


def _encode_tiles(slide, enc: SlideEncoder, root: zarr.Group, want: np.ndarray,
                  size_in: tuple[int, int], s0: float, tile_px: int, margin_px: int) -> None:
    """One float16 array per feature level in ``root`` (``level{i}``), filled tile by tile for
    the tiles of ``want``; each tile is encoded with a ``margin_px`` context border that is
    cut off. ``size_in``: (height, width) in input pixels; ``s0``: level-0 px per input px."""
    height_in, width_in = size_in
    arrays = []
    for i, (stride, ch) in enumerate(zip(enc.strides, enc.channels)):
        shape = (ch, height_in // stride, width_in // stride)
        chunk = max(tile_px // stride, 1)
        arrays.append(root.create_array(f"level{i}", shape=shape, dtype="float16",
                                        chunks=(ch, chunk, chunk), fill_value=0))
    for r, c in tqdm(np.argwhere(want), desc="encode tiles", unit="tile",
                     disable=None, leave=False):
        x0, y0 = int(c) * tile_px - margin_px, int(r) * tile_px - margin_px
        side = tile_px + 2 * margin_px
        rgb = read_region(slide, x0 * s0, y0 * s0, side * s0, side * s0, side, side)
        for arr, stride, level in zip(arrays, enc.strides, enc.levels(_to_tensor(rgb))):
            m, t = margin_px // stride, tile_px // stride
            block = level[0, :, m:m + t, m:m + t].half().numpy()
            r0, c0 = int(r) * t, int(c) * t
            h = min(t, arr.shape[1] - r0)
            w = min(t, arr.shape[2] - c0)
            arr[:, r0:r0 + h, c0:c0 + w] = block[:, :h, :w]


def _pool_spot_crops(slide, enc: SlideEncoder, centres: np.ndarray, crop_um: float, mpp0: float,
                     mpp: float, batch_size: int) -> np.ndarray:
    """(spots, features) float16: the encoder's pooled features of each spot's crop."""
    pooled = np.zeros((len(centres), enc.num_features), np.float16)
    for i in range(0, len(centres), batch_size):
        crops = np.stack([read_patch(slide, cx, cy, crop_um, mpp0, mpp)
                          for cx, cy in centres[i:i + batch_size]])
        x = torch.from_numpy(np.array(crops)).permute(0, 3, 1, 2).float() / 255.0
        pooled[i:i + batch_size] = enc.pool(x).half().numpy()
    return pooled


class FeaturePyramid:
    """A cached pyramid for training windows. ``levels``: the level indices a model uses (None:
    all; the others are never read). They are read into memory (float16) when they fit in
    ``max_memory_bytes``, else every crop reads its chunks from the zarr store."""

    def __init__(self, path: str | Path, levels: Sequence[int] | None = None,
                 max_memory_bytes: int = 2 << 30):
        self.path = Path(path)
        root = check_feature_cache(self.path, FORMAT)  # structure; chunks checked as read
        self.attrs = dict(root.attrs)
        self.strides = [int(s) for s in self.attrs["strides"]]
        used = range(len(self.strides)) if levels is None else sorted(set(levels))
        arrays = {i: checked_array(root[f"level{i}"], self.path, "feature cache") for i in used}
        nbytes = sum(a.nbytes for a in arrays.values())
        self.in_memory = nbytes <= max_memory_bytes
        self.levels = [None] * len(self.strides)
        for i, arr in arrays.items():
            self.levels[i] = np.asarray(arr[:]) if self.in_memory else arr
        if not self.in_memory:
            log.info("%s: %.1f GB of features: read per window from the store", self.path,
                     nbytes / 1e9)
        self.origin = np.asarray(self.attrs["origin_px"], dtype=np.int64)
        self.mpp = float(self.attrs["mpp"])
        names, spots = (checked_array(root[k], path, "feature cache")
                        for k in ("spot_names", "spots"))
        self.spot_names = [str(n) for n in names[:]]
        self.spots = np.asarray(spots[:])

    def check(self, encoder: str, mpp: float, checkpoint: str | Path | None = None,
              encoder_cfg: dict | None = None) -> None:
        """InputError unless the cache holds ``encoder`` (with ``checkpoint`` and the frozen
        part of ``encoder_cfg``: a ViT's taps, token stride, architecture) at ``mpp``."""
        if self.attrs["encoder"] != encoder or abs(self.mpp - float(mpp)) > 1e-9:
            raise InputError(self.path, f"feature cache holds {self.attrs['encoder']} at "
                                        f"{self.mpp} um/px; the model needs {encoder} at {mpp}")
        cached = self.attrs.get("checkpoint") or None
        wanted = None if checkpoint is None else str(checkpoint)
        if cached != wanted:
            raise InputError(self.path, f"feature cache holds the weights of {cached}; the "
                                        f"model uses {wanted}")
        held = _comparable(self.attrs.get("encoder_cfg") or {})
        want = _comparable(frozen_encoder_config(encoder, encoder_cfg))
        if held.get("tap_blocks") is not None and want.get("tap_blocks") is None:
            want["tap_blocks"] = held["tap_blocks"]  # the default taps, resolved by the cache
            if not _default_taps_match(encoder, held, want):
                want["tap_blocks"] = None
        if held != want:
            raise InputError(self.path, f"feature cache holds {encoder} features configured "
                                        f"{held}; the model needs {want}")

    def crop(self, level: int, x0: int, y0: int, side: int) -> np.ndarray:
        """(C, side / t, side / t) features of input pixels [x0, x0 + side) x [y0, ...);
        ``x0``, ``y0`` and ``side`` multiples of the level's stride t; 0 outside the cache."""
        t = self.strides[level]
        arr = self.levels[level]
        if arr is None:
            raise ValueError(f"{self.path}: level {level} was not loaded")
        n = side // t
        out = np.zeros((arr.shape[0], n, n), dtype=arr.dtype)
        cx, cy = (x0 - int(self.origin[0])) // t, (y0 - int(self.origin[1])) // t
        ys, xs = max(cy, 0), max(cx, 0)
        ye, xe = min(cy + n, arr.shape[1]), min(cx + n, arr.shape[2])
        if ye > ys and xe > xs:
            out[:, ys - cy:ye - cy, xs - cx:xe - cx] = arr[:, ys:ye, xs:xe]
        return out

    def spot_features(self, names: Sequence[str]) -> np.ndarray:
        """(n, F) float32 pooled crop features of the named spots."""
        index = {n: i for i, n in enumerate(self.spot_names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise InputError(self.path, f"{len(missing)} spots have no cached features (e.g. "
                                        f"{missing[:3]}); the cache is older than the spots")
        return self.spots[[index[n] for n in names]].astype(np.float32)


def _comparable(cfg: Mapping) -> dict:
    """A frozen encoder configuration as JSON would store it (lists, not tuples)."""
    import json

    return json.loads(json.dumps(dict(cfg), default=list))


def _default_taps_match(encoder: str, held: Mapping, want: Mapping) -> bool:
    """Whether the taps a cache resolved are the default taps of the model's ViT."""
    from histomap.models.foundation import default_taps, vit_arguments

    depth = vit_arguments(encoder, dict(want.get("vit_kwargs") or {}))[1].get("depth")
    if depth is None:
        return True  # a timm ViT's own depth: the cache built the same architecture
    return list(held["tap_blocks"]) == default_taps(int(depth))


class CachedWindowDataset(WindowDataset):
    """Training windows as crops of cached feature pyramids (module docstring): items hold
    ``level{i}`` float16 (C_i, w / t_i, w / t_i) instead of ``image``, plus the discs and
    targets of :class:`WindowDataset`. ``pyramids``: one per slide of ``slides``, same order."""

    def __init__(self, slides: Sequence[SlideSpots], pyramids: Sequence[FeaturePyramid],
                 **kwargs):
        if len(pyramids) != len(slides):
            raise ValueError(f"need one feature cache per slide, got {len(pyramids)} for "
                             f"{len(slides)}")
        kept = [p for s, p in zip(slides, pyramids) if len(s.centres_px)]
        super().__init__(slides, read_images=False, **kwargs)
        self.pyramids = kept
        self.coarse = max(max(p.strides) for p in kept)
        if self.window_px % self.coarse:
            raise ValueError(f"window_px {self.window_px} is not a multiple of the encoder's "
                             f"coarsest stride {self.coarse}")
        for spots, pyr in zip(self.slides, self.pyramids):
            if abs(pyr.mpp - self.input_mpp) > 1e-9:
                raise InputError(pyr.path, f"features at {pyr.mpp} um/px, windows at "
                                           f"{self.input_mpp} um/px ({spots.name})")

    def window_origin(self, i: int, offset: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """The window's origin snapped to the coarsest stride (cached levels stay aligned)."""
        x0, y0 = super().window_origin(i, offset)
        c = self.coarse
        return int(round(x0 / c)) * c, int(round(y0 / c)) * c

    def window(self, i: int, *, k: int = 0, offset: tuple[int, int] = (0, 0)
               ) -> dict[str, torch.Tensor]:
        item = super().window(i, k=k, offset=offset)
        x0, y0 = self.window_origin(i, offset)
        pyr = self.pyramids[int(self.anchors[i, 0])]
        for level in range(len(pyr.strides)):
            if pyr.levels[level] is None:
                continue
            feats = torch.from_numpy(pyr.crop(level, x0, y0, self.window_px))
            item[f"level{level}"] = dihedral(feats, k)
        return item


def frozen_encoder_of(model: nn.Module) -> tuple[str, dict]:
    """(encoder name, frozen part of its configuration) of a dense model that keeps its encoder
    frozen, or ValueError when it trains its encoder (its features then change every step and
    cannot be cached)."""
    cfg = model.config
    if "freeze_encoder" in cfg:  # PixNet
        if not cfg["freeze_encoder"]:
            raise ValueError("cached features need a frozen encoder: set pixnet "
                             "freeze_encoder: true (fine-tuning runs the encoder every step)")
    elif cfg.get("features") != "encoder":  # iStar
        raise ValueError("cached features serve iStar with features: encoder only")
    name = cfg.get("encoder")
    if not name:
        raise ValueError("cached features need an encoder")
    encoder_cfg = cfg.get("encoder_cfg") or {}
    if encoder_cfg and not is_vit_name(name):
        raise ValueError("cached features hold every level of the plain encoder; drop "
                         f"encoder_cfg {encoder_cfg} to train from them")
    return str(name), encoder_cfg


def frozen_encoder_name(model: nn.Module) -> str:
    """The encoder a dense model keeps frozen (:func:`frozen_encoder_of`)."""
    return frozen_encoder_of(model)[0]


def cached_datasets(model: nn.Module, caches: Sequence[str | Path],
                    train_parts: Sequence[SlideSpots], val_parts: Sequence[SlideSpots], *,
                    checkpoint: str | Path | None, jitter_um: float | None,
                    anchor_stride_um: float | None, window_px: int, input_mpp: float,
                    out_stride: int) -> tuple[CachedWindowDataset, CachedWindowDataset | None]:
    """Training and validation windows of a frozen-encoder dense model from the caches (one
    per sample, the order of the parts), after checking they hold this model's encoder."""
    encoder, encoder_cfg = frozen_encoder_of(model)
    if len(caches) != len(train_parts):
        raise ValueError(f"{len(caches)} feature caches for {len(train_parts)} samples")
    needed = getattr(model, "levels", None)  # PixNet's levels; iStar uses every level
    pyramids = [FeaturePyramid(path, levels=needed) for path in caches]
    for pyr in pyramids:
        pyr.check(encoder, input_mpp, checkpoint, encoder_cfg)
        if list(pyr.strides) != strides_of(model):
            raise InputError(pyr.path, f"cached strides {pyr.strides} differ from the model's "
                                       f"encoder {strides_of(model)}")
    window = {"window_px": window_px, "input_mpp": input_mpp, "out_stride": out_stride,
              "anchor_stride_um": anchor_stride_um}
    train_ds = CachedWindowDataset(train_parts, pyramids, augment=True, jitter_um=jitter_um,
                                   **window)
    val_ds = None
    if any(len(p.centres_px) for p in val_parts):
        val_ds = CachedWindowDataset(val_parts, pyramids, augment=False, **window)
    return train_ds, val_ds


def cached_dense_batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor],
                            device: torch.device, loss_fn: Callable[..., torch.Tensor] | None
                            ) -> torch.Tensor:
    """``fit``'s batch loss for cached windows: the model's ``decode_features`` (the trainable
    part after the frozen encoder) on the cached levels, disc means against the targets."""
    batch = to_device(batch, device)
    strides = strides_of(model)
    levels = [batch[f"level{i}"].float() if f"level{i}" in batch else None
              for i in range(len(strides))]
    first = next(i for i, level in enumerate(levels) if level is not None)
    side = levels[first].shape[-1] * strides[first] // model.out_stride
    dense_map = model.decode_features(levels, (side, side))
    pred = roi_aggregate(dense_map, batch["centres"], batch["radii"], mode="mean",
                         valid=batch["valid"])
    loss_fn = loss_fn or make_loss_fn()
    return loss_fn(pred, batch["targets"], batch["valid"])


def strides_of(model: nn.Module) -> list[int]:
    """Input-pixel strides of every frozen map of a dense model's encoder (what the cache
    holds: a CNN's pyramid, a ViT's taps at its token stride)."""
    enc = model.encoder if hasattr(model, "encoder") and hasattr(model.encoder, "strides") \
        else model.features.encoder
    return [int(s) for s in getattr(enc, "cache_strides", enc.strides)]


def cached_spot_datasets(caches: Sequence[str | Path], st_paths: Sequence[str | Path],
                         genes: Sequence[str], *, encoder: str, mpp: float,
                         checkpoint: str | Path | None, validation: Mapping, seed: int
                         ) -> tuple[TensorDataset, TensorDataset | None, float]:
    """(training, validation, crop_um): the spots' cached pooled crop features and targets,
    validation = the spatial blocks every model validates on (same seeds per sample)."""
    from histomap.data.preprocess import expression_matrix
    from histomap.data.sample import geometry
    from histomap.evaluation.folds import validation_split

    if len(caches) != len(st_paths):
        raise ValueError(f"{len(caches)} feature caches for {len(st_paths)} samples")
    parts: dict[bool, list] = {False: [], True: []}
    crops = set()
    for i, (cache, st_path) in enumerate(zip(caches, st_paths)):
        pyr = FeaturePyramid(cache)
        pyr.check(encoder, mpp, checkpoint)
        crops.add(float(pyr.attrs["crop_um"]))
        spots = read_h5ad_checked(st_path, what="spot table")
        feats = pyr.spot_features(list(spots.obs_names))
        targets = expression_matrix(spots, genes, path=st_path)
        xy = np.asarray(spots.obsm["spatial"], dtype=np.float64)
        val = validation_split(xy, fraction=float(validation["fraction"]),
                               block_px=float(validation["block_um"]) / geometry(spots)["mpp"],
                               seed=seed + i)
        for flag in (False, True):
            keep = val if flag else ~val
            parts[flag].append((feats[keep], targets[keep]))
    if len(crops) > 1:
        raise ValueError(f"the caches hold different crops {sorted(crops)}")

    def tensors(flag):
        x = np.concatenate([p[0] for p in parts[flag]])
        y = np.concatenate([p[1] for p in parts[flag]])
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y)) if len(x) else None

    return tensors(False), tensors(True), crops.pop()


def cached_spot_batch_loss(model: nn.Module, batch, device: torch.device,
                           loss_fn: Callable[..., torch.Tensor] | None) -> torch.Tensor:
    """``fit``'s batch loss for cached pooled features: the head of a frozen-backbone crop
    model on (features, targets)."""
    features, targets = to_device(batch, device)
    return loss_fn(model.head_from_features(features.float()), targets)
