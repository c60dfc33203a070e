"""Stain handling for H&E slides: normalisation to a reference fitted on training slides only,
and stain augmentation for models that see pixels while they train.

**Normalisation** (a model's ``stain_normalise: macenko | reinhard``). torchstain fits the
statistics: Macenko's stain matrix (the H and E optical-density vectors) and the 99th percentile
of each stain's concentration, or Reinhard's LAB means and standard deviations. A
:class:`StainProfile` holds them for a set of slides:

* the **reference** of a fold is fitted on tissue pixels pooled from that fold's training slides
  (:func:`fit_profile` over :func:`tissue_pixels` of each), never on a held-out slide;
* each slide gets its own **source** profile, fitted once on its own tissue pixels, and
  :class:`StainNormaliser` maps every pixel of it with that fixed pair (a slide-level transform:
  torchstain's ``normalize`` re-estimates the source on every image it is given, which for the
  tiles of one slide gives a different transform per tile and seams between them).

Macenko: optical density ``OD = -log((I + 1) / Io)``, concentrations ``C = pinv(HE_src) OD``
scaled by ``max_c_ref / max_c_src``, ``I' = Io exp(-HE_ref C)``. Reinhard: per LAB channel
``(x - mu_src) / sd_src * sd_ref + mu_ref``. Both with torchstain's conventions (``Io = 240``,
``alpha = 1``, ``beta = 0.15``; OpenCV LAB scaling), so the profiles are torchstain's own.

**Augmentation** (a model's ``stain_augment: {hed_sigma, brightness, contrast}``):
:class:`StainJitter` perturbs each training image in the HED colour space (Ruifrok and
Johnston's stain matrix; each stain's concentration scaled by ``U(1 - s, 1 + s)`` and shifted by
``U(-s, s)``, as Tellez et al. 2018), then its brightness and contrast.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histomap.compat import torch
from histomap.errors import InputError

log = logging.getLogger(__name__)

METHODS = ("macenko", "reinhard")
IO, ALPHA, BETA = 240, 1, 0.15  # torchstain's Macenko defaults
FIT_MPP = 2.0          # tissue pixels are sampled from the slide read at this resolution
MAX_FIT_PIXELS = 1_000_000  # per slide
FORMAT = "histomap.stain_profile/1"
_OD_OF_UINT8 = (-np.log((np.arange(256) + 1.0) / IO)).astype(np.float32)  # torchstain's OD


@dataclass(frozen=True)
class StainProfile:
    """A stain normaliser's statistics for a set of slides (see module doc)."""

    method: str
    stats: dict[str, list]
    slides: tuple[str, ...] = ()
    n_pixels: int = 0

    def array(self, key: str) -> np.ndarray:
        return np.asarray(self.stats[key], dtype=np.float64)

    def to_json(self) -> dict:
        return {"format": FORMAT, "method": self.method, "stats": self.stats,
                "slides": list(self.slides), "n_pixels": int(self.n_pixels)}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> StainProfile:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise InputError(path, f"cannot read the stain profile ({exc}); delete it and "
                             "rerun to refit it") from exc

    @classmethod
    def from_json(cls, raw: dict) -> StainProfile:
        keys = {"macenko": ("he", "max_c"), "reinhard": ("means", "stds")}
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get(
                "method") not in keys or any(k not in raw.get("stats", {})
                                             for k in keys[raw["method"]]):
            raise ValueError(f"not a {FORMAT} profile of a method in {METHODS}")
        return cls(raw["method"], raw["stats"], tuple(raw.get("slides", ())),
                   int(raw.get("n_pixels", 0)))


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"stain normalisation method must be one of {METHODS}, got {method!r}")
    return method


