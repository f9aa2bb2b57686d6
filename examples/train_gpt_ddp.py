#!/usr/bin/env python3
"""Train a small GPT with DistributedDataParallel and pyperf's gradient compression hooks, fused layers and
activation checkpointing, on text that ships with Python itself (the standard library's .py files, byte tokens).

    python examples/train_gpt_ddp.py                       # CPU, Gloo, 2 ranks it spawns itself
    python examples/train_gpt_ddp.py --hook int8           # int8 + error feedback quantized all-reduce
    python examples/train_gpt_ddp.py --compare             # every hook, same seeds: loss / bytes / step time
    python examples/train_gpt_ddp.py --steps 40 --save ck.pt && python examples/train_gpt_ddp.py --resume ck.pt
    torchrun --nproc-per-node 8 examples/train_gpt_ddp.py --hook int8   # GPUs, NCCL

Resuming (--resume) restores the model, optimizer, every rank's hook state (error-feedback residuals, counters),
the data position, the step and the RNG: the continued run is bit-identical to an uninterrupted one.
"""
import argparse
import gc
import json
import math
import os
import socket
import sys
import sysconfig
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# Running from a source checkout without installing: use the checkout's in-place build.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.exists(os.path.join(_ROOT, "pyperf", "__init__.py")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

HOOKS = ["allreduce", "bf16", "fp16", "int8", "int4", "fp8"]
# torch's own: DDP's built-in fp32 all-reduce (no hook) and its fp16 / PowerSGD hooks, the baselines to beat
TORCH_HOOKS = ["torch-allreduce", "torch-fp16", "torch-powersgd"]


# ----------------------------------------------------------------------------------------------------------- data
def load_corpus(max_bytes):
    """The standard library's .py sources, concatenated in a fixed order: real text, no download."""
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            parts.append(data)
            total += len(data)
            if total >= max_bytes:
                break
        if total >= max_bytes:
            break
    if total < 1 << 16:
        raise SystemExit("could not find the Python standard library sources under %s" % root)
    return torch.frombuffer(bytearray(b"".join(parts)[:max_bytes]), dtype=torch.uint8).to(torch.long)


