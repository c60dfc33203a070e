"""Snakemake adapter: tissue tiles of a slide at the model mpp (parquet index; zarr of the tile
images only with ``tiling.write_tiles``)."""
from pathlib import Path

from histomap.data.sample import source_image
from histomap.data.tiling import tile_slide
from histomap.logs import run_step

sm = snakemake  # noqa: F821 (injected by Snakemake)
t = sm.params.tiling
# errors name the user's image, recorded by ingest in spots.h5ad beside slide.tif
source = source_image(Path(sm.input.slide).with_name("spots.h5ad"))
run_step(sm.log[0], tile_slide, sm.input.slide, sm.output.get("zarr"), sm.output.index,
         tile_px=t["tile_px"], tile_mpp=t["tile_mpp"], overlap_px=t["overlap_px"],
         min_tissue=t["min_tissue"], mask_mpp=t["mask_mpp"], source=source,
         compression=t.get("tile_compression", "zstd"))
