"""Run a test function on N gloo ranks in worker processes started once and reused.

    from tests.helpers.ranks import run_on_ranks

    def _count(dist, n):            # module level: the workers import it by name
        return dist.all_reduce_max(dist.rank * n)

    def test_count():
        assert run_on_ranks(2, _count, 3) == [3.0, 3.0]   # rank 0's result, rank 1's

For library code that needs several ranks (collectives, TP layers, engines), not for the CLI or
for what torchrun and Slurm do to whole processes: those need processes of their own.

The first call with a world size starts its workers (forked from a server that imported the
libraries once: see _forkserver). Each starts the gloo group and megatron's parallel state through
`Dist.initialize` (which applies pretrain.cpu_shims), then serves calls until the session ends. A
call gets the rank's `pretrain.dist.Dist` at the TP degree it asks for (megatron's model-parallel
state is rebuilt when the degree changes), seeded afresh, with a new process's handlers of the
stop signals. What a function leaves in module globals stays for the next call on that worker;
it must not shut the process group down.

A rank's exception is raised here with the rank's traceback as its cause. A call that does not
finish within `timeout` (a rank hangs, or waits in a collective for a rank that raised) fails
with every hung rank's stacks, and the workers are replaced before the next call.
"""

from __future__ import annotations

import atexit
import faulthandler
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing import forkserver
from multiprocessing.connection import wait
from typing import Any, Callable, Dict, List

from tests.launch_helpers import cpu_env, free_port

START_TIMEOUT = 600  # s: the workers import torch, DeepSpeed and megatron-core, on a busy machine
ERROR_GRACE = 10  # s: how long the other ranks may take to finish after one raised
RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
PRELOAD = ["torch", "deepspeed", "megatron.core.parallel_state", "pretrain.dist",
           "pretrain.cpu_shims", "tests.helpers.ranks"]


class RankTimeout(AssertionError):
    """Ranks that did not finish a call in time; the message holds their stacks."""


class RankTraceback(Exception):
    """The traceback of an exception raised on a rank (attached as the exception's cause)."""


# ---- the worker -------------------------------------------------------------------------------
def _serve(rank: int, world: int, port: int, conn, log_path: str) -> None:
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.register(signal.SIGQUIT, file=log, all_threads=True)  # stacks when hung
    env = cpu_env({"OMP_NUM_THREADS": "1"})
    os.environ.clear()
    os.environ.update(env)
    rendezvous = dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        tp = (1, 1)
        _dist(rendezvous, tp, seed=0, new_tp=True)
        conn.send(("ready", None, None))
    except BaseException as e:  # noqa: BLE001 - the test process says why
        conn.send(("error", _picklable(e), traceback.format_exc()))
        return
    handlers = {sig: signal.getsignal(sig) for sig in RESET_SIGNALS}
    while True:
        for sig, handler in handlers.items():  # what a previous call installed goes
            signal.signal(sig, handler)
        try:
            fn, args, kwargs, want_tp, seed = conn.recv()  # want_tp: (tp, pp)
        except EOFError:  # the test process is gone
            return
        try:
            dist = _dist(rendezvous, want_tp, seed, new_tp=want_tp != tp)
            tp = want_tp
            reply = ("ok", fn(dist, *args, **kwargs), None)
            pickle.dumps(reply)
        except BaseException as e:  # noqa: BLE001 - everything goes back to the test
            reply = ("error", _picklable(e), traceback.format_exc())
        conn.send(reply)


def _dist(rendezvous: Dict[str, str], degrees, seed: int, new_tp: bool):
    """This rank's Dist at degrees (tp, pp), seeded; the process group is started once, megatron's
    model-parallel state again when a degree changes."""
    import torch
    from megatron.core import parallel_state

    from pretrain.config import ParallelConfig
    from pretrain.dist import Dist

    torch.set_num_threads(1)
    if new_tp and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    tp, pp = degrees
    return Dist.from_env(ParallelConfig(tp=tp, pp=pp, device="cpu"),
                         env=rendezvous).initialize(seed)


def _picklable(e: BaseException):
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - sent as text instead
        return None


