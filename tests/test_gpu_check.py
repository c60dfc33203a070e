"""benchmarks/gpu_check.py at its CPU smoke sizes (--quick): every stage of the GPU check runs
through the same functions as on the GPU, and the report has the rows, units and command that
docs/gpu.md promises. Its numbers measure nothing."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_writes_every_stage(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as `python benchmarks/gpu_check.py`
    import gpu_check

    out = tmp_path / "out"
    table = gpu_check.main(["--quick", "--device", "cpu", "--out-dir", str(out),
                            "--work-dir", str(tmp_path / "work")])
    csv = pd.read_csv(out / "gpu_check.csv")
    assert list(csv["stage"]) == ["pixnet feature cache", "pixnet_train", "diffst_train",
                                  "diffst_sample", "dense_map"]
    assert dict(zip(csv["stage"], csv["unit"]))["dense_map"] == "mm^2 per s"
    assert all(math.isfinite(v) and v > 0 for v in csv["value"])
    assert csv["device"].str.startswith("CPU").all()
    md = (out / "gpu_check.md").read_text()
    assert "benchmarks/gpu_check.py --quick" in md and "not a measurement" in md
    assert len(table) == len(csv)
