"""Flax checkpoints (``flax.serialization.to_bytes``: msgpack) read with ``msgpack`` and numpy only.

No JAX, no code: flax's format is a msgpack map of nested maps whose leaves are arrays packed as ext type 1
``(shape, dtype name, C-order bytes)``, numpy scalars as ext type 3, complex numbers as ext type 2, and arrays
over 2**30 bytes split into ``{'__msgpack_chunked_array__': True, 'shape': ..., 'chunks': ...}`` maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["looks_like_msgpack", "read_msgpack_tree"]


def looks_like_msgpack(head: bytes) -> bool:
    """A msgpack map header (fixmap with 1..15 entries, map16 or map32): what every flax checkpoint starts with.

    A fixmap of 0 entries (0x80) is excluded: that byte opens every pickle (the PROTO opcode).
    """
    return bool(head) and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


def _array(data: bytes) -> np.ndarray:
    import msgpack

    shape, dtype_name, buf = msgpack.unpackb(data, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
    if name == "bfloat16":
        raise ValueError("bfloat16 arrays are not supported (convert the checkpoint to float32)")
    return np.frombuffer(buf, dtype=np.dtype(name)).reshape(tuple(shape), order="C")


def _ext_hook(code: int, data: bytes):
    import msgpack

    if code == 1:
        return _array(data)
    if code == 2:
        re_, im = msgpack.unpackb(data)
        return complex(re_, im)
    if code == 3:
        return _array(data)[()]
    return msgpack.ExtType(code, data)


def _unchunk(tree):
    if isinstance(tree, dict):
        if tree.get("__msgpack_chunked_array__"):
            shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_msgpack_tree(path: str | Path) -> dict:
    """The nested dict of a flax msgpack checkpoint (numpy leaves). Raises ValueError on anything else."""
    import msgpack

    data = Path(path).read_bytes()
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError, TypeError) as err:
        raise ValueError(f"not a readable msgpack file ({err})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"msgpack content is a {type(tree).__name__}, not a map")
    return _unchunk(tree)
