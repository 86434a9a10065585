"""A restricted unpickler for PyTorch zip checkpoints that ``torch.load(weights_only=True)`` refuses.

Lightning checkpoints (STEGO's, Leopart's training files) pickle omegaconf configs, Lightning attribute
dicts and, before Lightning 1.5, callback *classes* used as dict keys.  torch's safe loader refuses them
all.  This reader never imports or calls anything named in the file: tensors are rebuilt by hand from the
archive's raw storages, plain containers are rebuilt as such, and every class of a known plain-data
library (omegaconf, Lightning, typing, argparse, numpy scalars, ...) becomes an inert stub that only stores
what the file gives it.  Any other global (``os.system``, ``builtins.exec``, an unknown module) is refused
before anything happens, so a file that tries to run code is an error, not a silent success.

Training code writes more than tensors, and each allowance below is a data constructor with no side effect:

* numpy scalars (DINO's and Leopart's optimizer ``param_groups`` hold numpy float64 ``lr``/``weight_decay``):
  ``numpy.core.multiarray.scalar(dtype, bytes)`` (``numpy._core`` under numpy 2) and ``numpy.dtype(name)``
  rebuild only plain bool / int / float / complex scalars from their raw bytes;
* protocol-2 bytes, written as ``_codecs.encode('<latin-1 text>', 'latin1')``: only that, ``str.encode('latin1')``;
* Python 2 names of protocol-2 pickles (``__builtin__.long``, ``copy_reg._reconstructor``, ...) are first mapped
  with the standard library's own table (``_compat_pickle``), then checked like any other name;
* sacred's read-only config containers (Leopart is a sacred experiment): ``ReadOnlyList(list)`` /
  ``ReadOnlyDict(dict)`` become a plain list / dict.

Before unpickling, every size the file states is bounded (:func:`check_pickle`, :func:`check_archive`): no
archive member larger than the archive (no decompression bombs), no memo index beyond what the pickle could
have stored (the C unpickler allocates its memo table up to the largest index), and no ``bytes``/``bytearray``
of a stated length.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["RefusedGlobal", "UnsafeSize", "check_archive", "check_pickle", "load_zip_checkpoint"]

# Module prefixes whose classes are plain data in known checkpoint layouts; they become inert stubs.
STUB_PREFIXES = (
    "omegaconf.", "pytorch_lightning.", "lightning.", "lightning_fabric.", "typing.", "argparse.", "pathlib.",
    "datetime.", "enum.", "collections.", "copyreg._reconstructor", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct", "numpy.ndarray", "torch.torch_version.TorchVersion",
)
_BUILTIN_DATA = {
    "dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "int": int, "float": float,
    "str": str, "bool": bool, "complex": complex, "object": object,
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


class UnsafeSize(Exception):
    """A size stated in the file is beyond what the file can hold (refused before anything is allocated)."""


def check_archive(zf: zipfile.ZipFile, archive_size: int) -> None:
    """Refuse a zip whose members claim more bytes than the whole archive has.

    torch writes its records uncompressed, so a real checkpoint's members are never larger than the file;
    a compressed member that expands beyond it is a decompression bomb (1 MB file, 1 GiB ``data.pkl``).
    """
    for info in zf.infolist():
        if info.file_size > archive_size:
            raise UnsafeSize(f"archive member {info.filename} claims {info.file_size} bytes in a {archive_size}-byte file")


_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def check_pickle(data: bytes) -> None:
    """Walk the opcodes without running them and refuse stated sizes the data cannot back.

    A pickler numbers its memo entries 0, 1, 2, ...; CPython's unpickler grows its memo *table* to the largest
    index it sees, so one ``LONG_BINPUT 2**28`` in a 900-byte file would allocate gigabytes.  Indices are
    bounded by the number of memo stores so far (plus slack); nothing is allocated in proportion to a number.
    """
    stores = 0
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in _PUT_OPS or op.name in _GET_OPS:
                if not isinstance(arg, int) or arg < 0 or arg > stores + 1024:
                    raise UnsafeSize(f"pickle memo index {arg} after {stores} stored objects")
            if op.name in _PUT_OPS or op.name == "MEMOIZE":
                stores += 1
    except UnsafeSize:
        raise
    except Exception as err:  # genops' ValueError on malformed opcodes, truncation
        raise pickle.UnpicklingError(f"malformed pickle ({err})") from None


# ------------------------------------------------------------------------------- data constructors


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    """Protocol 2 writes ``bytes`` as ``_codecs.encode(text, 'latin1')``: that and nothing else (no codec
    lookup, no other encoding: a codec could be anything)."""
    if isinstance(obj, str) and str(encoding).lower().replace("-", "").replace("_", "") in ("latin1", "iso88591") \
            and errors == "strict":
        return obj.encode("latin1")
    raise RefusedGlobal(f"_codecs.encode with encoding {encoding!r} on a {type(obj).__name__}")


def _bytes(*args):
    """``bytes(b)`` / ``bytes(text, 'latin1')`` only: never ``bytes(n)``, which allocates n stated bytes."""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    if len(args) in (2, 3) and isinstance(args[0], str):
        return _codecs_encode(*args)
    if not args:
        return b""
    raise RefusedGlobal(f"builtins.bytes of a {type(args[0]).__name__}")


def _bytearray(*args):
    return bytearray(_bytes(*args))


_BUILTIN_DATA.update(bytes=_bytes, bytearray=_bytearray)

_NUMPY_TYPESTR = re.compile(r"[?biufc]\d{0,2}")


class _NumpyDType:
    """``numpy.dtype(typestr, align, copy)`` then ``BUILD(state)``: plain numeric dtypes only (no object, no
    structured or void dtypes); the state contributes its byte order and nothing else."""

    def __init__(self, typestr, align=False, copy=False):
        name = typestr.decode("latin1") if isinstance(typestr, bytes) else typestr
        if not isinstance(name, str) or not _NUMPY_TYPESTR.fullmatch(name):
            raise RefusedGlobal(f"numpy.dtype({str(typestr)[:20]!r})")
        try:
            self.dtype = np.dtype(name)
        except TypeError:
            raise RefusedGlobal(f"numpy.dtype({name!r})") from None
        self.order = "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]


def _numpy_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar(dtype, raw bytes)``: the value those bytes hold, nothing else."""
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, (bytes, bytearray)):
        raise RefusedGlobal("numpy scalar of something other than a numeric dtype and its bytes")
    dt = dtype.dtype.newbyteorder(dtype.order) if dtype.order in "<>" else dtype.dtype
    if len(data) != dt.itemsize:
        raise pickle.UnpicklingError(f"numpy {dt} scalar of {len(data)} bytes")
    return np.frombuffer(bytes(data), dtype=dt)[0]


