"""STEGO (Hamilton et al., ICLR 2022) Lightning checkpoints: ``cocostuff27_vit_base_5.ckpt`` and siblings.

The pickle holds omegaconf objects (and, with old Lightning, callback classes as dict keys), so it is read by
:mod:`segcli.vit.checkpoints.safe_pickle`, which imports nothing named in the file.  ``state_dict`` holds the frozen
DINO ViT under ``net.model.*`` and STEGO's head: ``net.cluster1`` (1x1 conv) and, for the default nonlinear
projection, ``net.cluster2`` (conv, ReLU, conv); STEGO's "code" is ``cluster1(f) + cluster2(f)`` of the final-norm
patch tokens ``f`` (``DinoFeaturizer``, dropout is the identity at eval).  ``cluster_probe.clusters`` are the
unsupervised cluster centroids in code space (trained as spherical k-means).  ``linear_probe`` was trained with
labels and is never used.
"""

from __future__ import annotations

import torch
from torch import nn

from segcli.vit.checkpoints.base import Checkpoint, tensor_dict
from segcli.vit.checkpoints.vit import infer_arch
from segcli.errors import ModelError


class StegoHead(nn.Module):
    """STEGO's code projection on (B, N, D) tokens -> (B, N, c) code (1x1 convs are per-token linear maps)."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        w1 = sd["net.cluster1.0.weight"]
        if w1.ndim != 4 or tuple(w1.shape[2:]) != (1, 1):
            raise RuntimeError(f"net.cluster1.0.weight has shape {tuple(w1.shape)}, expected (code, dim, 1, 1)")
        dim, code = int(w1.shape[1]), int(w1.shape[0])
        # Built on the meta device and filled by assignment: nothing is allocated from a shape in the file
        # before load_state_dict has checked every shape against the tensors the file really holds.
        with torch.device("meta"):
            self.cluster1 = nn.Conv2d(dim, code, 1)
            self.cluster2 = None
            if "net.cluster2.0.weight" in sd:
                self.cluster2 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, code, 1))
        parts = {"net.cluster1.0.": self.cluster1, "net.cluster2.": self.cluster2}
        for prefix, module in parts.items():
            if module is None:
                continue
            own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            for k, v in own.items():
                if not v.is_floating_point():
                    raise RuntimeError(f"{prefix}{k} holds {str(v.dtype).replace('torch.', '')} values, not weights")
            module.load_state_dict({k: v.float() for k, v in own.items()}, strict=True, assign=True)
        self.code_dim = code

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.transpose(1, 2).unsqueeze(-1)  # (B, D, N, 1): a 1x1 conv over any token layout
        code = self.cluster1(x)
        if self.cluster2 is not None:
            code = code + self.cluster2(x)
        return code.squeeze(-1).transpose(1, 2)


def matches(raw: dict) -> bool:
    sd = tensor_dict(raw)
    return any(k.startswith("net.model.") for k in sd) and "net.cluster1.0.weight" in sd


def parse(raw: dict, label: str) -> Checkpoint | None:
    if not matches(raw):
        return None
    sd = tensor_dict(raw)
    backbone = {k[len("net.model."):]: v for k, v in sd.items() if k.startswith("net.model.")}
    backbone = {k: v for k, v in backbone.items() if not k.startswith("head.")}
    try:
        head = StegoHead(sd).eval().requires_grad_(False)
    except (KeyError, RuntimeError) as err:
        raise ModelError(f"{label}: STEGO head (net.cluster1/net.cluster2) is malformed ({err})") from None
    probe = sd.get("cluster_probe.clusters")
    if probe is not None and not probe.is_floating_point():
        raise ModelError(f"{label}: cluster_probe.clusters holds {str(probe.dtype).replace('torch.', '')} values, not centroids")
    if probe is not None and (probe.ndim != 2 or probe.shape[1] != head.code_dim):
        raise ModelError(f"{label}: cluster_probe.clusters has shape {tuple(probe.shape)}, expected (K, {head.code_dim})")
    # STEGO's DinoFeaturizer runs DINO's own vision_transformer.py: DINO's position-grid resize
    return Checkpoint(system="stego", state_dict=backbone, arch=infer_arch(backbone), head=head, pos_interp="dino",
                      probe=None if probe is None else probe.float(), feature="code")
