"""Logging set-up and clean failure for pipeline steps.

Rule adapters call :func:`run_step`: log records go to the rule's log file and stderr, bad input
(:class:`histomap.errors.InputError`) ends the step with its one-line message and exit code 1,
and Snakemake then removes the step's outputs, so nothing partial is left behind.

SIGTERM / SIGINT (a cluster's time limit, ``scancel``, Ctrl-C) are handled by
:mod:`histomap.interrupt` while the step runs: long loops record their progress at the next batch
and stop, others stop at once; either way the step exits with ``128 + signal`` (143 for SIGTERM)
and a log line saying what the rerun will resume from.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from histomap.errors import InputError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)
    for noisy in ("numba", "matplotlib", "PIL", "fsspec", "asyncio", "ome_zarr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_step(log_file: str | Path | None, fn: Callable, *args, **kwargs):
    """Run ``fn`` with logging to ``log_file``; exit 1 with a clear message on bad input, and
    ``128 + signal`` when stopped by SIGTERM / SIGINT (:mod:`histomap.interrupt`)."""
    from histomap import interrupt

    setup_logging(log_file)
    log = logging.getLogger("histomap")
    try:
        with interrupt.handling():
            return fn(*args, **kwargs)
    except interrupt.Interrupted as exc:
        log.warning("stopped by %s (exit %d); what was recorded (checkpoints, written tiles or "
                    "patches) is resumed by the rerun", exc, exc.exit_code)
        sys.exit(exc.exit_code)
    except InputError as exc:
        log.error("bad input: %s", exc)
        sys.exit(1)
    except Exception:
        log.exception("step failed")
        raise


class Progress:
    """Progress of a long step in its log: a line at most every ``every_s`` seconds with the
    count, the rate and the time left (``what: 120/400 tiles (30%), 12.3 tiles/s, ~23 s
    left``), and one at the end. Works where a progress bar cannot (log files, cluster jobs).

    ``update(n)`` after each unit of work; ``close()`` (or leaving the ``with`` block) writes
    the final line.
    """

    def __init__(self, total: int | None, what: str, unit: str = "items", *,
                 every_s: float = 5.0, logger: logging.Logger | None = None,
                 clock: Callable[[], float] | None = None):
        import time

        self.total, self.what, self.unit = total, what, unit
        self.every_s = float(every_s)
        self.log = logger or logging.getLogger("histomap.progress")
        self.clock = clock or time.perf_counter
        self.start = self.last = self.clock()
        self.done = 0
        self.closed = False
        self.extra = ""

    def _line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        pct = f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""
        left = ""
        if self.total and rate > 0 and self.done < self.total:
            left = f", ~{(self.total - self.done) / rate:.0f} s left"
        extra = f", {self.extra}" if self.extra else ""
        return (f"{self.what}: {count} {self.unit}{pct}, {rate:.3g} {self.unit}/s, "
                f"{elapsed:.0f} s{left}{extra}")

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += int(n)
        if extra:
            self.extra = extra
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.log.info(self._line())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.log.info(self._line() + " (done)")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


def progress(items, what: str, unit: str = "items", total: int | None = None, **kwargs):
    """Iterate ``items``, logging a :class:`Progress` line every few seconds and at the end."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(total, what, unit, **kwargs) as bar:
        for item in items:
            yield item
            bar.update(1)
