"""Package-level guarantees: Dask internals present, config and schema in sync, API."""

from __future__ import annotations

import dask.config
import jsonschema
import yaml

import dask_gpuresources as gr
from dask_gpuresources import _config
from dask_gpuresources._dask_internals import INTERNALS, missing_internals


def test_dask_internals_we_rely_on_exist():
    missing = missing_internals()
    assert not missing, "this distributed release lacks: " + "; ".join(missing)


def test_missing_internal_is_named(monkeypatch):
    from distributed import worker_state_machine

    monkeypatch.delattr(worker_state_machine.WorkerState, "_acquire_resources")
    (message,) = missing_internals()
    assert message.startswith(
        "distributed.worker_state_machine.WorkerState._acquire_resources is missing"
    )
    assert len(INTERNALS) > 10


def _names_used(path):
    """The identifiers a module's code uses (names, and string literals that are one name,
    as in ``getattr(proxy, "_future")``), leaving out docstrings, comments and, in
    ``_dask_internals``, the ``INTERNALS`` table itself."""
    import ast
    import io
    import tokenize

    text = path.read_text()
    skip = range(0)
    for node in ast.parse(text).body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and "INTERNALS" in ast.unparse(node):
            skip = range(node.lineno, node.end_lineno + 1)
    names = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.start[0] in skip:
            continue
        if token.type == tokenize.NAME:
            names.add(token.string)
        elif token.type == tokenize.STRING:
            try:
                value = ast.literal_eval(token.string)
            except ValueError:  # an f-string
                continue
            if isinstance(value, str) and value.isidentifier():
                names.add(value)
    return names


#: Internals whose behaviour the package relies on without naming them in code, each
#: pinned by the canary named here instead.
_RELIED_ON_UNNAMED = {
    "distributed.worker._run_task_simple": "test_dask_hands_the_isolated_executor_the_task",
    "distributed.stealing.WorkStealing.move_task_confirm": (
        "test_stealing_an_actor_logs_confirm_and_leaves_it_in_the_victims_actors"
    ),
}


def test_every_listed_internal_is_used():
    # A listed-but-unused entry guards nothing and hides what really is used: each entry's
    # last dotted part must be named by the code (not a comment) of some module.
    import pathlib

    package = pathlib.Path(gr.__file__).parent
    used = set().union(*(_names_used(p) for p in package.rglob("*.py")))
    listed = {f"{m}.{d}": d.rsplit(".", 1)[-1] for m, d, _ in INTERNALS}
    unused = [
        name for name, last in listed.items() if last not in used and name not in _RELIED_ON_UNNAMED
    ]
    assert not unused, f"listed in INTERNALS but used nowhere in the package: {unused}"
    assert set(_RELIED_ON_UNNAMED) <= set(listed)


def _keys(tree, prefix=""):
    out = set()
    for k, v in tree.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


def _schema_keys(schema, prefix=""):
    out = set()
    for k, v in schema.get("properties", {}).items():
        out.add(prefix + k)
        out |= _schema_keys(v, prefix + k + ".")
    return out


def test_config_and_schema_agree():
    with open(_config.SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    defaults = _config.defaults()
    jsonschema.validate(defaults, schema)
    assert _keys(defaults) == _schema_keys(schema)


def test_defaults_are_registered():
    assert dask.config.get("gpuresources.infeasible") == "raise"
    assert dask.config.get("gpuresources.worker.bypass-limit") == "10s"


def test_public_surface():
    for name in gr.__all__:
        assert hasattr(gr, name), name
    assert issubclass(gr.InvalidRequestError, ValueError)
    assert gr.exceptions.InfeasibleRequestError is gr.InfeasibleRequestError


def test_dask_hands_the_isolated_executor_the_task():
    # Dask gives executors whose class name lacks "ThreadPoolExecutor" the function
    # _run_task_simple(task, data, ...), which calls task(data): the isolated executor
    # relies on both.
    import inspect

    from distributed.worker import _run_task_simple

    from dask_gpuresources._isolation import IsolatedExecutor

    assert list(inspect.signature(_run_task_simple).parameters)[:2] == ["task", "data"]
    assert "task(data)" in inspect.getsource(_run_task_simple)
    assert "ThreadPoolExecutor" not in str(IsolatedExecutor)


def _scheduler_surface(s):
    """What the scheduler plugin may change on a scheduler: its handlers, its instance and
    its work-stealing extension's instance attributes."""
    stealing = s.extensions.get("stealing")
    return (
        dict(s.handlers),
        dict(vars(s)).keys() - {"_last_time", "transition_counter"},
        None if stealing is None else set(vars(stealing)),
        (dict(s.resources.get("GPU", {})), {a: dict(ws.resources) for a, ws in s.workers.items()}),
    )


def test_close_undoes_what_start_did():
    from distributed.utils_test import gen_cluster

    from dask_gpuresources.scheduler import GPUSchedulerPlugin

    @gen_cluster(client=True, nthreads=[("", 1)], worker_kwargs={"resources": {"GPU": 1}})
    async def run(c, s, a):
        before = _scheduler_surface(s)
        plugin = GPUSchedulerPlugin()
        await c.register_plugin(plugin)
        plugin = s.plugins[plugin.name]
        assert s.handlers["workers_to_close"] != before[0]["workers_to_close"]
        assert s.handlers["set_resources"] != before[0]["set_resources"]
        assert "valid_workers" in vars(s) and "put_key_in_stealable" in vars(
            s.extensions["stealing"]
        )
        assert await c.submit(gr.get_gpu_ids, resources={"GPU": 1}, pure=False) == [0]
        await plugin.close()
        after = _scheduler_surface(s)
        assert after[0] == before[0]
        assert after[1:] == before[1:]

    run()
