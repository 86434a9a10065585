"""Where segcli reads and writes: local paths, or objects in S3 and Google Cloud Storage (``s3://``, ``gs://``).

Every reader and writer of inputs, the cache, outputs and model files goes through this module, which has
two sides:

* **local paths** (:class:`pathlib.Path`): the fast path. Each function does exactly what the code did before
  object stores existed (``Path.is_file()``, ``open()``, temp file + rename), and nothing of fsspec is imported.
* **object-store URIs** (:class:`ObjectPath`, made by :func:`location` from ``s3://bucket/key`` or
  ``gs://bucket/key``): served by fsspec and its s3fs / gcsfs backends, imported on first use only (the
  optional extra ``segcli[cloud]``). Credentials and endpoints come from the backends' own environment
  (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``...) or from
  fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec/``); see docs/scale.md, "Data in object
  stores".

Atomicity: a local file is written to a hidden temp file and renamed over the target. An object is built in
memory and uploaded whole (:func:`put_atomic`: one PUT, or a multipart upload for large objects, which the
store also publishes only when complete), so a reader never sees a partial object, and since nothing is
staged in the store, an interrupted run leaves no temporary object behind.

An :class:`ObjectPath` is deliberately not ``os.PathLike``: code that still calls ``open()`` or ``Path()`` on
one fails loudly instead of writing a local file named ``s3:/...``.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Union

from segcli.errors import InputError, OutputError, SegcliError, UsageError

# URI scheme -> fsspec protocol (and the canonical scheme segcli prints). s3a:// is Hadoop's name for s3://.
SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}
# The package that implements each protocol (installed by the cloud extra).
BACKENDS = {"s3": "s3fs", "gs": "gcsfs"}
EXTRA_HINT = "pip install 'segcli[cloud]'"


class ObjectPath:
    """An object (or a prefix, the object store's folder) in a bucket: ``s3://bucket/a/b.png``.

    The part of :class:`pathlib.PurePosixPath`'s interface segcli uses: ``/``, ``name``, ``suffix``, ``stem``,
    ``parent``, ``parents``, ``relative_to``, equality and hashing (by canonical URI). Immutable and picklable,
    so it travels to worker processes and Ray tasks.
    """

    __slots__ = ("scheme", "key")

    def __init__(self, uri: str) -> None:
        scheme, sep, rest = str(uri).partition("://")
        if not sep or scheme.lower() not in SCHEMES:
            raise UsageError(f"unsupported URI {uri!r}: segcli reads and writes local paths, s3:// and gs:// URIs")
        parts = [p for p in rest.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts:
            raise UsageError(f"URI {uri!r} names no bucket (expected {scheme}://BUCKET/PREFIX)")
        if ".." in parts:
            raise UsageError(f"URI {uri!r}: '..' is not allowed in object-store paths")
        object.__setattr__(self, "scheme", SCHEMES[scheme.lower()])
        object.__setattr__(self, "key", "/".join(parts))

    def __setattr__(self, name, value):  # noqa: ANN001
        raise AttributeError("ObjectPath is immutable")

    def __reduce__(self):
        return ObjectPath, (str(self),)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and (self.scheme, self.key) == (other.scheme, other.key)

    def __hash__(self) -> int:
        return hash((self.scheme, self.key))

    def __lt__(self, other: "ObjectPath") -> bool:
        return str(self) < str(other)

    def __truediv__(self, other: str | os.PathLike) -> "ObjectPath":
        other = os.fspath(other) if not isinstance(other, str) else other
        if other.startswith("/") or "://" in other:
            raise ValueError(f"cannot join an absolute path {other!r} to {self}")
        return ObjectPath(f"{self}/{other}")

    def joinpath(self, *parts: str) -> "ObjectPath":
        out = self
        for p in parts:
            out = out / p
        return out

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def path(self) -> str:
        """``bucket/key``: the name fsspec's filesystems take."""
        return self.key

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1] if "/" in self.key else ""

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0] if "/" in self.key else self.name

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(f"{self.scheme}://{posixpath.dirname(self.key)}") if "/" in self.key else self

    @property
    def parents(self) -> list["ObjectPath"]:
        out, p = [], self
        while "/" in p.key:
            p = p.parent
            out.append(p)
        return out

    def relative_to(self, other: "ObjectPath") -> str:
        if not (isinstance(other, ObjectPath) and other.scheme == self.scheme and self.key.startswith(other.key + "/")):
            raise ValueError(f"{self} is not inside {other}")
        return self.key[len(other.key) + 1:]


Location = Union[Path, ObjectPath]


def unmappable_key(key: str) -> bool:
    """Whether an object key (below its bucket or prefix) has an empty, ``.`` or ``..`` part: an object store
    keeps such keys as they are, but :class:`ObjectPath` and every local output name normalise them, so the
    object could be neither read back by that name nor written under it."""
    return any(part in ("", ".", "..") for part in key.split("/"))


