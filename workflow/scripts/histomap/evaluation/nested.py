"""The nested choice (arrow: metrics -> a choice -> the reported row), the rule of
:mod:`histomap.plan.nested` applied to metric files.

* :func:`choose` (choose_nested): every candidate's inner score, from the metric files of its
  inner runs, and the candidate with the best mean over the inner folds (ties: the first
  declared; a NaN mean ranks last). It reads exactly the files it is given, and refuses a file
  whose rows are not the run it stands for, so the outer fold's own metrics, even when they lie
  in the same folder, cannot enter the choice.
* :func:`nested_row`: the reported row of an outer fold, the chosen candidate's own metrics
  under the nested name.
* :func:`choices_table` / :func:`choices_markdown`: the choice per outer fold with every
  candidate's inner scores (and, labelled as not used, their outer scores).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from histomap.errors import InputError
from histomap.evaluation.report import MEAN_OVER_SLIDES, _markdown_table, benchmark_long

FALLBACK_NOTE = ("fold {fold}: one training patient ({patients}), no inner split; candidate "
                 "{chosen} used by the declared fallback")


def run_score(table: pd.DataFrame, metric: str, where: str = "<metrics>") -> float:
    """A run's score: ``metric`` of the tables' mean over the fold's slides (one scale)."""
    long_df = benchmark_long(table)
    rows = long_df[(long_df["sample"] == MEAN_OVER_SLIDES) & (long_df["metric"] == metric)]
    if len(rows) != 1:
        raise InputError(where, f"expected one {metric} row over slides, found {len(rows)} "
                                f"(scales {sorted(pd.unique(rows['scale_um']))})")
    return float(rows["value"].iloc[0])


def read_run(path: str | Path, model: str, fold: str, seed: int) -> pd.DataFrame:
    """A run's metric table, checked to be that run's (model, fold, seed) and nothing else."""
    table = pd.read_parquet(path)
    seen = {(str(m), str(f)) for m, f in zip(table["model"], table["fold"])}
    seeds = set(pd.unique(table["seed"])) if "seed" in table.columns else {seed}
    if seen != {(model, fold)} or seeds != {seed}:
        raise InputError(path, f"holds runs {sorted(seen)} seeds {sorted(seeds)}, not the "
                               f"run {model}/{fold}/seed{seed} it was given for")
    return table


def inner_scores(runs: Sequence[Sequence], paths: Sequence[str], metric: str) -> pd.DataFrame:
    """Scores of the inner runs ``(candidate, inner fold, seed)``, one per file of ``paths``."""
    if len(runs) != len(paths):
        raise ValueError(f"{len(runs)} inner runs but {len(paths)} metric files")
    rows = [{"candidate": c, "inner_fold": f, "seed": int(t),
             "score": run_score(read_run(p, c, f, int(t)), metric, str(p))}
            for (c, f, t), p in zip(runs, paths)]
    return pd.DataFrame(rows, columns=["candidate", "inner_fold", "seed", "score"])


def pick(means: dict[str, float], candidates: Sequence[str], higher_is_better: bool) -> str:
    """The best mean (a NaN mean ranks last); ties go to the first declared candidate."""
    def key(c: str) -> tuple:
        v = means.get(c, math.nan)
        return (math.isnan(v), -v if higher_is_better else v, candidates.index(c))

    return min(candidates, key=key)


def choose(settings: dict, paths: Sequence[str]) -> dict:
    """choose_nested's record: ``settings`` (:meth:`histomap.plan.nested.NestedPlan.
    choice_params`) with the inner scores, each candidate's mean and the chosen one."""
    candidates = list(settings["candidates"])
    record = {k: v for k, v in settings.items() if k != "runs"}
    if not settings["inner_folds"]:
        if paths:
            raise ValueError("a fold without inner folds has no inner metric files to read")
        chosen = settings["fallback"]
        note = FALLBACK_NOTE.format(fold=settings["outer_fold"], chosen=chosen,
                                    patients=", ".join(settings["outer_train_patients"]))
        return {**record, "scores": [], "mean": {c: None for c in candidates},
                "chosen": chosen, "how": "fallback", "note": note}
    scores = inner_scores(settings["runs"], paths, settings["metric"])
    # mean over inner folds of each fold's mean over seeds (every fold weighs the same)
    per_fold = scores.groupby(["candidate", "inner_fold"], sort=False)["score"].agg(
        lambda v: v.mean(skipna=False))
    means = {c: float(per_fold.loc[c].mean(skipna=False)) for c in candidates}
    chosen = pick(means, candidates, settings["higher_is_better"])
    note = (f"fold {settings['outer_fold']}: {chosen} has the best mean {settings['metric']} "
            f"over {len(settings['inner_folds'])} inner folds (training patients "
            f"{', '.join(settings['outer_train_patients'])})")
    return {**record, "scores": scores.to_dict("records"),
            "mean": {c: (None if math.isnan(v) else v) for c, v in means.items()},
            "chosen": chosen, "how": "inner", "note": note}


