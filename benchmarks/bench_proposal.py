"""Cost of MaskDistill's object proposal at extraction time, against the feature extraction it is part of.

    python benchmarks/bench_proposal.py [--images DIR] [--short-side 448] [--repeats 3] [--weights FILE]

For every image: Backbone.extract (one forward pass, q/k/v rebuilt, CLS attention, the proposal) and, on the
same captured queries and keys, the proposal alone (segcli.method.proposal.object_proposals). Each is timed
--repeats times and the fastest kept. Prints a table and writes benchmarks/results/proposal_<device>.json.
Without --weights a random-weight checkpoint is used (no downloads here): the timings are those of the
real code and shapes; the proposal's area depends on the weights and means nothing with random ones.
Quote the ratio, not absolute seconds (shared machine: the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "voc-mini" / "images"


def fastest(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES if DEFAULT_IMAGES.is_dir() else REPO / "examples")
    ap.add_argument("--backbone", default="vit_small_patch16_224.dino")
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--short-side", type=int, default=448)
    ap.add_argument("--max-side", type=int, default=1344)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from bench_pipeline import random_checkpoint
    from segcli.vit.backbone import load_backbone
    from segcli.vit.features import capture_qkv, split_qkv
    from segcli.io.images import discover_images, load_image
    from segcli.method.proposal import object_proposals

    load = os.getloadavg()[0]
    items = discover_images(args.images, None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or random_checkpoint(args.backbone, Path(tmp))
        bb = load_backbone(args.backbone, weights=weights, device=args.device)
        for item in items:
            x = bb.prepare(load_image(item.path, 2048).rgb, args.short_side, args.max_side).unsqueeze(0)
            h, w = x.shape[2] // bb.patch_size, x.shape[3] // bb.patch_size
            t_extract, fb = fastest(lambda: bb.extract(x), args.repeats)
            with torch.inference_mode(), capture_qkv(bb.model) as store:
                bb.model.forward_features(x.to(bb.device))
            q, k, _ = split_qkv(bb.model.blocks[-1].attn, store["qkv"])
            t_prop, prop = fastest(lambda: object_proposals(q, k, (h, w), bb.num_prefix_tokens), args.repeats)
            assert torch.equal(prop, fb.proposal)
            rows.append({"image": item.key, "grid": [h, w], "extract_s": t_extract, "proposal_s": t_prop,
                         "area": float(prop.float().mean())})
    total_e = sum(r["extract_s"] for r in rows)
    total_p = sum(r["proposal_s"] for r in rows)
    print(f"MaskDistill proposal cost: {len(rows)} images from {args.images}, {args.backbone} "
          f"({'given weights' if args.weights else 'random weights'}), device {bb.device}, short side {args.short_side}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {load:.2f} at start; "
          f"fastest of {args.repeats}\n")
    print(f"{'image':<24} {'grid':>7} {'extract ms':>11} {'proposal ms':>12} {'share':>7}")
    for r in rows:
        grid = f"{r['grid'][0]}x{r['grid'][1]}"
        print(f"{r['image']:<24} {grid:>7} {1000 * r['extract_s']:>11.1f} {1000 * r['proposal_s']:>12.2f} "
              f"{r['proposal_s'] / r['extract_s']:>7.1%}")
    print(f"\ntotal: extraction {total_e:.2f} s, of which the proposal {total_p:.3f} s = {total_p / total_e:.1%} "
          f"(load average now {os.getloadavg()[0]:.2f})")
    out = REPO / "benchmarks" / "results" / f"proposal_{bb.device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"images": len(rows), "backbone": args.backbone, "short_side": args.short_side,
                               "random_weights": args.weights is None, "load_average_start": load,
                               "extract_s": total_e, "proposal_s": total_p, "share": total_p / total_e,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
