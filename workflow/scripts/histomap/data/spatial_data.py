"""One SpatialData per sample: the H&E, the spots with their tables and the predicted maps.

Arrow of the DESIGN.md picture: ingest (``sample.zarr``) and the predictions (dense maps, spot
tables) -> one container that opens in ``spatialdata.read_zarr``, spatialdata-plot and napari.

Elements (all written with spatialdata's writers)
-------------------------------------------------
* image ``he``: the H&E at ``image_mpp`` (c = r, g, b), multiscale (2x pyramid);
* shapes ``spots``: one circle per spot, centre and ``radius`` in **micrometres**, indexed by
  spot name;
* table ``table``: the spots' raw counts annotating ``spots`` (``region`` / ``spot_id``);
* images ``dense_{run}``: each predicted dense map (channels named by gene; multiscale; chunks of
  one gene), from the OME-Zarr ``dense.zarr`` of :mod:`histomap.tasks.dense_map`;
* tables ``pred_{run}``: each run's predicted spot table, annotating ``spots``;
* applied models (:func:`add_spot_tables`, an H&E-only slide's ``apply`` outputs): per table of
  pseudo-spots or bins, shapes ``{name}`` (its own discs or squares, micrometres) and table
  ``{name}_table`` annotating them, e.g. ``pixnet_spots_55um`` / ``pixnet_spots_55um_table``.

Coordinate systems: ``global`` in micrometres on the slide (x right, y down, origin at the
slide's top-left corner) and ``pixels`` in level-0 slide pixels. spatialdata puts pixel (i, j)
of an image over [j, j + 1) x [i, i + 1) of its own grid, so an image whose pixel covers ``s``
level-0 pixels from ``origin_px`` gets Scale(s) + Translation(origin_px) to ``pixels`` and the
same times ``mpp`` to ``global``.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np

from histomap.data.slide import open_slide, read_region
from histomap.outputs import atomic_output

log = logging.getLogger(__name__)

GLOBAL = "global"   # micrometres
PIXELS = "pixels"   # level-0 slide pixels
SPOTS = "spots"
CHUNK_PX = 256
DENSE_FORMAT = "histomap.tasks.dense_map/1"


def _transforms(px0_per_px: float, origin_px: tuple[float, float], mpp: float) -> dict:
    """To ``pixels`` and ``global`` from an image grid whose pixel covers ``px0_per_px`` level-0
    pixels, its corner at level-0 ``origin_px`` (x, y)."""
    from spatialdata.transformations import Scale, Sequence, Translation

    def to(unit: float):
        scale = Scale([px0_per_px * unit] * 2, axes=("y", "x"))
        if origin_px == (0.0, 0.0):
            return scale
        return Sequence([scale, Translation([origin_px[1] * unit, origin_px[0] * unit],
                                            axes=("y", "x"))])

    return {PIXELS: to(1.0), GLOBAL: to(float(mpp))}


def _scale_factors(height: int, width: int, min_px: int = 64) -> list[int]:
    """2x steps until the longer side is <= ``min_px``; at least one (always multiscale) while
    the image has 2 or more pixels a side."""
    factors, h, w = [], height, width
    while min(h, w) >= 2 and (max(h, w) > min_px or not factors):
        factors.append(2)
        h, w = h // 2, w // 2
    return factors


def he_image(slide_path: str | Path, mpp: float, image_mpp: float):
    """The slide at ``image_mpp`` (never finer than level 0) as a multiscale Image2DModel."""
    from spatialdata.models import Image2DModel

    with open_slide(slide_path) as slide:
        w0, h0 = slide.dimensions
        ds = max(1.0, float(image_mpp) / float(mpp))
        out_w, out_h = max(1, int(w0 / ds)), max(1, int(h0 / ds))
        rgb = read_region(slide, 0, 0, w0, h0, out_w, out_h)
    if abs(w0 / out_w - h0 / out_h) > 1e-3 * (w0 / out_w):
        log.info("H&E image: x and y downsampling differ slightly (%g, %g); x is used",
                 w0 / out_w, h0 / out_h)
    return Image2DModel.parse(rgb.transpose(2, 0, 1), dims=("c", "y", "x"),
                              c_coords=["r", "g", "b"],
                              transformations=_transforms(w0 / out_w, (0.0, 0.0), mpp),
                              scale_factors=_scale_factors(out_h, out_w),
                              chunks=(3, CHUNK_PX, CHUNK_PX))


def spot_shapes(spots: ad.AnnData, mpp: float):
    """Spots in micrometres, indexed by spot name: circles (centre and radius), or square
    polygons when some spots are square bins (Visium HD)."""
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity, Scale

    from histomap.data.sample import square_mask

    centres_um = np.asarray(spots.obsm["spatial"], dtype=np.float64) * float(mpp)
    radius_um = spots.obs["diameter_um"].to_numpy(dtype=np.float64) / 2.0
    index = [str(n) for n in spots.obs_names]
    transformations = {GLOBAL: Identity(), PIXELS: Scale([1 / float(mpp)] * 2, axes=("x", "y"))}
    square = square_mask(spots)
    if square.any():
        import geopandas as gpd
        from shapely.geometry import Point, box

        polygons = [box(x - r, y - r, x + r, y + r) if sq else Point(x, y).buffer(r)
                    for (x, y), r, sq in zip(centres_um, radius_um, square)]
        return ShapesModel.parse(gpd.GeoDataFrame(geometry=polygons, index=index),
                                 transformations=transformations)
    return ShapesModel.parse(centres_um, geometry=0, radius=radius_um, index=index,
                             transformations=transformations)


def spot_table(spots: ad.AnnData, region: str = SPOTS):
    """``spots`` as a table annotating the shapes ``region`` (uns["spatial"] left out: the
    H&E is the image element)."""
    from spatialdata.models import TableModel

    table = ad.AnnData(X=spots.X, obs=spots.obs.copy(), var=spots.var.copy(),
                       layers=dict(spots.layers), obsm=dict(spots.obsm))
    table.uns.update({k: v for k, v in spots.uns.items() if k not in ("spatial",)})
    table.obs["region"] = region
    table.obs["region"] = table.obs["region"].astype("category")
    table.obs["spot_id"] = [str(n) for n in table.obs_names]
    return TableModel.parse(table, region=region, region_key="region", instance_key="spot_id")


def dense_map_image(dense_zarr: str | Path):
    """A dense map (OME-Zarr of :mod:`histomap.tasks.dense_map`) as a multiscale Image2DModel:
    channels named by gene, chunks of one gene, placed in ``global`` (um) and ``pixels``."""
    import dask.array as da
    import zarr
    from spatialdata.models import Image2DModel

    root = zarr.open_group(dense_zarr, mode="r")
    attrs = dict(root.attrs["histomap"])
    level0 = da.from_zarr(root["0"])
    px0_per_map = float(attrs["mpp"]) / float(attrs["slide_mpp"])
    origin = (float(attrs["origin_px"][0]), float(attrs["origin_px"][1]))
    _, h, w = level0.shape
    return Image2DModel.parse(level0, dims=("c", "y", "x"), c_coords=list(attrs["genes"]),
                              transformations=_transforms(px0_per_map, origin,
                                                          float(attrs["slide_mpp"])),
                              scale_factors=_scale_factors(h, w),
                              chunks=(1, min(CHUNK_PX, h), min(CHUNK_PX, w)))


def sample_spatialdata(spots: ad.AnnData, slide_path: str | Path, *, mpp: float,
                       image_mpp: float | None):
    """The ingest SpatialData: H&E (none when ``image_mpp`` is None), spot circles, counts."""
    import spatialdata as sd

    images = {"he": he_image(slide_path, mpp, image_mpp)} if image_mpp else {}
    if spots.n_obs == 0:  # an H&E-only slide (platform `he`): the image alone
        return sd.SpatialData(images=images)
    return sd.SpatialData(images=images, shapes={SPOTS: spot_shapes(spots, mpp)},
                          tables={"table": spot_table(spots)})


def add_predictions(sdata, *, dense_maps: Mapping[str, str | Path] = (),
                    tables: Mapping[str, ad.AnnData] = ()) -> None:
    """Add ``dense_{run}`` images and ``pred_{run}`` tables (annotating ``spots``; spots the
    prediction lacks are simply not annotated)."""
    for run, path in dict(dense_maps).items():
        sdata.images[f"dense_{run}"] = dense_map_image(path)
    tables = dict(tables)
    if tables and SPOTS not in sdata.shapes:
        raise ValueError(f"prediction tables {list(tables)} need the sample's spots; this "
                         "SpatialData has none (an H&E-only slide: use add_spot_tables)")
    known = set(sdata.shapes[SPOTS].index.astype(str)) if tables else set()
    for run, table in tables.items():
        extra = [n for n in table.obs_names if str(n) not in known]
        if extra:
            raise ValueError(f"prediction table {run!r} has spots the sample does not have "
                             f"(e.g. {extra[:3]})")
        sdata.tables[f"pred_{run}"] = spot_table(table)


def add_spot_tables(sdata, tables: Mapping[str, ad.AnnData]) -> None:
    """Add tables that bring their own spots or bins (an applied model's pseudo-spots and bins,
    on a lattice of their own): per ``name``, shapes ``name`` (:func:`spot_shapes`, in
    micrometres: circles, or squares where ``obs["shape"]`` is ``square``) and table
    ``{name}_table`` annotating them. The tables' ``uns["histomap"]["mpp"]`` places them."""
    for name, table in dict(tables).items():
        if name in sdata.shapes or f"{name}_table" in sdata.tables:
            raise ValueError(f"SpatialData already has an element {name!r}")
        mpp = float(table.uns["histomap"]["mpp"])
        sdata.shapes[name] = spot_shapes(table, mpp)
        sdata.tables[f"{name}_table"] = spot_table(table, region=name)


