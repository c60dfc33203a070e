"""Nothing silently lost or mixed up at ingest: dropped-spot thresholds, spots that must lie on
tissue, selection files without a selected spot."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_readers import GRID, error_of, write_legacy, write_visium

from histomap.data.ingest import ingest_sample
from histomap.data.sample import UNS_KEY
from histomap.data.sheet import check_distinct_samples, validate_sample_sheet
from histomap.errors import InputError
from histomap.plan import SCHEMAS

NO_TISSUE_CHECK = {"min_spots_on_tissue": 0.0, "spatialdata_mpp": None}


# --------------------------------------------------------------------------- dropped spots

def test_legacy_half_the_count_rows_missing_fails(tmp_path):
    """Half the selected spots have no count row: old code ingested the rest with a warning."""
    folder = write_legacy(tmp_path / "S1", count_names=[f"{x}x{y}" for x, y in GRID[:6]],
                          counts=np.ones((6, 3), dtype=int))
    message = error_of(ingest_sample, platform="legacy_st", sample="S1", path=folder,
                       out_dir=tmp_path / "out", **NO_TISSUE_CHECK)
    assert "S1.tsv.gz" in message and "6 of 12" in message and "3x2" in message
    assert "max_dropped_fraction" in message
    assert not (tmp_path / "out" / "spots.h5ad").exists()


def test_few_dropped_spots_are_logged_and_recorded(tmp_path, caplog):
    names = [f"{x}x{y}" for x, y in GRID]
    folder = write_legacy(tmp_path / "S1", count_names=names[1:],
                          counts=np.ones((len(names) - 1, 3), dtype=int))
    # 1 of 12 (8 %) is above the default 5 % ...
    with pytest.raises(InputError, match="1 of 12"):
        ingest_sample(platform="legacy_st", sample="S1", path=folder, out_dir=tmp_path / "a",
                      **NO_TISSUE_CHECK)
    # ... and allowed with a threshold of 10 %: logged, and kept in spots.h5ad for the report
    ingest_sample(platform="legacy_st", sample="S1", path=folder, out_dir=tmp_path / "b",
                  max_dropped_fraction=0.1, **NO_TISSUE_CHECK)
    dropped = ad.read_h5ad(tmp_path / "b" / "spots.h5ad").uns[UNS_KEY]["dropped"]
    (what, entry), = dropped.items()
    assert int(entry["n"]) == 1 and int(entry["of"]) == 12 and "1x1" in list(entry["examples"])
    assert "dropped 1 of 12" in caplog.text
    from histomap.evaluation.report import ingest_markdown

    md = ingest_markdown([tmp_path / "b" / "spots.h5ad"])  # the benchmark report's section
    assert "| S1 | 11 | 1 of 12 selected spots" in md


def test_unselected_spots_are_not_counted_as_lost(tmp_path):
    """Count rows of spots the selection marks selected = 0 are left out on purpose."""
    selected = [1] * len(GRID)
    selected[:4] = [0] * 4
    folder = write_legacy(tmp_path / "S1", selected=selected)
    ingest_sample(platform="legacy_st", sample="S1", path=folder, out_dir=tmp_path / "o",
                  **NO_TISSUE_CHECK)
    spots = ad.read_h5ad(tmp_path / "o" / "spots.h5ad")
    assert spots.n_obs == 8 and not spots.uns[UNS_KEY]["dropped"]


def test_visium_half_the_barcodes_without_a_position_fails(tmp_path):
    outs, image = write_visium(tmp_path / "outs")
    positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv")
    positions = positions[~positions["barcode"].isin(["AAAC-1", "AAAG-1"])]
    positions.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    message = error_of(ingest_sample, platform="visium", sample="V1", path=outs, image=image,
                       out_dir=tmp_path / "o", **NO_TISSUE_CHECK)
    assert "tissue_positions.csv" in message and "2 of 5" in message and "AAAC-1" in message


def test_selection_with_no_selected_spot(tmp_path):
    folder = write_legacy(tmp_path / "S1", selected=[0] * len(GRID))
    message = error_of(ingest_sample, platform="legacy_st", sample="S1", path=folder,
                       out_dir=tmp_path / "o", **NO_TISSUE_CHECK)
    assert "S1_selection.tsv" in message and "selected = 0" in message
    assert "every one of its 12 spots" in message


# --------------------------------------------------------------------------- spots on tissue

def _section_with_tissue(folder, *, mirrored: bool):
    """Spots at x 20..260 px, y 30..190 px of an 800 x 300 px image (2.5 um/px); tissue covers
    the spots' side, or (mirrored) the other side."""
    write_legacy(folder, image=False, selected=None)
    rng = np.random.default_rng(0)
    image = np.full((300, 800, 3), 245, dtype=np.uint8)
    tissue = rng.normal((170, 90, 160), 12, size=(300, 320, 3)).clip(0, 255).astype(np.uint8)
    image[:, :320] = tissue
    if mirrored:
        image = image[:, ::-1]
    Image.fromarray(np.ascontiguousarray(image)).save(folder / "he.png")
    return folder


