#!/usr/bin/env python3
"""Step time of the demo's DDP training step for each gradient hook across a rate-limited network.

Compression only pays when the network is the bottleneck. Each rank runs in its own network namespace, joined to
a bridge (in a namespace of its own) by a veth pair whose two ends are shaped with tc tbf to the link rate (both
directions, like a full-duplex NIC). Gloo talks over those veth addresses (10.200.77.x, made here and nowhere
else). For each rate the ranks train every hook in turn with the same seeds (examples/train_gpt_ddp.py --compare)
and the median step time per hook is reported, with the speedup vs fp32 all-reduce (DDP's built-in), torch's
fp16_compress_hook and PowerSGD.

    sudo python3 benchmarks/netns_bandwidth.py                       # rates 1,2.5,5,10 Gbit/s + unlimited
    sudo python3 benchmarks/netns_bandwidth.py --rates 1,10 --hooks torch-allreduce,int8 --json bw.json --plot bw.png
    sudo python3 benchmarks/netns_bandwidth.py --parallel fsdp      # FSDP2: reduce-scatter kinds, reshard on/off

FSDP2 mode (--parallel fsdp) trains examples/train_gpt_fsdp.py instead: FSDP's own fp32 reduce-scatter (on Gloo an
all-reduce's bytes), its bf16 reduce dtype (MixedPrecisionPolicy(reduce_dtype=bfloat16)), and pyperf.fsdp's fp32 (a
ring reduce-scatter's bytes), bf16, int8+EF and int4+EF, each with reshard_after_forward True and False. FSDP also
all-gathers the parameters (forward, and again in backward when it reshards), which is not compressed; each rank's
interface byte counter (tx_bytes) gives the real bytes of a step, all-gathers included, and with them the speedup
those bytes allow.

Needs root and iproute2 (ip, tc with the tbf qdisc); without them it says so and exits 0. The namespaces are
removed at exit (also on Ctrl-C).
"""
import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "train_gpt_ddp.py")
SUBNET = "10.200.77"
DEFAULT_HOOKS = "torch-allreduce,allreduce,bf16,fp16,int8,int4,fp8,torch-fp16,torch-powersgd"
FSDP_DEMO = os.path.join(ROOT, "examples", "train_gpt_fsdp.py")
FSDP_HOOKS = "torch-reducescatter,torch-bf16-reduce,fp32,bf16,int8,int4"
# The model: many parameters per token so that gradient traffic, not compute, dominates a 1 Gbit/s step.
# DDP buckets of 5 MB (for every hook alike): the last bucket's communication cannot overlap with the backward, so
# with the default 25 MB about half of the gradients' traffic sits after it (measured 2026-11-23 at 1 Gbit/s:
# 25 / 10 / 5 MB gave int8 272 / 263 / 236 ms, fp32 all-reduce 514 / 516 / 513 ms).
MODEL_ARGS = ["--d-model", "512", "--layers", "4", "--heads", "8", "--seq-len", "32", "--batch-size", "2",
              "--data-bytes", str(2 << 20), "--bucket-cap-mb", "5"]


