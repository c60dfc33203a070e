"""Super-resolution task (Diff-ST and its baselines): SR pairs -> model -> HR maps.

The ``train_*`` / ``predict_*`` super-resolution rules' work; the pairs come from
:mod:`histomap.data.srpairs`, the maps are scored by :mod:`histomap.evaluation.metrics`
(``evaluate_sr``) and tabled by :mod:`histomap.evaluation.report` (``sr_tables``). Every method
sees the same inputs from an SR-pairs zarr (:mod:`histomap.data.srpairs`): the LR map upsampled
onto the HR grid (``lr_up``), the LR map itself,
the H&E patch and the tissue mask, the LR map in the HR map's units; every method predicts the
HR map in the truth's units (log1p pairs: re-expressed with the target sum of the model's
training pairs, kept in ``model.pt`` as ``pairs.target_sum``), and predictions are also
de-normalised to counts with prediction-time statistics only
(:func:`histomap.data.srpairs.normalisation.prediction_denormaliser`: the LR patch, the training
target sum).

Methods (``method``):

* ``"diffst"`` (:class:`~histomap.models.diffst.DiffST`) and ``"guided"`` (its guided-diffusion
  baseline :class:`~histomap.models.diffst.ConditionalUNet`): conditional DDPMs trained with
  :meth:`GaussianDiffusion.p_losses` on tissue pixels (T = 1000 by default); Diff-ST adds its
  disentangling loss (returned by the model, already weighted), gets its CIGC gene graph once from
  the training HR maps (:func:`.training_data.training_adjacency`) and its entropy curriculum per
  epoch (:class:`~histomap.models.diffst.CurriculumSchedule`; the scheduled and the observed kept
  sub-patch fractions are logged and written to the training log). Maps are moved to [-1, 1] for
  the diffusion (:class:`.objectives.ValueRange`).
* every baseline of :mod:`histomap.models.srnets` (``bicubic``, ``unet``, ``unetpp``,
  ``attention_unet``, ``histogene_sr``, ``tesla``): ``forward(lr_up, image, lr=None) -> hr``;
  trainable ones are fitted with MSE on tissue pixels, the others (``.trainable`` False) are
  saved with their configuration only.

Training uses the shared loop :func:`histomap.train.fit` (checkpoints, resume, early stopping,
AMP). Validation patches are a spatially separated share of the TRAINING samples' patches
(:func:`.training_data.split_patches`); the test fold is never seen.

Files:

* ``model.pt`` (:func:`.model_file.save_sr_model`): dict(format, method, variant, model_config,
  genes, state_dict, trainable, diffusion, value_range, task, pairs, train, validation, summary,
  adjacency) loadable with ``torch.load(weights_only=True)``; :func:`.model_file.load_sr_model`.
* maps zarr (:func:`.prediction.predict_sr`, format :data:`histomap.data.srmaps.MAPS_FORMAT`): per
  patch ``pred`` (G, h, w) normalised mean, ``pred_counts``, for diffusion methods ``pred_std`` /
  ``pred_std_counts`` (per-pixel std over K samples, ddof 0), plus ``mask``, ``origin_px``,
  ``origin_um``, ``grid_index`` copied from the pairs; attrs = the pair geometry + how it was
  predicted (method, sampler, steps, K, seed, ``device``, ``batch_chains``, ``autocast``,
  ``threads``).
* HR-bin AnnData (:func:`.prediction.predict_sr`): one row per HR pixel inside the mask of every
  patch (overlapping patches give one row each); ``obsm["spatial"]`` bin centres in level-0 px; X =
  predicted counts; layers ``pred`` and ``truth`` (normalised), ``truth_counts``, and for diffusion
  ``pred_std``, ``pred_std_counts``.

Applied to a sample with LR ST and H&E but no HR truth (``apply.superres``):
:func:`.apply.lr_inputs_for_model` makes the sample's measured spots the LR-only inputs of a model
(:func:`histomap.data.srpairs.lr_only.build_lr_pairs`, in the model's layout and units), and
:func:`.prediction.predict_sr` writes the same maps zarr and HR-bin AnnData without truth layers
(``uns["superres"]["truth"]`` False).

Units: ``pred`` and layer ``truth`` are in the model's units (attrs ``normalisation``,
``target_sum``); ``pred_counts`` come from the prediction and the LR patch alone (no statistic of
the HR truth), ``truth_counts`` are the measured HR counts.

Modules, one job each: :mod:`.methods` (a method's network from its configuration),
:mod:`.objectives` (losses, the diffusion's value range and target, the curriculum),
:mod:`.training_data` (splits, datasets and training statistics from the pairs),
:mod:`.epoch_log` (the per-epoch log), :mod:`.model_file` (``model.pt``), :mod:`.training`
(``train_sr``), :mod:`.sampling` (reverse chains of a batch), :mod:`.bin_centres` (HR bins on the
slide), :mod:`.prediction` (``predict_sr``: maps zarr and HR-bin AnnData), :mod:`.apply`
(LR-only inputs of a sample without truth) and :mod:`.sampling_speed` (the steps-vs-quality
table). The names below are re-exported for convenience; code of the package, the rule scripts
and the tests import them from their modules.
"""
from __future__ import annotations

from histomap.tasks.superres.apply import lr_inputs_for_model
from histomap.tasks.superres.bin_centres import hr_pixel_centres
from histomap.tasks.superres.methods import (
    DEFAULT_DIFFUSION,
    DIFFUSION_METHODS,
    build_sr_model,
    is_diffusion,
    is_trainable,
    known_methods,
)
from histomap.tasks.superres.model_file import (
    SR_MODEL_FORMAT,
    load_sr_model,
    save_sr_model,
    sr_model_meta,
)
from histomap.tasks.superres.objectives import (
    DiffusionObjective,
    DiffusionTarget,
    ValueRange,
    baseline_batch_loss,
    curriculum_schedule,
    masked_mse,
    value_range,
)
from histomap.tasks.superres.prediction import predict_sr
from histomap.tasks.superres.sampling import (
    SR_BATCH_CHAINS_CPU,
    SR_CPU_BF16_DEFAULT,
    predict_chains,
    sampling_modes,
)
from histomap.tasks.superres.sampling_speed import time_sampling
from histomap.tasks.superres.training import train_sr
from histomap.tasks.superres.training_data import (
    split_patches,
    training_adjacency,
    training_pixels,
)

__all__ = ["DEFAULT_DIFFUSION", "DIFFUSION_METHODS", "DiffusionObjective", "DiffusionTarget",
           "SR_BATCH_CHAINS_CPU", "SR_CPU_BF16_DEFAULT", "SR_MODEL_FORMAT", "ValueRange",
           "baseline_batch_loss", "build_sr_model", "curriculum_schedule", "hr_pixel_centres",
           "is_diffusion", "is_trainable", "known_methods", "load_sr_model",
           "lr_inputs_for_model", "masked_mse", "predict_chains", "predict_sr", "sampling_modes",
           "save_sr_model", "split_patches", "sr_model_meta", "time_sampling", "train_sr",
           "training_adjacency", "training_pixels", "value_range"]
