"""How far apart sections lie in the frozen encoder's features, level by level (input side only).

For every section of a finished run, each encoder level of its feature cache (``encode_slide``) is
averaged over every spot's disc (area-weighted, as spot predictions are read out of a dense map),
and the probe's pooled crop features are taken as they are. Between two sections A and B, a level's shift is the
standardised mean difference averaged over its channels, mean_c |mu_A - mu_B| / sqrt((var_A +
var_B) / 2) over the spots of each. The table gives it for pairs of sections of different
patients and of the same patient, and their ratio: a level whose ratio is high separates the
patients more than it separates a patient's serial sections. No expression is read.

    python benchmarks/feature_shift.py --results results --samples config/samples_her2st.tsv
        --out-dir benchmarks/results/her2st
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from histomap.data.sample import geometry  # noqa: E402
from histomap.tasks.dense_map import DenseMap, spots_from_dense  # noqa: E402
from histomap.tasks.feature_cache import FeaturePyramid  # noqa: E402


def spot_level_means(cache: FeaturePyramid, centres_px: np.ndarray, slide_mpp: float,
                     diameter_um: float | np.ndarray, square: bool = False) -> list[np.ndarray]:
    """Per level, (n_spots, C) area-weighted means of the level's map over each spot's disc (or
    square) at level-0 slide pixels ``centres_px``: each level is read as a dense map and the
    spots out of it by :func:`histomap.tasks.dense_map.spots_from_dense`, as spot predictions
    are read out of a model's map."""
    origin = tuple(float(o) * cache.mpp / slide_mpp for o in cache.origin)  # level-0 px
    out = []
    for arr, stride in zip(cache.levels, cache.strides):
        level = DenseMap(path=cache.path, dense=arr, mask=np.ones(arr.shape[1:], dtype=bool),
                         genes=[str(c) for c in range(arr.shape[0])], mpp=cache.mpp * stride,
                         origin_px=origin, slide_mpp=slide_mpp, attrs={})
        values = spots_from_dense(level, centres_px, diameter_um, square=square)
        if np.isnan(values).any():
            raise ValueError(f"{cache.path}: {int(np.isnan(values[:, 0]).sum())} spots lie "
                             f"outside the cached stride-{stride} level")
        out.append(values)
    return out


def shift(a: np.ndarray, b: np.ndarray) -> float:
    """Standardised mean difference of two (n, C) samples, averaged over the C channels
    (channels constant in both are left out)."""
    va, vb = a.var(axis=0, ddof=1), b.var(axis=0, ddof=1)
    pooled = np.sqrt((va + vb) / 2)
    keep = pooled > 0
    return float(np.mean(np.abs(a.mean(0) - b.mean(0))[keep] / pooled[keep]))


def shift_table(features: dict[str, list[np.ndarray]], patients: dict[str, str],
                names: list[str]) -> pd.DataFrame:
    """Per feature set (``names``), mean shift over pairs of sections of different patients and
    over pairs of the same patient, and their ratio."""
    rows = []
    for k, name in enumerate(names):
        cross, within = [], []
        for a, b in itertools.combinations(sorted(features), 2):
            d = shift(features[a][k], features[b][k])
            (within if patients[a] == patients[b] else cross).append(d)
        rows.append({"features": name, "between_patients": np.mean(cross) if cross else np.nan,
                     "within_patient": np.mean(within) if within else np.nan})
    t = pd.DataFrame(rows).set_index("features")
    t["ratio"] = t.between_patients / t.within_patient
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--samples", type=Path, required=True, help="the run's sample sheet")
    ap.add_argument("--encoder", default="efficientnet_lite0_imagenet")
    ap.add_argument("--mpp", default="1")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    sheet = pd.read_csv(args.samples, sep="\t", dtype=str).set_index("sample")
    cache_dir = args.results / "features" / args.encoder / args.mpp
    features, names = {}, None
    for sample in sheet.index:
        zpath, st = cache_dir / f"{sample}.zarr", args.results / "st" / f"{sample}.h5ad"
        if not zpath.is_dir() or not st.is_file():
            print(f"error: {zpath} or {st} not found: run the benchmark first", file=sys.stderr)
            return 2
        cache, spots = FeaturePyramid(zpath), ad.read_h5ad(st)
        geo = geometry(spots)
        levels = spot_level_means(cache, np.asarray(spots.obsm["spatial"], dtype=np.float64),
                                  float(geo["mpp"]), spots.obs["diameter_um"].to_numpy(float),
                                  square=geo.get("spot_shape") == "square")
        features[sample] = levels + [cache.spot_features(list(spots.obs_names))]
        names = [f"level {i} (stride {s}, {a.shape[1]} ch)"
                 for i, (s, a) in enumerate(zip(cache.strides, levels))] + [
                     f"pooled crop ({features[sample][-1].shape[1]} ch, the probe's input)"]
    patients = sheet["patient"].to_dict()
    if len(set(patients.values())) < 2:
        print("error: the sample sheet has one patient: nothing to compare", file=sys.stderr)
        return 2
    t = shift_table(features, patients, names)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t.to_csv(args.out_dir / "feature_shift.csv")
    lines = ["# Section-to-section shift of the frozen encoder's features", "",
             (__doc__ or "").split("\n\n")[0].replace("\n", " "), "",
             "| features | between patients | within a patient | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r.between_patients:.3f} | {r.within_patient:.3f} | {r.ratio:.2f} |"
              for n, r in t.iterrows()]
    command = (f"python benchmarks/feature_shift.py --results {args.results} --samples "
               f"{args.samples} --out-dir {args.out_dir}")
    lines += ["", f"`{command}`", ""]
    (args.out_dir / "feature_shift.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
