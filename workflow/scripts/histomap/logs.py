"""Logging set-up and clean failure for pipeline steps.

Rule adapters call :func:`run_step`: log records go to the rule's log file and stderr, bad input
(:class:`histomap.errors.InputError`) ends the step with its one-line message and exit code 1,
and Snakemake then removes the step's outputs, so nothing partial is left behind.
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
    for noisy in ("numba", "matplotlib", "PIL", "fsspec", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_step(log_file: str | Path | None, fn: Callable, *args, **kwargs):
    """Run ``fn`` with logging to ``log_file``; exit 1 with a clear message on bad input."""
    setup_logging(log_file)
    log = logging.getLogger("histomap")
    try:
        return fn(*args, **kwargs)
    except InputError as exc:
        log.error("bad input: %s", exc)
        sys.exit(1)
    except Exception:
        log.exception("step failed")
        raise
