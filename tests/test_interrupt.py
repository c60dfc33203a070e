"""What a cluster's time limit does to a long job (histomap.interrupt): SIGTERM in the middle of
a training, a dense map and an SR prediction, run as real subprocesses through run_step (as the
rule scripts run). Each must exit promptly with 143, leave its progress (last.pt with the
position in the epoch; the partial dense store with its written bands; the partial SR maps),
and the rerun must end with the bytes of an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
import zarr

from histomap import interrupt

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def _run(script: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                          text=True, timeout=TIMEOUT_S, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _run_and_sigterm(script: Path, *args, marker: Path, env: dict | None = None
                     ) -> tuple[int, str, float]:
    """Start ``script``; when it touches ``marker`` (it is in the middle of its work), send
    SIGTERM; return (exit code, stderr, seconds from the signal to the exit)."""
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {}), "MARKER": str(marker)})
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the job ended before it reached the marker:\n{err[-3000:]}")
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, time.monotonic() - sent


def _same_files(a: Path, b: Path) -> None:
    """Two folders (zarr stores) with the same files, byte for byte."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    differ = [str(f) for f in files_a if (a / f).read_bytes() != (b / f).read_bytes()]
    assert not differ, f"files differ: {differ}"


# --------------------------------------------------------------------------- the module
def test_outside_a_deferred_section_a_signal_stops_at_once(tmp_path):
    """A step without a resumable loop (e.g. ingest) stops at the signal, exit 143, and its
    atomic output leaves no partial file."""
    script = _script(tmp_path, "plain", """
        import os, sys, time
        from pathlib import Path
        from histomap.logs import run_step
        from histomap.outputs import atomic_output

        def main():
            with atomic_output(Path(sys.argv[1])) as tmp:
                tmp.write_text("half")
                Path(os.environ["MARKER"]).touch()
                time.sleep(60)

        run_step(None, main)
    """)
    out = tmp_path / "out.txt"
    code, err, seconds = _run_and_sigterm(script, out, marker=tmp_path / "m")
    assert code == 143, err[-2000:]
    assert seconds < 10 and "stopped by SIGTERM" in err
    assert not out.exists() and not list(tmp_path.glob("out.txt*"))


def test_deferred_section_defers_to_the_next_check():
    before = signal.getsignal(signal.SIGTERM)
    reached = []
    with interrupt.handling():
        with pytest.raises(interrupt.Interrupted) as info:
            with interrupt.deferred("work"):
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append(interrupt.requested())  # deferred: still running here
                interrupt.check("work")
                reached.append("after check")
    assert reached == [True]
    assert info.value.exit_code == 143 and "SIGTERM during work" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) is before and not interrupt.requested()


def test_leaving_a_deferred_section_with_a_signal_pending_raises():
    with interrupt.handling(), pytest.raises(interrupt.Interrupted):
        with interrupt.deferred("work"):
            os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("went on after the section")


# --------------------------------------------------------------------------- training
TRAIN = """
    import os, sys, time
    from pathlib import Path
    import numpy as np
    import torch
    from torch import nn
    from histomap.data.spot_patches import SpotDataset
    from histomap.logs import run_step
    from histomap.models import STNet
    from histomap.train import TrainConfig, fit, spot_batch_loss

    out = Path(sys.argv[1])
    slow_after = int(os.environ.get("SLOW_AFTER", "-1"))
    calls = [0]

    def data(n, seed, augment):
        rng = np.random.default_rng(seed)
        patches = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        targets = patches.reshape(n, -1, 3).mean(axis=1).astype(np.float32) / 64.0
        return SpotDataset(patches, targets, augment=augment)

    def batch_to_loss(model, batch, device, loss_fn):
        if model.training:
            calls[0] += 1
            if 0 <= slow_after < calls[0]:
                Path(os.environ["MARKER"]).touch()
                time.sleep(0.5)
        return spot_batch_loss(model, batch, device, loss_fn)

    def main():
        torch.manual_seed(0)
        model = STNet(3, backbone="test_resnet", dropout=0.5)
        fit(model, data(12, 0, True), data(4, 1, False), loss_fn=nn.functional.mse_loss,
            out_dir=out, batch_to_loss=batch_to_loss,
            cfg=TrainConfig(epochs=3, batch_size=4, lr=1e-3, patience=None, seed=7),
            model_meta=dict(model_name="stnet", model_config={}, genes=["a", "b", "c"]))
        print("trained batches", calls[0])

    run_step(None, main)
"""


