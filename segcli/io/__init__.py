"""The I/O layer: image discovery and decoding, label PNGs and overlays, the feature and region caches, checked
array files and object-store paths. It imports only the base modules (config, errors, timings): docs/design/layers.md."""