def is_uri(text: object) -> bool:
    """Whether ``text`` names an object-store location (``scheme://...``) rather than a local path."""
    return isinstance(text, ObjectPath) or (isinstance(text, str) and "://" in text)


def is_remote(path: object) -> bool:
    return isinstance(path, ObjectPath)


def location(text: str | os.PathLike | ObjectPath) -> Location:
    """An :class:`ObjectPath` for a URI, else ``Path(text)`` unchanged (the local path as typed).

    Also the parser of the CLI's path options, so that ``s3://b/k`` keeps its double slash.
    """
    if isinstance(text, (ObjectPath, Path)):
        return text
    text = os.fspath(text)
    return ObjectPath(text) if "://" in text else Path(text)


def parse_option(text: str) -> Location:
    """:func:`location` as the parser of a CLI path option (typer's Path type would turn ``s3://b/k`` into
    ``s3:/b/k``): a bad URI is click's usage error (one line, exit 2)."""
    try:
        return location(text)
    except UsageError as exc:
        import typer

        raise typer.BadParameter(str(exc)) from None


# ------------------------------------------------------------------------------------------------ backends


def filesystem(path: ObjectPath):
    """The fsspec filesystem of ``path``'s store (one instance per protocol and process, fsspec's cache).

    Listings are not cached: another process (a shard, a Ray task) may add objects at any time.
    """
    try:
        import fsspec

        return fsspec.filesystem(path.scheme, use_listings_cache=False)
    except ImportError:
        raise UsageError(f"{path.scheme}:// paths need the cloud extra ({BACKENDS[path.scheme]}): {EXTRA_HINT}") from None


def _reason(exc: BaseException, path: ObjectPath, fs) -> str:  # noqa: ANN001
    """One line for a backend failure, with a hint for the usual causes (matched by class name: the backends'
    exception classes are not imported here)."""
    kinds = {k.__name__ for k in type(exc).__mro__}
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "NoCredentialsError" in kinds or "Unable to locate credentials" in text:
        return ("no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE; "
                "docs/scale.md: Data in object stores)")
    if kinds & {"DefaultCredentialsError", "RefreshError"}:
        return f"no usable Google credentials ({text}; set GOOGLE_APPLICATION_CREDENTIALS; docs/scale.md: Data in object stores)"
    if kinds & {"EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError", "ServerTimeoutError",
                "ConnectionError"}:
        where = " and AWS_ENDPOINT_URL" if path.scheme == "s3" else ""
        return f"cannot reach the object store ({text}; check the network{where})"
    if isinstance(exc, PermissionError):
        return f"access denied ({text})"
    if isinstance(exc, FileNotFoundError):  # the messages do not say which: ask (errors only, one request)
        try:
            bucket_exists = fs.exists(path.bucket)
        except Exception:  # noqa: BLE001 - cannot tell
            bucket_exists = True
        return "not found" if bucket_exists else "the bucket does not exist"
    return text if len(text) < 300 else text[:297] + "..."


def _remote(path: ObjectPath, what: str, error: type[SegcliError], call: Callable):
    """Run one backend call; any failure becomes ``error`` with one line naming ``what`` and ``path`` (and the
    bare reason in its ``reason`` attribute, for callers that word the message themselves)."""
    fs = filesystem(path)
    try:
        return call(fs)
    except (SegcliError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, google-auth and OSError all end here
        reason = _reason(exc, path, fs)
        failure = error(f"cannot {what} {path}: {reason}")
        failure.reason = reason
        raise failure from None


# ------------------------------------------------------------------------------------------------ queries


def exists(path: Location) -> bool:
    if not is_remote(path):
        return path.exists()
    return _remote(path, "read", InputError, lambda fs: fs.exists(path.path))


def is_file(path: Location) -> bool:
    if not is_remote(path):
        return path.is_file()
    return _remote(path, "read", InputError, lambda fs: fs.isfile(path.path))


def is_dir(path: Location) -> bool:
    """Local: a folder. Object store: a bucket, or a prefix that has at least one object below it."""
    if not is_remote(path):
        return path.is_dir()
    return _remote(path, "read", InputError, lambda fs: fs.isdir(path.path))


def size(path: Location) -> int:
    if not is_remote(path):
        return path.stat().st_size
    return int(_remote(path, "read", InputError, lambda fs: fs.size(path.path)))


def list_files(root: ObjectPath) -> list[str]:
    """Every object below the prefix ``root``, as sorted POSIX paths relative to it (no folder markers).

    One recursive listing (S3: LIST pages of 1000 keys), so listing a million images costs a thousand requests,
    not a million. An object named exactly ``root`` is not listed (it is a file, not a folder).
    """
    def find(fs):
        return fs.find(root.path, detail=False)

    found = _remote(root, "list", InputError, find)
    prefix = root.key + "/"
    return sorted(p[len(prefix):] for p in found if p.startswith(prefix) and not p.endswith("/"))


# ------------------------------------------------------------------------------------------------ reading


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def not_regular(path: Path) -> str | None:
    """What ``path`` (symlinks followed) is when it is not a regular file ("a FIFO", "a folder"...), else None
    (also when it does not exist: the caller's open reports that).

    The one guard every local read goes through (:func:`check_regular`, :func:`open_regular`,
    :func:`read_bytes`, :func:`readable`): opening a FIFO blocks until a writer appears and a character device
    may never end, so such files are refused by name from a ``stat``, never opened.
    """
    if not isinstance(path, (str, os.PathLike)):  # an open file or an in-memory buffer: nothing to open
        return None
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _NOT_REGULAR if test(mode)), "not a regular file")


