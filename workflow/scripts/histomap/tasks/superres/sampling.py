"""Sampling a trained SR model: the HR maps of a batch, one per reverse chain.

Arrow: SR model + pairs -> **HR maps** (predict_*, apply_sr, the steps-vs-quality benchmark):
the batch as the model saw it in training (:func:`model_dataset`), its diffusion and value range
from ``model.pt``, and :func:`predict_chains` (batched chains, autocast) with a running mean and
std over the chains (:class:`Welford`).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histomap.data.srpairs.dataset import SRPairDataset
from histomap.data.srpairs.normalisation import require_target_sum
from histomap.tasks.superres.methods import DEFAULT_DIFFUSION, gaussian_diffusion, is_diffusion
from histomap.tasks.superres.objectives import DiffusionTarget, ValueRange

if TYPE_CHECKING:
    import torch
    from torch import nn

    from histomap.models.diffusion import GaussianDiffusion

# sampling defaults measured by benchmarks/cpu_bf16.py and benchmarks/whole_slide.py
# (benchmarks/README.md): bf16 autocast on the CPU (``cpu_bf16: auto``) and the K chains of a
# batch as one batch on the CPU (``batch_chains: auto``; always on CUDA)
SR_CPU_BF16_DEFAULT = False
SR_BATCH_CHAINS_CPU = True


def meta_value_range(meta: Mapping) -> ValueRange:
    """The [-1, 1] mapping a diffusion model was trained with (``model.pt`` ``value_range``)."""
    values = meta.get("value_range") or []
    return ValueRange(*values) if values else ValueRange()


def meta_diffusion_target(meta: Mapping) -> DiffusionTarget:
    """What a diffusion model generates (``model.pt`` ``diffusion.target``)."""
    return DiffusionTarget({**DEFAULT_DIFFUSION, **dict(meta.get("diffusion") or {})}["target"])


def model_dataset(meta: Mapping, pairs_zarr: str | Path,
                  indices: Sequence[int] | None = None) -> SRPairDataset:
    """The pairs as a trained model saw them: its LR upsampling, its H&E patch size and, for
    log1p units, its training target sum (required: the pairs' stored one is the sections' own,
    :func:`histomap.data.srpairs.normalisation.require_target_sum`)."""
    if meta["pairs"].get("normalisation") == "log1p":
        require_target_sum({}, meta["pairs"].get("target_sum"))
    return SRPairDataset(pairs_zarr, upsample=meta["pairs"].get("upsample", "bicubic"),
                         indices=indices, image_hw=meta["pairs"].get("image_hw"),
                         target_sum=meta["pairs"].get("target_sum"))


def meta_diffusion(meta: Mapping) -> GaussianDiffusion | None:
    """The diffusion process of a model's ``model.pt`` (its sampler clips x_0 estimates to its
    target's range); None for a baseline."""
    if not is_diffusion(meta["method"]):
        return None
    return gaussian_diffusion({**DEFAULT_DIFFUSION, **dict(meta.get("diffusion") or {})},
                              clip_x0=meta_diffusion_target(meta).clip(meta_value_range(meta)))


