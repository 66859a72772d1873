"""``CUDA_VISIBLE_DEVICES`` parsing and the mapping from a worker's GPU slots to devices.

A worker that declares ``GPU=N`` hands out *slots* ``0 .. N-1``. Each slot stands for one
*token*: the entry a child process gets in its own ``CUDA_VISIBLE_DEVICES``. Tokens are
device indices (``"3"``) or UUIDs (``"GPU-8f3e..."``, ``"MIG-..."``), exactly as the worker's
own ``CUDA_VISIBLE_DEVICES`` spells them.

Three states are kept apart everywhere in this module:

- ``None``: the variable is unset, every device is visible;
- ``[]``: the variable is set but lists nothing (``""`` or ``"NoDevFiles"``), no device is
  visible;
- a list: exactly these devices are visible, in this order.

Everything here is pure and uses the standard library only.
"""

from __future__ import annotations

import itertools
import numbers
import os
from collections.abc import Mapping, Sequence

from dask_gpuresources.exceptions import DeviceCountError

from ._requests import neighbours, whole_number

__all__ = [
    "device_tokens",
    "format_visible_devices",
    "parse_visible_devices",
    "physical_ids",
    "visible_devices",
]

ENV_VAR = "CUDA_VISIBLE_DEVICES"

# Values that mean "no device": what CUDA and container runtimes write to hide every GPU.
_NONE_VISIBLE = frozenset({"", "NoDevFiles"})

_UUID_PREFIXES = ("GPU-", "MIG-")

_EXAMPLE = 'CUDA_VISIBLE_DEVICES="0,1" or CUDA_VISIBLE_DEVICES="GPU-8f3e..."'


def _is_index(entry: str) -> bool:
    # isascii() too: str.isdigit() accepts digits such as "²" that int() refuses.
    return entry.isascii() and entry.isdigit()


def _is_uuid(entry: str) -> bool:
    return entry.startswith(_UUID_PREFIXES) and len(entry) > len("GPU-")


def parse_visible_devices(value: str | None) -> list[str] | None:
    """Parse a ``CUDA_VISIBLE_DEVICES`` value into its list of entries.

    Parameters
    ----------
    value
        The variable's value, or ``None`` when it is unset.

    Returns
    -------
    list of str or None
        ``None`` when `value` is ``None`` (every device visible); ``[]`` when it is empty,
        whitespace only or ``"NoDevFiles"`` (no device visible); otherwise the entries in
        order, with surrounding spaces removed. Indices are normalised (``"01"`` becomes
        ``"1"``); ``GPU-`` and ``MIG-`` UUIDs, whole or abbreviated, are kept as given.

    Raises
    ------
    ValueError
        An entry is neither a non-negative integer nor a UUID starting with ``GPU-`` or
        ``MIG-`` (CUDA would silently hide that entry and every one after it), or an entry
        appears twice.

    Examples
    --------
    >>> parse_visible_devices(None) is None
    True
    >>> parse_visible_devices("")
    []
    >>> parse_visible_devices("NoDevFiles")
    []
    >>> parse_visible_devices("2, 0")
    ['2', '0']
    >>> parse_visible_devices("GPU-8f3e1a2b,MIG-5c6d7e8f-0a1b-5c2d-9e3f-4a5b6c7d8e9f")
    ['GPU-8f3e1a2b', 'MIG-5c6d7e8f-0a1b-5c2d-9e3f-4a5b6c7d8e9f']
    >>> parse_visible_devices("0,-1")  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    ValueError: CUDA_VISIBLE_DEVICES entries must be device indices (0, 1, ...) or UUIDs
    starting with 'GPU-' or 'MIG-', got '-1' in '0,-1'; use CUDA_VISIBLE_DEVICES="0,1" or
    CUDA_VISIBLE_DEVICES="GPU-8f3e...", or CUDA_VISIBLE_DEVICES="" for no GPU
    >>> parse_visible_devices("0,1,0")  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    ValueError: CUDA_VISIBLE_DEVICES must list each device once, got '0' twice in '0,1,0';
    use CUDA_VISIBLE_DEVICES="0,1"
    """
    if value is None:
        return None
    if value.strip() in _NONE_VISIBLE:
        return []
    entries: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if _is_index(entry):
            entry = str(int(entry))
        elif not _is_uuid(entry):
            raise ValueError(
                f"{ENV_VAR} entries must be device indices (0, 1, ...) or UUIDs starting with "
                f"'GPU-' or 'MIG-', got {entry!r} in {value!r}; use {_EXAMPLE}, or "
                f'{ENV_VAR}="" for no GPU'
            )
        if entry in entries:
            unique = ",".join(dict.fromkeys(e.strip() for e in value.split(",")))
            raise ValueError(
                f"{ENV_VAR} must list each device once, got {entry!r} twice in {value!r}; "
                f'use {ENV_VAR}="{unique}"'
            )
        entries.append(entry)
    return entries