def check_regular(path: Path, error: type[SegcliError] = InputError) -> None:
    """``error`` ("<path>: not a regular file (a FIFO)") unless ``path`` is a regular file or absent."""
    what = not_regular(path)
    if what is not None:
        failure = error(f"{path}: not a regular file ({what}); segcli reads only regular files")
        failure.reason = f"not a regular file ({what})"
        raise failure


def open_regular(path: Path, error: type[SegcliError] = InputError) -> BinaryIO:
    """``open(path, "rb")`` after :func:`check_regular`."""
    check_regular(path, error)
    return open(path, "rb")


def read_bytes(path: Location, error: type[SegcliError] = InputError) -> bytes:
    if not is_remote(path):
        with open_regular(path, error) as f:
            return f.read()
    return _remote(path, "read", error, lambda fs: fs.cat_file(path.path))


def read_if_exists(path: ObjectPath) -> bytes | None:
    """The object's bytes, or None when there is no such object (one GET, no HEAD first; a missing bucket reads
    as absent too, so check the bucket first: :func:`check_writable`)."""
    def get(fs):
        try:
            return fs.cat_file(path.path)
        except FileNotFoundError:
            return None
    return _remote(path, "read", InputError, get)


def read_head(path: Location, n: int) -> bytes:
    """The first ``n`` bytes (one ranged GET on an object store: a large object is never downloaded to be
    sniffed). Local files go through the regular-file guard."""
    if not is_remote(path):
        with open_regular(path) as f:
            return f.read(n)
    return _remote(path, "read", InputError, lambda fs: fs.cat_file(path.path, start=0, end=n))[:n]


def read_tail(path: Location, n: int) -> bytes:
    """The last ``n`` bytes (one ranged GET on an object store); b"" when absent or unreadable."""
    if not is_remote(path):
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - n))
            return f.read()
    try:
        # [-n:]: a server that ignores the suffix range sends the whole object (GCS emulators do)
        return _remote(path, "read", InputError, lambda fs: fs.cat_file(path.path, start=-n))[-n:]
    except InputError:
        return b""


def readable(path: Location, error: type[SegcliError] = InputError) -> Path | BinaryIO:
    """What ``np.load`` and ``Image.open`` should be given: a local path itself (they open and close it as
    before), or an in-memory copy of the object (downloaded whole: inputs, cache entries and model files are
    megabytes, and those readers want a seekable file)."""
    if not is_remote(path):
        check_regular(path, error)
        return path
    return io.BytesIO(read_bytes(path, error))


# ------------------------------------------------------------------------------------------------ writing


def makedirs(folder: Location) -> None:
    """Create a local folder and its parents; nothing to do in an object store (prefixes need no creation)."""
    if not is_remote(folder):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # no space, no inodes (ENOSPC), read-only, a file in the way: the user's to fix
            raise OutputError(f"cannot create folder {folder}: {err.strerror or err}") from None


def put_atomic(path: ObjectPath, write: Callable[[BinaryIO], None]) -> None:
    """Upload what ``write(f)`` writes into an in-memory buffer as the object ``path``, in one request.

    If ``write`` raises, nothing is uploaded. The store publishes an object only when its upload completed
    (single PUT, or the completion of a multipart upload), so readers see the old object or the new one.
    """
    buf = io.BytesIO()
    write(buf)
    data = buf.getvalue()
    _remote(path, "write", OutputError, lambda fs: fs.pipe_file(path.path, data))


def check_writable(folder: ObjectPath) -> None:
    """Fail early with one line when objects cannot be written under ``folder`` (missing bucket, no
    credentials, read-only access): write and delete a small probe object."""
    import uuid

    if _remote(folder, "write to", OutputError, lambda fs: fs.isfile(folder.path)):
        raise OutputError(f"output folder is a file: {folder}")
    probe = folder / f".segcli-write-test-{uuid.uuid4().hex}.tmp"

    def put_and_delete(fs):
        fs.pipe_file(probe.path, b"")
        fs.rm_file(probe.path)
    _remote(folder, "write to", OutputError, put_and_delete)

