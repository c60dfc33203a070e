"""The sample sheet as the workflow plans with it (arrow: raw sample -> ingest).

:class:`SampleSheet` reads ``config["samples"]`` (one row per tissue section), checks it against
``samples.schema.yaml`` and for duplicate sections (:mod:`histomap.data.sheet`), and answers
what ``ingest_sample`` needs per sample: the source folder, the H&E, its mpp, the spot diameter
and the platform reader's options.

Paths are returned as the workflow writes them (relative to its working directory, under
``data_dir``); files are looked at relative to ``workdir``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from histomap.data.sheet import check_distinct_samples, validate_sample_sheet

SCHEMA = Path(__file__).parent / "schemas" / "samples.schema.yaml"
IMAGE_ONLY_PLATFORMS = ("he",)  # H&E alone: never in folds, panels or the benchmark
HIGHRES_PLATFORMS = ("synthetic", "xenium", "visium_hd")  # ground truth at other scales
# `image` keywords: the Visium hires/lowres PNG of spatial/, an explicit opt-in (not a file)
IMAGE_KEYWORDS = ("hires", "lowres")
DEFAULT_SPOT_DIAMETER_UM = {
    "legacy_st": 100.0,
    "visium": 55.0,
    "xenium": 55.0,  # spots a Xenium sample is binned into
    "visium_hd": 16.0,  # the bins trained on (or pseudo-spots: sheet spot_shape disc)
    "hest": 55.0,  # when the sample's metadata has no spot_diameter
}


def _elsewhere(workdir: str | Path | None) -> Path | None:
    """``workdir`` when it is not the current directory (None: paths stay as the config writes
    them, so messages name them the same way)."""
    if workdir is None or Path(workdir).resolve() == Path.cwd().resolve():
        return None
    return Path(workdir)


def read_sheet(path: str | Path) -> pd.DataFrame:
    """The TSV as strings, empty cells as "" (``#`` starts a comment)."""
    return pd.read_csv(path, sep="\t", dtype=str, comment="#").fillna("")


class SampleSheet:
    """One row per tissue section: ``table`` is indexed by sample name (column kept)."""

    def __init__(self, table: pd.DataFrame, path: str, *, data_dir: str = "",
                 synthetic_spot_diameter_um: float | None = None,
                 workdir: str | Path | None = None):
        self.table = table.set_index("sample", drop=False)
        self.path = path  # as the config writes it: every message names it so
        self.data_dir = data_dir
        self.workdir = _elsewhere(workdir)
        self.default_spot_diameter_um = dict(DEFAULT_SPOT_DIAMETER_UM)
        if synthetic_spot_diameter_um is not None:
            self.default_spot_diameter_um["synthetic"] = float(synthetic_spot_diameter_um)

    @classmethod
    def from_config(cls, config: dict, workdir: str | Path | None = None) -> SampleSheet:
        """Read and check ``config["samples"]``: errors name the sheet and the sample."""
        path, root = config["samples"], _elsewhere(workdir)
        table = read_sheet(root / path if root is not None else path)
        validate_sample_sheet(table, SCHEMA, path)
        return cls(table, path, data_dir=config.get("data_dir", ""),
                   synthetic_spot_diameter_um=config["synthetic"]["spot_diameter_um"],
                   workdir=workdir)

    # ------------------------------------------------------------------ rows
    @property
    def names(self) -> list[str]:
        return list(self.table["sample"])

    @property
    def st_samples(self) -> list[str]:
        """Samples with spots (every platform but the image-only ones), in sheet order."""
        return [s for s in self.names if self.platform(s) not in IMAGE_ONLY_PLATFORMS]

    @property
    def image_only_samples(self) -> list[str]:
        return [s for s in self.names if self.platform(s) in IMAGE_ONLY_PLATFORMS]

    def __contains__(self, sample: str) -> bool:
        return sample in self.table.index

    def platform(self, sample: str) -> str:
        return self.table.loc[sample, "platform"]

    def value(self, sample: str, column: str) -> str | None:
        """A cell of the sheet (None when the column is absent or the cell empty)."""
        value = self.table.loc[sample, column] if column in self.table.columns else ""
        return value if value != "" else None

    def synthetic_params(self, sample: str, synthetic: dict) -> dict:
        """simulate_sample's SyntheticConfig fields: the config's ``synthetic`` block, plus the
        sheet's ``patient`` when the block has ``patient_effects`` (without it the block alone,
        so existing runs' parameters are unchanged)."""
        params = dict(synthetic)
        if "patient_effects" in params:
            params["patient"] = str(self.table.loc[sample, "patient"])
        return params

    def on_disk(self, path: str | Path) -> Path:
        """Where a workflow path is on disk (relative paths start at ``workdir``)."""
        return Path(path) if self.workdir is None else self.workdir / path

    # ------------------------------------------------------------------ ingest_sample
    def source_path(self, sample: str) -> str:
        """Source folder: generated for `synthetic`, else the sheet path under data_dir."""
        if self.platform(sample) == "synthetic":
            return f"results/synthetic/{sample}"
        return str(Path(self.data_dir) / self.table.loc[sample, "path"])

    def image(self, sample: str) -> str | None:
        """The H&E file under data_dir (None: the reader finds it, or an image keyword)."""
        image = self.value(sample, "image")
        if image in IMAGE_KEYWORDS:
            return None
        return str(Path(self.data_dir) / image) if image else None

    def image_keyword(self, sample: str) -> str | None:
        """`hires`/`lowres` when the sheet opts in to a Visium downsampled PNG, else None."""
        image = self.value(sample, "image")
        return image if image in IMAGE_KEYWORDS else None

    def hest_id(self, sample: str) -> str:
        return self.value(sample, "hest_id") or sample

    def spot_diameter_um(self, sample: str) -> float | None:
        """The sheet's value, else the platform's default (None for image-only platforms)."""
        value = self.value(sample, "spot_diameter_um")
        if value:
            return float(value)
        if self.platform(sample) == "hest":  # the sample's own metadata (a small JSON)
            from histomap.data.io.hest import metadata_spot_diameter

            recorded = metadata_spot_diameter(self.on_disk(self.source_path(sample)),
                                              self.hest_id(sample))
            if recorded:
                return recorded
        return self.default_spot_diameter_um.get(self.platform(sample))

    def has_highres(self, sample: str) -> bool:
        """Whether a sample has ground truth at other scales (HEST: Xenium samples shipping
        their transcripts)."""
        if self.platform(sample) == "hest":
            from histomap.data.io.hest import has_transcripts

            return has_transcripts(self.on_disk(self.source_path(sample)), self.hest_id(sample))
        return self.platform(sample) in HIGHRES_PLATFORMS

    def reader_options(self, sample: str) -> dict:
        """Platform reader options from the sample sheet (Xenium: min_qv, origin_um "x,y",
        alignment; Visium HD: spot_shape, spot_pitch_um; HEST: hest_id)."""
        platform, value = self.platform(sample), self.value
        if platform == "visium_hd":
            options = {"spot_shape": value(sample, "spot_shape")}
            if value(sample, "spot_pitch_um"):
                options["spot_pitch_um"] = float(value(sample, "spot_pitch_um"))
            return options
        if platform == "hest":
            return {"hest_id": self.hest_id(sample)}
        if platform != "xenium":
            return {}
        options = {}
        if value(sample, "alignment"):
            options["alignment"] = str(Path(self.data_dir) / value(sample, "alignment"))
        if value(sample, "min_qv"):
            options["min_qv"] = float(value(sample, "min_qv"))
        if value(sample, "origin_um"):
            x, y = value(sample, "origin_um").replace(";", ",").split(",")
            options["origin_um"] = [float(x), float(y)]
        return options

    def ingest_inputs(self, sample: str) -> dict[str, str]:
        """ingest_sample's inputs: the source folder and, when the sheet names one, the H&E."""
        inputs = {"source": self.source_path(sample)}
        image = self.image(sample)
        if image:
            inputs["image"] = image
        return inputs

    # ------------------------------------------------------------------ checks
    def check_distinct(self) -> None:
        """The same section under two names (identical counts or image) would test a fold on
        itself: an error naming both samples."""
        rows = []
        for s in self.table.index:
            image = self.image(s)
            rows.append((s, self.platform(s), self.on_disk(self.source_path(s)),
                         self.on_disk(image) if image else None))
        check_distinct_samples(rows, self.path)
