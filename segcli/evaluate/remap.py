"""``--remap-out``: write predictions recoloured with their matched class ids, to compare with the ground truth.

Each picture is a mode-P PNG on the grid that was scored (the ground truth's size, or the 320x320 crop under
``--protocol stego``) whose pixel values are class ids (unmatched ids: 255) and whose palette is the preset's
(VOC colours by default, CamVid / Cityscapes colours for those presets), under the prediction's relative path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segcli.errors import OutputError
from segcli.evaluate.labels import LabelSpec
from segcli.evaluate.metrics import NUM_PRED_IDS
from segcli.evaluate.scoring import load_pair

UNMATCHED = 255


def class_lookup(mapping: dict[int, int | None]) -> np.ndarray:
    lut = np.full(NUM_PRED_IDS, UNMATCHED, dtype=np.uint8)
    for pid, cls in mapping.items():
        if cls is not None and 0 <= cls < UNMATCHED:
            lut[pid] = cls
    return lut


def remap_batch(batch, spec: LabelSpec, protocol: str, strict_size: bool, out_dir: str) -> int:
    """Write each (pair, mapping) of the batch; returns how many pictures were written."""
    from PIL import Image

    from segcli.evaluate.palettes import output_palette

    palette = output_palette(spec.output_palette)
    for pair, mapping in batch:
        loaded = load_pair(pair, spec, protocol, strict_size)
        ids = np.ascontiguousarray(class_lookup(mapping)[loaded.pred])
        img = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
        img.putpalette(palette)
        target = Path(out_dir) / f"{pair.key}.png"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            img.save(target)
        except OSError as exc:
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    return len(batch)


def write_remapped(result, out_dir, workers: int | None = None) -> int:
    """Write the recoloured predictions of an :class:`EvaluationResult`; returns the number of files."""
    from segcli.evaluate.config import available_cores
    from segcli.evaluate.parallel import batched, run_batches

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None
    if result.per_image is not None:
        maps = {s.key: s.mapping for s in result.per_image}
        items = [(p, maps[p.key]) for p in result.pairs]
    else:
        items = [(p, result.mapping) for p in result.pairs]
    workers = workers or available_cores()
    total = 0

    def add(n: int) -> None:
        nonlocal total
        total += n

    run_batches(
        remap_batch, batched(items, workers),
        (result.spec, result.config.protocol, result.config.strict_size, str(out)), workers, add,
    )  # fmt: skip
    return total
