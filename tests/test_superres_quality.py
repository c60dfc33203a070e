"""SR maps whose counts add up to the LR map, the patch-border band, the scored
uncertainty and the model's own target sum (mass projection, edge-error ratio, calibration)."""
import numpy as np
import pytest
import torch

from histomap.data.srpairs.mass import block_sums, project_mass, prediction_normaliser
from histomap.data.srpairs.normalisation import prediction_denormaliser
from histomap.evaluation.srmetrics import border_errors, calibration_table, spearman
from histomap.models.diffst import DiffST


def test_mass_projection_by_hand():
    # one gene, scale 2, two LR pixels: block 1 predicted 4 counts for 8 measured (x2); block 2
    # predicted nothing for 2 measured (spread evenly)
    hr = np.array([[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]])
    lr = np.array([[[8.0, 2.0]]])
    out = project_mass(hr, lr, 2)
    np.testing.assert_array_equal(out, [[[2.0, 2.0, 0.5, 0.5], [2.0, 2.0, 0.5, 0.5]]])
    np.testing.assert_array_equal(block_sums(out, 2, (1, 2)), lr)
    # the pattern inside a block is kept, negatives are set to 0 first
    out = project_mass(np.array([[[3.0, 1.0], [-1.0, 0.0]]]), np.array([[[8.0]]]), 2)
    np.testing.assert_array_equal(out, [[[6.0, 2.0], [0.0, 0.0]]])
    # edge="ceil": a block cut by the patch edge holds the in-patch share of its LR counts
    cut = project_mass(np.ones((1, 3, 3)), np.full((1, 2, 2), 4.0), 2)
    np.testing.assert_allclose(block_sums(cut, 2, (2, 2))[0], [[4.0, 2.0], [2.0, 1.0]])


def test_projected_counts_return_to_log_units():
    attrs = {"normalisation": "log1p", "scale": 2, "hr_target_sum": 99.0}
    arrays = {"lr_library": np.array([[[40.0, 0.0]]])[0][None]}
    values = np.log1p(np.array([[[0.5, 1.0, 2.0, 0.0], [0.0, 3.0, 1.0, 1.0]]]))
    to_counts = prediction_denormaliser(arrays, attrs, 10.0)
    back = prediction_normaliser(arrays, attrs, 10.0)(to_counts(values, 0), 0)
    np.testing.assert_allclose(back[:, :, :2], values[:, :, :2], rtol=1e-12)
    assert (back[:, :, 2:] == 0).all()  # no LR library: no counts, 0


def test_log1p_prediction_without_the_models_target_sum_is_an_error():
    attrs = {"normalisation": "log1p", "scale": 2, "hr_target_sum": 99.0}
    with pytest.raises(ValueError, match="target_sum"):
        prediction_denormaliser({}, attrs, None)


def test_edge_errors_and_calibration_by_hand():
    truth = np.zeros((1, 6, 6))
    pred = np.ones((1, 6, 6))
    pred[:, 2:4, 2:4] = 0.5  # inner 2 x 2 block
    err = border_errors(truth, pred, np.ones((6, 6), bool))
    assert err["n_edge"][0] == 32 and err["n_inner"][0] == 4
    assert err["sse_edge"][0] == 32.0 and err["sse_inner"][0] == 1.0
    table = calibration_table(np.arange(20.0), np.arange(20.0) * 2, n_bins=10)
    assert list(table["n"]) == [2] * 10
    np.testing.assert_allclose(table["mean_abs_error"], np.arange(10) * 4 + 1)  # errors 4k, 4k + 2
    assert spearman(np.arange(5.0), np.array([1.0, 3, 2, 5, 9])) == pytest.approx(0.9)
    assert np.isnan(spearman(np.ones(4), np.arange(4.0)))


def test_diffst_histology_has_no_patch_border_band():
    """A uniform H&E patch must give a uniform tissue feature map: with zero padding the
    encoder sees a dark frame and its features differ at the patch border (the band of
    issue 27); the default padding_mode replicate mirrors the H&E outward instead."""
    torch.manual_seed(0)
    image = torch.full((1, 3, 64, 64), 0.8)
    spread = {}
    for mode in ("zeros", "replicate"):
        model = DiffST(3, base_channels=8, tissue_channels=8, cell_channels=8, attn_channels=8,
                       fusion_channels=4, gene_node_channels=2, hierarchical=False,
                       padding_mode=mode).eval()
        with torch.no_grad():
            feats, _ = model.histology_features(image, (32, 32))
        spread[mode] = float((feats - feats[..., 8:24, 8:24].mean(dim=(-2, -1), keepdim=True))
                             .abs().max())
    tol = 1e-5  # float32 convolutions of a constant image: equal to rounding
    assert spread["zeros"] > 100 * tol and spread["replicate"] < tol
