"""What a cluster does to a long job: SIGTERM (a SLURM time limit, ``scancel``, preemption), then
SIGKILL after the grace period (``KillWait``, 30 s by default); SIGINT (Ctrl-C) alike.

Every rule step runs under :func:`handling` (installed by :func:`histomap.logs.run_step`):

* **outside** a :func:`deferred` section a signal ends the step at once: :class:`Interrupted`
  is raised where the program is, so ``atomic_output`` blocks remove their partial files as for
  any failure, and the step exits with ``128 + signal`` (143 for SIGTERM);
* **inside** one (the training loop, the dense map's tile loop, SR prediction's patch loop) the
  signal only sets a flag. The loop polls :func:`requested` at its next safe boundary (a batch),
  records its progress there (``last.pt``; the dense map's written bands; the SR maps' written
  patches) and raises :class:`Interrupted`; the rerun (a Snakemake retry, a SLURM requeue, the
  same command again) resumes from that record and ends with the result an uninterrupted run
  gives. A second signal during a deferred section raises at once (what was recorded before
  stays valid: every record is written atomically).

Leaving a deferred section with a signal pending raises :class:`Interrupted` too, so a step
never goes on with other work after it was told to stop.

Long loops use :func:`resumable_output` for stores they resume: like
:func:`histomap.outputs.atomic_output` (written under ``NAME.partial``, renamed when complete,
removed after a failure) except that an interruption keeps the partial store for the rerun.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from histomap.outputs import atomic_output, partial_path

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The step was told to stop by ``signum``. A ``BaseException`` (like KeyboardInterrupt),
    so ``except Exception`` blocks do not swallow it."""

    def __init__(self, signum: int, where: str = ""):
        self.signum = int(signum)
        self.where = where
        name = signal.Signals(self.signum).name
        super().__init__(f"{name}{f' during {where}' if where else ''}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    def __init__(self) -> None:
        self.pending: int | None = None   # signal received and not acted on yet
        self.depth = 0                    # nesting of deferred sections
        self.what: list[str] = []
        self.installed = False


_state = _State()


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    first = _state.pending is None
    _state.pending = signum
    name = signal.Signals(signum).name
    if _state.depth > 0 and first:
        log.warning("%s received: stopping %s at the next safe point (progress is recorded "
                    "for the rerun)", name, _state.what[-1])
        return
    raise Interrupted(signum, _state.what[-1] if _state.what else "")


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install the handler for SIGTERM and SIGINT for the duration (main thread only; elsewhere
    a no-op), restoring the previous handlers afterwards."""
    if _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state.installed, _state.pending = True, None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state.installed, _state.pending = False, None


def installed() -> bool:
    return _state.installed


@contextlib.contextmanager
def deferred(what: str) -> Iterator[None]:
    """A section that polls :func:`requested` at safe points: a signal inside it is deferred."""
    _state.depth += 1
    _state.what.append(what)
    try:
        yield
    finally:
        _state.depth -= 1
        _state.what.pop()
    if _state.pending is not None and _state.depth == 0:
        raise Interrupted(_state.pending, what)


def requested() -> bool:
    """True once a signal has arrived (the loop should record its progress and stop)."""
    return _state.pending is not None


def check(where: str = "") -> None:
    """Raise :class:`Interrupted` if a signal has arrived."""
    if _state.pending is not None:
        raise Interrupted(_state.pending, where or (_state.what[-1] if _state.what else ""))


def _reset_for_tests() -> None:
    _state.pending = None


@contextlib.contextmanager
def resumable_output(path: str | Path) -> Iterator[tuple[Path, bool]]:
    """Yield ``(partial, existed)``: the store is written under ``path.partial`` (kept from an
    interrupted earlier run: ``existed`` says so; the writer decides whether it can resume it),
    renamed onto ``path`` when the block ends, kept when it ends by :class:`Interrupted` (or a
    SIGKILL), removed after any other exception (:func:`histomap.outputs.atomic_output`)."""
    existed = partial_path(Path(path)).is_dir()
    try:
        with atomic_output(path, keep_partial_on=(Interrupted,)) as tmp:
            yield tmp, existed
    except Interrupted:
        log.warning("%s: partial output kept for the rerun", partial_path(Path(path)))
        raise
