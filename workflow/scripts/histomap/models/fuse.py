"""Inference-only rewrites of a model in eval mode that keep its function: BatchNorm folded into
the convolution before it.

In eval mode a BatchNorm is a fixed per-channel affine map, ``y = (x - mean) / sqrt(var + eps)
* gamma + beta``; after a convolution it can be folded into that convolution's weights and bias,
which removes a full pass over every activation map (measured on the frozen EfficientNet-Lite0
of the configs: a quarter of the encoder's CPU time, ``benchmarks/whole_slide.py``). The fused
copy computes the same function up to float rounding; :func:`fold_batchnorm` checks that on a
probe input and keeps the original where it does not hold (a BatchNorm registered after a
convolution that is not its input).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable

from torch import nn

from histomap.compat import torch

log = logging.getLogger(__name__)

# A correct fold changes the outputs by float32 rounding only (relative ~1e-6 after a few dozen
# layers); a wrong one (the BatchNorm was not applied to that convolution's output) by the
# size of the signal. 1e-3 of the output's scale separates the two by orders of magnitude.
FOLD_RTOL = 1e-3


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` (eval statistics) into ``conv`` in place."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    with torch.no_grad():
        conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.ndim - 1))).to(conv.weight))
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.to(conv.weight), requires_grad=False)


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of ``bn`` once folded: the identity, or the dropout and activation of timm's
    ``BatchNormAct2d`` (batch norm, then ``drop``, then ``act``)."""
    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
             if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Sequential(*parts) if parts else nn.Identity()


def _last_conv(module: nn.Module | None) -> nn.Module | None:
    """``module`` if it is a convolution, the last convolution ending a chain of
    ``nn.Sequential`` (timm's deep stems end so), else None."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    return module if isinstance(module, nn.Conv2d) else None


def _foldable(conv: nn.Module | None, bn: nn.Module) -> bool:
    return (conv is not None and type(bn) in _BATCHNORMS
            and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels and not bn.training)


def _batchnorm_types() -> tuple[type, ...]:
    types: list[type] = [nn.BatchNorm2d]
    try:
        from timm.layers.norm_act import BatchNormAct2d
        types.append(BatchNormAct2d)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return tuple(types)


_BATCHNORMS = _batchnorm_types()


def fold_batchnorm(model: nn.Module, probe: torch.Tensor | None = None,
                   forward: Callable[[nn.Module, torch.Tensor], object] | None = None
                   ) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every BatchNorm that directly follows a Conv2d
    among its parent's children (or a ``Sequential`` ending in one) folded into that
    convolution; ``model`` is not changed.

    ``probe``: an input on which the copy must give the original's outputs (``forward(module,
    probe)``, default ``module(probe)``; tensors or lists of tensors) within :data:`FOLD_RTOL` of
    their scale; where it does not, the original is returned (logged). Without a probe the copy
    is returned unchecked."""
    if model.training:
        raise ValueError("fold_batchnorm is for a model in eval mode (model.eval())")
    if not _pairs(model):
        return model  # nothing to fold (a ViT, say): no copy of the weights
    fused = copy.deepcopy(model)
    pairs = _pairs(fused)
    for parent, name, conv, bn in pairs:
        _fold_pair(conv, bn)
        parent._modules[name] = _after_norm(bn)
    n = len(pairs)
    if probe is not None:
        run = forward or (lambda m, x: m(x))
        with torch.no_grad():
            want, got = _tensors(run(model, probe)), _tensors(run(fused, probe))
        err = max(float((w.float() - g.float()).abs().max() / w.float().abs().max().clamp_min(
            1e-12)) for w, g in zip(want, got))
        if len(want) != len(got) or not err <= FOLD_RTOL:
            log.warning("%s: folding %d BatchNorm(s) changed the outputs (relative %.3g); "
                        "keeping the model as it is", type(model).__name__, n, err)
            return model
    log.debug("%s: %d BatchNorm(s) folded into their convolutions", type(model).__name__, n)
    return fused


def _pairs(model: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d, nn.Module]]:
    """(parent, BatchNorm's name, convolution, BatchNorm) of every foldable pair of ``model``."""
    pairs = []
    for parent in model.modules():
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = _last_conv(parent._modules[a]), parent._modules[b]
            if bn is not None and _foldable(conv, bn):
                pairs.append((parent, b, conv, bn))
    return pairs


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []
