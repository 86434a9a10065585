"""What every checkpoint reader returns, and the helpers they share."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

__all__ = ["Checkpoint", "first_line", "tensor_dict"]


@dataclass
class Checkpoint:
    """A checkpoint file, understood: which system made it, its ViT, and the system's own unsupervised head.

    - ``state_dict``: the backbone's tensors with wrapper prefixes stripped (timm or the official
      DINO/DINOv2/DINOv3 naming; timm's own conversion runs when the model is filled).
    - ``arch``: the timm architecture read from the tensor shapes (None when the shapes match none).
    - ``build``: extra ``timm.create_model`` keyword arguments the layout needs (e.g. LOCA: no CLS token, tanh
      GELU).
    - ``pos_interp``: how the absolute position grid is resized for other input sizes (None: timm's bicubic;
      'dino': DINO's ``interpolate_pos_encoding``, as DINO, Leopart and STEGO do; 'dinov2': DINOv2's (the same
      formula in float32; registers get no position); 'bilinear': JAX's
      ``jax.image.resize``, as LOCA does; see :mod:`segcli.vit.pos_embed`).
    - ``head``: the system's own feature head (STEGO: the 'code' projection), an ``nn.Module`` or None.
    - ``probe``: the system's own unsupervised cluster centroids in head space (STEGO's cluster probe) or None.
    - ``feature``: the patch features the system itself evaluates with (the default ``--feature``).
    """

    system: str
    state_dict: dict[str, torch.Tensor]
    arch: str | None = None
    build: dict = field(default_factory=dict)
    pos_interp: str | None = None
    head: torch.nn.Module | None = None
    probe: torch.Tensor | None = None
    feature: str = "keys"


def first_line(err: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tensor_dict(obj: dict) -> dict[str, torch.Tensor]:
    """Unwrap {'teacher'|'state_dict'|'model'|'module'|'student': ...} wrappers down to the tensors."""
    for _ in range(4):
        if any(isinstance(v, torch.Tensor) for v in obj.values()) and not any(
            isinstance(obj.get(k), dict) for k in ("teacher", "state_dict", "model")
        ):
            break
        for key in ("teacher", "state_dict", "model", "module", "student"):  # DINO releases the teacher
            inner = obj.get(key)
            if isinstance(inner, dict) and inner:
                obj = inner
                break
        else:
            break
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def block_count(sd: dict[str, torch.Tensor], prefix: str = "blocks.") -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def dense_bytes(t) -> int:
    """Bytes a tensor / array takes once made contiguous (what a copy or a module built from its shape allocates)."""
    n = 1
    for d in t.shape:
        n *= int(d)
    return n * (t.element_size() if isinstance(t, torch.Tensor) else int(t.itemsize))


def iter_tensors(obj, depth: int = 0, limit: int = 16):
    """Every tensor in a checkpoint's nested dicts / lists (down to ``limit`` levels, deeper than any layout reads)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < limit and isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v, depth + 1, limit)
    elif depth < limit and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v, depth + 1, limit)


def check_tensor_sizes(obj, budget: int, label: str) -> None:
    """Refuse a tensor whose contiguous size exceeds what the file can hold.

    A pickled tensor is a view (size, stride, offset) of a stored buffer: a stride-0 view of 4 bytes can claim
    terabytes, which the first copy or the module built from its shape would allocate.  No real checkpoint has
    a tensor larger than the file itself (``budget``: the file size plus slack for tiny files).
    """
    from segcli.errors import ModelError

    for t in iter_tensors(obj):
        if dense_bytes(t) > budget:
            raise ModelError(f"{label} has a tensor of shape {tuple(t.shape)} ({dense_bytes(t)} bytes), more than the "
                             f"file holds ({budget} bytes with 1 MiB of slack): refused before allocating it")
