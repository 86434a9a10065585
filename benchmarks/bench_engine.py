"""``--engine ray`` against ``--engine local``: start-up, per-image overhead, throughput and peak memory.

    python benchmarks/bench_engine.py [--n 8 48] [--repeat 2] [--backbone vit_small_patch16_224.dino] [--short-side 224]
                                      [--json benchmarks/results/engine_cpu.json]

Both engines run the same command, ``segcli segment LIST --out ... --engine E`` (fit and predict on the first
``--n`` CamVid frames of ../shared/data, 480x360, at each size given), each in a fresh process with a fresh cache, with a random-weight
backbone (no pretrained weights can be downloaded here; the cost does not depend on the weights' values). A
sampler walks the process tree every 0.1 s (the driver, and for Ray its GCS, raylet, actors and task workers):

* **CPU-s**: user + system seconds of every process of the tree (the last value seen of each process, so the
  ones that ended count too; up to one sampling interval of a process that ends is missed), also split by
  process (driver, Ray's task/actor workers ``default_worker.py``, its daemons);
* **peak RSS**: each process's own peak (``VmHWM`` in /proc, what ``ru_maxrss`` reports; exact): the driver's,
  and the sum over every process of the tree (an upper bound of the whole run's peak), and the largest sum of
  resident memory of the tree seen at one time (sampled: a lower bound);
* **start-up** (Ray): a separate process that starts the private local cluster and stops it
  (``segcli.engines.ray_cluster.ray_session``), wall and CPU seconds, and the idle cluster's memory;
* **fixed cost and cost per image**: each engine runs at two (or more) dataset sizes; the cost per extra image
  is the slope between the smallest and the largest (what a large dataset pays per image), the fixed cost the
  intercept (start-up, backbone loads, the fits); **per-image overhead** = Ray's CPU-s per extra image minus
  the local engine's; **throughput** = 1 / wall seconds per extra image.

It also checks that the two engines wrote byte-identical masks. Quote ratios within one run, with the load
average printed (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


class TreeSampler:
    """CPU seconds and resident memory of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.cpu: dict[int, float] = {}
        self.hwm: dict[int, int] = {}  # kB
        self.names: dict[int, str] = {}
        self.peak_total_rss = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                procs = []
            total = 0
            for p in procs:
                try:
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system  # own time only: a reaped child is counted as itself
                    total += p.memory_info().rss
                    self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), _vm_hwm_kb(p.pid))
                    if self.names.get(p.pid, "python") in ("python", "ray::IDLE"):  # until it says what it runs
                        self.names[p.pid] = "driver" if p.pid == self.root.pid else _title(p)
                except psutil.Error:
                    continue
            self.peak_total_rss = max(self.peak_total_rss, total)
            self.max_processes = max(self.max_processes, len(procs))
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"cpu_s": sum(self.cpu.values()), "peak_tree_rss_mb": self.peak_total_rss / 2**20,
                "driver_peak_rss_mb": self.hwm.get(self.root.pid, 0) / 1024,
                "sum_peak_rss_mb": sum(self.hwm.values()) / 1024, "processes": len(self.cpu),
                "cpu_s_by_process": _by_name(self.cpu, self.names)}


def _title(p) -> str:
    """A process's name; Ray workers by their title (``ray::MapWorker(MapBatches(FeatureActor))``, ``ray::IDLE``)."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0][:60]
    script = next((c.rsplit("/", 1)[-1] for c in cmd[1:] if c.endswith(".py")), "")
    return f"python {script}" if script else p.name()


def _by_name(cpu: dict[int, float], names: dict[int, str]) -> dict[str, float]:
    """CPU seconds summed per process name (Ray names its workers by what they run: ray::MapWorker(...), ...)."""
    out: dict[str, float] = {}
    for pid, seconds in cpu.items():
        name = names.get(pid, "?")
        out[name] = out.get(name, 0.0) + seconds
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _vm_hwm_kb(pid: int) -> int:
    """A process's peak resident set (kB), as the kernel keeps it (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd`` (cwd: the repository), sampling its process tree; wall seconds and the sampler's figures."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    figures = sampler.stop()
    if proc.returncode not in (0, 4):
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{err[-2000:]}")
    return {"wall_s": wall, **figures, "stdout": out}


