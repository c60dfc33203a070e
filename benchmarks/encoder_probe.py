"""Linear probe of encoder variants on HER2ST spots: which timm variant carries the packaged
EfficientNet-Lite0 ImageNet weights best, and do they beat the same network at random weights?

For every variant: each spot's crop (``--crop-um`` at ``--mpp``) -> the encoder's globally pooled
features; leave one section out; genes: top ``--n-genes`` mean-expressed genes of the training
sections; ridge regression (``histomap.models.probe``) with the penalty chosen on spatial
validation blocks of the training sections; scored on the held-out section (signed per-gene PCC,
PCC@M = mean, PCC@S = median; MSE). Nothing of the test section enters a choice.

    .venv/bin/python benchmarks/encoder_probe.py --data ../shared/data/her2st \
        --out benchmarks/results/encoder_probe
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


from histomap.compat import torch  # noqa: E402
from histomap.data.io import legacy_st  # noqa: E402
from histomap.data.preprocess import expression_matrix, normalise_spots, select_genes  # noqa: E402
from histomap.evaluation.folds import validation_split  # noqa: E402
from histomap.evaluation.metrics import pearson_per_gene  # noqa: E402
from histomap.models.encoders import PooledEncoder  # noqa: E402
from histomap.models.probe import ridge_fit, ridge_predict, select_ridge  # noqa: E402

SECTIONS = ("B4", "C2", "C3", "C4")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# name: (encoder, random_init, colour statistics)
VARIANTS = {
    "tf_efficientnet_lite0 (TF 'same' padding), pretrained, input 0.5/0.5 (TF-Lite)":
        ("efficientnet_lite0_imagenet", False, INCEPTION),
    "tf_efficientnet_lite0 (TF 'same' padding), pretrained, input ImageNet mean/std":
        ("efficientnet_lite0_imagenet", False, IMAGENET),
    "efficientnet_lite0 (symmetric padding), pretrained, input 0.5/0.5 (TF-Lite)":
        ("efficientnet_lite0_imagenet_sympad", False, INCEPTION),
    "efficientnet_lite0 (symmetric padding), pretrained, input ImageNet mean/std":
        ("efficientnet_lite0_imagenet_sympad", False, IMAGENET),
    "tf_efficientnet_lite0, random weights (control), input 0.5/0.5":
        ("efficientnet_lite0_imagenet", True, INCEPTION),
    "tf_efficientnet_lite0, random weights (control), input ImageNet mean/std":
        ("efficientnet_lite0_imagenet", True, IMAGENET),
}
log = logging.getLogger("encoder_probe")


def section_crops(sample, crop_um: float, mpp: float) -> np.ndarray:
    """(n, s, s, 3) uint8 crops centred on the spots, resized to s = crop_um / mpp."""
    side = int(round(crop_um / mpp))
    half0 = crop_um / sample.mpp / 2.0
    image = Image.open(sample.image_path).convert("RGB")
    crops = np.empty((sample.spots.n_obs, side, side, 3), np.uint8)
    for i, (x, y) in enumerate(np.asarray(sample.spots.obsm["spatial"])):
        box = (x - half0, y - half0, x + half0, y + half0)
        crops[i] = np.asarray(image.resize((side, side), Image.BILINEAR, box=box))
    return crops


@torch.no_grad()
def pooled_features(encoder: PooledEncoder, crops: np.ndarray, stats, batch: int = 32
                    ) -> np.ndarray:
    mean = torch.tensor(stats[0]).view(1, 3, 1, 1)
    std = torch.tensor(stats[1]).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(crops), batch):
        x = torch.from_numpy(crops[i:i + batch]).permute(0, 3, 1, 2).float() / 255.0
        out.append(encoder.backbone((x - mean) / std).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/her2st")
    ap.add_argument("--out", default="benchmarks/results/encoder_probe")
    ap.add_argument("--crop-um", type=float, default=112.0)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--n-genes", type=int, default=250)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--block-um", type=float, default=800.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    samples = {}
    for name in SECTIONS:
        raw = legacy_st.read(name, data / name)
        samples[name] = (raw, normalise_spots(raw.spots, min_counts=100, min_genes=20))
    crops = {}
    for name, (raw, st) in samples.items():
        raw.spots = raw.spots[st.obs_names]
        crops[name] = section_crops(raw, args.crop_um, args.mpp)
        log.info("%s: %d crops of %s px", name, len(crops[name]), crops[name].shape[1:3])

    rows = []
    for label, (encoder_name, random_init, stats) in VARIANTS.items():
        encoder = PooledEncoder(encoder_name, random_init=random_init).eval()
        t0 = time.time()
        feats = {n: pooled_features(encoder, c, stats) for n, c in crops.items()}
        seconds = time.time() - t0
        for test in SECTIONS:
            train = [s for s in SECTIONS if s != test]
            genes = select_genes({s: samples[s][1] for s in train}, method="top_mean",
                                 n_genes=args.n_genes)
            tr_x, tr_y, va_x, va_y = [], [], [], []
            for i, s in enumerate(train):
                st = samples[s][1]
                y = expression_matrix(st, genes)
                xy = np.asarray(st.obsm["spatial"])
                val = validation_split(xy, fraction=args.val_fraction,
                                       block_px=args.block_um / samples[s][0].mpp,
                                       seed=args.seed + i)
                tr_x.append(feats[s][~val]), tr_y.append(y[~val])
                va_x.append(feats[s][val]), va_y.append(y[val])
            tr_x, tr_y = np.concatenate(tr_x), np.concatenate(tr_y)
            va_x, va_y = np.concatenate(va_x), np.concatenate(va_y)
            alpha, grid = select_ridge(tr_x, tr_y, va_x, va_y)
            val_mse = min(r["val_mse"] for r in grid)
            all_x, all_y = np.concatenate([tr_x, va_x]), np.concatenate([tr_y, va_y])
            fitted = ridge_fit(all_x, all_y, alpha * len(all_x))
            truth = expression_matrix(samples[test][1], genes)
            pred = ridge_predict(feats[test], *fitted)
            r = pearson_per_gene(truth, pred)
            r = np.where(np.isnan(r), 0.0, r)  # constant prediction or truth: 0
            rows.append({"variant": label, "fold": test, "alpha": alpha, "val_mse": val_mse,
                         "pcc_m": float(r.mean()), "pcc_s": float(np.median(r)),
                         "mse": float(np.mean((truth - pred) ** 2)),
                         "features": feats[test].shape[1], "encode_s": round(seconds, 1)})
            log.info("%s | %s: alpha %g PCC@M %.4f", label, test, alpha, rows[-1]["pcc_m"])
    table = pd.DataFrame(rows)
    table.to_csv(out / "probe.csv", index=False)
    wide = table.pivot(index="variant", columns="fold", values="pcc_m")[list(SECTIONS)]
    wide["mean PCC@M"] = wide.mean(axis=1)
    wide["mean PCC@S"] = table.groupby("variant")["pcc_s"].mean()
    wide["mean MSE"] = table.groupby("variant")["mse"].mean()
    # the selection criterion that sees no test section: validation MSE on training blocks
    wide["mean validation MSE"] = table.groupby("variant")["val_mse"].mean()
    wide = wide.loc[list(VARIANTS)]
    with open(out / "probe.md", "w") as fh:
        fh.write(f"Linear probe (ridge, penalty on training validation blocks) on pooled "
                 f"encoder features of {args.crop_um:g} um crops at {args.mpp:g} um/px; "
                 f"HER2ST leave one section out, top-{args.n_genes} genes of the training "
                 f"sections. PCC@M per held-out section; the last column is the ridge's "
                 f"validation MSE on spatial blocks of the training sections (no test data):"
                 f"\n\n")
        fh.write(wide.to_markdown(floatfmt=".4f") + "\n")
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    print(wide.to_string(float_format="%.4f"))


if __name__ == "__main__":
    main()
