"""Ways to damage a file on disk, shared by the reliability and corpus tests (each builds its own bad input)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

MODES = ("truncate", "zero", "garble", "swap", "shape", "drop")


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_npz(path: Path, arrays: dict[str, np.ndarray], compressed: bool = False) -> None:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    path.write_bytes(buf.getvalue())


def damage(paths: list[Path], mode: str) -> None:
    """Damage cache entries in place. ``swap`` exchanges the first two files (each stays a valid entry, of
    another image); ``shape`` changes the first array's shape and ``drop`` removes an array, both keeping the
    stored digest, as a buggy writer or a hand edit would."""
    if mode == "swap":
        a, b = paths[0].read_bytes(), paths[1].read_bytes()
        paths[0].write_bytes(b)
        paths[1].write_bytes(a)
        return
    for p in paths:
        raw = p.read_bytes()
        if mode == "truncate":
            p.write_bytes(raw[: len(raw) // 2])
        elif mode == "zero":
            p.write_bytes(bytes(len(raw)))
        elif mode == "garble":
            b = bytearray(raw)
            mid = len(b) // 2
            for i in range(mid, min(mid + 64, len(b))):
                b[i] ^= 0x5A
            p.write_bytes(bytes(b))
        elif mode in ("shape", "drop"):
            compressed = raw[:4] == b"PK\x03\x04" and _is_compressed(p)
            arrays = npz_arrays(p)
            names = sorted(k for k in arrays if not k.startswith("__"))
            if mode == "drop":
                del arrays[names[-1]]
            else:
                big = max(names, key=lambda k: arrays[k].ndim)
                a = arrays[big]
                arrays[big] = a[..., :-1] if a.shape[-1] > 1 else np.concatenate([a, a], axis=-1)
            write_npz(p, arrays, compressed)
        else:
            raise ValueError(mode)


def _is_compressed(path: Path) -> bool:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist())
