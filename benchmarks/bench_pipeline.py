"""Time `segment` end to end, stage by stage, against the bare backbone forward on the same images.

    python benchmarks/bench_pipeline.py [--images DIR] [--backbone NAME] [--weights FILE] [--device auto]

Without --weights a random-weight checkpoint of the backbone is written to a temporary folder (these
machines cannot download DINO weights): the timings are those of the real code and shapes, but the number
of regions (hence crop forwards) depends on the weights, so quote ratios, not absolute seconds.
Prints a table and the ratio of the whole run to the forward passes it needs (image forwards + crop
forwards). Target: <= 1.3x.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "voc-mini" / "images"


def random_checkpoint(name: str, folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from segcli.vit.compat import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    path = folder / "random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES if DEFAULT_IMAGES.is_dir() else REPO / "examples")
    ap.add_argument("--backbone", default="vit_small_patch16_224.dino")
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=21)
    ap.add_argument("--no-crf", action="store_true")
    ap.add_argument("--crf-max-side", type=int, default=160)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "pipeline_cpu.json",
                    help="write every figure here (default benchmarks/results/pipeline_cpu.json)")
    ap.add_argument("--refine", default=None, help="meanfield | densecrf | none (default: segcli's default)")
    args = ap.parse_args()

    import torch

    from segcli.vit.backbone import load_backbone
    from segcli.config import SegmentConfig
    from segcli.engines.feature_source import FeatureSource
    from segcli.io.images import discover_images, load_image
    from segcli.pipeline import Segmenter
    from segcli.timings import Timings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = args.weights or random_checkpoint(args.backbone, tmp)
        cfg = SegmentConfig(backbone=args.backbone, k=args.k, crf=not args.no_crf, crf_max_side=args.crf_max_side,
                            refine=args.refine or SegmentConfig.refine)
        backbone = load_backbone(cfg.backbone, weights=weights, device=args.device, precision=args.precision)
        items = discover_images(args.images)

        # 1. Bare forward: decoded and prepared outside the timer, same batching as the pipeline.
        tensors = [backbone.prepare(load_image(i.path, cfg.work_max_side).rgb, cfg.short_side, cfg.max_side) for i in items]
        backbone.extract(tensors[0][None], kind=cfg.feature_kind)  # warm-up
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        groups: dict[tuple, list] = {}
        for t in tensors:
            groups.setdefault(tuple(t.shape), []).append(t)
        for group in groups.values():
            for s in range(0, len(group), args.batch_size):
                backbone.extract(torch.stack(group[s:s + args.batch_size]), kind=cfg.feature_kind)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        bare = time.perf_counter() - t0

        # 2. The whole `segment` (fit + predict) with an empty cache, timed per stage.
        timings = Timings()
        source = FeatureSource(cfg, cache_dir=tmp / "cache", batch_size=args.batch_size, timings=timings, backbone=backbone)
        t0 = time.perf_counter()
        seg = Segmenter(cfg, source=source).fit(items)
        summary = seg.predict(items, tmp / "masks")
        whole = time.perf_counter() - t0

        # 3. A second run: everything cached, no backbone work at all.
        t0 = time.perf_counter()
        seg2 = Segmenter(cfg, source=FeatureSource(cfg, cache_dir=tmp / "cache", batch_size=args.batch_size, backbone=backbone)).fit(items)
        seg2.predict(items, tmp / "masks2")
        rerun = time.perf_counter() - t0

    stages = summary.timings
    crop = stages.get("crop forward", 0.0)
    needed = bare + crop
    print(f"segcli pipeline benchmark: {len(items)} images from {args.images}, backbone {cfg.backbone} "
          f"({'given weights' if args.weights else 'random weights'}), device {backbone.device}, precision {args.precision}, "
          f"torch threads {torch.get_num_threads()}, refine {'none' if args.no_crf else cfg.refine}"
          f"{f' at long side {args.crf_max_side}' if cfg.refine == 'densecrf' and not args.no_crf else ''}")
    print(f"{'stage':<22}{'seconds':>10}{'share':>9}")
    for name, sec in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"{name:<22}{sec:>10.3f}{sec / whole:>9.1%}")
    print(f"{'whole segment':<22}{whole:>10.3f}")
    print(f"{'bare image forward':<22}{bare:>10.3f}")
    print(f"{'crop forward':<22}{crop:>10.3f}")
    print(f"{'rerun (all cached)':<22}{rerun:>10.3f}")
    print(f"ratio whole / forward passes needed (image + crop forwards) = {whole / needed:.2f}x (target <= 1.3x)")
    print(f"ratio rerun / first run = {rerun / whole:.2f}x; masks written {summary.written}, skipped {len(summary.skipped)}")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} cores)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "images": len(items), "backbone": cfg.backbone, "device": str(backbone.device), "precision": args.precision,
        "refine": "none" if args.no_crf else cfg.refine, "stages_s": stages, "whole_s": whole, "bare_forward_s": bare,
        "crop_forward_s": crop, "rerun_s": rerun, "ratio_whole_to_forward": whole / needed, "load_average": load,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
