"""Import torch/timm safely next to the CPU-only torch wheel.

PyPI's torchvision wheel is CUDA-linked; beside the CPU torch its compiled ops fail to load and
``import torchvision`` (and so ``import timm``) raises ``operator torchvision::nms does not
exist``. Defining the op schemas first lets both import; torchvision's compiled ops (nms,
roi_align) stay unavailable, which histomap does not use. On a CUDA machine with a matching
torchvision the ops exist and nothing is done.
"""
from __future__ import annotations

import torch

_lib = None


def _define_missing_torchvision_ops() -> None:
    global _lib
    try:
        torch.ops.torchvision.nms  # noqa: B018 - probing the op registry
        return
    except (AttributeError, RuntimeError):
        pass
    try:
        _lib = torch.library.Library("torchvision", "DEF")
        _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
        pass


_define_missing_torchvision_ops()

import timm  # noqa: E402  (must come after the op schemas exist)

__all__ = ["timm", "torch"]
