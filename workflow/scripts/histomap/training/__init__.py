"""The training stage's parts around the one loop of :mod:`histomap.train`: the configuration
(:mod:`.config`), devices and mixed precision (:mod:`.device`), seeding and RNG states for exact
resume (:mod:`.rng`), what makes a checkpoint belong to one training (:mod:`.fingerprint`), the
checkpoint folder's files and lock (:mod:`.checkpoints`) and the trained ``model.pt``
(:mod:`.model_file`).
"""
