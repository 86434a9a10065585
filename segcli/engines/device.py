"""The device engine: the region pass of a batch of images at once, on the backbone's device.

On a GPU the backbone forward is far cheaper than the per-image host work after it, so the per-image path
itself moves to the device (docs/performance.md, "The device-resident path"): the foreground step
of a whole batch runs as tensor operations (:func:`segcli.method.batched.foreground_batch`), the refinement runs
on the device (the torch mean-field of :mod:`segcli.method.refine`), and region crops are cut and resized there
(:func:`segcli.method.regions.crop_batch`) and go to the crop forward without a round trip through the host.
Only the connected components of the refined mask and the bookkeeping stay on the host. Every other step
(label maps, PNG and overlay writing) goes to the inner engine (in process, or its worker pool).

The pipeline picks this engine when the backbone runs on CUDA; on the CPU it runs the same code (the tests
compare it with the per-image path there).
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Callable, Iterable, Iterator

from segcli.method import steps
from segcli.method.batched import foreground_batch
from segcli.engines.local import LocalEngine
from segcli.errors import BadImageError
from segcli.vit.features import crop_side
from segcli.timings import Timings


class DeviceEngine:
    """Batches of ``batch_size`` images through the region pass on ``device``; other steps to ``inner``.

    ``crop_spec``: (side, mean, std) of the crop forward's input, to cut crops on the device (None: RGB crops
    on the host, as the local engine).
    """

    def __init__(self, device, batch_size: int = 8, inner: LocalEngine | None = None,
                 crop_spec: steps.CropSpec | None = None, timings: Timings | None = None) -> None:
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.inner = inner or LocalEngine(timings)
        self.timings = timings or self.inner.timings
        self.crop_spec = crop_spec

    @classmethod
    def for_backbone(cls, backbone, config, batch_size: int, inner: LocalEngine | None = None,
                     timings: Timings | None = None, device=None) -> "DeviceEngine":
        """The engine for a loaded backbone: its device (or ``device``), and crops cut for its crop forward."""
        spec = (crop_side(backbone.patch_size, config.crop_size), tuple(backbone.mean), tuple(backbone.std))
        return cls(backbone.device if device is None else device, batch_size, inner, spec, timings)

    def imap(self, step: Callable[..., Any], tasks: Iterable[tuple], **shared: Any) -> Iterator[tuple[tuple, Any]]:
        if step is not steps.regions_step:
            yield from self.inner.imap(step, tasks, **shared)
            return
        shared = {**shared, "device": self.device}
        it = iter(tasks)
        while batch := list(islice(it, self.batch_size)):
            fresh = [t for t in batch if t[2] is None]
            try:
                with self.timings("clustering"):
                    fgs = dict(zip((id(t) for t in fresh), foreground_batch(shared["model"], [t[1] for t in fresh], self.device)))
            except BadImageError:  # one image's features are unusable: find it the per-image way
                fgs = {}
            for task in batch:
                try:
                    result = step(*task, **shared, fg=fgs.get(id(task)), crop_spec=self.crop_spec, timings=self.timings)
                except BadImageError as exc:
                    result = exc
                yield task, result

    def close(self) -> None:
        self.inner.close()