def _tensors(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj


@pytest.mark.slow
def test_sigterm_in_training_saves_the_batch_and_resumes_exactly(tmp_path):
    script = _script(tmp_path, "train", TRAIN)
    _run(script, tmp_path / "ref")
    # 3 batches per epoch: the signal comes during the 5th batch (epoch 2, batch 2)
    code, err, seconds = _run_and_sigterm(script, tmp_path / "run", marker=tmp_path / "m",
                                          env={"SLOW_AFTER": "4"})
    assert code == 143, err[-3000:]
    assert seconds < 20, f"{seconds:.1f} s from SIGTERM to exit"
    assert "stopped after batch 2 of 3" in err and "stopped by SIGTERM" in err
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["epochs_done"] == 1 and last["in_epoch"]["batches"] == 2
    assert not (tmp_path / "run" / "model.pt").exists()
    assert not (tmp_path / "run" / "writer.lock").exists()

    rerun = _run(script, tmp_path / "run")
    assert "resuming after batch 2 of 3" in rerun.stderr
    assert "trained batches 4" in rerun.stdout  # 1 batch of epoch 2, 3 of epoch 3
    for name in ("model.pt", "best.pt", "last.pt"):
        ref = dict(_tensors(torch.load(tmp_path / "ref" / name, weights_only=True)))
        got = dict(_tensors(torch.load(tmp_path / "run" / name, weights_only=True)))
        assert ref.keys() == got.keys() and ref, name
        differ = [k for k in ref if not torch.equal(ref[k], got[k])]
        assert not differ, f"{name}: {differ[:5]}"
    ref_log = (tmp_path / "ref" / "train_log.csv").read_text().splitlines()
    got_log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    # every column but `seconds` (the epoch's wall time)
    assert [r.split(",")[:4] for r in ref_log] == [r.split(",")[:4] for r in got_log]


# --------------------------------------------------------------------------- dense map
DENSE = """
    import os, sys, time
    from pathlib import Path
    import torch
    import torch.nn.functional as F
    from torch import nn
    from histomap.logs import run_step
    from histomap.tasks.dense_map import predict_dense_map

    slow_after = int(os.environ.get("SLOW_AFTER", "-1"))
    seed = int(os.environ.get("MODEL_SEED", "0"))

    class ConvModel(nn.Module):
        out_stride = 4
        n_genes = 4

        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, 4, 5, padding=2)
            self.tiles = 0

        def forward(self, images):
            self.tiles += images.shape[0]
            if 0 <= slow_after < self.tiles:
                Path(os.environ["MARKER"]).touch()
                time.sleep(0.3)
            return F.avg_pool2d(self.conv(images).abs(), 4)

    def main():
        torch.set_num_threads(1)
        model = ConvModel()
        predict_dense_map(model, sys.argv[1], (37, 21, 300, 250), input_mpp=1.0, tile_px=32,
                          overlap_px=12, out_zarr=sys.argv[2], batch_size=3, band_tile_rows=1,
                          device="cpu")
        print("tiles run", model.tiles)

    run_step(None, main)
"""


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from scipy import ndimage

    from histomap.data.slide import write_pyramid

    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.normal(size=(320, 400, 3)), sigma=(6, 6, 0))
    image = np.clip(128 + 600 * noise, 0, 255).astype(np.uint8)
    return write_pyramid(image, tmp_path_factory.mktemp("slide") / "slide.tif", 1.0)