class Batches:
    """Non-overlapping windows of seq_len+1 bytes in a seeded order; `pos` (windows consumed by all ranks so far)
    is the whole data state, saved in checkpoints."""

    def __init__(self, corpus, seq_len, batch_size, rank, world_size, seed):
        self.corpus, self.T, self.B, self.rank, self.W = corpus, seq_len, batch_size, rank, world_size
        self.n = (len(corpus) - 1) // seq_len
        self.order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        self.pos = 0

    def next(self):
        idx = [(self.pos + self.rank * self.B + j) % self.n for j in range(self.B)]
        self.pos += self.W * self.B
        starts = self.order[idx] * self.T
        rows = torch.stack([self.corpus[s:s + self.T + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


# ---------------------------------------------------------------------------------------------------------- model
def _pyperf_feature(module, what):
    """Imports a pyperf feature, or exits with a message naming the option that needs it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise SystemExit("%s needs %s, which this pyperf build does not have (%s). Rebuild/update pyperf, or run "
                         "without that option." % (what, module, e))


def build_model(args):
    """pyperf's GPT (pyperf.models.gpt): torch layers, or pyperf's fused ones with --fused; blocks wrapped by
    pyperf.checkpoint with --checkpoint selective|full."""
    gpt = _pyperf_feature("pyperf.models.gpt", "the demo's model")
    if args.fused and not gpt.fused_layers_available():
        raise SystemExit("--fused needs pyperf.nn's fused layers (FusedLayerNorm, BiasGeLU, BiasDropoutResidual), "
                         "which this pyperf build does not have; rebuild pyperf or run with --no-fused")
    model = gpt.GPT(gpt.GPTConfig(vocab=256, d_model=args.d_model, n_heads=args.heads, n_layers=args.layers,
                                  seq_len=args.seq_len, dropout=args.dropout, fused=args.fused))
    if args.checkpoint != "none":
        ckpt = _pyperf_feature("pyperf.checkpoint", "--checkpoint %s" % args.checkpoint)
        ckpt.checkpoint_blocks(model, policy=args.checkpoint)
    return model


# ----------------------------------------------------------------------------------------------------------- hooks
class TorchHookState:
    """Bytes accounting for torch's own hooks (estimated from what they send), so tables compare like with like."""

    def __init__(self, kind, params, world_size, psgd_rank=2):
        self.kind = kind
        params = [p for p in params if p.requires_grad]
        self.numel = sum(p.numel() for p in params)
        # PowerSGD all-reduces P (n x r) and Q (m x r) per matrix it compresses, the rest uncompressed
        self.psgd_numel = 0
        for p in params:
            n, m = (p.shape[0], p.numel() // p.shape[0]) if p.dim() > 1 else (1, p.numel())
            small = p.dim() > 1 and psgd_rank * (n + m) * 2 < n * m
            self.psgd_numel += psgd_rank * (n + m) if small else p.numel()
        self.W = world_size
        self.steps = 0
        self.torch_state = None

    @property
    def stats(self):
        ring = 2.0 * (self.W - 1) / self.W
        fp32 = ring * self.numel * 4
        if self.kind == "torch-allreduce":
            sent = fp32
        elif self.kind == "torch-fp16":
            sent = fp32 / 2
        else:
            sent = ring * self.psgd_numel * 4
        return {"bytes_sent": sent * self.steps, "bytes_fp32_ring": fp32 * self.steps, "estimated": True}

    def state_dict(self):
        sd = {"steps": self.steps}
        if self.torch_state is not None:  # PowerSGD's error dict, P/Q memories and iteration count
            sd["powersgd"] = self.torch_state.__getstate__()
        return sd

    def load_state_dict(self, sd):
        self.steps = sd["steps"]
        if self.torch_state is not None:
            self.torch_state.__setstate__(sd["powersgd"])


def register_hook(ddp, kind, world_size, seed, start_iter=0):
    """-> a hook state with .stats (cumulative bytes) and state_dict()/load_state_dict()."""
    if kind in TORCH_HOOKS:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        st = TorchHookState(kind, ddp.parameters(), world_size)
        if kind == "torch-allreduce":
            pass
        elif kind == "torch-fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        else:
            st.torch_state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=2,
                                                         start_powerSGD_iter=2, random_seed=seed)
            ddp.register_comm_hook(st.torch_state, powerSGD_hook.powerSGD_hook)
        return st
    hooks = _pyperf_feature("pyperf.hooks", "--hook %s" % kind)
    if kind in ("int8", "int4", "fp8"):
        return hooks.register(ddp, kind, seed=seed, start_iter=start_iter)
    return hooks.register(ddp, kind)


def stats_dict(state):
    s = state.stats if state is not None else {}
    return s.as_dict() if hasattr(s, "as_dict") else dict(s)


def stat_bytes(state):
    """(bytes sent so far, bytes an fp32 ring all-reduce would have sent) from a hook state's stats."""
    s = stats_dict(state)
    return float(s.get("bytes_sent", float("nan"))), float(s.get("bytes_fp32_ring", s.get("bytes_fp32", "nan")))


# ----------------------------------------------------------------------------------------------------------- train
def warmup_steps(args):
    return max(1, args.steps // 20)


def start_iter(args):
    """Steps sent uncompressed before the quantized hooks start: --start-iter, by default twice the LR warm-up.
    With AdamW, quantization noise while the optimizer's moments are young and the LR reaches its peak can set off
    a loss spike the run never recovers from (docs/hooks.md)."""
    return 2 * warmup_steps(args) if args.start_iter < 0 else args.start_iter


def lr_at(step, args):
    warm = warmup_steps(args)
    if step < warm:
        return args.lr * (step + 1) / warm
    frac = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


class Bar:
    """Rank 0's progress bar on stderr (in place on a terminal, silent otherwise: the log lines say enough)."""

    def __init__(self, total, label, enabled):
        self.total, self.label = max(total, 1), label
        self.enabled = enabled and sys.stderr.isatty()

    def draw(self, done, info=""):
        if self.enabled:
            fill = int(28 * done / self.total)
            sys.stderr.write("\r\033[K%s [%s%s] %d/%d %s" % (self.label, "#" * fill, "." * (28 - fill), done,
                                                             self.total, info))
            sys.stderr.flush()

    def log(self, line):
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        print(line, flush=True)

    def close(self):
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def make_optimizer(model, args):
    """AdamW, fused where torch has it for the device (CPU and CUDA since torch 2.4): one pass over each
    parameter instead of one kernel per elementwise op (4x faster on CPU for the netns benchmark's model)."""
    kw = dict(lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), **kw)


def train(args, hook, rank, world, device, corpus):
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    opt = make_optimizer(model, args)
    data = Batches(corpus, args.seq_len, args.batch_size, rank, world, args.seed)
    start = 0
    ck = None
    if args.resume:
        ck = torch.load(args.resume, map_location="cpu", weights_only=False)
        if ck["world_size"] != world:
            raise SystemExit("--resume %s: saved with %d ranks, running with %d" % (args.resume, ck["world_size"],
                                                                                   world))
        if ck["hook"] != hook:
            raise SystemExit("--resume %s: saved with --hook %s, running with --hook %s" % (args.resume, ck["hook"],
                                                                                            hook))
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        data.pos, start = ck["data_pos"], ck["step"]
    cap = args.bucket_cap_mb
    if hook == "torch-powersgd" and dist.get_backend() == "gloo":
        # torch's PowerSGD hook chains collectives in future callbacks; with several buckets in flight Gloo
        # receives them in different orders on different ranks (pytorch/pytorch#58467). One bucket avoids it.
        cap = max(cap, sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 + 1)
    # gradient_as_bucket_view: the gradients are views of DDP's buckets (no copy into them each step)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              gradient_as_bucket_view=True,
                                              bucket_cap_mb=cap)
    # DDP re-lays out its buckets in gradient-ready order after the first backward. A layout step (plain
    # all-reduce, before the hook is registered, no optimizer step) makes every run -- fresh or resumed -- train
    # with the same layout from its first real step, so blockwise quantization and error feedback line up.
    x0, y0 = [t.to(device) for t in Batches(corpus, args.seq_len, args.batch_size, rank, world, args.seed).next()]
    F.cross_entropy(ddp(x0).flatten(0, 1), y0.flatten()).backward()
    opt.zero_grad(set_to_none=True)
    state = register_hook(ddp, hook, world, args.seed, start_iter(args))
    if ck is not None:
        if state is not None and ck["hook_state"][rank] is not None:
            state.load_state_dict(_to(ck["hook_state"][rank], device))
        torch.set_rng_state(ck["rng"][rank]["cpu"])
        if device.type == "cuda" and ck["rng"][rank].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"][rank]["cuda"], device)

    tokens_per_step = args.batch_size * args.seq_len * world
    losses, times, sent_steps = list(ck.get("losses", [])) if ck else [], [], []
    bar = Bar((args.stop_at or args.steps) - start, "%-14s" % hook, rank == 0 and not args.quiet)
    log_every = args.log_every or max(1, args.steps // 15)
    prev_sent = stat_bytes(state)[0] if state is not None else 0.0
    if isinstance(state, TorchHookState):
        prev_sent = 0.0
    end = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
    for step in range(start, end):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        x, y = [t.to(device, non_blocking=True) for t in data.next()]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if isinstance(state, TorchHookState):
            state.steps += 1
        sent, ref = stat_bytes(state) if state is not None else (float("nan"), float("nan"))
        sent_steps.append(sent - prev_sent)
        prev_sent = sent
        lv = loss.item()
        losses.append(lv)
        times.append(dt)
        if rank == 0 and not args.quiet:
            if (step + 1) % log_every == 0 or step == start or step + 1 == end:
                bar.log("%-14s step %4d/%d  loss %.4f  %7.1f ms  %8.0f tok/s  sent %s/step" % (
                    hook, step + 1, args.steps, lv, dt * 1e3, tokens_per_step / dt, fmt_bytes(sent_steps[-1])))
            bar.draw(step + 1 - start, "loss %.3f" % lv)
    bar.close()

    if args.save:
        hs = _to(state.state_dict(), "cpu") if state is not None else None
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda"
               else None}
        gathered_hs, gathered_rng = [None] * world, [None] * world
        dist.all_gather_object(gathered_hs, hs)
        dist.all_gather_object(gathered_rng, rng)
        if rank == 0:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "hook": hook,
                        "hook_state": gathered_hs, "rng": gathered_rng, "data_pos": data.pos, "step": end,
                        "world_size": world, "losses": losses, "args": vars(args)}, args.save)
            print("saved %s (step %d, data position %d, hook state of %d ranks)" % (args.save, end,
                                                                                    data.pos, world))
        dist.barrier()

    skip = min(2, max(0, len(times) - 1))  # first steps pay one-time costs (allocator, PowerSGD warm-up)
    med = sorted(times[skip:])[len(times[skip:]) // 2] if times else float("nan")
    steady = sent_steps[skip:] or [float("nan")]
    sent_per_step = sorted(steady)[len(steady) // 2]
    fp32_per_step = 2.0 * (world - 1) / world * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    tail = losses[-max(1, min(10, len(losses) // 5)):]
    return {"hook": hook, "losses": losses, "step_times": times, "median_step_s": med,
            "tokens_per_s": tokens_per_step / med if med == med and med > 0 else float("nan"),
            "bytes_per_step": sent_per_step, "fp32_bytes_per_step": fp32_per_step,
            "final_loss": sum(tail) / len(tail) if tail else float("nan"),
            "params": sum(p.numel() for p in model.parameters()), "world_size": world,
            "stats": _jsonable(stats_dict(state))}


def fmt_bytes(b):
    if b != b:
        return "n/a"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= div:
            return "%.2f %s" % (b / div, unit)
    return "%d B" % b


def _jsonable(d):
    out = {}
    for k, v in dict(d).items():
        if torch.is_tensor(v):
            v = v.item() if v.numel() == 1 else v.tolist()
        if isinstance(v, (int, float, str, bool, list)) or v is None:
            out[k] = v
    return out


def compare_table(results):
    base = next((r for r in results if r["hook"] == "allreduce"), results[0])
    lines = ["%-15s %11s %10s %13s %10s %11s %10s" % ("hook", "final loss", "vs allred", "bytes/step",
                                                    "vs fp32", "step time", "tok/s")]
    for r in results:
        ratio = r["bytes_per_step"] / r["fp32_bytes_per_step"] if r["fp32_bytes_per_step"] else float("nan")
        lines.append("%-15s %11.4f %+10.4f %13s %9.3fx %8.1f ms %10.0f" % (
            r["hook"], r["final_loss"], r["final_loss"] - base["final_loss"], fmt_bytes(r["bytes_per_step"]),
            ratio, r["median_step_s"] * 1e3, r["tokens_per_s"]))
    lines.append("final loss = mean of the last steps' losses (rank 0's batches); vs fp32 = bytes sent per rank per "
                 "step / an fp32 ring all-reduce of all gradients")
    return "\n".join(lines)


def plot_losses(path, results, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(results):
        xs = range(1, len(r["losses"]) + 1)
        ema, smooth = 0.0, []
        for t, v in enumerate(r["losses"], 1):  # one batch per point is noisy: raw losses faint, a bias-corrected
            ema = 0.9 * ema + 0.1 * v             # exponential moving average solid
            smooth.append(ema / (1 - 0.9 ** t))
        color = "C%d" % (i % 10)
        ax.plot(xs, r["losses"], color=color, lw=0.6, alpha=0.25)
        ax.plot(xs, smooth, color=color, lw=1.6, label="%s (final %.3f)" % (r["hook"], r["final_loss"]))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss, nats/byte (rank 0; solid: moving average)")
    ax.set_title("GPT d=%d L=%d on stdlib sources, %d ranks, seed %d" % (args.d_model, args.layers,
                                                                         results[0]["world_size"], args.seed))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def worker(rank, world, args, device):
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    corpus = load_corpus(args.data_bytes)
    if rank == 0 and not args.quiet:
        print("GPT d=%d layers=%d heads=%d seq=%d batch=%dx%d ranks | %s, %s, %d thread(s)/rank | %.1f MB of "
              "stdlib source | fused=%s checkpoint=%s" % (
                  args.d_model, args.layers, args.heads, args.seq_len, args.batch_size, world, device.type,
                  dist.get_backend(), threads, len(corpus) / 1e6, args.fused, args.checkpoint), flush=True)
    hooks = args.hooks.split(",") if args.compare else [args.hook]
    results = []
    for h in hooks:
        results.append(train(args, h, rank, world, device, corpus))
        dist.barrier()
    if rank == 0:
        if args.compare:
            print()
            print(compare_table(results))
            plot_losses(args.plot, results, args)
            print("wrote", args.plot)
        elif not args.quiet:
            r = results[0]
            print("done: final loss %.4f, median step %.1f ms, %.0f tok/s, %s sent/step (%.3fx of fp32)" % (
                r["final_loss"], r["median_step_s"] * 1e3, r["tokens_per_s"], fmt_bytes(r["bytes_per_step"]),
                r["bytes_per_step"] / r["fp32_bytes_per_step"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "device": str(device), "backend": dist.get_backend(),
                           "threads": threads, "torch": torch.__version__, "results": results}, f, indent=1)
    return results


def _teardown():
    # Free the DDP model, hook state and pending futures (which hold the process group) on this thread: a Gloo
    # group whose last reference goes away on one of its own worker threads aborts the process at exit.
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def _spawned(rank, world, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, args, torch.device("cpu"))
    finally:
        _teardown()
    # This rank is done and its group destroyed; skip interpreter finalization, where a Gloo group's worker threads
    # are occasionally torn down without a join (SIGABRT, "terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", default="allreduce", choices=HOOKS + TORCH_HOOKS,
                   help="gradient communication (pyperf.hooks kinds; torch-fp16/torch-powersgd are torch's own)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="pyperf's fused norm/activation layers instead of torch.nn's")
    p.add_argument("--checkpoint", default="none", choices=["none", "selective", "full"],
                   help="activation checkpointing per block (pyperf.checkpoint)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--world-size", type=int, default=2, help="ranks to spawn on CPU (ignored under torchrun)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--start-iter", type=int, default=-1, help="int8/int4/fp8: plain fp32 all-reduce for the first N "
                   "steps (default -1: twice the LR warm-up, steps/10)")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--data-bytes", type=int, default=8 << 20, help="bytes of stdlib source to train on")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank (default: cores / ranks)")
    p.add_argument("--stop-at", type=int, default=None, help="stop (and --save) after this step, as if "
                   "interrupted; the LR schedule still spans --steps")
    p.add_argument("--save", default=None, help="write a checkpoint here at the end")
    p.add_argument("--resume", default=None, help="continue from a checkpoint up to --steps")
    p.add_argument("--compare", action="store_true", help="train every hook in --hooks with the same seeds")
    p.add_argument("--hooks", default=",".join(HOOKS), help="hooks for --compare")
    p.add_argument("--plot", default="loss_curves.png", help="loss-curve PNG written by --compare")
    p.add_argument("--json", default=None, help="write per-step results (rank 0) to this JSON file")
    p.add_argument("--cpu", action="store_true", help="under torchrun: CPU + Gloo even when GPUs are present")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.compare and (args.save or args.resume):
        p.error("--compare cannot be combined with --save/--resume")
    if args.resume and not os.path.exists(args.resume):
        p.error("--resume %s: no such file" % args.resume)
    if args.d_model % args.heads:
        p.error("--d-model must be a multiple of --heads")
    return args


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (or a launcher that sets the same env)
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
            _teardown()
        return 0
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.world_size, args, port), nprocs=args.world_size, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
