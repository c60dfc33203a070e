"""Every benchmark command the READMEs record plans: its config layers validate against the
schema, every model and variant they name resolves, and Snakemake builds the job graph (a dry
run). A layer file that names a missing variant or a key the schema does not know fails here,
not an hour into a benchmark."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HER2ST = REPO.parent / "shared" / "data" / "her2st"

# (config layers, target) as written in docs/benchmarks.md, benchmarks/superres/README.md and the
# configs' header comments
COMMANDS = [
    (["config/her2st.yaml"], "results/report/benchmark.md"),
    (["config/her2st.yaml"], "results/report/superres.md"),
    (["config/her2st.yaml", "config/her2st_full.yaml"], "results/report/benchmark.md"),
    (["config/her2st.yaml", "config/her2st_pixnet_ablation.yaml"],
     "results/report/benchmark.md"),
    (["config/her2st.yaml", "config/her2st_pixnet_ablation.yaml",
      "config/her2st_pixnet_mse_3seeds.yaml"], "results/report/benchmark.md"),
    (["config/her2st.yaml", "config/her2st_nested.yaml"], "results/report/nested_choices.md"),
    (["config/her2st.yaml", "config/her2st_stain.yaml"], "results/report/nested_choices.md"),
    (["config/her2st.yaml", "config/her2st_stain.yaml", "config/her2st_b4.yaml"],
     "results/report/benchmark.md"),
    (["config/her2st.yaml", "config/her2st_sr_data.yaml"], "results/report/superres.md"),
    (["config/cross_scale.yaml"], None),
    (["config/cross_scale.yaml", "config/pixnet_ablation.yaml"], None),
    (["config/cohort_synthetic.yaml"], "results/report/benchmark.md"),
    (["config/cohort_synthetic.yaml", "config/cohort_nested.yaml"],
     "results/report/nested_choices.md"),
    (["benchmarks/superres/synthetic_cpu.yaml"], "results/report/superres.md"),
    (["benchmarks/superres/synthetic_cpu.yaml", "benchmarks/superres/synthetic_cpu_seed1.yaml"],
     "results/report/superres.md"),
    (["benchmarks/superres/synthetic.yaml"], "results/report/superres.md"),
]


IDS = [" + ".join(Path(f).stem for f in c[0]) + (" sr" if c[1] and "superres" in c[1] else "")
       for c in COMMANDS]


@pytest.mark.parametrize("layers,target", COMMANDS, ids=IDS)
def test_recorded_command_validates_with_the_package(layers, target):
    """The same layers through histomap.plan alone (what `histomap validate` runs, no
    Snakemake): the config validates, the plan resolves, and the target is one it lists."""
    from histomap.plan import load_config, validate_config

    config = load_config([REPO / f for f in layers], defaults=REPO / "config" / "config.yaml")
    if config.get("data_dir") == "../shared/data/her2st" and not HER2ST.is_dir():
        pytest.skip(f"HER2ST sections not found at {HER2ST} (the shared data folder)")
    plan = validate_config(config, REPO)
    targets = plan.all_targets()
    assert target is None or target in targets
    assert all(plan.models.family(m) in ("mean", "stnet", "histogene", "probe", "pixnet",
                                         "istar") for m in plan.models.names)


@pytest.mark.slow
@pytest.mark.parametrize("layers,target", COMMANDS, ids=IDS)
def test_recorded_command_plans(tmp_path, layers, target):
    configs = [REPO / f for f in layers]
    data_dir = None
    for cfg in configs:
        data_dir = yaml.safe_load(cfg.read_text()).get("data_dir", data_dir)
    if data_dir == "../shared/data/her2st":
        if not HER2ST.is_dir():
            pytest.skip(f"HER2ST sections not found at {HER2ST} (the shared data folder)")
        extra = tmp_path / "data_dir.yaml"
        extra.write_text(yaml.safe_dump({"data_dir": str(HER2ST)}))
        configs.append(extra)
    # relative paths in the configs (sample sheets) are read from the working directory
    for name in ("config", "benchmarks"):
        (tmp_path / name).symlink_to(REPO / name)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
           str(tmp_path), "-n", "--cores", "2", "--configfile", *map(str, configs)]
    if target:
        cmd += ["--", target]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    assert "Job stats" in res.stdout + res.stderr
