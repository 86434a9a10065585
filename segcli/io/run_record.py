"""``segcli-run.json``: what a run that wrote label PNGs did, written beside them.

The label PNGs alone do not say how they were made. ``segment`` (and ``cluster-dataset --masks``) write this
record into their mask folder at the end of every run, so that a report (``segcli report``) or a person can
tell the settings, the model file and its digest, the backbone and the identity of its weights, the timings,
the segcli version, which input image each mask belongs to, and why an image was skipped.

It is plain JSON (atomic write), separate from the hidden resume stamp ``.segcli-run.json``, which holds the
model digest only (a finished mask is kept when that digest matches).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from segcli import __version__
from segcli.io import storage

RUN_RECORD = "segcli-run.json"
RECORD_FORMAT = 1

# Run-time options worth keeping (the method options are in the config); values are made JSON-safe.
_RUNTIME = ("device", "precision", "batch_size", "short_side", "max_side", "work_max_side", "decode_workers",
            "workers", "engine", "compile", "feature_cache", "threads", "resume", "split")


def _where(p) -> str | None:
    """A location as the report will need it from any working folder: absolute path, or the URI."""
    if p is None:
        return None
    if storage.is_uri(p):
        return str(storage.location(p))
    return os.path.abspath(os.path.expanduser(str(p)))


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def run_record(command: str, *, images, items: list, out, overlay, model_file, seg, opts: dict, summary,
               seconds: float, class_names: dict[int, str] | None) -> dict:
    """The record of one finished run (see the module docstring) as JSON-ready data."""
    model = seg.model_
    device = getattr(getattr(seg.source, "backbone", None), "device", None) if getattr(seg, "source", None) else None
    return {
        "format": RECORD_FORMAT,
        "tool": f"segcli {__version__}",
        "command": command,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "images": _where(images),
        "out": _where(out),
        "overlay": _where(overlay),
        "model_file": _where(model_file),
        "model_digest": model.digest(),
        "backbone": model.config.backbone,
        "weights": _where(opts.get("weights")),
        "weights_id": model.weights_id,
        "features": _where(opts.get("features")),
        "device_used": None if device is None else str(device),
        "settings": _plain(model.config.to_dict()),
        "runtime": {k: _plain(opts.get(k)) for k in _RUNTIME if k in opts},
        "class_names": {str(k): v for k, v in sorted((class_names or {}).items())},
        "written": summary.written,
        "reused": summary.reused,
        "skipped": dict(summary.skipped),
        "seconds": round(float(seconds), 3),
        "timings": {k: round(float(v), 3) for k, v in sorted(summary.timings.items())},
        "items": [[item.key, _where(item.path)] for item in items],
    }


def write_run_record(folder, record: dict) -> None:
    """Write ``record`` to ``folder/segcli-run.json`` atomically (a local folder or an object-store prefix)."""
    from segcli.io.outputs import atomic_write

    data = (json.dumps(record, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write(storage.location(folder) / RUN_RECORD, lambda f: f.write(data))


def read_run_record(folder: Path) -> dict | None:
    """The run record of a mask folder, or None when there is none (masks written by another tool or an older
    segcli). A damaged record is an :class:`segcli.errors.InputError`."""
    from segcli.errors import InputError

    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the run record {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("items", []), list):
        raise InputError(f"{path} is not a segcli run record")
    return data