@pytest.mark.slow
def test_sigterm_in_dense_map_keeps_written_bands_and_resumes_identically(tmp_path, slide):
    script = _script(tmp_path, "dense", DENSE)
    ref = _run(script, slide, tmp_path / "ref" / "dense.zarr")  # the name is in the attrs
    total = int(ref.stdout.split("tiles run")[1])
    out = tmp_path / "run" / "dense.zarr"
    code, err, seconds = _run_and_sigterm(script, slide, out, marker=tmp_path / "m",
                                          env={"SLOW_AFTER": str(total // 2)})
    assert code == 143, err[-3000:]
    assert seconds < 20
    partial = out.with_name("dense.zarr.partial")
    assert not out.exists() and partial.is_dir()
    import json
    state = json.loads((partial / "_resume" / "state.json").read_text())
    assert 0 < state["bands_done"] and not state["complete"]

    rerun = _run(script, slide, out)
    assert "resuming an interrupted map" in rerun.stderr
    tiles = int(rerun.stdout.split("tiles run")[1])
    assert tiles < 0.75 * total, f"the rerun ran {tiles} of {total} tiles"
    assert not partial.exists()
    _same_files(tmp_path / "ref" / "dense.zarr", out)

    # a partial store of another model is not resumed: it is discarded, the map is the new
    # model's own
    other_out = tmp_path / "other" / "dense.zarr"
    code, err, _ = _run_and_sigterm(script, slide, other_out, marker=tmp_path / "m2",
                                    env={"SLOW_AFTER": str(total // 2)})
    assert code == 143
    other = _run(script, slide, other_out, env={"MODEL_SEED": "1"})
    assert "another model, slide or settings" in other.stderr
    assert int(other.stdout.split("tiles run")[1]) == total
    _run(script, slide, tmp_path / "ref1" / "dense.zarr", env={"MODEL_SEED": "1"})
    _same_files(tmp_path / "ref1" / "dense.zarr", other_out)


# --------------------------------------------------------------------------- SR prediction
SR = """
    import os, sys, time
    from pathlib import Path
    import torch
    from histomap.logs import run_step
    from histomap.tasks.superres import prediction

    slow_after = int(os.environ.get("SLOW_AFTER", "-1"))
    real = prediction.predict_chains
    batches = [0]

    def chains(*args, **kwargs):
        batches[0] += 1
        if 0 <= slow_after < batches[0]:
            Path(os.environ["MARKER"]).touch()
            time.sleep(0.5)
        yield from real(*args, **kwargs)

    prediction.predict_chains = chains

    def main():
        torch.set_num_threads(1)
        prediction.predict_sr(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4],
                              sampler="respaced", steps=3, n_samples=2, batch_size=2,
                              device="cpu", seed=1, sample="S1")
        print("batches run", batches[0])

    run_step(None, main)
"""


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory):
    from histomap.data.srpairs.points import build_sr_pairs
    from histomap.data.synthetic import simulate_sample
    from histomap.tasks.superres.training import train_sr

    root = tmp_path_factory.mktemp("sr")
    simulate_sample(root / "sample", seed=12, size_um=(400.0, 400.0), n_genes=40)
    cells = ad.read_h5ad(root / "sample" / "cells.h5ad")
    totals = np.asarray(cells.X.sum(axis=0)).ravel()
    genes = [str(g) for g in cells.var_names[np.argsort(-totals)[:4]]]
    pairs = root / "pairs.zarr"
    build_sr_pairs(cells, root / "sample" / "he.tif", genes, pairs, patch_um=160, lr_um=20,
                   scale=4, stride_um=80, min_tissue=0.2, normalisation="minmax",
                   image_mpp=5.0, edge="ceil")
    cfg = dict(base_channels=8, channel_mult=[1, 2], tissue_channels=8, cell_channels=8,
               attn_channels=8, fusion_channels=8, gene_node_channels=4, cell_grid=4,
               cell_patch_px=8, cam_region=3)
    torch.set_num_threads(1)
    train_sr("diffst", [pairs], model_cfg=cfg,
             train_cfg=dict(epochs=1, batch_size=4, lr=2e-3, amp=False, device="cpu"),
             validation={"fraction": 0.2, "block_um": 80}, seed=0, out_model=root / "model.pt",
             out_log=root / "log.csv", checkpoint_dir=root / "ckpt", diffusion={"T": 50})
    return root / "model.pt", pairs


@pytest.mark.slow
def test_sigterm_in_sr_prediction_keeps_written_patches_and_resumes_identically(tmp_path,
                                                                               sr_model):
    model, pairs = sr_model
    script = _script(tmp_path, "sr", SR)
    ref = _run(script, model, pairs, tmp_path / "ref.zarr", tmp_path / "ref.h5ad")
    total = int(ref.stdout.split("batches run")[1])
    assert total >= 3
    maps, bins = tmp_path / "run" / "maps.zarr", tmp_path / "run" / "bins.h5ad"
    code, err, seconds = _run_and_sigterm(script, model, pairs, maps, bins,
                                          marker=tmp_path / "m", env={"SLOW_AFTER": "1"})
    assert code == 143, err[-3000:]
    assert seconds < 30
    assert not maps.exists() and not bins.exists()
    assert (maps.with_name("maps.zarr.partial") / "_resume" / "state.json").is_file()

    rerun = _run(script, model, pairs, maps, bins)
    assert "resuming an interrupted prediction" in rerun.stderr
    assert int(rerun.stdout.split("batches run")[1]) < total
    a, b = zarr.open_group(tmp_path / "ref.zarr", mode="r"), zarr.open_group(maps, mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        assert np.array_equal(a[name][...], b[name][...]), name
    ref_attrs = {k: v for k, v in a.attrs.items() if k != "seconds"}
    assert ref_attrs == {k: v for k, v in b.attrs.items() if k != "seconds"}
    x, y = ad.read_h5ad(tmp_path / "ref.h5ad"), ad.read_h5ad(bins)
    assert x.obs.equals(y.obs) and np.array_equal(x.X, y.X)
    assert np.array_equal(x.obsm["spatial"], y.obsm["spatial"])
    assert x.layers.keys() == y.layers.keys()
    for key in x.layers:
        assert np.array_equal(x.layers[key], y.layers[key]), key