@pytest.mark.parametrize("mirrored", [False, True])
def test_spots_must_lie_on_tissue(tmp_path, mirrored):
    folder = _section_with_tissue(tmp_path / "S1", mirrored=mirrored)
    kwargs = dict(platform="legacy_st", sample="S1", path=folder, out_dir=tmp_path / "o",
                  spatialdata_mpp=None)
    if not mirrored:
        ingest_sample(**kwargs)
        return
    message = error_of(ingest_sample, **kwargs)
    assert "he.png" in message and "fall on background" in message and "mirrored" in message
    assert not (tmp_path / "o" / "slide.tif").exists()  # nothing partial left
    ingest_sample(**{**kwargs, "min_spots_on_tissue": 0.0})  # the check can be turned off


def test_transposed_image_fails(tmp_path):
    """The image saved transposed (x and y swapped, as a reader that confuses rows and columns
    writes it): the spots at x 420..660, y 30..190 px then fall on the glass."""
    folder = write_legacy(tmp_path / "S1", image=False, pixel_offset=(420.0, 30.0))
    rng = np.random.default_rng(0)
    image = np.full((800, 900, 3), 245, dtype=np.uint8)  # 900 x 800 px, tissue around the spots
    image[:300, 380:720] = rng.normal((170, 90, 160), 12, size=(300, 340, 3)).clip(0, 255)
    kwargs = dict(platform="legacy_st", sample="S1", path=folder, out_dir=tmp_path / "o",
                  spatialdata_mpp=None)
    Image.fromarray(image).save(folder / "he.png")
    ingest_sample(**kwargs)  # the right orientation ingests
    shutil.rmtree(tmp_path / "o")
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 0, 2))).save(folder / "he.png")
    message = error_of(ingest_sample, **kwargs)
    assert "he.png" in message and "fall on background" in message and "transposed" in message
    assert not (tmp_path / "o" / "slide.tif").exists()  # nothing partial left


def test_her2st_mirrored_image_fails(her2st_dir, tmp_path):
    folder = tmp_path / "C2"
    shutil.copytree(her2st_dir / "C2", folder)
    image = next(folder.glob("*.jpg"))
    Image.fromarray(np.asarray(Image.open(image))[::-1, ::-1].copy()).save(image)
    message = error_of(ingest_sample, platform="legacy_st", sample="C2", path=folder,
                       out_dir=tmp_path / "o", spatialdata_mpp=None)
    assert image.name in message and "on tissue" in message


# --------------------------------------------------------------------------- the sample sheet

REPO = Path(__file__).resolve().parents[1]
SCHEMA = SCHEMAS["samples"]  # the package's copy: an installed histomap validates alone


def _sheet(rows):
    columns = ["sample", "patient", "platform", "path", "image", "mpp"]
    return pd.DataFrame([dict(zip(columns, r)) for r in rows], columns=columns).fillna("")


def test_sheet_errors_name_the_sheet_and_the_sample():
    sheet = _sheet([("A", "P1", "legacy_st", "a", "", "0.5"),
                    ("B", "P2", "legacy_st", "b", "", "half"),
                    ("C", "P3", "visum", "c", "", ""),
                    ("D", "P4", "visium", "d", "", "")])
    message = error_of(validate_sample_sheet, sheet, SCHEMA, "my_sheet.tsv")
    assert message.startswith("my_sheet.tsv: ")
    assert "sample 'B': mpp 'half' is not valid" in message
    assert "sample 'C': platform 'visum' is not one of" in message
    assert "sample 'D': image" in message  # visium needs the full-resolution image
    assert "sample 'A'" not in message and "row 0" not in message
    validate_sample_sheet(sheet.iloc[:1], SCHEMA, "my_sheet.tsv")
    dup = _sheet([("A", "P1", "legacy_st", "a", "", ""), ("A", "P2", "legacy_st", "b", "", "")])
    assert "duplicate sample names ['A']" in error_of(validate_sample_sheet, dup, SCHEMA, "s.tsv")


