"""The super-resolution maps zarr: what SR prediction writes and SR evaluation reads.

Arrow: SR model -> **HR maps** -> metrics. Written by :func:`histomap.tasks.superres.predict_sr`
(format ``histomap-srmaps/1``): per patch ``pred`` (G, h, w) normalised mean, ``pred_counts``,
for diffusion methods ``pred_std`` / ``pred_std_counts``, plus ``mask``, ``origin_px``,
``origin_um``, ``grid_index`` copied from the pairs; attrs = the pair geometry + how it was
predicted. It lives in ``data`` so that tasks (writers) and evaluation (readers) both import it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import zarr

from histomap.errors import InputError

MAPS_FORMAT = "histomap-srmaps/1"


def read_sr_maps(path: str | Path) -> tuple[dict[str, Any], dict]:
    """(lazy arrays, attrs) of a maps zarr written by :func:`predict_sr`."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "SR maps zarr does not exist (run the predict_diffst or predict_sr_baseline rule)")
    root = zarr.open_group(path, mode="r")
    attrs = dict(root.attrs)
    if attrs.get("format") != MAPS_FORMAT:
        raise InputError(path, f"not an SR maps zarr ({MAPS_FORMAT})")
    return {name: root[name] for name in root.array_keys()}, attrs
