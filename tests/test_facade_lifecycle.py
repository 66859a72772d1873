"""init() and shutdown(): a deadline on start, strict options, a clean exit, a clean restart."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import dask_gpuresources as gr


def _children():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _no_new_children(before, seconds=30):
    deadline = time.monotonic() + seconds
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _children() - before


def test_unknown_init_options_raise_naming_the_valid_ones():
    before = _children()
    with pytest.raises(TypeError, match=r"nworkers.*n_workers.*worker_options"):
        gr.init(num_gpus=1, nworkers=2)
    assert not gr.is_initialized()
    assert _no_new_children(before)


def test_a_worker_that_fails_to_start_raises_with_its_stderr():
    before = _children()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)local worker.*not_a_worker_option"):
        gr.init(num_gpus=1, dashboard=False, worker_options={"not_a_worker_option": 1})
    assert time.monotonic() - start < 60
    assert not gr.is_initialized()
    assert _no_new_children(before)


def test_devices_that_do_not_fit_cuda_visible_devices_raise(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    before = _children()
    with pytest.raises(gr.DeviceCountError, match=r"CUDA_VISIBLE_DEVICES"):
        gr.init(num_gpus=2, dashboard=False)
    assert not gr.is_initialized()
    assert _no_new_children(before)


def test_a_script_without_shutdown_exits_cleanly(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import dask_gpuresources as ray

            ray.init(num_gpus=2, dashboard=False)

            @ray.remote(num_gpus=1)
            def f():
                return ray.get_gpu_ids()

            @ray.remote(num_gpus=1)
            class A:
                def ids(self):
                    return ray.get_gpu_ids()

            a = A.remote()
            print(ray.get(f.remote()), ray.get(a.ids.remote()), ray.get(ray.put(3)))
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "ERROR" not in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


@gr.remote(num_gpus=2, isolation="thread")
class Two:
    def ids(self):
        return gr.get_gpu_ids()


@gr.remote(num_gpus=1)
class One:
    def ids(self):
        return gr.get_gpu_ids()


def test_init_after_shutdown_behaves_as_the_first():
    gr.init(num_gpus=2, dashboard=False)
    try:
        held = Two.remote()
        assert gr.get(held.ids.remote(), timeout=30) == [0, 1]
        pending = Two.remote()  # cannot fit while the first one lives
        waiting = pending.ids.remote()
        assert gr.wait([waiting], timeout=0.5)[0] == []
    finally:
        gr.shutdown()
    gr.init(num_gpus=1, dashboard=False)
    try:
        actor = One.remote()
        assert gr.get(actor.ids.remote(), timeout=30) == [0]
        assert gr.get(gr.remote(lambda: 1).remote(), timeout=30) == 1
    finally:
        gr.shutdown()


def test_a_scripts_own_classes_and_lambdas_reach_an_isolated_actor(tmp_path):
    # What a driver script defines lives in its __main__, which the worker and the actor's
    # child process cannot import: such arguments must travel by value.
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import dask_gpuresources as ray

            class Point:
                def __init__(self, x):
                    self.x = x

            ray.init(num_gpus=1, dashboard=False)

            @ray.remote(num_gpus=1)
            class A:
                def use(self, p, f, xs):
                    return p.x + f(2) + sum(xs)

                def x(self, p):
                    return p.x

            a = A.remote()
            print(ray.get(a.x.remote(Point(7)), timeout=60))  # a class of the script alone
            print(ray.get(a.use.remote(Point(1), lambda v: v * 10, [1, 2]), timeout=60))
            ray.shutdown()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["7", "24"], out.stdout
