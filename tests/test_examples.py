"""Every example runs as a user would run it (a fresh Python process) and prints its promise."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
needs_tensorflow = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None,
    reason='needs TensorFlow: pip install -e ".[tensorflow]"',
)


def run(name: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def test_plain_dask():
    out = run("plain_dask.py")
    steps = re.findall(r"step (\d): this task owns GPU \[(\d)\]", out)
    assert sorted(int(step) for step, _ in steps) == list(range(8))
    assert {gpu for _, gpu in steps} <= {"0", "1", "2", "3"}
    packed = re.search(r"four GPU=0.25 tasks packed on one device: \[\((\d),\)\]", out)
    assert packed is not None, out
    two = re.search(r"two devices for one task: \[(\d), (\d)\]", out)
    assert two is not None and two.group(1) != two.group(2)
    assert "asking for 5 GPUs fails at once:" in out and "requests GPU=5" in out


def test_seed_gpu_function():
    out = run("seed_gpu_function.py")
    lines = re.findall(r"This function is allowed to use GPUs \[(\d)\]\.", out)
    assert len(lines) == 5 and set(lines) <= {"0", "1", "2", "3"}
    assert "As promised, an error: task" in out and "requests GPU=5" in out


def test_seed_gpu_actor():
    out = run("seed_gpu_actor.py")
    ids = re.findall(r"This actor is allowed to use GPUs \[(\d)\]\.", out)
    assert sorted(ids[:4]) == ["0", "1", "2", "3"]
    assert "GPUs free while the four actors live: 0.0" in out
    assert "A fifth actor waits for a device: True" in out
    assert "After killing the first, the fifth says: This actor is allowed to use GPUs [" in out
    assert "requests GPU=8" in out


@needs_tensorflow
def test_tensorflow_task():
    out = run("tensorflow_task.py")
    seen = re.findall(r"Task with GPUs \[(\d)\] ran with CUDA_VISIBLE_DEVICES=(\d);", out)
    assert sorted(seen) == [("0", "0"), ("1", "1")]
    assert out.count("TensorFlow saw") == 2


@needs_tensorflow
def test_tensorflow_actor():
    out = run("tensorflow_actor.py")
    seen = re.findall(r"Actor with GPUs \[(\d)\] runs with CUDA_VISIBLE_DEVICES=(\d);", out)
    assert sorted(seen) == [("0", "0"), ("1", "1")]
    assert "GPUs free after killing the actors: 2.0" in out
