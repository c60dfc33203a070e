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

The loop is this module; its parts live in :mod:`histomap.training` (config, device and AMP,
RNG states, fingerprints, checkpoint files, ``model.pt``). The names callers use from them are
importable from here too (``__all__``): this module is the training stage's front door.

A checkpoint belongs to one training. ``last.pt`` records a fingerprint
(:func:`~histomap.training.fingerprint.fingerprint`) of
everything that decides the result: the training config, the model's structure and what the
caller passes (:func:`training_fingerprint`: the input files' identity, genes, model config,
seed, pretrained weights' identity, the package's source code). A run resumes only from a
checkpoint with the same fingerprint; any other checkpoint folder content is discarded with a
log line naming what changed, and training starts over. So changing ``lr`` or the gene panel and
rerunning retrains, while a killed run rerun unchanged resumes.

SIGTERM (a cluster's time limit; :mod:`histomap.interrupt`, installed by the rule steps): the
loop finishes the batch it is in, writes ``last.pt`` with the position inside the epoch
(``in_epoch``: batches done, the epoch's running loss sums, the objective's own per-epoch state
where it has ``state_dict``/``load_state_dict``, the RNG states at that boundary) and raises
:class:`~histomap.interrupt.Interrupted`; the rerun skips the epoch's batches already done
(the epoch's shuffle is regenerated, skipped batches are not loaded) and ends with the weights
of an uninterrupted run. With ``num_workers > 0`` the workers' RNG cannot be put back mid-epoch:
the interrupted epoch is dropped and the rerun repeats it from ``last.pt`` of the epoch before.

Validation data must come from the TRAINING samples only (e.g. held-out spots or sections of
the training fold); the caller guarantees it. The loop never sees the test fold, so early
stopping cannot leak test information.

Determinism: torch, numpy and random are seeded from ``cfg.seed`` at the start; each epoch's
shuffle uses its own generator derived from (seed, epoch); the global RNG states are saved in
``last.pt`` and restored on resume. On CPU a resumed run therefore ends with the same weights as
an uninterrupted one (CUDA kernels may add run-to-run noise of their own). CPU kernels sum in an
order that depends on the number of intra-op threads, so :func:`fit` runs with the config's fixed
``torch_threads`` (:mod:`histomap.threads`; default 1) whatever number of cores Snakemake gives
the job: the weights do not depend on ``--cores``. Rule adapters of training jobs leave the
thread count to :func:`fit`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from histomap import __version__, interrupt
from histomap.compat import torch
from histomap.errors import InputError
from histomap.logs import Progress
from histomap.training.checkpoints import (CheckpointLock, atomic_save, discard_stale_checkpoints,
                                           load_checkpoint, write_log)
from histomap.training.config import TrainConfig
from histomap.training.device import (amp_dtype, autocast, cpu_bf16_enabled, cpu_has_bf16,
                                      grad_scaler,
                                      resolve_device, to_device)
from histomap.training.fingerprint import file_identity, fit_parts, training_fingerprint
from histomap.training.model_file import (MODEL_FORMAT, cpu_state_dict, load_model,
                                          read_model_payload, save_model)
from histomap.threads import torch_threads
from histomap.training.rng import epoch_generator, rng_states, seed_everything, set_rng_states

log = logging.getLogger(__name__)

__all__ = [
    # the loop (this module)
    "BatchToLoss", "LossFn", "batch_len", "evaluate_loss", "fit", "optimiser_step",
    "spot_batch_loss",
    # its parts (histomap.training), one import for the tasks and rule scripts
    "MODEL_FORMAT", "CheckpointLock", "TrainConfig", "amp_dtype", "atomic_save", "autocast",
    "cpu_bf16_enabled", "cpu_has_bf16", "discard_stale_checkpoints", "file_identity",
    "grad_scaler",
    "load_model", "read_model_payload", "resolve_device", "save_model", "to_device",
    "training_fingerprint",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchToLoss = Callable[[nn.Module, Any, torch.device, "LossFn | None"], torch.Tensor]



# --------------------------------------------------------------------------- batches

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


def optimiser_step(loss: torch.Tensor, model: nn.Module, optimiser: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, grad_clip: float | None = None) -> bool:
    """Backward and one optimiser step through ``scaler`` (:func:`grad_scaler`); returns whether
    the step was taken.

    fp16 (scaler enabled): the loss is multiplied by the scale before backward, the gradients
    are divided by it again (``unscale_``, before clipping so the clip sees true gradients),
    and a step whose gradients hold an inf or NaN is skipped while the scale is halved; the
    scale doubles after 2000 clean steps. bf16 and fp32 (scaler disabled): a plain backward,
    clip and step.
    """
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimiser)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not scaler.is_enabled():
        optimiser.step()
        return True
    scale = scaler.get_scale()
    scaler.step(optimiser)
    scaler.update()
    return scaler.get_scale() >= scale  # update() lowers the scale only after an overflow


# --------------------------------------------------------------------------- the loop

@dataclass
class _State:
    epochs_done: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0            # 1-based epoch of best.pt; 0: none yet
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list = dataclasses.field(default_factory=list)
    in_epoch: dict | None = None   # position inside epoch ``epochs_done`` (a SIGTERM checkpoint)


class _SkipSampler(Sampler):
    """The default shuffle (``RandomSampler`` on the epoch's generator, drawn exactly as
    ``DataLoader(shuffle=True)`` draws it) without its first ``skip`` indices: a resumed epoch
    goes on where the interrupted one stopped, without loading the batches it had done."""

    def __init__(self, dataset: Dataset, generator: torch.Generator, skip: int = 0):
        self.inner = RandomSampler(dataset, generator=generator)
        self.skip = int(skip)

    def __iter__(self):
        it = iter(self.inner)
        for _ in range(self.skip):
            next(it)
        yield from it

    def __len__(self) -> int:
        return len(self.inner) - self.skip


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
    with CheckpointLock(out_dir), torch_threads(cfg.torch_threads):
        return _fit(model, train_ds, val_ds, loss_fn=loss_fn, out_dir=out_dir, cfg=cfg,
                    batch_to_loss=batch_to_loss, model_meta=model_meta,
                    on_epoch_end=on_epoch_end, fingerprint_parts=fingerprint)


def _fit(model, train_ds, val_ds, *, loss_fn, out_dir: Path, cfg: TrainConfig, batch_to_loss,
         model_meta, on_epoch_end, fingerprint_parts) -> dict:
    batch_to_loss = batch_to_loss or spot_batch_loss
    _check_inputs(train_ds, val_ds, loss_fn, batch_to_loss)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    digest = discard_stale_checkpoints(out_dir, model, cfg, fingerprint_parts)
    parts_json = json.dumps(fit_parts(model, cfg, fingerprint_parts), sort_keys=True)

    device = resolve_device(cfg.device)
    dtype = amp_dtype(device, cfg.amp)
    seed_everything(cfg.seed)
    model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(device, dtype)  # fp16 only (CUDA without native bf16)
    state = _State()
    if last_path.exists():
        state = _resume(last_path, model, optimiser, scaler, cfg, batch_to_loss)
    else:  # a fresh run: weights of an earlier, unrelated run must not come back
        best_path.unlink(missing_ok=True)
    resumed_from = state.epochs_done
    log.info("training on %s (autocast %s) for %d epochs, %d train / %s val items%s", device,
             dtype, cfg.epochs, len(train_ds), len(val_ds) if val_ds is not None else 0,
             f", resuming after epoch {resumed_from}" if resumed_from else "")

    drop_last, steps_per_epoch = _batches_per_epoch(len(train_ds), cfg.batch_size)
    lr_at = _lr_schedule(cfg, steps_per_epoch)

    def save_last() -> None:
        atomic_save({**_checkpoint(model, optimiser, scaler, state, cfg),
                     "fingerprint": digest, "fingerprint_parts": parts_json}, last_path)

    with interrupt.deferred("training"):
        while state.epochs_done < cfg.epochs and not state.stopped_early:
            _run_epoch(model, train_ds, val_ds, optimiser, scaler, device, dtype, loss_fn,
                       batch_to_loss, cfg, state, drop_last, steps_per_epoch, lr_at, save_last,
                       best_path, out_dir, on_epoch_end)
            interrupt.check("training")  # last.pt of the finished epoch is written

    _keep_best_weights(model, best_path, out_dir, model_meta, state.best_epoch)
    return {"best_epoch": state.best_epoch, "best_val_loss": state.best_val_loss,
            "epochs_done": state.epochs_done, "stopped_early": state.stopped_early,
            "resumed_from": resumed_from, "history": list(state.history), "device": str(device)}


def _run_epoch(model, train_ds, val_ds, optimiser, scaler, device, dtype, loss_fn, batch_to_loss,
               cfg: TrainConfig, state: _State, drop_last: bool, steps_per_epoch: int, lr_at,
               save_last: Callable[[], None], best_path: Path, out_dir: Path,
               on_epoch_end) -> None:
    """One epoch (or its rest, after a SIGTERM checkpoint): train, validate, checkpoint, log."""
    epoch = state.epochs_done  # 0-based index of the epoch being run
    start = time.perf_counter()
    position, state.in_epoch = state.in_epoch or {}, None
    generator = epoch_generator(cfg.seed, epoch)  # one object, as DataLoader(shuffle=True)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size,
                        sampler=_SkipSampler(train_ds, generator,
                                             position.get("batches", 0) * cfg.batch_size),
                        drop_last=drop_last, num_workers=cfg.num_workers, generator=generator,
                        pin_memory=device.type == "cuda")

    def save_position(progress: dict) -> None:  # a SIGTERM at a batch boundary
        state.in_epoch = progress
        save_last()
        log.warning("epoch %d: stopped after batch %d of %d; %s records the position, the "
                    "rerun goes on from there", epoch + 1, progress["batches"],
                    steps_per_epoch, out_dir / "last.pt")

    train_loss = _train_epoch(model, loader, optimiser, scaler, device, dtype, loss_fn,
                              batch_to_loss, cfg, epoch, lr_at, steps=steps_per_epoch,
                              position=position,
                              on_interrupt=save_position if cfg.num_workers == 0 else None)
    val_loss = (evaluate_loss(model, val_ds, loss_fn=loss_fn, batch_to_loss=batch_to_loss,
                              batch_size=cfg.batch_size, device=device, dtype=dtype,
                              num_workers=cfg.num_workers)
                if val_ds is not None else math.nan)
    state.epochs_done = epoch + 1
    if val_ds is None or val_loss < state.best_val_loss - cfg.min_delta:
        state.best_val_loss, state.best_epoch, state.bad_epochs = val_loss, epoch + 1, 0
        atomic_save({"state_dict": cpu_state_dict(model), "epoch": epoch + 1,
                     "val_loss": val_loss}, best_path)
    else:
        state.bad_epochs += 1
    if cfg.patience is not None and val_ds is not None and state.bad_epochs >= cfg.patience:
        state.stopped_early = True
    row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
           "lr": lr_at(epoch * steps_per_epoch), "seconds": time.perf_counter() - start}
    state.history.append(row)
    write_log(state.history, out_dir / "train_log.csv")
    save_last()
    log.info("epoch %d/%d: train_loss %.5g, val_loss %.5g, lr %.3g, %.1f s", epoch + 1,
             cfg.epochs, train_loss, val_loss, row["lr"], row["seconds"])
    if state.stopped_early:
        log.info("early stopping after epoch %d: no val-loss improvement for %d epochs "
                 "(best %.5g at epoch %d)", epoch + 1, cfg.patience, state.best_val_loss,
                 state.best_epoch)
    if on_epoch_end is not None:
        on_epoch_end(dict(row))


