"""Activation checkpointing of a stack of GPT-style blocks: activation memory and fwd+bwd step time per policy.

pyperf's policies (selective, full, a measured 50% memory budget) against no checkpointing and the two things a user
would write with torch.utils.checkpoint by hand: every block fully checkpointed, and only the MLPs checkpointed.
One case with blocks built from torch modules, one from pyperf's fused layers (pyperf.nn), when this build has them.

Memory (Case.measure): on CUDA, `peak_mib` = torch.cuda.max_memory_allocated during the step minus what was
allocated before it (parameters, inputs) and `saved_mib` = what the forward leaves allocated for backward; on CPU,
`saved_mib` = bytes autograd keeps for backward (SavedTensorMeter, each storage once, parameters excluded).
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint

from pyperf.bench import Case
from pyperf.checkpoint import SavedTensorMeter, checkpoint_blocks
from pyperf.models import BlockStack, GPTConfig, fused_layers_available

FULL = dict(d_model=2048, n_heads=16, n_layers=8, seq_len=2048, batch=8)      # the DESIGN.md reference point
QUICK_CUDA = dict(d_model=1024, n_heads=8, n_layers=8, seq_len=1024, batch=4)
CPU = dict(d_model=128, n_heads=4, n_layers=8, seq_len=128, batch=2)
BUDGET = "50%"


def _mlp(blk, h):
    return blk.res2(blk.fc2(blk.act(blk.fc1(blk.norm2(h)))), h)


def _torch_mlp_only(blk, x):
    h = blk.res1(blk.attn(blk.norm1(x)), x)
    return checkpoint(functools.partial(_mlp, blk), h, use_reentrant=False)


class _Bench:
    """One stack of CheckpointedBlocks shared by every impl of a case (the policy is set per call), built lazily
    so that only one case's weights are alive at a time."""

    def __init__(self, cfg, batch, device, dtype):
        self.cfg, self.batch, self.device, self.dtype = cfg, batch, device, dtype
        self.stack = None
        self.budget_plan = None

    def setup(self):
        if self.stack is None:
            torch.manual_seed(0)
            self.stack = BlockStack(self.cfg).to(self.device, self.dtype)
            checkpoint_blocks(self.stack, "none")
        g = torch.Generator(device=self.device).manual_seed(1)
        shape = (self.batch, self.cfg.seq_len, self.cfg.d_model)
        x = torch.randn(shape, device=self.device, dtype=self.dtype, generator=g).requires_grad_()
        return x, torch.randn(shape, device=self.device, dtype=self.dtype, generator=g)

    def _blocks(self):
        return list(self.stack.blocks)

    def _set(self, policies):
        for w, p in zip(self._blocks(), policies):
            w.policy = p

    def forward(self, impl, x):
        """The stack's output under `impl`: the blocks run through the CheckpointedBlock wrappers for pyperf's
        policies and "torch none", through torch.utils.checkpoint directly for the torch baselines."""
        n = len(self._blocks())
        if impl == "pyperf selective":
            self._set(["selective"] * n)
        elif impl == "pyperf full":
            self._set(["full"] * n)
        elif impl == "pyperf budget " + BUDGET:
            if self.budget_plan is None:
                self._set(["none"] * n)
                self.budget_plan = checkpoint_blocks(self.stack, memory_budget=BUDGET, example_inputs=(x,)).policies
            self._set(self.budget_plan)
        elif impl == "torch none":
            self._set(["none"] * n)
        elif impl == "torch checkpoint full":
            for w in self._blocks():
                x = checkpoint(w.module, x, use_reentrant=False)
            return x
        elif impl == "torch checkpoint mlp-only":
            for w in self._blocks():
                x = _torch_mlp_only(w.module, x)
            return x
        else:
            raise KeyError(impl)
        return self.stack(x)

    def step(self, impl, inputs):
        x, gy = inputs
        for p in self.stack.parameters():
            p.grad = None
        x.grad = None
        self.forward(impl, x).backward(gy)

    def measure(self, impl, inputs):
        x, gy = inputs
        for p in self.stack.parameters():
            p.grad = None
        x.grad = None
        out = {}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            y = self.forward(impl, x)
            torch.cuda.synchronize()
            out["saved_mib"] = (torch.cuda.memory_allocated() - base) / 2**20
            y.backward(gy)
            del y
            torch.cuda.synchronize()
            out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            with SavedTensorMeter(exclude=self.stack.parameters()) as m:
                y = self.forward(impl, x)
            out["saved_mib"] = m.bytes / 2**20
            y.backward(gy)
            del y
        if impl.startswith("pyperf budget"):
            out["plan"] = ",".join({"none": "n", "selective": "s", "full": "f"}[p] for p in self.budget_plan)
        return out


IMPLS = ["pyperf selective", "pyperf full", "pyperf budget " + BUDGET,
         "torch none", "torch checkpoint full", "torch checkpoint mlp-only"]


def cases(device, dtype, quick):
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    size = (QUICK_CUDA if quick else FULL) if on_cuda else CPU
    out = []
    for fused in ([False, True] if fused_layers_available() else [False]):
        cfg = GPTConfig(d_model=size["d_model"], n_heads=size["n_heads"], n_layers=size["n_layers"],
                        seq_len=size["seq_len"], dropout=0.0, fused=fused)
        b = _Bench(cfg, size["batch"], device, dtype)
        name = "%d blocks d=%d B=%d T=%d %s, %s layers" % (
            cfg.n_layers, cfg.d_model, size["batch"], cfg.seq_len, str(dtype).replace("torch.", ""),
            "pyperf fused" if fused else "torch")
        out.append(Case(
            group="checkpoint", name=name, setup=b.setup,
            impls={k: functools.partial(b.step, k) for k in IMPLS},
            baseline="torch none", measure=b.measure, rotate=False,
            extra=dict(size, fused=fused, budget=BUDGET)))
    return out


if __name__ == "__main__":       # a quick look without the harness: step time (median, min of 5) and memory
    import sys
    import time
    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    for c in cases(dev, None, quick="--quick" in sys.argv):
        inputs = c.setup()
        print(c.name)
        for k, fn in c.impls.items():
            fn(inputs)
            ts = []
            for _ in range(5):
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(inputs)
                if dev == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            print("  %-28s median %8.2f ms  min %8.2f ms  %s" % (k, sorted(ts)[2] * 1e3, min(ts) * 1e3,
                                                                c.measure(k, inputs)))
