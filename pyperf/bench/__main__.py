"""pyperf-bench: kernel microbenchmarks, pyperf against the baselines a user would pick instead, in the same run.

    pyperf-bench [pack|quant|hooks|layers|checkpoint|all|path/bench_X.py ...] [--device cpu|cuda]
                 [--dtype fp32|bf16|fp16] [--sizes 1M,16M] [--quick] [--json F] [--csv F] [--plot F.png]
                 [--compare OLD.json]
"""
import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def parse_size(s):
    s = s.strip().upper()
    mult = 1
    for suf, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if s.endswith(suf):
            s, mult = s[:-1], m
            break
    return int(float(s) * mult)


def build_parser():
    p = argparse.ArgumentParser(prog="pyperf-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", default=["all"],
                   help="groups (pack, quant, hooks, layers, checkpoint, all) or paths to bench_X.py files")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="dtype passed to the cases (default: "
                   "each case's own choice)")
    p.add_argument("--sizes", default=None, help="comma-separated element counts, e.g. 1M,16M (cases that "
                   "accept sizes)")
    p.add_argument("--filter", default=None, help="only cases whose name contains this")
    p.add_argument("--quick", action="store_true", help="small sizes and short timing (smoke test)")
    p.add_argument("--once", action="store_true", help="call every impl once, untimed warm-up-free (a smoke test "
                   "that every case runs; the figures mean nothing)")
    p.add_argument("--skip-impl", default="", help="comma-separated substrings: impls whose name contains one "
                   "are reported as skipped without running (e.g. compile)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write all records (with the environment) to this JSON file")
    p.add_argument("--csv", default=None, help="write all records (with the environment) to this CSV file")
    p.add_argument("--plot", default=None, help="write a PNG: speedup and %% of limit per case")
    p.add_argument("--compare", default=None, help="a JSON file from an earlier run: print new/old time ratios")
    p.add_argument("--threshold", type=float, default=0.10, help="--compare flags a regression beyond this "
                   "fraction slower (default 0.10)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 when --compare finds a regression")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from pyperf.bench import report, runner, timing
    from pyperf.bench.env import environment

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("pyperf-bench: --device %s but torch sees no CUDA device" % device, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else None
    sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else None

    try:
        cases, problems = runner.collect(args.targets, device, dtype, args.quick, sizes=sizes,
                                         name_filter=args.filter)
    except runner.NoBenchmarks as e:
        print(e, file=sys.stderr)
        return 2
    for g, m, why in problems:
        print("pyperf-bench: %s (%s): %s" % (g, m, why), file=sys.stderr)
    if not cases:
        print("pyperf-bench: no cases to run", file=sys.stderr)
        return 1 if problems else 0

    env = environment(device, torch.get_num_threads())
    print("pyperf-bench on %s | torch %s%s | pyperf %s | git %s | %d threads | %s" % (
        env["device_name"], env["torch"], (" CUDA " + env["cuda"]) if env["cuda"] else "", env["pyperf"],
        env["git_sha"] or "?", env["threads"], env["date"]))
    limit = timing.measure_copy_bandwidth(device, quick=args.quick or args.once)
    print("measured copy bandwidth: %.1f GB/s (fastest samples of a %d MiB tensor copy, read+write)" % (
        limit["copy_gbps"], limit["copy_bytes"] >> 20))
    print("%d cases, %d timings%s" % (len(cases), sum(len(c.impls) for c in cases),
                                       " (quick)" if args.quick else ""), flush=True)

    records = runner.run(cases, device, limit["copy_gbps"], quick=args.quick, threads=args.threads,
                         show_progress=not args.no_progress, once=args.once,
                         skip=[x for x in args.skip_impl.split(",") if x])
    print()
    print(report.table(records, limit["copy_gbps"]))
    skipped = [r for r in records if r["status"] != "ok"]
    if skipped:
        print("\n%d impl(s) skipped (reason in the table and the JSON)" % len(skipped))
    if args.json:
        report.write_json(args.json, records, env, limit, problems)
        print("wrote", args.json)
    if args.csv:
        report.write_csv(args.csv, records, env, limit)
        print("wrote", args.csv)
    if args.plot:
        report.plot(args.plot, records, env, limit["copy_gbps"])
        print("wrote", args.plot)
    rc = 0
    if args.compare:
        text, n_reg = report.compare(records, args.compare, threshold=args.threshold)
        print()
        print(text)
        if n_reg and args.fail_on_regression:
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
