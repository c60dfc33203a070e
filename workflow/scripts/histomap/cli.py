"""``histomap``: the few verbs a user needs without writing a config.

    histomap apply BUNDLE SLIDE... --out DIR   dense map, pseudo-spots, bins, SpatialData, map.png
    histomap info BUNDLE                       what a bundle is, was trained on and predicts
    histomap validate CONFIG...                the workflow's config and sample-sheet checks
    histomap verify [RESULTS_DIR]              a results folder against its manifest.json

Progress goes to stderr. Exit codes are the workflow's steps' own: 0 done, 1 bad input (one
line naming the file and the problem) or a failed step, 2 a bad command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from histomap import __version__
from histomap.errors import InputError
from histomap.logs import setup_logging

log = logging.getLogger("histomap")


# --------------------------------------------------------------------------- apply
def _apply(args: argparse.Namespace) -> int:
    from histomap.tasks.apply_slide import ApplySettings, apply_to_slide
    from histomap.tasks.bundle import read_bundle
    from histomap.threads import set_threads

    set_threads(args.threads)
    bundle = read_bundle(args.bundle)
    if not bundle.is_dense and args.bin_um:
        args.parser.error(f"bundle {bundle.name!r} is a spot model ({bundle.architecture}): it "
                          "predicts pseudo-spots only; bins (--bin-um) need a dense model")
    tiling = {k: v for k, v in (("tile_px", args.tile_px), ("tile_mpp", args.tile_mpp),
                                ("min_tissue", args.min_tissue)) if v is not None}
    settings = ApplySettings(spot_diameters_um=args.spot_um or [55.0],
                             spot_spacing_um=args.spot_spacing_um,
                             bin_um=args.bin_um if args.bin_um is not None else
                             ([16.0] if bundle.is_dense else []),
                             figure_genes=args.figure_genes, mpp=args.mpp, tiling=tiling,
                             device=args.device)
    for slide in args.slides:
        done = apply_to_slide(bundle, slide, args.out, sample=args.name, settings=settings)
        print(done.folder)
    return 0


# --------------------------------------------------------------------------- info
def bundle_summary(path: str | Path) -> dict:
    """The facts of a bundle a user asks first (``histomap info``)."""
    from histomap.tasks.bundle import read_bundle

    bundle = read_bundle(path)
    meta = bundle.meta
    training = meta.get("training") or {}
    return {
        "bundle": str(bundle.path),
        "name": bundle.name,
        "architecture": bundle.architecture,
        "kind": meta["kind"],
        "genes": len(bundle.genes),
        "first_genes": bundle.genes[:10],
        "input_mpp": meta["input"].get("mpp"),
        "trained_spot_diameters_um": meta["input"].get("spot_diameters_um"),
        "encoder": (meta.get("encoder") or {}).get("name"),
        "normalisation": meta["normalisation"],
        "stain_normalisation": (meta.get("stain") or {}).get("method"),
        "training_samples": training.get("samples"),
        "seed": training.get("seed"),
        "best_epoch": training.get("best_epoch"),
        "weights_sha256": (meta.get("model_file") or {}).get("sha256"),
        "versions": meta.get("versions"),
    }


def _info(args: argparse.Namespace) -> int:
    summary = bundle_summary(args.bundle)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    width = max(map(len, summary))
    for key, value in summary.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key:<{width}}  {shown}")
    return 0


# --------------------------------------------------------------------------- validate
def _validate(args: argparse.Namespace) -> int:
    from histomap.plan import load_config, validate_config

    workdir = Path(args.directory)
    defaults = workdir / "config" / "config.yaml"
    try:
        config = load_config([Path(p) for p in args.configs],
                             defaults=defaults if defaults.is_file() and not args.no_defaults
                             else None)
        plan = validate_config(config, workdir)
    except Exception as exc:  # noqa: BLE001 - the workflow's start-up message, without a traceback
        log.error("invalid: %s", exc)
        return 1
    print(plan.describe())
    return 0


# --------------------------------------------------------------------------- verify
def _verify(args: argparse.Namespace) -> int:
    from histomap.manifest import NAME, verify

    found = verify(args.results, args.manifest, inputs=args.inputs)
    for line in found.lines():
        print(line)
    where = args.manifest or Path(args.results) / NAME
    if found.ok:
        print(f"OK: {found.checked} files match {where}"
              + (f" ({len(found.extra)} files not in it)" if found.extra else ""))
        return 0
    bad = (len(found.changed) + len(found.missing) + len(found.inputs_changed)
           + len(found.inputs_missing))
    print(f"FAILED: {bad} of {found.checked} files differ from {where}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histomap", description="H&E + spatial transcriptomics -> gene-expression maps.")
    parser.add_argument("--version", action="version", version=f"histomap {__version__}")
    parser.add_argument("--log", help="also write the log to this file")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    ap = verbs.add_parser("apply", help="apply a trained bundle to H&E slides",
                          description="Apply a trained bundle (a folder with bundle.json and "
                          "model.pt) to H&E slides: writes DIR/{slide}/ with the dense map "
                          "(dense models), pseudo-spot and bin tables (AnnData), a SpatialData "
                          "store and map.png.")
    ap.add_argument("bundle", help="bundle folder (or its bundle.json)")
    ap.add_argument("slides", nargs="+", metavar="SLIDE",
                    help="H&E image: SVS, NDPI, MRXS, tiled TIFF, or a flat TIFF/PNG/JPEG "
                         "with --mpp")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--name", help="sample name for one SLIDE (default: the file name)")
    ap.add_argument("--mpp", type=float, help="um per pixel of the slide (default: its metadata)")
    ap.add_argument("--spot-um", type=float, action="append",
                    help="pseudo-spot diameter in um (repeatable; default 55)")
    ap.add_argument("--spot-spacing-um", type=float,
                    help="centre-to-centre spacing of pseudo-spots (default: touching discs)")
    ap.add_argument("--bin-um", type=float, action="append",
                    help="square bin side in um (repeatable; default 16 for dense models)")
    ap.add_argument("--figure-genes", type=int, default=4, help="genes drawn in map.png")
    ap.add_argument("--tile-px", type=int, help="tissue tile size in pixels (default 224)")
    ap.add_argument("--tile-mpp", type=float, help="tile resolution in um/px (default 1.0)")
    ap.add_argument("--min-tissue", type=float, help="least tissue fraction of a tile (0.25)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: the package's fixed prediction count)")
    ap.set_defaults(run=_apply)

    info = verbs.add_parser("info", help="describe a bundle")
    info.add_argument("bundle", help="bundle folder (or its bundle.json)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)

    val = verbs.add_parser("validate", help="check a workflow config and its sample sheet",
                           description="Validate config files (layered in order, over "
                           "DIR/config/config.yaml as the Snakefile does) and the sample sheet "
                           "they name, with the workflow's messages.")
    val.add_argument("configs", nargs="+", metavar="CONFIG")
    val.add_argument("--directory", "-d", default=".",
                     help="the workflow's working directory (relative paths start here)")
    val.add_argument("--no-defaults", action="store_true",
                     help="do not layer DIR/config/config.yaml first")
    val.set_defaults(run=_validate)

    ver = verbs.add_parser("verify", help="check a results folder against its manifest",
                           description="Check every file recorded in RESULTS_DIR/manifest.json "
                           "(written at the end of a workflow run) by size and SHA-256: exit 0 "
                           "when all match, 1 naming each changed or missing file. Files the "
                           "manifest lacks are listed, not counted as failures.")
    ver.add_argument("results", nargs="?", default="results", metavar="RESULTS_DIR",
                     help="the results folder (default: results)")
    ver.add_argument("--manifest", help="the manifest (default: RESULTS_DIR/manifest.json)")
    ver.add_argument("--inputs", action="store_true",
                     help="also check the recorded input files (sample files, configs; paths "
                          "as recorded, relative to the workflow's directory)")
    ver.set_defaults(run=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "apply" and args.name and len(args.slides) > 1:
        parser.error("--name names one slide; give one SLIDE with it")
    args.parser = parser
    setup_logging(args.log)
    try:
        return args.run(args)
    except InputError as exc:  # the user's file and the problem, in one line
        log.error("bad input: %s", exc)
        return 1
    except Exception:  # a failed step: the traceback, as the workflow's logs show it
        log.exception("histomap %s failed", args.verb)
        return 1


if __name__ == "__main__":
    sys.exit(main())
