"""Runs a function on N real processes joined by a Gloo (or NCCL) process group, for multi-rank tests.

    from _dist import run_ranks
    def _body(rank, world_size, arg): ...     # module-level, so spawn can pickle it
    run_ranks(_body, 2, arg)
    launch_ranks(_body, 2, arg, env={...})    # as under torchrun: the code under test initializes the group

A failure on any rank fails the test with that rank's traceback.
"""
import gc
import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank, err_dir, run):
    """Runs this rank's work, tears its process group down, writes the traceback for the parent on failure, and
    leaves without interpreter finalization."""
    try:
        try:
            run()
        finally:
            # Drop DDP models, hook states and futures (which hold the process group) on this thread first: the
            # last reference to a Gloo group released on one of its own worker threads aborts the process.
            gc.collect()
            if dist.is_initialized():
                dist.destroy_process_group()
            gc.collect()
    except BaseException:
        with open(os.path.join(err_dir, "rank%d.txt" % rank), "w") as f:
            f.write(traceback.format_exc())
        raise
    # Leave without interpreter finalization: the test has passed on this rank and its group is destroyed, but a
    # Gloo group's worker threads can still be torn down at exit without a join (an occasional SIGABRT, "terminate
    # called without an active exception", seen in CI after every assertion had passed). Nothing is left to run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _entry(rank, fn, world_size, port, backend, err_dir, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)

    def run():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    _run_rank(rank, err_dir, run)


def _launched_entry(rank, fn, world_size, port, env, err_dir, args):
    if env.pop("_as_torchrun"):
        # what torchrun sets for each process; the framework under test initializes the process group from it
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                           "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                           "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                           "ROLE_WORLD_SIZE": str(world_size), "TORCHELASTIC_RUN_ID": "pyperf-tests"})
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.update(env)
    torch.set_num_threads(1)
    _run_rank(rank, err_dir, lambda: fn(rank, world_size, *args))


def launch_ranks(fn, world_size, *args, env=None, as_torchrun=True):
    """Like run_ranks, but each process starts as under torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...
    plus `env`) with no process group: the code under test (a training framework) initializes it.
    as_torchrun=False: none of torchrun's variables either (a plain `python script.py`)."""
    if not as_torchrun and world_size != 1:
        raise ValueError("as_torchrun=False: expected world_size 1, got %d" % world_size)
    _spawn(_launched_entry, fn, world_size, (dict(env or {}, _as_torchrun=as_torchrun),), args)


def _spawn(entry, fn, world_size, extra, args):
    with tempfile.TemporaryDirectory() as err_dir:
        try:
            mp.spawn(entry, args=(fn, world_size, free_port()) + extra + (err_dir, args), nprocs=world_size,
                     join=True)
        except Exception as e:
            msgs = []
            for r in range(world_size):
                p = os.path.join(err_dir, "rank%d.txt" % r)
                if os.path.exists(p):
                    msgs.append("---- rank %d ----\n%s" % (r, open(p).read()))
            raise AssertionError("multi-rank run failed:\n" + ("\n".join(msgs) or str(e))) from None


def run_ranks(fn, world_size, *args, backend="gloo"):
    _spawn(_entry, fn, world_size, (backend,), args)
