"""histomap: H&E histology + spatial transcriptomics -> high-resolution gene-expression maps.

The package does all the work; the Snakemake rules in ``workflow/rules`` only wire files to it.
Coordinates are always level-0 slide pixels unless a name says ``_um``; every image carries its
mpp (micrometres per pixel).
"""
__version__ = "0.1.0"
