"""The per-device GPU ledger of one Dask worker.

A worker declares ``GPU=n``; the ledger records which holder (a task key) holds which of the
device slots ``0..n-1`` and what share of each, with exact arithmetic
(:class:`fractions.Fraction`) and Ray's placement rules:

- a whole request ``k >= 1`` takes the ``k`` lowest-index devices that are entirely free; a
  partly used device never counts toward a whole request;
- a fractional request ``0 < f < 1`` goes to *one* device, the fullest one that still fits
  (best fit, least share left over), ties to the lowest index; it is never split;
- a zero request is recorded with no devices, so that releasing it works like any other.

Contents:

- :func:`parse_gpu_amount`, :func:`format_amount`: from :mod:`._requests`, re-exported.
- :class:`Lease`: what one holder holds.
- :class:`DeviceLedger`: the thread-safe ledger itself.
- :class:`NoFit`: an amount cannot be placed with the devices free right now.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from fractions import Fraction

from ._requests import PRECISION as _PRECISION  # the ledger's unit
from ._requests import (  # re-exported: the ledger's inputs
    format_amount,
    parse_gpu_amount,
    whole_number,
)

__all__ = [
    "DeviceLedger",
    "Lease",
    "NoFit",
    "format_amount",
    "parse_gpu_amount",
]

_ZERO = Fraction(0)
_ONE = Fraction(1)


@dataclass(frozen=True)
class Lease:
    """The devices one holder holds, and its share of each.

    Attributes
    ----------
    holder
        Who holds the lease: a task key, or any hashable.
    devices
        The device slots held, in increasing order; ``()`` for a zero amount.
    amount
        The share held on *each* device: ``1`` for every device of a whole request, the
        fraction itself for a fractional one.

    Examples
    --------
    >>> lease = Lease("x", (0, 1), Fraction(1))
    >>> lease.devices
    (0, 1)
    >>> lease.total
    Fraction(2, 1)
    """

    holder: Hashable
    devices: tuple[int, ...]
    amount: Fraction

    @property
    def total(self) -> Fraction:
        """The amount the lease holds over all its devices."""
        return self.amount * len(self.devices)


class NoFit(Exception):
    """An amount cannot be placed with the shares that are free right now."""

    def __init__(self, holder: Hashable, amount: Fraction, free: tuple[Fraction, ...]) -> None:
        self.holder = holder
        self.amount = amount
        self.free = free
        shares = ", ".join(format_amount(f) for f in free)
        if amount.denominator == 1:
            rule = f"needs {amount.numerator} entirely free device(s)"
        else:
            rule = "needs one device with that much free"
        super().__init__(
            f"cannot place GPU={format_amount(amount)} for {holder!r} now ({rule}); "
            f"free share per device: [{shares}]"
        )

    def __reduce__(self):
        return type(self), (self.holder, self.amount, self.free)


def _place(used: list, amount: Fraction, limit: int) -> tuple[int, ...] | None:
    """Where ``amount`` goes given each slot's used share (only slots below ``limit``)."""
    if not amount:
        return ()
    if amount.denominator == 1:
        k = amount.numerator
        if k == 1:  # the common request: the first entirely free device (a C-level scan)
            try:
                return (used.index(0, 0, limit),)
            except ValueError:
                return None
        found = []
        for i in range(limit):
            if not used[i]:
                found.append(i)
                if len(found) == k:
                    return tuple(found)
        return None
    # Best fit: the fullest device that still fits, i.e. the largest used share that is at
    # most 1 - amount; strict ">" keeps the lowest index among ties.
    room = _ONE - amount
    best = -1
    best_used = None
    for i in range(limit):
        u = used[i]
        if u <= room and (best_used is None or u > best_used):
            best, best_used = i, u
    return None if best < 0 else (best,)


