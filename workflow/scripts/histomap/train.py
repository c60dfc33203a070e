"""The training loop every histomap model shares: AdamW, cosine/constant LR, mixed precision on
CUDA, early stopping on validation loss, per-epoch checkpoints and exact resume after a kill.

Files written in ``out_dir``:

* ``train_log.csv``: one row per epoch (epoch, train_loss, val_loss, lr, seconds);
* ``last.pt``: everything needed to resume (model, optimiser, scaler, epoch, best score, early
  stopping counter, RNG states, config, log rows, the training's fingerprint), rewritten
  atomically after every epoch;
* ``best.pt``: model weights of the epoch with the lowest validation loss;
* ``model.pt`` (when ``model_meta`` is given): the best weights with model name, config and gene
  list (:func:`save_model`), rebuildable with :func:`load_model`;
* ``writer.lock`` while a training runs: its process id and host (:class:`CheckpointLock`).

A checkpoint belongs to one training. ``last.pt`` records a fingerprint (:func:`fingerprint`) of
everything that decides the result: the training config, the model's structure and what the
caller passes (:func:`training_fingerprint`: the input files' identity, genes, model config,
seed, pretrained weights' identity, the package's source code). A run resumes only from a
checkpoint with the same fingerprint; any other checkpoint folder content is discarded with a
log line naming what changed, and training starts over. So changing ``lr`` or the gene panel and
rerunning retrains, while a killed run rerun unchanged resumes.

Validation data must come from the TRAINING samples only (e.g. held-out spots or sections of
the training fold); the caller guarantees it. The loop never sees the test fold, so early
stopping cannot leak test information.

Determinism: torch, numpy and random are seeded from ``cfg.seed`` at the start; each epoch's
shuffle uses its own generator derived from (seed, epoch); the global RNG states are saved in
``last.pt`` and restored on resume. On CPU a resumed run therefore ends with the same weights as
an uninterrupted one (CUDA kernels may add run-to-run noise of their own). CPU kernels sum in an
order that depends on the number of intra-op threads, so training runs with a fixed
``torch_threads`` (default 1) whatever number of cores Snakemake gives the job: the weights do not
depend on ``--cores``.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader, Dataset

from histomap import __version__
from histomap.compat import torch
from histomap.errors import InputError
from histomap.logs import Progress

log = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "seconds")
MODEL_FORMAT = "histomap.model/1"

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchToLoss = Callable[[nn.Module, Any, torch.device, "LossFn | None"], torch.Tensor]


@dataclass
class TrainConfig:
    """Training hyper-parameters (plain values, stored in checkpoints and ``model.pt``)."""

    epochs: int = 50
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    patience: int | None = 10      # epochs without val-loss improvement before stopping; None: off
    seed: int = 0
    num_workers: int = 0
    amp: bool = True               # mixed precision, CUDA only (bf16 where supported, else fp16)
    device: str = "auto"           # "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:1"
    grad_clip: float | None = None  # max gradient L2 norm; None: no clipping
    log_every: int = 50            # steps between progress updates
    schedule: str = "cosine"       # "cosine" (per step, to 0 at the last epoch) or "constant"
    min_delta: float = 0.0         # val-loss decrease that counts as an improvement
    torch_threads: int = 1         # CPU intra-op threads while training: fixed, so the weights
                                   # do not depend on the cores Snakemake gives the job

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, "
                             f"{self.batch_size}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 epoch or None (off), got {self.patience}")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a config mapping, rejecting unknown keys (typos fail loudly)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- devices, RNG, files

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first CUDA device if available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def amp_dtype(device: torch.device, enabled: bool = True,
              cpu_bf16: bool = False) -> torch.dtype | None:
    """Autocast dtype: bf16 (or fp16 where bf16 is unsupported) on CUDA; bf16 on the CPU only
    with ``cpu_bf16`` (prediction and sampling, see :func:`cpu_bf16_enabled`); else None."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX through oneDNN)."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_enabled(setting: bool | str | None, default: bool) -> bool:
    """Resolve a ``cpu_bf16`` config value: ``true`` / ``false`` as given; ``"auto"`` (or None)
    the task's measured ``default`` (benchmarks/cpu_bf16.py) on a CPU with native bf16."""
    if setting is None or (isinstance(setting, str) and setting.lower() == "auto"):
        return bool(default) and cpu_has_bf16()
    if isinstance(setting, str):
        if setting.lower() not in ("true", "false"):
            raise ValueError(f"cpu_bf16 must be auto, true or false, got {setting!r}")
        return setting.lower() == "true"
    return bool(setting)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for ``dtype``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Generator for epoch ``epoch``'s shuffle (and worker seeds), independent of history."""
    state = np.random.SeedSequence([int(seed) % 2**32, int(epoch)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def rng_states() -> dict:
    """Global RNG states as tensors/ints (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary name, then rename: a kill never leaves a half file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_log(rows: Sequence[Mapping], path: str | Path) -> None:
    """Write the epoch rows as ``train_log.csv`` (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in LOG_COLUMNS} for row in rows)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- fingerprints, lock

HASH_MAX_BYTES = 64 * 2**20  # files up to this size are identified by content, larger by size+mtime
_PACKAGE_DIR = Path(__file__).resolve().parent


def file_identity(path: str | Path) -> dict:
    """Identity of one input file or folder (e.g. a zarr store).

    A file up to :data:`HASH_MAX_BYTES` is identified by its SHA-256 (so a copy or a ``touch``
    still matches), a larger one by size and modification time; a folder by the relative path,
    size and modification time of every file in it; a missing path as missing.
    """
    path = Path(path)
    if path.is_dir():
        listing = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = item.stat()
            listing.update(f"{item.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                           .encode())
        return {"path": str(path), "folder": listing.hexdigest()}
    if not path.is_file():
        return {"path": str(path), "missing": True}
    stat = path.stat()
    if stat.st_size > HASH_MAX_BYTES:
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest()}


def source_identity() -> str:
    """SHA-256 of the histomap package's Python sources (a code change is a different training)."""
    digest = hashlib.sha256()
    for item in sorted(_PACKAGE_DIR.rglob("*.py")):
        digest.update(str(item.relative_to(_PACKAGE_DIR)).encode() + b"\0" + item.read_bytes())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """JSON-able copy of a config value (paths as strings, tuples as lists, tensors as lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.generic, np.ndarray)) or torch.is_tensor(value):
        return _plain(value.tolist())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _named_files(value: Any) -> list[str]:
    """Every string in a config value that names an existing file (e.g. pretrained weights)."""
    if isinstance(value, Mapping):
        return [f for v in value.values() for f in _named_files(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _named_files(v)]
    if isinstance(value, (str, Path)) and str(value) and Path(value).is_file():
        return [str(value)]
    return []


def training_fingerprint(inputs: Sequence[str | Path] = (), **settings: Any) -> dict:
    """What decides a training's result besides :class:`TrainConfig`, for :func:`fit`'s
    ``fingerprint``: the identity of every input file (:func:`file_identity`), the settings as
    given (genes, model config, validation, seed, ...), the identity of every file a setting
    names (pretrained encoder weights) and of the package's source code."""
    plain = _plain(settings)
    return {"inputs": [file_identity(p) for p in inputs],
            "settings": plain,
            "weights": [file_identity(p) for p in sorted(set(_named_files(settings)))],
            "code": source_identity()}


def fingerprint(parts: Mapping) -> str:
    """SHA-256 of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(_plain(parts), sort_keys=True).encode()).hexdigest()


def _fit_parts(model: nn.Module, cfg: TrainConfig, extra: Mapping | None) -> dict:
    train = cfg.to_dict()
    train.pop("log_every")  # progress display only
    if cfg.schedule == "constant":  # the first epochs do not depend on the total: extendable
        train.pop("epochs")
    structure = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    return {"train": train,
            "model": {"class": type(model).__name__, "state": fingerprint({"s": structure})},
            **_plain(dict(extra or {}))}


def _flatten(value: Any, prefix: str = "") -> dict:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def describe_changes(old: Mapping, new: Mapping, limit: int = 6) -> str:
    """Short text naming what differs between two fingerprint part dicts."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(old_flat) | set(new_flat)):
        before, now = old_flat.get(key, "<unset>"), new_flat.get(key, "<unset>")
        if before == now:
            continue
        if key == "inputs":
            old_in = {i["path"]: i for i in before} if isinstance(before, list) else {}
            new_in = {i["path"]: i for i in now} if isinstance(now, list) else {}
            names = sorted(p for p in set(old_in) | set(new_in) if old_in.get(p) != new_in.get(p))
            lines.append(f"input files {names[:3]}{' ...' if len(names) > 3 else ''}")
        elif isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
            changed = sum(a != b for a, b in zip(before, now))
            lines.append(f"{key} ({changed} of {len(now)} entries)")
        else:
            text = f"{key} {before!r} -> {now!r}"
            lines.append(text if len(text) <= 120 else f"{key} (changed)")
    if len(lines) > limit:
        lines = lines[:limit] + [f"{len(lines) - limit} more"]
    return "; ".join(lines) or "nothing recorded"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class CheckpointLock:
    """``writer.lock`` in a checkpoint folder: one training writes it at a time.

    The lock file holds the writer's process id and host and is refreshed every
    :attr:`HEARTBEAT_S` seconds. Another live process on this host, or a lock from another host
    refreshed within :attr:`STALE_S` seconds, is an error; a stale lock (dead process, or a
    silent other host) is taken over with a log line. Re-entrant within one process.
    """

    NAME = "writer.lock"
    HEARTBEAT_S = 30.0
    STALE_S = 180.0

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / self.NAME
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> CheckpointLock:
        me = self._me()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile
                if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                    break  # our own (re-entrant)
                self.check()
                log.warning("%s: taking over a stale checkpoint lock of process %s on %s (no "
                            "longer running)", self.path.parent, owner.get("pid"),
                            owner.get("host"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({**me, "started": time.time()}, fh)
            break
        else:
            raise InputError(self.path, "could not take the checkpoint lock")
        self._held = True
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                            name="checkpoint-lock")
            self._thread.start()
        return self

    @staticmethod
    def _me() -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def check(self) -> None:
        """Raise :class:`InputError` if another live process holds the lock (nothing else)."""
        owner, me = self._owner(), self._me()
        if owner is None:
            return
        pid, host = owner.get("pid"), owner.get("host")
        if pid == me["pid"] and host == me["host"]:
            return
        if host == me["host"] and isinstance(pid, int) and _pid_alive(pid):
            raise InputError(self.path.parent, (
                f"another training (process {pid} on {host}) is writing these checkpoints; "
                "two runs of one training would overwrite each other. Wait for it or stop it "
                f"(if that process is no training, delete {self.path})"))
        if host != me["host"]:
            with contextlib.suppress(FileNotFoundError):
                age = time.time() - self.path.stat().st_mtime
                if age < self.STALE_S:
                    raise InputError(self.path.parent, (
                        f"another training (process {pid} on host {host}) is writing these "
                        f"checkpoints (its lock was refreshed {age:.0f} s ago). Wait for it or "
                        f"stop it; a lock not refreshed for {self.STALE_S:.0f} s is taken over"))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> CheckpointLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def discard_stale_checkpoints(out_dir: str | Path, model: nn.Module, cfg: TrainConfig,
                              fingerprint_parts: Mapping | None = None) -> str:
    """Keep ``out_dir/last.pt`` only if it belongs to this training; returns the fingerprint.

    A checkpoint with another fingerprint (or none, or unreadable) is removed together with the
    rest of the folder (``best.pt``, logs, a caller's extra files), with a warning naming what
    changed. Callers that read the folder before :func:`fit` (e.g. to restore their own epoch
    state) call this first; :func:`fit` calls it again (a no-op then).
    """
    out_dir = Path(out_dir)
    CheckpointLock(out_dir).check()
    parts = _fit_parts(model, cfg, fingerprint_parts)
    digest = fingerprint(parts)
    last = out_dir / "last.pt"
    if not last.exists():
        return digest
    reason = None
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is discarded
        reason = f"it cannot be read ({type(exc).__name__}: {exc})"
        ckpt = {}
    if reason is None and "fingerprint" not in ckpt:
        reason = "it has no fingerprint (written by an older histomap)"
    elif reason is None and ckpt["fingerprint"] != digest:
        old = json.loads(ckpt.get("fingerprint_parts", "{}"))
        reason = f"it belongs to another training ({describe_changes(old, parts)})"
    elif (reason is None and cfg.schedule == "constant"
          and int(ckpt.get("epochs_done", 0)) > cfg.epochs):
        reason = (f"it has {ckpt['epochs_done']} epochs, more than the {cfg.epochs} asked for")
    if reason is None:
        return digest
    log.warning("%s: discarding the checkpoints in %s and training from scratch: %s", last,
                out_dir, reason)
    for item in out_dir.iterdir():
        if item.name == CheckpointLock.NAME:
            continue
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()
    return digest


def training_threads(train_cfg: Mapping[str, Any]) -> int:
    """The fixed intra-op thread count of a ``train`` config (``torch_threads``, default 1)."""
    return int(train_cfg.get("torch_threads", TrainConfig.torch_threads))


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Run with ``n`` torch intra-op threads, restoring the previous number afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- batches

def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested tuple/list/dict) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_len(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        with contextlib.suppress(TypeError):
            return batch_len(value)
    raise TypeError(f"no tensor in batch of type {type(batch).__name__}")


def spot_batch_loss(model: nn.Module, batch: Any, device: torch.device,
                    loss_fn: LossFn | None) -> torch.Tensor:
    """Default ``batch_to_loss``: batch = (inputs, targets), loss = loss_fn(model(inputs), targets).

    Models with other batches (e.g. PixNet's tiles + spot discs) pass their own function with the
    same signature ``(model, batch, device, loss_fn) -> scalar loss``; it runs under autocast.
    """
    inputs, targets = to_device(batch, device)
    return loss_fn(model(inputs), targets)


# --------------------------------------------------------------------------- the loop

@dataclass
class _State:
    epochs_done: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0            # 1-based epoch of best.pt; 0: none yet
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list = dataclasses.field(default_factory=list)


def fit(model: nn.Module, train_ds: Dataset, val_ds: Dataset | None, *,
        loss_fn: LossFn | None, out_dir: str | Path, cfg: TrainConfig | None = None,
        batch_to_loss: BatchToLoss | None = None, model_meta: Mapping | None = None,
        on_epoch_end: Callable[[dict], None] | None = None,
        fingerprint: Mapping | None = None) -> dict:
    """Train ``model`` in place on ``train_ds``, early-stopping on ``val_ds`` loss; resumable.

    ``val_ds`` must hold training-fold data only (see module docstring); None disables early
    stopping and keeps the last epoch's weights. If ``out_dir/last.pt`` exists and has this
    training's fingerprint (``cfg``, the model's structure and ``fingerprint``, e.g. from
    :func:`training_fingerprint`), training resumes after its epoch; otherwise the folder's old
    checkpoints are discarded (:func:`discard_stale_checkpoints`). ``out_dir`` is locked while
    training (:class:`CheckpointLock`) and torch runs ``cfg.torch_threads`` intra-op threads.
    ``batch_to_loss(model, batch, device, loss_fn)`` turns a DataLoader batch
    into a scalar loss (default :func:`spot_batch_loss`). ``on_epoch_end(row)`` is called after
    each epoch's checkpoint is written. At the end the best weights are loaded into ``model``
    and, with ``model_meta`` = dict(model_name, model_config, genes, extra), saved as
    ``out_dir/model.pt``. Returns a summary (best_epoch, best_val_loss, epochs_done,
    stopped_early, resumed_from, history, device).
    """
    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with CheckpointLock(out_dir), intra_op_threads(cfg.torch_threads):
        return _fit(model, train_ds, val_ds, loss_fn=loss_fn, out_dir=out_dir, cfg=cfg,
                    batch_to_loss=batch_to_loss, model_meta=model_meta,
                    on_epoch_end=on_epoch_end, fingerprint_parts=fingerprint)


def _fit(model, train_ds, val_ds, *, loss_fn, out_dir: Path, cfg: TrainConfig, batch_to_loss,
         model_meta, on_epoch_end, fingerprint_parts) -> dict:
    batch_to_loss = batch_to_loss or spot_batch_loss
    if batch_to_loss is spot_batch_loss and loss_fn is None:
        raise ValueError("loss_fn is required with the default batch_to_loss")
    if len(train_ds) == 0:
        raise ValueError("the training dataset is empty")
    if val_ds is not None and len(val_ds) == 0:
        raise ValueError("the validation dataset is empty (pass None to train without one)")
    if val_ds is None:
        log.warning("no validation data: early stopping is off, the last epoch's weights are kept")
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    digest = discard_stale_checkpoints(out_dir, model, cfg, fingerprint_parts)
    parts_json = json.dumps(_fit_parts(model, cfg, fingerprint_parts), sort_keys=True)

    device = resolve_device(cfg.device)
    dtype = amp_dtype(device, cfg.amp)
    seed_everything(cfg.seed)
    model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = _State()
    if last_path.exists():
        state = _resume(last_path, model, optimiser, scaler, cfg)
    else:  # a fresh run: weights of an earlier, unrelated run must not come back
        best_path.unlink(missing_ok=True)
    resumed_from = state.epochs_done
    log.info("training on %s (autocast %s) for %d epochs, %d train / %s val items%s", device,
             dtype, cfg.epochs, len(train_ds), len(val_ds) if val_ds is not None else 0,
             f", resuming after epoch {resumed_from}" if resumed_from else "")

    # a trailing batch of one sample breaks BatchNorm in train mode: drop it (its samples are
    # reshuffled into other batches in later epochs)
    drop_last = len(train_ds) % cfg.batch_size == 1 and len(train_ds) > 1
    if drop_last:
        log.info("dropping each epoch's trailing 1-sample batch (%d items, batch size %d)",
                 len(train_ds), cfg.batch_size)
    steps_per_epoch = len(train_ds) // cfg.batch_size + (
        0 if drop_last or len(train_ds) % cfg.batch_size == 0 else 1)
    lr_at = _lr_schedule(cfg, steps_per_epoch)

    while state.epochs_done < cfg.epochs and not state.stopped_early:
        epoch = state.epochs_done  # 0-based index of the epoch being run
        start = time.perf_counter()
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True,
                            drop_last=drop_last, num_workers=cfg.num_workers,
                            generator=epoch_generator(cfg.seed, epoch),
                            pin_memory=device.type == "cuda")
        train_loss = _train_epoch(model, loader, optimiser, scaler, device, dtype, loss_fn,
                                  batch_to_loss, cfg, epoch, lr_at)
        val_loss = (evaluate_loss(model, val_ds, loss_fn=loss_fn, batch_to_loss=batch_to_loss,
                                  batch_size=cfg.batch_size, device=device, dtype=dtype,
                                  num_workers=cfg.num_workers)
                    if val_ds is not None else math.nan)
        state.epochs_done = epoch + 1
        if val_ds is None or val_loss < state.best_val_loss - cfg.min_delta:
            state.best_val_loss, state.best_epoch, state.bad_epochs = val_loss, epoch + 1, 0
            atomic_save({"state_dict": _cpu_state(model), "epoch": epoch + 1,
                         "val_loss": val_loss}, best_path)
        else:
            state.bad_epochs += 1
        if cfg.patience is not None and val_ds is not None and state.bad_epochs >= cfg.patience:
            state.stopped_early = True
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
               "lr": lr_at(epoch * steps_per_epoch), "seconds": time.perf_counter() - start}
        state.history.append(row)
        write_log(state.history, out_dir / "train_log.csv")
        atomic_save({**_checkpoint(model, optimiser, scaler, state, cfg),
                     "fingerprint": digest, "fingerprint_parts": parts_json}, last_path)
        log.info("epoch %d/%d: train_loss %.5g, val_loss %.5g, lr %.3g, %.1f s", epoch + 1,
                 cfg.epochs, train_loss, val_loss, row["lr"], row["seconds"])
        if state.stopped_early:
            log.info("early stopping after epoch %d: no val-loss improvement for %d epochs "
                     "(best %.5g at epoch %d)", epoch + 1, cfg.patience, state.best_val_loss,
                     state.best_epoch)
        if on_epoch_end is not None:
            on_epoch_end(dict(row))

    if best_path.exists():
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        model.load_state_dict(best["state_dict"])
    else:
        log.warning("no epoch had a finite validation loss: keeping the last epoch's weights")
    model.eval()
    if model_meta is not None:
        save_model(out_dir / "model.pt", model, **model_meta)
    return {"best_epoch": state.best_epoch, "best_val_loss": state.best_val_loss,
            "epochs_done": state.epochs_done, "stopped_early": state.stopped_early,
            "resumed_from": resumed_from, "history": list(state.history), "device": str(device)}


