"""Encoder weights from a local file, checked tensor by tensor: the "(encoder features)" arrow's
weights (DESIGN.md). Nothing is downloaded.

Formats read (:func:`read_checkpoint`): ``safetensors`` (``model.safetensors``, what the Hugging
Face hub serves) and torch pickles (``pytorch_model.bin``, ``.pt``, ``.pth``; loaded with
``weights_only=True``), the state dict at the top level or under a ``state_dict`` / ``model`` /
``model_state_dict`` / ``module`` wrapper. Key names: timm's (which is what a timm model pushed to
the hub, e.g. ``hf-hub:MahmoodLab/UNI2-h``, stores), each optionally behind ``module.``
(DataParallel), ``model.``, ``backbone.``, ``encoder.``, ``trunk.``, ``visual.trunk.`` or
``_orig_mod.`` (``torch.compile``) prefixes; a checkpoint in an architecture's original naming
goes through timm's own ``checkpoint_filter_fn`` of that architecture when the plain names do not
fit (e.g. ConvNeXt's original ``downsample_layers``).

:func:`load_checkpoint` is strict: every tensor the model holds must come from the file with its
exact shape, and every tensor of the file must have a place in the architecture (classifier
heads that a pooled or ``features_only`` model drops included); anything else is an
:class:`~histomap.errors.InputError` that names the file and the tensor.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from torch import nn

from histomap.compat import torch
from histomap.errors import InputError

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "visual.trunk.",
                "trunk.")
SAFETENSORS_MAGIC_MAX = 100_000_000  # a safetensors header is at most this many bytes


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as fh:  # 8-byte little-endian header length, then a JSON header
        head = fh.read(9)
    return (len(head) == 9 and head[8:9] == b"{"
            and 0 < int.from_bytes(head[:8], "little") < SAFETENSORS_MAGIC_MAX)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a local weights file (safetensors or a torch pickle), wrappers removed;
    key prefixes are left for :func:`match_keys`. InputError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "encoder weights file does not exist")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(path, f"cannot read as safetensors: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise InputError(path, f"cannot read as a torch checkpoint (safetensors or "
                               f"pytorch_model.bin): {exc}") from exc
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise InputError(path, f"the file holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(state) < len(obj):
        log.warning("%s: ignoring %d non-tensor entries", path, len(obj) - len(state))
    return state


def match_keys(state: Mapping[str, torch.Tensor], known: Iterable[str]
               ) -> dict[str, torch.Tensor]:
    """``state`` with the wrapper prefixes of :data:`KEY_PREFIXES` removed from every key that
    is not already a name of ``known`` (repeatedly: ``module.model.blocks.0`` -> ``blocks.0``)."""
    known = set(known)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        while name not in known:
            prefix = next((p for p in KEY_PREFIXES if name.startswith(p)), None)
            if prefix is None:
                break
            name = name[len(prefix):]
        out[name if name in known else key] = value
    return out


def _timm_filter(model: nn.Module) -> Callable | None:
    """The ``checkpoint_filter_fn`` of a timm model's module (original names -> timm's)."""
    import importlib

    try:
        module = importlib.import_module(type(model).__module__)
    except ImportError:  # pragma: no cover - the class's module is imported already
        return None
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def _problems(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
              allowed: set[str]) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in own if k not in state]
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    unmapped = [k for k in state if k not in own and k not in allowed]
    return missing, shapes, unmapped


def load_checkpoint(model: nn.Module, path: str | Path, *,
                    architecture_keys: Iterable[str] = (), what: str = "encoder") -> None:
    """Fill every tensor of ``model`` from the local file ``path`` (:func:`read_checkpoint`).

    ``architecture_keys``: names the full architecture has besides ``model``'s own (its
    classifier head, or the parts a ``features_only`` model drops): tensors of the file under
    those names are left out without complaint. Raises InputError naming the file and the first
    missing, mis-shaped or unmapped tensors (and how many there are).
    """
    path = Path(path)
    own = model.state_dict()
    allowed = set(architecture_keys) - set(own)
    raw = read_checkpoint(path)
    state = match_keys(raw, [*own, *allowed])
    missing, shapes, unmapped = _problems(state, own, allowed)
    if missing or unmapped:  # original naming of the architecture? timm's own converter
        fn = _timm_filter(model)
        if fn is not None:
            try:
                converted = match_keys(fn(dict(state), model), [*own, *allowed])
            except Exception:  # noqa: BLE001 - a filter that does not apply converts nothing
                converted = None
            if converted is not None:
                problems = _problems(converted, own, allowed)
                if sum(map(len, problems)) < len(missing) + len(shapes) + len(unmapped):
                    state, (missing, shapes, unmapped) = converted, problems
                    log.info("%s: names converted by timm's checkpoint_filter_fn", path)
    errors = []
    if missing:
        errors.append(f"{len(missing)} tensor(s) of the {what} missing from the file, e.g. "
                      f"{', '.join(missing[:4])} (file keys start {list(raw)[:3]})")
    if shapes:
        errors.append(f"{len(shapes)} tensor(s) of another shape: {'; '.join(shapes[:4])}")
    if unmapped:
        errors.append(f"{len(unmapped)} tensor(s) of the file with no place in the {what} "
                      f"({type(model).__name__}): {', '.join(unmapped[:4])}")
    if errors:
        raise InputError(path, f"does not fit the {what}: " + "; ".join(errors))
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    log.info("%s: loaded all %d %s tensors (%d of the file's unused: heads)", path, len(own),
             what, len(state) - len(own))


__all__ = ["KEY_PREFIXES", "load_checkpoint", "match_keys", "read_checkpoint"]
