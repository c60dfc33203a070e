"""Epoch time of a frozen-encoder PixNet (and iStar-style MLP) with and without the feature cache.

One HER2ST section (its spots as training windows, one window per spot): PixNet with the frozen
packaged EfficientNet-Lite0 trains one epoch (a) running the frozen encoder on every image window
(``WindowDataset``) and (b) from ``encode_slide``'s cached pyramid (``CachedWindowDataset``),
same windows, batches and decoder; plus the one-off cost of ``encode_slide``. Also the time of a
single training step of each demo model (config/config.yaml settings) for the demo estimate.

    .venv/bin/python benchmarks/feature_cache_speed.py --data ../shared/data/her2st --section B4
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np


from histomap.compat import torch  # noqa: E402
from histomap.data.io import legacy_st  # noqa: E402
from histomap.data.preprocess import normalise_spots, select_genes  # noqa: E402
from histomap.data.slide import prepare_slide  # noqa: E402
from histomap.models import build_model  # noqa: E402
from histomap.tasks.dense import slide_spots  # noqa: E402
from histomap.tasks.dense_windows import WindowDataset, pixnet_batch_loss  # noqa: E402
from histomap.tasks.feature_cache import (  # noqa: E402
    CachedWindowDataset,
    FeaturePyramid,
    cached_dense_batch_loss,
    encode_slide,
)
from histomap.train import TrainConfig, fit  # noqa: E402

ENCODER = "efficientnet_lite0_imagenet"
log = logging.getLogger("feature_cache_speed")


def epoch_seconds(model, dataset, batch_loss, out_dir, batch_size):
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3, patience=None, device="cpu",
                      amp=False)
    t0 = time.process_time()  # CPU seconds of this process: the machine is shared
    fit(model, dataset, None, loss_fn=None, out_dir=out_dir, cfg=cfg, batch_to_loss=batch_loss)
    return time.process_time() - t0


def step_seconds(model, batch_fn, repeats: int = 3) -> float:
    """Median CPU seconds of one optimiser step (forward, backward, AdamW update)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    times = []
    for _ in range(repeats + 1):  # the first step warms up
        t0 = time.process_time()
        opt.zero_grad()
        batch_fn(model).backward()
        opt.step()
        times.append(time.process_time() - t0)
    return float(np.median(times[1:]))


