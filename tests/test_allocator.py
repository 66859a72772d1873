from __future__ import annotations

import pickle
import random
import sys
import threading
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dask_gpuresources._allocator import (
    DeviceLedger,
    Lease,
    NoFit,
    format_amount,
    parse_gpu_amount,
)
from dask_gpuresources.exceptions import InvalidRequestError

F = Fraction
HALF = F(1, 2)
QUARTER = F(1, 4)


def check_invariants(ledger: DeviceLedger) -> None:
    """The ledger's rules, checked from its public views only."""
    free = ledger.free()
    leases = ledger.leases()
    holders = ledger.holders()
    assert len(free) == ledger.n_devices
    assert sorted(holders) == list(range(ledger.n_devices))
    for i, share in enumerate(free):
        assert 0 <= share <= 1, (i, share)
        assert sum(holders[i].values(), F(0)) == 1 - share
    for holder, lease in leases.items():
        assert lease.holder == holder
        assert list(lease.devices) == sorted(set(lease.devices))
        assert all(0 <= d < ledger.n_devices for d in lease.devices)
        if lease.amount == 0:
            assert lease.devices == ()
        elif lease.amount < 1:
            assert len(lease.devices) == 1
        else:
            assert lease.amount == 1
            assert len(lease.devices) >= 1
            for d in lease.devices:
                # A whole lease's device is shared with no one.
                assert holders[d] == {holder: F(1)}
        for d in lease.devices:
            assert holders[d][holder] == lease.amount
    assert len(ledger) == len(leases)


# --------------------------------------------------------------------------------------------
# parse_gpu_amount / format_amount


@pytest.mark.parametrize(
    "value, expected",
    [
        (0, F(0)),
        (0.0, F(0)),
        (-0.0, F(0)),
        (1, F(1)),
        (2, F(2)),
        (2.0, F(2)),
        (0.5, HALF),
        (0.1, F(1, 10)),
        (0.25, QUARTER),
        (1 / 3, F(3333, 10000)),
        (0.0001, F(1, 10_000)),
        (F(1, 3), F(3333, 10000)),
        (0.33334, F(3333, 10000)),
        (F(12_345, 100_001), F(1234, 10_000)),  # exact input too: one representation
        (F(4, 2), F(2)),
        (Decimal("0.25"), QUARTER),
        (Decimal("3"), F(3)),
    ],
)
def test_parse_gpu_amount_accepts(value, expected):
    result = parse_gpu_amount(value)
    assert result == expected
    assert type(result) is Fraction


def test_parse_gpu_amount_numpy_scalars():
    np = pytest.importorskip("numpy")
    for value, expected in [
        (np.int64(2), F(2)),
        (np.float64(0.1), F(1, 10)),
        (np.float32(0.1), F(1, 10)),
        (np.float32(0.25), QUARTER),
    ]:
        result = parse_gpu_amount(value)
        assert result == expected
        assert type(result.numerator) is int
        assert type(result.denominator) is int
    with pytest.raises(InvalidRequestError, match="finite"):
        parse_gpu_amount(np.float64("nan"))


