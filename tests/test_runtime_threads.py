"""Thread and OpenMP settings (segcli.vit.runtime, docs/incoming/issue21.md): they change speed, never masks.

Masks are compared byte for byte between --threads 1, --threads 2 and the automatic (load-aware) choice, in
fp32 and in bf16 (the default arithmetic on CPUs with native bf16); the wait policy is set before torch loads
and a user's own choice wins; the benchmarks' background load always stops.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segcli.vit import runtime
from tests.checkpoints import TINY, checkpoint_file
from tests.cli_helpers import cli, ok, pngs
from tests.test_cli_backbone import scene

ROOT = Path(__file__).resolve().parents[1]


def test_wait_policy_is_passive_unless_the_user_chose_one():
    env: dict = {}
    assert runtime.apply_wait_policy(env, torch_loaded=False) == "PASSIVE"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for var, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000"), ("KMP_BLOCKTIME", "200")):
        env = {var: value}
        assert runtime.apply_wait_policy(env, torch_loaded=False) is None
        assert env == {var: value}
    env = {}
    assert runtime.apply_wait_policy(env, torch_loaded=True) is None and env == {}


def test_importing_segcli_sets_the_policy_before_torch_loads():
    code = "import os, segcli, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    clean = {k: v for k, v in os.environ.items() if k not in runtime.WAIT_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], env=clean, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "PASSIVE", out.stderr
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "OMP_WAIT_POLICY": "ACTIVE"}, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ACTIVE", out.stderr


@pytest.mark.parametrize("cores, machine, busy, want", [
    (2, 2, 0.0, 2),     # idle: every core
    (2, 2, 1.0, 1),     # one core busy elsewhere: the other one
    (2, 2, 30.0, 1),    # badly oversubscribed: never below one
    (2, 2, None, 2),    # no /proc: torch's default
    (2, 64, 30.0, 2),   # pinned to 2 of 64 CPUs, 34 spare on the machine
    (16, 16, 5.0, 11),
])
def test_threads_follow_the_cores_no_one_else_runs_on(cores, machine, busy, want):
    assert runtime.choose_threads(cores, machine, busy) == want


def test_fixed_threads_are_kept_and_auto_adapts(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert runtime.set_threads(1) == 1
        monkeypatch.setattr(runtime, "busy_elsewhere", lambda: 0.0)
        assert runtime.adapt_threads() == 1  # fixed by --threads: no adaptation
        runtime.set_threads(None)
        assert runtime.adapt_threads() == min(runtime._cpu_count(), os.cpu_count() or 1)
        monkeypatch.setattr(runtime, "busy_elsewhere", lambda: float(os.cpu_count() or 1))
        assert runtime.adapt_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert runtime.set_threads(None) == torch.get_num_threads() and runtime._fixed_threads == 2
    finally:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        runtime.set_threads(None)
        torch.set_num_threads(before)


def test_busy_elsewhere_reads_the_machine():
    busy = runtime.busy_elsewhere(samples=3, interval_s=0.0)
    assert busy is None or busy >= 0.0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_masks_are_byte_identical_whatever_the_thread_count(tmp_path, precision, monkeypatch):
    """segment (fit + predict, mean-field refinement, crop forwards) with --threads 1, --threads 2 and the
    automatic choice forced to 1 and to 2 threads mid-run: the same label PNGs, byte for byte."""
    import torch

    from segcli.vit.backbone import cpu_has_native_bf16

    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("bf16 is the default only on CPUs with native bf16")
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(60, 80), (80, 60), (70, 70), (64, 96)]):
        scene(h, w, seed=900 + i).save(images / f"s{i}.png")
    common = ["--weights", checkpoint_file(TINY, "timm"), "--k", "3", "--short-side", "224", "--max-side", "448",
              "--device", "cpu", "--precision", precision, "--quiet", "--workers", "0"]
    before = torch.get_num_threads()
    results = {}
    try:
        for label, extra in (("t1", ["--threads", "1"]), ("t2", ["--threads", "2"]), ("auto", [])):
            if label == "auto":  # alternate 1 and 2 threads from batch to batch
                flips = iter(range(10_000))
                monkeypatch.setattr(runtime, "busy_elsewhere", lambda: float(next(flips) % 2) * 64)
            out = tmp_path / f"masks-{label}"
            ok(cli("segment", images, "--out", out, "--cache", tmp_path / f"cache-{label}", *common, *extra))
            results[label] = pngs(out)
    finally:
        runtime.set_threads(None)
        torch.set_num_threads(before)
    assert len(results["t1"]) == 4
    assert results["t1"] == results["t2"] == results["auto"]


def test_the_benchmark_load_generator_always_stops():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from loadgen import BusyCore
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with BusyCore(core=0, limit_s=60) as busy:
        proc = busy.proc
        assert proc is not None and proc.poll() is None
    assert proc.poll() is not None  # stopped on exit
    with pytest.raises(RuntimeError):
        with BusyCore(core=0, limit_s=60) as busy:
            proc = busy.proc
            raise RuntimeError("benchmark failed")
    assert proc.poll() is not None  # stopped when the benchmark fails
    busy = BusyCore(core=0, limit_s=0.5).__enter__()  # never stopped by us: its own deadline ends it
    t0 = time.monotonic()
    while busy.proc.poll() is None and time.monotonic() - t0 < 20:
        time.sleep(0.1)
    assert busy.proc.poll() is not None
