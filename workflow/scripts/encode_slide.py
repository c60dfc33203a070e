"""Snakemake adapter: the frozen encoder's feature cache of one sample (encode_slide)."""
from histomap.logs import run_step
from histomap.threads import set_threads
from histomap.tasks.feature_cache import encode_slide


def main(sm):
    set_threads(sm.params.torch_threads)
    f = dict(sm.params.features)
    checkpoint = (f.get("checkpoints") or {}).get(sm.wildcards.encoder)
    encode_slide(sm.input.slide, sm.input.st, sm.output[0], encoder=sm.wildcards.encoder,
                 mpp=float(sm.wildcards.mpp), tiles_parquet=sm.input.tiles,
                 checkpoint=checkpoint, crop_um=f.get("crop_um"),
                 tile_px=int(f.get("tile_px", 512)), margin_px=int(f.get("margin_px", 64)),
                 context_um=float(f.get("context_um", 300.0)))


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
