"""Nothing silently lost or mixed up at ingest: dropped-spot thresholds, spots that must lie on
tissue, selection files without a selected spot."""
from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_readers import GRID, error_of, write_legacy, write_visium

from histomap.data.ingest import ingest_sample
from histomap.data.sample import UNS_KEY
from histomap.errors import InputError

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


def test_her2st_mirrored_image_fails(her2st_dir, tmp_path):
    folder = tmp_path / "C2"
    shutil.copytree(her2st_dir / "C2", folder)
    image = next(folder.glob("*.jpg"))
    Image.fromarray(np.asarray(Image.open(image))[::-1, ::-1].copy()).save(image)
    message = error_of(ingest_sample, platform="legacy_st", sample="C2", path=folder,
                       out_dir=tmp_path / "o", spatialdata_mpp=None)
    assert image.name in message and "on tissue" in message