def _check_inputs(train_ds, val_ds, loss_fn, batch_to_loss) -> None:
    """Refuse what cannot train; warn when early stopping is off for lack of validation data."""
    if batch_to_loss is spot_batch_loss and loss_fn is None:
        raise ValueError("loss_fn is required with the default batch_to_loss")
    if len(train_ds) == 0:
        raise ValueError("the training dataset is empty")
    if val_ds is not None and len(val_ds) == 0:
        raise ValueError("the validation dataset is empty (pass None to train without one)")
    if val_ds is None:
        log.warning("no validation data: early stopping is off, the last epoch's weights are kept")


def _batches_per_epoch(n_items: int, batch_size: int) -> tuple[bool, int]:
    """(drop_last, optimiser steps per epoch). A trailing batch of one sample breaks BatchNorm
    in train mode: it is dropped (its samples are reshuffled into other batches later)."""
    drop_last = n_items % batch_size == 1 and n_items > 1
    if drop_last:
        log.info("dropping each epoch's trailing 1-sample batch (%d items, batch size %d)",
                 n_items, batch_size)
    steps_per_epoch = n_items // batch_size + (0 if drop_last or n_items % batch_size == 0 else 1)
    return drop_last, steps_per_epoch


def _keep_best_weights(model: nn.Module, best_path: Path, out_dir: Path,
                       model_meta: Mapping | None, best_epoch: int) -> None:
    """Load ``best.pt`` (checked against its sidecar) into ``model`` (eval mode) and, with
    ``model_meta``, save ``model.pt``. ``best_epoch`` > 0 says a best.pt was written: a missing
    one then is an error, never a silent switch to the last epoch's weights."""
    if best_path.exists():
        model.load_state_dict(load_checkpoint(best_path)["state_dict"])
    elif best_epoch:
        raise InputError(best_path, f"missing, though epoch {best_epoch} wrote it; delete the "
                                    f"folder {out_dir} and rerun (the training starts again)")
    else:
        log.warning("no epoch had a finite validation loss: keeping the last epoch's weights")
    model.eval()
    if model_meta is not None:
        save_model(out_dir / "model.pt", model, **model_meta)


