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

import math
import os
from collections.abc import Mapping, Sequence

from dask_gpuresources.exceptions import DeviceCountError

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
    # bool is an int subclass; GPU=True is a mistake, not a count of one.
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        raise DeviceCountError(
            f"GPU count must be a whole number, got GPU={count!r}; declare e.g. GPU=2"
        )
    if count < 0:
        raise DeviceCountError(
            f"GPU count must not be negative, got GPU={count:g}; declare GPU=0 or more "
            "(dask worker ... --resources GPU=2)"
        )
    if isinstance(count, float) and not count.is_integer():
        if not math.isfinite(count):
            raise DeviceCountError(
                f"GPU count must be a whole number, got GPU={count}; declare e.g. GPU=2"
            )
        low = int(count)
        raise DeviceCountError(
            f"GPU count must be a whole number, got GPU={count}; declare GPU={low} or GPU={low + 1}"
        )
    return int(count)


def physical_ids(tokens: Sequence[str], uuid_index: Mapping[str, int] | None = None) -> list[int]:
    """The integer id ``get_gpu_ids()`` reports for each slot's token.

    The rule, for the token at position ``i``:

    1. an index token (``"3"``) is that physical index, ``3``;
    2. a ``GPU-`` UUID token is ``uuid_index[token]`` when `uuid_index` has that UUID, or has
       exactly one UUID that starts with the token (CUDA accepts such abbreviations);
    3. anything else (``MIG-`` tokens, UUIDs `uuid_index` does not know, an ambiguous
       abbreviation) is the slot's own position, ``i``.

    Rule 3 keeps the result a list of distinct-per-slot ints where no physical index exists:
    a MIG instance has none, and without NVML a UUID cannot be resolved.

    Parameters
    ----------
    tokens
        One token per slot, as returned by :func:`device_tokens`.
    uuid_index
        GPU UUID to physical index, e.g. ``Detection.uuid_index`` from NVML detection.

    Returns
    -------
    list of int
        One id per token, in the same order.

    Examples
    --------
    >>> physical_ids(["2", "0"])
    [2, 0]
    >>> physical_ids(["GPU-8f3e", "GPU-aaaa"], {"GPU-8f3e1a2b-1c2d": 5})
    [5, 1]
    >>> physical_ids(["MIG-5c6d", "MIG-7e8f"])
    [0, 1]
    """
    index = {} if uuid_index is None else uuid_index
    ids: list[int] = []
    for i, token in enumerate(tokens):
        if _is_index(token):
            ids.append(int(token))
        elif token.startswith("GPU-"):
            found = _lookup_uuid(token, index)
            ids.append(i if found is None else found)
        else:
            ids.append(i)
    return ids


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
