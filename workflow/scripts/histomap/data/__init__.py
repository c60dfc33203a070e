"""Everything from raw files to model inputs (the picture's first arrows).

raw sample -> ``io`` (one reader per platform) -> :class:`~histomap.data.sample.Sample` ->
``ingest`` (slide TIFF, spots, SpatialData) -> ``tiling`` (tissue tiles) and ``preprocess``
(normalised spots, gene panels) -> model inputs: ``spot_patches`` (crops around spots),
``srpairs`` (LR/HR/H&E super-resolution pairs). ``synthetic`` generates samples with known
ground truth (from ``synthetic_config``, ``synthetic_layout``, ``synthetic_expression``,
``synthetic_render``); ``aggregate`` sums point-like measurements into discs or bins of any size
(ground truth at any scale); ``slide`` opens and writes slides; ``srmaps`` is the SR prediction format that
tasks write and evaluation reads.
"""
