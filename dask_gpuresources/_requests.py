"""Every check of what a user asks for, in one place.

Submission paths differ (a Dask task's ``resources=`` and annotations, the facade's
``@remote`` options, ``init``'s and the CLI's counts, a worker's declared ``GPU=n``), but a
value means the same wherever it is given, so each is checked here and each place only
words its own error with the call that would have been right:

- :func:`parse_gpu_amount`: a GPU amount as an exact ``Fraction`` (Ray's rules and precision);
  :func:`gpu_request`: the same, cached, with the number of devices it needs;
  :func:`format_amount`: its text;
- :func:`whole_number`: a count (devices, workers, calls), bools and fractions refused;
- :func:`parse_max_calls`, :func:`check_annotations`: the isolation annotations;
- :func:`check_facade_options`: the facade's ``num_gpus``, ``num_cpus``, ``resources``,
  ``isolation``, ``max_calls`` and ``max_retries``.
"""

from __future__ import annotations

import functools
import math
import numbers
from decimal import Decimal
from fractions import Fraction
from typing import Any

from .exceptions import InvalidRequestError

__all__ = [
    "ISOLATION_MODES",
    "PRECISION",
    "check_annotations",
    "check_facade_options",
    "format_amount",
    "gpu_request",
    "parse_gpu_amount",
    "parse_max_calls",
    "whole_number",
]

ISOLATION_MODES = ("thread", "process")

#: Ray's resource precision: fractional GPU amounts are whole multiples of 1/10000.
PRECISION = 10_000
_MIN_AMOUNT = Fraction(1, PRECISION)
_DEFAULT_EXAMPLE = "resources={'GPU': 1}"


def parse_gpu_amount(value: object) -> Fraction:
    """Validate a GPU request amount and return it as an exact ``Fraction``.

    Parameters
    ----------
    value
        The amount asked for: an ``int``, ``float``, ``Fraction``, ``Decimal`` or any other
        :class:`numbers.Real` (NumPy scalars included). Fractional amounts are rounded to
        the nearest multiple of Ray's precision, 0.0001: ``0.1`` is exactly ``1/10`` (ten of
        them make exactly one GPU), ``1/3`` and ``0.33334`` both become ``0.3333``. The
        range checks apply to the value as given, before any rounding.

    Returns
    -------
    Fraction
        Zero, a multiple of 0.0001 in ``[0.0001, 1]``, or a whole number above 1.

    Raises
    ------
    InvalidRequestError
        For a ``bool``, a non-number, NaN or infinity, a negative amount, an amount between 0
        and 0.0001, or an amount above 1 that is not a whole number.

    Examples
    --------
    >>> parse_gpu_amount(2)
    Fraction(2, 1)
    >>> parse_gpu_amount(0.1)
    Fraction(1, 10)
    >>> parse_gpu_amount(1 / 3)
    Fraction(3333, 10000)
    >>> parse_gpu_amount(Fraction(1, 3)) == parse_gpu_amount(0.33334) == Fraction(3333, 10000)
    True
    >>> parse_gpu_amount(1.5)
    Traceback (most recent call last):
    ...
    dask_gpuresources.exceptions.InvalidRequestError: a GPU request above 1 must be a whole number, got 1.5; use resources={'GPU': 1} or resources={'GPU': 2}
    >>> parse_gpu_amount(-1)
    Traceback (most recent call last):
    ...
    dask_gpuresources.exceptions.InvalidRequestError: a GPU request must be zero or more, got -1; use resources={'GPU': 1}
    >>> parse_gpu_amount("0.5")
    Traceback (most recent call last):
    ...
    dask_gpuresources.exceptions.InvalidRequestError: a GPU request must be a number, got '0.5'; use resources={'GPU': 0.5}
    >>> parse_gpu_amount(True)
    Traceback (most recent call last):
    ...
    dask_gpuresources.exceptions.InvalidRequestError: a GPU request must be a number, got True; use resources={'GPU': 1}
    >>> parse_gpu_amount(float("nan"))
    Traceback (most recent call last):
    ...
    dask_gpuresources.exceptions.InvalidRequestError: a GPU request must be a finite number, got nan; use resources={'GPU': 1}
    >>> parse_gpu_amount(0.00001)
    Traceback (most recent call last):
    ...
    dask_gpuresources.exceptions.InvalidRequestError: GPU requests below 0.0001 are not supported, got 1e-05; use resources={'GPU': 0.0001}
    """  # noqa: E501
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Decimal)):
        raise InvalidRequestError(value, "a GPU request must be a number", _number_example(value))
    if isinstance(value, Decimal):
        finite = value.is_finite()
    elif isinstance(value, numbers.Rational):
        finite = True
    else:
        finite = math.isfinite(value)
    if not finite:
        raise InvalidRequestError(value, "a GPU request must be a finite number", _DEFAULT_EXAMPLE)
    if isinstance(value, numbers.Rational):
        # int() strips NumPy integer types, which would otherwise live on inside the Fraction.
        exact = Fraction(int(value.numerator), int(value.denominator))
    elif isinstance(value, (float, Decimal)):
        exact = Fraction(value)
    else:
        # Other reals (e.g. numpy.float32), which Fraction() does not take directly.
        exact = Fraction(float(value))
    if exact < 0:
        raise InvalidRequestError(value, "a GPU request must be zero or more", _DEFAULT_EXAMPLE)
    if 0 < exact < _MIN_AMOUNT:
        raise InvalidRequestError(
            value, "GPU requests below 0.0001 are not supported", "resources={'GPU': 0.0001}"
        )
    if exact > 1 and exact.denominator != 1:
        low, high = math.floor(exact), math.ceil(exact)
        raise InvalidRequestError(
            value,
            "a GPU request above 1 must be a whole number",
            f"resources={{'GPU': {low}}} or resources={{'GPU': {high}}}",
        )
    if exact.denominator == 1:
        return exact
    # One representation end to end: every fractional amount is a whole number of 1/10000
    # units (Ray's precision), rounded to the nearest unit, so that the ledger, the
    # scheduler's integer load and anything derived from them always agree. 0.1 is exactly
    # 1/10 (not the float nearest it), 1/3 and 0.33334 both become 0.3333, and three of
    # them fit on one device.
    units = round(exact * PRECISION)
    return Fraction(units, PRECISION)