@pytest.mark.parametrize(
    "value, message",
    [
        (
            1.5,
            "a GPU request above 1 must be a whole number, got 1.5; "
            "use resources={'GPU': 1} or resources={'GPU': 2}",
        ),
        (
            F(5, 2),
            "a GPU request above 1 must be a whole number, got Fraction(5, 2); "
            "use resources={'GPU': 2} or resources={'GPU': 3}",
        ),
        (
            Decimal("3.1"),
            "a GPU request above 1 must be a whole number, got Decimal('3.1'); "
            "use resources={'GPU': 3} or resources={'GPU': 4}",
        ),
        (-1, "a GPU request must be zero or more, got -1; use resources={'GPU': 1}"),
        (-0.5, "a GPU request must be zero or more, got -0.5; use resources={'GPU': 1}"),
        (True, "a GPU request must be a number, got True; use resources={'GPU': 1}"),
        (False, "a GPU request must be a number, got False; use resources={'GPU': 0}"),
        ("0.5", "a GPU request must be a number, got '0.5'; use resources={'GPU': 0.5}"),
        ("2", "a GPU request must be a number, got '2'; use resources={'GPU': 2}"),
        ("one", "a GPU request must be a number, got 'one'; use resources={'GPU': 1}"),
        (None, "a GPU request must be a number, got None; use resources={'GPU': 1}"),
        ([1], "a GPU request must be a number, got [1]; use resources={'GPU': 1}"),
        (1j, "a GPU request must be a number, got 1j; use resources={'GPU': 1}"),
        (
            float("nan"),
            "a GPU request must be a finite number, got nan; use resources={'GPU': 1}",
        ),
        (
            float("inf"),
            "a GPU request must be a finite number, got inf; use resources={'GPU': 1}",
        ),
        (
            float("-inf"),
            "a GPU request must be a finite number, got -inf; use resources={'GPU': 1}",
        ),
        (
            Decimal("NaN"),
            "a GPU request must be a finite number, got Decimal('NaN'); use resources={'GPU': 1}",
        ),
        (
            0.00001,
            "GPU requests below 0.0001 are not supported, got 1e-05; use resources={'GPU': 0.0001}",
        ),
        (
            F(1, 20_000),
            "GPU requests below 0.0001 are not supported, got Fraction(1, 20000); "
            "use resources={'GPU': 0.0001}",
        ),
    ],
)
def test_parse_gpu_amount_rejects(value, message):
    with pytest.raises(InvalidRequestError) as info:
        parse_gpu_amount(value)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)
    assert info.value.value is value


def test_invalid_request_error_pickles():
    with pytest.raises(InvalidRequestError) as info:
        parse_gpu_amount(1.5)
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == str(info.value)


def test_float_requests_do_not_drift():
    amounts = [parse_gpu_amount(0.1) for _ in range(10_000)]
    assert sum(amounts, F(0)) == 1000
    assert sum([0.1] * 10) != 1.0  # what the Fraction conversion protects against


@pytest.mark.parametrize(
    "amount, text",
    [
        (F(0), "0"),
        (F(1), "1"),
        (F(3), "3"),
        (HALF, "0.5"),
        (QUARTER, "0.25"),
        (F(3, 4), "0.75"),
        (F(1, 10), "0.1"),
        (F(1, 10_000), "0.0001"),
        (F(3, 2), "1.5"),
        (F(1, 3), "1/3"),
        (F(1, 20_000), "1/20000"),
        (2, "2"),
    ],
)
def test_format_amount(amount, text):
    assert format_amount(amount) == text


# --------------------------------------------------------------------------------------------
# DeviceLedger: placement


def test_whole_requests_take_lowest_free_devices():
    ledger = DeviceLedger(4)
    assert ledger.acquire("a", F(1)) == Lease("a", (0,), F(1))
    assert ledger.acquire("b", F(2)) == Lease("b", (1, 2), F(1))
    ledger.release("a")
    assert ledger.acquire("c", F(2)).devices == (0, 3)
    check_invariants(ledger)


def test_whole_request_skips_partly_used_device():
    ledger = DeviceLedger(3)
    ledger.acquire("frac", QUARTER)
    assert ledger.acquire("whole", F(2)).devices == (1, 2)
    assert not ledger.can_place(F(1))
    assert ledger.try_acquire("more", F(1)) is None
    # 0.75 is free on device 0, but a whole device is never assembled from parts.
    ledger.release("whole")
    assert ledger.acquire("whole", F(2)).devices == (1, 2)
    check_invariants(ledger)


def test_best_fit_packs_fractions():
    ledger = DeviceLedger(3)
    assert ledger.acquire(1, HALF).devices == (0,)
    assert ledger.acquire(2, HALF).devices == (0,)
    assert ledger.acquire(3, HALF).devices == (1,)
    check_invariants(ledger)


def test_best_fit_prefers_fullest_device_that_fits():
    ledger = DeviceLedger(2)
    ledger.acquire("a", HALF)  # device 0
    ledger.acquire("b", F(3, 4))  # device 0 has only 0.5 free: device 1
    ledger.acquire("c", QUARTER)  # device 1 (leftover 0) over device 0 (leftover 0.25)
    assert ledger.lease("c").devices == (1,)
    ledger.release("b")
    assert ledger.free() == (HALF, F(3, 4))
    # Device 0 is left with 0 and device 1 with 0.25: the fuller device 0 wins.
    assert ledger.acquire("d", HALF).devices == (0,)
    assert ledger.free() == (F(0), F(3, 4))
    check_invariants(ledger)


