"""Super-resolution training pairs (Diff-ST and its baselines): LR map, HR map, H&E patch, mask.

One pair is a square of tissue seen four ways, all on the same footprint:

* ``hr`` (G, h, w): gene counts on the HR grid (pixel side ``hr_um = lr_um / scale``);
* ``lr`` (G, h_lr, w_lr): the *same counts* on the LR grid (pixel side ``lr_um``): each LR pixel
  measures exactly the sum of the ``scale x scale`` HR pixels it covers, i.e. a coarse
  measurement of the same tissue, not an interpolation. It is stored **in the HR map's units**
  (attr ``lr_units = "hr"``): the HR-unit estimate of an LR pixel is its sum / scale^2 (raw
  counts) or, log-normalised, the same library fraction scaled by the HR target sum, so that
  interpolating it (bicubic, TESLA) predicts the HR map in the truth's units and every learned
  method gets its input in those units too;
* ``he`` (3, H, W) uint8: the H&E (or morphology) patch at ``image_mpp`` um/px;
* ``mask`` (h, w) bool: HR pixels that are measured (fully inside the slide and the highres
  measurement area, or a measured spot for spot-grid data) and, for point data, tissue.

Geometry. The HR and LR grids are global: HR pixel (i, j) covers level-0 pixels
[j * s, (j + 1) * s) x [i * s, (i + 1) * s) with ``s = hr_um / mpp``; patches start on LR pixel
boundaries (strides are multiples of ``lr_um``), so the LR pixels of every patch are the sample's
fixed 100 um (say) measurement grid. Patches cover the slide like tiles (the last row/column may
run past the edge, where ``mask`` is False and the H&E is white) and are kept when their mask
fraction is >= ``min_tissue``.

Patch size. ``edge="floor"`` (default): the patch is ``floor(patch_um / lr_um)`` LR pixels and
``scale`` times as many HR pixels, so LR is exactly the sum of the patch's HR pixels (2560 um at
100 um gives 25 LR / 125 HR pixels; the flooring is logged). ``edge="ceil"`` reproduces the
Diff-ST layout (2.56 mm: 26 LR, 128 HR at 5x): the patch is ``floor(patch_um / hr_um)`` HR
pixels and ``ceil(h / scale)`` LR pixels; the last LR row/column then also covers tissue beyond
the HR patch and sums all of its HR pixels, as a real coarse measurement would.

Normalisation (``normalisation``), stored values and how to undo it:

* ``"log1p"`` (the default unit: log-normalised counts): ``log1p(x / library * target_sum)`` per
  pixel, library = total counts of all genes of the input in the pixel (LR: of the LR pixel);
  stored with ``target_sum`` = the median non-zero HR library of this sample (attrs
  ``hr_target_sum`` = ``lr_target_sum``), a storage scale only: a model re-expresses every pair
  with the target sum of its *training* pairs (:func:`retarget_log1p`,
  :func:`training_target_sum`), exactly, so no statistic of a test section enters its units;
  arrays ``hr_library``, ``lr_library`` give ``x = expm1(v) * library / target_sum``; 0 where
  the library is 0;
* ``"minmax"`` (the paper's protocol, Diff-ST's code): per patch and gene, ``(x - min) / (max -
  min)`` separately for HR and LR, 0 where the patch-gene is constant; arrays ``hr_min``,
  ``hr_max``, ``lr_min``, ``lr_max`` (n, G; ``lr_*`` of the LR sums) give ``x = v * (max - min) +
  min``. The truth is scaled by its own range, so RMSE in these units depends on that range;
* ``"none"``: raw counts as float32 (LR: sums / scale^2).

De-normalising: the truth back to counts uses its own stored statistics
(:func:`pairs_denormaliser`); a *prediction* is never scaled with statistics of the truth it is
scored against: :func:`prediction_denormaliser` uses the LR patch (min-max: the LR range /
scale^2; log1p: each HR pixel's library estimated as its LR pixel's library / scale^2) and the
model's training target sum.

LR-only inputs (:func:`build_lr_pairs`, attr ``source = "lr_only"``): a sample with spots and
H&E but no HR truth; its measured spot map is the LR map and the HR grid is ``scale`` times
finer; no ``hr`` array (nor ``hr_*`` statistics), everything else as below.

Zarr v3 group written by :func:`build_sr_pairs` and :func:`build_spot_grid_pairs` (one chunk per
patch; written under a temporary name and renamed, :mod:`.store`): arrays ``lr``, ``hr``, ``he``,
``mask``, ``origin_px`` (n, 2) float64 level-0 (x, y) of the patch's top-left corner, ``origin_um``,
``grid_index`` (n, 2) int64 (row, col) of the patch's first HR pixel on the global HR grid,
``tissue_fraction`` (n,) and the normalisation arrays above; attrs ``format``, ``genes``,
``lr_um``, ``hr_um``, ``scale``, ``normalisation``, ``patch_um``, ``stride_um``, ``edge``,
``image_mpp``, ``slide``, ``slide_mpp``, ``source`` ("points" or "spot_grid"), ``lr_units``,
``n_patches`` (kept) and ``n_patches_dropped`` (planned patches below ``min_tissue``), shapes, ...

Modules: :mod:`.points` (point data: cells, transcripts, fine bins), :mod:`.spot_grid` (spot
lattices: legacy ST, Visium), :mod:`.lr_only` (LR-only inputs of an applied model),
:mod:`.sample` (one sample by platform, the build_sr_pairs rule), shared by them
:mod:`.grid` (patch geometry), :mod:`.counts` (input checks), :mod:`.normalisation` (units and
their inverse), :mod:`.store` (the zarr: writing, reading, training statistics) and
:mod:`.dataset` (the torch dataset). The names below are re-exported for convenience; code of
the package imports them from their modules.
"""
from __future__ import annotations

from histomap.data.srpairs.counts import gene_columns
from histomap.data.srpairs.dataset import SRPairDataset
from histomap.data.srpairs.grid import PairGeometry, block_sum, pair_geometry, patch_starts
from histomap.data.srpairs.lr_only import build_lr_pairs
from histomap.data.srpairs.normalisation import (
    NORMALISATIONS,
    denormalise,
    log1p_normalise,
    lr_library_on_hr,
    minmax,
    pairs_denormaliser,
    prediction_denormaliser,
    retarget_log1p,
)
from histomap.data.srpairs.points import build_sr_pairs, hr_bins
from histomap.data.srpairs.sample import SPOT_GRID_PLATFORMS, build_sample_pairs
from histomap.data.srpairs.spot_grid import (
    SpotGrid,
    build_spot_grid_pairs,
    spot_grid,
    spot_lattice,
)
from histomap.data.srpairs.store import FORMAT, has_truth, read_sr_pairs, training_target_sum

__all__ = ["FORMAT", "NORMALISATIONS", "PairGeometry", "SPOT_GRID_PLATFORMS",
           "SRPairDataset", "SpotGrid", "block_sum", "build_lr_pairs", "build_sample_pairs",
           "build_spot_grid_pairs", "build_sr_pairs", "denormalise", "gene_columns", "has_truth",
           "hr_bins", "log1p_normalise", "lr_library_on_hr", "minmax", "pair_geometry",
           "pairs_denormaliser", "patch_starts", "prediction_denormaliser", "read_sr_pairs",
           "retarget_log1p", "spot_grid", "spot_lattice", "training_target_sum"]