def _lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return lambda step: cfg.lr
    return lambda step: cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _train_epoch(model, loader, optimiser, scaler, device, dtype, loss_fn, batch_to_loss,
                 cfg: TrainConfig, epoch: int, lr_at) -> float:
    model.train()
    total, count, skipped = 0.0, 0, 0
    steps = len(loader)
    bar = Progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", "batches", logger=log)
    for i, batch in enumerate(loader):
        lr = lr_at(epoch * steps + i)
        for group in optimiser.param_groups:
            group["lr"] = lr
        optimiser.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = batch_to_loss(model, batch, device, loss_fn)
        if not torch.isfinite(loss.detach()):
            skipped += 1
            log.warning("epoch %d step %d: non-finite loss %s, step skipped", epoch + 1, i + 1,
                        loss.item())
            continue
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimiser)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimiser)
        scaler.update()
        n = batch_len(batch)
        total += loss.item() * n
        count += n
        bar.update(1, extra=f"loss {total / count:.4g}, lr {lr:.2g}")
        if cfg.log_every and (i + 1) % cfg.log_every == 0:
            log.debug("epoch %d step %d/%d: loss %.5g", epoch + 1, i + 1, steps, total / count)
    if skipped == steps:
        raise FloatingPointError(f"epoch {epoch + 1}: every training loss was non-finite "
                                 "(NaN targets or a diverged model?)")
    return total / count