def _number_example(value: object) -> str:
    """A corrected call for a non-number: the number a bool or numeric string means, else 1."""
    if isinstance(value, bool):
        return f"resources={{'GPU': {int(value)}}}"
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return _DEFAULT_EXAMPLE
        if math.isfinite(number) and number >= 0:
            text = str(int(number)) if number.is_integer() else repr(number)
            return f"resources={{'GPU': {text}}}"
    return _DEFAULT_EXAMPLE


def format_amount(amount: Fraction | int) -> str:
    """Compact text for a GPU amount, for messages and metrics.

    Whole amounts print as integers, amounts exact to four decimals as decimals, anything
    else as ``p/q``.

    Examples
    --------
    >>> format_amount(Fraction(2))
    '2'
    >>> format_amount(Fraction(1, 4))
    '0.25'
    >>> format_amount(Fraction(3, 2))
    '1.5'
    >>> format_amount(Fraction(1, 3))
    '1/3'
    >>> format_amount(Fraction(1, 10_000))
    '0.0001'
    """
    amount = Fraction(amount)
    if amount.denominator == 1:
        return str(amount.numerator)
    if PRECISION % amount.denominator == 0:
        return f"{float(amount):.4f}".rstrip("0")
    return f"{amount.numerator}/{amount.denominator}"


@functools.lru_cache(maxsize=1024)
def _gpu_request_cached(value: Any) -> tuple[Fraction, int]:
    amount = parse_gpu_amount(value)
    return amount, math.ceil(amount)


def gpu_request(value: Any) -> tuple[Fraction, int]:
    """The exact amount ``value`` asks for, and how many devices it needs (cached: the
    scheduler checks every GPU task it is given).

    >>> gpu_request(0.5)
    (Fraction(1, 2), 1)
    >>> gpu_request(2)
    (Fraction(2, 1), 2)
    """
    try:
        return _gpu_request_cached(value)
    except TypeError:  # unhashable: let parse_gpu_amount say what is wrong with it
        amount = parse_gpu_amount(value)
        return amount, math.ceil(amount)


