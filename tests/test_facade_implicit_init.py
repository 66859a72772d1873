"""A Ray script that never calls ``init()`` runs: the first ``.remote()`` or ``put()``
starts ``init()``'s local cluster, once, with one log line, as Ray does."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import dask_gpuresources as ray

    @ray.remote
    def plus_one(x):
        return x + 1

    @ray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self):
            self.n += 1
            return self.n

    print("before:", ray.is_initialized())
    print("task:", ray.get(plus_one.remote(1)))
    print("after:", ray.is_initialized())
    counter = Counter.remote()
    print("actor:", ray.get([counter.add.remote() for _ in range(3)]))
    print("put:", ray.get(plus_one.remote(ray.put(41))))
    try:
        ray.init()
    except RuntimeError as err:
        print("init again:", err)
    print("reuse:", ray.init(ignore_reinit_error=True).address.startswith("tcp://"))
    """
)


def test_a_script_without_init_starts_the_local_cluster_once():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert lines["before"] == "False"
    assert lines["task"] == "2"
    assert lines["after"] == "True"
    assert lines["actor"] == "[1, 2, 3]"
    assert lines["put"] == "42"
    assert lines["init again"].startswith("a cluster is already running")
    assert "ignore_reinit_error=True" in lines["init again"]
    assert lines["reuse"] == "True"
    assert done.stderr.count("Started a local cluster") == 1, done.stderr[-3000:]


def test_outside_a_script_that_never_submits_nothing_starts():
    # Only .remote() and put() start a cluster: asking about one does not.
    code = (
        "import dask_gpuresources as ray\n"
        "try:\n    ray.cluster_resources()\nexcept RuntimeError as err:\n    print(err)\n"
        "print(ray.is_initialized())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not initialised" in done.stdout
    assert done.stdout.splitlines()[-1] == "False"
