"""Dense maps: tile grid, seamless blending, band accumulator, zarr layout, spot read-out."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from histomap.data.slide import open_slide, read_region, write_pyramid
from histomap.errors import InputError
from histomap.models.roi import discs_from_spots, roi_aggregate
from histomap.tasks.dense_grid import blend_weights
from histomap.tasks.dense_map import predict_dense_map, read_dense, spots_from_dense

MPP = 1.0            # slide um/px; the models read at the same mpp, so tiles are exact crops
STRIDE = 4
REGION = (37, 21, 300, 250)  # level-0 x0, y0, w, h
DOT = (203, 135)             # level-0 centre of a pure red dot


class MeanColour(nn.Module):
    """Context-free 'model': the mean colour of each out_stride x out_stride block."""
    out_stride = STRIDE
    n_genes = 3

    def forward(self, images):
        return F.avg_pool2d(images, STRIDE)


class ConvModel(nn.Module):
    """A model with context (5x5 conv) whose output depends on where the tile starts."""
    out_stride = STRIDE
    n_genes = 4

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 5, padding=2)

    def forward(self, images):
        return F.avg_pool2d(self.conv(images).abs(), STRIDE)


class TileConstant(nn.Module):
    """Each tile's output is one value per channel: the mean of its red channel."""
    out_stride = STRIDE
    n_genes = 1

    def forward(self, images):
        b, _, h, w = images.shape
        return images[:, :1].mean(dim=(2, 3), keepdim=True).expand(b, 1, h // STRIDE,
                                                                    w // STRIDE)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.normal(size=(320, 400, 3)), sigma=(6, 6, 0))
    image = np.clip(128 + 600 * noise, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:320, :400]
    image[(xx - DOT[0]) ** 2 + (yy - DOT[1]) ** 2 <= 36] = (255, 0, 0)
    path = tmp_path_factory.mktemp("dense") / "slide.tif"
    write_pyramid(image, path, MPP)
    return path


def _direct(model, slide_path, grid_h, grid_w, origin=REGION[:2]):
    """The model run once on the whole map region (the reference without tiling)."""
    with open_slide(slide_path) as slide:
        img = np.array(read_region(slide, origin[0], origin[1], grid_w * STRIDE,
                                   grid_h * STRIDE, grid_w * STRIDE, grid_h * STRIDE))
    with torch.no_grad():
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        return model(x)[0].numpy()


def test_blend_weights_partition_of_unity():
    w = blend_weights(16, 4)[0] / blend_weights(16, 4)[0].max()
    assert np.all(w > 0) and np.allclose(w[4:12], 1)
    step = 12
    np.testing.assert_allclose(w[step:] + w[:4], 1.0, atol=1e-6)
    np.testing.assert_allclose(blend_weights(8, 0), 1.0)


def test_tiled_map_equals_direct_result_and_geometry(slide_path, tmp_path):
    out = tmp_path / "dense.zarr"
    dmap = predict_dense_map(MeanColour(), slide_path, REGION, input_mpp=MPP, tile_px=32,
                             overlap_px=8, out_zarr=out, batch_size=5, device="cpu",
                             genes=["R", "G", "B"])
    assert not (tmp_path / "dense.zarr.partial").exists()
    assert dmap.genes == ["R", "G", "B"] and dmap.mpp == MPP * STRIDE
    assert dmap.origin_px == (37.0, 21.0)
    h, w = dmap.mask.shape
    assert (h, w) == (int(np.ceil(250 / 4)), 75)
    # one gene a chunk, one band tall: every band flush writes whole chunks (the default band,
    # "auto", holds every grid row of a map this small)
    assert dmap.dense.shape == (3, h, w) and dmap.dense.chunks == (1, h, w)
    ms = dmap.attrs["multiscales"][0]
    assert dmap.n_levels == 2 and dmap.level(1).shape == (3, 32, 38)
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 4.0, 4.0]
    dense = dmap.read()
    direct = _direct(MeanColour(), slide_path, h, w)
    mask = np.asarray(dmap.mask[:]) > 0
    assert mask[:-1, :].all()  # last row's centre lies past the region (250 / 4 = 62.5)
    np.testing.assert_allclose(dense[:, mask], direct[:, mask], atol=2e-6)
    # the red dot lands on the map pixel holding its level-0 centre
    row, col = (DOT[1] - 21) // 4, (DOT[0] - 37) // 4
    redness = dense[0] - dense[1]
    assert np.unravel_index(np.argmax(redness), redness.shape) == (row, col)


