"""A randomized fault soak of the lease invariant (DESIGN.md, "The invariant everything serves").

    A device is never held by two holders at once (shares on a device never sum above 1,
    and a whole-device holder is alone); every lease comes back, whatever happens to its
    holder (error, cancel, kill during construction, worker death, plugin re-registration);
    nothing waits forever while a device that fits it is free.

The soak starts a real cluster (a scheduler in this process, worker processes under Nannies,
each declaring ``GPU=<gpus>`` with its own ``CUDA_VISIBLE_DEVICES``), installs the plugins,
and drives a seeded random mix at it:

- tasks asking for whole (1, 2) or fractional (0.1, 0.2, 0.25, 0.3, 0.5) GPUs, in the
  worker's threads or in isolated children (``isolation="thread"|"process"``, a few with
  ``max_calls=1``), through the facade (``gr.remote(...).options(...).remote()``) and through
  plain ``client.submit(..., resources={"GPU": x})`` under ``dask.annotate(isolation=...)``;
- faults: tasks that raise, isolated children that ``os._exit(1)``, cancels of queued and of
  running tasks, actors (facade, and plain Dask ``actor=True``) killed with ``gr.kill`` /
  cancelled or dropped (last handle deleted), actors killed while their (slow) constructor
  runs, a worker process SIGKILLed mid-run (its Nanny restarts it), ``gr.install(client)``
  called again mid-run (the plugin is ``idempotent``, so Dask keeps the running instance) and
  the scheduler plugin registered again for real (a new ``GPUSchedulerPlugin`` with
  ``idempotent = False``: Dask starts it and it replaces the running one);
- the isolated actor's own process (facade actors, ``isolation="process"``): killed
  (``actor_kill_mid_call``) or its last handle dropped (``actor_drop_mid_call``) while a slow
  method (1.5-3 s) runs; killed (``actor_kill_constructing``) or dropped
  (``actor_drop_constructing``, with no call made on it: an actor dropped with calls
  pending answers them first, as in Ray) while its constructor runs (``--slow-ctor`` 8-10 s,
  longer than the liveness bound); its idle child SIGKILLed from the driver
  (``actor_child_sigkill``: the pid from a method's ``os.getpid()``, checked to be an
  isolated child of this soak), then called once more and its handle kept a few seconds past
  the bound before it is dropped;
- ``mem_task``: tasks asking for a non-GPU resource (``resources={"MEM": 1}``, workers
  declare ``MEM=--mem``), two thirds with no GPU and one third beside a GPU request;
- ``fill``: a worker filled by actors with a larger request queued (two actors each asking
  for a whole worker, one 1-GPU actor per device of a worker, 1-GPU tasks; killed after
  3-5 s), 1 per 150 tasks;
- ``priority_pass``: a whole-worker GPU task followed by 4-7 small ones at ``priority=10``
  (plain submits: the facade has no priority option) that pass it.

Every holder (task body, actor instance) appends JSON lines to a sink outside the workers (a
file per process in a temp directory, one ``os.write`` of one line on an ``O_APPEND`` file,
``time.time()`` on this host): ``start`` (device ids from ``gr.get_gpu_ids()``, share, pid,
parent pid), ``tick`` every ``--tick`` seconds while it lives, and ``end``. A holder's
interval is [start, end]; one killed without writing ``end`` (a cancelled isolated task whose
child was ended, an isolated actor's child, an ``os._exit``) ends at its last tick, so overlaps
shorter than a tick right after such a kill are not seen (no false positives). Holders of a
SIGKILLed worker end at the kill (their worker incarnation is gone).

Checked at the end:

- ``violations``: an interval sweep per device, keyed by (worker incarnation = worker pid,
  device id): at no instant do the shares sum above 1 (exact fractions); a whole-device
  holder is thereby alone. Also counted as violations: a holder whose ids do not match its
  request (n whole devices, or one device for a fraction), whose ``get_gpu_ids()`` failed or
  changed during its life, and any allocation-table snapshot (``gr.allocations(client)``,
  polled during the run) with a device over 1 or a whole holder not alone.
- ``hung``: futures (tasks, actor creations, actor calls) not resolved ``--hang-timeout``
  seconds after the submission phase ends (each with its scheduler state and whether a device
  that fits it was free); they are cancelled then.
- ``leaked``: holders the allocation table still lists once everything is released (after a
  bounded wait), isolated children of this soak still alive after the cluster closed, and
  scheduler tasks still waiting/queued/processing once every future is released.

- ``liveness``: the rule "nothing waits beside a device that fits it". Every
  ``--liveness-poll`` seconds (0.5) the soak reads the scheduler's tasks with resource
  restrictions that wait (``queued``, ``no-worker``, ``processing``; ``client.run_on_scheduler``),
  each worker's free threads, free non-GPU resources and running keys (``client.run``), and
  then the allocation table. A task waits when it is neither running on a worker nor a
  holder in the table; it fits a worker that has a free thread, its non-GPU resources free,
  and a device whose free share holds its fraction (or n free whole devices for ``GPU=n``).
  A device share held by a dead holder (below) counts as free once the bound has passed
  since its death. A task that waits and fits some worker in every poll for longer than the
  bound (5 s plus one ``gpuresources.scheduler.rebalance-interval`` tick, 5.5 s by default;
  ``--liveness-bound``) is one violation (counted once per key). A failed poll, or more than
  3 s between polls, starts every clock again, so the polling itself gives no false positive.
- ``zombies``: dead holders, isolated facade actors the soak killed or dropped or whose
  child it SIGKILLed, that still hold their devices more than the bound later: listed in an
  allocation-table snapshot, or still ticking (a child the kill did not end, or one that
  began constructing after it). A dropped actor is dead from the drop, or, when calls made
  on it were not yet answered then, from the moment the last is answered (as in Ray, an
  actor whose handles are gone answers its pending calls, then exits).

The exit status is 1 when any of these five counts is not 0.

Also reported (not counted in ``violations``): ``physical_overlaps``, the same sweep keyed by
physical device only, with holders' real ends (an orphaned child of a SIGKILLed worker that
still ticks while the restarted worker hands its device out again shows up here).

Usage::

    python benchmarks/soak.py --tasks 10000 --seed 1
    python benchmarks/soak.py --tasks 300 --seed 1 --workers 2 --gpus 2 --duration 120

Prints one line ``tasks=N faults=F violations=V leaked=L hung=H liveness=N zombies=Z`` (and
counts per fault kind) and writes JSON (default ``benchmarks/results/soak.json``; also
``liveness_detail``, ``zombie_detail``, ``mid_call``: whether each mid-call fault found the
method running, ``priority_waits``: how long each passed whole-worker task waited).
``tests/test_soak.py`` runs a CI-sized soak through :func:`run_soak`. Exit status: 0 when
V == L == H == N == Z == 0, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
import weakref
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import dask_gpuresources as gr

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "soak.json"
SHARES_WHOLE = (1, 2)
SHARES_FRACTION = (0.1, 0.2, 0.25, 0.3, 0.5)
CHILD_MARK = "dask_gpuresources._child import main"
TAG_VAR = "DASK_GPURESOURCES_SOAK_TAG"
PENDING_STATES = {"waiting", "queued", "no-worker", "processing"}


# -- the holders: this code runs in worker threads and isolated children ----------------------
#
# Light on purpose: an isolated child imports what these functions name (os, json, time, uuid,
# dask_gpuresources), never ``distributed``.


def _sink_write(sink: str, record: dict) -> None:
    record["t"] = time.time()
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(os.path.join(sink, f"{os.getpid()}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _ids_or_error() -> Any:
    try:
        return gr.get_gpu_ids()
    except Exception as exc:  # a lost lease is a finding, not a crash of the soak
        return f"{type(exc).__name__}: {exc}"


def _start_record(sink: str, hid: str, kind: str, share: float) -> dict:
    rec = {
        "e": "start",
        "h": hid,
        "n": uuid.uuid4().hex,
        "k": kind,
        "s": share,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        # a worker process has imported distributed; an isolated child has not
        "inw": "distributed.worker" in sys.modules,
        "ids": _ids_or_error(),
    }
    _sink_write(sink, rec)
    return rec


class SoakError(Exception):
    """The error a faulty soak task raises on purpose."""


def holder_task(hid: str, sink: str, share: float, duration: float, fault: str, tick: float) -> Any:
    """A GPU task: records its lease, holds it ``duration`` seconds, then the ``fault``."""
    rec = _start_record(sink, hid, "task", share)
    nonce = rec["n"]
    t0 = time.time()
    if fault == "crash":  # an isolated child dies mid-task
        time.sleep(duration / 2)
        _sink_write(sink, {"e": "end", "n": nonce, "why": "crash"})
        os._exit(1)
    while True:
        left = t0 + duration - time.time()
        if left <= 0:
            break
        time.sleep(min(tick, left))
        _sink_write(sink, {"e": "tick", "n": nonce})
    ids_end = _ids_or_error()
    _sink_write(sink, {"e": "end", "n": nonce, "ids_end": ids_end})
    if fault == "error":
        raise SoakError(f"soak task {hid} fails on purpose")
    return rec["ids"]


class SoakActor:
    """A GPU actor: records its lease in the constructor, ticks while its instance lives.

    Its end is recorded when the instance is collected (thread actors: when the worker lets
    go of it); an isolated actor's child that is killed stops ticking.
    """

    def __init__(self, hid: str, sink: str, share: float, slow: float, tick: float) -> None:
        rec = _start_record(sink, hid, "actor", share)
        self.nonce = rec["n"]
        self.ids = rec["ids"]
        nonce = self.nonce
        weakref.finalize(self, _sink_write, sink, {"e": "end", "n": nonce, "why": "collected"})
        ref = weakref.ref(self)

        def ticking() -> None:
            while ref() is not None:
                time.sleep(tick)
                _sink_write(sink, {"e": "tick", "n": nonce})

        threading.Thread(target=ticking, name=f"soak-tick-{hid}", daemon=True).start()
        if slow:
            time.sleep(slow)
        self.ctor_done = True

    def ping(self, x: int = 0) -> Any:
        return (self.ids, os.getpid(), x)

    def work(self, sink: str, hid: str, seconds: float) -> Any:
        """A slow method: the soak kills the actor or drops its handle while this runs."""
        _sink_write(sink, {"e": "call", "h": hid, "n": self.nonce, "pid": os.getpid()})
        time.sleep(seconds)
        _sink_write(sink, {"e": "call_end", "h": hid, "n": self.nonce})
        return (self.ids, os.getpid())


def mem_task(duration: float) -> int:
    """A task that asks only for a non-GPU resource (``MEM``); it holds no lease."""
    time.sleep(duration)
    return os.getpid()


# -- the plan ---------------------------------------------------------------------------------


@dataclass
class SoakConfig:
    tasks: int = 300
    seed: int = 1
    workers: int = 2
    gpus: int = 2  # per worker
    threads: int = 4  # per worker
    duration: float = 600.0  # the submission phase stops after this many seconds
    hang_timeout: float = 60.0
    max_inflight: int = 24
    tick: float = 0.02
    task_time: float = 0.08  # mean task duration (s)
    worker_kills: int | None = None  # None: 1 per 1000 tasks, at least 1
    reinstalls: int | None = None  # None: 1 per 1000 tasks, at least 1
    reregisters: int | None = None  # None: 1 per 1000 tasks, at least 1
    fills: int | None = None  # None: 1 per 150 tasks, at least 1
    mem: int = 2  # MEM resource per worker (non-GPU resource tasks)
    table_poll: float = 0.25
    liveness_poll: float = 0.5
    liveness_bound: float | None = None  # None: 5 s plus one rebalance tick
    slow_ctor: float = 8.0  # isolated actors killed/dropped mid-construction: ctor seconds
    json_path: str | None = str(DEFAULT_JSON)
    keep_sink: bool = False
    quiet: bool = False


# kinds of operation and their weights (per task slot)
OPS = {
    "task": 60,
    "task_error": 6,
    "task_crash": 5,
    "cancel_queued": 5,
    "cancel_running": 6,
    "actor_kill": 5,
    "actor_drop": 4,
    "actor_kill_constructing": 4,
    "plain_actor": 3,
    "max_calls1": 2,
    "actor_kill_mid_call": 3,
    "actor_drop_mid_call": 3,
    "actor_drop_constructing": 2,
    "actor_child_sigkill": 2,
    "mem_task": 8,
    "priority_pass": 2,
}
# the facade actor ops (isolated ones among them end in ``_dead_holder``)
ACTOR_OPS = {
    "actor_kill",
    "actor_drop",
    "actor_kill_constructing",
    "actor_drop_constructing",
    "actor_kill_mid_call",
    "actor_drop_mid_call",
    "actor_child_sigkill",
    "plain_actor",
}
FAULT_KINDS = (
    "task_error",
    "task_crash",
    "cancel_queued",
    "cancel_running",
    "actor_kill",
    "actor_drop",
    "actor_kill_constructing",
    "plain_actor_cancel",
    "plain_actor_drop",
    "worker_kill",
    "reinstall",
    "actor_kill_mid_call",
    "actor_drop_mid_call",
    "actor_drop_constructing",
    "actor_child_sigkill",
    "mem_task",
    "fill",
    "priority_pass",
    "reregister",
)


def _share(rng: random.Random) -> float:
    if rng.random() < 0.4:
        return rng.choice(SHARES_WHOLE)
    return rng.choice(SHARES_FRACTION)


@dataclass
class _Op:
    hid: str
    op: str
    share: float
    mode: str  # "thread" | "process"
    api: str  # "facade" | "plain"
    submitted: float = 0.0
    fault_at: float | None = None
    outcome: str | None = None
    resolved: float | None = None
    max_calls: int | None = None
    key: str | None = None  # the Dask key of the task or actor


@dataclass
class _State:
    cfg: SoakConfig
    sink: str
    tag: str
    client: Any = None
    cluster: Any = None
    ops: dict = field(default_factory=dict)  # hid -> _Op
    events: list = field(default_factory=list)  # (t, kind, detail) faults in order
    waiting: list = field(default_factory=list)  # (hid, future-like) not resolved yet
    actors: dict = field(default_factory=dict)  # hid -> {"handle"| "future", "calls": [...]}
    table_violations: list = field(default_factory=list)
    table_snapshots: int = 0
    table_errors: int = 0
    table_refresh_errors: int = 0
    killed: list = field(default_factory=list)  # (t, address, pid)
    faults: Counter = field(default_factory=Counter)
    notes: list = field(default_factory=list)
    # holders the soak ended: isolated facade actors killed or dropped, or whose child it
    # SIGKILLed; key -> {"t", "hid", "why"}
    dead: dict = field(default_factory=dict)
    # dropped isolated actors with calls not yet answered: key -> (calls, hid, why); dead
    # (state.dead) from the moment the last of them is answered (see _end_actor)
    dropping: dict = field(default_factory=dict)
    zombies: list = field(default_factory=list)  # dead holders still in the table
    zombie_keys: set = field(default_factory=set)
    # liveness: key -> first poll of the current run of polls in which it waited and fitted
    live_first: dict = field(default_factory=dict)
    liveness: list = field(default_factory=list)
    liveness_keys: set = field(default_factory=set)
    liveness_polls: int = 0
    liveness_errors: int = 0
    last_live_poll: float | None = None
    bound: float = 5.5


def _log(state: _State, msg: str) -> None:
    if not state.cfg.quiet:
        print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _bounded(fn: Any, timeout: float, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)`` in a daemon thread, waited for at most ``timeout`` (TimeoutError)."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed back to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="soak-bounded")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} took more than {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- the cluster ------------------------------------------------------------------------------


def _start_cluster(state: _State) -> None:
    from distributed import Nanny, Scheduler, SpecCluster

    cfg = state.cfg
    workers = {}
    for i in range(cfg.workers):
        devices = ",".join(str(i * cfg.gpus + d) for d in range(cfg.gpus))
        workers[f"soak-{i}"] = {
            "cls": Nanny,
            "options": {
                "nthreads": cfg.threads,
                "resources": {"GPU": cfg.gpus, "MEM": cfg.mem},
                "env": {
                    "CUDA_VISIBLE_DEVICES": devices,
                    TAG_VAR: state.tag,
                    "DASK_LOGGING__DISTRIBUTED": "error",
                },
                "silence_logs": logging.CRITICAL,
            },
        }
    state.cluster = SpecCluster(
        workers=workers,
        scheduler={
            "cls": Scheduler,
            "options": {"port": 0, "dashboard_address": None, "dashboard": False},
        },
        silence_logs=logging.ERROR,
        name="soak",
    )
    gr.init(address=state.cluster.scheduler_address)  # installs the plugins
    from distributed import default_client

    state.client = default_client()
    state.client.wait_for_workers(cfg.workers, timeout=120)
    _wait_plugins(state, 60)


def _wait_plugins(state: _State, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            have = _bounded(
                state.client.run,
                10,
                lambda dask_worker: "gpuresources" in dask_worker.plugins,
            )
            if len(have) >= state.cfg.workers and all(have.values()):
                return True
        except Exception:
            pass
        time.sleep(0.2)
    return False


def _stop_cluster(state: _State) -> None:
    with contextlib.suppress(Exception):
        _bounded(gr.shutdown, 60)
    if state.cluster is not None:
        with contextlib.suppress(Exception):
            _bounded(state.cluster.close, 90)


# -- the allocation-table poller ----------------------------------------------------------------


def _check_table(table: dict) -> list[dict]:
    bad = []
    for worker, devices in table.items():
        for device, holders in devices.items():
            shares = {k: Fraction(str(v)) for k, v in holders.items()}
            total = sum(shares.values(), Fraction(0))
            whole = [k for k, s in shares.items() if s >= 1]
            if total > 1 or (whole and len(shares) > 1):
                bad.append(
                    {
                        "worker": worker,
                        "device": device,
                        "holders": dict(holders),
                        "total": float(total),
                    }
                )
    return bad


def _poll_table(state: _State, stop: threading.Event) -> None:
    every = max(1, round(state.cfg.liveness_poll / state.cfg.table_poll))
    n = 0
    while not stop.wait(state.cfg.table_poll):
        n += 1
        live = n % every == 0
        sched = views = None
        if live:
            # scheduler and worker states first, the table last: a task that starts between
            # the two shows as a holder, never as a waiter beside a free device
            try:
                sched = _bounded(state.client.run_on_scheduler, 10, _pending_requests)
                views = _bounded(state.client.run, 10, _worker_view)
            except Exception as exc:
                state.liveness_errors += 1
                state.notes.append(f"liveness poll failed at {time.time():.1f}: {exc!r}")
                state.live_first.clear()  # continuity unknown: start every clock again
                live = False
        try:
            table = _bounded(gr.allocations, 5, state.client)
        except Exception:
            # a worker that does not answer holds up the refreshed table (the scheduler's
            # broadcast waits for it): fall back to the one the heartbeats carried
            state.table_refresh_errors += 1
            try:
                table = _bounded(gr.allocations, 5, state.client, refresh=False)
            except Exception:
                state.table_errors += 1
                state.live_first.clear()
                continue
        now = time.time()
        state.table_snapshots += 1
        for bad in _check_table(table):
            bad["t"] = now
            state.table_violations.append(bad)
        _check_zombies(state, table, now)
        if live:
            _check_liveness(state, sched, views, table, now)


def _table(state: _State, timeout: float) -> dict:
    """The allocation table, refreshed; the heartbeats' one where a worker does not answer."""
    try:
        return _bounded(gr.allocations, timeout / 2, state.client)
    except TimeoutError:
        state.table_refresh_errors += 1
        return _bounded(gr.allocations, timeout / 2, state.client, refresh=False)


