from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_gpuresources._devices import (
    device_tokens,
    format_visible_devices,
    parse_visible_devices,
    physical_ids,
    visible_devices,
)
from dask_gpuresources.exceptions import DeviceCountError

GPU_A = "GPU-8f3e1a2b-1c2d-3e4f-5a6b-7c8d9e0f1a2b"
GPU_B = "GPU-0badc0de-1c2d-3e4f-5a6b-7c8d9e0f1a2b"
MIG_A = "MIG-5c6d7e8f-0a1b-5c2d-9e3f-4a5b6c7d8e9f"


# --- parse_visible_devices ---------------------------------------------------------------


def test_unset_means_all_visible():
    assert parse_visible_devices(None) is None


@pytest.mark.parametrize("value", ["", " ", "\t", "NoDevFiles", " NoDevFiles "])
def test_empty_means_none_visible(value):
    assert parse_visible_devices(value) == []


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0", ["0"]),
        ("0,1", ["0", "1"]),
        ("3,1,2", ["3", "1", "2"]),
        (" 0 , 1 ", ["0", "1"]),
        ("01,2", ["1", "2"]),
        ("10", ["10"]),
    ],
)
def test_indices(value, expected):
    assert parse_visible_devices(value) == expected


def test_uuids_are_kept_as_given():
    assert parse_visible_devices(f"{GPU_A}, GPU-0bad,{MIG_A}") == [GPU_A, "GPU-0bad", MIG_A]


def test_legacy_mig_form_is_kept():
    legacy = "MIG-GPU-8f3e1a2b-1c2d-3e4f-5a6b-7c8d9e0f1a2b/1/0"
    assert parse_visible_devices(legacy) == [legacy]


def test_mixed_indices_and_uuids():
    assert parse_visible_devices(f"2,{GPU_A}") == ["2", GPU_A]


@pytest.mark.parametrize(
    "value, entry",
    [
        ("x", "x"),
        ("0,x", "x"),
        ("-1", "-1"),
        ("1.5", "1.5"),
        ("0,,1", ""),
        ("0,", ""),
        ("gpu-8f3e", "gpu-8f3e"),
        ("GPU-", "GPU-"),
        ("+1", "+1"),
        ("²", "²"),
    ],
)
def test_invalid_entry(value, entry):
    with pytest.raises(ValueError) as info:
        parse_visible_devices(value)
    assert str(info.value) == (
        "CUDA_VISIBLE_DEVICES entries must be device indices (0, 1, ...) or UUIDs starting "
        f"with 'GPU-' or 'MIG-', got {entry!r} in {value!r}; use CUDA_VISIBLE_DEVICES=\"0,1\" "
        'or CUDA_VISIBLE_DEVICES="GPU-8f3e...", or CUDA_VISIBLE_DEVICES="" for no GPU'
    )


@pytest.mark.parametrize(
    "value, duplicate, fixed",
    [
        ("0,1,0", "0", "0,1"),
        ("1, 1", "1", "1"),
        (f"{GPU_A},2,{GPU_A}", GPU_A, f"{GPU_A},2"),
    ],
)
def test_duplicate_entry(value, duplicate, fixed):
    with pytest.raises(ValueError) as info:
        parse_visible_devices(value)
    assert str(info.value) == (
        f"CUDA_VISIBLE_DEVICES must list each device once, got {duplicate!r} twice in "
        f'{value!r}; use CUDA_VISIBLE_DEVICES="{fixed}"'
    )


def test_duplicate_after_normalising_an_index():
    with pytest.raises(ValueError, match="got '1' twice in '1,01'"):
        parse_visible_devices("1,01")


@given(st.lists(st.integers(0, 64), unique=True, min_size=1))
def test_indices_round_trip(indices):
    tokens = [str(i) for i in indices]
    assert parse_visible_devices(format_visible_devices(tokens)) == tokens


# --- visible_devices -----------------------------------------------------------------------


def test_visible_devices_reads_the_given_environment():
    assert visible_devices({}) is None
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "4,2"}) == ["4", "2"]