def _run(cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError("%s failed (rc %d): %s" % (" ".join(cmd), r.returncode, (r.stderr or r.stdout).strip()))
    return r


def missing_requirements():
    """None when the benchmark can run here, else why not."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root (creates network namespaces, veth pairs and tc qdiscs)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return "needs iproute2 (`%s` not found): apt-get update && apt-get install -y iproute2" % tool
    return None


class Topology:
    """world_size namespaces, each with one veth into a bridge namespace; every veth end shaped with tbf."""

    def __init__(self, world_size, tag=None):
        self.W = world_size
        self.tag = tag or "pb%d" % (os.getpid() % 100000)
        self.bridge_ns = "%s-br" % self.tag
        self.namespaces = ["%s-r%d" % (self.tag, r) for r in range(world_size)]
        self.rank_if = ["%sr%da" % (self.tag, r) for r in range(world_size)]   # inside rank r's namespace
        self.br_if = ["%sr%db" % (self.tag, r) for r in range(world_size)]     # the bridge's end
        self.addrs = ["%s.%d" % (SUBNET, r + 1) for r in range(world_size)]
        self.up = False

    def create(self):
        if any(len(n) > 15 for n in self.rank_if + self.br_if):
            raise ValueError("interface names too long; use a shorter tag")
        self.up = True  # from here on, destroy() cleans whatever was made
        _run(["ip", "netns", "add", self.bridge_ns])
        _run(["ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.bridge_ns, "link", "set", "br0", "up"])
        for r in range(self.W):
            ns, a, b = self.namespaces[r], self.rank_if[r], self.br_if[r]
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", a, "netns", ns, "type", "veth", "peer", "name", b, "netns", self.bridge_ns])
            _run(["ip", "-n", ns, "addr", "add", "%s/24" % self.addrs[r], "dev", a])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "link", "set", a, "up"])
            _run(["ip", "-n", self.bridge_ns, "link", "set", b, "master", "br0"])
            _run(["ip", "-n", self.bridge_ns, "link", "set", b, "up"])
        return self

    def set_rate(self, gbit):
        """Shape every veth end to `gbit` Gbit/s (None: remove the limit)."""
        for r in range(self.W):
            for ns, dev in ((self.namespaces[r], self.rank_if[r]), (self.bridge_ns, self.br_if[r])):
                if gbit is None:
                    _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
                    continue
                rate_bps = gbit * 1e9
                burst = max(64 * 1024, int(rate_bps / 8 * 0.002))  # ~2 ms of traffic, at least 64 kB
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                      "rate", "%dkbit" % int(rate_bps / 1e3), "burst", str(burst), "latency", "50ms"])

    def exec_prefix(self, rank):
        return ["ip", "netns", "exec", self.namespaces[rank]]

    def destroy(self):
        if not self.up:
            return
        for ns in self.namespaces + [self.bridge_ns]:
            _run(["ip", "netns", "del", ns], check=False)  # deleting a namespace deletes its veth ends
        self.up = False

    def exists(self):
        out = _run(["ip", "netns", "list"], check=False).stdout
        names = {line.split()[0] for line in out.splitlines() if line.strip()}
        return [ns for ns in self.namespaces + [self.bridge_ns] if ns in names]


def run_rate(topo, hooks, steps, extra, port, timeout, log, demo=DEMO, model_args=None):
    """Launch one process per rank (each inside its namespace) training every hook; returns rank 0's JSON."""
    model_args = MODEL_ARGS if model_args is None else model_args
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    png = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
    procs = []
    for r in range(topo.W):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(topo.W), LOCAL_RANK="0", MASTER_ADDR=topo.addrs[0],
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=topo.rank_if[r], OMP_NUM_THREADS="1")
        # the first model trained in a process pays one-time costs (allocator growth, page faults, lazy init) in
        # every step; a throw-away warm-up run of the first hook keeps that out of the first measured hook
        cmd = topo.exec_prefix(r) + [sys.executable, demo, "--cpu", "--compare", "--hooks",
                                     ",".join(hooks[:1] + hooks),
                                     "--steps", str(steps), "--threads", "1", "--quiet", "--json", out,
                                     "--plot", png] + model_args + extra
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if r else log,
                                      stderr=subprocess.STDOUT, text=True))
    t0 = time.time()
    try:
        for p in procs:
            p.wait(timeout=max(1, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise RuntimeError("ranks did not finish within %d s" % timeout)
    bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if bad:
        msg = procs[bad[0][0]].stdout.read() if bad[0][0] and procs[bad[0][0]].stdout else ""
        raise RuntimeError("rank(s) failed: %s %s" % (bad, msg[-2000:]))
    with open(out) as f:
        doc = json.load(f)
    doc["results"] = doc["results"][1:]  # drop the warm-up run
    os.unlink(out)
    if os.path.exists(png):
        os.unlink(png)
    return doc


def summarize(curve, hooks):
    """Table rows: per rate, per hook: median step ms and speedups vs the baselines that ran."""
    lines = []
    base_names = [b for b in ("torch-allreduce", "torch-fp16", "torch-powersgd", "bf16") if b in hooks]
    head = "%-10s %-16s %10s %9s %12s" % ("link", "hook", "step ms", "best ms", "MB/step") + "".join(
        " %14s" % ("vs " + b) for b in base_names)
    lines.append(head)
    lines.append("-" * len(head))
    for point in curve:
        res = {r["hook"]: r for r in point["results"]}
        for h in hooks:
            if h not in res:
                continue
            r = res[h]
            best = min(r["step_times"][2:] or r["step_times"]) * 1e3
            row = "%-10s %-16s %10.1f %9.1f %12.2f" % (point["label"], h, r["median_step_s"] * 1e3, best,
                                                 r["bytes_per_step"] / 1e6 if r["bytes_per_step"] == r["bytes_per_step"]
                                                 else float("nan"))
            for b in base_names:
                row += " %13.2fx" % (res[b]["median_step_s"] / r["median_step_s"]) if b in res else " %14s" % "-"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def plot(path, curve, hooks, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    limited = [p for p in curve if p["gbit"] is not None]
    xs = [p["gbit"] for p in limited]
    unl = [p for p in curve if p["gbit"] is None]
    x_unl = (max(xs) if xs else 1.0) * 3
    if unl:  # the unshaped veth, drawn to the right of the fastest rate
        limited = limited + unl[:1]
        xs = xs + [x_unl]
    for h in hooks:
        ys = [next((r["median_step_s"] * 1e3 for r in p["results"] if r["hook"] == h), None) for p in limited]
        style = "--" if h.startswith("torch") else "-"
        ax1.plot(xs, ys, style, marker="o", label=h)
        base = [next((r["median_step_s"] for r in p["results"] if r["hook"] == "torch-allreduce"), None)
                for p in limited]
        sp = [b / (y / 1e3) if b and y else None for b, y in zip(base, ys)]
        ax2.plot(xs, sp, style, marker="o", label=h)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ticks = [p["gbit"] for p in curve if p["gbit"] is not None]
        labels = ["%g" % t for t in ticks]
        if unl:
            ticks, labels = ticks + [x_unl], labels + ["no limit"]
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels)
        ax.minorticks_off()
        ax.set_xlabel("link rate per rank (Gbit/s, tc tbf on veth)")
        ax.grid(alpha=0.3, which="both")
    ax1.set_ylabel("median step time (ms)")
    ax1.set_yscale("log")
    ax2.set_ylabel("speedup vs DDP fp32 all-reduce (x)")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.legend(fontsize=7)
    fig.suptitle("DDP step time vs link rate | %s" % meta, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- FSDP2 mode ---------------------------------------------------------------------------------------------------
FSDP_MODEL_ARGS = MODEL_ARGS[:MODEL_ARGS.index("--bucket-cap-mb")]      # the same model; FSDP has no buckets


def _fsdp_key(r):
    return "%s/%s%s" % (r["hook"], "reshard" if r["reshard_after_forward"] else "keep",
                        "+pyAG" if r.get("all_gather") == "pyperf" else "")


def _groups(results):
    """(reshard_after_forward, all_gather) settings present, in run order."""
    seen = []
    for r in results:
        k = (r["reshard_after_forward"], r.get("all_gather", "fsdp"))
        if k not in seen:
            seen.append(k)
    return seen


def summarize_fsdp(curve, hooks):
    """Per rate and reshard setting: step time, bytes (reduce-scatter from the state or FSDP's layout; all-gathers
    from the layout; the interface's tx bytes measured), speedups vs FSDP's fp32 and bf16-reduce-dtype
    reduce-scatters, the speedup the measured bytes allow, and the final loss against FSDP's default. The baselines
    are those of the same reshard and all-gather setting (+pyAG: pyperf.fsdp.register_all_gather in every run of the
    group, baselines included); "vs stock" is against FSDP's fp32 reduce-scatter with FSDP's own all-gathers."""
    lines = []
    head = "%-10s %-32s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %10s %8s" % (
        "link", "config", "step ms", "RS MB", "wire MB", "vs fp32", "allowed", "achieved", "vs bf16", "allowed",
        "achieved", "vs stock", "final loss", "vs fp32")
    lines += [head, "-" * len(head)]
    for point in curve:
        for reshard, ag in _groups(point["results"]):
            res = {r["hook"]: r for r in point["results"]
                   if r["reshard_after_forward"] == reshard and r.get("all_gather", "fsdp") == ag}
            stock = next((r for r in point["results"] if r["reshard_after_forward"] == reshard and
                          r.get("all_gather", "fsdp") == "fsdp" and r["hook"] == "torch-reducescatter"), None)
            b32, b16 = res.get("torch-reducescatter"), res.get("torch-bf16-reduce")
            for h in hooks:
                r = res.get(h)
                if r is None:
                    continue
                row = "%-10s %-26s %8.1f %8.2f %8.2f" % (point["label"], _fsdp_key(r), r["median_step_s"] * 1e3,
                                                         r["bytes_per_step"] / 1e6, r["wire_bytes_per_step"] / 1e6)
                for b in (b32, b16):
                    if b is None:
                        row += " %8s %8s %8s" % ("-", "-", "-")
                        continue
                    sp = b["median_step_s"] / r["median_step_s"]
                    allowed = b["wire_bytes_per_step"] / r["wire_bytes_per_step"]
                    row += " %7.2fx %7.2fx" % (sp, allowed)
                    row += " %7.0f%%" % (100 * sp / allowed) if allowed == allowed else " %8s" % "-"
                row += " %7.2fx" % (stock["median_step_s"] / r["median_step_s"]) if stock else " %8s" % "-"
                ref = b32["final_loss"] if b32 else float("nan")
                row += " %10.4f %+7.2f%%" % (r["final_loss"], 100 * (r["final_loss"] / ref - 1))
                lines.append(row)
            lines.append("")
    return "\n".join(lines)


def plot_fsdp(path, curve, hooks, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    limited = [p for p in curve if p["gbit"] is not None]
    xs = [p["gbit"] for p in limited]
    unl = [p for p in curve if p["gbit"] is None]
    x_unl = (max(xs) if xs else 1.0) * 3
    pts = limited + unl[:1]
    xs = xs + ([x_unl] if unl else [])
    ags = []
    for p in pts:
        for _, ag in _groups(p["results"]):
            if ag not in ags:
                ags.append(ag)
    for ax, reshard in zip(axes, (True, False)):
        for i, h in enumerate(hooks):
            for ag in ags:
                sp = []
                for p in pts:
                    res = {r["hook"]: r for r in p["results"] if r["reshard_after_forward"] == reshard and
                           r.get("all_gather", "fsdp") == ag}
                    stock = {r["hook"]: r for r in p["results"] if r["reshard_after_forward"] == reshard and
                             r.get("all_gather", "fsdp") == "fsdp"}
                    b, r = stock.get("torch-reducescatter"), res.get(h)
                    sp.append(b["median_step_s"] / r["median_step_s"] if b and r else None)
                if any(v is not None for v in sp):
                    ax.plot(xs, sp, "--" if h.startswith("torch") else "-", marker="o" if ag == "fsdp" else "s",
                            color="C%d" % i, alpha=1.0 if ag == "fsdp" else 0.6,
                            label=h + (" +pyperf all-gather" if ag == "pyperf" else ""))
        ax.set_xscale("log")
        ticks = [p["gbit"] for p in limited] + ([x_unl] if unl else [])
        ax.set_xticks(ticks)
        ax.set_xticklabels(["%g" % t for t in ticks[:len(limited)]] + (["no limit"] if unl else []))
        ax.minorticks_off()
        ax.axhline(1.0, color="k", lw=0.8)
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("link rate per rank (Gbit/s, tc tbf on veth)")
        ax.set_ylabel("speedup vs FSDP's fp32 reduce-scatter (x)")
        ax.set_title("reshard_after_forward=%s" % reshard, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("FSDP2 step time vs link rate | %s" % meta, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="1,2.5,5,10,unlimited", help="Gbit/s per link, comma-separated "
                   "('unlimited' = veth without tc)")
    p.add_argument("--hooks", default=None, help="default: %s (ddp), %s (fsdp)" % (DEFAULT_HOOKS, FSDP_HOOKS))
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"], help="DDP hooks or FSDP2 reduce-scatters")
    p.add_argument("--reshard", default="true,false", help="fsdp: reshard_after_forward settings to run")
    p.add_argument("--all-gather", default="fsdp", help="fsdp: all-gather settings to run (fsdp, pyperf or both: "
                   "pyperf = pyperf.fsdp.register_all_gather in every run of that launch, baselines included)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="steps per hook (median of all but the first 2)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per rate")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--check", action="store_true", help="only build the topology, test it, tear it down")
    args, extra = p.parse_known_args(argv)  # anything else goes to the demo (e.g. --d-model 256)
    why = missing_requirements()
    if why:
        print("netns_bandwidth: skipped: %s" % why)
        return 0
    fsdp = args.parallel == "fsdp"
    hooks = (args.hooks or (FSDP_HOOKS if fsdp else DEFAULT_HOOKS)).split(",")
    reshards = [v.strip().lower() in ("1", "true", "yes") for v in args.reshard.split(",")]
    rates = [None if r.strip() in ("unlimited", "none", "0") else float(r) for r in args.rates.split(",")]
    topo = Topology(args.world_size)
    atexit.register(topo.destroy)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))
    try:
        topo.create()
    except Exception as e:
        topo.destroy()
        print("netns_bandwidth: skipped: could not build the namespaces (%s)" % e)
        return 0
    try:
        if args.check:
            print("topology up: %s" % ", ".join("%s=%s" % (n, a) for n, a in zip(topo.namespaces, topo.addrs)))
            return 0
        import platform
        import torch
        meta = "%d ranks, 1 CPU thread each, torch %s, %s" % (args.world_size, torch.__version__,
                                                              time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        model_args = FSDP_MODEL_ARGS if fsdp else MODEL_ARGS
        print("netns_bandwidth: %s%s, model %s, hooks %s" % ("FSDP2, " if fsdp else "", meta,
                                                            " ".join(model_args + extra), ",".join(hooks)), flush=True)
        curve = []
        for i, rate in enumerate(rates):
            topo.set_rate(rate)
            label = "%gG" % rate if rate is not None else "unlimited"
            load0 = os.getloadavg()[0]
            print("== link %s == (load average %.1f on %d CPUs: timings on a busy machine are noisy)"
                  % (label, load0, os.cpu_count()), flush=True)
            t0 = time.time()
            if fsdp:
                results = []
                settings = [(rs, ag) for ag in args.all_gather.split(",") for rs in reshards]
                for j, (reshard, ag) in enumerate(settings):
                    flag = "--reshard-after-forward" if reshard else "--no-reshard-after-forward"
                    doc = run_rate(topo, hooks, args.steps, extra + [flag, "--all-gather", ag],
                                   29500 + 8 * i + j, args.timeout, sys.stdout, demo=FSDP_DEMO,
                                   model_args=model_args)
                    results += doc["results"]
            else:
                results = run_rate(topo, hooks, args.steps, extra, 29500 + i, args.timeout, sys.stdout)["results"]
            curve.append({"gbit": rate, "label": label, "results": results, "wall_s": time.time() - t0,
                          "loadavg_1m_before": load0, "loadavg_1m": os.getloadavg()[0]})
            print((summarize_fsdp if fsdp else summarize)(curve[-1:], hooks), flush=True)
        print("\nstep time vs link rate (median of steps after the first 2; speedup = baseline step / this step)")
        if fsdp:
            print("allowed = the baseline's measured interface bytes per step / this config's (all-gathers "
                  "included): the speedup if time were bytes; achieved = speedup / allowed")
        print((summarize_fsdp if fsdp else summarize)(curve, hooks))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "machine": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "model_args": model_args + extra, "steps": args.steps,
                           "parallel": args.parallel, "curve": curve}, f, indent=1)
            print("wrote", args.json)
        if args.plot:
            (plot_fsdp if fsdp else plot)(args.plot, curve, hooks, meta)
            print("wrote", args.plot)
    finally:
        topo.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