def read_choice(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def nested_row(choice: dict, tables: dict[str, str | Path], fold: str, seed: int) -> pd.DataFrame:
    """The nested row of an outer fold and seed: the chosen candidate's metrics, renamed."""
    if choice["outer_fold"] != fold:
        raise ValueError(f"choice of fold {choice['outer_fold']} given for fold {fold}")
    chosen = choice["chosen"]
    table = read_run(tables[chosen], chosen, fold, seed)
    return table.assign(model=choice["name"])


def outer_scores(paths: Sequence[str | Path], metrics: Sequence[str]) -> pd.DataFrame:
    """``model, fold, seed, metric, score`` of outer runs (for the report, after the choice)."""
    rows = []
    for path in paths:
        table = pd.read_parquet(path)
        model, fold = str(table["model"].iloc[0]), str(table["fold"].iloc[0])
        seed = int(table["seed"].iloc[0]) if "seed" in table.columns else 0
        table = read_run(path, model, fold, seed)
        rows += [{"model": model, "fold": fold, "seed": seed, "metric": m,
                  "score": run_score(table, m, str(path))} for m in metrics]
    return pd.DataFrame(rows, columns=["model", "fold", "seed", "metric", "score"])


def choices_table(choices: Sequence[dict], outer: pd.DataFrame) -> pd.DataFrame:
    """One row per nested rule x outer fold x candidate: its inner scores (per inner fold and
    their mean), whether it was chosen and how, and its outer score (mean over seeds; never
    read by the choice)."""
    rows = []
    for ch in choices:
        for cand in ch["candidates"]:
            per_fold = {}
            for s in ch["scores"]:
                if s["candidate"] == cand:
                    per_fold.setdefault(s["inner_fold"], []).append(s["score"])
            mine = outer[(outer["model"] == cand) & (outer["fold"] == ch["outer_fold"])
                         & (outer["metric"] == ch["metric"])]
            rows.append({
                "nested": ch["name"], "outer_fold": ch["outer_fold"],
                "training_patients": ", ".join(ch["outer_train_patients"]),
                "metric": ch["metric"], "candidate": cand,
                "inner_scores": "; ".join(f"{f}: {sum(v) / len(v):.4f}"
                                          for f, v in per_fold.items()),
                "inner_mean": ch["mean"].get(cand), "chosen": cand == ch["chosen"],
                "how": ch["how"],
                "outer_score": float(mine["score"].mean()) if len(mine) else math.nan})
    return pd.DataFrame(rows)


def _cell(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.4f}"


def choices_markdown(choices: Sequence[dict], table: pd.DataFrame) -> str:
    """The nested choices: the rule as declared, then a table per nested row."""
    out = ["# Nested choices", "",
           "Each choice follows a rule written into the config before any run: within an outer "
           "fold, leave one training patient out in turn (inner folds `{fold}~i{patient}`), "
           "score every candidate there, choose the best mean (ties: the first declared). The "
           "outer fold's test samples are in no inner fold and no file of theirs is read by the "
           "choice. `outer score` is each candidate's own score on the outer fold, shown for "
           "comparison only: the choice never reads it.", ""]
    for name, part in table.groupby("nested", sort=False):
        first = next(c for c in choices if c["name"] == name)
        out += [f"## {name}", "",
                f"Candidates {', '.join(first['candidates'])}; inner score "
                f"{first['metric']} ({'higher' if first['higher_is_better'] else 'lower'} is "
                f"better), mean over slides; fallback {first['fallback'] or 'none'}.", ""]
        rows = [[r.outer_fold, r.training_patients, r.candidate,
                 "**chosen**" if r.chosen else "", r.how, r.inner_scores or "–",
                 _cell(r.inner_mean), _cell(r.outer_score)] for r in part.itertuples()]
        out += [_markdown_table(["outer fold", "training patients", "candidate", "choice",
                                 "how", "inner scores", "inner mean",
                                 "outer score (not used)"], rows, n_labels=6), ""]
        out += [f"- {c['note']}" for c in choices if c["name"] == name] + [""]
    return "\n".join(out)