def test_best_fit_ties_go_to_lowest_index():
    ledger = DeviceLedger(3)
    ledger.acquire("a", F(3, 4))  # device 0
    ledger.acquire("b", F(3, 4))  # device 1
    ledger.acquire("c", F(3, 4))  # device 2
    ledger.release("a")
    ledger.acquire("a", HALF)  # device 0, now 0.5 free there; 0.25 on 1 and 2
    assert ledger.acquire("d", QUARTER).devices == (1,)
    assert ledger.acquire("e", QUARTER).devices == (2,)
    assert ledger.acquire("f", QUARTER).devices == (0,)
    check_invariants(ledger)


def test_fractional_request_is_never_split():
    ledger = DeviceLedger(2)
    ledger.acquire("a", F(3, 4))
    ledger.acquire("b", F(3, 4))
    assert ledger.free() == (QUARTER, QUARTER)
    assert not ledger.can_place(HALF)
    with pytest.raises(NoFit):
        ledger.acquire("c", HALF)
    assert "c" not in ledger
    check_invariants(ledger)


def test_quarters_fill_exactly_one_device():
    ledger = DeviceLedger(2)
    leases = [ledger.acquire(i, QUARTER) for i in range(4)]
    assert {lease.devices for lease in leases} == {(0,)}
    assert ledger.free() == (F(0), F(1))
    assert ledger.acquire(4, QUARTER).devices == (1,)
    check_invariants(ledger)


def test_tenths_fill_one_device_exactly():
    ledger = DeviceLedger(1)
    tenth = parse_gpu_amount(0.1)
    for i in range(10):
        ledger.acquire(i, tenth)
    assert ledger.free() == (F(0),)
    assert ledger.free()[0] == 0
    assert ledger.try_acquire(10, tenth) is None
    assert not ledger.can_place(tenth)
    check_invariants(ledger)


def test_many_cycles_leave_devices_exactly_free():
    ledger = DeviceLedger(3)
    tenth = parse_gpu_amount(0.1)
    for i in range(10_000):
        ledger.acquire(i, tenth)
        if i >= 5:
            ledger.release(i - 5)
    for i in range(10_000 - 5, 10_000):
        ledger.release(i)
    assert ledger.free() == (F(1), F(1), F(1))
    assert len(ledger) == 0


def test_int_and_fraction_requests_mix():
    # The worker passes whole requests as plain ints (its fast path); they share the books
    # with Fraction requests exactly.
    ledger = DeviceLedger(3)
    assert ledger.acquire("a", 1) == Lease("a", (0,), 1)
    assert ledger.acquire("b", QUARTER).devices == (1,)
    assert ledger.try_acquire("c", 2) is None  # device 1 is partly used
    assert ledger.acquire("d", F(1)).devices == (2,)
    assert ledger.free() == (0, F(3, 4), 0)
    ledger.release("a")
    assert ledger.acquire("e", 1).devices == (0,)
    for holder in ("b", "d", "e"):
        ledger.release(holder)
    assert ledger.free() == (F(1), F(1), F(1))
    check_invariants(ledger)


def test_zero_amount_lease():
    ledger = DeviceLedger(0)
    assert ledger.can_place(F(0))
    lease = ledger.acquire("z", F(0))
    assert lease == Lease("z", (), F(0))
    assert "z" in ledger
    assert ledger.release("z") == lease
    assert "z" not in ledger


def test_acquire_validates_amounts():
    ledger = DeviceLedger(2)
    assert ledger.acquire("float", 0.5).amount == HALF
    assert ledger.acquire("int", 1).devices == (1,)
    with pytest.raises(InvalidRequestError, match="whole number"):
        ledger.acquire("bad", F(3, 2))
    with pytest.raises(InvalidRequestError, match="zero or more"):
        ledger.can_place(F(-1))
    with pytest.raises(InvalidRequestError, match="below 0.0001"):
        ledger.acquire("tiny", F(1, 100_000))
    assert "bad" not in ledger
    check_invariants(ledger)


def test_no_fit_message_and_fields():
    ledger = DeviceLedger(2)
    ledger.acquire("a", F(1))
    ledger.acquire("b", QUARTER)
    with pytest.raises(NoFit) as info:
        ledger.acquire("c", F(2))
    err = info.value
    assert (err.holder, err.amount, err.free) == ("c", F(2), (F(0), F(3, 4)))
    assert str(err) == (
        "cannot place GPU=2 for 'c' now (needs 2 entirely free device(s)); "
        "free share per device: [0, 0.75]"
    )
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
    with pytest.raises(NoFit, match=r"GPU=0.3333 .*'d'.*one device"):
        DeviceLedger(0).acquire("d", F(1, 3))


