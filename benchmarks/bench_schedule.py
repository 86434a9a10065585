"""The schedule on a (simulated) device: images/s of the whole segment path, or of the feature stage alone.

    python benchmarks/bench_schedule.py --simulate-device 5 [--images DIR] [--n 128] [--batch-size 8]
                                        [--workers 0 1 2] [--json benchmarks/results/schedule_segment_sim5ms.json]
    python benchmarks/bench_schedule.py --stage features --simulate-device 5      # the feature stage alone
    python benchmarks/bench_schedule.py                  # the real (random-weight) backbone on this machine

``--simulate-device MS`` replaces every backbone forward by a wait of MS milliseconds per image, and every
crop forward by a wait of MS per crop batch (the host thread blocks as it does on a GPU's synchronisation),
returning features and crop embeddings of the correct shapes, so the schedule around the device is
measured on a CPU machine. Everything else is the real code: decoding, preprocessing, the fp16 conversion,
cache writes (fsynced), fusion, k-means, refinement, regions, crops, label maps and PNG writes, in a fresh
cache and output folder for every run.

``--stage segment`` (the default): ``segment --model`` (predict with a model fitted beforehand, untimed) with
``--workers W`` for each W of ``--workers`` (the process pool of the per-image host work; W = 0 runs it in
the main process). Printed per W: images/s (with a simulated device the steady rate: from the moment a
quarter of the masks are written to the end, so the pool's start-up, paid once per run, is left out; the
whole run's rate and the time to the first mask are printed beside it; on the real backbone the whole
run's rate), the CPU cost per image of every non-device stage (CPU
seconds of the threads and worker processes that ran it, summed: other load on the machine does not
inflate them), the device time per image (image forwards and crop batches), the bound min(device rate,
W / CPU cost per image) (for W = 0: 1 / (device time + CPU cost), the serial path) and the efficiency =
images/s / bound. On the real backbone (no ``--simulate-device``) stage costs are wall-clock seconds.

``--stage features``: the feature stage alone, the schedule before issue 9 (``old``: chunks of
``--batch-size`` consecutive images, same-shape groups inside a chunk, decode, forward and cache write one
after the other in one thread) against :meth:`FeatureSource.features` with ``--decode-workers W``.

Figures are ratios within one run: quote them with the load average.

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
DEVICE_STAGES = ("forward", "crop forward")


def make_images(folder: Path, n: int, mirrored: bool = False) -> Path:
    """``n`` JPEGs at VOC-like sizes, cut from the real photographs available here (``mirrored``: flipped
    left-right, so that their content, hence their cache keys, differ from the unmirrored ones)."""
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
            im = im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
            if mirrored:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            im.save(folder / f"img{i:04d}.jpg", quality=90)
    return folder


class SimulatedDevice:
    """Stands in for ``Backbone.extract``: waits ``ms`` per image, returns correctly shaped features.

    The features are a fixed function of each patch's mean colour (projected to the embedding size and
    L2-normalised) and the attention is each patch's colour distance from the image's border, so fusion,
    refinement and regions see image-like structure (a few regions per image, as with real features)
    instead of noise. Computing them is an average pooling (well under a millisecond per image).
    """

    def __init__(self, backbone, ms: float) -> None:
        import torch

        self.backbone, self.seconds = backbone, ms / 1000.0
        self.mix = torch.randn(3, backbone.embed_dim, generator=torch.Generator().manual_seed(0))
        self.busy = 0.0  # simulated device seconds so far

    def __call__(self, batch, kind: str = "keys", proposal_heads: int = 5):
        import torch
        import torch.nn.functional as F

        from segcli.vit.features import FeatureBatch

        t0 = time.perf_counter()
        p = self.backbone.patch_size
        colour = F.avg_pool2d(batch.float(), p).permute(0, 2, 3, 1)  # (B, h, w, 3)
        feats = F.normalize(colour @ self.mix + 0.05 * self.mix.sum(0), dim=-1)
        border = torch.cat([colour[:, 0], colour[:, -1], colour[:, :, 0], colour[:, :, -1]], dim=1).mean(1)
        attn = (colour - border[:, None, None]).norm(dim=-1) + 1e-3
        attn = attn / attn.sum(dim=(1, 2), keepdim=True)
        cls = F.normalize(feats.mean(dim=(1, 2)), dim=-1)
        out = FeatureBatch(feats=feats, cls=cls, attn=attn, proposal=attn > attn.mean(dim=(1, 2), keepdim=True))
        time.sleep(max(0.0, self.seconds * len(batch) - (time.perf_counter() - t0)))
        self.busy += self.seconds * len(batch)
        return out


class SimulatedCropDevice:
    """Stands in for ``Backbone.embed_crops``: waits ``ms`` per crop batch, returns (n, embed_dim) unit rows
    (a fixed function of each crop's mean colour, so that class assignment has something to separate)."""

    def __init__(self, backbone, ms: float) -> None:
        import numpy as np

        self.seconds, self.dim = ms / 1000.0, backbone.embed_dim
        self.mix = np.random.default_rng(0).standard_normal((3, self.dim)).astype(np.float32)
        self.busy = 0.0  # simulated device seconds so far

    def __call__(self, crops, size: int = 224, batch_size: int = 32):
        import numpy as np

        t0 = time.perf_counter()
        colours = np.stack([c.reshape(-1, 3).mean(0) / 255.0 - 0.5 for c in crops]).astype(np.float32)
        emb = colours @ self.mix + 1e-3
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
        wait = self.seconds * -(-len(crops) // max(1, batch_size))
        time.sleep(max(0.0, wait - (time.perf_counter() - t0)))
        self.busy += wait
        return emb


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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("segment", "features"), default="segment",
                    help="segment: the whole segment path with --workers W; features: the feature stage alone")
    ap.add_argument("--simulate-device", type=float, metavar="MS", help="device time per image in ms (default: the real backbone)")
    ap.add_argument("--images", type=Path)
    ap.add_argument("--n", type=int, default=128, help="number of generated images (without --images)")
    ap.add_argument("--backbone", default="vit_small_patch16_224.dino")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                    help="--workers values (--stage segment) or --decode-workers values (--stage features) to measure")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--refine", default=None, help="meanfield | densecrf | none (default: segcli's default)")
    ap.add_argument("--repeat", type=int, help="measure every schedule this many times (interleaved) and keep each "
                    "one's fastest run; default 1 simulated, 2 on the real backbone (its kernels are built per input shape on first use)")
    ap.add_argument("--json", type=Path)
    return ap.parse_args()


def main() -> None:
    args = parse_args()

    import torch

    import segcli.vit.compat  # noqa: F401  (timm import workaround)
    from segcli.vit.backbone import load_backbone
    from segcli.config import SegmentConfig
    from segcli.io.images import discover_images
    from bench_pipeline import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = args.images or make_images(tmp / "images", args.n)
        items = discover_images(images)
        cfg = SegmentConfig(backbone=args.backbone, refine=args.refine or SegmentConfig.refine)
        backbone = load_backbone(cfg.backbone, weights=random_checkpoint(args.backbone, tmp), device="cpu"
                                 if args.simulate_device is not None else "auto", precision=args.precision)
        if args.simulate_device is not None:
            backbone.extract = SimulatedDevice(backbone, args.simulate_device)
            backbone.embed_crops = SimulatedCropDevice(backbone, args.simulate_device)
        else:  # warm-up, so the first measured run does not pay one-off costs
            backbone.extract(torch.zeros(1, 3, 224, 224), kind=cfg.feature_kind)
        repeat = args.repeat or (1 if args.simulate_device is not None else 2)
        if args.stage == "features":
            results = features_stage(args, cfg, backbone, items, tmp, repeat)
        else:
            results = segment_stage(args, cfg, backbone, items, tmp, repeat)

    load = os.getloadavg()
    device = (f"simulated {args.simulate_device:g} ms/image and per crop batch" if args.simulate_device is not None
              else str(backbone.device))
    print(f"stage: {args.stage}; images: {len(items)} ({'given' if args.images else 'VOC-like sizes'}), batch size "
          f"{args.batch_size}, device: {device}, refine {cfg.refine}, cores {os.cpu_count()}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print_table(args, results)
    sim = f"sim{args.simulate_device:g}ms" if args.simulate_device is not None else "cpu"
    default_name = f"schedule_{sim}.json" if args.stage == "features" else f"schedule_segment_{sim}.json"
    out = args.json or REPO / "benchmarks" / "results" / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"stage": args.stage, "simulate_device_ms": args.simulate_device, "batch_size": args.batch_size,
            "images": len(items), "repeat": repeat, "backbone": args.backbone, "refine": cfg.refine,
            "cores": os.cpu_count(), "load_average": load}
    out.write_text(json.dumps({**results, "meta": meta}, indent=2) + "\n")
    print(f"wrote {out}")


def features_stage(args, cfg, backbone, items, tmp: Path, repeat: int) -> dict[str, dict]:
    """The feature stage alone: the old schedule and FeatureSource.features with each --decode-workers."""
    from segcli.engines.feature_source import FeatureSource
    from segcli.timings import Timings

    runs = [("old", 0)] + [(str(w), w) for w in args.workers]
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
    return results


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the worker processes, once joined)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class _MaskClock:
    """Polls an output folder in a thread and notes when the given numbers of label PNGs were there."""

    def __init__(self, folder: Path, marks: list[int]) -> None:
        import threading

        self.folder, self.marks, self.at = folder, sorted(marks), {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set() and len(self.at) < len(self.marks):
            n = len(list(self.folder.glob("*.png"))) if self.folder.is_dir() else 0
            now = time.perf_counter()
            for m in self.marks:
                if n >= m and m not in self.at:
                    self.at[m] = now
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def segment_stage(args, cfg, backbone, items, tmp: Path, repeat: int) -> dict[str, dict]:
    """``segment --model`` with each --workers W: images/s, CPU cost per stage, bound and efficiency.

    images/s is the steady rate with a simulated device, from the moment a quarter of the masks are written
    to the end (so the pool's start-up, spawned processes importing torch, and the first crop group's fill
    are left out; they are paid once per run and reported as ``first_mask_s``), and the whole run's rate on
    the real backbone; ``whole_images_per_s`` always counts the whole run.
    """
    from segcli.engines.feature_source import FeatureSource
    from segcli.pipeline import Segmenter
    from segcli.timings import Timings

    simulated = args.simulate_device is not None
    fit_src = FeatureSource(cfg, backbone=backbone, cache_dir=tmp / "cache-fit", batch_size=args.batch_size)
    model = Segmenter(cfg, source=fit_src).fit(items).model_
    results: dict[str, dict] = {}
    n_items = len(items)
    quarter = max(1, n_items // 4)
    for r in range(repeat):
        for workers in args.workers:
            name = str(workers)
            # Simulated device: stage costs in CPU seconds of the thread (or worker) that ran them, so that other
            # load on the machine does not inflate them; the device time is what the simulation waited.
            timings = Timings(clock=time.thread_time if simulated else time.perf_counter)
            src = FeatureSource(cfg, backbone=backbone, cache_dir=tmp / f"cache-{name}-{r}",
                                batch_size=args.batch_size, timings=timings)
            seg = Segmenter(model=model, source=src, workers=workers)
            out = tmp / f"out-{name}-{r}"
            busy0 = (backbone.extract.busy + backbone.embed_crops.busy) if simulated else 0.0
            clock = _MaskClock(out, [1, quarter])
            try:
                kids0 = _children_cpu()
                cpu0, main0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
                summary = seg.predict(items, out)
                t1 = time.perf_counter()
                cpu, main_cpu = time.process_time() - cpu0, time.thread_time() - main0
            finally:
                clock.stop()
                seg.close()
            kids = _children_cpu() - kids0  # the workers' CPU seconds (counted once they have exited)
            n = summary.written
            assert n == n_items and not summary.skipped, summary.skipped
            device_s = ((backbone.extract.busy + backbone.embed_crops.busy) - busy0 if simulated else
                        sum(timings.seconds.get(k, 0.0) for k in DEVICE_STAGES))
            stage = {k: v / n for k, v in sorted(timings.seconds.items()) if k not in DEVICE_STAGES}
            host = sum(stage.values())
            device = device_s / n
            t_q = clock.at.get(quarter, t0)
            # The real backbone is the bottleneck from the first image on: its whole run is the measure.
            steady = simulated and t1 > t_q and n > quarter
            rate = (n - quarter) / (t1 - t_q) if steady else n / (t1 - t0)
            bound = 1.0 / (device + host) if workers == 0 else min(1.0 / device, workers / host)
            if name not in results or rate > results[name]["images_per_s"]:
                results[name] = {"images_per_s": rate, "bound": bound, "efficiency": rate / bound,
                                 "whole_images_per_s": n / (t1 - t0), "first_mask_s": clock.at.get(1, t1) - t0,
                                 "host_s_per_image": stage, "device_s_per_image": device,
                                 "main_process_cpu_s_per_image": cpu / n, "main_thread_cpu_s_per_image": main_cpu / n,
                                 "cores_used": (cpu + kids) / (t1 - t0),
                                 "images": n, "wall_s": t1 - t0}
    return results


def print_table(args, results: dict[str, dict]) -> None:
    if args.stage == "features":
        print(f"{'schedule':>12} {'img/s':>8} {'batch':>6} {'host ms/img':>12} {'device ms':>10} {'bound':>8} {'eff':>6}")
        for name, v in results.items():
            label = "old" if name == "old" else f"new W={name}"
            print(f"{label:>12} {v['images_per_s']:8.1f} {v['mean_batch']:6.2f} "
                  f"{sum(v['host_s_per_image'].values()) * 1000:12.1f} {v['device_s_per_image'] * 1000:10.2f} "
                  f"{v['bound']:8.1f} {v['efficiency']:6.2f}")
        stages = "  ".join(f"{k} {results['old']['host_s_per_image'][k] * 1000:.1f}" for k in HOST_STAGES)
        print(f"host stages of the old schedule, ms/image: {stages}")
        print("speed-up of the new schedule over the old: " + ", ".join(
            f"W={w}: {results[str(w)]['images_per_s'] / results['old']['images_per_s']:.2f}x" for w in args.workers))
        return
    print(f"{'--workers':>9} {'img/s':>8} {'CPU ms/img':>11} {'device ms':>10} {'bound':>8} {'eff':>6} {'main proc ms':>13} "
          f"{'main thr ms':>12} {'cores used':>11} {'whole img/s':>12} {'1st mask s':>11}")
    for name, v in results.items():
        print(f"{name:>9} {v['images_per_s']:8.2f} {sum(v['host_s_per_image'].values()) * 1000:11.1f} "
              f"{v['device_s_per_image'] * 1000:10.2f} {v['bound']:8.2f} {v['efficiency']:6.2f} "
              f"{v['main_process_cpu_s_per_image'] * 1000:13.1f} {v['main_thread_cpu_s_per_image'] * 1000:12.1f} "
              f"{v['cores_used']:11.2f} "
              f"{v['whole_images_per_s']:12.2f} {v['first_mask_s']:11.2f}")
    print("main proc / main thr: CPU ms per image of the main process (all its threads: decode, cache writes, pool "
          "queues) and of its main thread alone (the device stage's feeder: at most 1000 / main thr images/s); "
          "cores used: CPU seconds of the run (main process and workers) per second of wall time, i.e. how much "
          "of the machine the run got (other load on a shared machine takes the rest)")
    names = sorted({k for v in results.values() for k in v["host_s_per_image"]})
    print("CPU cost per image of every non-device stage, ms (summed over the threads and processes that ran it):")
    print(f"{'stage':>16} " + " ".join(f"{'W=' + n:>8}" for n in results))
    for k in names:
        print(f"{k:>16} " + " ".join(f"{v['host_s_per_image'].get(k, 0.0) * 1000:8.1f}" for v in results.values()))


if __name__ == "__main__":
    main()
