"""How each model family trains and predicts, on the one loop of :mod:`histomap.train`.

model inputs -> **model** -> predictions. ``spot`` (ST-Net-style crop regressors) and
``histogene`` (HistoGene-style slide transformers): one value per spot; ``dense`` (PixNet and
iStar-style: training on ``dense_windows`` around spots, dense maps, spots read out of the map;
the map itself by ``dense_map``, on the grid of ``dense_grid``, stored by ``dense_zarr``;
``feature_cache`` serves frozen-encoder features instead of images), ``superres`` (Diff-ST and
the SR baselines), ``mean`` (the trivial baseline: the training spots' per-gene mean, constant
over space). ``predict`` holds the spot-prediction loop and the predictions AnnData that every
task writes.
"""
