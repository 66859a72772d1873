"""The randomized fault soak of the lease invariant, CI-sized (``benchmarks/soak.py``).

One implementation: this test imports ``benchmarks/soak.py`` and runs :func:`soak.run_soak`
with a few hundred tasks (about 2 minutes on 2 cores), every fault kind at least once, and
checks the lease invariant, the liveness rule and that killed isolated actors end. The
full-size run is ``python benchmarks/soak.py --tasks 10000 --seed 1``.
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import soak  # noqa: E402  (benchmarks/soak.py)


def _holder(n, t0, t1, share, ids=(0,)):
    return {
        "h": n,
        "n": n,
        "k": "task",
        "s": share,
        "pid": 1,
        "ppid": 0,
        "ids": list(ids),
        "t": t0,
        "end": t1,
        "last_tick": None,
        "why": None,
    }


def test_sweep_finds_overlaps_and_only_them():
    """The checker itself: shares above 1 and a whole holder not alone are found;
    touching intervals and fractions summing to exactly 1 are not."""
    h = _holder
    ok = [
        ("d", 0.0, 1.0, Fraction(1), h("a", 0.0, 1.0, 1)),
        ("d", 1.0, 2.0, Fraction(1), h("b", 1.0, 2.0, 1)),  # starts as a ends: fine
        ("e", 0.0, 1.0, Fraction("0.3"), h("c", 0.0, 1.0, 0.3)),
        ("e", 0.0, 1.0, Fraction("0.2"), h("d", 0.0, 1.0, 0.2)),
        ("e", 0.5, 1.0, Fraction("0.5"), h("e", 0.5, 1.0, 0.5)),  # exactly 1
    ]
    # a holder killed before its first tick (start == end) has no known lifetime: skipped
    ok.append(("d", 0.5, 0.5, Fraction(1), h("z", 0.5, 0.5, 1)))
    assert soak._sweep(ok) == []
    bad = ok + [
        ("d", 1.5, 1.6, Fraction("0.1"), h("f", 1.5, 1.6, 0.1)),  # beside a whole holder
        ("e", 0.9, 1.2, Fraction("0.1"), h("g", 0.9, 1.2, 0.1)),  # 1.1 on e
    ]
    found = soak._sweep(bad)
    assert [(v["device"], sorted(x["h"] for x in v["holders"])) for v in found] == [
        ("d", ["b", "f"]),
        ("e", ["c", "d", "e", "g"]),
    ]


def test_liveness_fit_counts_threads_resources_and_dead_holders():
    """The liveness rule's fit: a free thread, the non-GPU resources, a device share (or n
    whole devices); a dead holder's share counts as free only once the bound has passed."""
    state = soak._State(cfg=soak.SoakConfig(), sink="", tag="", bound=5.5)
    view = {"status": "Status.running", "nthreads": 2, "executing": 1, "available": {"MEM": 1}}
    devices = {0: {"a": 0.5}, 1: {"b": 1.0}}
    fits = soak._fits_worker
    assert fits(state, {"GPU": 0.5}, view, devices, 100.0) == [0]
    assert fits(state, {"GPU": 0.6}, view, devices, 100.0) is None
    assert fits(state, {"GPU": 1}, view, devices, 100.0) is None
    assert fits(state, {"MEM": 1}, view, devices, 100.0) == []
    assert fits(state, {"MEM": 2}, view, devices, 100.0) is None
    assert fits(state, {"GPU": 0.1}, {**view, "executing": 2}, devices, 100.0) is None
    state.dead["b"] = {"t": 99.0, "hid": "x", "why": "kill"}
    assert fits(state, {"GPU": 1}, view, devices, 100.0) is None  # within the bound
    assert fits(state, {"GPU": 1}, view, devices, 105.0) == [1]


def test_liveness_needs_the_whole_bound_of_consecutive_polls():
    state = soak._State(cfg=soak.SoakConfig(), sink="", tag="", bound=5.5)
    view = {
        "status": "Status.running",
        "nthreads": 4,
        "executing": 0,
        "available": {"MEM": 2},
        "running": [],
    }
    views = {"w": view}
    table = {"w": {0: {}, 1: {"busy": 1.0}}}
    sched = {"k": {"state": "processing", "worker": "w2", "resources": {"GPU": 1}, "actor": False}}
    for t in (0.0, 2.0, 4.0, 5.0):
        soak._check_liveness(state, sched, views, table, t)
    assert state.liveness == []
    soak._check_liveness(state, {}, views, table, 5.4)  # it left the queue: clock reset
    for t in (5.6, 7.6, 9.6, 11.0):
        soak._check_liveness(state, sched, views, table, t)
    assert state.liveness == []
    soak._check_liveness(state, sched, views, table, 11.2)
    assert [v["key"] for v in state.liveness] == ["k"]
    # a gap between polls longer than 3 s restarts the clock too
    state2 = soak._State(cfg=soak.SoakConfig(), sink="", tag="", bound=5.5)
    for t in (0.0, 4.0, 8.0):
        soak._check_liveness(state2, sched, views, table, t)
    assert state2.liveness == []


def test_table_check_finds_overfull_devices():
    assert soak._check_table({"w": {0: {"a": 1.0}, 1: {"b": 0.5, "c": 0.5}}}) == []
    bad = soak._check_table({"w": {0: {"a": 1.0, "b": 0.1}, 1: {"b": 0.7, "c": 0.5}}})
    assert [b["device"] for b in bad] == [0, 1]


@pytest.mark.slow
@pytest.mark.timeout(480)  # worst case: every bounded wait runs out
@pytest.mark.filterwarnings("ignore")  # a soak judges the invariant, not Dask's warnings
def test_lease_invariant_soak(tmp_path):
    cfg = soak.SoakConfig(
        tasks=300,
        seed=1,
        workers=2,
        gpus=2,
        threads=4,
        duration=120,
        hang_timeout=45,
        worker_kills=1,
        reinstalls=1,
        reregisters=1,
        fills=2,
        json_path=str(tmp_path / "soak.json"),
        quiet=True,
    )
    report = soak.run_soak(cfg)
    line = soak.summary_line(report)
    detail = {
        k: report[k]
        for k in (
            "overlaps",
            "id_problems",
            "table_violations",
            "hung_detail",
            "leaked_table",
            "leaked_children",
            "pending_tasks",
            "liveness_detail",
            "zombie_detail",
            "notes",
            "error",
        )
        if report[k]
    }
    message = f"{line}\nreport: {tmp_path / 'soak.json'}\n{json.dumps(detail, default=str)[:6000]}"
    assert report["error"] is None, message
    assert report["tasks"] >= 250, message
    assert report["fault_counts"]["worker_kill"] == 1, message
    assert report["fault_counts"]["reinstall"] == 1, message
    assert report["fault_counts"]["reregister"] == 1, message
    for kind in (
        "actor_kill_mid_call",
        "actor_drop_mid_call",
        "actor_kill_constructing",
        "actor_drop_constructing",
        "actor_child_sigkill",
        "mem_task",
        "fill",
        "priority_pass",
    ):
        assert report["fault_counts"][kind] > 0, f"no {kind}\n{message}"
    assert report["liveness_polls"] > 0, message
    assert report["violations"] == 0, message
    assert report["leaked"] == 0, message
    assert report["hung"] == 0, message
    assert report["liveness"] == 0, message
    assert report["zombies"] == 0, message
