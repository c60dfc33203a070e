"""Nested choice of candidates inside the training patients (arrows: model -> metrics -> a
choice -> the reported row), a rule written into the config before any run.

    nested:
      pixnet_nested:                      # the row the tables report
        candidates: [pixnet, pixnet_mse]  # models or variants of `models`; ties: the first
        metric: PCC@M                     # the inner score (tables' summary, mean over slides)
        inner: leave_one_patient_out
        fallback: pixnet                  # for an outer fold with one training patient
        seeds: [0]                        # inner runs' training seeds (default: the first)

For an outer fold F with training samples T, the inner fold ``F~i{P}`` holds out the sections of
each patient P of T in turn (trains on the rest of T, tests on P's sections). Its train and test
samples are T's only: the outer fold's test samples are never in an inner fold, and no inner
job or choose_nested reads a file of theirs or of F's own runs (:meth:`NestedPlan.check_isolation`,
a start-up check). choose_nested scores every candidate on every inner fold and picks the best
mean (:mod:`histomap.evaluation.nested`); the row ``{name}`` of fold F is then the chosen
candidate's own run on F, so the tables show it beside every candidate's row. An outer fold
whose training samples come from one patient has no inner split: the declared ``fallback`` is
used there and the choice file says so (no fallback: a start-up error naming the fold).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from histomap.evaluation.folds import fold_kinds
from histomap.models import BASELINE_MODELS, MODEL_FAMILIES
from histomap.plan.folds import FINAL_FOLD, Folds
from histomap.plan.models import ModelSet, alternation
from histomap.plan.samples import SampleSheet

if TYPE_CHECKING:
    from histomap.plan.targets import BenchmarkFiles

INNER_SEP = "~i"  # inner fold name: {outer}~i{held-out patient}
INNER_STRATEGIES = ("leave_one_patient_out",)
# the inner score: a summary metric of the tables; True: higher is better
METRICS = {"PCC@M": True, "PCC@S": True, "PCC@F": True, "MSE": False, "MAE": False}
PCC_METRICS = ("PCC@M", "PCC@S", "PCC@F")
REPORT_FILES = {"md": "results/report/nested_choices.md",
                "csv": "results/report/nested_choices.csv"}
FILE_SUFFIXES = ("", ".h5ad", ".parquet", ".zarr", ".tsv")  # how a sample names its files


def inner_fold_name(outer: str, patient: str) -> str:
    return f"{outer}{INNER_SEP}{patient}"


def inner_folds(outer: str, train: list[str], patient_of: dict[str, str]
                ) -> dict[str, dict[str, list[str]]]:
    """Leave-one-patient-out over an outer fold's training samples ``train`` (nothing else):
    {inner fold: {"train", "test", "held_out"}} (``held_out``: the test patient), in sheet
    order; none when ``train`` comes from fewer than two patients."""
    patients = list(dict.fromkeys(patient_of[s] for s in train))
    if len(patients) < 2:
        return {}
    return {inner_fold_name(outer, p): {"train": [s for s in train if patient_of[s] != p],
                                        "test": [s for s in train if patient_of[s] == p],
                                        "held_out": p}
            for p in patients}


@dataclass(frozen=True)
class NestedRule:
    """One `nested.{name}` block with its defaults filled in."""

    name: str
    candidates: tuple[str, ...]
    metric: str
    inner: str
    fallback: str | None
    seeds: tuple[int, ...]

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    def settings(self) -> dict:
        return {"name": self.name, "candidates": list(self.candidates), "metric": self.metric,
                "higher_is_better": self.higher_is_better, "inner": self.inner,
                "fallback": self.fallback, "seeds": list(self.seeds)}


def parse_rule(name: str, block: dict, models: ModelSet, default_seed: int) -> NestedRule:
    """A `nested.{name}` block, checked against the configured models (errors name the key)."""
    key = f"config nested.{name}"
    if name in models.names or name in models.variants or name in MODEL_FAMILIES \
            or name == FINAL_FOLD:
        raise ValueError(f"{key}: the name of the reported row must be new; {name!r} is "
                         "already a model, a variant or a reserved name")
    candidates = list(block.get("candidates") or [])
    if len(candidates) < 2 or len(set(candidates)) != len(candidates):
        raise ValueError(f"{key}.candidates: at least two distinct candidates are needed to "
                         f"choose among (got {candidates})")
    metric = block.get("metric", "PCC@M")
    if metric not in METRICS:
        raise ValueError(f"{key}.metric: {metric!r} is not one of {list(METRICS)}")
    for cand in candidates:
        if cand not in models.names:
            raise ValueError(f"{key}.candidates: {cand!r} is not in `models` (every candidate "
                             "also runs on the outer folds: the tables show its own row)")
        if metric in PCC_METRICS and models.family(cand) in BASELINE_MODELS:
            raise ValueError(f"{key}.candidates: {cand!r} is a baseline ({models.family(cand)}),"
                             f" constant over space: {metric} does not apply to it (a constant "
                             "prediction scores 0 by construction)")
    inner = block.get("inner", "leave_one_patient_out")
    if inner not in INNER_STRATEGIES:
        raise ValueError(f"{key}.inner: {inner!r} is not one of {list(INNER_STRATEGIES)}")
    fallback = block.get("fallback")
    if fallback is not None and fallback not in candidates:
        raise ValueError(f"{key}.fallback: {fallback!r} is not one of its candidates")
    seeds = tuple(int(s) for s in (block.get("seeds") or [default_seed]))
    return NestedRule(name, tuple(candidates), metric, inner, fallback, seeds)


class NestedPlan:
    """Every `nested` rule of the config, the inner folds they need and their files."""

    def __init__(self, config: dict, sheet: SampleSheet, folds: Folds, models: ModelSet,
                 train_seeds: list[int]):
        blocks = config.get("nested") or {}
        self.folds, self.train_seeds = folds, train_seeds
        if blocks and not bool(config.get("benchmark", True)):
            raise ValueError("config nested: the nested choice needs the benchmark's folds; "
                             "`benchmark: false` plans none")
        self.rules = {name: parse_rule(name, block or {}, models, train_seeds[0])
                      for name, block in blocks.items()}
        patient_of = {s: str(sheet.value(s, "patient")) for s in folds.st_samples}
        self.inner = {outer: inner_folds(outer, folds.samples(outer, "train"), patient_of)
                      for outer in (folds.names if self.rules else [])}
        self.patients = {outer: list(dict.fromkeys(patient_of[s]
                                                   for s in folds.samples(outer, "train")))
                         for outer in self.inner}
        flat = {name: {k: v for k, v in parts.items() if k != "held_out"}
                for by_outer in self.inner.values() for name, parts in by_outer.items()}
        table = sheet.table.reset_index(drop=True)
        folds.add_inner(flat, fold_kinds(table, flat) if flat else {})
        self.check_fallbacks()

    @property
    def names(self) -> list[str]:
        return list(self.rules)

    @property
    def runs(self) -> str:
        """Wildcard regex of the nested rows' names."""
        return alternation(self.names)

    @property
    def outer_runs(self) -> str:
        """Wildcard regex of the outer folds (a choice is made per outer fold)."""
        return alternation(self.folds.names)

    def describe(self) -> list[str]:
        """A line per nested rule for ``histomap validate``: its candidates, and per outer fold
        the inner folds or the fallback."""
        lines = []
        for rule in self.rules.values():
            per_fold = [f"{outer}: {len(by_inner)} inner folds" if by_inner
                        else f"{outer}: one training patient, fallback {rule.fallback}"
                        for outer, by_inner in self.inner.items()]
            lines.append(f"nested {rule.name}: {' / '.join(rule.candidates)} by {rule.metric} "
                         f"({rule.inner}); " + "; ".join(per_fold))
        return lines

    def check_fallbacks(self) -> None:
        for rule in self.rules.values():
            for outer, by_inner in self.inner.items():
                if not by_inner and rule.fallback is None:
                    raise ValueError(
                        f"config nested.{rule.name}: outer fold {outer!r} trains on one patient "
                        f"({', '.join(self.patients[outer])}), so no inner leave-one-patient-out"
                        f" split exists; declare nested.{rule.name}.fallback (one of "
                        f"{list(rule.candidates)}) to be used on such folds, before any run")

    # ------------------------------------------------------------------ files
    def inner_runs(self, name: str, outer: str) -> list[tuple[str, str, int]]:
        """(candidate, inner fold, seed) of every inner run choose_nested scores for ``outer``."""
        rule = self.rules[name]
        return [(c, fold, t) for c in rule.candidates for fold in self.inner[outer]
                for t in rule.seeds]

    def inner_metric_files(self, name: str, outer: str) -> list[str]:
        return [f"results/metrics/spot/{c}/{fold}/seed{t}.parquet"
                for c, fold, t in self.inner_runs(name, outer)]

    def choice_file(self, name: str, outer: str) -> str:
        return f"results/nested/{name}/{outer}.json"

    def choice_files(self) -> list[str]:
        return [self.choice_file(n, f) for n in self.names for f in self.folds.names]

    def outer_metric_files(self, name: str, outer: str, tseed) -> list[str]:
        """Every candidate's own metrics on the outer fold (the nested row copies the chosen
        one's); read only after the choice is written."""
        return [f"results/metrics/spot/{c}/{outer}/seed{tseed}.parquet"
                for c in self.rules[name].candidates]

    def metric_files(self) -> list[str]:
        """The nested rows' spot metrics, one per outer fold and training seed."""
        return [f"results/metrics/spot/{n}/{f}/seed{t}.parquet" for n in self.names
                for f in self.folds.names for t in self.train_seeds]

    def report_files(self) -> list[str]:
        return list(REPORT_FILES.values()) if self.rules else []

    def report_inputs(self) -> dict[str, list[str]]:
        """nested_report's inputs: the choices, then every candidate's outer metrics."""
        return {"choices": self.choice_files(),
                "outer": sorted({p for n in self.names for f in self.folds.names
                                 for t in self.train_seeds
                                 for p in self.outer_metric_files(n, f, t)})}

    def choice_params(self, name: str, outer: str) -> dict:
        """What choose_nested writes beside the scores: the rule, the outer fold's training
        patients and the inner folds (their samples all outer training samples)."""
        return {**self.rules[name].settings(), "outer_fold": outer,
                "outer_train_samples": self.folds.samples(outer, "train"),
                "outer_train_patients": self.patients[outer],
                "inner_folds": self.inner[outer],
                "runs": [list(r) for r in self.inner_runs(name, outer)]}

    # ------------------------------------------------------------------ isolation
    def inner_reads(self, files: BenchmarkFiles, outer: str) -> list[tuple[str, str]]:
        """(job, file) of every file the inner jobs of ``outer`` and its choose_nested jobs
        read, from the same file lists the rules use (training, gene panel, prediction,
        scoring)."""
        runs = {(c, fold, t) for n in self.names for c, fold, t in self.inner_runs(n, outer)}
        reads = [(f"choose_nested {n}/{outer}", p) for n in self.names
                 for p in self.inner_metric_files(n, outer)]
        for fold in self.inner[outer]:
            reads += [(f"select_genes {fold}", f"results/st/{s}.h5ad")
                      for part in ("train", "test") for s in self.folds.samples(fold, part)]
        for c, fold, t in sorted(runs):
            job = f"{c}/{fold}/seed{t}"
            for value in files.train_inputs(c, fold).values():
                reads += [(f"train {job}", p) for p in ([value] if isinstance(value, str)
                                                        else value)]
            reads += [(f"evaluate {job}", p) for p in [*files.prediction_files(c, fold, t),
                                                       files.genes_for_fold(fold)]]
            for s in self.folds.samples(fold, "test"):
                reads += [(f"predict {job}", p) for p in (
                    f"results/models/{c}/{fold}/seed{t}/model.pt", f"results/st/{s}.h5ad",
                    f"results/ingest/{s}/slide.tif", f"results/tiles/{s}.parquet",
                    *files.plan.cross_scale.truth(c, fold, s))]
        return reads

    def check_isolation(self, files: BenchmarkFiles) -> None:
        """Start-up check: no inner fold holds an outer test sample, and no file an inner job
        or choose_nested reads is an outer test sample's or a run of the outer fold itself."""
        for outer, by_inner in self.inner.items():
            test = set(self.folds.samples(outer, "test"))
            for fold, parts in by_inner.items():
                leaked = test & {*parts["train"], *parts["test"]}
                if leaked:
                    raise ValueError(f"nested: inner fold {fold} holds test samples "
                                     f"{sorted(leaked)} of its outer fold {outer}")
            bad = [(job, p) for job, p in self.inner_reads(files, outer)
                   if names_any(p, {*test, outer})]
            if bad:
                raise ValueError(f"nested: jobs of outer fold {outer}'s inner choice read files "
                                 f"of its test samples or of its own runs, e.g. {bad[:3]}")


def names_any(path: str, names: set[str]) -> bool:
    """Whether a path names one of ``names`` as a folder or as a file (``{name}.h5ad``...)."""
    return any(part == n + suffix for part in Path(path).parts for n in names
               for suffix in FILE_SUFFIXES)
