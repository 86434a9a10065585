"""CPU runtimes of the backbone side by side: fp32 eager, bf16 autocast, torch.compile + bf16, OpenVINO bf16.

    python benchmarks/bench_runtime.py --quick   # 3 repeats, camvid-val first 8 (43 min at load 7-19, 2 cores)
    python benchmarks/bench_runtime.py           # 5 repeats, camvid-val all 101 (not run here: ~2x the mask part)

The first torch.compile and the OpenVINO conversions dominate at high load (minutes each).

For every runtime: the forward time per image over the voc-mini images (the runtimes interleaved, their order
rotating every repeat; the speed-up is the median over repeats of the ratio to fp32 eager *in the same
repeat*), the cosine between its key features and fp32's (mean and worst patch), and the fraction of mask pixels
that change against fp32 when the whole default `segment` (fit + predict) runs on it, on voc-mini and on
camvid-val: label changed after the best one-to-one matching of class ids (two fits may number the same
classes differently), label changed as written, and foreground/background decision changed. torch.compile's first-run cost (fresh inductor cache) and its cost in
a second process that reuses the cached kernels are measured in child processes.

OpenVINO is measured only when ``import openvino`` works (``pip install openvino``; it is not a dependency of
segcli), through segcli's own ``--openvino`` path (:mod:`segcli.vit.openvino_runtime`): its forward returns the
final tokens and the last block's attention input, and segcli's code builds the keys, CLS attention and
proposal from them in fp32, exactly as for the torch runtimes. (The --quick results of 22:02 UTC used an
equivalent copy of that code with an explicit bf16 precision hint, which is OpenVINO's default on this CPU.)

Without --weights the ViT-S/16 has random weights (no DINO weights here): speed does not depend on weight
values, but how far rounding moves features and masks does, so the mask figures are those of random weights.
Threads are fixed (--threads, default: every core) so that the runtimes are compared at the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = REPO.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")


# ------------------------------------------------------------------------------------------- runtimes


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401  (only whether it imports)
    except Exception:
        return False
    return True


def make_backbone(runtime: str, weights: str, threads: int, cache_dir: Path):
    from segcli.vit.backbone import load_backbone

    precision = "fp32" if runtime == "fp32" else "bf16"
    bb = load_backbone("vit_small_patch16_224.dino", weights=weights, device="cpu", precision=precision)
    if runtime == "compile":
        bb.compile(cache_dir)
    elif runtime == "openvino":  # what --openvino does (threads: the fixed --threads of this benchmark)
        from segcli.vit.openvino_runtime import use_openvino

        use_openvino(bb, cache_dir.parent / "openvino")
    return bb


# ------------------------------------------------------------------------------------------ measurements


def forward_seconds(bb, tensors: list, batch_size: int) -> float:
    import torch

    t0 = time.perf_counter()
    groups: dict[tuple, list] = {}
    for t in tensors:
        groups.setdefault(tuple(t.shape), []).append(t)
    for group in groups.values():
        for s in range(0, len(group), batch_size):
            bb.extract(torch.stack(group[s:s + batch_size]))
    return time.perf_counter() - t0


def compile_cost_child(spec: dict) -> dict:
    """In a fresh process: seconds to the first features of two input shapes with torch.compile + bf16."""
    import torch

    from segcli.vit.runtime import set_threads

    set_threads(spec["threads"])
    t0 = time.perf_counter()
    bb = make_backbone("compile", spec["weights"], spec["threads"], Path(spec["cache"]))
    load = time.perf_counter() - t0
    firsts = []
    for shape in ((1, 3, 448, 592), (1, 3, 448, 448)):
        t0 = time.perf_counter()
        bb.extract(torch.zeros(shape))
        firsts.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    bb.extract(torch.zeros((1, 3, 448, 592)))
    steady = time.perf_counter() - t0
    return {"load_s": load, "first_forward_s": firsts, "steady_forward_s": steady}


def mask_changes(reference: Path, other: Path) -> dict:
    from segcli.io.outputs import read_label_png

    import numpy as np
    from scipy.optimize import linear_sum_assignment

    total = changed = fg_changed = 0
    confusion = np.zeros((256, 256), np.int64)
    for path in sorted(reference.rglob("*.png")):
        a = read_label_png(path)
        b = read_label_png(other / path.relative_to(reference))
        total += a.size
        changed += int((a != b).sum())
        fg_changed += int(((a > 0) != (b > 0)).sum())
        confusion += np.bincount(a.astype(np.int64).ravel() * 256 + b.astype(np.int64).ravel(),
                                 minlength=256 * 256).reshape(256, 256)
    # Two fits may number the same classes differently: the best one-to-one matching of class ids first.
    rows, cols = linear_sum_assignment(-confusion)
    matched = int(confusion[rows, cols].sum())
    return {"pixels": total, "label_changed": changed / max(total, 1),
            "label_changed_matched": 1.0 - matched / max(total, 1), "foreground_changed": fg_changed / max(total, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 repeats, camvid-val first 8 images")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--camvid-limit", type=int, help="camvid-val images for the mask comparison (default all; --quick 8)")
    ap.add_argument("--voc-limit", type=int, default=0, help="voc-mini images (default all 11)")
    ap.add_argument("--weights", type=Path, help="checkpoint (default: random weights of ViT-S/16)")
    ap.add_argument("--threads", type=int, help="torch (and OpenVINO) threads (default: every core)")
    ap.add_argument("--runtimes", default="fp32,bf16,compile,openvino")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "runtime_cpu.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(compile_cost_child(json.loads(args.child))))
        return

    from loadgen import raise_on_signals

    raise_on_signals()
    import torch

    from segcli.vit.backbone import cpu_has_native_bf16, resolve_precision, select_device
    from segcli.config import SegmentConfig
    from segcli.engines.feature_source import FeatureSource
    from segcli.io.images import discover_images, load_image
    from segcli.pipeline import Segmenter
    from segcli.vit.runtime import set_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = set_threads(args.threads or cores)
    repeats = args.repeats or (3 if args.quick else 5)
    camvid_limit = args.camvid_limit if args.camvid_limit is not None else (8 if args.quick else 0)
    runtimes = [r for r in args.runtimes.split(",") if r]
    skipped = {}
    if "openvino" in runtimes and not openvino_available():
        runtimes.remove("openvino")
        skipped["openvino"] = "import openvino failed (pip install openvino)"
    started = time.time()
    result: dict = {"cores": cores, "threads": threads, "native_bf16": cpu_has_native_bf16(),
                    "auto_precision": resolve_precision("auto", select_device("cpu")), "runtimes": runtimes,
                    "skipped": skipped, "weights": str(args.weights) if args.weights else "random", "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.weights:
            weights = str(args.weights)
        else:
            from bench_pipeline import random_checkpoint

            weights = str(random_checkpoint("vit_small_patch16_224.dino", tmp))
        cfg = SegmentConfig()
        voc = discover_images(DATA / "voc-mini" / "images")[: args.voc_limit or None]
        camvid = discover_images(DATA / "camvid-val" / "images")[: camvid_limit or None]

        # 1. torch.compile's start-up: a fresh kernel cache, then a second process reusing it.
        if "compile" in runtimes:
            spec = {"weights": weights, "threads": threads, "cache": str(tmp / "inductor")}
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
            env.pop("TORCHINDUCTOR_CACHE_DIR", None)
            cost = {}
            for label in ("cold", "cached"):
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                      capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    raise RuntimeError(f"compile child failed: {proc.stderr.strip().splitlines()[-3:]}")
                cost[label] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"compile {label}: first forward of two shapes {cost[label]['first_forward_s'][0]:.1f} s, "
                      f"{cost[label]['first_forward_s'][1]:.1f} s; steady {cost[label]['steady_forward_s']:.2f} s", flush=True)
            result["compile_startup"] = cost

        # 2. Forward time per image, interleaved, and feature cosine against fp32.
        backbones = {rt: make_backbone(rt, weights, threads, tmp / "inductor") for rt in runtimes}
        tensors = [backbones[runtimes[0]].prepare(load_image(i.path, cfg.work_max_side).rgb, cfg.short_side, cfg.max_side)
                   for i in voc]
        warm = {}
        for rt, bb in backbones.items():  # warm-up: every shape once (compiles / converts outside the timer)
            warm[rt] = forward_seconds(bb, tensors, args.batch_size)
        seconds: dict[str, list[float]] = {rt: [] for rt in runtimes}
        for rep in range(repeats):
            order = runtimes[rep % len(runtimes):] + runtimes[:rep % len(runtimes)]
            for rt in order:
                seconds[rt].append(forward_seconds(backbones[rt], tensors, args.batch_size))
            print(f"  repeat {rep}: " + ", ".join(f"{rt} {seconds[rt][-1]:.2f} s" for rt in runtimes)
                  + f"; load avg {os.getloadavg()[0]:.2f}", flush=True)
        cos = {}
        ref = [backbones["fp32"].extract(t[None]) for t in tensors] if "fp32" in backbones else None
        for rt in runtimes:
            if ref is None:
                break
            sims = []
            for t, r in zip(tensors, ref):
                f = backbones[rt].extract(t[None])
                sims.append(torch.nn.functional.cosine_similarity(f.feats.flatten(0, 2), r.feats.flatten(0, 2), dim=-1))
            s = torch.cat(sims)
            cos[rt] = {"mean": float(s.mean()), "min": float(s.min())}
        forward = {}
        for rt in runtimes:
            ratios = [seconds["fp32"][i] / seconds[rt][i] for i in range(repeats)] if "fp32" in seconds else []
            forward[rt] = {"per_image_s": statistics.median(seconds[rt]) / len(tensors),
                           "min_per_image_s": min(seconds[rt]) / len(tensors), "max_per_image_s": max(seconds[rt]) / len(tensors),
                           "speedup_vs_fp32": statistics.median(ratios) if ratios else None,
                           "speedup_min": min(ratios) if ratios else None, "speedup_max": max(ratios) if ratios else None,
                           "warmup_s": warm[rt]}
        if "openvino" in backbones:
            forward["openvino"]["convert_s"] = backbones["openvino"].model.forward_features.convert_s
        result["forward"] = forward
        result["cosine_vs_fp32"] = cos

        # 3. Masks of the whole default run on each runtime, against fp32.
        masks: dict[str, dict] = {}
        for name, items in (("voc-mini", voc), ("camvid-val", camvid)):
            masks[name] = {"images": len(items)}
            for rt in runtimes:
                t0 = time.perf_counter()
                source = FeatureSource(cfg, cache_dir=tmp / f"cache-{name}-{rt}", batch_size=args.batch_size,
                                       backbone=backbones[rt])
                seg = Segmenter(cfg, source=source, workers=0).fit(items)
                seg.predict(items, tmp / f"masks-{name}-{rt}")
                masks[name][rt] = {"segment_s": time.perf_counter() - t0}
                print(f"  segment {name} {rt}: {masks[name][rt]['segment_s']:.1f} s", flush=True)
            for rt in runtimes:
                if rt != "fp32" and "fp32" in runtimes:
                    masks[name][rt].update(mask_changes(tmp / f"masks-{name}-fp32", tmp / f"masks-{name}-{rt}"))
        result["masks_vs_fp32"] = masks
    result["duration_s"] = time.time() - started
    result["load_average_end"] = os.getloadavg()
    result["command"] = " ".join(["python", "benchmarks/bench_runtime.py", *sys.argv[1:]])

    print(f"\nsegcli runtime benchmark: ViT-S/16 ({result['weights']} weights), {len(tensors)} voc-mini images, "
          f"{threads} threads, {repeats} repeats, native bf16 {result['native_bf16']}, auto -> {result['auto_precision']}, "
          f"{result['duration_s'] / 60:.1f} min, load average at the end {result['load_average_end'][0]:.2f}")
    print(f"{'runtime':<10}{'s/image':>9}{'speed-up (min-max)':>22}{'cos mean':>10}{'cos min':>9}"
          f"{'voc matched/raw/fg changed':>28}{'camvid matched/raw/fg changed':>30}")
    for rt in runtimes:
        f, c = forward[rt], cos.get(rt, {})
        row = f"{rt:<10}{f['per_image_s']:>9.3f}"
        row += f"{f['speedup_vs_fp32']:>8.2f}x ({f['speedup_min']:.2f}-{f['speedup_max']:.2f})" if f["speedup_vs_fp32"] else f"{'':>22}"
        row += f"{c.get('mean', float('nan')):>10.5f}{c.get('min', float('nan')):>9.4f}"
        for name in ("voc-mini", "camvid-val"):
            m = masks[name].get(rt, {})
            row += (f"{100 * m['label_changed_matched']:>8.3f}%/{100 * m['label_changed']:.2f}%/{100 * m['foreground_changed']:.3f}%"
                    if "label_changed" in m else f"{'(reference)':>24}")
        print(row)
    if "compile_startup" in result:
        c = result["compile_startup"]
        print(f"compile start-up: first forward {c['cold']['first_forward_s'][0]:.1f} s (fresh cache), "
              f"{c['cached']['first_forward_s'][0]:.1f} s (cached kernels, new process); a second input shape "
              f"{c['cold']['first_forward_s'][1]:.1f} s / {c['cached']['first_forward_s'][1]:.1f} s")
    for rt, why in skipped.items():
        print(f"{rt}: not measured ({why})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.json.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(result, indent=2) + "\n")
    tmp_json.replace(args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
