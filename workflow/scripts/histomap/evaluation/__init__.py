"""Scoring and reporting: predictions -> metrics -> tables and figures.

``folds`` (benchmark folds and validation blocks), ``metrics`` (spot and super-resolution metrics),
``scales`` (truth re-measured at other spot sizes), ``report`` (long tables, markdown),
``figures``. Nothing here imports :mod:`histomap.tasks`.
"""
