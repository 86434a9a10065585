"""The feature stage's schedule on a (simulated) device: images/s of the old schedule against the new one.

    python benchmarks/bench_schedule.py --simulate-device 5 [--images DIR] [--n 128] [--batch-size 8]
                                        [--workers 0 1 2] [--json benchmarks/results/schedule_sim5ms.json]
    python benchmarks/bench_schedule.py                  # the real (random-weight) backbone on this machine

``--simulate-device MS`` replaces every backbone forward by a wait of MS milliseconds per image (the host
thread blocks as it does on a GPU's synchronisation) and returns features of the correct shapes, so the
schedule around the device is measured on a CPU machine. Everything else is the real code: decoding,
preprocessing, the fp16 conversion, cache writes (fsynced), in a fresh cache folder for every run.

Schedules measured on the same images:

* ``old``: the schedule before issue 9 (chunks of ``--batch-size`` consecutive images, same-shape groups
  inside a chunk, decode, forward and cache write one after the other in one thread), re-enacted here with
  the same per-image functions;
* ``new`` with ``--decode-workers W`` for each W of ``--workers``: :meth:`FeatureSource.features`.

For each it prints images/s, the mean device batch, the CPU cost per image of every non-device stage
(seconds of the threads that ran it, summed), the device time per image (simulated, or the measured forward),
the bound and the efficiency = images/s / bound, where the
bound is min(device rate, W / host cost per image) for W >= 1 and 1 / (device time + host cost) for the
serial schedules (W = 0 and old). Figures are ratios within one run: quote them with the load average.

Images: ``--images DIR``, else ``--n`` real photographs at VOC-like sizes (500x375, 375x500, 500x333,
333x500, 500x500, 480x360; JPEG) made from ../shared/data in a temporary folder (the examples/ folder
when that is absent), so input shapes vary as they do in VOC.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
VOC_SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (480, 360)]  # (width, height)
HOST_STAGES = ("hash", "feature io", "load images", "preprocess")


def make_images(folder: Path, n: int) -> Path:
    """``n`` JPEGs at VOC-like sizes, cut from the real photographs available here."""
    from PIL import Image

    sources = sorted(p for d in (SHARED / "voc-mini", SHARED / "camvid-val", REPO / "examples")
                     for p in d.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                     and "label" not in str(p).lower() and "segmentation" not in str(p).lower())
    if not sources:
        raise SystemExit("no source images found")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = VOC_SIZES[(i * 7) % len(VOC_SIZES)]
        with Image.open(sources[i % len(sources)]) as im:
            im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(folder / f"img{i:04d}.jpg", quality=90)
    return folder


class SimulatedDevice:
    """Stands in for ``Backbone.extract``: waits ``ms`` per image, returns correctly shaped features."""

    def __init__(self, backbone, ms: float) -> None:
        self.backbone, self.seconds = backbone, ms / 1000.0
        self.outputs: dict[tuple, object] = {}

    def __call__(self, batch, kind: str = "keys", proposal_heads: int = 5):
        import torch

        from segcli.features import FeatureBatch

        B, _, H, W = batch.shape
        p = self.backbone.patch_size
        h, w = H // p, W // p
        key = (B, h, w)
        if key not in self.outputs:  # made once per shape: a real device hands results back, it does not make them
            g = torch.Generator().manual_seed(h * 1000 + w)
            feats = torch.nn.functional.normalize(torch.randn(B, h, w, self.backbone.embed_dim, generator=g), dim=-1)
            attn = torch.rand(B, h, w, generator=g)
            self.outputs[key] = FeatureBatch(feats=feats, cls=torch.randn(B, self.backbone.embed_dim, generator=g),
                                             attn=attn / attn.sum(dim=(1, 2), keepdim=True),
                                             proposal=attn > attn.mean())
        time.sleep(self.seconds * B)
        return self.outputs[key]


def old_schedule(src, items) -> list[int]:
    """The schedule before issue 9, with today's per-image functions; returns the device batch sizes."""
    sizes = []
    for start in range(0, len(items), src.batch_size):
        groups: dict[tuple, list] = {}
        for item in items[start:start + src.batch_size]:
            slot = src._admit(item)
            if slot.done:
                continue
            prepared = src._prepare(item)
            if isinstance(prepared, tuple):  # (tensor, decoded image); else the image's error
                slot.tensor = prepared[0]
                groups.setdefault(tuple(slot.tensor.shape), []).append(slot)
        for group in groups.values():
            sizes.append(len(group))
            for slot, f in zip(group, src._device_batch(group)):
                src._save(slot.item, f)
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate-device", type=float, metavar="MS", help="device time per image in ms (default: the real backbone)")
    ap.add_argument("--images", type=Path)
    ap.add_argument("--n", type=int, default=128, help="number of generated images (without --images)")
    ap.add_argument("--backbone", default="vit_small_patch16_224.dino")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="--decode-workers values to measure")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeat", type=int, help="measure every schedule this many times (interleaved) and keep each "
                    "one's fastest run; default 1 simulated, 2 on the real backbone (its kernels are built per input shape on first use)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    import segcli.compat  # noqa: F401  (timm import workaround)
    from segcli.backbone import load_backbone
    from segcli.config import SegmentConfig
    from segcli.features_source import FeatureSource
    from segcli.images import discover_images
    from segcli.report import Timings
    from bench_pipeline import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = args.images or make_images(tmp / "images", args.n)
        items = discover_images(images)
        cfg = SegmentConfig(backbone=args.backbone)
        backbone = load_backbone(cfg.backbone, weights=random_checkpoint(args.backbone, tmp), device="cpu"
                                 if args.simulate_device is not None else "auto", precision=args.precision)
        if args.simulate_device is not None:
            backbone.extract = SimulatedDevice(backbone, args.simulate_device)
        else:  # warm-up, so the first measured run does not pay one-off costs
            backbone.extract(torch.zeros(1, 3, 224, 224), kind=cfg.feature_kind)

        runs = [("old", 0)] + [(str(w), w) for w in args.workers]
        repeat = args.repeat or (1 if args.simulate_device is not None else 2)
        results: dict[str, dict] = {}
        for r in range(repeat):
            for name, workers in runs:
                timings = Timings()
                src = FeatureSource(cfg, backbone=backbone, cache_dir=tmp / f"cache-{name}-{r}",
                                    batch_size=args.batch_size, decode_workers=workers, timings=timings)
                cpu0, t0 = time.process_time(), time.perf_counter()
                if name == "old":
                    sizes = old_schedule(src, items)
                else:
                    n_out = sum(1 for _ in src.features(items))
                    assert n_out == len(items)
                    sizes = src.last_batch_sizes
                wall = time.perf_counter() - t0
                cpu = time.process_time() - cpu0
                n = sum(sizes)
                stage = {k: timings.seconds.get(k, 0.0) / n for k in HOST_STAGES}
                host = sum(stage.values())
                device = (timings.seconds.get("forward", 0.0) / n if args.simulate_device is None
                          else args.simulate_device / 1000)
                rate = n / wall
                bound = 1.0 / (device + host) if workers == 0 else min(1.0 / device, workers / host)
                if name not in results or rate > results[name]["images_per_s"]:
                    results[name] = {"images_per_s": rate, "bound": bound, "efficiency": rate / bound,
                                     "mean_batch": n / len(sizes), "batches": len(sizes), "images": n,
                                     "host_s_per_image": stage, "device_s_per_image": device,
                                     "process_cpu_s_per_image": cpu / n, "wall_s": wall}
        rows = [(name, v["images_per_s"], v["mean_batch"], sum(v["host_s_per_image"].values()) * 1000,
                 v["device_s_per_image"] * 1000, v["bound"], v["efficiency"]) for name, v in results.items()]

    load = os.getloadavg()
    print(f"images: {len(items)} ({'given' if args.images else 'VOC-like sizes'}), batch size {args.batch_size}, "
          f"device: {'simulated %.1f ms/image' % args.simulate_device if args.simulate_device is not None else backbone.device}, "
          f"cores {os.cpu_count()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'schedule':>12} {'img/s':>8} {'batch':>6} {'host ms/img':>12} {'device ms':>10} {'bound':>8} {'eff':>6}")
    for name, rate, batch, host, device, bound, eff in rows:
        label = "old" if name == "old" else f"new W={name}"
        print(f"{label:>12} {rate:8.1f} {batch:6.2f} {host:12.1f} {device:10.2f} {bound:8.1f} {eff:6.2f}")
    stages = "  ".join(f"{k} {results['old']['host_s_per_image'][k] * 1000:.1f}" for k in HOST_STAGES)
    print(f"host stages of the old schedule, ms/image: {stages}")
    print("speed-up of the new schedule over the old: " + ", ".join(
        f"W={w}: {results[str(w)]['images_per_s'] / results['old']['images_per_s']:.2f}x" for w in args.workers))
    out = args.json or REPO / "benchmarks" / "results" / (
        f"schedule_sim{args.simulate_device:g}ms.json" if args.simulate_device is not None else "schedule_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"simulate_device_ms": args.simulate_device, "batch_size": args.batch_size, "images": len(items), "repeat": repeat,
            "backbone": args.backbone, "cores": os.cpu_count(), "load_average": load}
    out.write_text(json.dumps({**results, "meta": meta}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
