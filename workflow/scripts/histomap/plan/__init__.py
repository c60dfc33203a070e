"""Workflow planning: config + sample sheet -> folds, models, variants, seeds, cross-scale
settings, super-resolution runs, applications and file lists (plain Python, unit-tested; the
``.smk`` files only wire rules to it).

Modules, one concern each: :mod:`~histomap.plan.config` (layering and validation, the JSON
schemas in ``schemas/``), :mod:`~histomap.plan.samples` (the sheet), :mod:`~histomap.plan.folds`,
:mod:`~histomap.plan.inherit` (``base`` chains of variants and SR methods),
:mod:`~histomap.plan.models`, :mod:`~histomap.plan.crossscale`, :mod:`~histomap.plan.superres`,
:mod:`~histomap.plan.apply`, :mod:`~histomap.plan.targets` (the benchmark's files) and
:mod:`~histomap.plan.plan` (the :class:`Plan` that holds them).

    config = load_config([Path("config/her2st.yaml")], defaults=Path("config/config.yaml"))
    plan = validate_config(config, Path("."))
    plan.all_targets()
"""
from histomap.plan.config import (SCHEMA_DIR, SCHEMAS, deep_update, load_config,
                                  validate_config, validate_schemas)
from histomap.plan.folds import FINAL_FOLD
from histomap.plan.inherit import BASE_KEY, resolve_base
from histomap.plan.plan import Plan

__all__ = ["BASE_KEY", "FINAL_FOLD", "SCHEMAS", "SCHEMA_DIR", "Plan", "deep_update",
           "load_config", "resolve_base", "validate_config", "validate_schemas"]