def evaluate_loss(model: nn.Module, dataset: Dataset, *, loss_fn: LossFn | None,
                  batch_to_loss: BatchToLoss | None = None, batch_size: int = 32,
                  device: torch.device | str = "auto", dtype: torch.dtype | None = None,
                  num_workers: int = 0) -> float:
    """Mean loss over ``dataset`` (weighted by batch size), eval mode, no gradients."""
    device = resolve_device(device)
    batch_to_loss = batch_to_loss or spot_batch_loss
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0),
                        pin_memory=device.type == "cuda")
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            with autocast(device, dtype):
                loss = batch_to_loss(model, batch, device, loss_fn)
            n = batch_len(batch)
            total += float(loss) * n
            count += n
    return total / count


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _checkpoint(model, optimiser, scaler, state: _State, cfg: TrainConfig) -> dict:
    return {"model": _cpu_state(model), "optimiser": optimiser.state_dict(),
            "scaler": scaler.state_dict(), "epochs_done": state.epochs_done,
            "best_val_loss": state.best_val_loss, "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs, "stopped_early": state.stopped_early,
            "history": state.history, "rng": rng_states(), "config": cfg.to_dict(),
            "histomap_version": __version__}


def _resume(path: Path, model, optimiser, scaler, cfg: TrainConfig) -> _State:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimiser.load_state_dict(ckpt["optimiser"])
    except (RuntimeError, KeyError, ValueError, EOFError) as exc:
        raise InputError(path, f"cannot resume from this checkpoint ({exc}); delete it to "
                               "train from scratch") from exc
    if ckpt["scaler"]:  # empty when the scaler was disabled (CPU, bf16)
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"])
    changed = {k: (v, ckpt["config"].get(k)) for k, v in cfg.to_dict().items()
               if ckpt["config"].get(k) != v}
    if changed:  # only settings outside the fingerprint (log_every; epochs, constant schedule)
        log.info("%s: resuming with (now, before): %s", path, changed)
    log.info("%s: resuming after epoch %d (best val loss %.5g at epoch %d)", path,
             ckpt["epochs_done"], ckpt["best_val_loss"], ckpt["best_epoch"])
    return _State(epochs_done=ckpt["epochs_done"], best_val_loss=ckpt["best_val_loss"],
                  best_epoch=ckpt["best_epoch"], bad_epochs=ckpt["bad_epochs"],
                  stopped_early=ckpt["stopped_early"], history=list(ckpt["history"]))


