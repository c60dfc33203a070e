"""Stain handling (histomap.data.stain, histomap.plan.stain): Macenko and Reinhard
normalisation to a reference fitted with torchstain, on images of known stains and on a real
HER2ST crop; the slide-level writer; HED jitter; the start-up checks; and the rule that a
fold's reference is fitted on that fold's training slides only."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import HER2ST
from histomap.data.stain import (IO, StainJitter, StainNormaliser, StainProfile, fit_profile,
                                 normalise_slide)
from histomap.errors import InputError
from histomap.plan import load_config, validate_config
from test_plan import REPO, plan_of

torch = pytest.importorskip("torch")

HE_A = np.array([[0.65, 0.25], [0.70, 0.90], [0.29, 0.35]])   # a source slide's stains
# (every channel of either stain above Macenko's beta = 0.15 at most concentrations: Macenko
# drops pixels with any channel below it, so a stain that barely absorbs red is never seen pure)
HE_B = np.array([[0.55, 0.20], [0.75, 0.80], [0.37, 0.56]])   # a reference's
MIN_I = 40  # the darkest intensity the images below reach (bounds the rounding error)
# uint8 rounding moves an intensity I by at most 0.5, its optical density by 0.5 / (I + 1):
OD_ROUNDING = 0.5 / (MIN_I + 1)


def unit(he: np.ndarray) -> np.ndarray:
    return he / np.linalg.norm(he, axis=0, keepdims=True)


def stained_pixels(he: np.ndarray, n: int = 40_000, seed: int = 0, strength=(1.2, 0.8)):
    """RGB uint8 (n, 1, 3) by Beer-Lambert from stain matrix ``he``: a tenth pure H, a tenth
    pure E, the rest mixtures; every intensity at least MIN_I."""
    rng = np.random.default_rng(seed)
    conc = rng.uniform(0.05, 1.0, (2, n)) * np.asarray(strength)[:, None]
    conc[1, : n // 10] = 0.0
    conc[0, n // 10: n // 5] = 0.0
    rgb = IO * np.exp(-unit(he) @ conc)
    assert rgb.min() >= MIN_I
    return np.rint(rgb.T).astype(np.uint8).reshape(n, 1, 3)


def test_macenko_normalised_pixels_have_the_reference_stains():
    ref = fit_profile("macenko", stained_pixels(HE_B, seed=1, strength=(1.0, 1.0)))
    src = fit_profile("macenko", stained_pixels(HE_A))
    np.testing.assert_allclose(ref.array("he"), unit(HE_B), atol=2 * OD_ROUNDING)
    np.testing.assert_allclose(src.array("he"), unit(HE_A), atol=2 * OD_ROUNDING)
    out = StainNormaliser(src, ref)(stained_pixels(HE_A))
    refit = fit_profile("macenko", out)
    np.testing.assert_allclose(refit.array("he"), ref.array("he"), atol=2 * OD_ROUNDING)
    # concentrations rescaled to the reference's 99th percentile (relative, rounding-bounded)
    np.testing.assert_allclose(refit.array("max_c"), ref.array("max_c"),
                               rtol=4 * OD_ROUNDING)
    assert np.abs(refit.array("he") - src.array("he")).max() > 10 * OD_ROUNDING


def test_reinhard_normalised_pixels_have_the_reference_lab_statistics():
    ref = fit_profile("reinhard", stained_pixels(HE_B, seed=1, strength=(1.0, 1.0)))
    src = fit_profile("reinhard", stained_pixels(HE_A))
    out = StainNormaliser(src, ref)(stained_pixels(HE_A))
    refit = fit_profile("reinhard", out)
    # LAB L is 100 / 255 per 8-bit step: rounding moves a mean or sd by under one step
    np.testing.assert_allclose(refit.array("means"), ref.array("means"), atol=100 / 255)
    np.testing.assert_allclose(refit.array("stds"), ref.array("stds"), atol=100 / 255)


def test_profiles_round_trip_and_a_bad_file_is_named(tmp_path):
    profile = fit_profile("macenko", stained_pixels(HE_A), ["a.tif"])
    path = tmp_path / "ref.json"
    profile.write(path)
    assert StainProfile.read(path) == profile
    path.write_text('{"format": "histomap.stain_profile/1", "method": "macenko", "stats": {}}')
    with pytest.raises(InputError, match=re.escape(str(path))):
        StainProfile.read(path)
    with pytest.raises(ValueError, match="method"):
        fit_profile("vahadane", stained_pixels(HE_A))
    with pytest.raises(ValueError, match="source profile is macenko"):
        StainNormaliser(profile, fit_profile("reinhard", stained_pixels(HE_B)))


def test_a_slide_is_written_normalised_with_its_size_and_mpp(tmp_path):
    from histomap.data.slide import open_slide, slide_mpp, write_pyramid

    def slide(he, seed, path):
        image = np.full((600, 700, 3), 245, np.uint8)           # glass
        # 10 x 10 px patches of one colour each (JPEG keeps the colour of smooth regions)
        tissue = stained_pixels(he, n=40 * 50, seed=seed).reshape(40, 50, 3)
        image[100:500, 100:600] = tissue.repeat(10, axis=0).repeat(10, axis=1)
        write_pyramid(image, path, 0.5)
        return path

    ref = fit_profile("macenko", stained_pixels(HE_B, seed=1))
    out = tmp_path / "out.tif"
    source = normalise_slide(slide(HE_A, 0, tmp_path / "a.tif"), ref, out, tmp_path / "s.json")
    assert StainProfile.read(tmp_path / "s.json") == source
    with open_slide(out) as written:
        assert written.dimensions == (700, 600)
        assert slide_mpp(written, out) == 0.5
        rgb = np.asarray(written.read_region((100, 100), 0, (500, 400)).convert("RGB"))
    # the slide is stored as JPEG (quality 90): its error adds to the rounding, so the bound
    # is the angle of the stain vectors to the source's, not the rounding alone
    refit = fit_profile("macenko", rgb.reshape(-1, 1, 3))
    gap_ref = np.abs(refit.array("he") - ref.array("he")).max()
    gap_src = np.abs(refit.array("he") - source.array("he")).max()
    assert gap_ref < gap_src / 3


@pytest.mark.skipif(not (HER2ST / "B4").is_dir(),
                    reason="needs ../shared/data/her2st (not shipped with histomap)")
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_her2st_crop_is_normalised_to_another_patients_reference(method):
    from PIL import Image

    from histomap.data.tiling import tissue_from_rgb

    def crop(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im.draft("RGB", (im.size[0] // 8, im.size[1] // 8))  # JPEG decoded at 1/8
            rgb = np.asarray(im.convert("RGB"))
        h, w = rgb.shape[:2]
        return rgb[h // 4: 3 * h // 4, w // 4: 3 * w // 4]

    b4 = crop(next((HER2ST / "B4").glob("*.jpg")))   # patient B
    c2 = crop(next((HER2ST / "C2").glob("*.jpg")))   # patient C: the reference
    b4_tissue = b4[tissue_from_rgb(b4, 4.0)]
    ref = fit_profile(method, c2[tissue_from_rgb(c2, 4.0)], ["C2"])
    src = fit_profile(method, b4_tissue, ["B4"])
    refit = fit_profile(method, StainNormaliser(src, ref)(b4_tissue))
    keys = ("he", "max_c") if method == "macenko" else ("means", "stds")
    for key in keys:
        before = np.abs(src.array(key) - ref.array(key)).max()
        after = np.abs(refit.array(key) - ref.array(key)).max()
        assert after < before / 3, (key, before, after)


# ------------------------------------------------------------------------- augmentation
def test_stain_jitter_changes_colours_within_range_and_zero_is_identity():
    image = torch.rand(2, 3, 16, 16) * 0.8 + 0.1
    torch.manual_seed(0)
    out = StainJitter(hed_sigma=0.1, brightness=0.1, contrast=0.1)(image)
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
    assert (out - image).abs().mean() > 1e-3
    torch.manual_seed(0)
    again = StainJitter(hed_sigma=0.1, brightness=0.1, contrast=0.1)(image)
    assert torch.equal(out, again)
    assert torch.equal(StainJitter(0.0, 0.0, 0.0)(image), image)
    assert StainJitter.from_config(None) is None and StainJitter.from_config(False) is None
    with pytest.raises(ValueError, match="hed_sigma"):
        StainJitter(hed_sigma=1.5)
    with pytest.raises(ValueError, match="unknown"):
        StainJitter.from_config({"saturation": 0.1})


def test_spot_dataset_applies_the_jitter_only_when_augmenting():
    from histomap.data.spot_patches import SpotDataset

    patches = np.full((4, 8, 8, 3), 150, np.uint8)
    jitter = StainJitter(hed_sigma=0.2)
    plain = SpotDataset(patches, augment=False, color=jitter)
    assert torch.equal(plain[0], SpotDataset(patches)[0])
    torch.manual_seed(0)
    augmented = SpotDataset(patches, augment=True, color=jitter)
    assert not torch.allclose(augmented[0], plain[0])


# ------------------------------------------------------------------------- the plan
VARIANTS = {"pixnet_macenko": {"base": "pixnet", "stain_normalise": "macenko"},
            "stnet_aug": {"base": "stnet", "stain_augment": True}}


def test_models_read_slides_normalised_to_their_folds_reference(tmp_path):
    plan = plan_of(tmp_path, models=["pixnet", "pixnet_macenko", "stnet_aug"],
                   variants=VARIANTS)
    stain = plan.files.stain
    for fold in plan.folds.names:
        train, test = plan.folds.samples(fold, "train"), plan.folds.samples(fold, "test")
        refs = stain.reference_slides(fold)
        assert refs == [f"results/ingest/{s}/slide.tif" for s in train]
        assert not any(f"/{s}/" in r for r in refs for s in test)
        inputs = plan.files.train_inputs("pixnet_macenko", fold)
        assert inputs["slides"] == [f"results/stain/macenko/{fold}/{s}/slide.tif" for s in train]
        assert all(f"/stain_macenko/{fold}/" in f for f in inputs["features"])
        assert plan.files.train_inputs("pixnet", fold)["slides"] == [
            f"results/ingest/{s}/slide.tif" for s in train]
        assert stain.slide("stnet_aug", fold, test[0]) == f"results/ingest/{test[0]}/slide.tif"


@pytest.mark.parametrize("variant, message", [
    ({"base": "pixnet", "stain_augment": True}, "feature_cache: true"),
    ({"base": "histogene", "stain_augment": True}, "does not augment"),
    ({"base": "stnet", "stain_augment": {"hed_sigma": 0.99, "contrast": 1.0}}, "contrast"),
])
def test_stain_keys_that_cannot_work_are_refused_at_start_up(tmp_path, variant, message):
    with pytest.raises(ValueError, match=message):
        plan_of(tmp_path, models=["mean", "bad"], variants={"bad": variant})


def test_a_stain_normalised_bundle_records_and_applies_its_reference(tmp_path):
    plan = plan_of(tmp_path, models=["pixnet", "pixnet_macenko"], variants=VARIANTS,
                   apply={"models": ["pixnet", "pixnet_macenko"], "samples": ["synA"]})
    inputs = plan.files.final_inputs("pixnet_macenko")
    assert inputs["stain_reference"] == "results/stain/macenko/final/reference.json"
    assert "stain_reference" not in plan.files.final_inputs("pixnet")
    assert plan.files.stain.reference_slides("final") == [
        f"results/ingest/{s}/slide.tif" for s in plan.folds.st_samples]
    assert plan.apply.slide("pixnet_macenko", "synA") == (
        "results/apply/pixnet_macenko/synA/slide_stain_normalised.tif")
    assert plan.apply.slide("pixnet", "synA") == "results/ingest/synA/slide.tif"


@pytest.mark.slow
def test_the_reference_rule_reads_no_test_slide(tmp_path):
    """Snakemake's own dry run of the demo with a stain-normalised variant: every
    stain_reference job's inputs are its fold's training slides, never a test slide."""
    layer = tmp_path / "stain.yaml"
    layer.write_text(yaml.safe_dump({"models": ["pixnet_macenko"], "variants": VARIANTS,
                                     "superres": {"enabled": False}}))
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile",
         str(REPO / "config" / "config.yaml"), str(layer), "--", "all"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    plan = validate_config(load_config([layer], defaults=REPO / "config" / "config.yaml"), REPO)
    jobs = re.findall(r"rule stain_reference:\n\s+input: ([^\n]+)\n\s+output: "
                      r"results/stain/macenko/(\w+)/reference.json", run.stdout)
    assert sorted(f for _, f in jobs) == sorted(plan.folds.names)
    for inputs, fold in jobs:
        read = {Path(p).parent.name for p in inputs.split(", ")}
        assert read == set(plan.folds.samples(fold, "train"))
        assert not read & set(plan.folds.samples(fold, "test"))
