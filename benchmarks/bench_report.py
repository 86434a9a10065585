"""``segcli report``: size of the page and build time, on the CamVid frames of ../shared/data.

    python benchmarks/bench_report.py [--data ../shared/data/camvid-val] [--work /tmp/bench_report]
                                      [--short-side 64] [--repeat 3] [--replicate 0]
                                      [--json benchmarks/results/report_cpu.json]

Steps (each a fresh ``segcli`` process, as a user runs them):

1. ``segcli segment IMAGES --out MASKS --overlay OVERLAYS --k 11 --stuff 8 --class-names camvid`` with a
   **random-weight** ViT-S/16 checkpoint (tests/checkpoints.py; no pretrained weights exist here, so the masks
   say nothing about quality) at a small ``--short-side`` to get masks quickly; skipped when MASKS is there;
2. ``segcli evaluate MASKS LABELS --preset camvid --json eval.json``;
3. ``segcli report MASKS --eval eval.json --out report.html``, ``--repeat`` times: wall seconds (the process,
   start-up included), the page's size, images listed and pictured.

``--replicate N``: also a report over N copies of the masks and labels (symlinks under new names, no run
record, ``--images``), to see how the page grows with the number of images listed (pictures stay capped by
``--max-images``). Prints a table with the load average (the machine is shared) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def segcli(*args, env=None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "segcli", *map(str, args)], env=env, capture_output=True, text=True, check=False)
    if r.returncode not in (0, 4):
        raise SystemExit(f"segcli {' '.join(map(str, args[:2]))} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return time.perf_counter() - t0


def page_stats(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    start = text.index('id="report-data">') + len('id="report-data">')
    data = json.loads(text[start:text.index("</script>", start)])
    return {"bytes": path.stat().st_size, "images": len(data["rows"]), "pictured": len(data["thumbs"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "camvid-val")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_report"))
    ap.add_argument("--short-side", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--replicate", type=int, default=0)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "report_cpu.json")
    a = ap.parse_args()
    if not (a.data / "images").is_dir():
        raise SystemExit(f"no CamVid frames at {a.data} (see ../shared/data/README.md)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sys.path.insert(0, str(REPO))
    from tests.checkpoints import SMALL, save_checkpoint

    a.work.mkdir(parents=True, exist_ok=True)
    ckpt = a.work / "random-vit-s16.pth"
    if not ckpt.is_file():
        save_checkpoint(ckpt, "timm", SMALL, 0)
    masks, overlays = a.work / "masks", a.work / "overlays"
    result: dict = {"data": str(a.data), "short_side": a.short_side, "load_before": os.getloadavg()}
    if not (masks / "segcli-run.json").is_file():
        result["segment_s"] = round(segcli(
            "segment", a.data / "images", "--out", masks, "--overlay", overlays, "--weights", ckpt, "--k", 11,
            "--stuff", 8, "--short-side", a.short_side, "--max-side", 2 * a.short_side, "--crf-max-side", 64,
            "--device", "cpu", "--quiet", "--cache", a.work / "cache", "--class-names", "camvid", env=env), 2)
    ev = a.work / "eval.json"
    result["evaluate_s"] = round(segcli("evaluate", masks, a.data / "labels", "--preset", "camvid", "--json", ev, env=env), 2)
    out = a.work / "report" / "report.html"
    times = [segcli("report", masks, "--eval", ev, "--out", out, "--quiet", env=env) for _ in range(a.repeat)]
    result["report"] = {**page_stats(out), "seconds": [round(t, 2) for t in times], "best_s": round(min(times), 2)}
    if a.replicate:
        big_m, big_l = a.work / f"masks_x{a.replicate}", a.work / f"labels_x{a.replicate}"
        if not big_m.is_dir():
            big_m.mkdir()
            big_l.mkdir()
            frames = sorted(p.stem for p in masks.glob("*.png"))
            for n in range(a.replicate):
                f = frames[n % len(frames)]
                os.symlink(masks / f"{f}.png", big_m / f"c{n:06d}_{f}.png")
                os.symlink(a.data / "labels" / f"{f}.png", big_l / f"c{n:06d}_{f}.png")
        big_ev = a.work / f"eval_x{a.replicate}.json"
        segcli("evaluate", big_m, big_l, "--preset", "camvid", "--json", big_ev, env=env)
        big_out = a.work / "report" / f"report_x{a.replicate}.html"
        t = segcli("report", big_m, "--eval", big_ev, "--out", big_out, "--quiet", env=env)
        result["replicated"] = {**page_stats(big_out), "seconds": round(t, 2)}
    result["load_after"] = os.getloadavg()

    print(f"{'pages':<24}{'images':>8}{'pictured':>10}{'size MB':>10}{'build s':>10}")
    r = result["report"]
    print(f"{'CamVid val':<24}{r['images']:>8}{r['pictured']:>10}{r['bytes'] / 1e6:>10.2f}{r['best_s']:>10.2f}")
    if "replicated" in result:
        r = result["replicated"]
        print(f"{'replicated':<24}{r['images']:>8}{r['pictured']:>10}{r['bytes'] / 1e6:>10.2f}{r['seconds']:>10.2f}")
    print(f"load average before {result['load_before'][0]:.1f}, after {result['load_after'][0]:.1f} (2 cores, shared)")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