class _ReadOnlyList(list):
    """sacred's ``ReadOnlyList(items)``: the items, as a list (any pickled attributes are kept aside)."""

    def __setstate__(self, state):
        self.state = state


class _ReadOnlyDict(dict):
    def __setstate__(self, state):
        self.state = state


def _sacred_list(items=()):
    if not isinstance(items, (list, tuple)):
        raise RefusedGlobal(f"sacred ReadOnlyList of a {type(items).__name__}")
    return _ReadOnlyList(items)


def _sacred_dict(items=None, **_kw):
    if items is None:
        items = {}
    if not isinstance(items, dict):
        raise RefusedGlobal(f"sacred ReadOnlyDict of a {type(items).__name__}")
    return _ReadOnlyDict(items)


_DATA_FUNCS = {
    ("_codecs", "encode"): _codecs_encode,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _NumpyDType,
    ("sacred.config.custom_containers", "ReadOnlyList"): _sacred_list,
    ("sacred.config.custom_containers", "ReadOnlyDict"): _sacred_dict,
}


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
        # Python 2 names (protocol 0-2 pickles): the standard library's own mapping, then the same checks
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qual = f"{module}.{name}"
        if (module, name) in _DATA_FUNCS:
            return _DATA_FUNCS[(module, name)]
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
            # member sizes were bounded by check_archive before unpickling started
            self._storages[key] = (bytearray(self._zf.read(f"{self._prefix}data/{key}")), dtype)
        data, _ = self._storages[key]
        return data, dtype


def load_zip_checkpoint(path: str | Path) -> object:
    """Unpickle a torch zip checkpoint with :class:`_Unpickler` (raises :class:`RefusedGlobal`,
    :class:`UnsafeSize`, ``zipfile`` and ``pickle`` errors)."""
    size = Path(path).stat().st_size
    with zipfile.ZipFile(path) as zf:
        check_archive(zf, size)
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise pickle.UnpicklingError("no data.pkl in the archive")
        prefix = pkl[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in zf.namelist() and zf.read(order).strip() not in (b"little", b""):
            raise pickle.UnpicklingError("big-endian checkpoints are not supported")
        data = zf.read(pkl[0])
        check_pickle(data)
        return _Unpickler(data, zf, prefix).load()
