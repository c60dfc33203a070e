"""Errors raised on bad user input.

Every message names the offending file and the problem, so a user can fix it without a traceback.
"""
from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input data or configuration: ``InputError(path, problem)``."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
