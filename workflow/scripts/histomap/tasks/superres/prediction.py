"""Predicting the HR maps of SR pairs: the predict_diffst / predict_sr_baseline / apply_sr rules.

Arrow: SR model + pairs -> **HR maps** (maps zarr, format
:data:`histomap.data.srmaps.MAPS_FORMAT`) and the **HR-bin AnnData**, both written atomically:
both appear only when both are complete.

Resumable (:mod:`histomap.interrupt`): the maps are written patch by patch into
``maps.zarr.partial``; after each batch ``_resume/state.json`` in it records the batches done and
the sampling generator's state. A SIGTERM stops at the next batch with that record kept; the
rerun with the same model, pairs and sampling settings (the record's key) predicts the remaining
patches only, rebuilds the done patches' HR bins from their written maps, and ends with the
maps and bins of an uninterrupted run. Any other failure leaves nothing.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import zarr

from histomap.data.scanpy_spatial import add_scanpy_spatial
from histomap.data.srmaps import MAPS_FORMAT
from histomap.data.srpairs.mass import lr_counts_of, prediction_normaliser, project_mass
from histomap.data.srpairs.normalisation import pairs_denormaliser, prediction_denormaliser
from histomap.data.srpairs.store import has_truth, read_sr_pairs
from histomap.errors import InputError
from histomap.interrupt import check, deferred, requested, resumable_output
from histomap.logs import Progress
from histomap.outputs import atomic_output, remove_path, write_text_atomic
from histomap.tasks.superres.bin_centres import hr_pixel_centres
from histomap.tasks.superres.methods import is_diffusion
from histomap.tasks.superres.model_file import load_sr_model
from histomap.tasks.superres.sampling import (
    Welford,
    meta_diffusion,
    model_dataset,
    predict_chains,
    sampling_modes,
)

log = logging.getLogger(__name__)


# the maps as sampled, kept beside the mass-projected ones (predict_sr(mass_projection=True))
RAW_MAPS = ("pred_raw", "pred_counts_raw")
# pair attrs copied into the maps' attrs and uns["superres"]
GEOMETRY_KEYS = ("genes", "scale", "lr_um", "hr_um", "hr_um_row", "patch_um", "edge",
                 "normalisation", "source", "slide", "slide_mpp", "image_mpp", "hr_shape",
                 "lr_shape", "hr_target_sum")


def _check_pairs_fit_model(pairs_zarr: str | Path, attrs: Mapping, meta: Mapping,
                           model_path: str | Path) -> None:
    """Raise an input error unless the pairs have the model's genes, factor, HR patch shape
    and normalisation."""
    genes = list(attrs["genes"])
    if genes != list(meta["genes"]):
        raise InputError(pairs_zarr, f"genes differ from those the model {model_path} was "
                                     f"trained on ({len(genes)} vs {len(meta['genes'])})")
    for key in ("scale", "hr_shape", "normalisation"):
        if attrs.get(key) != meta["pairs"].get(key):
            raise InputError(pairs_zarr, f"{key} {attrs.get(key)!r} differs from the model's "
                                         f"training pairs ({meta['pairs'].get(key)!r})")


def _prediction_info(model, meta: Mapping, *, model_path, pairs_zarr, sample, sampler, steps,
                     n_samples, eta, seed, device, batched: bool, amp_type) -> dict[str, Any]:
    """How the maps were predicted (maps attrs, ``uns["superres"]``, the return value)."""
    from histomap.compat import torch

    diffusion = is_diffusion(meta["method"])
    return {"method": meta["method"], "variant": meta.get("variant", meta["method"]),
            "model": str(model_path), "pairs": str(pairs_zarr), "sample": sample,
            "sampler": sampler if diffusion else None,
            "steps": (steps if sampler != "ddpm" else int(meta["diffusion"]["T"]))
            if diffusion else None, "n_samples": int(n_samples) if diffusion else 1,
            "eta": float(eta) if diffusion else None, "seed": int(seed),
            "target_sum": meta["pairs"].get("target_sum"),
            "uses_lr_map": bool(getattr(model, "uses_lr_map", True)),
            "device": str(device), "batch_chains": bool(batched and diffusion),
            "autocast": None if amp_type is None else str(amp_type).removeprefix("torch."),
            "threads": int(torch.get_num_threads())}


def _create_maps(root: zarr.Group, arrays: Mapping, attrs: Mapping, diffusion: bool,
                 projected: bool = False) -> dict[str, zarr.Array]:
    """The per-patch map arrays of the maps zarr (written as patches are predicted), and the
    pairs' mask and placement arrays copied. ``projected``: ``pred``/``pred_counts`` hold the
    mass-projected maps and ``pred_raw``/``pred_counts_raw`` the maps as sampled."""
    n, g = int(arrays["lr"].shape[0]), len(attrs["genes"])
    h, w = (int(v) for v in attrs["hr_shape"])
    names = ["pred", "pred_counts"] + (["pred_std", "pred_std_counts"] if diffusion else []) \
        + (list(RAW_MAPS) if projected else [])
    maps = {name: root.create_array(name, shape=(n, g, h, w), dtype="float32",
                                    chunks=(1, g, h, w), fill_value=0,
                                    dimension_names=("patch", "gene", "y", "x"))
            for name in names}
    for name in ("mask", "origin_px", "origin_um", "grid_index"):
        values = np.asarray(arrays[name][...])
        root.create_array(name, shape=values.shape, dtype=values.dtype,
                          chunks=values.shape, fill_value=0)[...] = values
    return maps


class MassProjection:
    """A patch's mean maps made to add up to its measured LR map
    (:func:`histomap.data.srpairs.mass.project_mass`, in counts, with the LR patch and the
    model's training target sum only). ``__call__(i, norm, counts)`` -> the projected
    (normalised, counts) maps as (mean, std) pairs: the projection moves the means; the std maps
    stay the spread of the chains as sampled."""

    def __init__(self, arrays: Mapping, attrs: Mapping, target_sum: float | None,
                 to_counts) -> None:
        self.scale, self.to_counts = int(attrs["scale"]), to_counts
        self.lr_counts = lr_counts_of(arrays, attrs)
        self.to_values = prediction_normaliser(arrays, attrs, target_sum)

    def __call__(self, i: int, norm, counts) -> tuple[_Written, _Written]:
        lr = self.lr_counts(i)
        values = self.to_values(project_mass(self.to_counts(norm.mean, i), lr, self.scale), i)
        return (_Written(values, norm.std),
                _Written(project_mass(counts.mean, lr, self.scale), counts.std))


def _write_patch_maps(maps: Mapping[str, zarr.Array], i: int, norm: Welford,
                      counts: Welford, raw: tuple | None = None) -> None:
    """Patch ``i``'s mean (and, for diffusion methods, std) maps, normalised and in counts;
    ``raw``: the (normalised, counts) means as sampled, beside mass-projected ones."""
    if raw is not None:
        maps["pred_raw"][i] = raw[0].mean.astype(np.float32)
        maps["pred_counts_raw"][i] = raw[1].mean.astype(np.float32)
    maps["pred"][i] = norm.mean.astype(np.float32)
    maps["pred_counts"][i] = counts.mean.astype(np.float32)
    if "pred_std" in maps:
        maps["pred_std"][i] = norm.std.astype(np.float32)
        maps["pred_std_counts"][i] = counts.std.astype(np.float32)


class _BinTable:
    """The HR bins in the mask of every predicted patch, collected as rows of the HR-bin
    AnnData: X = predicted counts, layers ``pred`` (and ``truth``, ``truth_counts`` with a
    truth, ``pred_std``, ``pred_std_counts`` for diffusion methods), positions in level-0 px."""

    def __init__(self, arrays: Mapping, attrs: Mapping, *, diffusion: bool) -> None:
        self.arrays, self.truth = arrays, has_truth(attrs)
        self.n_genes = len(attrs["genes"])
        # measured HR counts, with the truth's own statistics (for the truth only)
        self.truth_counts = pairs_denormaliser(arrays, attrs) if self.truth else None
        self.grid_index = np.asarray(arrays["grid_index"][...], np.int64)
        self.centres = hr_pixel_centres(np.asarray(arrays["origin_px"][...], np.float64),
                                        self.grid_index, attrs)
        self.layers: dict[str, list[np.ndarray]] = {
            k: [] for k in ("X", "pred", *(("truth", "truth_counts") if self.truth else ()),
                            *(("pred_std", "pred_std_counts") if diffusion else ()))}
        self.obs_parts: list[pd.DataFrame] = []

    def add(self, i: int, norm: Welford, counts: Welford, mask: np.ndarray, hr=None) -> None:
        """Patch ``i``'s bins inside ``mask``; ``hr``: its truth as the model saw it."""
        self.layers["X"].append(counts.mean[:, mask].T)
        self.layers["pred"].append(norm.mean[:, mask].T)
        if self.truth:
            hr = hr.numpy().astype(np.float64)
            self.layers["truth"].append(hr[:, mask].T)
            stored = np.asarray(self.arrays["hr"][i], np.float64)
            self.layers["truth_counts"].append(self.truth_counts(stored, i)[:, mask].T)
        if "pred_std" in self.layers:
            self.layers["pred_std"].append(norm.std[:, mask].T)
            self.layers["pred_std_counts"].append(counts.std[:, mask].T)
        ii, jj = np.nonzero(mask)
        centres = self.centres(i)
        self.obs_parts.append(pd.DataFrame({
            "patch": i, "i": ii, "j": jj, "row": self.grid_index[i, 0] + ii,
            "col": self.grid_index[i, 1] + jj,
            "x_px": centres[ii, jj, 0], "y_px": centres[ii, jj, 1]}))

    def _stack(self, key: str) -> np.ndarray:
        parts = self.layers[key]
        return (np.concatenate(parts) if parts else np.zeros((0, self.n_genes))
                ).astype(np.float32)

    def anndata(self, genes: Sequence[str], sample: str | None) -> ad.AnnData:
        """One row per HR bin added (overlapping patches give one row each)."""
        obs = pd.concat(self.obs_parts, ignore_index=True) if self.obs_parts else pd.DataFrame(
            {c: [] for c in ("patch", "i", "j", "row", "col", "x_px", "y_px")})
        obs.index = [f"p{p}_{a}_{b}" for p, a, b in zip(obs["patch"], obs["i"], obs["j"])]
        if sample is not None:
            obs["sample"] = pd.Categorical([sample] * len(obs))
        adata = ad.AnnData(X=self._stack("X"), obs=obs.drop(columns=["x_px", "y_px"]),
                           var=pd.DataFrame(index=pd.Index(genes)))
        adata.obsm["spatial"] = obs[["x_px", "y_px"]].to_numpy(np.float64)
        for key in self.layers:
            if key != "X":
                adata.layers[key] = self._stack(key)
        return adata


def _describe_bins(adata: ad.AnnData, attrs: Mapping, geometry: Mapping, info: Mapping,
                   sample: str | None, truth: bool) -> None:
    """The HR-bin AnnData's ``uns``: histomap's geometry, how it was predicted and, when the
    slide is at hand, scanpy's ``uns["spatial"]``."""
    from histomap.tasks.predict import h5ad_value  # imports torch: not at module level

    adata.uns["histomap"] = h5ad_value({"sample": sample, "mpp": attrs.get("slide_mpp"),
                                        "image": attrs.get("slide"),
                                        "bin_um": attrs.get("hr_um")})
    adata.uns["superres"] = h5ad_value({**{k: v for k, v in geometry.items() if k != "genes"},
                                        **info, "X": "predicted counts (mean over samples)",
                                        "truth": bool(truth),
                                        "units": "layers pred/truth: normalised maps"})
    slide = attrs.get("slide")
    if slide and Path(slide).is_file() and attrs.get("slide_mpp") and attrs.get("hr_um"):
        add_scanpy_spatial(adata, slide, library_id=str(sample or Path(slide).stem),
                           spot_diameter_um=float(attrs["hr_um"]),
                           mpp=float(attrs["slide_mpp"]))


def _batch_stats(model, meta: Mapping, batch: Mapping, to_counts, chains: Mapping
                 ) -> list[tuple[Welford, Welford]]:
    """(normalised, counts) running mean and std over the reverse chains of each patch of a
    batch (one chain for a baseline)."""
    stats = [(Welford(), Welford()) for _ in range(len(batch["index"]))]
    for chain in predict_chains(model, meta, batch, **chains):
        for b, i in enumerate(batch["index"].tolist()):
            stats[b][0].add(chain[b])
            stats[b][1].add(to_counts(chain[b], i))
    return stats


def _predict_patches(model, meta: Mapping, loader, to_counts, chains: Mapping,
                     maps: Mapping[str, zarr.Array], bins: _BinTable, *, n: int, name: str,
                     on_batch=None, projection: MassProjection | None = None) -> float:
    """Predict every patch of ``loader`` into ``maps`` and ``bins``; the seconds it took.
    ``on_batch()`` after each batch's maps are written (records the progress);
    ``projection``: the maps and bins get the mass-projected means (the raw ones are kept)."""
    start = time.perf_counter()
    bar = Progress(n, f"SR prediction {name}", "patches", logger=log)
    for batch in loader:
        stats = _batch_stats(model, meta, batch, to_counts, chains)
        for b, i in enumerate(batch["index"].tolist()):
            norm, counts = stats[b]
            raw = None
            if projection is not None:
                raw, (norm, counts) = (norm, counts), projection(i, norm, counts)
            _write_patch_maps(maps, i, norm, counts, raw)
            bins.add(i, norm, counts, batch["mask"][b].numpy(),
                     batch["hr"][b] if bins.truth else None)
        bar.update(len(batch["index"]))
        if on_batch is not None:
            on_batch(time.perf_counter() - start)
        if requested():
            break
    bar.close()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- resume
RESUME_DIR = "_resume"


class _Written:
    """A patch's map as :class:`Welford` gives it (mean, std): a written or a projected one."""

    def __init__(self, mean: np.ndarray, std: np.ndarray | None):
        self.mean, self.std = mean, std


def _resume_key(model_path, pairs_zarr, settings: Mapping) -> str:
    from histomap.training.fingerprint import file_identity, fingerprint, source_identity

    return fingerprint({"model": file_identity(model_path), "pairs": file_identity(pairs_zarr),
                        "settings": dict(settings), "code": source_identity()})


def _read_progress(tmp_zarr: Path, key: str) -> dict | None:
    """The record of an interrupted earlier run in ``tmp_zarr`` if it is this prediction's."""
    try:
        state = json.loads((tmp_zarr / RESUME_DIR / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("key") != key:
        log.warning("%s: an interrupted prediction with other inputs or settings; starting "
                    "over", tmp_zarr)
        return None
    return state


def _write_progress(tmp_zarr: Path, state: Mapping) -> None:
    write_text_atomic(tmp_zarr / RESUME_DIR / "state.json", json.dumps(state))


def _restore_bins(bins: _BinTable, maps: Mapping[str, zarr.Array], dataset, n_done: int) -> None:
    """The HR bins of the patches an interrupted run wrote, from their maps (stored in float32:
    the bins' float32 layers are the same numbers)."""
    for i in range(n_done):
        item = dataset[i]
        std = (lambda name: np.asarray(maps[name][i]) if name in maps else None)
        bins.add(i, _Written(np.asarray(maps["pred"][i]), std("pred_std")),
                 _Written(np.asarray(maps["pred_counts"][i]), std("pred_std_counts")),
                 item["mask"].numpy(), item["hr"] if bins.truth else None)


def predict_sr(model_path: str | Path, pairs_zarr: str | Path, out_maps_zarr: str | Path,
               out_h5ad: str | Path, *, sampler: str = "respaced", steps: int | None = 20,
               n_samples: int = 4, batch_size: int = 4, device: str = "auto", seed: int = 0,
               eta: float = 0.0, sample: str | None = None, batch_chains: bool | str = "auto",
               cpu_bf16: bool | str = False, mass_projection: bool = True) -> dict[str, Any]:
    """Predict the HR map of every patch of ``pairs_zarr``; write the maps zarr and the HR-bin
    AnnData (:mod:`histomap.tasks.superres` docstring) atomically: both appear only when both
    are complete.

    Diffusion methods draw ``n_samples`` reverse chains per patch with ``sampler`` ("ddpm": all
    T steps; "respaced" / "ddim": ``steps`` steps) from a CPU generator seeded with ``seed``
    (the same numbers on CPU and GPU); the maps hold their mean and per-pixel std.
    ``batch_chains``: the chains of a batch as one batch (same numbers,
    :func:`.sampling.predict_chains`; "auto": on CUDA, and on the CPU where measured faster);
    ``cpu_bf16``: bf16 autocast on the CPU (true / false / "auto",
    :func:`histomap.train.cpu_bf16_enabled`). Both, and the torch thread count, are recorded in the
    maps' attrs and ``uns["superres"]``. ``mass_projection``: the maps and bins hold the
    mean maps projected onto the measured LR map (:class:`MassProjection`: every LR pixel's HR
    pixels add up to its counts) and the maps zarr keeps the sampled ones as ``pred_raw`` /
    ``pred_counts_raw``; recorded as attr ``mass_projection``.
    """
    from torch.utils.data import DataLoader

    from histomap.compat import torch
    from histomap.train import resolve_device

    out_maps_zarr, out_h5ad = Path(out_maps_zarr), Path(out_h5ad)
    dev = resolve_device(device)
    model, meta = load_sr_model(model_path, dev)
    arrays, attrs = read_sr_pairs(pairs_zarr, lazy=True)
    _check_pairs_fit_model(pairs_zarr, attrs, meta, model_path)
    diffusion = is_diffusion(meta["method"])
    n = int(arrays["lr"].shape[0])
    loader = DataLoader(model_dataset(meta, pairs_zarr), batch_size=int(batch_size),
                        shuffle=False)
    generator = torch.Generator().manual_seed(int(seed))
    batched, amp_type = sampling_modes(dev, batch_chains, cpu_bf16)
    chains = {"device": dev, "sampler": sampler, "steps": steps, "n_samples": n_samples,
              "eta": eta, "generator": generator, "diffusion": meta_diffusion(meta),
              "batch_chains": batched, "amp_type": amp_type}
    # counts of a prediction: the LR patch and the model's training statistics only
    to_counts = prediction_denormaliser(arrays, attrs, meta["pairs"].get("target_sum"))
    info = _prediction_info(model, meta, model_path=model_path, pairs_zarr=pairs_zarr,
                            sample=sample, sampler=sampler, steps=steps, n_samples=n_samples,
                            eta=eta, seed=seed, device=dev, batched=batched, amp_type=amp_type)
    info["mass_projection"] = bool(mass_projection)
    projection = (MassProjection(arrays, attrs, meta["pairs"].get("target_sum"), to_counts)
                  if mass_projection else None)
    geometry = {k: attrs.get(k) for k in GEOMETRY_KEYS}
    key = _resume_key(model_path, pairs_zarr, {**{k: v for k, v in info.items()
                                                   if k not in ("model", "pairs")},
                                                "batch_size": int(batch_size)})
    renamed: list[Path] = []
    try:
        with resumable_output(out_maps_zarr) as (tmp_zarr, existed), \
                deferred("SR prediction"):
            with atomic_output(out_h5ad) as tmp_h5ad:
                state = _read_progress(tmp_zarr, key) if existed else None
                bins = _BinTable(arrays, attrs, diffusion=diffusion)
                if state is None:
                    remove_path(tmp_zarr)
                    root = zarr.open_group(tmp_zarr, mode="w")
                    root.attrs.update({"format": MAPS_FORMAT, **geometry, **info,
                                       "n_patches": n})
                    maps = _create_maps(root, arrays, attrs, diffusion, bool(mass_projection))
                    state = {"key": key, "batches": 0, "seconds": 0.0}
                else:
                    root = zarr.open_group(tmp_zarr, mode="r+")
                    maps = {name: root[name] for name in ("pred", "pred_counts", "pred_std",
                                                          "pred_std_counts", *RAW_MAPS)
                            if name in root}
                    generator.set_state(torch.tensor(list(bytes.fromhex(state["generator"])),
                                                     dtype=torch.uint8))
                    n_done = min(n, state["batches"] * int(batch_size))
                    log.info("%s: resuming an interrupted prediction after %d of %d patches",
                             out_maps_zarr, n_done, n)
                    _restore_bins(bins, maps, model_dataset(meta, pairs_zarr), n_done)
                    loader = DataLoader(model_dataset(meta, pairs_zarr, range(n_done, n)),
                                        batch_size=int(batch_size), shuffle=False)
                done_before, seconds_before = state["batches"], float(state["seconds"])

                def record(seconds: float) -> None:
                    state["batches"] += 1
                    state["seconds"] = seconds_before + seconds
                    state["generator"] = bytes(generator.get_state().tolist()).hex()
                    _write_progress(tmp_zarr, state)

                seconds = seconds_before + _predict_patches(
                    model, meta, loader, to_counts, chains, maps, bins, n=n - min(
                        n, done_before * int(batch_size)), name=Path(pairs_zarr).name,
                    on_batch=record, projection=projection)
                if requested():
                    log.warning("%s: stopped after %d of %d patches; %s records them for "
                                "the rerun", out_maps_zarr,
                                min(n, state["batches"] * int(batch_size)), n, tmp_zarr)
                    check("SR prediction")
                remove_path(tmp_zarr / RESUME_DIR)
                root.attrs["seconds"] = seconds
                adata = bins.anndata(list(attrs["genes"]), sample)
                _describe_bins(adata, attrs, geometry, info, sample, bins.truth)
                adata.write_h5ad(tmp_h5ad)
            renamed.append(out_h5ad)
    except BaseException:  # both appear, or neither
        for path in renamed:
            remove_path(path)
        raise
    log.info("%s: %d patches (%d HR bins in tissue) predicted by %s in %.1f s (%.3g s per "
             "patch)%s -> %s, %s", Path(pairs_zarr).name, n, adata.n_obs, info["variant"],
             seconds, seconds / max(n, 1),
             f", {info['sampler']} sampler, {info['steps']} steps, K={n_samples}"
             if diffusion else "", out_maps_zarr, out_h5ad)
    return {"n_patches": n, "n_bins": int(adata.n_obs), "seconds": seconds, **info}
