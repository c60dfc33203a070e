"""Training hyper-parameters (train_{model} rules): :class:`TrainConfig`, the plain values the loop
of :mod:`histomap.train` runs with, stored in checkpoints and ``model.pt``."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
