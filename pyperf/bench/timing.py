"""How one impl of one case is timed, and how the device's copy bandwidth (the "limit" column) is measured.

GPU: CUDA events around each call after a warm-up, many calls, median and percentiles of the per-call times.
CPU: torch.utils.benchmark (blocked_autorange) with the thread count stated in the record.
Both rotate through several input sets (Case.rotate) so the working set exceeds the last-level cache and a small
case is not timed L2-hot.
"""
import math
import os
import statistics
import time

import torch

DEFAULT_CPU_LLC = 32 << 20


def cache_bytes(device):
    """Last-level cache size of `device` in bytes (what the rotated working set must exceed)."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            p = os.path.join(base, idx, "size")
            if os.path.exists(p):
                s = open(p).read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
                best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or DEFAULT_CPU_LLC


def rotation_count(case_bytes, llc_bytes, max_sets=64, max_total=1 << 30):
    """How many input sets make the rotated working set exceed twice the last-level cache (at least 1).

    Bounded by max_sets and by max_total bytes of inputs so a large case is never duplicated into OOM."""
    if case_bytes <= 0:
        return 2
    n = math.ceil(2 * llc_bytes / case_bytes) + 1
    n = min(n, max_sets, max(1, max_total // case_bytes))
    return max(1, n)


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _summary(times):
    """times in seconds -> median, p10, p90, iqr, n."""
    ts = sorted(times)
    n = len(ts)

    def q(p):
        if n == 1:
            return ts[0]
        x = p * (n - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, n - 1)
        return ts[lo] + (ts[hi] - ts[lo]) * (x - lo)

    return {"median_s": statistics.median(ts), "p10_s": q(0.10), "p90_s": q(0.90),
            "iqr_s": q(0.75) - q(0.25), "n_runs": n}


def time_cuda(fn, inputs, warmup=5, reps=100, budget_s=1.0):
    """Per-call CUDA event times over rotating inputs; stops at `reps` calls or `budget_s` seconds of GPU time."""
    k = len(inputs)
    for i in range(warmup):
        fn(inputs[i % k])
    torch.cuda.synchronize()
    # estimate one call to bound the number of reps by the time budget
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for i in range(3):
        fn(inputs[i % k])
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 3e3, 1e-7)
    reps = max(5, min(reps, int(budget_s / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        x = inputs[i % k]
        starts[i].record()
        fn(x)
        ends[i].record()
    torch.cuda.synchronize()
    return _summary([a.elapsed_time(b) / 1e3 for a, b in zip(starts, ends)])


def time_cpu(fn, inputs, warmup=2, blocks=25, budget_s=1.0, threads=None):
    """torch.utils.benchmark Timer over rotating inputs: `blocks` timed blocks of `number` calls each (number
    chosen so a block takes >= ~2 ms, bounded by the time budget); per-call time of each block -> summary."""
    from torch.utils import benchmark

    k = len(inputs)
    for i in range(warmup):
        fn(inputs[i % k])
    counter = [0]

    def step():
        x = inputs[counter[0] % k]
        counter[0] += 1
        fn(x)

    timer = benchmark.Timer(stmt="step()", globals={"step": step},
                            num_threads=threads or torch.get_num_threads())
    one = max(timer.timeit(3).mean, 1e-7)
    number = max(1, int(2e-3 / one))
    blocks = max(3, min(blocks, int(budget_s / (one * number))))
    times = [timer.timeit(number).mean for _ in range(blocks)]
    out = _summary(times)
    out["calls_per_block"] = number
    return out


def time_once(fn, inputs, device):
    """One call, no warm-up (smoke tests: does every impl run?)."""
    synchronize(device)
    t = time.perf_counter()
    fn(inputs[0])
    synchronize(device)
    return _summary([time.perf_counter() - t])


def time_impl(fn, inputs, device, quick=False, threads=None, once=False):
    if once:
        return time_once(fn, inputs, device)
    if device.startswith("cuda"):
        return time_cuda(fn, inputs, warmup=3 if quick else 10, reps=20 if quick else 200,
                         budget_s=0.2 if quick else 1.0)
    return time_cpu(fn, inputs, warmup=1 if quick else 3, blocks=7 if quick else 25, budget_s=0.1 if quick else 1.0,
                    threads=threads)


def measure_copy_bandwidth(device, quick=False):
    """Device copy bandwidth in GB/s (bytes read + bytes written per second), MEASURED with a large tensor copy.

    This is the "limit" every case's GB/s is compared to: a memory-bound kernel cannot beat a plain copy."""
    if device.startswith("cuda"):
        nbytes = (256 << 20) if quick else (1 << 30)
    else:
        nbytes = (64 << 20) if quick else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    fn = lambda x: x[1].copy_(x[0])  # noqa: E731
    inputs = [(src, dst)]
    if device.startswith("cuda"):
        r = time_cuda(fn, inputs, warmup=3, reps=20 if quick else 50, budget_s=2.0)
    else:
        r = time_cpu(fn, inputs, warmup=1, blocks=5 if quick else 10, budget_s=0.5 if quick else 2.0)
    del src, dst
    # the limit is what the device CAN do: the fastest sample (p10 on CUDA, where samples are many) -- a median
    # would let a busy moment lower the limit and show kernels above 100%
    best = r["p10_s"] if device.startswith("cuda") else min(r["p10_s"], r["median_s"])
    return {"copy_gbps": 2 * nbytes / best / 1e9, "copy_bytes": nbytes, "copy_best_s": best,
            "copy_median_s": r["median_s"]}


def wall(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
