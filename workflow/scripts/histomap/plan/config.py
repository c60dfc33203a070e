"""The workflow's config, layered and validated (start-up, before any arrow of DESIGN.md).

* :func:`load_config`: config files layered as Snakemake layers ``--configfile`` over the
  Snakefile's ``configfile: config/config.yaml`` (later files override earlier ones key by key,
  nested blocks merged recursively).
* :func:`validate_schemas`: the config against ``schemas/config.schema.yaml`` and its
  ``superres`` block against ``schemas/superres.schema.yaml`` (schema defaults filled in).
* :func:`validate_config`: both, then the sample sheet and every start-up check of the plan;
  returns the :class:`~histomap.plan.plan.Plan`. ``common.smk`` and ``histomap validate`` run
  this same function, so both give the same messages.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from histomap.plan.plan import Plan

SCHEMA_DIR = Path(__file__).parent / "schemas"
SCHEMAS = {
    "config": SCHEMA_DIR / "config.schema.yaml",
    "samples": SCHEMA_DIR / "samples.schema.yaml",
    "superres": SCHEMA_DIR / "superres.schema.yaml",
}


def deep_update(config: dict, overrides: Mapping) -> dict:
    """Lay ``overrides`` over ``config`` in place: a mapping merges into the mapping under the
    same key (recursively), any other value replaces it (Snakemake's ``update_config``)."""
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(config.get(key), Mapping):
            config[key] = deep_update(dict(config[key]), value)
        elif isinstance(value, Mapping):
            config[key] = deep_update({}, value)
        else:
            config[key] = value
    return config


def read_config_file(path: str | Path) -> dict:
    """One YAML (or JSON) config file; an empty file is an empty config."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the config file: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a config file must be a mapping of keys at the top level")
    return loaded


def load_config(paths: list[Path], defaults: Path | None = None) -> dict:
    """``defaults`` (the workflow's config/config.yaml, which the Snakefile always loads first),
    then each of ``paths`` in order, later files overriding earlier ones key by key."""
    config: dict = {}
    for path in [*([defaults] if defaults is not None else []), *paths]:
        deep_update(config, read_config_file(path))
    return config


def validate_schemas(config: dict) -> None:
    """The JSON-schema checks of the workflow's start-up (snakemake.utils.validate: the same
    messages, defaults filled into ``config``); an absent `superres` block becomes
    ``{"enabled": False}``."""
    from snakemake.utils import validate

    validate(config, schema=str(SCHEMAS["config"]))
    validate(config.setdefault("superres", {"enabled": False}), schema=str(SCHEMAS["superres"]))


def validate_config(config: dict, workdir: Path) -> Plan:
    """Every start-up check of the workflow on ``config`` (schemas, the sample sheet, folds,
    models and variants, cross-scale, super-resolution and apply settings); relative paths in
    the config start at ``workdir``. Returns the plan; raises the workflow's errors."""
    validate_schemas(config)
    plan = Plan.from_config(config, workdir)
    plan.all_targets()  # checks made while listing files (e.g. SR runs need a fold)
    plan.files.training_logs()
    plan.nested.check_isolation(plan.files)  # no inner job reads an outer test sample's file
    return plan