def fit_profile(method: str, pixels: np.ndarray, slides=()) -> StainProfile:
    """torchstain's fit on RGB uint8 pixels (n, 3), pooled from ``slides``."""
    import torchstain

    check_method(method)
    pixels = np.asarray(pixels, dtype=np.uint8).reshape(-1, 1, 3)
    if len(pixels) < 100:
        raise ValueError(f"{', '.join(map(str, slides)) or 'image'}: {len(pixels)} tissue "
                         "pixels are too few to fit a stain profile (at least 100)")
    if method == "macenko":
        norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        norm.fit(pixels, Io=IO, alpha=ALPHA, beta=BETA)
        stats = {"he": np.asarray(norm.HERef).tolist(), "max_c": np.asarray(norm.maxCRef).tolist()}
    else:
        norm = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
        norm.fit(pixels)
        stats = {"means": np.asarray(norm.target_means, dtype=float).tolist(),
                 "stds": np.asarray(norm.target_stds, dtype=float).tolist()}
    return StainProfile(method, stats, tuple(str(s) for s in slides), len(pixels))


def tissue_pixels(slide_path: str | Path, *, fit_mpp: float = FIT_MPP,
                  max_pixels: int = MAX_FIT_PIXELS, seed: int = 0) -> np.ndarray:
    """RGB uint8 (n, 3) tissue pixels of a slide read at ``fit_mpp`` um/px (the tissue mask of
    :func:`histomap.data.tiling.tissue_from_rgb`), at most ``max_pixels`` of them drawn with a
    fixed seed."""
    from histomap.data.slide import open_slide, slide_mpp
    from histomap.data.tiling import read_thumbnail, tissue_from_rgb

    with open_slide(slide_path) as slide:
        px0 = max(fit_mpp / slide_mpp(slide, slide_path), 1.0)
        rgb = read_thumbnail(slide, px0)
        mask = tissue_from_rgb(rgb, px0 * slide_mpp(slide, slide_path))
    pixels = rgb[mask]
    if len(pixels) > max_pixels:
        pixels = pixels[np.sort(np.random.default_rng(seed).choice(len(pixels), max_pixels,
                                                                    replace=False))]
    if len(pixels) < 100:
        raise InputError(slide_path, f"{len(pixels)} tissue pixels at {fit_mpp} um/px: too "
                         "few to fit a stain profile")
    return pixels


def fit_slides(method: str, slide_paths, **kwargs) -> StainProfile:
    """One profile fitted on the tissue pixels of every slide of ``slide_paths`` pooled."""
    slide_paths = [str(p) for p in slide_paths]
    if not slide_paths:
        raise ValueError("a stain reference needs at least one training slide")
    pixels = np.concatenate([tissue_pixels(p, **kwargs) for p in slide_paths])
    return fit_profile(method, pixels, slide_paths)


class StainNormaliser:
    """Maps RGB uint8 pixels of a slide with profile ``source`` onto ``reference``."""

    def __init__(self, source: StainProfile, reference: StainProfile):
        if source.method != reference.method:
            raise ValueError(f"source profile is {source.method}, reference is "
                             f"{reference.method}")
        self.method = check_method(reference.method)
        if self.method == "macenko":
            # (3, 2): optical density -> concentrations scaled to the reference's range
            scale = reference.array("max_c") / source.array("max_c")
            self.unmix = (np.linalg.pinv(source.array("he")).T * scale).astype(np.float32)
            self.mix = reference.array("he").T.astype(np.float32)        # (2, 3)
        else:
            self.src_mu, self.src_sd = source.array("means"), source.array("stds")
            self.ref_mu, self.ref_sd = reference.array("means"), reference.array("stds")

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
            raise ValueError(f"expected RGB uint8 (..., 3), got {rgb.dtype} {rgb.shape}")
        flat = rgb.reshape(-1, 3)
        out = self._macenko(flat) if self.method == "macenko" else self._reinhard(flat)
        return out.reshape(rgb.shape)

    def _macenko(self, flat: np.ndarray) -> np.ndarray:
        out = np.exp(-((_OD_OF_UINT8[flat] @ self.unmix) @ self.mix))  # float32
        out *= IO
        return np.clip(np.rint(out, out=out), 0, 255).astype(np.uint8)

    def _reinhard(self, flat: np.ndarray) -> np.ndarray:
        from torchstain.numpy.utils.lab2rgb import lab2rgb
        from torchstain.numpy.utils.rgb2lab import rgb2lab
        from torchstain.numpy.utils.split import lab_merge, lab_split

        labs = lab_split(rgb2lab(flat.astype(np.float32)[None] / 255.0))
        moved = [(x - mu) / sd * sd_r + mu_r for x, mu, sd, mu_r, sd_r in
                 zip(labs, self.src_mu, self.src_sd, self.ref_mu, self.ref_sd)]
        out = lab2rgb(lab_merge(*moved))[0]
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def normalise_slide(slide_path: str | Path, reference: StainProfile, out_slide: str | Path,
                    out_profile: str | Path | None = None, **fit_kwargs) -> StainProfile:
    """Write ``slide_path`` normalised to ``reference`` as a pyramidal TIFF of the same size and
    mpp, streamed tile by tile (:func:`histomap.data.slide.write_transformed_pyramid`: any
    whole-slide image, one tile in memory; atomic); ``out_profile``: the slide's own fitted
    source profile, as JSON. Returns the source profile."""
    from histomap.data.slide import open_slide, slide_mpp, write_transformed_pyramid

    source = fit_slides(reference.method, [slide_path], **fit_kwargs)
    with open_slide(slide_path) as slide:
        write_transformed_pyramid(slide, out_slide, slide_mpp(slide, slide_path),
                                  StainNormaliser(source, reference))
    if out_profile is not None:
        source.write(out_profile)
    log.info("%s: normalised (%s) to the reference of %s -> %s", slide_path, reference.method,
             ", ".join(reference.slides), out_slide)
    return source


