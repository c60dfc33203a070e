"""The checkpoint folder of a training (train_{model}): ``last.pt`` and ``best.pt`` written
atomically, ``train_log.csv``, the ``writer.lock`` that keeps two runs of one training apart
(:class:`CheckpointLock`), and the discarding of checkpoints that belong to another training
(:func:`discard_stale_checkpoints`).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from histomap.checked_io import check_sidecar, load_torch_checked, save_torch_checked
from histomap.compat import torch
from histomap.errors import InputError
from histomap.outputs import atomic_output
from histomap.training.config import TrainConfig
from histomap.training.fingerprint import describe_changes, fingerprint, fit_parts

log = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "seconds")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary name, then rename (a kill never leaves a half file), and
    the SHA-256 sidecar (``last.pt.sha256``) that :func:`discard_stale_checkpoints` and
    :func:`load_checkpoint` compare before a checkpoint is used."""
    return save_torch_checked(obj, path)


def load_checkpoint(path: str | Path) -> Any:
    """A checkpoint (``last.pt``, ``best.pt``) checked against its sidecar; a corrupt or
    truncated one is an InputError that says to delete the checkpoint folder."""
    path = Path(path)
    return load_torch_checked(path, what="training checkpoint",
                              remedy=f"delete the folder {path.parent} and rerun (the training "
                                     "starts again from scratch)")


def write_log(rows: Sequence[Mapping], path: str | Path) -> None:
    """Write the epoch rows as ``train_log.csv`` (atomically)."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in LOG_COLUMNS} for row in rows)


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
    :attr:`HEARTBEAT_S` seconds. Another live process on this host is an error. A lock from
    another host cannot be checked for a live process, so it is watched: refreshed while we
    wait, its writer is alive (an error); not refreshed for :attr:`STALE_S` seconds, it is
    stale and taken over (a training SIGKILLed on one node and retried by SLURM on another
    waits here for at most that long instead of failing its retries). A stale lock of this
    host (dead process) is taken over at once, with a log line. Re-entrant within one process.
    """

    NAME = "writer.lock"
    HEARTBEAT_S = 30.0
    STALE_S = 180.0
    POLL_S = 5.0  # how often a lock of another host is looked at while it is watched

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
            self._watch_other_host(pid, host)

    def _watch_other_host(self, pid, host) -> None:
        """Return once the lock of ``host`` is stale or gone; raise if it is refreshed."""
        try:
            seen = self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if time.time() - seen >= self.STALE_S:
            return
        log.warning("%s: the checkpoint lock of process %s on host %s was refreshed %.0f s ago; "
                    "waiting up to %.0f s to see whether that training is alive",
                    self.path.parent, pid, host, time.time() - seen, self.STALE_S)
        while time.time() - seen < self.STALE_S:
            time.sleep(min(self.POLL_S, max(0.0, self.STALE_S - (time.time() - seen))))
            try:
                now = self.path.stat().st_mtime
            except FileNotFoundError:
                return  # released
            if now != seen:
                raise InputError(self.path.parent, (
                    f"another training (process {pid} on host {host}) is writing these "
                    "checkpoints (its lock is being refreshed). Wait for it or stop it; a "
                    f"lock not refreshed for {self.STALE_S:.0f} s is taken over"))

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
    parts = fit_parts(model, cfg, fingerprint_parts)
    digest = fingerprint(parts)
    last = out_dir / "last.pt"
    if not last.exists():
        return digest
    reason = None
    try:
        check_sidecar(last, what="checkpoint")
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or unreadable checkpoint is discarded
        reason = f"it cannot be used ({type(exc).__name__}: {exc})"
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