def applied_spatialdata(sample_zarr: str | Path, *, dense_maps: Mapping[str, str | Path] = (),
                        tables: Mapping[str, ad.AnnData] = ()):
    """The SpatialData of a slide that models were applied to (``apply``): the ingest
    ``sample.zarr`` (the H&E; an ST sample's spots and counts too), each applied dense map as
    image ``dense_{name}`` and each pseudo-spot or bin table with its own shapes
    (:func:`add_spot_tables`)."""
    sdata = read_spatialdata(sample_zarr)
    add_predictions(sdata, dense_maps=dense_maps)
    add_spot_tables(sdata, tables)
    return sdata


def write_spatialdata(sdata, path: str | Path) -> Path:
    """Write ``sdata`` with spatialdata's writer under a temporary name, then rename."""
    path = Path(path)
    previous = ad.settings.auto_shard_zarr_v3
    try:
        ad.settings.auto_shard_zarr_v3 = False  # explicit: no sharding (and no warning)
        with atomic_output(path) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*autosharding.*")
            sdata.write(tmp, overwrite=True)
    finally:
        ad.settings.auto_shard_zarr_v3 = previous
    log.info("wrote SpatialData %s: images %s, shapes %s, tables %s", path,
             list(sdata.images), list(sdata.shapes), list(sdata.tables))
    return path


def read_spatialdata(path: str | Path):
    """``spatialdata.read_zarr`` of a sample's SpatialData."""
    import spatialdata as sd

    return sd.read_zarr(path)
