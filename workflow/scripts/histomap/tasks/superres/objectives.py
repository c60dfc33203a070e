"""What the SR methods are trained to minimise: masked MSE and the diffusion objective.

Arrow: SR pairs -> **SR model** (train_diffst / train_sr_baseline): ``fit``'s batch losses of
the baselines (:func:`baseline_batch_loss`) and of the diffusion methods
(:class:`DiffusionObjective`), the [-1, 1] value range the diffusion runs in (:class:`ValueRange`,
:func:`value_range`), what it generates (:class:`DiffusionTarget`) and Diff-ST's curriculum.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histomap.data.srpairs.store import read_sr_pairs
from histomap.tasks.superres.epoch_log import (
    EXTRA_LOG_COLUMNS,
    read_epoch_extras,
    write_rows_csv,
)
from histomap.tasks.superres.training_data import model_units

if TYPE_CHECKING:
    import torch
    from torch import nn

    from histomap.models.diffst import CurriculumSchedule, DiffST
    from histomap.models.diffusion import GaussianDiffusion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueRange:
    """Affine map between normalised maps [lo, hi] and the diffusion's [-1, 1].

    ``bounded``: the data cannot exceed ``hi`` (min-max maps), so sampled x_0 are clipped to
    [-1, 1]; otherwise (log1p, raw) only the lower bound (zero expression) is clipped."""

    lo: float = 0.0
    hi: float = 1.0
    bounded: bool = True

    def to_model(self, values):
        return (values - self.lo) * (2.0 / (self.hi - self.lo)) - 1.0

    def from_model(self, x):
        return (x + 1.0) * ((self.hi - self.lo) / 2.0) + self.lo

    @property
    def clip(self) -> tuple[float, float | None]:
        return (-1.0, 1.0) if self.bounded else (-1.0, None)

    def as_list(self) -> list:
        return [float(self.lo), float(self.hi), bool(self.bounded)]


@dataclass(frozen=True)
class DiffusionTarget:
    """What the diffusion generates, in the model's [-1, 1] units (``diffusion.target``).

    ``"x0"`` (the paper): the HR map itself. ``"residual"`` (as SRDiff / ResShift do for image
    super-resolution): half the difference between the HR map and the LR map upsampled onto the
    HR grid, so the chain only has to add the detail the LR map lacks; the HR map is then
    ``2 x + lr_up``. Both condition the denoiser on the same LR map and H&E patch.
    """

    kind: str = "x0"

    def __post_init__(self):
        if self.kind not in ("x0", "residual"):
            raise ValueError(f"diffusion target must be 'x0' or 'residual', got {self.kind!r}")

    def encode(self, hr, lr_up):
        return hr if self.kind == "x0" else (hr - lr_up) / 2.0

    def decode(self, x, lr_up):
        return x if self.kind == "x0" else 2.0 * x + lr_up

    def clip(self, vrange: ValueRange) -> tuple[float, float | None]:
        """Range the sampler clips each x_0 estimate to. The HR map: the value range's clip. A
        residual: [-1, 1], half the difference of two maps inside the training range [-1, 1]
        (for unbounded units too, where the HR map has no upper clip). Without a clip, the x_0
        estimates of eps-prediction at large t (the noise divided by sqrt(alpha_bar_t), which
        is about 0.006 at t = T) are unbounded and the chain diverges."""
        if self.kind == "x0":
            return vrange.clip
        return (-1.0, 1.0)


def value_range(normalisation: str, pairs_zarrs, indices, target_sum: float | None = None
                ) -> ValueRange:
    """[-1, 1] mapping of the pairs' units: [0, 1] for min-max, else [0, max training value]."""
    if normalisation == "minmax":
        return ValueRange(0.0, 1.0, True)
    hi = 0.0
    for path, idx in zip(pairs_zarrs, indices):
        arrays, attrs = read_sr_pairs(path, lazy=True)
        for i in idx:
            top = np.asarray([np.max(arrays["hr"][int(i)], initial=0.0)], np.float64)
            hi = max(hi, float(model_units(top, attrs, target_sum)[0]))
    return ValueRange(0.0, hi if hi > 0 else 1.0, False)


def curriculum_schedule(spec: Mapping[str, Any] | None, epochs: int, model: DiffST
                        ) -> CurriculumSchedule:
    """The per-epoch curriculum: ``spec`` = dict(at = milestones as fractions of the epochs,
    values = kept fractions (mode "fraction", default 0.25, 0.5, 1.0) or entropy thresholds
    (mode "threshold", required), mode = the model's ``curriculum_mode``)."""
    spec = dict(spec or {})
    mode = spec.pop("mode", model.cfg.curriculum_mode)
    if mode != model.cfg.curriculum_mode:
        raise ValueError(f"curriculum mode {mode!r} differs from the model's curriculum_mode "
                         f"{model.cfg.curriculum_mode!r}")
    at = tuple(spec.pop("at", (0.0, 1 / 3, 2 / 3)))
    if "values" not in spec and mode == "threshold":
        raise ValueError("a threshold curriculum needs its entropy thresholds as 'values'")
    values = tuple(spec.pop("values", (0.25, 0.5, 1.0)))
    if spec:
        raise ValueError(f"unknown curriculum option(s) {sorted(spec)}; known: at, values, mode")
    from histomap.models.diffst import CurriculumSchedule

    return CurriculumSchedule.over_training(epochs, at, values, mode)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the tissue pixels (mask (B, H, W)) of every gene."""
    w = mask[:, None].to(pred.dtype).expand_as(pred)
    return ((pred.float() - target.float()).pow(2) * w).sum() / w.sum().clamp_min(1.0)


def baseline_batch_loss(model: nn.Module, batch: Mapping, device: torch.device,
                        loss_fn=None) -> torch.Tensor:
    """``fit``'s batch_to_loss of the baselines: masked MSE of ``model(lr_up, image, lr)``."""
    from histomap.train import to_device

    batch = to_device(batch, device)
    pred = model(batch["lr_up"], batch["image"], lr=batch["lr"])
    return masked_mse(pred, batch["hr"], batch["mask"])