def test_dense_map_is_valid_ome_zarr_with_pyramid(slide_path, tmp_path, caplog):
    """dense.zarr is NGFF 0.5 (zarr v3): the ome-zarr-models validator accepts the image
    and its mask label, ome-zarr-py reads it without a warning (genes as channel labels, every
    pyramid level), and each level is the block mean of the level below."""
    import logging

    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05 import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    out = tmp_path / "dense.zarr"
    predict_dense_map(MeanColour(), slide_path, REGION, input_mpp=MPP, tile_px=32, overlap_px=8,
                      out_zarr=out, device="cpu", genes=["R", "G", "B"])
    assert (out / "zarr.json").is_file() and not (out / ".zgroup").exists()
    root = zarr.open_group(out, mode="r")
    image = Image.from_zarr(root)
    ms = image.attributes.ome.multiscales[0]
    assert image.attributes.ome.version == "0.5" and [d.path for d in ms.datasets] == ["0", "1"]
    assert [a.name for a in ms.axes] == ["c", "y", "x"] and ms.axes[1].unit == "micrometer"
    scales = [d.coordinateTransformations[0].scale for d in ms.datasets]
    assert scales == [[1.0, 4.0, 4.0], [1.0, 8.0, 8.0]]
    assert [c["label"] for c in image.attributes.ome.omero["channels"]] == ["R", "G", "B"]
    ImageLabel.from_zarr(root["labels/mask"])
    level0, level1 = root["0"][:], root["1"][:]
    assert level1.shape == (3, 32, 38) and root["1"].chunks[0] == 1
    padded = np.pad(level0, ((0, 0), (0, 1), (0, 1)), mode="edge")
    expect = padded.reshape(3, 32, 2, 38, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(level1, expect, rtol=1e-6)
    assert root["labels/mask/1"].shape == (32, 38)
    with caplog.at_level(logging.WARNING):
        nodes = list(Reader(parse_url(str(out)))())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    node = nodes[0]
    assert len(node.data) == 2 and node.metadata["channel_names"] == ["R", "G", "B"]
    # the translation puts level-k pixel centres at origin + (i + 0.5) mpp_k
    trans = ms.datasets[1].coordinateTransformations[1].translation
    assert trans == [0.0, 21 * MPP + 4.0, 37 * MPP + 4.0]


def test_band_accumulator_matches_one_shot(slide_path, tmp_path, monkeypatch):
    import histomap.tasks.dense_map as dense_map

    kwargs = dict(input_mpp=MPP, tile_px=32, overlap_px=12, batch_size=7, device="cpu")
    # "auto" bands of 2 grid rows: the accumulator of 4 genes + the weight, float32, 78 map px
    # wide (15 tiles of 8 px, 5 apart) is 5 * 4 * 78 bytes a row, 8 + 5 rows for 2 grid rows
    monkeypatch.setattr(dense_map, "BAND_BYTES", 5 * 4 * 78 * (8 + 5))
    dmaps = [predict_dense_map(ConvModel(), slide_path, REGION, out_zarr=tmp_path / f"{b}.zarr",
                               band_tile_rows=b, **kwargs) for b in (None, 1, 3, "auto")]
    maps = [d.read() for d in dmaps]
    assert np.abs(maps[0]).max() > 0
    for other in maps[1:]:
        np.testing.assert_array_equal(maps[0], other)
    # level-0 chunks are one band tall: 5 map px a grid row (20 input px at stride 4)
    assert [d.dense.chunks[1] for d in dmaps[1:]] == [5, 15, 10]
    with pytest.raises(ValueError, match="band_tile_rows"):
        predict_dense_map(ConvModel(), slide_path, REGION, out_zarr=tmp_path / "bad.zarr",
                          band_tile_rows="some", **kwargs)
    # a model with context differs from the one-shot result near tile borders (zero padding);
    # the overlap ramps hide those seams: away from the map edge the blend is close to the
    # direct result, far closer than hard-edged tiles
    direct = _direct(ConvModel(), slide_path, *maps[0].shape[1:])
    hard = predict_dense_map(ConvModel(), slide_path, REGION, out_zarr=tmp_path / "hard.zarr",
                             **{**kwargs, "overlap_px": 0}).read()
    inner = (slice(None), slice(1, -2), slice(1, -2))
    blended_err = np.abs(maps[0][inner] - direct[inner]).max()
    seam_err = np.abs(hard[inner] - direct[inner]).max()
    assert blended_err < 0.04 * np.abs(direct).max() and blended_err < 0.25 * seam_err


def test_overlap_blends_tiles_with_cosine_ramp(slide_path, tmp_path):
    # one row of two tiles (32 px, overlap 8 -> 8 map px, 2 px overlap)
    region = (40, 40, 56, 32)
    dmap = predict_dense_map(TileConstant(), slide_path, region, input_mpp=MPP, tile_px=32,
                             overlap_px=8, out_zarr=tmp_path / "d.zarr", device="cpu",
                             genes=["red"])
    row = dmap.read()[0, 0]
    assert row.shape == (14,)
    with open_slide(slide_path) as slide:
        c = [read_region(slide, 40 + dx, 40, 32, 32, 32, 32)[..., 0].mean() / 255
             for dx in (0, 24)]
    w = blend_weights(8, 2)[0] / blend_weights(8, 2)[0].max()
    expect = np.r_[np.full(6, c[0]), w[6:] * c[0] + w[:2] * c[1], np.full(6, c[1])]
    np.testing.assert_allclose(row, expect, atol=1e-6)
    # no overlap: a hard seam
    hard = predict_dense_map(TileConstant(), slide_path, (40, 40, 64, 32), input_mpp=MPP,
                             tile_px=32, overlap_px=0, out_zarr=tmp_path / "h.zarr",
                             device="cpu").read()[0, 0]
    np.testing.assert_allclose(hard, np.r_[np.full(8, c[0]), np.full(8, hard[-1])], atol=1e-6)


def test_mask_from_tissue_tiles_and_skipped_tiles(slide_path, tmp_path):
    tiles = pd.DataFrame({"tile_id": [0, 1], "x0_px": [0, 256], "y0_px": [0, 192],
                          "size_px0": [64.0, 64.0], "tissue_fraction": [0.5, 0.9]})
    dmap = predict_dense_map(MeanColour(), slide_path, tiles, input_mpp=MPP, tile_px=32,
                             overlap_px=0, out_zarr=tmp_path / "m.zarr", device="cpu",
                             dtype="float16")
    assert dmap.dense.dtype == np.float16
    mask = np.asarray(dmap.mask[:]) > 0
    assert mask.shape == (64, 80) and mask.sum() == 2 * 16 * 16
    assert mask[:16, :16].all() and mask[48:, 64:].all()
    dense = dmap.read()
    assert np.all(dense[:, ~mask] == 0) and np.all(dense[:, mask] > 0)
    assert dmap.attrs["n_tiles"] == 8  # 2 x 2 tiles of 32 px per tissue tile, none between


def test_spots_from_dense_matches_roi_aggregate(slide_path, tmp_path):
    dmap = predict_dense_map(ConvModel(), slide_path, REGION, input_mpp=MPP, tile_px=32,
                             overlap_px=8, out_zarr=tmp_path / "s.zarr", device="cpu")
    rng = np.random.default_rng(1)
    centres = np.column_stack([rng.uniform(80, 300, 40), rng.uniform(60, 230, 40)])
    diam = rng.choice([5.0, 13.0, 27.5], 40)
    got = spots_from_dense(tmp_path / "s.zarr", centres, diam, MPP, block_px=8)
    c, r = discs_from_spots(centres, diam, MPP, dmap.origin_px, dmap.mpp)
    ref = roi_aggregate(torch.from_numpy(dmap.read())[None], torch.from_numpy(c)[None],
                        torch.from_numpy(r)[None], mode="mean")[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    sums = spots_from_dense(dmap, centres, diam, MPP, mode="sum", block_px=1000)
    ref_sum = roi_aggregate(torch.from_numpy(dmap.read())[None], torch.from_numpy(c)[None],
                            torch.from_numpy(r)[None], mode="sum")[0].numpy()
    np.testing.assert_allclose(sums, ref_sum, rtol=1e-5, atol=1e-5)
    # a spot off the map is NaN; a spot half off the map is the mean of its covered part
    edge = spots_from_dense(dmap, np.array([[1000.0, 1000.0], [37.0, 150.0]]), 20.0, MPP)
    assert np.isnan(edge[0]).all() and np.isfinite(edge[1]).all()
    inside = roi_aggregate(torch.from_numpy(dmap.read())[None],
                           torch.tensor([[[0.0, (150 - 21) / 4]]]), 2.5, mode="mean")[0, 0]
    np.testing.assert_allclose(edge[1], inside.numpy(), rtol=1e-5)


def test_bad_inputs(slide_path, tmp_path):
    with pytest.raises(ValueError, match="multiples"):
        predict_dense_map(MeanColour(), slide_path, REGION, input_mpp=MPP, tile_px=30,
                          overlap_px=8, out_zarr=tmp_path / "x.zarr", device="cpu")
    with pytest.raises(ValueError, match="overlap_px <= tile_px / 2"):
        predict_dense_map(MeanColour(), slide_path, REGION, input_mpp=MPP, tile_px=32,
                          overlap_px=20, out_zarr=tmp_path / "x.zarr", device="cpu")
    with pytest.raises(ValueError, match="size_px0"):
        predict_dense_map(MeanColour(), slide_path, pd.DataFrame({"x0_px": [0]}),
                          input_mpp=MPP, tile_px=32, overlap_px=0,
                          out_zarr=tmp_path / "x.zarr", device="cpu")
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(InputError, match="does not exist"):
        read_dense(tmp_path / "nope.zarr")


class ConvMean(nn.Module):
    """MeanColour as a strided convolution, so CPU autocast runs it in bf16."""
    out_stride = STRIDE
    n_genes = 3

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, STRIDE, stride=STRIDE, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            for c in range(3):
                self.conv.weight[c, c] = 1.0 / STRIDE ** 2

    def forward(self, images):
        return self.conv(images)


def test_cpu_bf16_switch_is_recorded_and_within_tolerance(slide_path, tmp_path):
    """cpu_bf16 runs the model under bf16 autocast on the CPU (values differ from fp32 by bf16
    rounding only); the attrs say which and how many threads; the default stays fp32."""
    maps = {}
    for bf16 in (False, True):
        maps[bf16] = predict_dense_map(ConvMean(), slide_path, REGION, input_mpp=MPP, tile_px=32,
                                       overlap_px=8, out_zarr=tmp_path / f"d{bf16}.zarr",
                                       device="cpu", cpu_bf16=bf16)
    assert maps[False].attrs["autocast"] is None and maps[True].attrs["autocast"] == "bfloat16"
    assert maps[False].attrs["threads"] == torch.get_num_threads()
    assert maps[False].attrs["device"] == "cpu"
    exact = _direct(MeanColour(), slide_path, *maps[False].mask.shape)
    mask = np.asarray(maps[False].mask[:]) > 0
    np.testing.assert_allclose(maps[False].read()[:, mask], exact[:, mask], atol=2e-6)
    diff = np.abs(maps[True].read() - maps[False].read())[:, mask]
    assert 0 < diff.max() < 1e-2      # bf16 rounding: not exact, within the tolerance


def test_cpu_bf16_config_values():
    from histomap.train import amp_dtype, cpu_bf16_enabled, cpu_has_bf16

    cpu = torch.device("cpu")
    assert amp_dtype(cpu) is None and amp_dtype(cpu, cpu_bf16=True) == torch.bfloat16
    assert amp_dtype(cpu, enabled=False, cpu_bf16=True) is None
    assert cpu_bf16_enabled("auto", False) is False
    assert cpu_bf16_enabled("auto", True) == cpu_has_bf16() == cpu_bf16_enabled(None, True)
    assert cpu_bf16_enabled("true", False) is True and cpu_bf16_enabled(False, True) is False
    with pytest.raises(ValueError, match="auto, true or false"):
        cpu_bf16_enabled("yes", True)


def test_layout_and_threads_change_the_map_by_reordering_only(slide_path, tmp_path):
    """The fast path (channels-last tensors, two torch threads) gives the map of the plain one
    (contiguous layout, one thread) up to the summation order of the network's dot products."""
    from histomap.models.pixnet import PixNet
    from histomap.threads import torch_threads
    from tolerances import reordering_atol

    torch.manual_seed(0)
    model = PixNet(5, encoder="test_resnet", decoder_channels=[8, 8, 16, 16, 16], fusion="safb",
                   out_stride=STRIDE, freeze_encoder=True)
    maps = {}
    for name, threads, last in (("plain", 1, False), ("fast", 2, True)):
        with torch_threads(threads):
            maps[name] = predict_dense_map(model, slide_path, REGION, input_mpp=MPP, tile_px=64,
                                           overlap_px=16, out_zarr=tmp_path / f"{name}.zarr",
                                           device="cpu", batch_size=3, channels_last=last)
    assert maps["fast"].attrs["memory_format"] == "channels_last"
    assert maps["plain"].attrs["memory_format"] == "contiguous"
    plain, fast = maps["plain"].read(), maps["fast"].read()
    atol = reordering_atol(model, scale=max(1.0, float(np.abs(plain).max())))
    np.testing.assert_allclose(fast, plain, rtol=0, atol=atol)
    assert np.ptp(plain) > 10 * atol
