"""tests/helpers/ranks.py: results come back per rank, a rank's exception is raised here with its
traceback, a hung rank fails the call in time and the workers are replaced."""

import os
import time

import pytest
import torch

from tests.helpers.ranks import RankTimeout, run_on_ranks


def _whoami(dist, offset: int) -> dict:
    from megatron.core import parallel_state

    total = torch.tensor([dist.rank + offset])
    torch.distributed.all_reduce(total)  # a real collective over the workers' gloo group
    return {"rank": dist.rank, "world": dist.world_size, "pid": os.getpid(),
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "sum": int(total), "draw": torch.rand(1).item()}


def test_each_rank_returns_its_result_and_the_workers_are_reused():
    first = run_on_ranks(2, _whoami, 10)
    assert [(r["rank"], r["world"], r["tp"], r["sum"]) for r in first] == [(0, 2, 1, 21), (1, 2, 1, 21)]
    assert first[0]["pid"] != first[1]["pid"] != os.getpid()
    tp2 = run_on_ranks(2, _whoami, 0, tp=2)
    assert [(r["tp"], r["tp_rank"]) for r in tp2] == [(2, 0), (2, 1)]
    again = run_on_ranks(2, _whoami, 0)
    assert [r["pid"] for r in again] == [r["pid"] for r in first]
    assert [r["tp"] for r in again] == [1, 1]
    assert [r["draw"] for r in again] == [r["draw"] for r in first]  # seeded on every call


def _fails_on_rank_1(dist):
    if dist.rank == 1:
        raise ValueError(f"bad value on rank {dist.rank}")
    return "fine"


def test_an_exception_on_one_rank_is_raised_with_its_traceback():
    with pytest.raises(ValueError, match="bad value on rank 1") as info:
        run_on_ranks(2, _fails_on_rank_1)
    cause = str(info.value.__cause__)
    assert "on rank 1:" in cause and "in _fails_on_rank_1" in cause
    assert run_on_ranks(2, _whoami, 0)[1]["sum"] == 1  # the workers still serve


def _rank_0_hangs(dist):
    if dist.rank == 0:
        time.sleep(600)
    torch.distributed.barrier()  # rank 1 waits for rank 0


def test_a_hung_rank_fails_the_call_with_its_stack_and_the_workers_restart():
    before = run_on_ranks(2, _whoami, 0)
    started = time.monotonic()
    with pytest.raises(RankTimeout, match=r"rank\(s\) \[0, 1\] did not finish in 3 s") as info:
        run_on_ranks(2, _rank_0_hangs, timeout=3)
    assert time.monotonic() - started < 30
    assert "in _rank_0_hangs" in str(info.value) and "--- rank 1" in str(info.value)
    after = run_on_ranks(2, _whoami, 0)
    assert [r["sum"] for r in after] == [1, 1]
    assert {r["pid"] for r in after}.isdisjoint(r["pid"] for r in before)