def visible_devices(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """Read and parse ``CUDA_VISIBLE_DEVICES`` from an environment.

    Parameters
    ----------
    environ
        The environment to read; ``os.environ`` (read at call time) when ``None``.

    Returns
    -------
    list of str or None
        As :func:`parse_visible_devices`: ``None`` when the variable is unset.

    Examples
    --------
    >>> visible_devices({}) is None
    True
    >>> visible_devices({"CUDA_VISIBLE_DEVICES": "3,1"})
    ['3', '1']
    """
    env = os.environ if environ is None else environ
    return parse_visible_devices(env.get(ENV_VAR))


def device_tokens(count: int | float, visible: list[str] | None) -> list[str]:
    """The device token behind each of a worker's ``count`` GPU slots.

    Slot ``i`` stands for ``visible[i]`` when the worker's ``CUDA_VISIBLE_DEVICES`` lists
    devices, and for device ``str(i)`` when it is unset. With the variable unset any count is
    accepted: slots past the real devices are logical devices for scheduling only.

    Parameters
    ----------
    count
        The worker's declared GPU count. Dask parses ``--resources GPU=2`` as the float
        ``2.0``, so whole floats are accepted.
    visible
        The worker's visible devices, as returned by :func:`visible_devices`.

    Returns
    -------
    list of str
        ``count`` tokens; the first ``count`` entries of `visible` when it is a list.

    Raises
    ------
    DeviceCountError
        `count` is negative or not a whole number, or larger than the number of devices
        `visible` lists.

    Examples
    --------
    >>> device_tokens(2, None)
    ['0', '1']
    >>> device_tokens(2.0, ["3", "1", "2"])
    ['3', '1']
    >>> device_tokens(4, ["0", "1"])  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    dask_gpuresources.exceptions.DeviceCountError: declared GPU=4, but CUDA_VISIBLE_DEVICES
    lists 2 devices ('0,1'); declare at most GPU=2 (dask worker ... --resources GPU=2) or
    widen CUDA_VISIBLE_DEVICES
    >>> device_tokens(1.5, None)  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    dask_gpuresources.exceptions.DeviceCountError: GPU count must be a whole number,
    got GPU=1.5; declare GPU=1 or GPU=2
    """
    n = _whole_count(count)
    if visible is None:
        return [str(i) for i in range(n)]
    if n > len(visible):
        plural = "device" if len(visible) == 1 else "devices"
        raise DeviceCountError(
            f"declared GPU={n}, but {ENV_VAR} lists {len(visible)} {plural} "
            f"({format_visible_devices(visible)!r}); declare at most GPU={len(visible)} "
            f"(dask worker ... --resources GPU={len(visible)}) or widen {ENV_VAR}"
        )
    return list(visible[:n])


def _whole_count(count: int | float) -> int:
    # Dask parses --resources GPU=2 as 2.0; GPU=True is a mistake, not a count of one.
    whole = whole_number(count, whole_floats=True)
    if whole is not None:
        return whole
    if isinstance(count, bool) or not isinstance(count, numbers.Real):
        raise DeviceCountError(
            f"GPU count must be a whole number, got GPU={count!r}; declare e.g. GPU=2"
        )
    if count < 0:
        raise DeviceCountError(
            f"GPU count must not be negative, got GPU={count:g}; declare GPU=0 or more "
            "(dask worker ... --resources GPU=2)"
        )
    near = neighbours(count)
    if near is not None:
        raise DeviceCountError(
            f"GPU count must be a whole number, got GPU={count}; "
            f"declare GPU={near[0]} or GPU={near[1]}"
        )
    raise DeviceCountError(f"GPU count must be a whole number, got GPU={count}; declare e.g. GPU=2")


def physical_ids(tokens: Sequence[str], uuid_index: Mapping[str, int] | None = None) -> list[int]:
    """The integer id ``get_gpu_ids()`` reports for each slot's token; no two are equal.

    The rule:

    1. an index token (``"3"``) is that physical index, ``3``, wherever it stands;
    2. a ``GPU-`` UUID token is its GPU's physical index, ``uuid_index[uuid]``, when
       `uuid_index` has that UUID, or has exactly one UUID that starts with the token (CUDA
       accepts such abbreviations), and no index token and no earlier UUID token already has
       that id (the same GPU listed twice, e.g. ``"2,GPU-..."`` naming GPU 2 both times);
    3. every other token, in list order, gets the next integer after the highest id rules 1
       and 2 gave, or counts from ``0`` when they gave none. These are ``MIG-`` instances
       (they have no physical index of their own), UUIDs `uuid_index` does not know (all
       UUIDs, without NVML), ambiguous abbreviations, and the second name of a GPU.

    So a list of indices only, such as the unset variable's ``device_tokens(n, None)``, keeps
    its indices, and a list of MIG instances only gets ``0, 1, ...``, the device numbers CUDA
    gives them in a process that sees that list. An id from rule 3 stands for no physical
    GPU and may equal the index of a GPU this worker does not list: the device's UUID
    (:func:`dask_gpuresources._nvml.uuid_of`) is what names a device across workers.

    Parameters
    ----------
    tokens
        One token per slot, as returned by :func:`device_tokens`, each device once.
    uuid_index
        GPU UUID to physical index, e.g. ``Detection.uuid_index`` from NVML detection.

    Returns
    -------
    list of int
        One id per token, in the same order, all distinct.

    Raises
    ------
    ValueError
        A token appears twice (also as ``"1"`` and ``"01"``).
    TypeError
        `tokens` is a string, or holds something other than strings.

    Examples
    --------
    >>> physical_ids(["2", "0"])
    [2, 0]
    >>> physical_ids(["GPU-8f3e", "GPU-aaaa"], {"GPU-8f3e1a2b-1c2d": 5})
    [5, 6]

    An index and a MIG instance (``CUDA_VISIBLE_DEVICES="1,MIG-..."``):

    >>> physical_ids(["1", "MIG-5c6d7e8f"])
    [1, 2]
    >>> physical_ids(["MIG-5c6d7e8f", "1"], {"GPU-8f3e": 0, "GPU-0bad": 1})
    [2, 1]

    UUIDs NVML does not know, or no NVML at all:

    >>> physical_ids(["MIG-5c6d7e8f", "GPU-ffff", "0"], {"GPU-8f3e": 0})
    [1, 2, 0]
    >>> physical_ids(["MIG-5c6d7e8f", "GPU-ffff"])
    [0, 1]
    >>> physical_ids(["1", "0", "01"])  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    ValueError: physical_ids needs each device once, got '01' after '1' in ['1', '0', '01'];
    use physical_ids(['1', '0'])
    """
    _check_tokens(tokens)
    index = {} if uuid_index is None else uuid_index
    ids: list[int | None] = [int(t) if _is_index(t) else None for t in tokens]
    taken = {i for i in ids if i is not None}
    for slot, token in enumerate(tokens):
        if token.startswith("GPU-"):
            found = _lookup_uuid(token, index)
            if found is not None and found not in taken:
                ids[slot] = found
                taken.add(found)
    fresh = itertools.count(max(taken, default=-1) + 1)
    return [next(fresh) if found is None else found for found in ids]


def _check_tokens(tokens: Sequence[str]) -> None:
    if isinstance(tokens, str):
        raise TypeError(
            "physical_ids takes a list of CUDA_VISIBLE_DEVICES entries, got the string "
            f"{tokens!r}; use physical_ids(parse_visible_devices({tokens!r}))"
        )
    seen: dict[str, str] = {}
    for token in tokens:
        if not isinstance(token, str):
            fixed = [str(t) for t in tokens]
            raise TypeError(
                "physical_ids takes CUDA_VISIBLE_DEVICES entries as strings, got "
                f"{token!r} in {list(tokens)!r}; use physical_ids({fixed!r})"
            )
        key = _device_key(token)
        if key in seen:
            raise ValueError(
                f"physical_ids needs each device once, got {token!r} after {seen[key]!r} in "
                f"{list(tokens)!r}; use physical_ids({_first_of_each(tokens)!r})"
            )
        seen[key] = token


def _device_key(token: str) -> str:
    # "1" and "01" name one device.
    return str(int(token)) if _is_index(token) else token


def _first_of_each(tokens: Sequence[str]) -> list[str]:
    first: dict[str, str] = {}
    for token in tokens:
        first.setdefault(_device_key(token), token)
    return list(first.values())


def _lookup_uuid(token: str, uuid_index: Mapping[str, int]) -> int | None:
    if token in uuid_index:
        return uuid_index[token]
    matches = [value for key, value in uuid_index.items() if key.startswith(token)]
    return matches[0] if len(matches) == 1 else None


def format_visible_devices(tokens: Sequence[str]) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that makes exactly `tokens` visible, in order.

    An empty sequence gives ``""``, which hides every device.

    Examples
    --------
    >>> format_visible_devices(["3", "GPU-8f3e"])
    '3,GPU-8f3e'
    >>> format_visible_devices([])
    ''
    """
    return ",".join(tokens)
