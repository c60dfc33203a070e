"""Circular-ROI aggregation: exact disc-pixel overlap against brute-force integration."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from histomap.models.roi import disc_pixel_areas, discs_from_spots, roi_aggregate


def quadrature_areas(cx: float, cy: float, r: float, h: int, w: int, n: int = 2000
                     ) -> np.ndarray:
    """(h, w) disc-pixel overlap areas by midpoint integration of the disc's column height.

    Independent of the closed form: for each x sample, the disc column is [cy - s, cy + s]
    with s = sqrt(r^2 - (x - cx)^2); its overlap with each pixel row is summed and scaled by
    dx. Error O(n^-1.5) from the square-root ends, far below the tolerances used.
    """
    x = (np.arange(w * n) + 0.5) / n                              # midpoints across the map
    s = np.sqrt(np.clip(r * r - (x - cx) ** 2, 0.0, None))
    y0 = np.arange(h)[:, None].astype(float)
    overlap = np.clip(np.minimum(y0 + 1, cy + s) - np.maximum(y0, cy - s), 0.0, None)
    return overlap.reshape(h, w, n).sum(axis=2) / n


def supersampled_areas(cx: float, cy: float, r: float, h: int, w: int, k: int = 64
                       ) -> np.ndarray:
    """(h, w) overlap areas by counting k x k sub-points per pixel inside the disc."""
    sub = (np.arange(k) + 0.5) / k
    xs = (np.arange(w)[:, None] + sub).ravel()
    ys = (np.arange(h)[:, None] + sub).ravel()
    inside = ((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) <= r * r
    return inside.reshape(h, k, w, k).sum(axis=(1, 3)) / (k * k)


def brute_force(dense_map: np.ndarray, cx: float, cy: float, r: float, mode: str,
                areas_fn=quadrature_areas) -> np.ndarray:
    """(C,) aggregate of a (C, H, W) map over one disc."""
    areas = areas_fn(cx, cy, r, *dense_map.shape[1:])
    total = (dense_map * areas).sum(axis=(1, 2))
    return total / areas.sum() if mode == "mean" else total


def _aggregate_one(dense_map: np.ndarray, discs: list[tuple[float, float, float]], mode: str
                   ) -> np.ndarray:
    g = torch.from_numpy(dense_map)[None]
    centres = torch.tensor([[[cx, cy] for cx, cy, _ in discs]], dtype=torch.float64)
    radii = torch.tensor([[r for *_, r in discs]], dtype=torch.float64)
    return roi_aggregate(g, centres, radii, mode=mode)[0].numpy()


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_random_discs_match_brute_force(mode):
    rng = np.random.default_rng(0)
    h, w = 16, 18
    dense_map = rng.random((3, h, w))
    radii = np.concatenate([rng.uniform(0.2, 1.0, 8), rng.uniform(1.0, 6.0, 8)])
    discs = [(rng.uniform(6.0, w - 6.0), rng.uniform(6.0, h - 6.0), r) for r in radii]
    got = _aggregate_one(dense_map, discs, mode)
    for (cx, cy, r), value in zip(discs, got):
        np.testing.assert_allclose(value, brute_force(dense_map, cx, cy, r, mode), rtol=1e-4,
                                   atol=1e-5, err_msg=f"disc {(cx, cy, r)}")


def test_areas_match_supersampling_and_disc_area():
    rng = np.random.default_rng(1)
    for r in (0.2, 0.7, 1.5, 3.3, 6.0):
        cx, cy = rng.uniform(7, 9, 2)
        areas, cols, rows = disc_pixel_areas(torch.tensor([[cx, cy]], dtype=torch.float64),
                                             torch.tensor([r], dtype=torch.float64),
                                             math.ceil(r))
        assert areas.sum().item() == pytest.approx(math.pi * r * r, rel=1e-12)
        full = np.zeros((16, 16))
        full[rows[0, 0]:rows[0, -1] + 1, cols[0, 0]:cols[0, -1] + 1] = areas[0].numpy()
        sampled = supersampled_areas(cx, cy, r, 16, 16)
        # 64x64 sampling: each boundary pixel is off by at most the sub-cells the arc crosses
        assert np.abs(full - sampled).max() < 0.02
        assert abs(full.sum() - sampled.sum()) < 0.01 * max(1.0, math.pi * r * r)


def test_subpixel_disc_inside_one_pixel():
    dense_map = np.arange(2 * 6 * 7, dtype=float).reshape(2, 6, 7)
    r = 0.3
    got_sum = _aggregate_one(dense_map, [(3.5, 4.5, r), (3.2, 4.7, 0.15)], "sum")
    got_mean = _aggregate_one(dense_map, [(3.5, 4.5, r)], "mean")
    np.testing.assert_allclose(got_sum[0], dense_map[:, 4, 3] * math.pi * r * r, rtol=1e-12)
    np.testing.assert_allclose(got_sum[1], dense_map[:, 4, 3] * math.pi * 0.15 ** 2, rtol=1e-12)
    np.testing.assert_allclose(got_mean[0], dense_map[:, 4, 3], rtol=1e-12)


@pytest.mark.parametrize("r", [0.4, 1.0, 2.5])
def test_disc_on_pixel_corner(r):
    dense_map = np.random.default_rng(2).random((1, 10, 10))
    got = _aggregate_one(dense_map, [(5.0, 5.0, r)], "sum")[0]
    np.testing.assert_allclose(got, brute_force(dense_map, 5.0, 5.0, r, "sum"), rtol=1e-4)
    if r <= 1.0:  # the four pixels meeting at the corner each hold a quarter disc
        quarter = math.pi * r * r / 4
        np.testing.assert_allclose(got, dense_map[0, 4:6, 4:6].sum() * quarter, rtol=1e-12)


def test_discs_near_border_use_area_inside_map():
    rng = np.random.default_rng(3)
    dense_map = rng.random((2, 9, 11))
    discs = [(0.3, 4.2, 3.0), (10.8, 8.9, 2.2), (-0.5, 3.0, 1.0), (5.0, 0.0, 4.5)]
    for mode in ("sum", "mean"):
        got = _aggregate_one(dense_map, discs, mode)
        for (cx, cy, r), value in zip(discs, got):
            np.testing.assert_allclose(value, brute_force(dense_map, cx, cy, r, mode),
                                       rtol=1e-4, atol=1e-6, err_msg=f"{mode} {(cx, cy, r)}")
    constant = np.full((1, 9, 11), 2.5)
    np.testing.assert_allclose(_aggregate_one(constant, discs, "mean"), 2.5, rtol=1e-12)


def test_disc_outside_map_is_zero_and_logged(caplog):
    dense_map = np.ones((2, 5, 5))
    with caplog.at_level(logging.WARNING, logger="histomap.models.roi"):
        got = _aggregate_one(dense_map, [(-3.0, 2.0, 1.0), (2.5, 2.5, 1.0)], "mean")
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_allclose(got[1], 1.0)
    assert "do not overlap" in caplog.text


def test_radius_can_change_between_calls():
    rng = np.random.default_rng(4)
    dense_map = rng.random((2, 20, 20))
    for r in (1.5, 4.5, 0.5, 6.0):
        got = _aggregate_one(dense_map, [(9.7, 10.2, r)], "sum")[0]
        np.testing.assert_allclose(got, brute_force(dense_map, 9.7, 10.2, r, "sum"), rtol=1e-4)


def test_batched_spots_valid_mask_and_scalar_radius():
    rng = np.random.default_rng(5)
    dense_map = rng.random((2, 3, 12, 12))
    centres = rng.uniform(2, 10, (2, 4, 2))
    valid = torch.tensor([[True, False, True, True], [False, True, True, False]])
    out = roi_aggregate(torch.from_numpy(dense_map).float(), torch.from_numpy(centres), 1.7,
                        mode="mean", valid=valid)
    assert out.shape == (2, 4, 3) and out.dtype == torch.float32
    for b in range(2):
        for n in range(4):
            if valid[b, n]:
                expected = brute_force(dense_map[b], *centres[b, n], 1.7, "mean")
                np.testing.assert_allclose(out[b, n].numpy(), expected, rtol=1e-4)
            else:
                assert torch.all(out[b, n] == 0)


def test_gradient_flows_to_dense_map():
    torch.manual_seed(0)
    dense_map = torch.rand(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    centres = torch.tensor([[[2.3, 2.1], [0.5, 4.4]], [[3.0, 3.0], [5.9, 0.2]]],
                           dtype=torch.float64)
    radii = torch.tensor([[1.3, 0.4], [2.2, 1.0]], dtype=torch.float64)
    for mode in ("sum", "mean"):
        assert torch.autograd.gradcheck(lambda g: roi_aggregate(g, centres, radii, mode=mode),
                                        (dense_map,))
    roi_aggregate(dense_map, centres, radii, mode="sum").sum().backward()
    # d(sum)/dG is the overlap area, so the gradient of channel 0 is the sum of the discs'
    # pixel-overlap maps
    expected = [sum(quadrature_areas(*centres[b, n].tolist(), radii[b, n].item(), 5, 6)
                    for n in range(2)) for b in range(2)]
    np.testing.assert_allclose(dense_map.grad[:, 0].numpy(), np.stack(expected), atol=1e-5)


def test_bad_arguments():
    g = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="mode"):
        roi_aggregate(g, torch.zeros(1, 1, 2), 1.0, mode="max")
    with pytest.raises(ValueError, match="centres"):
        roi_aggregate(g, torch.zeros(2, 1, 2), 1.0)
    with pytest.raises(ValueError, match="radii"):
        roi_aggregate(g, torch.ones(1, 1, 2), -1.0)


def test_discs_from_spots_units():
    centres = np.array([[1000.0, 2000.0], [1100.0, 1950.0]])
    got, radii = discs_from_spots(centres, 100.0, slide_mpp=0.5, map_origin_px=(900.0, 1900.0),
                                  map_mpp=2.0)
    np.testing.assert_allclose(got, [[25.0, 25.0], [50.0, 12.5]])
    np.testing.assert_allclose(radii, [25.0, 25.0])
    t_got, t_radii = discs_from_spots(torch.tensor(centres), torch.tensor([100.0, 55.0]),
                                      slide_mpp=0.5, map_origin_px=(900.0, 1900.0), map_mpp=2.0)
    assert isinstance(t_got, torch.Tensor)
    np.testing.assert_allclose(t_got.numpy(), got)
    np.testing.assert_allclose(t_radii.numpy(), [25.0, 13.75])


def test_grouping_by_radius_equals_one_window_for_all():
    """Spots of mixed sizes (sub-pixel to 30 px discs and square bins, near borders and off the
    map) each get the window of their own radius; values and gradients are those of the former
    single window sized by the largest radius, up to float64 summation order (embedding_bag sums
    a different number of zero-weight pixels): 1e-12, far below any real error (a window one
    pixel too small is off by >1e-3)."""
    from histomap.models import roi

    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(2, 5, 70, 90, generator=gen, dtype=torch.float64, requires_grad=True)
    n = 300
    centres = torch.rand(2, n, 2, generator=gen, dtype=torch.float64) * torch.tensor([100., 80.]) - 5
    radii = torch.cat([torch.rand(2, n // 3, generator=gen, dtype=torch.float64) * 0.8,
                       torch.rand(2, n // 3, generator=gen, dtype=torch.float64) * 4,
                       torch.rand(2, n - 2 * (n // 3), generator=gen, dtype=torch.float64) * 30],
                      dim=1)
    square = torch.rand(2, n, generator=gen) < 0.3
    valid = torch.rand(2, n, generator=gen) < 0.9
    for mode in ("mean", "sum"):
        grouped = roi_aggregate(dense, centres, radii, mode=mode, valid=valid, square=square)
        b_idx, s_idx = torch.nonzero(valid, as_tuple=True)
        half_width = int(math.ceil(float(radii[valid].max())))
        single = roi._window_sums(dense, b_idx, centres[b_idx, s_idx], radii[b_idx, s_idx],
                                  square[b_idx, s_idx], half_width, mode, torch.float64)
        expected = torch.zeros_like(grouped).index_put((b_idx, s_idx), single)
        torch.testing.assert_close(grouped, expected, rtol=1e-12, atol=1e-12)
        g1, = torch.autograd.grad(grouped.sum(), dense)
        g2, = torch.autograd.grad(expected.sum(), dense)
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_disc_just_off_the_map_beside_a_large_disc_is_zero():
    """A small disc lying just left of the map, computed in one call with a 30 px disc, has no
    overlap: mean 0 (round-off of far-away pixels once gave it a neighbouring pixel's value)."""
    dense = torch.rand(1, 3, 70, 90, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64) + 1.0
    centres = torch.tensor([[[-0.527, 14.5], [-3.37, 30.4], [45.0, 35.0]]], dtype=torch.float64)
    radii = torch.tensor([[0.5001, 0.53, 30.0]], dtype=torch.float64)
    out = roi_aggregate(dense, centres, radii, mode="mean")
    assert torch.equal(out[0, :2], torch.zeros(2, 3, dtype=torch.float64))
    assert bool((out[0, 2] > 1.0).all())


def test_no_valid_spot_keeps_the_graph():
    """A batch whose windows hold no measured spot gives zeros that backward() accepts (zero
    gradient), so training skips nothing and does not crash."""
    dense = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = roi_aggregate(dense, torch.zeros(2, 4, 2), torch.ones(2, 4),
                        valid=torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(out.detach(), torch.zeros(2, 4, 3))
    out.sum().backward()
    assert torch.equal(dense.grad, torch.zeros_like(dense))


def test_discs_sharing_their_place_in_a_pixel_share_one_window_computation():
    """A lattice's discs (equal radius, equal offset from the pixel grid) are computed once per
    distinct (place, radius): the windows equal those of each disc computed on its own."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:4, 0:6]
    xs = (cols.ravel() + 0.5 * (rows.ravel() % 2)) * 12.5 + 3.3
    lattice = np.column_stack([xs, rows.ravel() * 10.825 + 1.7])
    centres = torch.from_numpy(np.concatenate([lattice, rng.uniform(0, 60, (5, 2))]))
    radii = torch.cat([torch.full((len(lattice),), 6.25), torch.full((5,), 2.4)]).double()
    areas, cols_, rows_ = disc_pixel_areas(centres, radii, 7)
    # the same float64 formula per window; a vectorised and a scalar transcendental may round
    # the same input an ulp apart, and a window's area is a difference of four corner areas of
    # at most pi r^2 each
    atol = 16 * torch.finfo(torch.float64).eps * math.pi * float(radii.max()) ** 2
    for i in range(len(centres)):
        one = disc_pixel_areas(centres[i:i + 1], radii[i:i + 1], 7)
        torch.testing.assert_close(areas[i], one[0][0], rtol=0, atol=atol)
        assert torch.equal(cols_[i], one[1][0]) and torch.equal(rows_[i], one[2][0])
    torch.testing.assert_close(areas.sum(dim=(1, 2)), np.pi * radii ** 2, rtol=1e-9, atol=0)
