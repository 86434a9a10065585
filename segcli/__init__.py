"""segcli: training-free unsupervised semantic segmentation with a frozen self-supervised ViT."""

__version__ = "0.1.0"
