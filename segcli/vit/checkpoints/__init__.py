"""Checkpoint files -> a frozen ViT's tensors: one small reader per format, chosen by the file's content.

Containers (how the bytes are read): safetensors; PyTorch zip/legacy pickles through
``torch.load(weights_only=True)``, and zip pickles that it refuses (Lightning / omegaconf objects) through
:mod:`~segcli.vit.checkpoints.safe_pickle`, which imports and runs nothing named in the file; flax msgpack through
:mod:`~segcli.vit.checkpoints.flax_msgpack` (msgpack + numpy, no JAX).

Layouts (what the tensors mean), tried in this order on the content, never the file name:
:mod:`~segcli.vit.checkpoints.stego`, :mod:`~segcli.vit.checkpoints.leopart`, :mod:`~segcli.vit.checkpoints.loca`, and
:mod:`~segcli.vit.checkpoints.vit` (official DINO / DINOv2 / DINOv3, timm state dicts, safetensors).
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import struct
import zipfile
from pathlib import Path

import torch

from segcli.vit.checkpoints import leopart, loca, stego, vit
from segcli.vit.checkpoints.base import Checkpoint, check_tensor_sizes, first_line
from segcli.vit.checkpoints.flax_msgpack import looks_like_msgpack, read_msgpack_tree
from segcli.vit.checkpoints.safe_pickle import RefusedGlobal, UnsafeSize, check_archive, check_pickle, load_zip_checkpoint
from segcli.errors import ModelError

__all__ = ["Checkpoint", "LAYOUTS", "open_checkpoint", "read_checkpoint"]

LAYOUTS = (stego, leopart, loca, vit)


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) < 9:
            return False
        (n,) = struct.unpack("<Q", head[:8])
        return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8
    except OSError:
        return False


def _check_zip(p: Path) -> None:
    """Bound every size the archive states before torch or segcli reads it (see :mod:`.safe_pickle`)."""
    try:
        with zipfile.ZipFile(p) as zf:
            check_archive(zf, p.stat().st_size)
            pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if pkl:
                check_pickle(zf.read(pkl[0]))
    except UnsafeSize as err:
        raise ModelError(f"weights file {p} states sizes it cannot hold ({err}): refused before reading it") from None
    except Exception as err:  # BadZipFile, a malformed pickle, OSError
        raise ModelError(f"weights file {p} is corrupt or not a PyTorch checkpoint ({first_line(err)})") from None


def _read_pickle(p: Path, is_zip: bool) -> object:
    if is_zip:
        _check_zip(p)
    try:
        # Full DINO training checkpoints carry an argparse.Namespace of their arguments: plain data,
        # so it is allow-listed; anything else that is not tensors/containers/primitives is refused.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if not ("Weights only load failed" in text and m):
            raise ModelError(f"weights file {p} is corrupt, truncated or not a PyTorch checkpoint ({first_line(err)})") from None
        refused = m.group(1)
    if not is_zip:
        raise ModelError(
            f"weights file {p} holds Python objects ({refused}) that segcli's safe loader "
            "(weights_only=True) refuses: use a plain state-dict or .safetensors checkpoint"
        )
    try:
        return load_zip_checkpoint(p)
    except UnsafeSize as err:
        raise ModelError(f"weights file {p} states sizes it cannot hold ({err}): refused before reading it") from None
    except RefusedGlobal as ref:
        raise ModelError(
            f"weights file {p} refers to {ref.name}, which is not checkpoint data: refused without importing or "
            "running anything (segcli reads pickles with weights_only=True or a restricted unpickler)"
        ) from None
    except Exception as err:
        raise ModelError(f"weights file {p} is corrupt or not a PyTorch checkpoint ({first_line(err)})") from None


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def read_checkpoint_dir(p: Path) -> dict:
    """A directory given as --weights: an Orbax checkpoint (flax's current default format) or nothing."""
    from segcli.vit.checkpoints.orbax import looks_like_orbax, read_orbax

    if looks_like_orbax(p):
        return read_orbax(p)
    raise ModelError(f"weights path {p} is a directory and not an Orbax checkpoint: pass the checkpoint file itself")


def read_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file into a dict, safely, whatever its container (see the module docstring).

    Every failure is a one-line :class:`ModelError` naming the file.
    """
    p = Path(path).expanduser()
    try:
        st = os.stat(p)  # follows symlinks: a link to a FIFO is a FIFO
    except OSError:
        raise ModelError(f"weights file {p} not found: check the --weights path") from None
    if stat.S_ISDIR(st.st_mode):
        return read_checkpoint_dir(p)
    if not stat.S_ISREG(st.st_mode):
        # a FIFO, socket or device would block or stream forever in the first read: never opened
        raise ModelError(f"weights path {p} is not a regular file ({_file_kind(st.st_mode)}): pass the checkpoint file itself")
    if p.suffix.lower() == ".safetensors" or _looks_like_safetensors(p):
        try:
            from safetensors.torch import load_file

            return load_file(str(p), device="cpu")
        except Exception as err:  # safetensors raises its own error types, OSError, ...
            raise ModelError(f"weights file {p} is not a readable safetensors file ({first_line(err)})") from None
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise ModelError(f"weights file {p} cannot be read ({err.strerror or err})") from None
    if looks_like_msgpack(head):
        try:
            return read_msgpack_tree(p)
        except (ValueError, OSError) as err:
            raise ModelError(f"weights file {p} is not a readable flax msgpack checkpoint ({first_line(err)})") from None
    obj = _read_pickle(p, is_zip=head.startswith(b"PK") and zipfile.is_zipfile(p))
    if not isinstance(obj, dict):
        raise ModelError(f"weights file {p} is not a state-dict checkpoint (it holds a {type(obj).__name__})")
    return obj


def parse_checkpoint(raw: dict, label: str) -> Checkpoint:
    """The first layout that recognises ``raw`` (the plain ViT layout is the fallback)."""
    for layout in LAYOUTS:
        ck = layout.parse(raw, label)
        if ck is not None:
            return ck
    raise ModelError(f"{label} holds no tensors of a ViT backbone")


_LAST: dict = {}


def _size_budget(p: Path) -> int:
    """Bytes any one tensor of this file (or Orbax directory) may take: its size, plus 1 MiB of slack."""
    try:
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    except OSError:
        size = 0
    return size + (1 << 20)


def open_checkpoint(path: str | Path, keep: bool = False) -> Checkpoint:
    """Read and recognise a checkpoint file.

    ``keep=True`` remembers the result (one file, by path, size and mtime) for the next call, so the CLI can
    read the architecture from a file and then build the model without parsing it twice; the next call takes
    it out again, so no checkpoint outlives the model built from it.
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and _LAST.get("key") == key:
        ck = _LAST["ck"]
        if not keep:
            _LAST.clear()
        return ck
    _LAST.clear()
    raw = read_checkpoint(p)
    check_tensor_sizes(raw, _size_budget(p), f"weights file {p}")
    ck = parse_checkpoint(raw, f"weights file {p}")
    if keep and key is not None:
        _LAST.update(key=key, ck=ck)
    return ck