def _check_zombies(state: _State, table: dict, now: float) -> None:
    """A holder the soak ended, still listed in the table more than the bound after."""
    for key, (calls, hid, why) in list(state.dropping.items()):
        if all(_done(c) for c in calls):
            del state.dropping[key]
            state.dead.setdefault(key, {"t": now, "hid": hid, "why": why})
    held = {k: (w, d) for w, devs in table.items() for d, h in devs.items() for k in h}
    for key, dead in list(state.dead.items()):
        if key in held and key not in state.zombie_keys and now - dead["t"] > state.bound:
            state.zombie_keys.add(key)
            w, d = held[key]
            state.zombies.append(
                {
                    "key": key,
                    **dead,
                    "seen": "in the allocation table",
                    "after_s": round(now - dead["t"], 2),
                    "worker": w,
                    "device": d,
                }
            )


def _pending_requests(dask_scheduler: Any) -> dict:
    """Tasks with resource restrictions that wait (queued, no-worker or processing)."""
    out = {}
    for k, ts in dask_scheduler.tasks.items():
        if ts.state in ("queued", "no-worker", "processing") and ts.resource_restrictions:
            if ts.state != "processing" and any(dts.state != "memory" for dts in ts.dependencies):
                continue
            out[str(k)] = {
                "state": ts.state,
                "worker": ts.processing_on.address if ts.processing_on else None,
                "resources": dict(ts.resource_restrictions),
                "actor": bool(ts.actor),
            }
    return out


