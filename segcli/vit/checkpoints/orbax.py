"""Orbax checkpoint directories (flax's current default checkpoint format), read without JAX or TensorStore.

Layout (orbax.readthedocs.io, "Checkpoint Format Guide"): a step directory (``checkpoint_<step>/`` or ``<step>/``)
holds ``_CHECKPOINT_METADATA`` and one sub-directory per item (``default/``, ``state/``, ``params/``, ...); an item
(``PyTreeCheckpointHandler``) holds ``_METADATA`` (JSON: the tree structure), the *aggregate* file ``checkpoint``
(flax msgpack, the same encoding as ``flax.serialization.to_bytes``) and, for arrays written by TensorStore, an
OCDBT database (``manifest.ocdbt``, ``ocdbt.process_*/``) or per-array zarr folders.  Arrays kept in the aggregate
file are read like any flax msgpack checkpoint; arrays stored by TensorStore are represented there only by
``PLACEHOLDER://`` strings and need TensorStore's own database code, which segcli does not carry: for those the
error says exactly how to turn the directory into a single msgpack file segcli reads.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from segcli.vit.checkpoints.flax_msgpack import looks_like_msgpack, read_msgpack_tree
from segcli.errors import ModelError

__all__ = ["CONVERT_HINT", "looks_like_orbax", "read_orbax"]

_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "orbax.checkpoint", "_sharding")
_ITEM_NAMES = ("default", "state", "params", "pytree", "model")
PLACEHOLDER = "PLACEHOLDER://"

CONVERT_HINT = (
    "convert it once to a flax msgpack file with: python -c \"import sys, orbax.checkpoint as ocp, flax.serialization "
    "as fs; open(sys.argv[2], 'wb').write(fs.to_bytes(ocp.PyTreeCheckpointer().restore(sys.argv[1])))\" {item} "
    "weights.msgpack, then pass --weights weights.msgpack"
)


def _has_markers(p: Path) -> bool:
    return any((p / m).exists() for m in _MARKERS)


def looks_like_orbax(p: Path) -> bool:
    """An Orbax step or item directory (or a folder holding exactly such directories one level down)."""
    if _has_markers(p):
        return True
    try:
        return any(c.is_dir() and _has_markers(c) for c in p.iterdir())
    except OSError:
        return False


def _item_dir(p: Path) -> Path:
    """The item holding the PyTree: ``p`` itself, or its one sub-directory with ``_METADATA`` (by name if several)."""
    if (p / "_METADATA").exists() or (p / "checkpoint").exists() or (p / "manifest.ocdbt").exists():
        return p
    items = sorted(c for c in p.iterdir() if c.is_dir() and ((c / "_METADATA").exists() or (c / "checkpoint").exists()))
    if not items:
        raise ModelError(f"weights path {p} is an Orbax checkpoint directory without a PyTree item (no _METADATA)")
    for name in _ITEM_NAMES:
        for c in items:
            if c.name == name:
                return c
    if len(items) > 1:
        raise ModelError(f"weights path {p} holds several Orbax items ({', '.join(c.name for c in items)}): "
                         "pass the one holding the model parameters")
    return items[0]


def _placeholders(tree, depth: int = 0) -> bool:
    if isinstance(tree, str):
        return tree.startswith(PLACEHOLDER)
    if isinstance(tree, dict) and depth < 64:
        return any(_placeholders(v, depth + 1) for v in tree.values())
    if isinstance(tree, (list, tuple)) and depth < 64:
        return any(_placeholders(v, depth + 1) for v in tree)
    return False


def read_orbax(p: Path) -> dict:
    """The parameter tree of an Orbax checkpoint whose arrays are in its aggregate msgpack file.

    Raises a one-line :class:`ModelError` naming the directory otherwise (TensorStore storage, no PyTree, ...).
    """
    item = _item_dir(p)
    agg = item / "checkpoint"
    tensorstore = (item / "manifest.ocdbt").exists() or any(item.glob("ocdbt.process_*")) or any(item.glob("*/.zarray"))
    tree = None
    if agg.exists():
        st = os.stat(agg)
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"weights path {p}: Orbax aggregate file {agg} is not a regular file")
        with open(agg, "rb") as f:
            head = f.read(4)
        if looks_like_msgpack(head):
            try:
                tree = read_msgpack_tree(agg)
            except (ValueError, OSError) as err:
                raise ModelError(f"weights path {p}: Orbax aggregate file {agg} is not readable msgpack ({err})") from None
    if tree is not None and not _placeholders(tree):
        return tree
    if tensorstore or tree is not None:
        raise ModelError(f"weights path {p} is an Orbax checkpoint whose arrays are stored by TensorStore "
                         f"({'OCDBT' if (item / 'manifest.ocdbt').exists() else 'zarr'}), which segcli does not read: "
                         + CONVERT_HINT.format(item=item))
    raise ModelError(f"weights path {p} is an Orbax checkpoint directory without parameters segcli can read: "
                     + CONVERT_HINT.format(item=item))
