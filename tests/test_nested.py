"""The nested choice inside the training patients (histomap.plan.nested, histomap.evaluation.
nested): inner folds made of an outer fold's training samples only, no planned read of an outer
test sample's file (and a check that catches a leak when one is injected), the fallback where
an outer fold has one training patient, start-up errors naming the key, the choice on hand-made
metric tables (a decoy outer metric file with a huge score is never read), the report, and a
Snakemake dry run whose printed jobs are walked for the same property."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import histomap.plan.nested as nested_plan
from histomap.errors import InputError
from histomap.evaluation.nested import (choices_markdown, choices_table, choose, nested_row,
                                        outer_scores, pick)
from histomap.plan import load_config, validate_config
from histomap.plan.nested import INNER_SEP, names_any

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "config" / "config.yaml"
# three patients, P1 with two sections: every outer fold trains on two patients
ROWS = [("a1", "P1"), ("a2", "P1"), ("b1", "P2"), ("c1", "P3")]
HER2ST_LIKE = [("B4", "B"), ("C2", "C"), ("C3", "C"), ("C4", "C")]
NESTED = {"pixnet_nested": {"candidates": ["pixnet", "pixnet_mse"]}}


def nested_config(tmp_path: Path, rows=ROWS, nested=None, **overrides) -> dict:
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("sample\tpatient\tplatform\tpath\n"
                     + "".join(f"{s}\t{p}\tsynthetic\t\n" for s, p in rows))
    config = load_config([], defaults=DEMO)
    config.update(samples=str(sheet), models=["mean", "pixnet", "pixnet_mse"], train_seeds=[0],
                  variants={"pixnet_mse": {"base": "pixnet", "loss": "mse"}},
                  superres={"enabled": False},
                  cross_scale={"enabled": False, "models": [], "diameters_um": [100.0],
                               "min_spacing_um": 10},
                  nested=copy.deepcopy(NESTED if nested is None else nested))
    config.update(copy.deepcopy(overrides))
    return config


def plan_of(tmp_path: Path, **kwargs):
    return validate_config(nested_config(tmp_path, **kwargs), tmp_path)


# --------------------------------------------------------------------------- inner folds
def test_inner_folds_hold_each_training_patient_out_of_the_outer_training_samples(tmp_path):
    plan = plan_of(tmp_path)
    patient = dict(ROWS)
    assert set(plan.nested.inner) == {"P1", "P2", "P3"}
    for outer, inner in plan.nested.inner.items():
        train, test = plan.folds.samples(outer, "train"), plan.folds.samples(outer, "test")
        assert sorted(inner) == sorted(f"{outer}{INNER_SEP}{p}"
                                       for p in {patient[s] for s in train})
        held = []
        for fold, parts in inner.items():
            assert set(parts["train"]) | set(parts["test"]) == set(train)
            assert not set(parts["train"]) & set(parts["test"])
            assert not (set(parts["train"]) | set(parts["test"])) & set(test)
            assert {patient[s] for s in parts["test"]} == {parts["held_out"]}
            assert plan.folds.samples(fold, "test") == parts["test"]
            assert plan.folds.kinds[fold] == "cross_patient"
            held += parts["test"]
        assert sorted(held) == sorted(train)  # every training section is held out once
    assert plan.folds.names == ["P1", "P2", "P3"]  # inner folds are no benchmark folds
    assert plan.nested.inner["P2"]["P2~iP1"] == {"train": ["c1"], "test": ["a1", "a2"],
                                                 "held_out": "P1"}


def test_no_planned_read_of_an_inner_job_names_the_outer_test_samples(tmp_path):
    plan = plan_of(tmp_path, nested={"pixnet_nested": {"candidates": ["pixnet", "pixnet_mse"],
                                                       "seeds": [0, 3]}})
    for outer in plan.folds.names:
        reads = plan.nested.inner_reads(plan.files, outer)
        forbidden = {*plan.folds.samples(outer, "test"), outer}
        assert reads and not [(job, p) for job, p in reads if names_any(p, forbidden)]
        paths = {p for _, p in reads}
        # the walk does cover the training spots, slides, cached features, models and metrics
        for s in plan.folds.samples(outer, "train"):
            assert {f"results/st/{s}.h5ad", f"results/ingest/{s}/slide.tif",
                    f"results/features/efficientnet_lite0_imagenet/1/{s}.zarr"} <= paths
        assert f"results/metrics/spot/pixnet_mse/{outer}~iP3/seed3.parquet" in paths \
            or outer == "P3"
    assert names_any("results/st/a1.h5ad", {"a1"}) and names_any("x/a1/dense.zarr", {"a1"})
    assert not names_any("results/genes/top50/P1~iP2.tsv", {"P1", "a1"})


def test_the_isolation_check_fails_when_an_inner_fold_holds_the_outer_test_patient(
        tmp_path, monkeypatch):
    honest = nested_plan.inner_folds

    def leaky(outer, train, patient_of):  # the bug: inner folds over every ST sample
        return honest(outer, list(patient_of), patient_of)

    monkeypatch.setattr(nested_plan, "inner_folds", leaky)
    with pytest.raises(ValueError, match=r"inner fold P1~iP1 holds test samples \['a1', 'a2'\]"):
        plan_of(tmp_path)


def test_the_isolation_check_fails_when_the_choice_reads_the_outer_runs(tmp_path, monkeypatch):
    def outer_too(self, name, outer):  # the bug: the outer fold's own metrics enter the choice
        return [*honest(self, name, outer), f"results/metrics/spot/pixnet/{outer}/seed0.parquet"]

    honest = nested_plan.NestedPlan.inner_metric_files
    monkeypatch.setattr(nested_plan.NestedPlan, "inner_metric_files", outer_too)
    with pytest.raises(ValueError, match="outer fold P1's inner choice read files"):
        plan_of(tmp_path)


def test_an_outer_fold_with_one_training_patient_needs_the_declared_fallback(tmp_path):
    loso = {"strategy": "leave_one_sample_out"}
    with pytest.raises(ValueError, match=r"nested\.pixnet_nested: outer fold 'B4' trains on "
                                         r"one patient \(C\).*nested\.pixnet_nested\.fallback"):
        plan_of(tmp_path, rows=HER2ST_LIKE, folds=loso)
    plan = plan_of(tmp_path, rows=HER2ST_LIKE, folds=loso, nested={"pixnet_nested": {
        "candidates": ["pixnet", "pixnet_mse"], "fallback": "pixnet"}})
    assert plan.nested.inner["B4"] == {}
    assert plan.nested.inner["C2"] == {
        "C2~iB": {"train": ["C3", "C4"], "test": ["B4"], "held_out": "B"},
        "C2~iC": {"train": ["B4"], "test": ["C3", "C4"], "held_out": "C"}}
    assert plan.nested.inner_metric_files("pixnet_nested", "B4") == []
    assert "B4: one training patient, fallback pixnet" in plan.describe()
    record = choose(plan.nested.choice_params("pixnet_nested", "B4"), [])
    assert record["chosen"] == "pixnet" and record["how"] == "fallback"
    assert record["note"] == ("fold B4: one training patient (C), no inner split; candidate "
                              "pixnet used by the declared fallback")


def test_the_her2st_layer_plans_the_rule_where_it_can(her2st_dir):
    config = load_config([REPO / "config" / "her2st.yaml", REPO / "config" / "her2st_nested.yaml"],
                         defaults=DEMO)
    plan = validate_config(config, REPO)
    assert {o: sorted(i) for o, i in plan.nested.inner.items()} == {
        "B4": [], "C2": ["C2~iB", "C2~iC"], "C3": ["C3~iB", "C3~iC"], "C4": ["C4~iB", "C4~iC"]}
    assert "results/report/nested_choices.md" in plan.all_targets()


@pytest.mark.parametrize("change,message", [
    ({"candidates": ["pixnet", "pixnet_wide"]}, r"nested\.x\.candidates: 'pixnet_wide' is not "
                                                r"in `models`"),
    ({"candidates": ["pixnet"]}, r"nested\.x\.candidates: at least two distinct"),
    ({"candidates": ["pixnet", "pixnet"]}, r"nested\.x\.candidates: at least two distinct"),
    ({"candidates": ["mean", "pixnet"]}, r"nested\.x\.candidates: 'mean' is a baseline"),
    ({"fallback": "istar"}, r"nested\.x\.fallback: 'istar' is not one of its candidates"),
    ({"metric": "R2"}, r"R2"),
    ({"candidates": ["pixnet", "pixnet_mse"], "extra": 1}, r"extra"),
])
def test_nested_errors_name_the_key(tmp_path, change, message):
    block = {"candidates": ["pixnet", "pixnet_mse"], **change}
    with pytest.raises(Exception, match=message):
        plan_of(tmp_path, nested={"x": block})


def test_the_nested_row_name_must_be_new_and_needs_the_benchmark(tmp_path):
    block = {"candidates": ["pixnet", "pixnet_mse"]}
    for name in ("pixnet_mse", "istar"):
        with pytest.raises(ValueError, match=f"nested.{name}: the name of the reported row"):
            plan_of(tmp_path, nested={name: block})
    with pytest.raises(ValueError, match="nested: the nested choice needs the benchmark"):
        plan_of(tmp_path, nested={"x": block}, benchmark=False)
    assert plan_of(tmp_path, nested={}).nested.report_files() == []


def test_the_nested_rows_reach_the_tables(tmp_path):
    plan = plan_of(tmp_path)
    assert plan.report_metric_files()[-3:] == [
        f"results/metrics/spot/pixnet_nested/{f}/seed0.parquet" for f in ("P1", "P2", "P3")]
    assert {"results/report/nested_choices.md",
            "results/report/nested_choices.csv"} <= set(plan.all_targets())
    assert plan.nested.outer_metric_files("pixnet_nested", "P2", 0) == [
        "results/metrics/spot/pixnet/P2/seed0.parquet",
        "results/metrics/spot/pixnet_mse/P2/seed0.parquet"]


# --------------------------------------------------------------------------- the choice
def write_run(path: Path, model: str, fold: str, seed: int, pcc: list[float],
              samples=("s1",), mse: float = 1.0) -> str:
    """A metric file of the evaluate contract: per-gene pcc (and mse) on each sample and
    pooled; PCC@M over slides is mean(pcc)."""
    rows = [{"task": "spot", "dataset": "d", "model": model, "fold": fold,
             "fold_kind": "cross_patient", "scale_um": 55.0, "gene_set": "top2", "seed": seed,
             "sample": s, "gene": f"g{i}", "metric": m, "value": v}
            for s in (*samples, "pooled") for i, r in enumerate(pcc)
            for m, v in (("pcc", r), ("mse", mse), ("mae", mse))]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return str(path)


def run_choice(tmp_path: Path, monkeypatch, scores: dict, **block) -> tuple[dict, object]:
    """Write each inner run's metrics ({(candidate, inner fold): pcc}) where the plan puts them,
    plus a decoy outer-fold file of pixnet_mse with a huge score, and choose for fold P2."""
    plan = plan_of(tmp_path, nested={"pixnet_nested": {"candidates": ["pixnet", "pixnet_mse"],
                                                       **block}})
    monkeypatch.chdir(tmp_path)
    for c, fold, t in plan.nested.inner_runs("pixnet_nested", "P2"):
        write_run(Path(f"results/metrics/spot/{c}/{fold}/seed{t}.parquet"), c, fold, t,
                  scores[(c, fold)])
    write_run(Path("results/metrics/spot/pixnet_mse/P2/seed0.parquet"), "pixnet_mse", "P2", 0,
              [0.99, 0.99])  # the outer test fold: must not count
    settings = plan.nested.choice_params("pixnet_nested", "P2")
    return choose(settings, plan.nested.inner_metric_files("pixnet_nested", "P2")), plan


def test_choice_takes_the_best_inner_mean_and_ignores_the_outer_fold(tmp_path, monkeypatch):
    scores = {("pixnet", "P2~iP1"): [0.4, 0.2], ("pixnet", "P2~iP3"): [0.2, 0.2],
              ("pixnet_mse", "P2~iP1"): [0.1, 0.1], ("pixnet_mse", "P2~iP3"): [0.3, 0.3]}
    record, plan = run_choice(tmp_path, monkeypatch, scores)
    assert record["chosen"] == "pixnet" and record["how"] == "inner"
    assert record["mean"] == pytest.approx({"pixnet": 0.25, "pixnet_mse": 0.2})
    assert {(s["candidate"], s["inner_fold"]) for s in record["scores"]} == set(scores)
    assert record["outer_train_patients"] == ["P1", "P3"]
    assert "b1" not in json.dumps(record)  # the outer test sample is not even named
    # the decoy outer file handed in place of an inner file is refused, not scored
    paths = plan.nested.inner_metric_files("pixnet_nested", "P2")
    paths[-1] = "results/metrics/spot/pixnet_mse/P2/seed0.parquet"
    with pytest.raises(InputError, match=r"not the run pixnet_mse/P2~iP3/seed0"):
        choose(plan.nested.choice_params("pixnet_nested", "P2"), paths)


def test_choice_ties_go_to_the_first_declared_and_lower_mse_wins(tmp_path, monkeypatch):
    same = {(c, f): [0.3, 0.1] for c in ("pixnet", "pixnet_mse") for f in ("P2~iP1", "P2~iP3")}
    record, _ = run_choice(tmp_path, monkeypatch, same)
    assert record["chosen"] == "pixnet"
    record, _ = run_choice(tmp_path, monkeypatch, same, candidates=["pixnet_mse", "pixnet"])
    assert record["chosen"] == "pixnet_mse"
    assert pick({"a": 0.5, "b": 0.2}, ["a", "b"], higher_is_better=False) == "b"
    assert pick({"a": float("nan"), "b": 0.2}, ["a", "b"], higher_is_better=True) == "b"
    assert pick({"a": float("nan"), "b": float("nan")}, ["a", "b"], True) == "a"


def test_nested_row_and_report(tmp_path, monkeypatch):
    scores = {("pixnet", "P2~iP1"): [0.1, 0.1], ("pixnet", "P2~iP3"): [0.1, 0.1],
              ("pixnet_mse", "P2~iP1"): [0.3, 0.3], ("pixnet_mse", "P2~iP3"): [0.2, 0.2]}
    record, _ = run_choice(tmp_path, monkeypatch, scores)
    assert record["chosen"] == "pixnet_mse"
    outer = {"pixnet": write_run(Path("results/metrics/spot/pixnet/P2/seed0.parquet"),
                                 "pixnet", "P2", 0, [0.5, 0.5]),
             "pixnet_mse": "results/metrics/spot/pixnet_mse/P2/seed0.parquet"}
    row = nested_row(record, outer, "P2", 0)
    assert set(row["model"]) == {"pixnet_nested"}
    assert set(row.loc[row["metric"] == "pcc", "value"]) == {0.99}  # the chosen one's run
    with pytest.raises(ValueError, match="choice of fold P2 given for fold P3"):
        nested_row(record, outer, "P3", 0)
    table = choices_table([record], outer_scores(list(outer.values()), ["PCC@M"]))
    assert table.set_index("candidate")["outer_score"].to_dict() == pytest.approx(
        {"pixnet": 0.5, "pixnet_mse": 0.99})
    assert table.set_index("candidate")["chosen"].to_dict() == {"pixnet": False,
                                                                "pixnet_mse": True}
    md = choices_markdown([record], table)
    assert "| P2 | P1, P3 | pixnet_mse | **chosen** | inner | P2~iP1: 0.3000; P2~iP3: 0.2000" in md


# --------------------------------------------------------------------------- Snakemake
def dry_run_jobs(output: str) -> list[dict]:
    """The jobs a dry run prints: rule, wildcards, inputs."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output)[1:]:
        job = {"rule": block.split(":", 1)[0].split()[-1], "input": [], "wildcards": {}}
        for line in block.splitlines()[1:]:
            key, _, value = line.strip().partition(": ")
            if key == "input":
                job["input"] = value.split(", ")
            elif key == "wildcards":
                job["wildcards"] = dict(w.split("=", 1) for w in value.split(", "))
        jobs.append(job)
    return jobs