def _lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return lambda step: cfg.lr
    return lambda step: cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _train_epoch(model, loader, optimiser, scaler, device, dtype, loss_fn, batch_to_loss,
                 cfg: TrainConfig, epoch: int, lr_at, *, steps: int,
                 position: Mapping | None = None,
                 on_interrupt: Callable[[dict], None] | None = None) -> float:
    """Train one epoch (from batch ``position["batches"]`` of a resumed one); returns its mean
    loss. A SIGTERM stops it at the next batch boundary: ``on_interrupt(position)`` records
    where (None: the epoch is dropped), then :class:`~histomap.interrupt.Interrupted`."""
    model.train()
    position = position or {}
    first = int(position.get("batches", 0))
    total, count = float(position.get("total", 0.0)), int(position.get("count", 0))
    skipped = int(position.get("skipped", 0))
    if first and position.get("objective") is not None:
        batch_to_loss.load_state_dict(position["objective"])
    if first:
        log.info("epoch %d: resuming after batch %d of %d", epoch + 1, first, steps)
    bar = Progress(steps - first, f"epoch {epoch + 1}/{cfg.epochs}", "batches", logger=log)

    def stop_here(done: int) -> None:
        if not interrupt.requested():
            return
        if on_interrupt is not None:
            on_interrupt({"batches": done, "total": total, "count": count, "skipped": skipped,
                          "objective": _objective_state(batch_to_loss)})
        else:
            log.warning("epoch %d: stopped after batch %d; with num_workers > 0 the epoch "
                        "cannot be resumed mid-way, the rerun repeats it", epoch + 1, done)
        interrupt.check("training")

    for i, batch in enumerate(loader, start=first):
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
            stop_here(i + 1)
            continue
        if not optimiser_step(loss, model, optimiser, scaler, cfg.grad_clip):
            log.info("epoch %d step %d: fp16 gradients overflowed, step skipped, loss scale "
                     "now %g", epoch + 1, i + 1, scaler.get_scale())
        n = batch_len(batch)
        total += loss.item() * n
        count += n
        bar.update(1, extra=f"loss {total / count:.4g}, lr {lr:.2g}")
        if cfg.log_every and (i + 1) % cfg.log_every == 0:
            log.debug("epoch %d step %d/%d: loss %.5g", epoch + 1, i + 1, steps, total / count)
        stop_here(i + 1)
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