def _check_count(n_devices: object, call: str) -> int:
    if whole_number(n_devices, minimum=None) is None:
        whole = whole_number(n_devices, whole_floats=True)
        example = f"{call}({whole})" if whole is not None else f"{call}(2)"
        raise ValueError(
            f"the number of devices must be a whole number, got {n_devices!r}; use {example}"
        )
    count = whole_number(n_devices)
    if count is None:
        raise ValueError(
            f"the number of devices must be zero or more, got {n_devices!r}; use {call}(0)"
        )
    return count


def _as_amount(amount: object) -> Fraction:
    # Fast paths (this runs for every GPU task): a plain int (a whole request, which the
    # worker passes as an int because Fraction arithmetic is slow Python), and what
    # parse_gpu_amount returns; everything else gets its validation.
    if type(amount) is int and amount >= 0:
        return amount  # type: ignore[return-value]  (an int is an exact Rational)
    if type(amount) is Fraction:
        n, d = amount.numerator, amount.denominator
        if n >= 0 and (d == 1 or (n < d and _PRECISION % d == 0)):
            return amount
    return parse_gpu_amount(amount)


class DeviceLedger:
    """Which holder holds which GPU device slot of one worker, and what share of it.

    Thread-safe: one lock guards every change and every read that spans more than one
    entry (a single holder's lease is read without it). :meth:`acquire`, :meth:`release`
    and :meth:`can_place` cost O(number of devices).

    Parameters
    ----------
    n_devices
        Number of device slots, ``0..n_devices-1``.

    Examples
    --------
    >>> ledger = DeviceLedger(2)
    >>> ledger.acquire("a", Fraction(1, 2))
    Lease(holder='a', devices=(0,), amount=Fraction(1, 2))
    >>> ledger.acquire("b", Fraction(1))
    Lease(holder='b', devices=(1,), amount=Fraction(1, 1))
    >>> ledger.free()
    (Fraction(1, 2), Fraction(0, 1))
    >>> ledger.try_acquire("c", Fraction(1)) is None
    True
    >>> ledger.release("b")
    Lease(holder='b', devices=(1,), amount=Fraction(1, 1))
    >>> ledger
    DeviceLedger(n_devices=2, free=[0.5, 1], leases=1)
    """

    def __init__(self, n_devices: int) -> None:
        n = _check_count(n_devices, "DeviceLedger")
        self._lock = threading.Lock()
        self._used: list[Fraction] = [_ZERO] * n
        self._leases: dict[Hashable, Lease] = {}
        # Slots at or above this index are being removed (a shrink waiting for them to come
        # free): nothing new is placed there.
        self._limit = n

    @property
    def n_devices(self) -> int:
        """Number of device slots."""
        return len(self._used)

    def __repr__(self) -> str:
        with self._lock:
            free = ", ".join(format_amount(_ONE - u) for u in self._used)
            n, leases = len(self._used), len(self._leases)
        return f"DeviceLedger(n_devices={n}, free=[{free}], leases={leases})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def __contains__(self, holder: Hashable) -> bool:
        with self._lock:
            return holder in self._leases

    def _place(self, amount: Fraction) -> tuple[int, ...] | None:
        """Where ``amount`` would go now, or None; call with the lock held."""
        return _place(self._used, amount, self._limit)

    def fits_when_drained(self, amount: Fraction, permanent: Iterable[Hashable]) -> bool:
        """Whether ``amount`` would fit once every holder but ``permanent`` ones let go.

        The starvation guard asks this: holding smaller work back for a waiting request
        helps only if the running tasks, draining, make room for it; devices held by
        ``permanent`` holders (actors) never drain.

        Examples
        --------
        >>> ledger = DeviceLedger(2)
        >>> _ = ledger.acquire("actor", Fraction(1))
        >>> _ = ledger.acquire("task", Fraction(1))
        >>> ledger.fits_when_drained(Fraction(2), permanent=["actor"])
        False
        >>> ledger.fits_when_drained(Fraction(1), permanent=["actor"])
        True
        """
        amount = _as_amount(amount)
        with self._lock:
            used: list[Fraction] = [_ZERO] * len(self._used)
            for holder in permanent:
                lease = self._leases.get(holder)
                if lease is not None:
                    for i in lease.devices:
                        used[i] += lease.amount
            return _place(used, amount, self._limit) is not None

    def _take(self, holder: Hashable, amount: Fraction) -> Lease | None:
        """Lease ``amount`` to ``holder`` if it fits now; call with the lock held."""
        held = self._leases.get(holder)
        if held is not None:
            raise ValueError(
                f"{holder!r} already holds GPU={format_amount(held.total)} "
                f"on devices {held.devices}; release it before acquiring again"
            )
        devices = self._place(amount)
        if devices is None:
            return None
        used = self._used
        if amount.denominator == 1 and amount:
            # A whole request takes entirely free devices: plain ints keep it cheap.
            share = 1 if type(amount) is int else _ONE
            for i in devices:
                used[i] = 1
        else:
            share = amount
            for i in devices:
                used[i] += share
        lease = self._leases[holder] = Lease(holder, devices, share)
        return lease

    def can_place(self, amount: Fraction) -> bool:
        """Whether ``amount`` could be acquired now.

        Examples
        --------
        >>> ledger = DeviceLedger(1)
        >>> ledger.can_place(Fraction(1)), ledger.can_place(Fraction(2))
        (True, False)
        """
        if type(amount) is not int:  # a whole request from the worker is an int already
            amount = _as_amount(amount)
        with self._lock:
            return self._place(amount) is not None

    def acquire(self, holder: Hashable, amount: Fraction) -> Lease:
        """Record that ``holder`` holds ``amount`` of GPU and return where.

        Parameters
        ----------
        holder
            Who takes the lease (a task key); must not hold one already.
        amount
            A whole number of devices, a share in ``(0, 1)`` of one device, or zero. Values
            that are not a ``Fraction`` go through :func:`parse_gpu_amount`.

        Returns
        -------
        Lease

        Raises
        ------
        NoFit
            If the amount cannot be placed with the devices free now.
        ValueError
            If ``holder`` already holds a lease (:class:`InvalidRequestError` for an invalid
            amount).

        Examples
        --------
        >>> ledger = DeviceLedger(1)
        >>> ledger.acquire("a", Fraction(3, 4))
        Lease(holder='a', devices=(0,), amount=Fraction(3, 4))
        >>> ledger.acquire("b", Fraction(1, 2))
        Traceback (most recent call last):
        ...
        dask_gpuresources._allocator.NoFit: cannot place GPU=0.5 for 'b' now (needs one device with that much free); free share per device: [0.25]
        >>> ledger.acquire("a", Fraction(1, 4))
        Traceback (most recent call last):
        ...
        ValueError: 'a' already holds GPU=0.75 on devices (0,); release it before acquiring again
        """  # noqa: E501
        amount = _as_amount(amount)
        with self._lock:
            lease = self._take(holder, amount)
            if lease is None:
                raise NoFit(holder, amount, tuple(_ONE - u for u in self._used))
            return lease

    def try_acquire(self, holder: Hashable, amount: Fraction) -> Lease | None:
        """Like :meth:`acquire`, but return None where the amount does not fit now.

        Examples
        --------
        >>> ledger = DeviceLedger(1)
        >>> ledger.try_acquire("a", Fraction(2)) is None
        True
        """
        if type(amount) is not int:  # a whole request from the worker is an int already
            amount = _as_amount(amount)
        with self._lock:
            return self._take(holder, amount)

    def release(self, holder: Hashable) -> Lease | None:
        """Free what ``holder`` holds and return its lease; None if it holds nothing.

        Examples
        --------
        >>> ledger = DeviceLedger(1)
        >>> _ = ledger.acquire("a", Fraction(1))
        >>> ledger.release("a").devices
        (0,)
        >>> ledger.release("a") is None
        True
        """
        with self._lock:
            lease = self._leases.pop(holder, None)
            if lease is not None:
                used = self._used
                if lease.amount == 1:
                    for i in lease.devices:
                        used[i] = 0
                else:
                    for i in lease.devices:
                        used[i] -= lease.amount
                if self._limit < len(used):
                    self._trim()
            return lease

    def _trim(self) -> None:
        """Drop the free slots above a pending shrink's size; call with the lock held."""
        used = self._used
        while len(used) > self._limit and not used[-1]:
            used.pop()

    def lease(self, holder: Hashable) -> Lease | None:
        """The lease ``holder`` holds, or None."""
        # Without the lock: one dict read is atomic, and a task thread that asks for its own
        # lease (get_gpu_ids) must never hold a lock the event loop is waiting for.
        return self._leases.get(holder)

    def leases(self) -> dict[Hashable, Lease]:
        """A copy of all leases, by holder."""
        with self._lock:
            return dict(self._leases)

    def free(self) -> tuple[Fraction, ...]:
        """The free share of each device, in device order."""
        with self._lock:
            return tuple(_ONE - u for u in self._used)

    def all_taken(self) -> bool:
        """Whether no device has any share free (cheaper than looking at :meth:`free`).

        Examples
        --------
        >>> ledger = DeviceLedger(2)
        >>> _ = ledger.acquire("a", Fraction(1))
        >>> ledger.all_taken()
        False
        >>> _ = ledger.acquire("b", Fraction(1, 2))
        >>> ledger.all_taken()
        False
        >>> _ = ledger.acquire("c", Fraction(1, 2))
        >>> ledger.all_taken()
        True
        """
        with self._lock:
            return all(u == 1 for u in self._used)

    def holders(self) -> dict[int, dict[Hashable, Fraction]]:
        """Each device's holders and their shares (a copy; every device is present).

        Examples
        --------
        >>> ledger = DeviceLedger(2)
        >>> _ = ledger.acquire("a", Fraction(1, 4))
        >>> ledger.holders()
        {0: {'a': Fraction(1, 4)}, 1: {}}
        """
        with self._lock:
            out: dict[int, dict[Hashable, Fraction]] = {i: {} for i in range(len(self._used))}
            for holder, lease in self._leases.items():
                for i in lease.devices:
                    out[i][holder] = lease.amount
            return out

    def resize(self, n_devices: int, *, wait: bool = False) -> bool:
        """Grow or shrink the number of device slots.

        Parameters
        ----------
        n_devices
            The new number of slots.
        wait
            When a slot that would go is held: ``False`` raises; ``True`` stops placing
            anything on the slots that go and removes them as they come free.

        Returns
        -------
        bool
            Whether the ledger has its new size now (``False``: a shrink is waiting).

        Raises
        ------
        ValueError
            If a device that would be removed is held (and not ``wait``), or ``n_devices``
            is not a whole number of zero or more.

        Examples
        --------
        >>> ledger = DeviceLedger(2)
        >>> _ = ledger.acquire("a", Fraction(1, 2))
        >>> ledger.resize(3)
        True
        >>> ledger.resize(0)
        Traceback (most recent call last):
        ...
        ValueError: cannot shrink to 0 devices while devices [0] are held (by ['a']); release them first or use resize(1)
        >>> ledger.resize(0, wait=True), ledger.can_place(Fraction(1, 4)), ledger.n_devices
        (False, False, 1)
        >>> _ = ledger.release("a")
        >>> ledger.n_devices
        0
        """  # noqa: E501
        n = _check_count(n_devices, "resize")
        with self._lock:
            used = self._used
            if n >= len(used):
                used.extend([_ZERO] * (n - len(used)))
                self._limit = n
                return True
            held = [i for i in range(n, len(used)) if used[i]]
            if held and not wait:
                by = sorted(
                    {repr(h) for h, lease in self._leases.items() if set(lease.devices) & set(held)}
                )
                raise ValueError(
                    f"cannot shrink to {n} devices while devices {held} are held "
                    f"(by [{', '.join(by)}]); release them first or use resize({held[-1] + 1})"
                )
            self._limit = n
            self._trim()
            return len(used) == n
