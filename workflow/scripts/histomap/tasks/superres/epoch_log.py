"""The per-epoch training log of the SR methods: ``train_log.csv`` and its diffusion columns.

Arrow: SR pairs -> **SR model** (train_diffst / train_sr_baseline): fit's columns plus, for the
diffusion methods, the scheduled and observed curriculum and the loss terms per epoch, kept
beside the checkpoints (``sr_epochs.csv``) so a resumed run continues them.
"""
from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from histomap.outputs import atomic_output

EXTRA_LOG_COLUMNS = ("keep_fraction", "kept_observed", "denoise", "dis")


def read_epoch_extras(path: Path | None, epochs_done: int) -> list[dict]:
    """Rows of the diffusion columns already logged (``sr_epochs.csv``) up to the epochs a
    resumed run has done; none for a fresh run."""
    if path is None or not path.is_file() or epochs_done == 0:
        return []
    rows = pd.read_csv(path).to_dict("records")
    return [r for r in rows if int(r["epoch"]) <= epochs_done]


def write_rows_csv(rows: Sequence[Mapping], path: Path, columns: Sequence[str]) -> None:
    """Write ``rows`` (dicts; other keys ignored) as a CSV of ``columns``, atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def epochs_done(checkpoint_dir: Path) -> int:
    """Epochs recorded in the last checkpoint of ``checkpoint_dir`` (0 without a readable one)."""
    from histomap.compat import torch

    last = checkpoint_dir / "last.pt"
    if not last.is_file():
        return 0
    try:
        return int(torch.load(last, map_location="cpu", weights_only=True)["epochs_done"])
    except Exception:  # noqa: BLE001 - fit reports an unreadable checkpoint itself
        return 0


def write_train_log(checkpoint_dir: Path, extras_path: Path | None, out_log: str | Path) -> None:
    """The rule's ``train_log.csv``: fit's log with the diffusion columns (when given) joined
    by epoch, written atomically."""
    rows = pd.read_csv(checkpoint_dir / "train_log.csv")
    if extras_path is not None and extras_path.is_file():
        rows = rows.merge(pd.read_csv(extras_path), on="epoch", how="left")
    with atomic_output(out_log) as tmp:
        rows.to_csv(tmp, index=False)
