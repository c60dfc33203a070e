"""One trained bundle applied to one H&E slide, every step in one call: what the workflow's
apply rules do for a sample of platform ``he`` (ingest_sample, tile_slide, apply_dense or
apply_spot_tables, apply_dense_tables, apply_figure, apply_spatialdata), for a user with a
bundle and a slide and no config (``histomap apply``, or a notebook).

Arrow of the DESIGN.md picture: applied to H&E-only slides -> maps, tables, figures. The steps
are the same package functions the rules call, with the same defaults, so the outputs equal the
workflow's for the same bundle, slide and settings. Layout under ``out_dir/{sample}/``::

    ingest/      slide.tif, spots.h5ad, highres.h5ad, sample.zarr   (ingest_sample)
    tiles.parquet                                                     (tile_slide)
    dense.zarr                                        (dense bundles only)
    spots_{um}um.h5ad, bins_{um}um.h5ad               (bins: dense bundles only)
    map.png, spatialdata.zarr
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad

from histomap.data.ingest import ingest_sample
from histomap.data.spatial_data import applied_spatialdata, write_spatialdata
from histomap.data.stain import normalise_slide
from histomap.data.tiling import tile_slide
from histomap.tasks import apply
from histomap.tasks.bundle import Bundle, read_bundle

log = logging.getLogger(__name__)


def scale_label(um: float) -> str:
    """A scale in file names: ``55`` for 55.0 um, ``2.5`` for 2.5 um."""
    return f"{float(um):g}"


@dataclass
class ApplySettings:
    """What a user may set when applying a bundle (the workflow's ``apply`` and ``tiling``
    config keys; defaults are the package functions' own, as in ``config/config.yaml``)."""

    spot_diameters_um: Sequence[float] = (55.0,)
    spot_spacing_um: float | None = None  # None: touching discs
    bin_um: Sequence[float] = ()
    figure_genes: int = 4
    mpp: float | None = None  # None: the slide's own metadata
    tiling: dict = field(default_factory=dict)  # tile_slide keyword arguments
    mask_mpp: float = 16.0
    spatialdata_mpp: float | None = 4.0
    device: str = "auto"


@dataclass
class AppliedSlide:
    """Paths written for one slide."""

    sample: str
    folder: Path
    dense: Path | None
    tables: dict[str, Path]  # SpatialData element name (``{bundle}_{stem}``) -> h5ad
    figure: Path
    spatialdata: Path


def apply_to_slide(bundle: Bundle | str | Path, slide: str | Path, out_dir: str | Path, *,
                   sample: str | None = None,
                   settings: ApplySettings | None = None) -> AppliedSlide:
    """Apply ``bundle`` to the H&E image ``slide``; write everything under
    ``out_dir/{sample}/`` (``sample`` defaults to the file name without its suffix)."""
    bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    settings = settings or ApplySettings()
    slide = Path(slide)
    sample = sample or slide.name.split(".")[0]
    folder = Path(out_dir) / sample
    ingest_dir = folder / "ingest"
    log.info("%s: ingest", slide)
    ingest_sample(platform="he", sample=sample, path=slide, out_dir=ingest_dir, mpp=settings.mpp,
                  spatialdata_mpp=settings.spatialdata_mpp, sheet=slide,
                  mask_mpp=settings.mask_mpp)
    slide_tif, spots = ingest_dir / "slide.tif", ingest_dir / "spots.h5ad"
    tiles = folder / "tiles.parquet"
    log.info("%s: tissue tiles", slide)
    tile_slide(slide_tif, None, tiles, source=slide,
               **{"mask_mpp": settings.mask_mpp, **settings.tiling})
    model_slide = slide_tif
    if bundle.stain is not None:  # normalised to the bundle's training slides first
        log.info("%s: stain normalisation (%s) to the bundle's reference", slide,
                 bundle.stain.method)
        model_slide = ingest_dir / "slide_stain_normalised.tif"
        normalise_slide(slide_tif, bundle.stain, model_slide, ingest_dir / "stain_source.json")
    tables = _apply_tables(bundle, folder, slide_tif, tiles, spots, settings, model_slide)
    dense = folder / "dense.zarr" if bundle.is_dense else None
    figure = folder / "map.png"
    log.info("%s: figure", slide)
    maps = {"dense_zarr": dense} if dense else {"spots_h5ad": next(iter(tables.values()))}
    apply.plot_applied(slide_tif, bundle.genes[:settings.figure_genes], figure,
                       title=f"{bundle.name} on {sample}", mask_mpp=settings.mask_mpp, **maps)
    log.info("%s: SpatialData", slide)
    sdata = applied_spatialdata(ingest_dir / "sample.zarr",
                                dense_maps={bundle.name: dense} if dense else {},
                                tables={name: ad.read_h5ad(p) for name, p in tables.items()})
    sdata_path = write_spatialdata(sdata, folder / "spatialdata.zarr")
    return AppliedSlide(sample, folder, dense, tables, figure, sdata_path)


def _apply_tables(bundle: Bundle, folder: Path, slide_tif: Path, tiles: Path, spots: Path,
                  settings: ApplySettings, model_slide: Path) -> dict[str, Path]:
    """The dense map (dense bundles) and the pseudo-spot and bin tables of one slide; the
    model reads ``model_slide`` (the slide, stain-normalised for a bundle that asks for it),
    the tissue mask comes from ``slide_tif`` as scanned."""
    out_spots = [folder / f"spots_{scale_label(um)}um.h5ad" for um in settings.spot_diameters_um]
    if not bundle.is_dense:
        if settings.bin_um:
            raise ValueError(f"bundle {bundle.name!r} is a spot model ({bundle.architecture}): "
                             "it predicts pseudo-spots only; bins need a dense model")
        log.info("%s: pseudo-spots", slide_tif)
        apply.spot_model_tables(bundle, model_slide, tiles, spots,
                                spot_diameters_um=settings.spot_diameters_um,
                                spot_spacing_um=settings.spot_spacing_um, out_spots=out_spots,
                                mask_mpp=settings.mask_mpp, device=settings.device)
        out_bins = []
    else:
        log.info("%s: dense map", slide_tif)
        apply.apply_dense(bundle, model_slide, tiles, folder / "dense.zarr",
                          device=settings.device)
        out_bins = [folder / f"bins_{scale_label(um)}um.h5ad" for um in settings.bin_um]
        log.info("%s: pseudo-spots and bins", slide_tif)
        apply.dense_tables(bundle, folder / "dense.zarr", tiles, spots, slide_tif,
                           mask_mpp=settings.mask_mpp,
                           spot_diameters_um=settings.spot_diameters_um,
                           spot_spacing_um=settings.spot_spacing_um, bin_um=settings.bin_um,
                           out_spots=out_spots, out_bins=out_bins)
    return {f"{bundle.name}_{p.stem}": p for p in out_spots + out_bins}
