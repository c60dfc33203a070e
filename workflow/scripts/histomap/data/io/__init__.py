"""One reader per platform, all returning :class:`histomap.data.sample.Sample`.

Every reader has the signature ``read(sample, path, *, mpp=None, spot_diameter_um=None,
image=None) -> Sample`` where ``path`` is the sample-sheet ``path`` column, ``mpp`` the
micrometres per pixel of the full-resolution H&E (``None``: infer it or fail), and ``image`` an
explicit image path (required for Visium and Visium HD; Visium also takes ``"hires"`` or
``"lowres"``, the explicit opt-in for the downsampled PNG of ``spatial/``).
"""
from __future__ import annotations

import inspect
import json
from importlib import import_module
from pathlib import Path

from histomap.data.sample import Sample
from histomap.errors import InputError

# platform -> module implementing ``read``; imported lazily so one reader's heavy imports do not
# slow the others.
READERS = {
    "legacy_st": "legacy_st",
    "visium": "visium",
    "synthetic": "synthetic",
    "xenium": "xenium",
    "visium_hd": "visium_hd",
    "hest": "hest",
    "he": "he",
}


def read_json_object(path: Path, what: str, *, missing: str | None = None) -> dict:
    """The JSON object in ``path`` (a platform's metadata or scale-factors file).

    ``what`` names the file in the errors, which name ``path``: missing (``missing``, default
    ``"<what> file not found"``), unreadable or not JSON (``"cannot read <what>: ..."``), or not
    an object.
    """
    if not path.is_file():
        raise InputError(path, missing or f"{what} file not found")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read {what}: {exc}") from exc
    if not isinstance(value, dict):
        raise InputError(path, f"{what} must be a JSON object")
    return value


def read_sample(platform: str, sample: str, path: str | Path, *, mpp: float | None = None,
                spot_diameter_um: float | None = None, image: str | Path | None = None,
                sheet: str | Path = "samples.tsv", **options) -> Sample:
    """Read one sample with the reader of its platform.

    ``options`` are platform-specific keyword arguments of the reader (e.g. Xenium ``min_qv``,
    ``origin_um``); ``None`` values are left out (the reader's default applies), and an option
    the platform's reader does not take is an error naming the sample sheet.
    """
    if platform not in READERS:
        raise InputError(sheet, f"sample {sample!r}: unknown platform {platform!r}; "
                                f"known platforms: {', '.join(sorted(READERS))}")
    module = import_module(f"{__name__}.{READERS[platform]}")
    options = {k: v for k, v in options.items() if v is not None}
    accepted = set(inspect.signature(module.read).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InputError(sheet, f"sample {sample!r}: platform {platform!r} takes no option(s) "
                                f"{', '.join(unknown)}")
    return module.read(sample, Path(path), mpp=mpp, spot_diameter_um=spot_diameter_um,
                       image=Path(image) if image else None, **options)