def _worker_view(dask_worker: Any) -> dict:
    """What a worker could start now: free threads, free non-GPU resources, running keys."""
    st = dask_worker.state
    return {
        "status": str(dask_worker.status),
        "nthreads": st.nthreads,
        "executing": len(st.executing),
        "available": dict(st.available_resources),
        "running": [str(ts.key) for ts in (st.executing | st.long_running)],
        # the worker's own state of the restricted tasks it has not started (for the report)
        "waiting": {
            str(ts.key): ts.state
            for ts in st.tasks.values()
            if ts.resource_restrictions and ts.state not in ("executing", "long-running")
        },
    }


def _fits_worker(state: _State, request: dict, view: dict, devices: dict | None, now: float) -> Any:
    """The device ids on this worker that could take ``request`` now, or None."""
    if "running" not in view.get("status", "") or view["executing"] >= view["nthreads"]:
        return None
    for name, amount in request.items():
        if name != "GPU" and view["available"].get(name, 0) < amount:
            return None
    want = Fraction(str(request.get("GPU", 0)))
    if not want:
        return []
    if not devices:
        return None
    free = {}
    for d, holders in devices.items():
        used = Fraction(0)
        for k, share in holders.items():
            dead = state.dead.get(k)
            if dead is None or now - dead["t"] <= state.bound:
                used += Fraction(str(share))
        free[d] = 1 - used
    if want < 1:
        fit = [d for d, f in free.items() if f >= want]
        return fit[:1] or None
    whole = [d for d, f in free.items() if f == 1]
    return whole[: int(want)] if len(whole) >= want else None


def _check_liveness(state: _State, sched: dict, views: dict, table: dict, now: float) -> None:
    """The liveness rule: no task waits, over consecutive polls longer than the bound, while
    some worker could start it (a free thread, its non-GPU resources free, a device whose free
    share holds its fraction or n free whole devices)."""
    if state.last_live_poll is not None and now - state.last_live_poll > 3.0:
        state.live_first.clear()  # too long between polls to call the wait continuous
    state.last_live_poll = now
    state.liveness_polls += 1
    held = {k for devs in table.values() for h in devs.values() for k in h}
    running = {k for v in views.values() for k in v["running"]}
    fitting = {}
    for key, req in sched.items():
        if key in held or key in running:
            continue
        for addr in sorted(views):
            ids = _fits_worker(state, req["resources"], views[addr], table.get(addr), now)
            if ids is not None:
                fitting[key] = (addr, ids, req)
                break
    for key in list(state.live_first):
        if key not in fitting:
            del state.live_first[key]
    for key, (addr, ids, req) in fitting.items():
        first = state.live_first.setdefault(key, now)
        if now - first > state.bound and key not in state.liveness_keys:
            state.liveness_keys.add(key)
            state.liveness.append(
                {
                    "key": key,
                    "since": first,
                    "waited_s": round(now - first, 2),
                    "scheduler": req,
                    "fits_worker": addr,
                    "free_devices": ids,
                    "table": table.get(addr),
                    "worker_view": {
                        k: v for k, v in views[addr].items() if k not in ("running", "waiting")
                    },
                    "state_on_its_worker": (views.get(req["worker"]) or {})
                    .get("waiting", {})
                    .get(key, "absent"),
                    "processing_on_status": (views.get(req["worker"]) or {}).get("status"),
                }
            )


# -- driving ----------------------------------------------------------------------------------


def _submit_task(
    state: _State,
    op: _Op,
    duration: float,
    fault: str,
    extra: dict | None = None,
    priority: int = 0,
) -> Any:
    """A GPU holder task; ``extra``: non-GPU resources beside the GPU request."""
    import dask

    cfg = state.cfg
    args = (op.hid, state.sink, op.share, duration, fault, cfg.tick)
    if op.api == "facade":  # the facade has no priority option: plain submits carry it
        f = gr.remote(holder_task).options(
            num_gpus=op.share, isolation=op.mode, max_calls=op.max_calls, resources=extra or {}
        )
        ref = f.remote(*args)
        op.key = ref.task_id()
        return ref
    annotations = {"isolation": op.mode}
    if op.max_calls is not None:
        annotations["max_calls"] = op.max_calls
    op.key = f"soak-{op.hid}"
    with dask.annotate(**annotations):
        return state.client.submit(
            holder_task,
            *args,
            key=f"soak-{op.hid}",
            resources={"GPU": op.share, **(extra or {})},
            priority=priority,
            pure=False,
        )