def test_more_devices_than_exist_is_no_fit():
    ledger = DeviceLedger(2)
    assert not ledger.can_place(F(3))
    assert ledger.try_acquire("x", F(3)) is None
    assert len(ledger) == 0


def test_double_acquire_is_an_error():
    ledger = DeviceLedger(2)
    ledger.acquire("a", HALF)
    with pytest.raises(ValueError, match=r"'a' already holds GPU=0.5 on devices \(0,\)"):
        ledger.acquire("a", HALF)
    with pytest.raises(ValueError, match="already holds"):
        ledger.try_acquire("a", F(1))
    ledger.acquire("z", F(0))
    with pytest.raises(ValueError, match="'z' already holds GPU=0 on devices"):
        ledger.acquire("z", F(0))
    assert ledger.free() == (HALF, F(1))


def test_release_is_idempotent():
    ledger = DeviceLedger(1)
    lease = ledger.acquire(("task", 1), F(1))
    assert ledger.release(("task", 1)) == lease
    assert ledger.release(("task", 1)) is None
    assert ledger.release("never") is None
    assert ledger.free() == (F(1),)


def test_views_are_copies():
    ledger = DeviceLedger(2)
    ledger.acquire("a", QUARTER)
    leases = ledger.leases()
    holders = ledger.holders()
    leases.clear()
    holders[0].clear()
    holders[1]["x"] = F(1)
    assert ledger.lease("a") == Lease("a", (0,), QUARTER)
    assert ledger.holders() == {0: {"a": QUARTER}, 1: {}}
    assert ledger.lease("b") is None


def test_lease_is_frozen():
    lease = Lease("a", (0,), F(1))
    with pytest.raises(AttributeError):
        lease.devices = (1,)  # type: ignore[misc]
    assert Lease("a", (0, 1), F(1)).total == 2
    assert Lease("a", (3,), QUARTER).total == QUARTER


@pytest.mark.parametrize(
    "n, message",
    [
        (-1, "the number of devices must be zero or more, got -1; use DeviceLedger(0)"),
        (2.0, "the number of devices must be a whole number, got 2.0; use DeviceLedger(2)"),
        (1.5, "the number of devices must be a whole number, got 1.5; use DeviceLedger(2)"),
        ("2", "the number of devices must be a whole number, got '2'; use DeviceLedger(2)"),
        (True, "the number of devices must be a whole number, got True; use DeviceLedger(2)"),
    ],
)
def test_bad_device_count(n, message):
    with pytest.raises(ValueError) as info:
        DeviceLedger(n)
    assert str(info.value) == message


def test_resize():
    ledger = DeviceLedger(1)
    ledger.acquire("a", HALF)
    ledger.resize(3)
    assert ledger.n_devices == 3
    assert ledger.free() == (HALF, F(1), F(1))
    assert ledger.acquire("b", F(2)).devices == (1, 2)
    with pytest.raises(ValueError) as info:
        ledger.resize(1)
    assert str(info.value) == (
        "cannot shrink to 1 devices while devices [1, 2] are held (by ['b']); "
        "release them first or use resize(3)"
    )
    assert ledger.n_devices == 3
    ledger.release("b")
    ledger.resize(1)
    assert ledger.free() == (HALF,)
    with pytest.raises(ValueError, match="use resize"):
        ledger.resize(-1)
    ledger.release("a")
    ledger.resize(0)
    assert ledger.free() == ()
    check_invariants(ledger)


def test_repr():
    ledger = DeviceLedger(2)
    ledger.acquire("a", F(1, 3))
    assert repr(ledger) == "DeviceLedger(n_devices=2, free=[0.6667, 1], leases=1)"


# --------------------------------------------------------------------------------------------
# Threads


