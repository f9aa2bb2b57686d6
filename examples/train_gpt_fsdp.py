#!/usr/bin/env python3
"""Train the demo GPT with FSDP2 (`fully_shard` per block and on the root) and pyperf's compressed gradient
reduce-scatter (pyperf.fsdp), on the same data and schedule as examples/train_gpt_ddp.py.

    python examples/train_gpt_fsdp.py                        # CPU, Gloo, 2 ranks it spawns itself, FSDP's default
    python examples/train_gpt_fsdp.py --hook int8            # int8 + error feedback reduce-scatter
    python examples/train_gpt_fsdp.py --compare              # every kind + torch's, same seeds: loss / bytes / time
    python examples/train_gpt_fsdp.py --hook int8 --no-reshard-after-forward --param-dtype bf16
    torchrun --nproc-per-node 8 examples/train_gpt_fsdp.py --hook int8     # GPUs, NCCL

Hooks: torch-reducescatter (FSDP's own, in the reduce dtype: fp32 by default), torch-bf16-reduce (FSDP's own with
MixedPrecisionPolicy(reduce_dtype=bfloat16)), and pyperf.fsdp's kinds: fp32 (uncompressed, deterministic), bf16,
fp16, int8, int4, fp8 (the quantized ones with error feedback).
"""
import argparse
import importlib.util
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if os.path.exists(os.path.join(_ROOT, "pyperf", "__init__.py")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _ddp_demo():
    """The DDP demo's data, model, schedule and reporting (one copy of each)."""
    spec = importlib.util.spec_from_file_location("train_gpt_ddp", os.path.join(_HERE, "train_gpt_ddp.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


base = _ddp_demo()

HOOKS = ["fp32", "bf16", "fp16", "int8", "int4", "fp8"]
TORCH_HOOKS = ["torch-reducescatter", "torch-bf16-reduce"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tx_bytes():
    """Bytes this rank's network interface has sent (GLOO_SOCKET_IFNAME, as the netns benchmark sets it), or None:
    the real traffic of a step, FSDP's all-gathers and the protocol's overhead included."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    if not ifname:
        return None
    try:
        with open("/sys/class/net/%s/statistics/tx_bytes" % ifname) as f:
            return int(f.read())
    except OSError:
        return None


def shard(model, args, hook):
    """fully_shard every block, then the root (embeddings, final norm, tied head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    reduce_dtype = torch.bfloat16 if hook == "torch-bf16-reduce" else _DTYPES[args.reduce_dtype]
    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[args.param_dtype], reduce_dtype=reduce_dtype)
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=args.reshard_after_forward, mp_policy=mp)
    fully_shard(model, reshard_after_forward=args.reshard_after_forward, mp_policy=mp)
    return model


def register(model, hook, args):
    if hook in TORCH_HOOKS:
        return None
    import pyperf.fsdp
    if hook in ("int8", "int4", "fp8"):
        return pyperf.fsdp.register(model, hook, seed=args.seed, start_iter=base.start_iter(args))
    return pyperf.fsdp.register(model, hook)


def traffic(model, world, reduce_bytes_per_elem):
    """Bytes per step a rank sends for FSDP's collectives, from the layout: the parameter all-gathers (forward,
    and again in backward for modules resharded after forward: FSDP never reshards the root) and a reduce-scatter
    of `reduce_bytes_per_elem` bytes per gradient element. Read after the first step (the root is known then)."""
    from torch.distributed.fsdp import FSDPModule
    ag = rs = 0.0
    f = (world - 1) / world
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        st = m._get_fsdp_state()
        groups = getattr(st, "_fsdp_param_groups", None) or [st._fsdp_param_group]
        for g in groups:
            if g is None:
                continue
            n = sum(torch.Size(fp.padded_sharded_param_size).numel() * world for fp in g.fsdp_params)
            pdt = g.mp_policy.param_dtype or g.fsdp_params[0].orig_dtype
            gathers = 1 + (1 if g.post_forward_mesh_info is not None else 0)
            ag += f * n * torch.finfo(pdt).bits / 8 * gathers
            rs += f * n * reduce_bytes_per_elem
    return ag, rs


def train(args, hook, rank, world, device, corpus):
    torch.manual_seed(args.seed)
    model = shard(base.build_model(args).to(device), args, hook)
    state = register(model, hook, args)
    if args.all_gather == "pyperf":
        import pyperf.fsdp
        pyperf.fsdp.register_all_gather(model)
    opt = base.make_optimizer(model, args)
    data = base.Batches(corpus, args.seq_len, args.batch_size, rank, world, args.seed)
    tokens_per_step = args.batch_size * args.seq_len * world
    losses, times, sent_steps, wire_steps = [], [], [], []
    bar = base.Bar(args.steps, "%-19s" % hook, rank == 0 and not args.quiet)
    log_every = args.log_every or max(1, args.steps // 15)
    prev = state.stats.bytes_sent if state is not None else 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = base.lr_at(step, args)
        x, y = [t.to(device, non_blocking=True) for t in data.next()]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tx0 = tx_bytes()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        tx1 = tx_bytes()
        wire_steps.append(tx1 - tx0 if tx0 is not None and tx1 is not None else float("nan"))
        if state is not None:
            sent_steps.append(state.stats.bytes_sent - prev)
            prev = state.stats.bytes_sent
        lv = loss.item()
        losses.append(lv)
        times.append(dt)
        if rank == 0 and not args.quiet and ((step + 1) % log_every == 0 or step == 0 or step + 1 == args.steps):
            bar.log("%-19s step %4d/%d  loss %.4f  %7.1f ms  %8.0f tok/s" % (hook, step + 1, args.steps, lv,
                                                                             dt * 1e3, tokens_per_step / dt))
        bar.draw(step + 1, "loss %.3f" % lv)
    bar.close()
    skip = min(2, max(0, len(times) - 1))   # the first steps pay FSDP's lazy init and allocator growth
    med = sorted(times[skip:])[len(times[skip:]) // 2] if times else float("nan")
    reduce_elem = 2 if hook == "torch-bf16-reduce" else torch.finfo(_DTYPES[args.reduce_dtype]).bits / 8
    ag, rs_default = traffic(model, world, reduce_elem)
    _, fp32_rs = traffic(model, world, 4)
    steady = sent_steps[skip:]
    rs = sorted(steady)[len(steady) // 2] if steady else rs_default
    wire = [w for w in wire_steps[skip:] if w == w]
    tail = losses[-max(1, min(10, len(losses) // 5)):]
    return {"hook": hook, "losses": losses, "step_times": times, "median_step_s": med,
            "tokens_per_s": tokens_per_step / med if med == med and med > 0 else float("nan"),
            "bytes_per_step": rs, "fp32_bytes_per_step": fp32_rs, "allgather_bytes_per_step": ag,
            "total_bytes_per_step": ag + rs,
            "wire_bytes_per_step": sorted(wire)[len(wire) // 2] if wire else float("nan"),
            "final_loss": sum(tail) / len(tail) if tail else float("nan"),
            "params": sum(p.numel() for p in model.parameters()), "world_size": world,
            "reshard_after_forward": args.reshard_after_forward, "all_gather": args.all_gather,
            "param_dtype": args.param_dtype,
            "reduce_dtype": "bf16" if hook == "torch-bf16-reduce" else args.reduce_dtype,
            "stats": base._jsonable(state.stats.as_dict()) if state is not None else {}}


def compare_table(results):
    base_r = next((r for r in results if r["hook"] == "torch-reducescatter"), results[0])
    lines = ["%-19s %11s %10s %12s %8s %13s %11s %10s" % ("hook", "final loss", "vs default", "RS bytes/step",
                                                         "vs fp32", "+all-gathers", "step time", "tok/s")]
    for r in results:
        lines.append("%-19s %11.4f %+10.4f %12s %7.3fx %13s %8.1f ms %10.0f" % (
            r["hook"], r["final_loss"], r["final_loss"] - base_r["final_loss"], base.fmt_bytes(r["bytes_per_step"]),
            r["bytes_per_step"] / r["fp32_bytes_per_step"], base.fmt_bytes(r["total_bytes_per_step"]),
            r["median_step_s"] * 1e3, r["tokens_per_s"]))
    lines.append("final loss = mean of the last steps' losses (rank 0's batches); RS bytes = the gradient "
                 "reduce-scatter per rank per step; vs fp32 = against FSDP's fp32 reduce-scatter; +all-gathers = "
                 "with FSDP's parameter all-gathers (not compressed)")
    return "\n".join(lines)


def worker(rank, world, args, device):
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    corpus = base.load_corpus(args.data_bytes)
    if rank == 0 and not args.quiet:
        print("GPT d=%d layers=%d heads=%d seq=%d batch=%dx%d ranks | FSDP2 reshard_after_forward=%s param %s "
              "reduce %s all-gather %s | %s, %s, %d thread(s)/rank" % (
                  args.d_model, args.layers, args.heads, args.seq_len, args.batch_size, world,
                  args.reshard_after_forward, args.param_dtype, args.reduce_dtype, args.all_gather, device.type,
                  dist.get_backend(), threads), flush=True)
    hooks = args.hooks.split(",") if args.compare else [args.hook]
    results = []
    for h in hooks:
        results.append(train(args, h, rank, world, device, corpus))
        dist.barrier()
    if rank == 0:
        if args.compare:
            print()
            print(compare_table(results))
            base.plot_losses(args.plot, results, args)
            print("wrote", args.plot)
        elif not args.quiet:
            r = results[0]
            print("done: final loss %.4f, median step %.1f ms, %.0f tok/s, reduce-scatter %s/step (%.3fx of fp32)"
                  % (r["final_loss"], r["median_step_s"] * 1e3, r["tokens_per_s"], base.fmt_bytes(r["bytes_per_step"]),
                     r["bytes_per_step"] / r["fp32_bytes_per_step"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "device": str(device), "backend": dist.get_backend(),
                           "threads": threads, "torch": torch.__version__, "parallel": "fsdp",
                           "results": results}, f, indent=1)
    return results


def _spawned(rank, world, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, args, torch.device("cpu"))
    finally:
        base._teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)      # see train_gpt_ddp.py: no interpreter finalization after a clean teardown


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", default="torch-reducescatter", choices=TORCH_HOOKS + HOOKS,
                   help="gradient reduce-scatter: pyperf.fsdp kinds, or FSDP's own (torch-*)")
    p.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="fully_shard(reshard_after_forward=): free the parameters after forward and all-gather "
                   "them again in backward")
    p.add_argument("--all-gather", default="fsdp", choices=["fsdp", "pyperf"],
                   help="FSDP's parameter all-gathers: FSDP's own, or pyperf.fsdp.register_all_gather's (on Gloo "
                        "1 MB point-to-point messages, prefetches overlapped; the same bytes), for every hook")
    p.add_argument("--param-dtype", default="fp32", choices=sorted(_DTYPES), help="MixedPrecisionPolicy param_dtype")
    p.add_argument("--reduce-dtype", default="fp32", choices=sorted(_DTYPES),
                   help="MixedPrecisionPolicy reduce_dtype (torch-bf16-reduce forces bf16)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--checkpoint", default="none", choices=["none", "selective", "full"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--world-size", type=int, default=2, help="ranks to spawn on CPU (ignored under torchrun)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--start-iter", type=int, default=-1, help="int8/int4/fp8: FSDP's own reduce-scatter for the "
                   "first N steps (default -1: twice the LR warm-up, steps/10)")
    p.add_argument("--data-bytes", type=int, default=8 << 20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="train every hook in --hooks with the same seeds")
    p.add_argument("--hooks", default=",".join(TORCH_HOOKS + HOOKS), help="hooks for --compare")
    p.add_argument("--plot", default="loss_curves_fsdp.png")
    p.add_argument("--json", default=None)
    p.add_argument("--cpu", action="store_true", help="under torchrun: CPU + Gloo even when GPUs are present")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.compare:
        bad = [h for h in args.hooks.split(",") if h not in TORCH_HOOKS + HOOKS]
        if bad:
            p.error("--hooks: unknown %s (choose from %s)" % (", ".join(bad), ", ".join(TORCH_HOOKS + HOOKS)))
    if args.d_model % args.heads:
        p.error("--d-model must be a multiple of --heads")
    # the fields the DDP demo's shared helpers read
    args.bucket_cap_mb, args.stop_at, args.save, args.resume = 0.0, None, None, None
    return args


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available() and not args.cpu:
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        try:
            worker(rank, world, args, device)
        finally:
            base._teardown()
        return 0
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.world_size, args, port), nprocs=args.world_size, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
