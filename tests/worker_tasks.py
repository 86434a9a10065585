"""Task functions for tests/test_workers.py (a small module, so that spawned workers import little)."""

from __future__ import annotations

import os
import time

from segcli.errors import BadImageError


def scaled(context: dict, x: int, delay: float = 0.0) -> int:
    if delay:
        time.sleep(delay)
    return x * context["scale"]


def picky(context: dict, x: int) -> int:
    if x == 3:
        raise BadImageError(f"image {x}: unreadable")
    return x * context["scale"]


def buggy(context: dict, x: int) -> int:
    if x == 2:
        raise RuntimeError("a bug")
    return x


def threads(context: dict) -> tuple[int, int]:
    import torch

    return torch.get_num_threads(), os.getpid()


def sleepy(context: dict, seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()
