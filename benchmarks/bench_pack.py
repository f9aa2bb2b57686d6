"""Benchmarks of pack / unpack / multi_tensor_l2norm against what a user would write instead.

cases(device, dtype, quick) -> list of pyperf.bench.Case. `bytes` counts every input read once and every
output written once. The gradient sets: GPT-2 small (148 tensors, 124,439,808 parameters, shapes from the
architecture: vocab 50257, context 1024, width 768, 12 layers; quick mode shrinks width/vocab but keeps the 148
tensors) and a 25 MB bucket of small tensors (2.5 MB in quick mode).
"""
import torch
from torch._utils import _flatten_dense_tensors

from pyperf import ops
from pyperf.bench.case import Case


def gpt2_small_shapes(vocab=50257, ctx=1024, d=768, layers=12):
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,),                      # ln_1
                   (d, 3 * d), (3 * d,),            # attn.c_attn
                   (d, d), (d,),                    # attn.c_proj
                   (d,), (d,),                      # ln_2
                   (d, 4 * d), (4 * d,),            # mlp.c_fc
                   (4 * d, d), (d,)]                # mlp.c_proj
    return shapes + [(d,), (d,)]                    # ln_f


def small_tensor_shapes(total_bytes, elem_size=4):
    """Many small tensors (biases, norms, small projections) adding up to about total_bytes."""
    pattern = [(768,), (3072,), (2304,), (64, 65), (1000,), (33, 31), (4099,), (256,)]
    shapes, n, i = [], 0, 0
    while n * elem_size < total_bytes:
        s = pattern[i % len(pattern)]
        shapes.append(s)
        n += torch.Size(s).numel()
        i += 1
    return shapes


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _grad_set(shapes, device, dtype):
    def setup():
        ts = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
        _, total = ops.pack_layout([t.numel() for t in ts], 1)
        flat = torch.randn(total, device=device, dtype=dtype)   # unpack reads it: no garbage/denormals
        views = [flat[o: o + t.numel()].view_as(t) for o, t in zip(ops.pack_layout([t.numel() for t in ts])[0], ts)]
        return dict(ts=ts, flat=flat, views=views)
    return setup


def _cast_target(dtype):
    return torch.bfloat16 if dtype == torch.float32 else torch.float32


def _copy_loop(views, ts):
    for v, t in zip(views, ts):
        v.copy_(t)


def cases(device="cpu", dtype=torch.float32, quick=False):
    sets = {
        "gpt2-small": gpt2_small_shapes(vocab=8192, d=192) if quick else gpt2_small_shapes(),
        "25MB-small-tensors": small_tensor_shapes((2.5 if quick else 25) * 2**20, torch.finfo(dtype).bits // 8),
    }
    dname = str(dtype).replace("torch.", "")
    out = []
    for set_name, shapes in sets.items():
        setup = _grad_set(shapes, device, dtype)
        n = sum(torch.Size(s).numel() for s in shapes)
        es = torch.finfo(dtype).bits // 8
        nb = n * es
        extra = dict(tensors=len(shapes), elements=n)
        out.append(Case(
            group="pack", name="pack %s %s" % (set_name, dname), setup=setup, bytes=2 * nb, extra=extra,
            impls={
                "pyperf.pack": lambda x: ops.pack(x["ts"], out=x["flat"]),
                "torch._foreach_copy_": lambda x: torch._foreach_copy_(x["views"], x["ts"]),
                "_flatten_dense_tensors": lambda x: _flatten_dense_tensors(x["ts"]),
                "copy loop": lambda x: _copy_loop(x["views"], x["ts"]),
            }))
        out.append(Case(
            group="pack", name="pack+scale %s %s" % (set_name, dname), setup=setup, bytes=2 * nb, extra=extra,
            impls={
                "pyperf.pack(scale)": lambda x: ops.pack(x["ts"], scale=0.125, out=x["flat"]),
                "_foreach_copy_+mul_": lambda x: (torch._foreach_copy_(x["views"], x["ts"]), x["flat"].mul_(0.125)),
                "_flatten_dense_tensors+mul_": lambda x: _flatten_dense_tensors(x["ts"]).mul_(0.125),
            }))
        tgt = _cast_target(dtype)
        tname = str(tgt).replace("torch.", "")

        def cast_setup(setup=setup, tgt=tgt):
            x = setup()
            x["flat_cast"] = torch.empty(x["flat"].numel(), device=device, dtype=tgt)
            offsets, _ = ops.pack_layout([t.numel() for t in x["ts"]])
            x["views_cast"] = [x["flat_cast"][o: o + t.numel()].view_as(t) for o, t in zip(offsets, x["ts"])]
            return x
        out.append(Case(
            group="pack", name="pack+cast %s %s->%s" % (set_name, dname, tname), setup=cast_setup,
            bytes=nb + n * (torch.finfo(tgt).bits // 8), extra=extra,
            impls={
                "pyperf.pack(cast)": lambda x: ops.pack(x["ts"], out=x["flat_cast"]),
                "torch._foreach_copy_(cast)": lambda x: torch._foreach_copy_(x["views_cast"], x["ts"]),
                "_flatten_dense_tensors+to": lambda x, tgt=tgt: _flatten_dense_tensors(x["ts"]).to(tgt),
            }))
        out.append(Case(
            group="pack", name="unpack+scale %s %s" % (set_name, dname), setup=setup, bytes=2 * nb, extra=extra,
            impls={
                "pyperf.unpack(scale)": lambda x: ops.unpack(x["flat"], x["ts"], scale=0.5),
                "_foreach_copy_+_foreach_mul_": lambda x: (torch._foreach_copy_(x["ts"], x["views"]),
                                                           torch._foreach_mul_(x["ts"], 0.5)),
                "copy loop+mul_": lambda x: [t.copy_(v).mul_(0.5) for t, v in zip(x["ts"], x["views"])],
            }))
        out.append(Case(
            group="pack", name="l2norm %s %s" % (set_name, dname), setup=setup, bytes=nb, extra=extra,
            impls={
                "pyperf.multi_tensor_l2norm": lambda x: ops.multi_tensor_l2norm(x["ts"]),
                "_foreach_norm+stack+norm": lambda x: torch.stack(torch._foreach_norm(x["ts"])).norm(),
            }))
    return out
