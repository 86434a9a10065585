"""A restricted unpickler for PyTorch zip checkpoints that ``torch.load(weights_only=True)`` refuses.

Lightning checkpoints (STEGO's, Leopart's training files) pickle omegaconf configs, Lightning attribute
dicts and, before Lightning 1.5, callback *classes* used as dict keys.  torch's safe loader refuses them
all.  This reader never imports or calls anything named in the file: tensors are rebuilt by hand from the
archive's raw storages, plain containers are rebuilt as such, and every class of a known plain-data
library (omegaconf, Lightning, typing, argparse, numpy scalars, ...) becomes an inert stub that only stores
what the file gives it.  Any other global (``os.system``, ``builtins.exec``, an unknown module) is refused
before anything happens, so a file that tries to run code is an error, not a silent success.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import torch

__all__ = ["RefusedGlobal", "load_zip_checkpoint"]

# Module prefixes whose classes are plain data in known checkpoint layouts; they become inert stubs.
STUB_PREFIXES = (
    "omegaconf.", "pytorch_lightning.", "lightning.", "lightning_fabric.", "typing.", "argparse.", "pathlib.",
    "datetime.", "enum.", "collections.", "copyreg._reconstructor", "numpy.core.multiarray.", "numpy._core.multiarray.",
    "numpy.dtype", "numpy.ndarray", "torch.torch_version.TorchVersion",
)
_BUILTIN_DATA = {
    "dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "int": int, "float": float,
    "str": str, "bytes": bytes, "bool": bool, "complex": complex, "bytearray": bytearray,
}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}


class RefusedGlobal(Exception):
    """The file names a callable that is not checkpoint data (nothing was imported or run)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _Stub(dict):
    """Inert stand-in for a pickled class: accepts constructor args, items and state; does nothing else."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):  # noqa: D401 - REDUCE calls cls(*args)
        super().__init__()
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def append(self, value):  # list subclasses are filled by APPENDS
        self.setdefault("__items__", []).append(value)

    def extend(self, values):
        self.setdefault("__items__", []).extend(values)

    def __repr__(self) -> str:
        return f"<stub {self._qualname}>"


_STUBS: dict[str, type] = {}


def _stub(qualname: str) -> type:
    if qualname not in _STUBS:
        _STUBS[qualname] = type(qualname.rsplit(".", 1)[-1], (_Stub,), {"_qualname": qualname})
    return _STUBS[qualname]


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):
    data, dtype = storage
    flat = torch.frombuffer(data, dtype=dtype) if len(data) else torch.empty(0, dtype=dtype)
    return flat.as_strided(tuple(size), tuple(stride), int(storage_offset))


def _rebuild_parameter(data, *_rest):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)


_TORCH_FUNCS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix = zf, prefix
        self._storages: dict[str, tuple[bytearray, torch.dtype]] = {}

    def find_class(self, module: str, name: str):  # never imports ``module``
        qual = f"{module}.{name}"
        if (module, name) in _TORCH_FUNCS:
            return _TORCH_FUNCS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module in ("builtins", "__builtin__") and name in _BUILTIN_DATA:
            return _BUILTIN_DATA[name]
        if qual.startswith(STUB_PREFIXES):
            return _stub(qual)
        raise RefusedGlobal(qual)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.60}")
        storage_type, key = pid[1], str(pid[2])
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else torch.uint8
        if key not in self._storages:
            self._storages[key] = (bytearray(self._zf.read(f"{self._prefix}data/{key}")), dtype)
        data, _ = self._storages[key]
        return data, dtype


def load_zip_checkpoint(path: str | Path) -> object:
    """Unpickle a torch zip checkpoint with :class:`_Unpickler` (raises :class:`RefusedGlobal`, ``zipfile`` and
    ``pickle`` errors)."""
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise pickle.UnpicklingError("no data.pkl in the archive")
        prefix = pkl[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in zf.namelist() and zf.read(order).strip() not in (b"little", b""):
            raise pickle.UnpicklingError("big-endian checkpoints are not supported")
        return _Unpickler(zf.read(pkl[0]), zf, prefix).load()