def test_the_same_section_under_two_names(tmp_path):
    first = write_legacy(tmp_path / "S1")
    copy = tmp_path / "copy_of_S1"
    shutil.copytree(first, copy)
    other = write_legacy(tmp_path / "S3", counts=np.full((len(GRID), 3), 2), image=False)
    Image.new("RGB", (400, 300), (10, 20, 30)).save(other / "he.jpg")
    rows = [("S1", "legacy_st", first, None), ("S2", "legacy_st", copy, None),
            ("S3", "legacy_st", other, None)]
    message = error_of(check_distinct_samples, rows, "sheet.tsv")
    assert "sheet.tsv" in message and "'S1' and 'S2'" in message and "identical files" in message
    check_distinct_samples([rows[0], rows[2]], "sheet.tsv")
    # different counts, but the image column points both rows at one image
    image = tmp_path / "he.png"
    Image.new("RGB", (40, 30)).save(image)
    message = error_of(check_distinct_samples, [("S1", "legacy_st", first, image),
                                                ("S3", "legacy_st", other, image)], "sheet.tsv")
    assert "'S1' and 'S3'" in message and "H&E image" in message
    # sections sharing one folder keep their own files ({sample}.tsv.gz)
    shared = tmp_path / "shared"
    write_legacy(shared, sample="A", image=False)
    write_legacy(shared, sample="B", counts=np.full((len(GRID), 3), 3), image=False)
    check_distinct_samples([("A", "legacy_st", shared, image), ("B", "legacy_st", shared, None)],
                           "sheet.tsv")
    # a Visium outs/ copied under another name
    outs, fullres = write_visium(tmp_path / "v1" / "outs")
    shutil.copytree(tmp_path / "v1", tmp_path / "v2")
    message = error_of(check_distinct_samples,
                       [("V1", "visium", tmp_path / "v1", fullres),
                        ("V2", "visium", tmp_path / "v2", tmp_path / "v2" / "fullres.png")],
                       "sheet.tsv")
    assert "'V1' and 'V2'" in message and "filtered_feature_bc_matrix.h5" in message
    # generated samples and missing paths are not compared
    check_distinct_samples([("a", "synthetic", "", None), ("b", "synthetic", "", None),
                            ("c", "legacy_st", tmp_path / "nope", None)], "sheet.tsv")


@pytest.mark.slow
def test_snakemake_refuses_a_section_listed_twice(tmp_path):
    """At start-up (dry run): the sheet lists one HER2ST-style folder under two names."""
    data = tmp_path / "data"
    write_legacy(data / "S1")
    shutil.copytree(data / "S1", data / "S2")
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("sample\tpatient\tplatform\tpath\nS1\tA\tlegacy_st\tS1\n"
                     "S2\tB\tlegacy_st\tS2\n")
    shutil.copytree(REPO / "config", tmp_path / "config")
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
                          "--directory", str(tmp_path), "-n", "--config", f"samples={sheet}",
                          f"data_dir={data}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0
    assert "samples 'S1' and 'S2'" in res.stdout + res.stderr


# --------------------------------------------------------------------------- messages

def test_schema_limits_of_synthetic_agree_with_the_code():
    """The schema's smallest `synthetic.n_genes` and `size_um` are what SyntheticConfig accepts
    (the schema used to accept n_genes 5-38, which then failed with a traceback)."""
    import yaml

    from histomap.data.synthetic import SyntheticConfig

    schema = yaml.safe_load(SCHEMAS["config"].read_text())
    props = schema["properties"]["synthetic"]["properties"]
    least_genes = props["n_genes"]["minimum"]
    SyntheticConfig(n_genes=least_genes)
    with pytest.raises(InputError, match="config `synthetic`.*n_genes"):
        SyntheticConfig(n_genes=least_genes - 1)
    least_size = props["size_um"]["items"]["exclusiveMinimum"]
    SyntheticConfig(size_um=(least_size + 1, least_size + 1))
    with pytest.raises(InputError, match="size_um"):
        SyntheticConfig(size_um=(least_size, least_size + 1))


def test_errors_after_ingest_name_the_users_files(tmp_path):
    """Failures whose root cause is the user's data name the user's files, not
    results/ingest/S/slide.tif or spots.h5ad."""
    from histomap.data.preprocess import normalise_spots
    from histomap.data.tiling import tile_slide

    folder = write_legacy(tmp_path / "S1", counts=np.ones((len(GRID), 3), dtype=int),
                          image=False)
    Image.new("RGB", (400, 300), (246, 246, 246)).save(folder / "he.jpg")  # blank glass
    out = tmp_path / "results" / "ingest" / "S1"
    ingest_sample(platform="legacy_st", sample="S1", path=folder, out_dir=out,
                  **NO_TISSUE_CHECK)
    spots = ad.read_h5ad(out / "spots.h5ad")
    message = error_of(normalise_spots, spots, min_counts=100, path=out / "spots.h5ad")
    assert message.startswith(f"{folder} (ingested as {out / 'spots.h5ad'})")
    assert "QC removed all 12 spots" in message
    # the blank image has no tissue: tiling names he.jpg, found through spots.h5ad
    from histomap.data.sample import source_image

    assert source_image(out / "spots.h5ad") == str(folder / "he.jpg")
    message = error_of(tile_slide, out / "slide.tif", tmp_path / "t.zarr", tmp_path / "t.parquet",
                       source=source_image(out / "spots.h5ad"))
    assert message.startswith(str(folder / "he.jpg")) and "no tissue detected" in message