def test_threads_never_over_commit():
    ledger = DeviceLedger(4)
    # whole requests also as plain ints: the worker passes them that way
    amounts = [F(0), F(1, 10), QUARTER, F(3333, 10000), HALF, F(3, 4), F(1), F(2), 1, 2]
    n_threads, n_ops = 8, 2000
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads + 1)
    done = threading.Event()

    def worker(t: int) -> None:
        rng = random.Random(t)
        mine: list[tuple[int, int]] = []
        try:
            barrier.wait()
            for i in range(n_ops):
                if mine and rng.random() < 0.5:
                    assert ledger.release(mine.pop(rng.randrange(len(mine)))) is not None
                else:
                    key = (t, i)
                    if ledger.try_acquire(key, rng.choice(amounts)) is not None:
                        mine.append(key)
            for key in mine:
                assert ledger.release(key) is not None
        except BaseException as e:  # noqa: B036 - surfaced in the main thread
            errors.append(e)

    def watcher() -> None:
        barrier.wait()
        while not done.is_set():
            for share in ledger.free():
                if not 0 <= share <= 1:
                    errors.append(AssertionError(f"free share out of range: {share}"))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    watch = threading.Thread(target=watcher)
    # Switch threads often, so that a missing lock shows up as a failure, not as luck.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in [*threads, watch]:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        watch.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    check_invariants(ledger)
    assert ledger.free() == (F(1),) * 4
    assert len(ledger) == 0


# --------------------------------------------------------------------------------------------
# Property test

AMOUNTS = [F(0), F(1, 10), QUARTER, F(3333, 10000), HALF, F(3, 4), F(1), F(2), F(3), F(4)]


class LedgerMachine(RuleBasedStateMachine):
    """Random acquire/release/resize against a ledger, checking placement rules as it goes."""

    ledger: DeviceLedger

    @initialize(n=st.integers(1, 8))
    def setup(self, n):
        self.ledger = DeviceLedger(n)

    @rule(holder=st.integers(0, 15), amount=st.sampled_from(AMOUNTS))
    def acquire(self, holder, amount):
        free = self.ledger.free()
        held = holder in self.ledger
        can = self.ledger.can_place(amount)
        if held:
            with pytest.raises(ValueError, match="already holds"):
                self.ledger.try_acquire(holder, amount)
            return
        lease = self.ledger.try_acquire(holder, amount)
        fully_free = [i for i, f in enumerate(free) if f == 1]
        assert can == (lease is not None)
        if amount == 0:
            assert lease == Lease(holder, (), F(0))
        elif amount.denominator == 1:
            k = amount.numerator
            if lease is None:
                assert len(fully_free) < k
            else:
                assert lease.devices == tuple(fully_free[:k])
                assert lease.amount == 1
        else:
            fits = [i for i, f in enumerate(free) if f >= amount]
            if lease is None:
                assert not fits
            else:
                # Best fit: least leftover, then lowest index.
                best = min(fits, key=lambda i: (free[i] - amount, i))
                assert lease.devices == (best,)
                assert lease.amount == amount
        if lease is not None:
            after = self.ledger.free()
            for i, f in enumerate(after):
                assert f == free[i] - (lease.amount if i in lease.devices else 0)

    @rule(holder=st.integers(0, 15))
    def release(self, holder):
        before = self.ledger.lease(holder)
        assert self.ledger.release(holder) == before
        assert holder not in self.ledger

    @precondition(lambda self: len(self.ledger) > 0)
    @rule(data=st.data())
    def release_held(self, data):
        holder = data.draw(st.sampled_from(sorted(self.ledger.leases())))
        assert self.ledger.release(holder) is not None

    @rule(n=st.integers(0, 8))
    def resize(self, n):
        free = self.ledger.free()
        needed = max((i + 1 for i, f in enumerate(free) if f < 1), default=0)
        if n < needed:
            with pytest.raises(ValueError, match="cannot shrink"):
                self.ledger.resize(n)
            assert self.ledger.free() == free
        else:
            self.ledger.resize(n)
            assert self.ledger.free() == (free + (F(1),) * n)[:n]

    @invariant()
    def consistent(self):
        check_invariants(self.ledger)

    def teardown(self):
        ledger = getattr(self, "ledger", None)
        if ledger is None:
            return
        for holder in list(ledger.leases()):
            assert ledger.release(holder) is not None
        assert ledger.free() == (F(1),) * ledger.n_devices
        assert len(ledger) == 0
        assert ledger.leases() == {}
        assert all(not h for h in ledger.holders().values())


LedgerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_ledger_machine = LedgerMachine.TestCase
