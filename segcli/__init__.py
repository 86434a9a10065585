"""segcli: training-free unsupervised semantic segmentation with a frozen self-supervised ViT."""

from segcli.vit.runtime import apply_wait_policy as _apply_wait_policy

__version__ = "0.1.0"
# Before any torch import: OpenMP reads its wait policy once, when torch loads it (see segcli.vit.runtime).
_apply_wait_policy()
