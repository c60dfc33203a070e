"""Snakemake adapter: platform reader -> slide.tif, spots.h5ad, highres.h5ad, sample.zarr."""
from pathlib import Path

from histomap.data.ingest import ingest_sample
from histomap.logs import run_step

sm = snakemake  # noqa: F821 (injected by Snakemake)
p = sm.params
run_step(sm.log[0], ingest_sample, platform=p.platform, sample=sm.wildcards.sample,
         path=sm.input.source, image=sm.input.get("image") or p.get("image_keyword"),
         mpp=float(p.mpp) if p.mpp else None,
         spot_diameter_um=float(p.spot_diameter_um) if p.spot_diameter_um else None,
         out_dir=Path(sm.output.spots).parent, spatialdata_mpp=p.spatialdata_mpp, sheet=p.sheet,
         reader_options=p.reader_options, max_dropped_fraction=p.max_dropped_fraction,
         min_spots_on_tissue=p.min_spots_on_tissue, mask_mpp=p.mask_mpp)
