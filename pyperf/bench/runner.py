"""Finds the benchmark cases (benchmarks/bench_X.py in the source tree) and runs every impl of every case.

An impl that raises (torch.compile unavailable, an op not built for this device, out of memory) is recorded as
skipped with the reason; it never stops the run.
"""
import gc
import importlib.util
import inspect
import os
import traceback

import torch

from pyperf.bench import timing
from pyperf.bench.case import Case
from pyperf.bench.env import source_root
from pyperf.bench.progress import Progress

GROUPS = {
    "pack": ["bench_pack"],
    "quant": ["bench_quant"],
    "hooks": ["bench_hooks"],
    "layers": ["bench_norm", "bench_activation"],
    "checkpoint": ["bench_checkpoint"],
}
ALL = ["pack", "quant", "hooks", "layers", "checkpoint"]


class NoBenchmarks(RuntimeError):
    pass


def benchmarks_dir():
    """benchmarks/ next to the package (source tree), or $PYPERF_BENCH_DIR."""
    env = os.environ.get("PYPERF_BENCH_DIR")
    if env:
        return env
    root = source_root()
    if root is None or not os.path.isdir(os.path.join(root, "benchmarks")):
        raise NoBenchmarks(
            "pyperf-bench: the benchmark cases live in benchmarks/bench_X.py of the pyperf source tree, and this "
            "pyperf is installed without it. Run from a source checkout (git clone ... && pip install "
            "--no-build-isolation -e .), or point PYPERF_BENCH_DIR at a checkout's benchmarks/ folder.")
    return os.path.join(root, "benchmarks")


def resolve(targets):
    """Group names / file paths -> list of (group, module path or None, reason if missing)."""
    out = []
    for t in targets:
        if t.endswith(".py"):
            out.append((os.path.splitext(os.path.basename(t))[0].replace("bench_", ""), t))
            continue
        names = ALL if t == "all" else [t]
        for g in names:
            if g not in GROUPS:
                raise SystemExit("pyperf-bench: unknown group %r (choose from %s, all, or a path to a "
                                 "bench_X.py file)" % (g, ", ".join(ALL)))
            d = benchmarks_dir()
            for mod in GROUPS[g]:
                out.append((g, os.path.join(d, mod + ".py")))
    return out


def load_module(path):
    name = "pyperf_bench_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def collect(targets, device, dtype, quick, sizes=None, name_filter=None):
    """-> (cases, problems): problems are (group, module, reason) for modules that are missing or fail."""
    cases, problems = [], []
    for group, path in resolve(targets):
        if not os.path.exists(path):
            problems.append((group, os.path.basename(path), "not found: %s" % path))
            continue
        try:
            mod = load_module(path)
            kwargs = {}
            params = inspect.signature(mod.cases).parameters
            # a module whose cases() has a dtype default gets it when no --dtype was asked for
            dparam = params.get("dtype")
            call_dtype = () if dtype is None and dparam is not None and dparam.default is not inspect.Parameter.empty \
                else (dtype,)
            if sizes is not None:
                if "sizes" in params:
                    kwargs["sizes"] = sizes
                else:
                    problems.append((group, os.path.basename(path), "--sizes ignored: this module's cases() has "
                                     "no `sizes` parameter"))
            if call_dtype:
                got = list(mod.cases(device, *call_dtype, quick=quick, **kwargs))
            else:
                got = list(mod.cases(device, quick=quick, **kwargs))
        except Exception as e:
            problems.append((group, os.path.basename(path), "%s: %s" % (type(e).__name__, e)))
            continue
        for c in got:
            if not isinstance(c, Case):
                problems.append((group, os.path.basename(path), "cases() returned %r, not a Case" % type(c)))
                continue
            if name_filter and name_filter not in c.name:
                continue
            cases.append(c)
    return cases, problems


def _short_reason(e):
    msg = str(e).strip().splitlines()
    return "%s: %s" % (type(e).__name__, msg[0][:200] if msg else "")


def run_case(case, device, limit_gbps, quick=False, threads=None, llc=None, progress=None, once=False, skip=()):
    """All impls of one case -> list of records (one per impl). Impls whose name contains a `skip` pattern are
    recorded as skipped without running."""
    records = []
    base = {"group": case.group, "case": case.name, "bytes": int(case.bytes), "extra": dict(case.extra)}
    try:
        first = case.setup()
        n_sets = timing.rotation_count(case.bytes, llc) if case.rotate and not once else 1
        inputs = [first] + [case.setup() for _ in range(n_sets - 1)]
    except Exception as e:
        for impl in case.impls:
            records.append(dict(base, impl=impl, status="skipped", reason="setup failed: " + _short_reason(e)))
            if progress:
                progress.update("%s | %s skipped" % (case.name, impl))
        return records
    for impl, fn in case.impls.items():
        rec = dict(base, impl=impl, rotation_sets=len(inputs))
        pat = next((p for p in skip if p and p in impl), None)
        if pat is not None:
            rec.update(status="skipped", reason="excluded by --skip-impl %s" % pat)
            records.append(rec)
            if progress:
                progress.update("%s | %s excluded" % (case.name, impl))
            continue
        try:
            r = timing.time_impl(fn, inputs, device, quick=quick, threads=threads, once=once)
            rec.update(r)
            rec["status"] = "ok"
            rec["reason"] = ""
            if case.bytes and r["median_s"] > 0:
                rec["gbps"] = case.bytes / r["median_s"] / 1e9
                rec["pct_of_limit"] = 100.0 * rec["gbps"] / limit_gbps if limit_gbps else None
            if case.measure is not None:
                rec["metrics"] = dict(case.measure(impl, inputs[0]) or {})
        except Exception as e:
            rec.update(status="skipped", reason=_short_reason(e))
            if os.environ.get("PYPERF_BENCH_TRACEBACK"):
                traceback.print_exc()
        records.append(rec)
        if progress:
            progress.update("%s | %s %s" % (case.name, impl, "" if rec["status"] == "ok" else "skipped"))
    # speedups against the case's baseline, when both ran
    bname = case.baseline_name()
    bt = next((r.get("median_s") for r in records if r["impl"] == bname and r["status"] == "ok"), None)
    for r in records:
        r["baseline"] = bname
        if r["status"] == "ok" and bt:
            r["speedup"] = bt / r["median_s"]
    del inputs
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return records


def run(cases, device, limit_gbps, quick=False, threads=None, show_progress=True, once=False, skip=()):
    llc = timing.cache_bytes(device)
    total = sum(len(c.impls) for c in cases)
    prog = Progress(total, label="pyperf-bench ", enabled=show_progress)
    records = []
    for c in cases:
        records.extend(run_case(c, device, limit_gbps, quick=quick, threads=threads, llc=llc, progress=prog,
                                once=once, skip=skip))
    prog.close()
    return records
