"""``--class-names``: the name of each id, from a dataset preset, a text file of names, or the ``--json`` file of
``segcli evaluate`` (each cluster id named by the ground-truth class it was matched to).

Here, beside the presets and the evaluation's JSON, rather than with the legend drawing
(:mod:`segcli.io.legend`), because the file layer knows nothing of presets or evaluations.
"""

from __future__ import annotations

import json
from pathlib import Path

from segcli.errors import UsageError
from segcli.io.outputs import MAX_LABEL_ID


def _from_evaluation(data: dict, source: str) -> dict[int, str]:
    names = data.get("mapping_names")
    if not isinstance(names, dict):
        raise UsageError(f"--class-names {source}: a JSON file must be the --json output of segcli evaluate "
                         "(it has no 'mapping_names')")
    if data.get("mode") == "per-image":
        raise UsageError(f"--class-names {source}: a --per-image evaluation matches every image on its own and names "
                         "no cluster; evaluate without --per-image")
    out = {}
    for k, v in names.items():
        try:
            i = int(k)
        except ValueError:
            raise UsageError(f"--class-names {source}: cluster id {k!r} is not a number") from None
        if v is not None:
            out[i] = str(v)
    return out


def _from_text(text: str, source: str) -> dict[int, str]:
    """``ID NAME`` lines when every non-empty line starts with a number, else line i names id i."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if not line.startswith("#")]
    while lines and not lines[-1]:
        lines.pop()
    numbered = [line for line in lines if line]
    if numbered and all(line.split(maxsplit=1)[0].rstrip(":").isdigit() and len(line.split(maxsplit=1)) == 2
                        for line in numbered):
        out = {}
        for line in numbered:
            i, name = line.split(maxsplit=1)
            out[int(i.rstrip(":"))] = name.strip()
        return out
    return {i: name for i, name in enumerate(lines) if name}


def read_class_names(source: str | Path) -> dict[int, str]:
    """The names of ``--class-names``: a preset name, an evaluate ``--json`` file, or a text file of names.

    :class:`UsageError` (one line) for an unreadable file, an empty one, or ids outside 0..255.
    """
    from segcli.evaluate.presets import PRESETS

    text_source = str(source)
    if text_source in PRESETS:
        return dict(enumerate(PRESETS[text_source].class_names))
    path = Path(text_source).expanduser()
    if not path.is_file():
        raise UsageError(f"--class-names {text_source}: not a preset ({', '.join(PRESETS)}) and no such file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--class-names {text_source}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"--class-names {text_source}: not valid JSON ({exc})") from None
        names = _from_evaluation(data if isinstance(data, dict) else {}, text_source)
    else:
        names = _from_text(raw, text_source)
    if not names:
        raise UsageError(f"--class-names {text_source}: no names in it")
    bad = sorted(i for i in names if not 0 <= i <= MAX_LABEL_ID)
    if bad:
        raise UsageError(f"--class-names {text_source}: ids {bad[:5]} are outside 0..{MAX_LABEL_ID} (label PNGs hold 0..255)")
    return names
