"""Super-resolution methods by name: building a method's network from its configuration.

Arrow: config -> **SR model** (train_diffst / train_sr_baseline, predict_*): the diffusion
methods (``diffst``, ``guided``: :mod:`histomap.models.diffst`, sampled by
:mod:`histomap.models.diffusion`) and every baseline of :mod:`histomap.models.srnets`. torch and
the networks are imported where they are used, so pairs, metrics and tables (light jobs) start
without loading torch.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from histomap.models.diffusion import GaussianDiffusion

# diffusion denoisers by method name -> class name in histomap.models.diffst
DIFFUSION_METHODS = {"diffst": "DiffST", "guided": "ConditionalUNet"}
# options of a method's config handled here, not by the network constructor
TASK_KEYS = ("curriculum", "upsample", "adjacency_max_pixels", "adjacency_binarize")
DEFAULT_DIFFUSION = {"T": 1000, "schedule": "linear", "loss": "mse", "prediction": "eps",
                     "target": "x0"}


def _diffst():
    """The diffusion denoisers' module (imported lazily: it needs torch)."""
    from histomap.models import diffst

    return diffst


def gaussian_diffusion(cfg: Mapping, clip_x0: tuple[float, float] | None = None
                       ) -> GaussianDiffusion:
    """The diffusion process of a ``superres.diffusion`` config (merged over the defaults)."""
    from histomap.models.diffusion import GaussianDiffusion

    return GaussianDiffusion(T=int(cfg["T"]), schedule=cfg["schedule"], loss=cfg["loss"],
                             prediction=cfg["prediction"], clip_x0=clip_x0)


def _baselines():
    """The non-diffusion baselines module (imported lazily; it is written separately)."""
    from histomap.models import srnets

    return srnets


def known_methods() -> list[str]:
    """Every SR method name: the diffusion methods, then the baselines."""
    return [*DIFFUSION_METHODS, *_baselines().SR_BASELINES]


def is_diffusion(method: str) -> bool:
    """Whether ``method`` is a conditional DDPM (trained and sampled with a diffusion)."""
    return method in DIFFUSION_METHODS


def split_task_options(model_cfg: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """(task options, network keyword arguments) of a method's config."""
    cfg = dict(model_cfg or {})
    task = {k: cfg.pop(k) for k in TASK_KEYS if k in cfg}
    task.setdefault("upsample", "bicubic")
    return task, cfg


def build_sr_model(method: str, n_genes: int, model_cfg: Mapping[str, Any] | None = None
                   ) -> nn.Module:
    """The network of ``method`` for ``n_genes`` genes from its keyword configuration."""
    cfg = dict(model_cfg or {})
    cfg.pop("n_genes", None)
    if method in DIFFUSION_METHODS:
        return getattr(_diffst(), DIFFUSION_METHODS[method])(n_genes, **cfg)
    srnets = _baselines()
    if method not in srnets.SR_BASELINES:
        raise ValueError(f"unknown super-resolution method {method!r}; known: "
                         f"{sorted([*DIFFUSION_METHODS, *srnets.SR_BASELINES])}")
    return srnets.build_sr_baseline(method, n_genes, **cfg)


def is_trainable(method: str, model: nn.Module) -> bool:
    """Whether ``model`` is fitted (diffusion methods, baselines with parameters) or saved with
    its configuration only (``.trainable`` False, e.g. bicubic)."""
    if is_diffusion(method):
        return True
    return bool(getattr(model, "trainable", True)) and any(True for _ in model.parameters())
