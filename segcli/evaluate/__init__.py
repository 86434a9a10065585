"""`segcli evaluate`: score predicted label PNGs against ground truth (docs/evaluation.md).

Python use::

    from segcli.evaluate import EvaluationConfig, evaluate
    result = evaluate("masks/", "camvid-val/labels", EvaluationConfig(preset="camvid"))
    print(result.miou, result.pixel_accuracy, result.mapping)

The heavy modules (numpy, scipy, PIL) load only when one of these names is first used, so importing this
package (as the CLI does for ``--help``) costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from segcli.evaluate.config import EvaluationConfig

if TYPE_CHECKING:  # pragma: no cover
    from segcli.evaluate.api import EvaluationResult, ImageScore, evaluate
    from segcli.evaluate.plot import plot_confusion
    from segcli.evaluate.remap import write_remapped
    from segcli.evaluate.report import render_report, result_to_dict, write_json

_LAZY = {
    "evaluate": "segcli.evaluate.api",
    "EvaluationResult": "segcli.evaluate.api",
    "ImageScore": "segcli.evaluate.api",
    "render_report": "segcli.evaluate.report",
    "result_to_dict": "segcli.evaluate.report",
    "write_json": "segcli.evaluate.report",
    "plot_confusion": "segcli.evaluate.plot",
    "write_remapped": "segcli.evaluate.remap",
}

__all__ = ["EvaluationConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
