"""The slot planner's PyTorch twin against a plain-Python loop, on random and malformed rows (CPU)."""

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from lmeye_fast.planner import PlanStatus, check_plan, plan_slots, plan_slots_torch

REQ, SLOT = 7, 9  # background tokens are drawn from [10, 60), so they never collide


def plan_loop(input_ids, request_id, slot_id, num_slots):
    """The documented semantics, one token at a time."""
    request_pos, slot_pos, status = [], [], []
    for row in input_ids.tolist():
        requests = [t for t, tok in enumerate(row) if tok == request_id]
        slots = [t for t, tok in enumerate(row) if tok == slot_id]
        request_pos.append(requests[0] if requests else 0)
        if not requests:
            code = PlanStatus.MISSING_REQUEST
        elif len(requests) > 1:
            code = PlanStatus.MULTIPLE_REQUESTS
        elif len(slots) < num_slots:
            code = PlanStatus.TOO_FEW_SLOTS
        elif len(slots) > num_slots:
            code = PlanStatus.TOO_MANY_SLOTS
        elif slots and slots[0] < requests[0]:
            code = PlanStatus.SLOT_BEFORE_REQUEST
        else:
            code = PlanStatus.OK
        status.append(int(code))
        slot_pos.append(slots if code == PlanStatus.OK else [-1] * num_slots)
    return (torch.tensor(request_pos, dtype=torch.int64).reshape(-1),
            torch.tensor(slot_pos, dtype=torch.int64).reshape(len(slot_pos), num_slots),
            torch.tensor(status, dtype=torch.int32).reshape(-1))


CASES = ("ok", "missing_request", "multiple_requests", "too_few", "too_many", "slot_before", "missing_and_few",
         "noise")


def make_row(case, length, num_slots, rng):
    """A row of ``length`` tokens shaped like ``case``; falls back to noise when the row is too short."""
    row = [rng.randrange(10, 60) for _ in range(length)]
    slots = {"ok": num_slots, "missing_request": num_slots, "multiple_requests": num_slots,
             "too_few": rng.randrange(0, num_slots), "too_many": num_slots + rng.randrange(1, 4),
             "slot_before": num_slots, "missing_and_few": rng.randrange(0, num_slots)}.get(case)
    requests = {"missing_request": 0, "missing_and_few": 0, "multiple_requests": rng.randrange(2, 4)}.get(case, 1)
    if case == "noise" or slots + requests + 1 > length:
        return [rng.choice((REQ, SLOT, rng.randrange(10, 60))) for _ in range(length)]
    if case == "slot_before":
        # One slot before the request, the others after it.
        cut = rng.randrange(1, length - num_slots + 1)
        before = rng.randrange(0, cut)
        row[before] = SLOT
        row[cut] = REQ
        for t in rng.sample(range(cut + 1, length), num_slots - 1):
            row[t] = SLOT
        return row
    if slots + requests == 0:
        return row
    first = rng.randrange(0, length - slots - requests + 1)
    after = rng.sample(range(first + 1, length), slots + requests - 1)
    rng.shuffle(after)
    if requests:
        row[first] = REQ
        for t in after[:requests - 1]:
            row[t] = REQ
        for t in after[requests - 1:]:
            row[t] = SLOT
    else:
        for t in [first] + after:
            row[t] = SLOT
    return row


def random_ids(batch, length, num_slots, rng, cases=CASES):
    rows = [make_row(rng.choice(cases), length, num_slots, rng) for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.int64).reshape(batch, length)


def assert_plans_equal(got, want):
    for name, g, w in zip(("request_pos", "slot_pos", "status"), got, want):
        assert g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w), f"{name}: {g} != {w}"


@pytest.mark.parametrize("length", [1, 3, 123, 257])
@pytest.mark.parametrize("num_slots", [1, 3, 5])
def test_twin_matches_loop(length, num_slots):
    rng = random.Random(random.getrandbits(64))  # replayable: conftest seeds random
    ids = random_ids(rng.randrange(1, 12), length, num_slots, rng)
    assert_plans_equal(plan_slots_torch(ids, REQ, SLOT, num_slots), plan_loop(ids, REQ, SLOT, num_slots))


@pytest.mark.parametrize("case", CASES)
def test_every_case(case):
    rng = random.Random(random.getrandbits(64))  # replayable: conftest seeds random
    num_slots = rng.randrange(1, 6)
    ids = random_ids(16, 64, num_slots, rng, cases=(case,))
    got = plan_slots_torch(ids, REQ, SLOT, num_slots)
    assert_plans_equal(got, plan_loop(ids, REQ, SLOT, num_slots))
    expected = {"ok": PlanStatus.OK, "missing_request": PlanStatus.MISSING_REQUEST,
                "multiple_requests": PlanStatus.MULTIPLE_REQUESTS, "too_few": PlanStatus.TOO_FEW_SLOTS,
                "too_many": PlanStatus.TOO_MANY_SLOTS, "slot_before": PlanStatus.SLOT_BEFORE_REQUEST,
                "missing_and_few": PlanStatus.MISSING_REQUEST}.get(case)
    if expected is not None:
        assert bool((got[2] == expected).all()), got[2]
    # Whatever the row, the request position stays inside it; slot positions too where the row is
    # well formed, and every one is -1 (skipped by the interleave) where it is not.
    assert bool((got[0] >= 0).all() and (got[0] < 64).all())
    well_formed = (got[2] == PlanStatus.OK)[:, None]
    assert bool(torch.where(well_formed, (got[1] >= 0) & (got[1] < 64), got[1] == -1).all())


