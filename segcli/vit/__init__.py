"""The frozen ViT: checkpoint readers, the timm backbone, input geometry and feature extraction
(docs/checkpoints.md, docs/method.md)."""
