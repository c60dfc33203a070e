"""Shared pytest fixtures: the repository root and the real data shipped beside the checkout."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SHARED_DATA = REPO.parent / "shared" / "data"
HER2ST = SHARED_DATA / "her2st"
XENIUM_CROP = SHARED_DATA / "xenium_breast_crop"


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    if not (HER2ST / "B4" / "B4.tsv.gz").is_file():
        pytest.skip(f"real HER2ST data not found at {HER2ST} (only present in the developers' "
                    "checkout and CI, not shipped with the project)")
    return HER2ST


@pytest.fixture(scope="session")
def xenium_crop_dir() -> Path:
    if not (XENIUM_CROP / "transcripts_small.csv").is_file():
        pytest.skip(f"real Xenium crop not found at {XENIUM_CROP} (developers' checkout and CI "
                    "only)")
    return XENIUM_CROP


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny test networks run fastest single-threaded on a shared 2-core machine."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