def test_int32_and_non_contiguous_ids():
    rng = random.Random(random.getrandbits(64))  # replayable: conftest seeds random
    ids = random_ids(9, 2 * 101, 4, rng)
    strided = ids[:, ::2]  # keeps whatever tokens land on even positions: any mix of cases
    assert not strided.is_contiguous()
    want = plan_loop(strided, REQ, SLOT, 4)
    assert_plans_equal(plan_slots_torch(strided, REQ, SLOT, 4), want)
    assert_plans_equal(plan_slots_torch(strided.to(torch.int32), REQ, SLOT, 4), want)
    transposed = ids.t().contiguous().t()
    assert_plans_equal(plan_slots_torch(transposed, REQ, SLOT, 4), plan_loop(ids, REQ, SLOT, 4))


def test_empty_rows_and_batch():
    request_pos, slot_pos, status = plan_slots_torch(torch.empty(3, 0, dtype=torch.int64), REQ, SLOT, 2)
    assert request_pos.tolist() == [0, 0, 0] and slot_pos.tolist() == [[-1, -1]] * 3
    assert status.tolist() == [PlanStatus.MISSING_REQUEST] * 3
    request_pos, slot_pos, status = plan_slots_torch(torch.empty(0, 5, dtype=torch.int64), REQ, SLOT, 2)
    assert request_pos.shape == (0,) and slot_pos.shape == (0, 2) and status.shape == (0,)


def test_plan_slots_dispatch_on_cpu_is_the_twin():
    rng = random.Random(random.getrandbits(64))  # replayable: conftest seeds random
    ids = random_ids(6, 40, 3, rng)
    assert_plans_equal(plan_slots(ids, REQ, SLOT, 3), plan_loop(ids, REQ, SLOT, 3))
    assert_plans_equal(plan_slots(ids, REQ, SLOT, 3, backend="reference"), plan_loop(ids, REQ, SLOT, 3))


@pytest.mark.parametrize("case, problem", [
    ("missing_request", "has no request token (id 7)"),
    ("multiple_requests", "request tokens (id 7); exactly one is expected"),
    ("too_few", "fewer than num_slots=3"),
    ("too_many", "more than num_slots=3"),
    ("slot_before", "before its request token"),
])
def test_validate_names_row_and_problem(case, problem):
    rng = random.Random(random.getrandbits(64))  # replayable: conftest seeds random
    good = random_ids(5, 48, 3, rng, cases=("ok",))
    bad_row = rng.randrange(5)
    good[bad_row] = torch.tensor(make_row(case, 48, 3, rng))
    with pytest.raises(ValueError, match=rf"input_ids: row {bad_row} .*{re.escape(problem)}"):
        plan_slots(good, REQ, SLOT, 3, validate=True)
    with pytest.raises(ValueError, match=rf"row {bad_row} "):
        check_plan(plan_slots(good, REQ, SLOT, 3)[2])


def test_validate_passes_and_counts_other_bad_rows():
    rng = random.Random(random.getrandbits(64))  # replayable: conftest seeds random
    ids = random_ids(4, 30, 2, rng, cases=("ok",))
    plan_slots(ids, REQ, SLOT, 2, validate=True)
    ids[1] = ids[3] = torch.tensor(make_row("too_many", 30, 2, rng))
    with pytest.raises(ValueError, match=r"row 1 .*\(1 more malformed row\)"):
        plan_slots(ids, REQ, SLOT, 2, validate=True)


def test_bad_arguments():
    ids = torch.randint(10, 60, (2, 8))
    with pytest.raises(TypeError, match=r"input_ids \(B, T\): expected dtype in \(int32, int64\)"):
        plan_slots(ids.float(), REQ, SLOT, 2)
    with pytest.raises(ValueError, match=r"input_ids \(B, T\): expected shape"):
        plan_slots(ids[0], REQ, SLOT, 2)
    with pytest.raises(ValueError, match="slot_token_id: must differ from request_token_id"):
        plan_slots(ids, REQ, REQ, 2)
    with pytest.raises(ValueError, match="num_slots: expected a positive int"):
        plan_slots(ids, REQ, SLOT, 0)
    with pytest.raises(TypeError, match="request_token_id: expected an int"):
        plan_slots(ids, 7.0, SLOT, 2)
    with pytest.raises(ValueError, match="backend"):
        plan_slots(ids, REQ, SLOT, 2, backend="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour of backend='cuda'")
def test_cuda_backend_on_cpu_fails_clearly():
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        plan_slots(torch.randint(10, 60, (2, 8)), REQ, SLOT, 2, backend="cuda")


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.lists(st.sampled_from((REQ, SLOT, 11, 12)), min_size=1, max_size=24), min_size=1,
                     max_size=6),
       num_slots=st.integers(1, 6))
def test_twin_matches_loop_on_any_token_sequence(rows, num_slots):
    """Property: on arbitrary sequences over {request, slot, two others} the twin equals the loop."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [11] * (width - len(r)) for r in rows], dtype=torch.int64)
    assert_plans_equal(plan_slots_torch(ids, REQ, SLOT, num_slots), plan_loop(ids, REQ, SLOT, num_slots))
