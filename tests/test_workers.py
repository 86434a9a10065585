"""segcli.engines.pool: the process pool of --workers (order, bounded lookahead, worker deaths, prompt stop)."""

from __future__ import annotations

import os
import time

import pytest

from segcli.errors import BadImageError
from segcli.engines.pool import CRASH_HOOK, WorkerDied, WorkerPool, default_workers
from tests import worker_tasks as tasks


def test_in_process_and_pool_give_the_same_results_in_order():
    inputs = [(str(i), (i, 0.02 * ((7 * i) % 3))) for i in range(12)]
    for workers in (0, 2):
        with WorkerPool(workers, {"scale": 3}) as pool:
            got = list(pool.map(tasks.scaled, iter(inputs)))
        assert got == [(str(i), 3 * i) for i in range(12)], workers


def test_the_input_is_pulled_lazily_and_in_flight_is_bounded():
    pulled = []

    def feed():
        for i in range(40):
            pulled.append(i)
            yield str(i), (i, 0.01)

    with WorkerPool(2, {"scale": 1}, depth=4) as pool:
        it = pool.map(tasks.scaled, feed())
        assert next(it) == ("0", 0)
        assert len(pulled) <= 4  # never more than depth tasks submitted and not yet consumed
        for n, (tag, value) in enumerate(it, start=1):
            assert value == n and len(pulled) - (n + 1) < 4
    assert pool.depth == 4


def test_bad_images_are_results_and_bugs_are_raised():
    for workers in (0, 1):
        with WorkerPool(workers, {"scale": 2}) as pool:
            got = dict(pool.map(tasks.picky, ((str(i), (i,)) for i in range(5))))
        assert isinstance(got["3"], BadImageError) and "unreadable" in str(got["3"])
        assert [got[str(i)] for i in (0, 1, 2, 4)] == [0, 2, 4, 8]
        with pytest.raises(RuntimeError, match="a bug"):
            with WorkerPool(workers, {}) as pool:
                list(pool.map(tasks.buggy, ((str(i), (i,)) for i in range(4))))


def test_workers_run_torch_with_one_thread():
    with WorkerPool(2, {}) as pool:
        got = [v for _, v in pool.map(tasks.threads, (("", ()) for _ in range(4)))]
    assert {n for n, _ in got} == {1}
    assert all(pid != os.getpid() for _, pid in got)


def test_a_worker_that_dies_costs_only_its_task(monkeypatch):
    monkeypatch.setenv(CRASH_HOOK, "5")  # inherited by the spawned workers
    with WorkerPool(2, {"scale": 10}, depth=6) as pool:
        got = list(pool.map(tasks.scaled, ((str(i), (i, 0.01)) for i in range(12))))
        assert pool.deaths == ["5"]
    assert [tag for tag, _ in got] == [str(i) for i in range(12)]
    died = dict(got)["5"]
    assert isinstance(died, WorkerDied) and isinstance(died, BadImageError)
    assert "died" in str(died) and "exit code 70" in str(died)
    assert [v for tag, v in got if tag != "5"] == [10 * i for i in range(12) if i != 5]
    # the hook is for workers only: in-process it does nothing
    with WorkerPool(0, {"scale": 1}) as pool:
        assert dict(pool.map(tasks.scaled, [("5", (5,))])) == {"5": 5}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def test_stopping_the_consumer_stops_the_workers_at_once():
    pool = WorkerPool(2, {}, depth=4)
    it = pool.map(tasks.sleepy, ((str(i), (30.0 if i else 0.0,)) for i in range(8)))
    _, first = next(it)
    pids = [p.pid for p in pool._executor._processes.values()]
    t0 = time.time()
    it.close()  # what Ctrl-C in the consumer does to the generator
    assert time.time() - t0 < 10
    assert pool._executor is None
    assert first in pids and not any(_alive(p) for p in pids)


def test_default_workers_leave_a_core_to_the_main_process():
    assert default_workers() == max(0, len(os.sched_getaffinity(0)) - 1)


@pytest.mark.parametrize("victim", ["a3", "b7"])
def test_nested_maps_share_the_pool_and_a_death_is_charged_to_its_task(monkeypatch, victim):
    """A map fed by another map's results (the region pass feeding the mask pass): a worker death in either
    costs exactly the task that caused it, whichever map notices the broken pool first."""
    monkeypatch.setenv(CRASH_HOOK, victim)
    with WorkerPool(2, {"scale": 1}, depth=4) as pool:
        inner = pool.map(tasks.scaled, ((f"a{i}", (i, 0.01)) for i in range(10)))
        outer = pool.map(tasks.scaled, ((f"b{tag[1:]}", (-1 if isinstance(v, BaseException) else v, 0.01))
                                        for tag, v in inner))
        got = list(outer)
        assert pool.deaths == [victim]
    assert [tag for tag, _ in got] == [f"b{i}" for i in range(10)]
    for tag, value in got:
        i = int(tag[1:])
        if tag == victim:
            assert isinstance(value, WorkerDied)
        else:
            assert value == (-1 if victim == f"a{i}" else i), tag


def test_default_workers_is_zero_with_a_cpu_backbone_and_the_pool_with_features(tmp_path):
    """workers=None (the CLI default): in-process when the backbone runs on the CPU (its forward uses every
    core), the available cores minus one with --features (the host steps are all the work)."""
    from segcli.config import SegmentConfig
    from segcli.pipeline import Segmenter
    from segcli.engines.pool import default_workers
    from tests.checkpoints import TINY, checkpoint_file
    from tests.synthetic import make_dataset

    make_dataset(tmp_path / "d", n_images=2)
    cpu = Segmenter(SegmentConfig(backbone=TINY), weights=checkpoint_file(TINY, "timm"), device="cpu",
                    cache_dir=tmp_path / "c1", workers=None)
    assert cpu.engine.workers == 0
    feats = Segmenter(SegmentConfig(assign="pooled"), features_dir=tmp_path / "d" / "features",
                      cache_dir=tmp_path / "c2", workers=None)
    assert feats.engine.workers == default_workers()