def _submit_mem(state: _State, op: _Op, duration: float) -> Any:
    """A task that asks for ``MEM`` only (no GPU)."""
    if op.api == "facade":
        ref = gr.remote(mem_task).options(resources={"MEM": 1}).remote(duration)
        op.key = ref.task_id()
        return ref
    op.key = f"soak-{op.hid}"
    return state.client.submit(mem_task, duration, key=op.key, resources={"MEM": 1}, pure=False)


def _future_of(x: Any) -> Any:
    """The Dask (or concurrent) future behind a facade ref, or the future itself."""
    return x.future if isinstance(x, gr.ObjectRef) else x


def _status(x: Any) -> str:
    f = _future_of(x)
    status = getattr(f, "status", None)
    if status is not None:
        return {"finished": "ok"}.get(status, status)
    if not f.done():
        return "pending"
    try:
        f.result(timeout=0)
        return "ok"
    except BaseException as exc:
        return f"error:{type(exc).__name__}"


def _done(x: Any) -> bool:
    try:
        return _future_of(x).done()
    except Exception:
        return True


def _prune(state: _State) -> None:
    still = []
    now = time.time()
    for hid, fut in state.waiting:
        if _done(fut):
            op = state.ops.get(hid)
            if op is not None and op.outcome is None:
                op.outcome = _status(fut)
                op.resolved = now
        else:
            still.append((hid, fut))
    state.waiting = still


def _cancel(x: Any) -> None:
    with contextlib.suppress(Exception):
        _future_of(x).cancel()


def _event(state: _State, kind: str, **detail: Any) -> None:
    state.faults[kind] += 1
    state.events.append({"t": time.time(), "kind": kind, **detail})


def _kill_worker(state: _State, rng: random.Random) -> None:
    try:
        pids = _bounded(state.client.run, 10, os.getpid)
    except Exception as exc:
        state.notes.append(f"worker kill skipped: client.run failed: {exc!r}")
        return
    if not pids:
        return
    address = rng.choice(sorted(pids))
    pid = pids[address]
    t = time.time()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    state.killed.append({"t": t, "address": address, "pid": pid})
    _event(state, "worker_kill", address=address, pid=pid)
    _log(state, f"SIGKILL worker {address} pid {pid}")


def _reinstall(state: _State) -> None:
    """``gr.install(client)`` again: the plugin is idempotent, so Dask keeps the instance."""
    t = time.time()
    try:
        _bounded(gr.install, 30, state.client)
        _event(state, "reinstall")
    except Exception as exc:
        state.notes.append(f"gr.install mid-run failed: {exc!r}")
        _event(state, "reinstall", error=repr(exc))
    _log(state, f"gr.install(client) again ({time.time() - t:.2f} s)")


def _reregister(state: _State) -> None:
    """A new scheduler plugin instance replaces the running one (``idempotent`` off, so
    Dask's ``register_scheduler_plugin`` starts it and overwrites the old one)."""
    from dask_gpuresources.scheduler import GPUSchedulerPlugin

    t = time.time()
    plugin = GPUSchedulerPlugin()
    plugin.idempotent = False
    try:
        _bounded(state.client.register_plugin, 30, plugin)
        _event(state, "reregister")
    except Exception as exc:
        state.notes.append(f"scheduler plugin re-registration failed: {exc!r}")
        _event(state, "reregister", error=repr(exc))
    _log(state, f"GPUSchedulerPlugin registered again ({time.time() - t:.2f} s)")


def _make_actor(state: _State, op: _Op, slow: float, ping: bool = True) -> dict:
    cfg = state.cfg
    args = (op.hid, state.sink, op.share, slow, cfg.tick)
    if op.api == "plain":
        op.key = f"soak-actor-{op.hid}"
        fut = state.client.submit(
            SoakActor,
            *args,
            key=f"soak-actor-{op.hid}",
            resources={"GPU": op.share},
            actor=True,
            pure=False,
        )
        return {"future": fut, "calls": [], "plain": True}
    cls = gr.remote(SoakActor).options(num_gpus=op.share, isolation=op.mode)
    handle = cls.remote(*args)
    op.key = repr(handle).split(", ")[-1].rstrip(")")  # Actor(SoakActor, KEY)
    calls = [handle.ping.remote(1)] if ping else []
    return {"handle": handle, "calls": calls, "plain": False}


END_KINDS = {
    "kill": "actor_kill",
    "construct": "actor_kill_constructing",
    "drop": "actor_drop",
    "drop_construct": "actor_drop_constructing",
    "kill_mid_call": "actor_kill_mid_call",
    "drop_mid_call": "actor_drop_mid_call",
}


def _end_actor(state: _State, hid: str, how: str) -> None:
    """End a driver-held actor: ``how`` names the fault (END_KINDS), or ``quiet_kill`` /
    ``quiet_drop`` for the end of an actor whose fault was something else."""
    a = state.actors.get(hid)
    if a is None:
        return
    op = state.ops[hid]
    now = time.time()
    if op.fault_at is None:
        op.fault_at = now
    kill = how in ("kill", "construct", "kill_mid_call", "quiet_kill")
    if a["plain"]:
        kind = "plain_actor_cancel" if kill else "plain_actor_drop"
        if kill:
            _cancel(a["future"])
        # the creation future is tracked in waiting; dropping it there too releases it
        state.waiting = [(h, f) for h, f in state.waiting if h != hid]
        op.outcome = op.outcome or _status(a["future"])
        a["future"] = None
        _event(state, kind, hid=hid, share=op.share)
    else:
        if kill:
            try:
                gr.kill(a["handle"])
            except Exception as exc:
                state.notes.append(f"gr.kill({hid}) raised {exc!r}")
        if how in END_KINDS:
            _event(state, END_KINDS[how], hid=hid, share=op.share, mode=op.mode)
        else:
            state.events.append({"t": now, "kind": how, "hid": hid})
        if op.mode == "process" and op.key and op.key not in state.dead:
            # An isolated actor's child ends at once on kill, and once released on drop.
            # As in Ray, a dropped actor first answers the calls made on it (the handle's
            # sending thread holds the handle until then): its death counts from the last.
            pending = [] if kill else [c for c in a["calls"] if not _done(c)]
            if pending:
                state.dropping[op.key] = (pending, hid, how)
            else:
                state.dead[op.key] = {"t": now, "hid": hid, "why": how}
        # the handle goes; its calls stay in waiting until they resolve
        state.waiting = [(h, f) for h, f in state.waiting if h != hid]
        op.outcome = op.outcome or _status(a["handle"]._future)
        a["handle"] = None
    state.actors.pop(hid, None)


