"""One reader per platform, all returning :class:`histomap.sample.Sample`.

Every reader has the signature ``read(sample, path, *, mpp=None, spot_diameter_um=None,
image=None) -> Sample`` where ``path`` is the sample-sheet ``path`` column, ``mpp`` the
micrometres per pixel of the full-resolution H&E (``None``: infer it or fail), and ``image`` an
explicit image path (required for Visium: the full-resolution H&E is never replaced by the
hires PNG).
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path

from ..errors import InputError
from ..sample import Sample

# platform -> module implementing ``read``; imported lazily so one reader's heavy imports do not
# slow the others.
READERS = {
    "legacy_st": "legacy_st",
    "visium": "visium",
    "synthetic": "synthetic",
    "xenium": "xenium",
}


def read_sample(platform: str, sample: str, path: str | Path, *, mpp: float | None = None,
                spot_diameter_um: float | None = None, image: str | Path | None = None,
                sheet: str | Path = "samples.tsv") -> Sample:
    """Read one sample with the reader of its platform."""
    if platform not in READERS:
        raise InputError(sheet, f"sample {sample!r}: unknown platform {platform!r}; "
                                f"known platforms: {', '.join(sorted(READERS))}")
    module = import_module(f"{__name__}.{READERS[platform]}")
    return module.read(sample, Path(path), mpp=mpp, spot_diameter_um=spot_diameter_um,
                       image=Path(image) if image else None)
