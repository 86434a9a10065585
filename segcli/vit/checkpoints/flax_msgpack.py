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

    try:
        shape, dtype_name, buf = msgpack.unpackb(data, raw=True)
        name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
        if name == "bfloat16":
            raise ValueError("bfloat16 arrays are not supported (convert the checkpoint to float32)")
        dtype = np.dtype(name)
        if dtype.kind not in "biufc" or not isinstance(buf, bytes) or not isinstance(shape, (list, tuple)):
            raise ValueError(f"an array of dtype {name} is not checkpoint data")
        return np.frombuffer(buf, dtype=dtype).reshape(tuple(int(d) for d in shape), order="C")
    except ValueError:
        raise
    except Exception as err:  # a malformed ext payload: TypeError, msgpack errors, ...
        raise ValueError(f"malformed array ({type(err).__name__})") from None


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


# Nesting deeper than any model's parameter tree is refused (a 1.5 KB file of nested maps would otherwise
# exhaust Python's recursion limit in every reader that walks the tree).
MAX_DEPTH = 64


def _chunked(tree: dict) -> np.ndarray:
    """flax's ``{'__msgpack_chunked_array__': True, 'shape': {'0': n, ...}, 'chunks': {'0': array, ...}}``."""
    shape_map, chunk_map = tree.get("shape"), tree.get("chunks")
    if not isinstance(shape_map, dict) or not isinstance(chunk_map, dict):
        raise ValueError("a chunked array without a 'shape' and 'chunks' map")
    try:
        shape = tuple(int(shape_map[str(i)]) for i in range(len(shape_map)))
        chunks = [chunk_map[str(i)] for i in range(len(chunk_map))]
    except (KeyError, TypeError, ValueError):
        raise ValueError("a chunked array whose 'shape' or 'chunks' are not numbered 0..n-1 integers / arrays") from None
    if not chunks or not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in chunks) or any(d < 0 for d in shape):
        raise ValueError("a chunked array whose chunks are not flat arrays")
    if int(np.prod(shape, dtype=np.int64)) != sum(c.size for c in chunks):
        raise ValueError(f"a chunked array of shape {shape} with {sum(c.size for c in chunks)} elements")
    return np.concatenate(chunks).reshape(shape)


def _unchunk(tree, depth: int = 0):
    if isinstance(tree, dict):
        if depth > MAX_DEPTH:
            raise ValueError(f"maps nested deeper than {MAX_DEPTH} levels")
        if tree.get("__msgpack_chunked_array__"):
            return _chunked(tree)
        return {k: _unchunk(v, depth + 1) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        if depth > MAX_DEPTH:
            raise ValueError(f"lists nested deeper than {MAX_DEPTH} levels")
        return type(tree)(_unchunk(v, depth + 1) for v in tree)
    return tree


def read_msgpack_tree(path: str | Path) -> dict:
    """The nested dict of a flax msgpack checkpoint (numpy leaves). Raises ValueError on anything else."""
    import msgpack

    data = Path(path).read_bytes()
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError, TypeError, RecursionError) as err:
        raise ValueError(f"not a readable msgpack file ({err})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"msgpack content is a {type(tree).__name__}, not a map")
    return _unchunk(tree)