# --------------------------------------------------------------------------- model.pt

def save_model(path: str | Path, model: nn.Module, *, model_name: str,
               model_config: Mapping | None = None, genes: Sequence[str],
               extra: Mapping | None = None) -> Path:
    """Write ``model.pt`` atomically: dict(state_dict, model_name, model_config, genes,
    histomap_version, torch_version, extra).

    ``model_config`` (default ``model.config``) are the keyword arguments of the registered
    model; ``extra`` holds plain values (numbers, strings, lists, dicts, tensors) such as the
    patch size and mpp the model was trained at.
    """
    from histomap.models import MODELS

    if model_name not in MODELS:
        raise ValueError(f"model {model_name!r} is not registered in histomap.models.MODELS")
    if model_config is None:
        model_config = getattr(model, "config", None)
        if model_config is None:
            raise ValueError("model_config is required for a model without a .config")
    genes = [str(g) for g in genes]
    n_genes = getattr(model, "n_genes", len(genes))
    if n_genes != len(genes):
        raise ValueError(f"model predicts {n_genes} genes but {len(genes)} gene names given")
    payload = {"format": MODEL_FORMAT, "state_dict": _cpu_state(model), "model_name": model_name,
               "model_config": dict(model_config), "genes": genes,
               "histomap_version": __version__, "torch_version": str(torch.__version__),
               "extra": dict(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save(payload, path)


def read_model_payload(path: Path, model_format: str, kind: str, *,
                       missing: str = "model file does not exist") -> Mapping:
    """The saved dict of a model file of ``model_format`` (weights on the CPU), read without
    unpickling code; InputError naming ``path`` when it is missing (``missing``), unreadable
    (``"cannot read as a <kind>: ..."``) or of another format (``"not a <kind> file ..."``)."""
    if not path.is_file():
        raise InputError(path, missing)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InputError(path, f"cannot read as a {kind}: {exc}") from exc
    if not isinstance(payload, Mapping) or payload.get("format") != model_format:
        raise InputError(path, f"not a {kind} file (expected format {model_format})")
    return payload


def load_model(path: str | Path, *, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_model` through the registry; eval mode on ``device``.

    Returns (model, meta) where meta is the saved dict without the state dict. A
    ``pretrained_checkpoint`` in the config is not re-read: ``model.pt`` holds every weight.
    """
    from histomap.models import build_model

    path = Path(path)
    payload = read_model_payload(path, MODEL_FORMAT, "histomap model")
    config = dict(payload["model_config"])
    if "pretrained_checkpoint" in config:
        config["pretrained_checkpoint"] = None
    model = build_model(payload["model_name"], len(payload["genes"]), **config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit model {payload['model_name']!r}: {exc}"
                         ) from exc
    model.to(resolve_device(device)).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta
