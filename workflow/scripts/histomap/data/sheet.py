"""The sample sheet, checked before anything runs (arrow: raw sample -> ingest, at start-up).

* :func:`validate_sample_sheet`: every row against ``histomap/plan/schemas/samples.schema.yaml``;
  problems are reported by sample name and sheet, not as "row 0 of data frame".
* :func:`check_distinct_samples`: two samples whose count files or images are byte-identical
  (the same section under two names, so a fold would test on its own training section) are an
  error naming both. Files are compared by size first; only files of equal size are hashed,
  so the check costs next to nothing on real sheets.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from histomap.checked_io import sha256_file
from histomap.errors import InputError

# files holding a sample's measurements, per folder (and its outs/), by platform convention
COUNT_GLOBS = ("*.tsv.gz", "*.tsv", "*.h5ad", "filtered_feature_bc_matrix.h5",
               "transcripts*.parquet", "transcripts*.csv.gz", "transcripts*.csv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".svs", ".ndpi")
GENERATED_PLATFORMS = ("synthetic",)  # made by the pipeline from the seed and the sample name


def _describe(error, row: dict) -> str:
    column = error.path[0] if error.path else None
    value = row.get(column, "") if column else ""
    if error.validator == "required":
        return error.message.replace("is a required property", "column is missing")
    if error.validator == "enum":
        return f"{column} {value!r} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "pattern":
        what = error.schema.get("description", "")
        return f"{column} {value!r} is not valid" + (f" ({what})" if what else "")
    if error.validator == "minLength" and column:
        platform = row.get("platform", "")
        return f"{column} is empty but platform {platform!r} needs it"
    return f"{column + ': ' if column else ''}{error.message}"


def validate_sample_sheet(samples: pd.DataFrame, schema: str | Path, sheet: str | Path) -> None:
    """Check every row of ``samples`` (strings, as read from the TSV) against the JSON schema;
    one :class:`InputError` naming the sheet, each bad sample and its problems."""
    import jsonschema
    import yaml

    validator = jsonschema.Draft202012Validator(yaml.safe_load(Path(schema).read_text()))
    problems = []
    for i, row in enumerate(samples.to_dict("records")):
        row = {k: v for k, v in row.items() if isinstance(k, str)}
        name = row.get("sample") or f"(data row {i + 1}, no sample name)"
        errors = sorted(validator.iter_errors(row), key=lambda e: list(map(str, e.path)))
        # an if/then failure repeats the inner error: keep the innermost ones
        leaves = [e for e in errors if not e.context] + [c for e in errors for c in e.context]
        for text in dict.fromkeys(_describe(e, row) for e in leaves):
            problems.append(f"sample {name!r}: {text}")
    if problems:
        shown = problems[:10] + ([f"... {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise InputError(sheet, "; ".join(shown))
    duplicated = samples["sample"][samples["sample"].duplicated()]
    if len(duplicated):
        raise InputError(sheet, f"duplicate sample names {sorted(set(duplicated))}")


def _found(finder, *args) -> list[Path]:
    """The file a reader's finder picks, or none when it cannot (the reader reports that)."""
    try:
        return [Path(finder(*args))]
    except (InputError, OSError):
        return []


def sample_files(path: str | Path, image: str | Path | None = None, *, platform: str = "",
                 sample: str = "") -> dict[str, list[Path]]:
    """The count files and images a sheet row points to: {"counts": [...], "image": [...]}.

    Known platforms use their reader's own file finders (so sections sharing one folder keep
    their own files); other platforms take the count-like files (:data:`COUNT_GLOBS`) and images
    of the folder and its ``outs/``.
    """
    path = Path(path)
    images: list[Path] = [Path(image)] if image else []
    counts: list[Path] = []
    if path.is_file():
        counts.append(path)
    elif path.is_dir() and platform == "legacy_st":
        from histomap.data.io import legacy_st

        counts = _found(legacy_st.find_counts_file, path, sample)
        images = images or _found(legacy_st.find_image, path)
    elif path.is_dir() and platform == "visium":
        from histomap.data.io import visium

        counts = [outs / visium.MATRIX_FILE for outs in _found(visium.find_outs, path)]
    elif path.is_dir() and platform == "xenium":
        from histomap.data.io import xenium

        counts = _found(xenium.find_transcripts, path)
        images = images or _found(xenium.find_image, path)
    elif path.is_dir():
        for folder in (path, path / "outs"):
            if not folder.is_dir():
                continue
            for pattern in COUNT_GLOBS:
                counts += [p for p in folder.glob(pattern)
                           if p.is_file() and "_selection" not in p.name]
            if not image:
                images += [p for p in folder.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    counts = [p for p in counts if p.is_file()]
    return {"counts": sorted(set(counts)), "image": sorted(p for p in set(images) if p.is_file())}


def check_distinct_samples(rows: Iterable[tuple[str, str, str | Path, str | Path | None]],
                           sheet: str | Path) -> None:
    """Fail when two samples have a byte-identical count file or image.

    ``rows``: (sample, platform, path, image) with paths as the pipeline resolves them; rows of
    generated platforms (synthetic) and paths that do not exist (the reader reports those) are
    skipped.
    """
    by_size: dict[tuple[str, int], list[tuple[str, Path]]] = defaultdict(list)
    for sample, platform, path, image in rows:
        if platform in GENERATED_PLATFORMS:
            continue
        for kind, files in sample_files(path, image, platform=platform, sample=sample).items():
            for file in files:
                by_size[kind, file.stat().st_size].append((sample, file))
    for (kind, _), entries in by_size.items():
        if len({s for s, _ in entries}) < 2:
            continue
        hashes: dict[Path, str] = {}
        for (a, fa), (b, fb) in itertools.combinations(entries, 2):
            if a == b:
                continue
            same = fa.resolve() == fb.resolve()
            if not same:
                for f in (fa, fb):
                    if f not in hashes:
                        hashes[f] = sha256_file(f)
                same = hashes[fa] == hashes[fb]
            if same:
                what = "the same file" if fa.resolve() == fb.resolve() else "identical files"
                role = "counts" if kind == "counts" else "H&E image"
                raise InputError(sheet, (
                    f"samples {a!r} and {b!r} have {what} as {role} ({fa} and {fb}): the same "
                    "section listed twice? A fold would then be tested on its own training "
                    "data. Remove one row or fix its path"))