@pytest.mark.slow
def test_dry_run_plans_inner_jobs_that_never_read_the_outer_test_sample(tmp_path):
    config = nested_config(tmp_path, models=["pixnet", "pixnet_mse"])
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump(config))
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
                          "--directory", str(tmp_path), "-n", "--configfile", str(path), "--",
                          "results/report/nested_choices.md", "results/report/benchmark.md"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    jobs = dry_run_jobs(out)
    count = lambda rule: sum(j["rule"] == rule for j in jobs)  # noqa: E731
    # 2 candidates x (3 outer + 6 inner folds); one choice per outer fold
    assert (count("train_pixnet"), count("choose_nested"), count("nested_metrics"),
            count("nested_report"), count("evaluate")) == (18, 3, 3, 1, 18)
    test_of = {"P1": {"a1", "a2"}, "P2": {"b1"}, "P3": {"c1"}}
    checked = 0
    for job in jobs:
        fold = job["wildcards"].get("fold", "")
        if INNER_SEP not in fold and job["rule"] != "choose_nested":
            continue
        outer = fold.split(INNER_SEP)[0]
        leaked = [p for p in job["input"] if names_any(p, {*test_of[outer], outer})]
        assert not leaked, (job, leaked)
        checked += 1
    assert checked >= 18 + 3 + 6  # training, choices, gene panels at least
