"""Checking a bundle of named arrays against what a run expects: names, shapes, dtypes, finite values.

Feature files, cache entries and model files are all bundles of named arrays read from disk, and a damaged or
foreign one must be caught when it is read, with a message that says what is wrong, not deep inside
clustering. Each reader declares its arrays once as :class:`ArraySpec` s; sizes shared between arrays are
named (``"h"``, ``"D"``), bound on first sight and then required everywhere they appear, so a reader that
adds an array adds one spec and gets every check for free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np


class ArrayCheckError(ValueError):
    """A bundle does not hold what is expected; ``str(err)`` says which array and why."""


@dataclass(frozen=True)
class ArraySpec:
    """One expected array.

    - ``shape``: ints are fixed sizes, strings are named sizes shared between arrays (and with ``dims``).
    - ``dtypes``: exact dtype names allowed (e.g. ``("float16",)``); None = any real number type (integers or
      floats, not bool, complex or text).
    - ``optional``: the array may be absent.
    - ``finite``: float values must all be finite.
    """

    shape: tuple[int | str, ...]
    dtypes: tuple[str, ...] | None = None
    optional: bool = False
    finite: bool = True


def _is_real(dtype: np.dtype) -> bool:
    return dtype.kind in "iuf"


def check_arrays(
    arrays: Mapping[str, np.ndarray],
    specs: Mapping[str, ArraySpec],
    dims: Mapping[str, int] | None = None,
    nonempty: tuple[str, ...] = (),
) -> dict[str, int]:
    """Check ``arrays`` against ``specs``; return the named sizes (``dims`` plus those bound here).

    ``dims`` fixes named sizes in advance (what the run expects); ``nonempty`` names sizes that must be at
    least 1. Arrays not in ``specs`` are left alone. Raises :class:`ArrayCheckError`.
    """
    bound: dict[str, int] = dict(dims or {})
    for name, spec in specs.items():
        if name not in arrays:
            if spec.optional:
                continue
            raise ArrayCheckError(f"array {name!r} is missing")
        arr = arrays[name]
        if not isinstance(arr, np.ndarray):
            raise ArrayCheckError(f"{name!r} is not an array")
        if spec.dtypes is not None:
            if arr.dtype.name not in spec.dtypes:
                raise ArrayCheckError(f"array {name!r} has dtype {arr.dtype.name}, expected {' or '.join(spec.dtypes)}")
        elif not _is_real(arr.dtype):
            raise ArrayCheckError(f"array {name!r} is not numeric (dtype {arr.dtype.name})")
        want = "(" + ", ".join(str(s) for s in spec.shape) + ("," if len(spec.shape) == 1 else "") + ")"
        if arr.ndim != len(spec.shape):
            raise ArrayCheckError(f"array {name!r} has shape {tuple(arr.shape)}, expected {want}")
        for size, s in zip(arr.shape, spec.shape):
            if isinstance(s, int):
                ok = size == s
            else:
                ok = bound.setdefault(s, int(size)) == size
            if not ok:
                known = ", ".join(f"{k}={v}" for k, v in bound.items() if k in spec.shape)
                raise ArrayCheckError(f"array {name!r} has shape {tuple(arr.shape)}, expected {want} with {known}")
        if spec.finite and arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            raise ArrayCheckError(f"array {name!r} holds NaN or infinite values")
    for s in nonempty:
        if s in bound and bound[s] < 1:
            raise ArrayCheckError(f"size {s} is 0 (empty array)")
    return bound
