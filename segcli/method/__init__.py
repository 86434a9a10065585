"""The method as pure functions of arrays and the fitted model (docs/method.md); it knows nothing of the ViT, the
engines, Ray or the CLI (docs/design/layers.md)."""