def test_visible_devices_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert visible_devices() == ["5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_devices() is None


# --- device_tokens -------------------------------------------------------------------------


def test_tokens_without_a_visible_list_are_indices():
    assert device_tokens(3, None) == ["0", "1", "2"]
    assert device_tokens(0, None) == []


def test_over_declaring_without_a_visible_list_is_allowed():
    assert device_tokens(8, None) == [str(i) for i in range(8)]


def test_tokens_map_through_the_visible_list():
    assert device_tokens(2, ["4", GPU_A, "1"]) == ["4", GPU_A]
    assert device_tokens(3, ["4", GPU_A, "1"]) == ["4", GPU_A, "1"]
    assert device_tokens(0, []) == []


def test_whole_float_counts_are_accepted():
    # Dask parses --resources GPU=2 as 2.0.
    assert device_tokens(2.0, ["3", "1"]) == ["3", "1"]


def test_over_declaring_against_the_visible_list():
    with pytest.raises(DeviceCountError) as info:
        device_tokens(4, ["0", "1"])
    assert str(info.value) == (
        "declared GPU=4, but CUDA_VISIBLE_DEVICES lists 2 devices ('0,1'); declare at most "
        "GPU=2 (dask worker ... --resources GPU=2) or widen CUDA_VISIBLE_DEVICES"
    )
    assert isinstance(info.value, ValueError)


def test_over_declaring_against_one_or_no_device():
    with pytest.raises(DeviceCountError, match=r"lists 1 device \('3'\); declare at most GPU=1"):
        device_tokens(2.0, ["3"])
    with pytest.raises(DeviceCountError, match=r"lists 0 devices \(''\); declare at most GPU=0"):
        device_tokens(1, [])


def test_negative_count():
    with pytest.raises(DeviceCountError) as info:
        device_tokens(-1, None)
    assert str(info.value) == (
        "GPU count must not be negative, got GPU=-1; declare GPU=0 or more "
        "(dask worker ... --resources GPU=2)"
    )


@pytest.mark.parametrize(
    "count, message",
    [
        (1.5, "GPU count must be a whole number, got GPU=1.5; declare GPU=1 or GPU=2"),
        (float("nan"), "GPU count must be a whole number, got GPU=nan; declare e.g. GPU=2"),
        (True, "GPU count must be a whole number, got GPU=True; declare e.g. GPU=2"),
        ("2", "GPU count must be a whole number, got GPU='2'; declare e.g. GPU=2"),
    ],
)
def test_count_that_is_not_whole(count, message):
    with pytest.raises(DeviceCountError) as info:
        device_tokens(count, None)
    assert str(info.value) == message


# --- physical_ids --------------------------------------------------------------------------


def test_index_tokens_are_their_own_ids():
    assert physical_ids(["3", "1"]) == [3, 1]
    assert physical_ids([]) == []


def test_gpu_uuids_map_through_the_index():
    index = {GPU_A: 2, GPU_B: 5}
    assert physical_ids([GPU_B, GPU_A], index) == [5, 2]


def test_abbreviated_gpu_uuid_maps_when_unique():
    index = {GPU_A: 2, GPU_B: 5}
    assert physical_ids(["GPU-8f3e", "GPU-0bad"], index) == [2, 5]


def test_ambiguous_abbreviation_gets_the_next_id():
    index = {"GPU-aa11-x": 2, "GPU-aa22-y": 5}
    assert physical_ids(["7", "GPU-aa"], index) == [7, 8]


def test_without_a_physical_index_in_the_list_ids_count_from_zero():
    # As CUDA numbers the devices of a process that sees this list; GPU_B is not listed.
    assert physical_ids([GPU_A, MIG_A, "GPU-ffff"], {GPU_B: 5}) == [0, 1, 2]


def test_without_nvml_uuids_count_from_zero():
    assert physical_ids([MIG_A, GPU_A]) == [0, 1]


def test_mixed_tokens():
    assert physical_ids(["6", MIG_A, GPU_A], {GPU_A: 3}) == [6, 7, 3]


def test_mixed_index_and_mig_ids_are_distinct():
    # Issue item 9: CUDA_VISIBLE_DEVICES="1,MIG-..." handed out id 1 twice.
    assert physical_ids(["1", MIG_A]) == [1, 2]
    assert physical_ids([MIG_A, "1"]) == [2, 1]
    assert physical_ids(["0", MIG_A], {GPU_A: 0, GPU_B: 1}) == [0, 1]
    assert physical_ids([MIG_A, "2", GPU_A], {GPU_A: 0}) == [3, 2, 0]


def test_unknown_uuid_before_an_index_is_distinct():
    assert physical_ids(["GPU-ffff", "0"]) == [1, 0]
    assert physical_ids([GPU_A, "0", "1"], {GPU_B: 1}) == [2, 0, 1]


def test_a_gpu_listed_by_index_and_by_uuid_gets_two_ids():
    # The index keeps its id wherever it stands; the UUID naming the same GPU gets a new one.
    assert physical_ids([GPU_A, "2"], {GPU_A: 2}) == [3, 2]
    assert physical_ids(["2", "GPU-8f3e"], {GPU_A: 2}) == [2, 3]


def test_two_abbreviations_of_one_gpu_get_two_ids():
    assert physical_ids(["GPU-8f3e", "GPU-8f3e1a"], {GPU_A: 0}) == [0, 1]


_INDEX = st.integers(0, 12).map(str)
_UUID = st.sampled_from([GPU_A, GPU_B, "GPU-8f3e", "GPU-0bad", "GPU-ffff", MIG_A, "MIG-7e8f"])


_UUID_INDEX = st.dictionaries(
    st.sampled_from([GPU_A, GPU_B, "GPU-ffff0000"]), st.integers(0, 12)
).filter(lambda index: len(set(index.values())) == len(index))  # as NVML reports them
# The tokens in _UUID that name each GPU of _UUID_INDEX: its UUID and abbreviations of it.
_NAMES = {GPU_A: (GPU_A, "GPU-8f3e"), GPU_B: (GPU_B, "GPU-0bad"), "GPU-ffff0000": ("GPU-ffff",)}


@given(st.lists(st.one_of(_INDEX, _UUID), unique=True), _UUID_INDEX)
def test_ids_are_distinct_for_any_mix(tokens, uuid_index):
    ids = physical_ids(tokens, uuid_index)
    assert len(set(ids)) == len(ids) == len(tokens)
    assert all(type(i) is int for i in ids)
    # The rule, written out: indices keep theirs; then the first name of a GPU NVML knows
    # gets its index if no index token has it; the rest count on from the highest of those.
    expected = {slot: int(t) for slot, t in enumerate(tokens) if t.isdigit()}
    for uuid, index in uuid_index.items():
        named = [slot for slot, t in enumerate(tokens) if t in _NAMES[uuid]]
        if named and index not in expected.values():
            expected[named[0]] = index
    fresh = max(expected.values(), default=-1) + 1
    for slot in range(len(tokens)):
        if slot not in expected:
            expected[slot], fresh = fresh, fresh + 1
    assert ids == [expected[slot] for slot in range(len(tokens))]


@given(st.lists(st.integers(0, 64), unique=True))
def test_plain_index_lists_keep_their_ids(indices):
    assert physical_ids([str(i) for i in indices]) == indices
    assert physical_ids([str(i) for i in indices], {GPU_A: 0, GPU_B: 99}) == indices


def test_unset_visible_list_keeps_its_ids():
    assert physical_ids(device_tokens(4, None)) == [0, 1, 2, 3]


def test_the_same_device_twice_is_refused():
    with pytest.raises(ValueError) as info:
        physical_ids(["1", "0", "01"])
    assert str(info.value) == (
        "physical_ids needs each device once, got '01' after '1' in ['1', '0', '01']; "
        "use physical_ids(['1', '0'])"
    )
    with pytest.raises(ValueError, match=r"got 'MIG-5c6d\S*' after 'MIG-5c6d\S*' in"):
        physical_ids([MIG_A, "0", MIG_A])


def test_tokens_must_be_strings():
    with pytest.raises(TypeError) as info:
        physical_ids([1, 2])
    assert str(info.value) == (
        "physical_ids takes CUDA_VISIBLE_DEVICES entries as strings, got 1 in [1, 2]; "
        "use physical_ids(['1', '2'])"
    )
    with pytest.raises(TypeError) as info:
        physical_ids("0,1")
    assert str(info.value) == (
        "physical_ids takes a list of CUDA_VISIBLE_DEVICES entries, got the string '0,1'; "
        "use physical_ids(parse_visible_devices('0,1'))"
    )


# --- format_visible_devices ----------------------------------------------------------------


def test_format_visible_devices():
    assert format_visible_devices(["2", GPU_A, MIG_A]) == f"2,{GPU_A},{MIG_A}"
    assert format_visible_devices([]) == ""
    assert parse_visible_devices(format_visible_devices([])) == []


@pytest.mark.parametrize(
    "value, message",
    [
        (float("nan"), "num_gpus must be a whole number >= 0, got nan; use num_gpus=4"),
        (float("inf"), "num_gpus must be a whole number >= 0, got inf; use num_gpus=4"),
        (
            1.5,
            "num_gpus must be a whole number (a machine has whole devices), got 1.5; use "
            "num_gpus=1 or num_gpus=2",
        ),
        (True, "num_gpus must be a whole number >= 0, got True; use num_gpus=4"),
    ],
)
def test_init_counts_that_are_not_whole_raise_before_anything_starts(value, message):
    # one validator for counts: NaN and infinity once crashed with "cannot convert"
    import dask_gpuresources as gr

    with pytest.raises(ValueError) as info:
        gr.init(num_gpus=value, dashboard=False)
    assert str(info.value) == message
    assert not gr.is_initialized()
