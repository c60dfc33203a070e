"""Torch CPU threads: one setting, one owner.

CPU kernels sum in an order that depends on the number of intra-op threads, so a training's
weights and a prediction's values could change with the cores a job is given. Every torch job of
histomap (training, dense maps, feature caches, sampling, apply) therefore runs with one fixed
count, the ``train.torch_threads`` of its model's config (default
:data:`DEFAULT_TORCH_THREADS`), never with Snakemake's ``--cores``: the numbers do not depend on
the machine's core count. The workflow reserves the same count as the job's ``threads``.
Training sets it inside :func:`histomap.train.fit`; every other torch step calls
:func:`set_threads` once, in its rule adapter or the command line.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

DEFAULT_TORCH_THREADS = 1


def torch_threads_of(train: Mapping[str, Any] | None) -> int:
    """The fixed thread count of a ``train`` config block (``torch_threads``)."""
    n = int((train or {}).get("torch_threads", DEFAULT_TORCH_THREADS))
    if n < 1:
        raise ValueError(f"torch_threads must be >= 1, got {n}")
    return n


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads for this process to ``n`` (default the fixed count)."""
    import torch

    n = DEFAULT_TORCH_THREADS if n is None else int(n)
    if n < 1:
        raise ValueError(f"torch threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def torch_threads(n: int | None = None) -> Iterator[int]:
    """Run a block with ``n`` intra-op threads, restoring the previous count afterwards."""
    import torch

    before = torch.get_num_threads()
    try:
        yield set_threads(n)
    finally:
        torch.set_num_threads(before)