def repeat_batch(value: Any, k: int) -> Any:
    """``value`` with every tensor repeated ``k`` times along the batch (first) dimension: a
    tensor, a dict or dataclass (e.g. an encoded condition) of tensors; anything else as is."""
    import dataclasses

    from histomap.compat import torch

    if isinstance(value, torch.Tensor):
        return value.repeat(k, *([1] * (value.dim() - 1))) if value.dim() else value
    if isinstance(value, Mapping):
        return {key: repeat_batch(v, k) for key, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: repeat_batch(getattr(value, f.name), k)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def predict_chains(model: nn.Module, meta: Mapping, batch: Mapping, *, device: torch.device,
                   sampler: str = "respaced", steps: int | None = 20, n_samples: int = 1,
                   eta: float = 0.0, generator: torch.Generator | None = None,
                   diffusion: GaussianDiffusion | None = None, batch_chains: bool = False,
                   amp_type: torch.dtype | None = None) -> Iterator[np.ndarray]:
    """Predicted HR maps (B, G, h, w) float64 in the pairs' normalised units: one per reverse
    chain (``n_samples``) for diffusion methods, one for a baseline. Gradients are off while
    computing (not between the yields).

    ``batch_chains``: run the ``n_samples`` chains as one batch of ``n_samples x B`` (the
    condition encoded once and repeated); each chain draws its noise from its own copy of
    ``generator`` placed where the sequential chain would start
    (:meth:`~histomap.models.diffusion.GaussianDiffusion.chain_generators`), so the chains get
    the numbers they get one after another and ``generator`` ends in the same state. Needs a
    generator (without one, the chains run one after another). ``amp_type``: autocast dtype of
    the network (e.g. bf16 on the CPU, :func:`histomap.train.amp_dtype`), None for fp32.
    """
    from histomap.compat import torch
    from histomap.train import autocast, to_device

    batch = to_device(batch, device)
    if not is_diffusion(meta["method"]):
        with torch.no_grad(), autocast(device, amp_type):
            out = model(batch["lr_up"], batch["image"], lr=batch["lr"])
        yield out.double().cpu().numpy()
        return
    diffusion = diffusion or meta_diffusion(meta)
    vrange, target = meta_value_range(meta), meta_diffusion_target(meta)
    lr_up = vrange.to_model(batch["lr_up"].float())
    cond: dict[str, Any] = {"lr_map": lr_up, "image": batch["image"]}
    shape = tuple(batch["lr_up"].shape)  # the HR patch's (LR-only inputs have no hr)
    encode = getattr(model, "encode_condition", None)
    if callable(encode):  # encode LR + histology once, reuse at every step of every chain
        with torch.no_grad(), autocast(device, amp_type):
            cond = {"condition": encode(hr_shape=shape[-2:], **cond)}
    n_samples = int(n_samples)
    chains = 1
    if batch_chains and n_samples > 1 and generator is not None:
        chains = n_samples
        cond = repeat_batch(cond, chains)
        lr_up = repeat_batch(lr_up, chains)
    b = shape[0]
    for _ in range(n_samples // chains):
        with torch.no_grad():
            gen = generator if chains == 1 else diffusion.chain_generators(
                generator, chains, shape, sampler=sampler, steps=steps, eta=eta)
            with autocast(device, amp_type):
                x = diffusion.sample_one(model, (chains * b, *shape[1:]), cond, sampler=sampler,
                                         steps=steps, eta=eta, generator=gen, device=device)
            x = target.decode(x.float(), lr_up)
            if target.kind == "residual":  # back inside the data range of the maps
                x = x.clamp(*vrange.clip)
            out = vrange.from_model(x.double()).cpu().numpy()
        for k in range(chains):
            yield out[k * b:(k + 1) * b]


def sampling_modes(device: torch.device, batch_chains: bool | str, cpu_bf16: bool | str
                   ) -> tuple[bool, torch.dtype | None]:
    """(batch the chains?, autocast dtype) of a sampling run from the config values."""
    from histomap.train import amp_dtype, cpu_bf16_enabled

    if isinstance(batch_chains, str):
        if batch_chains.lower() not in ("auto", "true", "false"):
            raise ValueError(f"batch_chains must be auto, true or false, got {batch_chains!r}")
        batched = (device.type == "cuda" or SR_BATCH_CHAINS_CPU) \
            if batch_chains.lower() == "auto" else batch_chains.lower() == "true"
    else:
        batched = bool(batch_chains)
    amp_type = amp_dtype(device, True, cpu_bf16=cpu_bf16_enabled(cpu_bf16, SR_CPU_BF16_DEFAULT)) \
        if device.type == "cpu" else None
    return batched, amp_type


class Welford:
    """Running mean and (ddof 0) variance of equally shaped arrays."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: np.ndarray) -> None:
        self.n += 1
        if self.mean is None:
            self.mean, self.m2 = x.astype(np.float64).copy(), np.zeros_like(x, np.float64)
            return
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n)