class DiffusionObjective:
    """``fit``'s batch_to_loss and on_epoch_end for the diffusion methods.

    Before every batch the curriculum of the current epoch is applied (so a resumed run gets the
    right stage); validation batches draw t and noise from a generator seeded by their patch
    indices, so the validation loss is comparable between epochs. Per epoch it records the
    scheduled and the observed kept sub-patch fraction and the loss terms. Validation losses
    (model in eval mode) are computed with every sub-patch at every curriculum stage, so the
    checkpoint is chosen by the loss of the model as it predicts.
    """

    def __init__(self, diffusion: GaussianDiffusion, vrange: ValueRange, *,
                 schedule: CurriculumSchedule | None, seed: int, start_epoch: int = 0,
                 extras_path: Path | None = None,
                 on_epoch_end: Callable[[dict], None] | None = None,
                 target: DiffusionTarget = DiffusionTarget()) -> None:
        self.diffusion, self.vrange, self.schedule = diffusion, vrange, schedule
        self.target = target
        self.seed, self.epoch = int(seed), int(start_epoch)
        self.extras_path, self.user_hook = extras_path, on_epoch_end
        self.rows: list[dict] = read_epoch_extras(extras_path, start_epoch)
        self._reset()

    def _reset(self) -> None:
        self.sums = {"denoise": 0.0, "dis": 0.0, "kept": 0.0}
        self.counts = {"denoise": 0, "dis": 0, "kept": 0}

    def scheduled(self) -> float | None:
        return self.schedule.fraction(self.epoch) if self.schedule is not None else None

    def state_dict(self) -> dict:
        """The running epoch's loss-term sums: saved in ``last.pt`` when a SIGTERM stops the
        epoch mid-way (:func:`histomap.train.fit`), so its epoch log row is that of an
        uninterrupted run."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])

    def __call__(self, model: nn.Module, batch: Mapping, device: torch.device,
                 loss_fn=None) -> torch.Tensor:
        from histomap.compat import torch
        from histomap.train import to_device

        # the curriculum selects sub-patches in training mode only: validation batches (eval
        # mode) use every sub-patch at every stage, as inference does
        if self.schedule is not None:
            self.schedule.apply(model, self.epoch)
        batch = to_device(batch, device)
        lr_up = self.vrange.to_model(batch["lr_up"].float())
        x0 = self.target.encode(self.vrange.to_model(batch["hr"].float()), lr_up)
        cond = {"lr_map": lr_up, "image": batch["image"]}
        generator = None
        if not model.training:
            key = int(batch["index"].sum()) + 7919 * int(batch["index"][0])
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        losses = self.diffusion.p_losses(model, x0, cond, mask=batch["mask"][:, None],
                                         generator=generator)
        if model.training:
            self._add("denoise", losses["denoise"])
            if "dis" in losses:
                self._add("dis", losses["dis"])
            kept = getattr(model, "last_cell_mask", None)
            if kept is not None:
                self._add("kept", kept.float().mean())
        return losses["loss"]

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] += float(value.detach())
        self.counts[key] += 1

    def _mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts[key] else math.nan

    def on_epoch_end(self, row: dict) -> None:
        scheduled = self.scheduled()
        extra = {"epoch": int(row["epoch"]),
                 "keep_fraction": math.nan if scheduled is None else scheduled,
                 "kept_observed": self._mean("kept"), "denoise": self._mean("denoise"),
                 "dis": self._mean("dis")}
        self.rows.append(extra)
        if self.schedule is not None:
            log.info("epoch %d: curriculum %s %.3g, observed kept sub-patch fraction %.3f; "
                     "denoise loss %.4g, disentangling loss %.4g", extra["epoch"],
                     self.schedule.mode, scheduled, extra["kept_observed"], extra["denoise"],
                     extra["dis"])
        else:
            log.info("epoch %d: denoise loss %.4g", extra["epoch"], extra["denoise"])
        if self.extras_path is not None:
            write_rows_csv(self.rows, self.extras_path, ("epoch", *EXTRA_LOG_COLUMNS))
        self.epoch = int(row["epoch"])
        self._reset()
        if self.user_hook is not None:
            self.user_hook({**row, **extra})