def _objective_state(batch_to_loss) -> dict | None:
    """The per-epoch state of a stateful objective (e.g. Diff-ST's loss-term sums), if any."""
    getter = getattr(batch_to_loss, "state_dict", None)
    return getter() if callable(getter) and not isinstance(batch_to_loss, nn.Module) else None


def _checkpoint(model, optimiser, scaler, state: _State, cfg: TrainConfig) -> dict:
    return {"in_epoch": state.in_epoch, "model": cpu_state_dict(model),
            "optimiser": optimiser.state_dict(), "scaler": scaler.state_dict(), "epochs_done": state.epochs_done,
            "best_val_loss": state.best_val_loss, "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs, "stopped_early": state.stopped_early,
            "history": state.history, "rng": rng_states(), "config": cfg.to_dict(),
            "histomap_version": __version__}


def _resume(path: Path, model, optimiser, scaler, cfg: TrainConfig, batch_to_loss=None
            ) -> _State:
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
    in_epoch = ckpt.get("in_epoch")
    if in_epoch:
        if in_epoch.get("objective") is not None and not callable(
                getattr(batch_to_loss, "load_state_dict", None)):
            raise InputError(path, "the checkpoint holds an objective's state but this "
                                   "training's objective takes none; delete it to train from "
                                   "scratch")
        log.info("%s: epoch %d was stopped after batch %d; going on from there", path,
                 ckpt["epochs_done"] + 1, in_epoch["batches"])
    return _State(epochs_done=ckpt["epochs_done"], best_val_loss=ckpt["best_val_loss"],
                  best_epoch=ckpt["best_epoch"], bad_epochs=ckpt["bad_epochs"],
                  stopped_early=ckpt["stopped_early"], history=list(ckpt["history"]),
                  in_epoch=in_epoch)
