"""PixNet task: training windows (geometry, augmentation), batch loss, train, resume, predict."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from histomap.data.io.synthetic import read as read_synthetic
from histomap.data.preprocess import normalise_spots
from histomap.data.slide import write_pyramid
from histomap.data.spot_patches import dihedral
from histomap.data.synthetic import simulate_sample
from histomap.data.tiling import tile_slide
from histomap.models.pixnet import PixNet
from histomap.tasks.dense import predict_pixnet, train_pixnet
from histomap.tasks.dense_map import read_dense, spots_from_dense
from histomap.tasks.dense_windows import (
    SlideSpots,
    WindowDataset,
    dihedral_points,
    make_loss_fn,
    pixnet_batch_loss,
)
from histomap.train import load_model

SLIDE_MPP = 0.5
INPUT_MPP = 1.0
WINDOW = 64
STRIDE = 4
DOT_PX = 8  # level-0 radius of the red dot drawn at every spot centre
TINY = {"encoder": "test_resnet", "decoder_channels": [16, 16, 24, 32, 32], "out_stride": 4}


# --------------------------------------------------------------------------- window geometry
@pytest.fixture(scope="module")
def dotted(tmp_path_factory):
    """White slide with a red dot at each of 20 irregularly placed spots of two sizes."""
    rng = np.random.default_rng(0)
    centres: list[np.ndarray] = []
    while len(centres) < 20:
        c = rng.uniform(60, 540, 2)
        if all(np.hypot(*(c - o)) > 70 for o in centres):
            centres.append(c)
    centres = np.array(centres)
    image = np.full((600, 600, 3), 255, np.uint8)
    yy, xx = np.mgrid[:600, :600]
    for cx, cy in centres:  # pixel (i, j) is centred at (j + 0.5, i + 0.5) in these units
        image[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= DOT_PX ** 2] = (255, 0, 0)
    path = tmp_path_factory.mktemp("dots") / "slide.tif"
    write_pyramid(image, path, SLIDE_MPP)
    diam = np.where(np.arange(20) % 2 == 0, 20.0, 12.0)
    targets = np.column_stack([np.arange(20), centres, diam]).astype(np.float32)
    return SlideSpots(path, centres, diam, targets, "dots")


def _red_blobs(image: torch.Tensor) -> np.ndarray:
    """Centroids (x, y) in window pixels (continuous) of the red blobs of a (3, w, w) image."""
    rgb = image.numpy().astype(int)
    red = (rgb[0] > 170) & (rgb[1] < 100) & (rgb[2] < 100)
    labels, n = ndimage.label(red)
    if n == 0:
        return np.zeros((0, 2))
    cy_cx = np.array(ndimage.center_of_mass(red, labels, range(1, n + 1)))
    return cy_cx[:, ::-1] + 0.5


def test_dihedral_points_follow_the_image_transform():
    side = 7
    for i, j in [(0, 0), (1, 5), (6, 2)]:
        image = torch.zeros(1, side, side)
        image[0, i, j] = 1
        for k in range(8):
            ti, tj = np.argwhere(dihedral(image, k)[0].numpy())[0]
            np.testing.assert_allclose(dihedral_points(np.array([[j + 0.5, i + 0.5]]), k, side),
                                       [[tj + 0.5, ti + 0.5]])


def test_window_discs_land_on_their_spots_under_every_transform(dotted):
    ds = WindowDataset([dotted], window_px=WINDOW, input_mpp=INPUT_MPP, out_stride=STRIDE,
                       augment=True)
    assert len(ds) == 20 and ds.max_spots >= 2
    side, s0 = WINDOW / STRIDE, INPUT_MPP / SLIDE_MPP
    rng = np.random.default_rng(1)
    for i in range(len(ds)):
        offset = tuple(int(v) for v in rng.integers(-ds.anchors[i, 2], ds.anchors[i, 2] + 1, 2))
        base = ds.window(i, k=0, offset=offset)
        valid = base["valid"].numpy()
        ids = base["targets"][valid, 0].numpy().astype(int)
        assert dotted.targets[ds.anchors[i, 1], 0] in ids  # the anchor is always inside
        # the disc centre in the window is the spot's level-0 centre
        x0, y0 = ds.window_origin(i, offset)
        level0 = (np.array([x0, y0]) + base["centres"][valid].numpy() * STRIDE) * s0
        np.testing.assert_allclose(level0, dotted.centres_px[ids], atol=1e-3)
        np.testing.assert_allclose(base["radii"][valid].numpy(),
                                   dotted.diameter_um[ids] / 2 / (INPUT_MPP * STRIDE))
        for k in range(8):
            item = ds.window(i, k=k, offset=offset)
            assert item["image"].shape == (3, WINDOW, WINDOW)
            assert item["centres"].shape == (ds.max_spots, 2)
            centres = item["centres"][valid].numpy()
            np.testing.assert_allclose(centres, dihedral_points(
                base["centres"][valid].numpy(), k, side), atol=1e-5)
            assert np.all(centres - item["radii"][valid, None].numpy() >= -1e-5)
            assert np.all(centres + item["radii"][valid, None].numpy() <= side + 1e-5)
            # every disc centre sits on a red dot, and every dot far enough inside is a disc
            blobs = _red_blobs(item["image"])
            px = centres * STRIDE
            dist = np.hypot(*(px[:, None] - blobs[None]).transpose(2, 0, 1))
            assert np.all(dist.min(axis=1) < 1.0), (i, k)
            inner = np.all((blobs > 11) & (blobs < WINDOW - 11), axis=1)
            assert np.all(dist[:, inner].min(axis=0) < 1.0), (i, k)


def test_random_items_are_consistent_and_padded(dotted):
    ds = WindowDataset([dotted], window_px=WINDOW, input_mpp=INPUT_MPP, out_stride=STRIDE,
                       augment=True, max_spots=6)
    torch.manual_seed(0)
    counts = []
    for i in range(len(ds)):
        item = ds[i]
        v = item["valid"]
        counts.append(int(v.sum()))
        assert not item["targets"][~v].any() and not item["radii"][~v].any()
        c, r = item["centres"][v], item["radii"][v]
        assert torch.all(c - r[:, None] >= -1e-5) and torch.all(c + r[:, None] <= 16 + 1e-5)
    assert min(counts) >= 1 and max(counts) <= 6
    still = WindowDataset([dotted], window_px=WINDOW, input_mpp=INPUT_MPP, out_stride=STRIDE)
    a, b = still[3], still[3]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["centres"], b["centres"])
    # jitter: as far as the anchor stays inside (32 - 10 - 1 px for 20 um spots), or capped
    assert ds.anchors[0, 2] == 21 and ds.anchors[1, 2] == 25
    capped = WindowDataset([dotted], window_px=WINDOW, input_mpp=INPUT_MPP, out_stride=STRIDE,
                           augment=True, jitter_um=3.0)
    assert capped.anchors[:, 2].max() == 3
    # one anchor per 150 um cell (the slide is 300 um wide): at most 4 windows
    sparse = WindowDataset([dotted], window_px=WINDOW, input_mpp=INPUT_MPP, out_stride=STRIDE,
                           anchor_stride_um=150.0)
    assert 1 <= len(sparse) <= 4 and sparse.max_spots >= 1


def test_batch_loss_uses_disc_means(dotted):
    ds = WindowDataset([dotted], window_px=WINDOW, input_mpp=INPUT_MPP, out_stride=STRIDE)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    torch.manual_seed(0)
    model = PixNet(4, **TINY)
    loss = pixnet_batch_loss(model, batch, torch.device("cpu"), make_loss_fn("mse"))
    _, pred = model.forward_spots(batch["image"].float() / 255, batch["centres"],
                                  batch["radii"], mode="mean", valid=batch["valid"])
    v = batch["valid"]
    torch.testing.assert_close(loss, F.mse_loss(pred[v], batch["targets"][v]))
    joint = pixnet_batch_loss(model, batch, torch.device("cpu"), None)
    assert joint > loss  # joint adds 0.5 (1 - PCC)
    joint.backward()
    assert model.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loss mode"):
        make_loss_fn("huber")


def test_window_must_fit_stride(dotted):
    with pytest.raises(ValueError, match="multiple of out_stride"):
        WindowDataset([dotted], window_px=62, input_mpp=INPUT_MPP, out_stride=STRIDE)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixnet")
    simulate_sample(root / "s1", seed=3, size_um=(500.0, 500.0))
    st = normalise_spots(read_synthetic("s1", root / "s1").spots, min_counts=10, min_genes=5)
    st.write_h5ad(root / "s1.h5ad")
    tile_slide(root / "s1" / "he.tif", root / "tiles.zarr", root / "tiles.parquet", tile_px=64,
               tile_mpp=2.0, mask_mpp=8.0)
    genes = list(st.var_names[np.argsort(-np.asarray(st.X.mean(axis=0)).ravel())[:6]])
    return {"root": root, "st": root / "s1.h5ad", "slide": root / "s1" / "he.tif",
            "tiles": root / "tiles.parquet", "genes": genes}


TRAIN = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "patience": None, "amp": False,
         "device": "cpu"}
VALIDATION = {"fraction": 0.2, "block_um": 150}


class Interrupt(Exception):
    pass


def _train(sample, name, **kwargs):
    out = sample["root"] / name
    return out, train_pixnet([sample["st"]], [sample["slide"]], sample["genes"],
                             model_cfg={**TINY, "input_mpp": 2.0, "loss": "joint"},
                             train_cfg=TRAIN, validation=VALIDATION, seed=0,
                             out_model=out / "model.pt", out_log=out / "train_log.csv",
                             checkpoint_dir=out / "checkpoints", window_px=64, **kwargs)


def test_train_resume_and_predict(sample):
    out, summary = _train(sample, "full")
    assert summary["epochs_done"] == 2 and (out / "model.pt").is_file()
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["epoch"]) == [1, 2] and np.isfinite(log["val_loss"]).all()
    model, meta = load_model(out / "model.pt")
    assert isinstance(model, PixNet) and meta["genes"] == sample["genes"]
    assert meta["extra"]["window_px"] == 64 and meta["extra"]["input_mpp"] == 2.0

    # killed after epoch 1, rerun: resumes and ends with the uninterrupted weights
    def stop(row):
        if row["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(sample, "resumed", on_epoch_end=stop)
    assert not (sample["root"] / "resumed" / "model.pt").exists()
    resumed_dir, resumed = _train(sample, "resumed")
    assert resumed["resumed_from"] == 1 and resumed["epochs_done"] == 2
    a = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed_dir / "model.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)

    # prediction: dense map + spot tables at two diameters
    spot_files = {55.0: out / "pred" / "spots_55um.h5ad", 27.5: out / "pred" / "spots_27.5um.h5ad"}
    predict_pixnet(out / "model.pt", sample["slide"], sample["tiles"], out / "pred" / "dense.zarr",
                   sample["st"], spot_files, device="cpu")
    dmap = read_dense(out / "pred" / "dense.zarr")
    assert dmap.genes == sample["genes"] and dmap.mpp == 2.0 * 4
    assert dmap.attrs["tile_px"] == 64 and dmap.attrs["overlap_px"] == 16
    dense = dmap.read()
    mask = np.asarray(dmap.mask[:]) > 0
    assert mask.mean() > 0.3 and np.all(dense[:, mask] > 0) and np.all(dense[:, ~mask] == 0)
    st = ad.read_h5ad(sample["st"])
    preds = {d: ad.read_h5ad(p) for d, p in spot_files.items()}
    for diameter, pred in preds.items():
        assert pred.shape == (st.n_obs, 6) and list(pred.var_names) == sample["genes"]
        assert list(pred.obs_names) == list(st.obs_names)
        assert pred.uns["histomap"]["spot_diameter_um"] == diameter
        assert np.allclose(pred.obs["diameter_um"], diameter)
        np.testing.assert_allclose(pred.obsm["spatial"], st.obsm["spatial"])
        assert np.isfinite(pred.X).all()
        np.testing.assert_allclose(pred.X, spots_from_dense(dmap, st.obsm["spatial"], diameter,
                                                            SLIDE_MPP), rtol=1e-6)
    assert not np.allclose(preds[55.0].X, preds[27.5].X)
    # independent of the read-out code: a brute-force disc mean (supersampled map pixels) over
    # the written map's tissue pixels, from the map's recorded origin and pixel size; shifting
    # the disc by one map pixel moves the values by far more than the tolerance
    assert_spots_are_disc_means(preds, dmap, st.obsm["spatial"])


def assert_spots_are_disc_means(preds, dmap, centres_px):
    from brute_force import disc_mean

    dense = dmap.read().astype(np.float64)
    mask = np.asarray(dmap.mask[:]) > 0
    scale = dmap.slide_mpp / dmap.mpp  # map pixels per level-0 pixel
    spread = dense[:, mask].std()
    gaps = []
    for diameter, pred in preds.items():
        r = diameter / 2 / dmap.mpp
        for (x, y), got in zip(centres_px, pred.X):
            cx, cy = (x - dmap.origin_px[0]) * scale, (y - dmap.origin_px[1]) * scale
            want = disc_mean(dense, cx, cy, r, mask=mask)
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * spread)
            gaps.append(np.abs(disc_mean(dense, cx + 1, cy, r, mask=mask) - want).max())
    assert np.median(gaps) > 2e-2 * spread


def test_mixed_scale_training_uses_every_spot_size(sample, caplog):
    """Extra spot tables of other sizes (here 27.5 um discs re-measured from the simulated cells)
    train together with the 55 um spots, each with its own disc."""
    from histomap.evaluation.scales import truth_at_scale

    synthetic = read_synthetic("s1", sample["root"] / "s1")
    small = truth_at_scale(synthetic.highres, ad.read_h5ad(sample["st"]), 27.5,
                           min_spacing_um=27.5, preprocess={"min_counts": 10, "min_genes": 5})
    small_path = sample["root"] / "s1_27.5um.h5ad"
    small.write_h5ad(small_path)
    seen = []
    original = WindowDataset.__init__

    def spy(self, parts, **kwargs):
        original(self, parts, **kwargs)
        seen.append(np.concatenate([p.diameter_um for p in parts]))

    with pytest.MonkeyPatch.context() as mp, caplog.at_level("INFO", "histomap.tasks.dense"):
        mp.setattr(WindowDataset, "__init__", spy)
        _, summary = _train(sample, "mixed", extra_st_paths=[[small_path]])
    assert summary["epochs_done"] == 2
    train_diameters = seen[0]
    assert set(np.unique(train_diameters)) == {27.5, 55.0}
    st = ad.read_h5ad(sample["st"])
    # both sizes are split by the same validation blocks: all spots are in train or validation
    assert sum(len(d) for d in seen) == st.n_obs + small.n_obs
    assert f"+ {small.n_obs} spots of 27.5 um" in caplog.text
    with pytest.raises(ValueError, match="one list per sample"):
        _train(sample, "bad", extra_st_paths=[[small_path], []])


def _outside_tiles_brute_force(centres, tiles):
    """The tiles x spots scan the grid look-up replaced: every centre against every tile."""
    outside = np.ones(len(centres), dtype=bool)
    for a, b, s in tiles[["x0_px", "y0_px", "size_px0"]].to_numpy(float):
        outside &= ~((centres[:, 0] >= a) & (centres[:, 0] < a + s)
                     & (centres[:, 1] >= b) & (centres[:, 1] < b + s))
    return outside


def test_outside_tiles_grid_lookup_equals_the_full_scan():
    """Grid tiles, overlapping tiles of mixed sizes (spot boxes) and centres on tile edges give
    exactly the answer of the full scan."""
    from histomap.tasks.dense import outside_tiles

    rng = np.random.default_rng(0)
    grid = [(x, y, 448.0) for x in range(0, 4480, 448) for y in range(0, 2688, 448)
            if rng.random() < 0.6]
    boxes = [(float(x), float(y), float(s)) for x, y, s in
             zip(rng.uniform(-50, 4500, 40), rng.uniform(-50, 2700, 40), rng.uniform(5, 300, 40))]
    tiles = pd.DataFrame(grid + boxes, columns=["x0_px", "y0_px", "size_px0"])
    centres = np.concatenate([rng.uniform(-100, 4600, (5000, 2)) * [1, 0.6],
                              tiles[["x0_px", "y0_px"]].to_numpy(),            # on a corner
                              tiles[["x0_px", "y0_px"]].to_numpy() + tiles[["size_px0"]].to_numpy()])
    fast = outside_tiles(centres, tiles)
    np.testing.assert_array_equal(fast, _outside_tiles_brute_force(centres, tiles))
    assert 0 < fast.sum() < len(fast)
    assert outside_tiles(np.zeros((0, 2)), tiles).shape == (0,)
