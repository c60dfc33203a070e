"""Ingest of a real HER2ST section: pyramid with mpp, spots in level-0 pixels, SpatialData."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from histomap.data.ingest import ingest_sample
from histomap.data.slide import open_slide, slide_mpp
from histomap.errors import InputError


@pytest.fixture(scope="module")
def ingested(her2st_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest") / "C2"
    ingest_sample(platform="legacy_st", sample="C2", path=her2st_dir / "C2", out_dir=out,
                  spot_diameter_um=100.0, spatialdata_mpp=16.0)
    return out


def test_slide_and_spots_agree(ingested):
    spots = ad.read_h5ad(ingested / "spots.h5ad")
    with open_slide(ingested / "slide.tif") as slide:
        mpp = slide_mpp(slide)
        w, h = slide.dimensions
        assert slide.level_count > 3
    assert spots.uns["histomap"]["mpp"] == pytest.approx(mpp)
    assert 0.66 < mpp < 0.72
    xy = spots.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    assert spots.obs_names[0].count("x") == 1
    assert (spots.obs["diameter_um"] == 100).all()
    assert ad.read_h5ad(ingested / "highres.h5ad").n_obs == 0  # legacy ST has no high-res data


def test_spatialdata_zarr(ingested):
    import spatialdata as sd
    sdata = sd.read_zarr(ingested / "sample.zarr")
    spots = ad.read_h5ad(ingested / "spots.h5ad")
    circles = sdata.shapes["spots"]
    assert len(circles) == spots.n_obs
    mpp = spots.uns["histomap"]["mpp"]  # shapes are in micrometres (the `global` system)
    np.testing.assert_allclose(circles.geometry.x.to_numpy(), spots.obsm["spatial"][:, 0] * mpp)
    np.testing.assert_allclose(circles["radius"].to_numpy(), 50.0)
    assert set(sdata.coordinate_systems) == {"global", "pixels"}
    assert "C2" in spots.uns["spatial"]  # scanpy's H&E and scale factors
    table = sdata.tables["table"]
    assert table.n_obs == spots.n_obs and table.n_vars == spots.n_vars
    assert "he" in sdata.images


def test_unknown_platform_names_the_sheet(tmp_path):
    with pytest.raises(InputError, match=r"sheet\.tsv.*unknown platform 'geomx'"):
        ingest_sample(platform="geomx", sample="S", path=tmp_path, out_dir=tmp_path / "o",
                      sheet="sheet.tsv")