# ------------------------------------------------------------------------- augmentation
class StainJitter:
    """Random HED, brightness and contrast jitter of float RGB images in [0, 1] with the colour
    axis third from last (``(3, H, W)`` or ``(B, 3, H, W)``); draws from torch's RNG. All
    three amplitudes 0 give the image back unchanged."""

    def __init__(self, hed_sigma: float = 0.05, brightness: float = 0.0, contrast: float = 0.0):
        for name, value in (("hed_sigma", hed_sigma), ("brightness", brightness),
                            ("contrast", contrast)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"stain_augment.{name} must be in [0, 1), got {value!r}")
        self.hed_sigma, self.brightness, self.contrast = (float(hed_sigma), float(brightness),
                                                          float(contrast))
        from histomap.models.istar import hed_from_rgb_matrix  # Ruifrok & Johnston's

        self.hed_from_rgb = hed_from_rgb_matrix()
        self.rgb_from_hed = torch.linalg.inv(self.hed_from_rgb)

    def _uniform(self, lead: tuple, n: int, half: float) -> torch.Tensor:
        return (torch.rand((*lead, n)) * 2.0 - 1.0) * half

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        lead = tuple(image.shape[:-3])
        out = image
        if self.hed_sigma > 0:
            od = -torch.log(image.clamp(min=1.0 / 255.0)).movedim(-3, -1)      # (..., H, W, 3)
            hed = od @ self.hed_from_rgb.to(image.dtype)
            scale = 1.0 + self._uniform(lead, 3, self.hed_sigma)
            shift = self._uniform(lead, 3, self.hed_sigma)
            hed = hed * scale[..., None, None, :] + shift[..., None, None, :]
            out = torch.exp(-(hed @ self.rgb_from_hed.to(image.dtype))).movedim(-1, -3)
        if self.contrast > 0:
            factor = 1.0 + self._uniform(lead, 1, self.contrast)[..., None, None]
            mean = out.mean(dim=(-3, -2, -1), keepdim=True)
            out = (out - mean) * factor + mean
        if self.brightness > 0:
            out = out + self._uniform(lead, 1, self.brightness)[..., None, None]
        return out.clamp(0.0, 1.0)

    @classmethod
    def from_config(cls, block: dict | None) -> StainJitter | None:
        """``stain_augment`` of a model block: None / false (off), true (the defaults) or a
        mapping of ``hed_sigma``, ``brightness``, ``contrast``."""
        if not block:
            return None
        if block is True:
            return cls()
        unknown = set(block) - {"hed_sigma", "brightness", "contrast"}
        if unknown:
            raise ValueError(f"stain_augment: unknown key(s) {sorted(unknown)}")
        return cls(**block)