def _isolated_child(pid: int, tag: str) -> bool:
    """Whether ``pid`` is an isolated child of this soak (never SIGKILL anything else)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return CHILD_MARK in " ".join(p.cmdline()) and p.environ().get(TAG_VAR) == tag
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _after_ready(state: _State, hid: str, ref: Any, then: Any, deadline: float, push: Any) -> None:
    """Run ``then(result)`` once the actor call ``ref`` resolved, polled from the action
    queue (never a blocking wait); past ``deadline`` or on an error the actor is killed."""
    if hid not in state.actors:
        return
    if _done(ref):
        try:
            value = _future_of(ref).result(timeout=0)
        except BaseException as exc:
            state.notes.append(f"{hid}: first call failed ({exc!r}); actor killed")
            _end_actor(state, hid, "quiet_kill")
            return
        then(value)
    elif time.time() > deadline:
        state.notes.append(f"{hid}: not ready after {deadline - state.ops[hid].submitted:.0f} s")
        _end_actor(state, hid, "quiet_kill")
    else:
        push(0.05, lambda: _after_ready(state, hid, ref, then, deadline, push))


def _sigkill_child(state: _State, hid: str, value: Any, push: Any, rng: random.Random) -> None:
    """SIGKILL an idle isolated actor's child, call it once more (it must fail), hold the
    handle beyond the bound (its devices must come back while the handle lives), drop it."""
    pid = value[1]
    op = state.ops[hid]
    if not _isolated_child(pid, state.tag):
        state.notes.append(f"{hid}: pid {pid} is not an isolated child of this soak; kept")
        push(0.5, lambda: _end_actor(state, hid, "quiet_kill"))
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    now = time.time()
    op.fault_at = now
    _event(state, "actor_child_sigkill", hid=hid, share=op.share, pid=pid)
    if op.key:
        state.dead[op.key] = {"t": now, "hid": hid, "why": "child SIGKILLed"}

    def call_again() -> None:
        a = state.actors.get(hid)
        if a is not None:
            state.waiting.append((f"{hid}.call", a["handle"].ping.remote(2)))

    push(0.5 + rng.random(), call_again)
    push(state.bound + 2.0 + rng.random() * 2, lambda: _end_actor(state, hid, "quiet_drop"))


def _schedule(queue: list, seq: list, at: float, action: Any) -> None:
    seq[0] += 1
    heapq.heappush(queue, (at, seq[0], action))


def _fill(state: _State, i: int, rng: random.Random, push: Any) -> None:
    """Fill a worker with actors, queue a larger request, then smaller ones beside it.

    Two actors each asking for a whole worker (``GPU=gpus``): the first fills one, the second
    is the larger request that waits; then one 1-GPU actor per device of a worker, and
    1-GPU tasks. The actors are killed after 3-5 s.
    """
    cfg = state.cfg
    hids = []
    for j, share in enumerate([cfg.gpus, cfg.gpus] + [1] * cfg.gpus):
        hid = f"{i:06d}f{j}"
        op = _Op(hid, "fill", share, rng.choice(("thread", "process")), "facade")
        op.submitted = time.time()
        state.ops[hid] = op
        try:
            a = _make_actor(state, op, 0.0)
        except Exception as exc:
            op.outcome = f"submit-error:{type(exc).__name__}: {exc}"
            state.notes.append(f"{hid} (fill actor) not submitted: {exc!r}")
            continue
        state.actors[hid] = a
        state.waiting.append((hid, a["handle"]._future))
        state.waiting += [(f"{hid}.call", c) for c in a["calls"]]
        hids.append(hid)
    for j in range(cfg.gpus):
        hid = f"{i:06d}f{j + 10}"
        op = _Op(hid, "fill", 1, rng.choice(("thread", "process")), rng.choice(("facade", "plain")))
        op.submitted = time.time()
        state.ops[hid] = op
        try:
            state.waiting.append((hid, _submit_task(state, op, 0.2 + rng.random() * 0.3, "none")))
        except Exception as exc:
            op.outcome = f"submit-error:{type(exc).__name__}: {exc}"
    _event(state, "fill", hids=hids, gpus=cfg.gpus)
    hold = 3.0 + rng.random() * 2.0
    for hid in hids:
        push(hold, lambda hid=hid: _end_actor(state, hid, "quiet_kill"))


def _priority_pass(state: _State, i: int, rng: random.Random) -> None:
    """A whole-worker GPU task, then small GPU tasks at priority 10 that pass it."""
    cfg = state.cfg
    big = _Op(f"{i:06d}", "priority_pass", cfg.gpus, rng.choice(("thread", "process")), "plain")
    big.submitted = time.time()
    state.ops[big.hid] = big
    try:
        state.waiting.append((big.hid, _submit_task(state, big, 0.1, "none")))
    except Exception as exc:
        big.outcome = f"submit-error:{type(exc).__name__}: {exc}"
        return
    small = []
    for j in range(4 + rng.randrange(4)):
        op = _Op(f"{i:06d}p{j}", "priority_small", rng.choice(SHARES_FRACTION), "thread", "plain")
        op.submitted = time.time()
        state.ops[op.hid] = op
        try:
            fut = _submit_task(state, op, rng.expovariate(1 / cfg.task_time), "none", priority=10)
            state.waiting.append((op.hid, fut))
            small.append(op.hid)
        except Exception as exc:
            op.outcome = f"submit-error:{type(exc).__name__}: {exc}"
    _event(state, "priority_pass", hid=big.hid, share=big.share, passing=small)


def _drive(state: _State) -> None:
    cfg = state.cfg
    rng = random.Random(cfg.seed)
    kinds, weights = list(OPS), list(OPS.values())
    per_1000 = max(1, cfg.tasks // 1000)
    n_kills = cfg.worker_kills if cfg.worker_kills is not None else per_1000
    n_installs = cfg.reinstalls if cfg.reinstalls is not None else per_1000
    n_reregs = cfg.reregisters if cfg.reregisters is not None else per_1000
    n_fills = cfg.fills if cfg.fills is not None else max(1, cfg.tasks // 150)
    # one-off faults at seeded task indices, away from the very start and end
    lo, hi = max(1, cfg.tasks // 10), max(2, cfg.tasks * 8 // 10)
    kill_at = sorted(rng.randint(lo, hi) for _ in range(n_kills))
    install_at = sorted(rng.randint(lo, hi) for _ in range(n_installs))
    rereg_at = sorted(rng.randint(lo, hi) for _ in range(n_reregs))
    fill_at = sorted(rng.randint(lo, hi) for _ in range(n_fills))
    queue: list = []
    seq = [0]

    def push(delay: float, action: Any) -> None:
        _schedule(queue, seq, time.time() + delay, action)

    def run_due() -> None:
        now = time.time()
        while queue and queue[0][0] <= now:
            _, _, action = heapq.heappop(queue)
            action()

    t_end = time.monotonic() + cfg.duration
    submitted = 0
    stalled_since = None
    for i in range(cfg.tasks):
        if time.monotonic() > t_end:
            state.notes.append(f"submission stopped at the duration limit after {i} tasks")
            break
        run_due()  # scheduled actions (cancels, actor steps and ends)
        while kill_at and kill_at[0] <= i:
            kill_at.pop(0)
            _kill_worker(state, rng)
        while install_at and install_at[0] <= i:
            install_at.pop(0)
            _reinstall(state)
        while rereg_at and rereg_at[0] <= i:
            rereg_at.pop(0)
            _reregister(state)
        while fill_at and fill_at[0] <= i:
            fill_at.pop(0)
            _fill(state, i, rng, push)
        # pacing: at most max_inflight unresolved futures, a bounded wait
        _prune(state)
        while len(state.waiting) >= cfg.max_inflight:
            if stalled_since is None:
                stalled_since = time.monotonic()
            if time.monotonic() - stalled_since > cfg.hang_timeout:
                state.notes.append(
                    f"nothing resolved for {cfg.hang_timeout} s with {len(state.waiting)} "
                    f"in flight at task {i}: submission stopped"
                )
                return
            time.sleep(0.005)
            run_due()
            _prune(state)
        stalled_since = None

        kind = rng.choices(kinds, weights)[0]
        hid = f"{i:06d}"
        share = _share(rng)
        mode = rng.choice(("thread", "process"))
        api = rng.choice(("facade", "plain"))
        op = _Op(hid, kind, share, mode, api, submitted=time.time())
        duration = rng.expovariate(1 / cfg.task_time)
        fault = "none"
        if kind == "task_error":
            fault = "error"
        elif kind == "task_crash":
            op.mode = "process"
            fault = "crash"
        elif kind == "cancel_running":
            duration = 0.3 + rng.random() * 0.5
        elif kind == "max_calls1":
            op.mode, op.max_calls = "process", 1
        elif kind == "plain_actor":
            op.mode, op.api = "thread", "plain"
        elif kind in (
            "actor_kill_mid_call",
            "actor_drop_mid_call",
            "actor_drop_constructing",
            "actor_child_sigkill",
        ):
            op.mode, op.api = "process", "facade"  # the isolated actor's own process
        elif kind == "actor_kill_constructing":
            op.api = "facade"
        state.ops[hid] = op
        try:
            if kind in ACTOR_OPS:
                _actor_op(state, op, rng, push)
            elif kind == "priority_pass":
                del state.ops[hid]
                _priority_pass(state, i, rng)
            elif kind == "mem_task":
                if rng.random() < 2 / 3:  # MEM only, no GPU
                    op.share = 0
                    fut = _submit_mem(state, op, duration)
                else:  # MEM beside a GPU request
                    fut = _submit_task(state, op, duration, fault, extra={"MEM": 1})
                state.waiting.append((hid, fut))
                _event(state, "mem_task", hid=hid, share=op.share, api=op.api)
            else:
                fut = _submit_task(state, op, duration, fault)
                state.waiting.append((hid, fut))
                if fault in ("error", "crash"):
                    _event(state, f"task_{fault}", hid=hid, share=share, mode=op.mode)
                if kind == "cancel_queued":
                    op.fault_at = time.time()
                    _cancel(fut)
                    _event(state, "cancel_queued", hid=hid, share=share, mode=op.mode)
                elif kind == "cancel_running":

                    def cancel_later(hid=hid, fut=fut):
                        state.ops[hid].fault_at = time.time()
                        state.events.append(
                            {
                                "t": time.time(),
                                "kind": "cancel_running",
                                "hid": hid,
                                "status": _status(fut),
                            }
                        )
                        state.faults["cancel_running"] += 1
                        _cancel(fut)

                    push(0.15 + rng.random() * 0.4, cancel_later)
        except Exception as exc:  # a submission the package refused
            op.outcome = f"submit-error:{type(exc).__name__}: {exc}"
            state.notes.append(f"{hid} ({kind}, share {share}) not submitted: {exc!r}")
        submitted += 1
        if submitted % 500 == 0:
            _log(state, f"{submitted} submitted, {len(state.waiting)} in flight")
    # remaining scheduled actions (actor steps and ends, late cancels), each at its time; an
    # actor step reschedules itself only until its own deadline, so this ends
    deadline = time.monotonic() + cfg.hang_timeout + 60
    while queue and time.monotonic() < deadline:
        delay = queue[0][0] - time.time()
        if delay > 0:
            time.sleep(min(delay, 0.05))
        run_due()
        _prune(state)
    for _, _, action in sorted(queue):  # past the bound: run what is left now
        action()
    queue.clear()


def _actor_op(state: _State, op: _Op, rng: random.Random, push: Any) -> None:
    """Create an actor and schedule its fault (see ``OPS``)."""
    kind, hid = op.op, op.hid
    slow = 0.0
    if kind in ("actor_kill_constructing", "actor_drop_constructing"):
        # an isolated constructor outlasts the bound, so a child the kill does not end is
        # seen ticking after it; one in a thread cannot be ended, so it is short
        if op.mode == "process":
            slow = state.cfg.slow_ctor * (1 + rng.random() * 0.25)
        else:
            slow = 0.6 + rng.random() * 0.6
    mid_call = kind in ("actor_kill_mid_call", "actor_drop_mid_call", "actor_child_sigkill")
    # What runs later, when the actor answers, draws from a generator of its own, seeded now:
    # the seeded mix of the run must not depend on when actors happen to answer.
    later = random.Random(rng.random())
    # No call before a drop during construction: as in Ray, an actor whose last handle is
    # dropped still answers the calls made on it first (the handle's sending thread holds
    # the handle until they are answered), so it would live out its constructor and the call.
    a = _make_actor(state, op, slow, ping=kind != "actor_drop_constructing")
    state.actors[hid] = a
    state.waiting.append((hid, a["handle"]._future if "handle" in a else a["future"]))
    for c in a["calls"]:
        state.waiting.append((f"{hid}.call", c))
    if mid_call:
        how = {"actor_kill_mid_call": "kill_mid_call", "actor_drop_mid_call": "drop_mid_call"}

        def ready(value: Any) -> None:
            if kind == "actor_child_sigkill":
                _sigkill_child(state, hid, value, push, later)
                return
            seconds = 1.5 + later.random() * 1.5
            call = state.actors[hid]["handle"].work.remote(state.sink, hid, seconds)
            state.actors[hid]["calls"].append(call)
            state.waiting.append((f"{hid}.call", call))
            push(0.2 + later.random() * 0.4, lambda: _end_actor(state, hid, how[kind]))

        deadline = time.time() + 30.0
        push(0.05, lambda: _after_ready(state, hid, a["calls"][0], ready, deadline, push))
        return
    if kind == "actor_kill_constructing":
        how, delay = "construct", 0.1 + rng.random() * 0.4
    elif kind == "actor_drop_constructing":
        how, delay = "drop_construct", 0.3 + rng.random() * 0.7
    elif kind == "actor_drop":
        how, delay = "drop", 0.2 + rng.random() * 1.0
    elif kind == "plain_actor":
        how, delay = rng.choice(("kill", "drop")), 0.2 + rng.random() * 1.0
    else:
        how, delay = "kill", 0.2 + rng.random() * 1.0
    push(delay, lambda: _end_actor(state, hid, how))


# -- after the run -------------------------------------------------------------------------------


def _read_sink(sink: str) -> tuple[dict, list, dict]:
    starts: dict[str, dict] = {}
    ends: dict[str, dict] = {}
    ticks: dict[str, float] = {}
    calls: dict[str, dict] = {}  # hid -> {"t": call start, "end": call end or None}
    bad_lines = []
    for path in Path(sink).glob("*.log"):
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                bad_lines.append(line[:200])
                continue
            n = r.get("n")
            if r["e"] == "start":
                starts[n] = r
            elif r["e"] == "end":
                ends[n] = r
            elif r["e"] == "tick":
                ticks[n] = max(ticks.get(n, 0.0), r["t"])
            elif r["e"] == "call":
                calls.setdefault(r["h"], {"end": None})["t"] = r["t"]
            elif r["e"] == "call_end":
                calls.setdefault(r["h"], {"t": None})["end"] = r["t"]
    holders = {}
    for n, s in starts.items():
        e = ends.get(n)
        holders[n] = {
            **s,
            "end": e["t"] if e else None,
            "why": (e or {}).get("why"),
            "ids_end": (e or {}).get("ids_end"),
            "last_tick": ticks.get(n),
            "worker_pid": s["pid"] if s["inw"] else s["ppid"],
        }
    return holders, bad_lines, calls


def _sweep(intervals: list[tuple]) -> list[dict]:
    """``intervals``: (device key, start, end, share, holder); overlaps where shares > 1."""
    by_device = defaultdict(list)
    for dev, t0, t1, share, h in intervals:
        if t1 > t0:  # a holder killed before its first tick: lifetime unknown, skipped
            by_device[dev].append((t0, t1, share, h))
    found = []
    for dev, items in by_device.items():
        events = []
        for t0, t1, share, h in items:
            events.append((t0, 1, share, h))
            events.append((t1, 0, share, h))  # ends before starts at the same instant
        events.sort(key=lambda e: (e[0], e[1]))
        active: dict[str, tuple] = {}
        total = Fraction(0)
        for t, is_start, share, h in events:
            key = h["n"]
            if is_start:
                active[key] = (share, h)
                total += share
                if total > 1:
                    found.append(
                        {
                            "device": dev,
                            "t": t,
                            "total": float(total),
                            "holders": [
                                {
                                    k: hh.get(k)
                                    for k in (
                                        "h",
                                        "n",
                                        "k",
                                        "s",
                                        "pid",
                                        "ppid",
                                        "ids",
                                        "t",
                                        "end",
                                        "last_tick",
                                        "why",
                                    )
                                }
                                for _, hh in active.values()
                            ],
                        }
                    )
            elif key in active:
                total -= active.pop(key)[0]
    return found


def _analyse(state: _State, holders: dict) -> dict:
    kills = {k["pid"]: k["t"] for k in state.killed}
    incarnation, physical, id_problems, no_end = [], [], [], Counter()
    late: list = []
    unknown_life = 0
    for h in holders.values():
        ids = h["ids"]
        op = state.ops.get(h["h"])
        share = Fraction(str(h["s"]))
        if not isinstance(ids, list):
            id_problems.append({"h": h["h"], "problem": "get_gpu_ids failed", "detail": ids})
            continue
        want = int(share) if share >= 1 else 1
        if len(ids) != want or len(set(ids)) != len(ids):
            id_problems.append({"h": h["h"], "problem": f"ids {ids} for share {h['s']}"})
        if h["ids_end"] is not None and h["ids_end"] != ids:
            id_problems.append(
                {
                    "h": h["h"],
                    "problem": "ids changed during the task",
                    "start": ids,
                    "end": h["ids_end"],
                }
            )
        real_end = h["end"] or h["last_tick"] or h["t"]
        if h["end"] is None:
            no_end[f"{h['k']}:{op.op if op else '?'}"] += 1
            if h["last_tick"] is None:
                unknown_life += 1
        if (
            op is not None
            and op.fault_at is not None
            and h["t"] > op.fault_at + 0.5
            and (
                op.op
                in (
                    "cancel_queued",
                    "cancel_running",
                    "actor_kill_constructing",
                    "actor_kill",
                    "plain_actor",
                )
            )
        ):
            # the holder began more than 0.5 s after it was cancelled / killed
            late.append(
                {
                    "h": h["h"],
                    "op": op.op,
                    "mode": op.mode,
                    "api": op.api,
                    "share": h["s"],
                    "after_s": round(h["t"] - op.fault_at, 3),
                    "lived_s": round((real_end or h["t"]) - h["t"], 3),
                }
            )
        end = real_end
        if h["worker_pid"] in kills and h["end"] is None:
            end = min(real_end, kills[h["worker_pid"]]) if real_end else kills[h["worker_pid"]]
        per_device = share if share < 1 else Fraction(1)
        for d in ids:
            incarnation.append(((h["worker_pid"], d), h["t"], max(end, h["t"]), per_device, h))
            physical.append((d, h["t"], max(real_end, h["t"]), per_device, h))
    overlaps = _sweep(incarnation)
    phys = _sweep(physical)
    # what happened just before each overlap
    for v in overlaps + phys:
        v["faults_before"] = [e for e in state.events if v["t"] - 5.0 <= e["t"] <= v["t"] + 0.5][
            -8:
        ]
        for hh in v["holders"]:
            op = state.ops.get(hh["h"])
            if op is not None:
                hh["op"] = {
                    k: getattr(op, k)
                    for k in ("op", "mode", "api", "max_calls", "submitted", "fault_at", "outcome")
                }
    return {
        "overlaps": overlaps,
        "physical_overlaps": phys,
        "id_problems": id_problems,
        "holders_without_end": dict(no_end),
        "holders_unknown_lifetime": unknown_life,
        "started_after_cancel_or_kill": late,
        "holders": len(holders),
    }


def _free_fits(table: dict, share: Fraction) -> bool:
    for devices in table.values():
        free = [
            1 - sum((Fraction(str(v)) for v in h.values()), Fraction(0)) for h in devices.values()
        ]
        if share < 1 and any(f >= share for f in free):
            return True
        if share >= 1 and sum(1 for f in free if f == 1) >= share:
            return True
    return False


def _scheduler_states(dask_scheduler: Any, keys: list | None = None) -> dict:
    if keys is None:
        return {str(k): ts.state for k, ts in dask_scheduler.tasks.items()}
    out = {}
    for k in keys:
        ts = dask_scheduler.tasks.get(k)
        out[str(k)] = (
            None
            if ts is None
            else {
                "state": ts.state,
                "worker": ts.processing_on.address if ts.processing_on else None,
                "resources": ts.resource_restrictions,
                "who_wants": len(ts.who_wants or ()),
                "actor": bool(ts.actor),
                "who_has": [ws.address for ws in (ts.who_has or ())],
            }
        )
    return out


def _key_of(x: Any) -> Any:
    f = _future_of(x)
    return getattr(f, "key", None)


def _finish(state: _State) -> dict:
    """Wait (bounded) for everything, count hung futures, cancel them, check for leaks."""
    cfg = state.cfg
    deadline = time.monotonic() + cfg.hang_timeout
    while state.waiting and time.monotonic() < deadline:
        time.sleep(0.05)
        _prune(state)
    hung = []
    if state.waiting:
        try:
            table = _table(state, 30)
        except Exception:
            table = {}
        by_key = {op.key: op for op in state.ops.values() if op.key}
        keys = [k for k in (_key_of(f) for _, f in state.waiting) if k is not None]
        held = [k for devs in table.values() for h in devs.values() for k in h]
        calls = [state.ops[h.split(".")[0]].key for h, _ in state.waiting if h.endswith(".call")]
        keys += held + [k for k in calls if k]
        try:
            sched = _bounded(state.client.run_on_scheduler, 30, _scheduler_states, keys=keys)
        except Exception as exc:
            sched = {"error": repr(exc)}
        for hid, fut in state.waiting:
            op = state.ops.get(hid.split(".")[0])
            share = Fraction(str(op.share)) if op else Fraction(0)
            key = _key_of(fut)
            hung.append(
                {
                    "hid": hid,
                    "key": str(key),
                    "op": asdict(op) if op else None,
                    "scheduler": sched.get(str(key if key is not None else op and op.key))
                    if isinstance(sched, dict)
                    else None,
                    "device_that_fits_was_free": _free_fits(table, share) if op else None,
                }
            )
        hung_holders = {}
        for k in held:
            op = by_key.get(k)
            hung_holders[k] = {
                "op": asdict(op) if op else None,
                "events": [e for e in state.events if op and e.get("hid") == op.hid],
                "scheduler": sched.get(str(k)) if isinstance(sched, dict) else None,
                "driver_still_holds_actor": bool(op and op.hid in state.actors),
            }
        for _, fut in state.waiting:
            _cancel(fut)
        hung_table = {"table": table, "holders": hung_holders, "stages": {}}
    else:
        hung_table = None
    state.waiting = []

    def stage(name: str) -> None:
        if hung_table is not None:
            time.sleep(1.0)
            with contextlib.suppress(Exception):
                hung_table["stages"][name] = _table(state, 20)

    stage("after cancelling the hung futures")
    # release every handle and future we hold
    for hid in list(state.actors):
        _end_actor(state, hid, "kill")
    stage("after killing the actors the driver still held")
    # leaks: the allocation table must empty, and no GPU task may stay pending. A reference
    # cycle in this process must not pass for a leak: collect first.
    import gc

    gc.collect()
    stage("after gc.collect() in the driver")
    leaked_table: dict = {}
    deadline = time.monotonic() + 30
    while True:
        try:
            table = _table(state, 20)
            leaked_table = {w: {d: h for d, h in devs.items() if h} for w, devs in table.items()}
            leaked_table = {w: devs for w, devs in leaked_table.items() if devs}
        except Exception as exc:
            leaked_table = {"error": repr(exc)}
        if not leaked_table or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    pending: dict = {}
    deadline = time.monotonic() + 20
    while True:
        try:
            states = _bounded(state.client.run_on_scheduler, 20, _scheduler_states)
            pending = {k: s for k, s in states.items() if s in PENDING_STATES}
        except Exception as exc:
            pending = {"error": repr(exc)}
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    leaked_keys = [
        k
        for devs in leaked_table.values()
        if isinstance(devs, dict)
        for h in devs.values()
        for k in h
    ]
    try:
        leaked_sched = (
            _bounded(state.client.run_on_scheduler, 20, _scheduler_states, keys=leaked_keys)
            if leaked_keys
            else {}
        )
    except Exception as exc:
        leaked_sched = {"error": repr(exc)}
    return {
        "hung": hung,
        "hung_table": hung_table,
        "leaked_table": leaked_table,
        "pending": pending,
        "leaked_scheduler": leaked_sched,
    }


def _ticking_after_end(state: _State, holders: dict) -> list[dict]:
    """Dead holders (``state.dead``) whose instance still ticked more than the bound after
    the kill, drop or child SIGKILL: a child the kill did not end (or that went on
    constructing after it)."""
    out = []
    for h in holders.values():
        op = state.ops.get(h["h"])
        dead = state.dead.get(op.key) if op is not None else None
        if dead is None:
            continue
        alive = max(h["end"] or 0.0, h["last_tick"] or 0.0)
        if alive - dead["t"] > state.bound:
            out.append(
                {
                    "key": op.key,
                    **dead,
                    "seen": "ticking",
                    "after_s": round(alive - dead["t"], 2),
                    "started_after_s": round(h["t"] - dead["t"], 2),
                    "op": op.op,
                    "share": op.share,
                    "pid": h["pid"],
                }
            )
    return out


def _mid_call(state: _State, calls: dict) -> dict:
    """How many mid-call kills and drops found the slow method running (it had written
    ``call`` and not ``call_end`` at the fault)."""
    out: Counter = Counter()
    for op in state.ops.values():
        if op.op not in ("actor_kill_mid_call", "actor_drop_mid_call") or op.fault_at is None:
            continue
        c = calls.get(op.hid)
        if c is None or c.get("t") is None:
            out[f"{op.op}:call_not_started"] += 1
        elif c["t"] <= op.fault_at and (c["end"] is None or c["end"] > op.fault_at):
            out[f"{op.op}:running"] += 1
        else:
            out[f"{op.op}:call_over"] += 1
    return dict(out)


def _priority_waits(state: _State, holders: dict) -> list[dict]:
    """For each whole-worker task passed by priority-10 tasks: seconds until it started."""
    starts = {h["h"]: h["t"] for h in holders.values()}
    return [
        {"hid": op.hid, "share": op.share, "waited_s": round(starts[op.hid] - op.submitted, 2)}
        if op.hid in starts
        else {"hid": op.hid, "share": op.share, "waited_s": None, "outcome": op.outcome}
        for op in state.ops.values()
        if op.op == "priority_pass"
    ]


def _soak_children(tag: str) -> list[dict]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if CHILD_MARK not in " ".join(p.info["cmdline"] or ()):
                continue
            if p.environ().get(TAG_VAR) != tag or p.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append({"pid": p.pid, "ppid": p.ppid()})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def liveness_bound(cfg: SoakConfig) -> float:
    """5 s plus one rebalance tick (``gpuresources.scheduler.rebalance-interval``)."""
    if cfg.liveness_bound is not None:
        return cfg.liveness_bound
    import dask
    from dask.utils import parse_timedelta

    tick = dask.config.get("gpuresources.scheduler.rebalance-interval", "500ms")
    return 5.0 + (parse_timedelta(tick, default="s") or 0.0)


def run_soak(cfg: SoakConfig) -> dict:
    """Run one soak; returns the report (also written to ``cfg.json_path`` when set)."""
    import cloudpickle

    module = sys.modules[__name__]
    if __name__ != "__main__":  # imported (tests): ship our holders by value
        cloudpickle.register_pickle_by_value(module)
    sink = tempfile.mkdtemp(prefix="gr-soak-")
    state = _State(cfg=cfg, sink=sink, tag=uuid.uuid4().hex, bound=liveness_bound(cfg))
    stop = threading.Event()
    poller = None
    t0 = time.time()
    finish: dict = {}
    error = None
    children: list = []
    try:
        _log(state, f"starting {cfg.workers} workers x GPU={cfg.gpus} (sink {sink})")
        _start_cluster(state)
        poller = threading.Thread(target=_poll_table, args=(state, stop), daemon=True)
        poller.start()
        _log(state, f"cluster up in {time.time() - t0:.1f} s; submitting {cfg.tasks} tasks")
        _drive(state)
        _log(state, f"submission done after {time.time() - t0:.1f} s; waiting for the rest")
        finish = _finish(state)
    except BaseException as exc:
        error = "".join(traceback.format_exception(exc))
        _log(state, f"soak aborted: {exc!r}")
    finally:
        stop.set()
        if poller is not None:
            poller.join(30)
        state.waiting = []
        state.actors.clear()
        _stop_cluster(state)
        deadline = time.monotonic() + 10  # children notice a dead worker within ~0.5 s
        while True:
            children = _soak_children(state.tag)
            if not children or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        with contextlib.suppress(Exception):
            cloudpickle.unregister_pickle_by_value(module)
    holders, bad_lines, calls = _read_sink(sink)
    analysis = _analyse(state, holders)
    zombies = state.zombies + _ticking_after_end(state, holders)
    mid_call = _mid_call(state, calls)
    n_violations = (
        len(analysis["overlaps"]) + len(analysis["id_problems"]) + len(state.table_violations)
    )
    leaked_entries = 0
    lt = finish.get("leaked_table") or {}
    if "error" in lt:
        leaked_entries = 1
    else:
        leaked_entries = sum(len(h) for devs in lt.values() for h in devs.values())
    pending = finish.get("pending") or {}
    by_key = {op.key: op for op in state.ops.values() if op.key}
    leaked_ops = []
    for k in [
        k for devs in lt.values() if isinstance(devs, dict) for h in devs.values() for k in h
    ] + list(pending):
        op = by_key.get(k)
        leaked_ops.append(
            {
                "key": k,
                "op": asdict(op) if op else None,
                "events": [e for e in state.events if op and e.get("hid") == op.hid],
                "holder": [
                    {x: hh.get(x) for x in ("t", "end", "last_tick", "ids", "pid", "ppid")}
                    for hh in holders.values()
                    if op and hh["h"] == op.hid
                ],
            }
        )
    n_leaked = leaked_entries + len(children) + len(pending)
    n_hung = len(finish.get("hung", []))
    n_liveness = len(state.liveness)
    if error is not None and not finish:
        n_hung = max(n_hung, 1)  # the run did not get to its checks: not a pass
    faults = {k: state.faults.get(k, 0) for k in FAULT_KINDS}
    outcomes = Counter((op.outcome or "unresolved").split(":")[0] for op in state.ops.values())
    report = {
        "tasks": len(state.ops),
        "faults": sum(faults.values()),
        "violations": n_violations,
        "leaked": n_leaked,
        "hung": n_hung,
        "liveness": n_liveness,
        "zombies": len(zombies),
        "fault_counts": faults,
        "liveness_bound_s": state.bound,
        "liveness_detail": state.liveness,
        "liveness_polls": state.liveness_polls,
        "liveness_poll_errors": state.liveness_errors,
        "zombie_detail": zombies,
        "mid_call": mid_call,
        "priority_waits": _priority_waits(state, holders),
        "config": asdict(cfg),
        "elapsed_s": round(time.time() - t0, 1),
        "holders": analysis["holders"],
        "holders_without_end": analysis["holders_without_end"],
        "holders_unknown_lifetime": analysis["holders_unknown_lifetime"],
        "started_after_cancel_or_kill": analysis["started_after_cancel_or_kill"],
        "outcomes": dict(outcomes),
        "overlaps": analysis["overlaps"],
        "id_problems": analysis["id_problems"],
        "table_violations": state.table_violations,
        "table_snapshots": state.table_snapshots,
        "table_poll_errors": state.table_errors,
        "table_refresh_errors": state.table_refresh_errors,
        "physical_overlaps": analysis["physical_overlaps"],
        "hung_detail": finish.get("hung", []),
        "hung_table": finish.get("hung_table"),
        "leaked_table": lt,
        "leaked_children": children,
        "leaked_detail": leaked_ops,
        "leaked_scheduler_state": finish.get("leaked_scheduler"),
        "pending_tasks": pending,
        "worker_kills": state.killed,
        "events": state.events,
        "notes": state.notes,
        "sink_bad_lines": bad_lines[:20],
        "error": error,
        "sink": sink,
        "code": _code_version(),
    }
    if cfg.json_path:
        path = Path(cfg.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str))
    if not cfg.keep_sink and not _failed(report):
        shutil.rmtree(sink, ignore_errors=True)
        report["sink"] = None
    return report


def _code_version() -> dict:
    """The commit and the files changed since (the soak may run against a dirty tree)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out: dict = {}
    for name, cmd in (
        ("commit", ["git", "rev-parse", "HEAD"]),
        ("dirty", ["git", "status", "--porcelain", "--untracked-files=no"]),
    ):
        try:
            out[name] = subprocess.run(
                cmd, cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except Exception:
            out[name] = None
    if out.get("dirty") is not None:
        out["dirty"] = out["dirty"].splitlines()
    return out


def _failed(report: dict) -> bool:
    return any(report[k] for k in ("violations", "leaked", "hung", "liveness", "zombies"))


def summary_line(report: dict) -> str:
    per = " ".join(f"{k}={v}" for k, v in report["fault_counts"].items())
    return (
        f"tasks={report['tasks']} faults={report['faults']} violations={report['violations']} "
        f"leaked={report['leaked']} hung={report['hung']} liveness={report['liveness']} "
        f"zombies={report['zombies']} ({per})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=SoakConfig.tasks)
    p.add_argument("--seed", type=int, default=SoakConfig.seed)
    p.add_argument("--workers", type=int, default=SoakConfig.workers)
    p.add_argument("--gpus", type=int, default=SoakConfig.gpus, help="GPUs per worker")
    p.add_argument("--threads", type=int, default=SoakConfig.threads, help="threads per worker")
    p.add_argument(
        "--duration",
        type=float,
        default=SoakConfig.duration,
        help="stop submitting after this many seconds",
    )
    p.add_argument("--hang-timeout", type=float, default=SoakConfig.hang_timeout)
    p.add_argument("--max-inflight", type=int, default=SoakConfig.max_inflight)
    p.add_argument("--worker-kills", type=int, default=None)
    p.add_argument("--reinstalls", type=int, default=None)
    p.add_argument("--reregisters", type=int, default=None)
    p.add_argument("--fills", type=int, default=None)
    p.add_argument("--mem", type=int, default=SoakConfig.mem, help="MEM resource per worker")
    p.add_argument("--slow-ctor", type=float, default=SoakConfig.slow_ctor)
    p.add_argument("--liveness-poll", type=float, default=SoakConfig.liveness_poll)
    p.add_argument(
        "--liveness-bound", type=float, default=None, help="default: 5 s + one rebalance tick"
    )
    p.add_argument("--json", default=str(DEFAULT_JSON))
    p.add_argument("--keep-sink", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    cfg = SoakConfig(
        tasks=a.tasks,
        seed=a.seed,
        workers=a.workers,
        gpus=a.gpus,
        threads=a.threads,
        duration=a.duration,
        hang_timeout=a.hang_timeout,
        max_inflight=a.max_inflight,
        worker_kills=a.worker_kills,
        reinstalls=a.reinstalls,
        reregisters=a.reregisters,
        fills=a.fills,
        mem=a.mem,
        slow_ctor=a.slow_ctor,
        liveness_poll=a.liveness_poll,
        liveness_bound=a.liveness_bound,
        json_path=a.json,
        keep_sink=a.keep_sink,
        quiet=a.quiet,
    )
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    report = run_soak(cfg)
    print(summary_line(report), flush=True)
    return 1 if _failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
