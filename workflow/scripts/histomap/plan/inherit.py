"""Named settings built on other named settings (arrow: config -> model): the one inheritance
mechanism of the config.

Spot and dense model variants (``variants.{name}``) and super-resolution methods
(``superres.models.{name}``) name the entry they start from with the same key, ``base``:

    variants:
      pixnet_mse: {base: pixnet, loss: mse}
    superres:
      models:
        diffst_no_cam: {base: diffst, cam: false}

An entry's settings are its base's settings with its own keys laid over them, key by key; the
nested blocks of :data:`MERGED_BLOCKS` (``train``, ``diffusion``) are merged one level deep, so
``train: {epochs: 5}`` changes the epochs and keeps the base's other training settings. A base
may itself have a base (a chain); a cycle or a base that names nothing is an error naming the
config key.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

BASE_KEY = "base"
MERGED_BLOCKS = ("train", "diffusion")


def merge_settings(base: Mapping, overrides: Mapping) -> dict:
    """``overrides`` laid over ``base`` key by key; :data:`MERGED_BLOCKS` merged one level."""
    merged = {**base, **overrides}
    for key in MERGED_BLOCKS:
        if isinstance(base.get(key), Mapping) and isinstance(overrides.get(key), Mapping):
            merged[key] = {**base[key], **overrides[key]}
    return merged


@dataclass(frozen=True)
class Resolved:
    """An entry with its bases resolved: ``chain`` is the name, its base, that one's base, ...
    (the last one is the root: a model family for variants); ``settings`` has no ``base`` key."""

    name: str
    chain: tuple[str, ...]
    settings: dict = field(default_factory=dict)

    @property
    def root(self) -> str:
        return self.chain[-1]


def resolve_base(name: str, entries: Mapping[str, Mapping | None], *, where: str,
                 roots: Mapping[str, Mapping | None] | None = None,
                 roots_label: str = "") -> Resolved:
    """Follow the ``base`` links from ``entries[name]`` and merge the settings along the chain.

    ``entries``: the config block of named entries (e.g. ``config["variants"]``), ``where`` its
    config key for messages (``"variants"``, ``"superres.models"``). ``roots``: names that end a
    chain with settings of their own (the model families' blocks for variants). A name that is
    neither an entry nor a root resolves to itself with no settings (the caller decides whether
    that name is known); a ``base`` naming neither, or a cycle, raises ``ValueError``.
    """
    roots = roots or {}
    chain, layers, current = [name], [], name
    while True:
        if current not in entries:
            layers.append(dict(roots.get(current) or {}))
            break
        entry = dict(entries[current] or {})
        base = entry.pop(BASE_KEY, None)
        layers.append(entry)
        if base is None:
            break
        if base in chain:
            cycle = " -> ".join([*chain, base])
            raise ValueError(f"config {where}.{current}: base {base!r} makes a cycle ({cycle})")
        if base not in entries and base not in roots:
            known = f"neither {roots_label} nor another {where} entry" if roots_label else (
                f"not configured under {where}")
            raise ValueError(f"config {where}.{current}: base {base!r} is {known}")
        chain.append(base)
        current = base
    settings: dict = {}
    for layer in reversed(layers):
        settings = merge_settings(settings, layer)
    return Resolved(name, tuple(chain), settings)