STARTUP = """
import json, time
from segcli.engines.ray_cluster import RayOptions, ray_session
t0 = time.perf_counter()
with ray_session(RayOptions()) as ray:
    up = time.perf_counter() - t0
    time.sleep(3)  # the idle cluster's memory, once its daemons settled
t1 = time.perf_counter()
print(json.dumps({"init_s": up, "shutdown_s": t1 - t0 - up - 3}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[8, 48],
                    help="dataset sizes (CamVid val frames); two or more give the marginal cost per image")
    ap.add_argument("--backbone", default="vit_small_patch16_224.dino", help="architecture (random weights)")
    ap.add_argument("--short-side", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each (engine, size), alternating the engines' "
                    "order; the fastest counts")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "engine_cpu.json")
    args = ap.parse_args()

    frames = sorted((SHARED / "camvid-val" / "images").glob("*.png"))
    sizes = sorted(set(min(n, len(frames)) for n in args.n))
    if not frames:
        raise SystemExit(f"no CamVid frames under {SHARED / 'camvid-val'}: this benchmark needs ../shared/data")
    from tests.checkpoints import save_checkpoint

    load_before = os.getloadavg()
    runs: dict[str, dict[int, dict]] = {"local": {}, "ray": {}}
    identical = True
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        tmp = Path(tmp)
        weights = tmp / "weights.pth"
        save_checkpoint(weights, "timm", name=args.backbone, seed=0)
        startup = run_measured([sys.executable, "-c", STARTUP])
        up = {**{k: v for k, v in startup.items() if k != "stdout"},
              **json.loads(startup["stdout"].strip().splitlines()[-1])}
        for rep in range(args.repeat):
            for n in sizes:
                listing = tmp / f"images-{n}.txt"
                listing.write_text("".join(f"{p}\n" for p in frames[:n]))
                for engine in (("local", "ray") if rep % 2 == 0 else ("ray", "local")):
                    out = tmp / f"out-{engine}-{n}-{rep}"
                    cmd = [sys.executable, "-m", "segcli", "segment", str(listing), "--out", str(out),
                           "--cache", str(tmp / f"cache-{engine}-{n}-{rep}"), "--weights", str(weights),
                           "--backbone", args.backbone, "--k", "21", "--short-side", str(args.short_side),
                           "--device", "cpu", "--quiet", "--engine", engine]
                    r = run_measured(cmd)
                    r.pop("stdout")
                    # the fastest repeat (others ran beside the other sessions' load): by wall time
                    if n not in runs[engine] or r["wall_s"] < runs[engine][n]["wall_s"]:
                        runs[engine][n] = r
                a, b = tmp / f"out-local-{n}-{rep}", tmp / f"out-ray-{n}-{rep}"
                masks = sorted(p.relative_to(b) for p in b.rglob("*.png"))
                identical &= len(masks) == n and all((a / m).read_bytes() == (b / m).read_bytes() for m in masks)

    lo, hi = sizes[0], sizes[-1]
    loc, ray = runs["local"], runs["ray"]

    def slope(engine: dict, key: str) -> float:
        return (engine[hi][key] - engine[lo][key]) / (hi - lo) if hi > lo else engine[hi][key] / hi

    summary = {
        "sizes": sizes, "repeat": args.repeat, "backbone": f"{args.backbone} (random weights), short side {args.short_side}",
        "command": "segcli segment LIST --out DIR --cache DIR --weights W --k 21 --device cpu --engine E",
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "identical_masks": identical,
        "ray_startup": up, "runs": {e: {str(n): r for n, r in v.items()} for e, v in runs.items()},
        "marginal_cpu_s_per_image": {"local": slope(loc, "cpu_s"), "ray": slope(ray, "cpu_s")},
        "marginal_wall_s_per_image": {"local": slope(loc, "wall_s"), "ray": slope(ray, "wall_s")},
        "fixed_cpu_s": {e: runs[e][lo]["cpu_s"] - slope(runs[e], "cpu_s") * lo for e in runs},
        "fixed_wall_s": {e: runs[e][lo]["wall_s"] - slope(runs[e], "wall_s") * lo for e in runs},
    }
    summary["overhead_cpu_s_per_image"] = summary["marginal_cpu_s_per_image"]["ray"] - summary["marginal_cpu_s_per_image"]["local"]
    summary["images_per_s"] = {e: 1 / max(1e-9, summary["marginal_wall_s_per_image"][e]) for e in runs}

    print(f"segcli segment (fit + predict, cold cache) on CamVid val frames (480x360), {summary['backbone']}, "
          f"--device cpu; load average {load_before[0]:.2f} before, {summary['load_average_after'][0]:.2f} after")
    print(f"{'':34}" + "".join(f"{e + ' ' + str(n):>12}" for n in sizes for e in ("local", "ray")))
    table = [
        ("run wall s", "wall_s", "{:.1f}"), ("run CPU s (all processes)", "cpu_s", "{:.1f}"),
        ("driver peak RSS, MB", "driver_peak_rss_mb", "{:.0f}"), ("sum of process peaks, MB", "sum_peak_rss_mb", "{:.0f}"),
        ("peak RSS at one time, MB", "peak_tree_rss_mb", "{:.0f}"), ("processes seen", "processes", "{}"),
    ]
    for name, key, fmt in table:
        print(f"{name:<34}" + "".join(f"{fmt.format(runs[e][n][key]):>12}" for n in sizes for e in ("local", "ray")))
    print(f"{'':34}{'local':>12}{'ray':>12}")
    rows = [
        ("engine start-up (cluster), wall s", "-", f"{up['wall_s']:.1f}"),
        ("engine start-up, CPU s", "-", f"{up['cpu_s']:.1f}"),
        ("idle cluster memory, MB", "-", f"{up['peak_tree_rss_mb']:.0f}"),
        ("fixed cost per run, wall s", f"{summary['fixed_wall_s']['local']:.1f}", f"{summary['fixed_wall_s']['ray']:.1f}"),
        ("fixed cost per run, CPU s", f"{summary['fixed_cpu_s']['local']:.1f}", f"{summary['fixed_cpu_s']['ray']:.1f}"),
        ("CPU s per extra image", f"{summary['marginal_cpu_s_per_image']['local']:.2f}",
         f"{summary['marginal_cpu_s_per_image']['ray']:.2f}"),
        ("overhead CPU s per image", "-", f"{summary['overhead_cpu_s_per_image']:.2f}"),
        ("throughput, images/s (marginal)", f"{summary['images_per_s']['local']:.2f}", f"{summary['images_per_s']['ray']:.2f}"),
    ]
    for name, a, b in rows:
        print(f"{name:<34}{a:>12}{b:>12}")
    split = runs["ray"][hi]["cpu_s_by_process"]
    print(f"ray {hi}: CPU s by process: " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()))
    print(f"masks byte-identical between the engines: {'yes' if identical else 'NO'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