def whole_number(value: Any, *, minimum: int | None = 0, whole_floats: bool = False) -> int | None:
    """``value`` as an int when it is a whole number ``>= minimum`` (None: any), else None.

    A bool is never a count (``GPU=True`` is a mistake, not one GPU); a float such as ``2.0``
    counts only with ``whole_floats`` (Dask parses ``--resources GPU=2`` as ``2.0``); NaN,
    infinities and fractions never do.

    >>> whole_number(2), whole_number(2.0), whole_number(2.0, whole_floats=True)
    (2, None, 2)
    >>> whole_number(True), whole_number(-1), whole_number(1.5, whole_floats=True)
    (None, None, None)
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        number = int(value)
    elif whole_floats and isinstance(value, numbers.Real):
        if not math.isfinite(value) or not float(value).is_integer():
            return None
        number = int(value)
    else:
        return None
    return number if minimum is None or number >= minimum else None


def neighbours(value: Any) -> tuple[int, int] | None:
    """The whole numbers either side of a finite fractional ``value`` (for "use 1 or 2")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if not math.isfinite(value) or float(value).is_integer():
        return None
    return math.floor(value), math.ceil(value)


def parse_max_calls(value: Any) -> int:
    """Validate a ``max_calls`` value: a whole number >= 0.

    >>> parse_max_calls(1)
    1
    >>> parse_max_calls(-1)
    Traceback (most recent call last):
    ...
    dask_gpuresources.exceptions.InvalidRequestError: max_calls must be a whole number >= 0 \
(0: never recycle), got -1; use dask.annotate(max_calls=1)
    """
    number = whole_number(value) if isinstance(value, int) else None
    if number is None:
        raise InvalidRequestError(
            value,
            "max_calls must be a whole number >= 0 (0: never recycle)",
            "dask.annotate(max_calls=1)",
        )
    return number


def check_annotations(annotations: dict | None) -> None:
    """Raise :class:`InvalidRequestError` for a bad ``isolation`` or ``max_calls`` annotation.

    >>> check_annotations({"isolation": "process", "max_calls": 1})
    >>> check_annotations({"isolation": "proc"})
    Traceback (most recent call last):
    ...
    dask_gpuresources.exceptions.InvalidRequestError: isolation must be 'thread' or \
'process', got 'proc'; use dask.annotate(isolation='process')
    """
    if not annotations:
        return
    mode = annotations.get("isolation")
    if mode is not None and mode not in ISOLATION_MODES:
        raise InvalidRequestError(
            mode, "isolation must be 'thread' or 'process'", "dask.annotate(isolation='process')"
        )
    if annotations.get("max_calls") is not None:
        parse_max_calls(annotations["max_calls"])


def check_facade_options(
    num_gpus: Any,
    *,
    num_cpus: Any,
    resources: Any,
    isolation: Any,
    max_calls: Any,
    max_retries: Any,
    example: str,
) -> int | float:
    """Check the facade's options (``@remote(...)``, ``.options(...)``); return ``num_gpus``
    as Dask will see it: whole numbers as int, fractions as the float of the exact amount.

    >>> check_facade_options(0.5, num_cpus=None, resources={}, isolation=None, max_calls=None,
    ...                      max_retries=None, example="@remote(num_gpus=1)")
    0.5
    """
    try:
        amount = parse_gpu_amount(num_gpus)
    except InvalidRequestError as e:
        raise InvalidRequestError(num_gpus, f"num_gpus: {e.reason}", example) from None
    if num_cpus is not None and (
        isinstance(num_cpus, bool) or not isinstance(num_cpus, numbers.Real) or num_cpus < 0
    ):
        raise InvalidRequestError(num_cpus, "num_cpus must be a number >= 0", "num_cpus=1")
    if not isinstance(resources, dict) or {"GPU", "CPU", "gpu", "cpu"} & set(resources):
        raise InvalidRequestError(
            resources,
            "resources= is for custom resources; GPUs and CPUs are asked with num_gpus and "
            "num_cpus",
            "@remote(num_gpus=1, resources={'special_hardware': 1})",
        )
    if isolation is not None and isolation not in ISOLATION_MODES:
        raise InvalidRequestError(
            isolation, "isolation must be 'thread' or 'process'", "isolation='process'"
        )
    if max_calls is not None:
        parse_max_calls(max_calls)
    if max_retries is not None and whole_number(max_retries) is None:
        raise InvalidRequestError(max_retries, "max_retries must be an int >= 0", "max_retries=3")
    return int(amount) if amount == int(amount) else float(amount)