# ---- the pool ---------------------------------------------------------------------------------
class RankPool:
    """`world` worker processes, one per rank, serving calls one at a time."""

    def __init__(self, world: int):
        self.world, self.procs, self.conns, self.logs = world, [], [], []

    def start(self) -> None:
        ctx = _forkserver()
        port = free_port()
        for rank in range(self.world):
            fd, log = tempfile.mkstemp(prefix=f"rank{rank}_", suffix=".log")
            os.close(fd)
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, self.world, port, there, log),
                               daemon=True, name=f"test-rank-{rank}")
            proc.start()
            there.close()
            self.procs.append(proc), self.conns.append(here), self.logs.append(log)
        replies = self._collect(START_TIMEOUT, "start")
        for rank in range(self.world):
            if replies[rank][0] != "ready":
                self.close()
                _raise(rank, replies[rank])

    def run(self, fn: Callable, args, kwargs, tp: int, seed: int, timeout: float) -> List[Any]:
        if not self.procs:
            self.start()
        for conn in self.conns:
            conn.send((fn, args, kwargs, tp, seed))
        replies = self._collect(timeout, fn.__name__)
        for rank in range(self.world):
            if replies[rank][0] != "ok":
                _raise(rank, replies[rank])
        return [replies[rank][1] for rank in range(self.world)]

    def _collect(self, timeout: float, what: str) -> Dict[int, tuple]:
        """Every rank's reply. When a rank hangs or its worker dies the pool is closed (the next
        call starts new workers) and the first error, or RankTimeout, is raised."""
        replies: Dict[int, tuple] = {}
        deadline, broken = time.monotonic() + timeout, False
        while len(replies) < self.world:
            waiting = {self.conns[r]: r for r in range(self.world) if r not in replies}
            waiting.update({self.procs[r].sentinel: r for r in waiting.values()})
            ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for rank in sorted({waiting[obj] for obj in ready}):
                try:
                    replies[rank] = self.conns[rank].recv()
                except (EOFError, OSError):
                    self.procs[rank].join(5)
                    broken = True
                    replies[rank] = ("error", None, f"rank {rank}'s worker died (exit code "
                                     f"{self.procs[rank].exitcode}) in {what}; its output:\n"
                                     f"{_tail(self.logs[rank], 0)}")
                if replies[rank][0] == "error":
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE)
        hung = [r for r in range(self.world) if r not in replies]
        if hung or broken:
            stacks = self._stacks(hung)
            self.close()
            errors = [r for r in sorted(replies) if replies[r][0] == "error"]
            if errors:
                _raise(errors[0], replies[errors[0]])
            raise RankTimeout(f"{what}: rank(s) {hung} did not finish in {timeout:g} s; the "
                              f"workers were restarted. Their stacks:\n{stacks}")
        return replies

    def _stacks(self, ranks: List[int]) -> str:
        sizes = {r: os.path.getsize(self.logs[r]) for r in ranks}
        for r in ranks:
            os.kill(self.procs[r].pid, signal.SIGQUIT)
        time.sleep(1.0)
        return "\n".join(f"--- rank {r}\n{_tail(self.logs[r], sizes[r])}" for r in ranks)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc, conn, log in zip(self.procs, self.conns, self.logs):
            proc.join(10)
            conn.close()
            os.unlink(log)
        self.procs, self.conns, self.logs = [], [], []


def _forkserver():
    """Workers are forked from multiprocessing's fork server, which imports the heavy libraries
    once per session, in the environment of a CPU rank (its own, not this process's): a worker,
    or a new one after a hang, then starts in about a second. Nothing of this process (threads, a
    process group of its own) reaches them, as with `spawn`."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    saved = dict(os.environ)
    os.environ.update(cpu_env({"OMP_NUM_THREADS": "1"}))
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return ctx


def _tail(path: str, offset: int, limit: int = 8000) -> str:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return f.read()[-limit:]


def _raise(rank: int, reply: tuple):
    _, exc, tb = reply
    cause = RankTraceback(f"on rank {rank}:\n{tb}")
    if exc is None:
        raise AssertionError(f"rank {rank} failed:\n{tb}") from None
    raise exc from cause


_POOLS: Dict[int, RankPool] = {}


def run_on_ranks(world: int, fn: Callable, *args, tp: int = 1, pp: int = 1, seed: int = 0,
                 timeout: float = 120, **kwargs) -> List[Any]:
    """fn(dist, *args, **kwargs) on ranks 0..world-1 at TP degree tp and PP degree pp, seeds set
    to seed; each rank's result, in rank order. fn must be importable by name (module level)."""
    if world not in _POOLS:
        _POOLS[world] = RankPool(world)
    return _POOLS[world].run(fn, args, kwargs, (tp, pp), seed, timeout)


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