def demo_steps(n_genes: int = 50) -> dict:
    """One training step of each demo model at config/config.yaml's settings (random inputs of
    the right shapes): the old encoders against the pretrained one, cached and not."""
    mse = torch.nn.functional.mse_loss
    out = {}
    crops = torch.randn(32, 3, 110, 110)
    y = torch.randn(32, n_genes)
    for name in ("resnet18", ENCODER):
        for frozen in (False, True):
            model = build_model("stnet", n_genes, backbone=name, freeze_backbone=frozen)
            out[f"stnet {name}{' frozen' if frozen else ''}, batch 32"] = step_seconds(
                model, lambda m: mse(m(crops), y))
    feats = torch.randn(32, 1280)
    model = build_model("stnet", n_genes, backbone=ENCODER, freeze_backbone=True)
    out[f"stnet {ENCODER} head on cached features, batch 32"] = step_seconds(
        model, lambda m: mse(m.head_from_features(feats), y))
    windows = torch.rand(8, 3, 160, 160)
    target = torch.randn(8, n_genes, 40, 40)
    dec = [16, 32, 64, 128, 128]
    for label, cfg in (("pixnet resnet10t fine-tuned (old demo)",
                        {"encoder": "resnet10t", "freeze_encoder": False}),
                       (f"pixnet {ENCODER} fine-tuned", {"encoder": ENCODER,
                                                         "freeze_encoder": False}),
                       (f"pixnet {ENCODER} frozen, image windows",
                        {"encoder": ENCODER, "freeze_encoder": True})):
        model = build_model("pixnet", n_genes, decoder_channels=dec, out_stride=4, **cfg)
        out[label + ", batch 8"] = step_seconds(model, lambda m: mse(m(windows), target))
    model = build_model("pixnet", n_genes, decoder_channels=dec, out_stride=4, encoder=ENCODER,
                        freeze_encoder=True)
    with torch.no_grad():
        levels = model.encoder(model.image_norm(windows))
    out[f"pixnet {ENCODER} frozen, cached features, batch 8"] = step_seconds(
        model, lambda m: mse(m.decode_features(levels, (40, 40)), target))
    model = build_model("istar", n_genes, features="filterbank", out_stride=4, hidden=[128, 128])
    out["istar filterbank (old demo), batch 8"] = step_seconds(
        model, lambda m: mse(m(windows), target))
    model = build_model("istar", n_genes, features="encoder", encoder=ENCODER, out_stride=4,
                        hidden=[128, 128])
    out[f"istar {ENCODER} features, image windows, batch 8"] = step_seconds(
        model, lambda m: mse(m(windows), target))
    with torch.no_grad():
        levels = model.features.encoder(model.features.image_norm(windows))
    out[f"istar {ENCODER} features, cached (demo), batch 8"] = step_seconds(
        model, lambda m: mse(m.decode_features(levels, (40, 40)), target))
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/her2st")
    ap.add_argument("--section", default="B4")
    ap.add_argument("--mpp", type=float, default=1.0, help="input um/px (demo: 1.0)")
    ap.add_argument("--window-px", type=int, default=160, help="demo: 160")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/feature_cache")
    ap.add_argument("--demo-steps-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = demo_steps()
    print(json.dumps(steps, indent=1), flush=True)
    (out / "demo_steps.json").write_text(json.dumps({"threads": args.threads,
                                                     "cpu_seconds_per_step": steps}, indent=1))
    if args.demo_steps_only:
        return
    work = Path(tempfile.mkdtemp(prefix="cache_speed_"))
    sample = legacy_st.read(args.section, Path(args.data) / args.section)
    slide = work / "slide.tif"
    prepare_slide(sample.image_path, slide, sample.mpp)
    st = normalise_spots(sample.spots, min_counts=100, min_genes=20)
    st.uns["histomap"] = {**st.uns["histomap"], "image": str(slide)}
    st_path = work / f"{args.section}.h5ad"
    st.write_h5ad(st_path)
    genes = select_genes({args.section: st}, n_genes=50)
    spots, _ = slide_spots(st_path, slide, genes)

    t0 = time.process_time()
    cache = encode_slide(slide, st_path, work / "features.zarr", encoder=ENCODER, mpp=args.mpp,
                         crop_um=110)
    encode_s = time.process_time() - t0
    window = {"window_px": args.window_px, "input_mpp": args.mpp, "out_stride": 4}
    results = {"timing": "CPU seconds of the process (time.process_time), 1 thread",
               "section": args.section, "spots": len(spots.centres_px), "mpp": args.mpp,
               "window_px": args.window_px, "batch_size": args.batch_size,
               "threads": args.threads, "encode_slide_s": round(encode_s, 1)}
    for name, cfg in (("pixnet", {"encoder": ENCODER, "freeze_encoder": True, "out_stride": 4,
                                  "decoder_channels": [16, 32, 64, 128, 128]}),
                      ("istar", {"features": "encoder", "encoder": ENCODER, "out_stride": 4,
                                 "hidden": [128, 128]})):
        plain = WindowDataset([spots], augment=True, **window)
        cached = CachedWindowDataset([spots], [FeaturePyramid(cache)], augment=True, **window)
        times = {}
        for label, ds, loss in (("image windows", plain, pixnet_batch_loss),
                                ("cached features", cached, cached_dense_batch_loss)):
            torch.manual_seed(0)
            model = build_model(name, len(genes), **cfg)
            times[label] = epoch_seconds(model, ds, loss, work / f"{name}_{len(times)}",
                                         args.batch_size)
        results[name] = {"windows": len(plain), **{k: round(v, 2) for k, v in times.items()},
                         "speed_up": round(times["image windows"] / times["cached features"],
                                           1)}
        print(name, results[name], flush=True)
    (out / f"speed_{args.section}_{args.mpp:g}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
