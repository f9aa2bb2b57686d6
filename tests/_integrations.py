"""What the framework integration tests share: the recipes of docs/integrations.md (the tests run the page's code, so
the page cannot drift from what is tested), a small regression task, and the checks of the issue: the int8 run ends
within 3% of the run without the hook and the hook ran; a resumed run is bit-identical to the uninterrupted one."""
import os
import re

import torch

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "integrations.md")


def recipe(name):
    """The namespace of the python block that follows `<!-- tested: name -->` in docs/integrations.md, executed."""
    text = open(DOC).read()
    m = re.search(r"<!-- tested: %s -->\s*```python\n(.*?)```" % re.escape(name), text, re.S)
    assert m, "docs/integrations.md has no tested block %r" % name
    ns = {"__name__": "integrations_recipe_" + name}
    exec(compile(m.group(1), "%s [%s]" % (DOC, name), "exec"), ns)
    return ns


def data(n=512):
    """A teacher regression task: every rank holds the whole set (the frameworks' samplers shard it)."""
    g = torch.Generator().manual_seed(123)
    teacher = torch.randn(32, 8, generator=g) / 4
    xs = torch.randn(n, 32, generator=g)
    ys = torch.tanh(xs @ teacher) + 0.01 * torch.randn(n, 8, generator=g)
    return xs, ys


def mlp():
    # two weights above min_numel (1024): quantized; the last weight and the biases go uncompressed (fp32)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 8))


def eval_loss(net):
    xs, ys = data()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(net(xs), ys))


def record(path, **what):
    torch.save(what, path)


def check_runs(out, resumed_from_step, steps):
    """Compares what each rank recorded (rank files of the 'full' and 'resumed' launches under `out`)."""
    summary = []
    for rank in range(2):
        full = torch.load(os.path.join(out, "full_rank%d.pt" % rank), weights_only=False)
        res = torch.load(os.path.join(out, "resumed_rank%d.pt" % rank), weights_only=False)
        plain, hooked = full["plain"], full["int8"]
        # trained: the loss fell a lot (a 3% window around an untrained loss would prove nothing)
        assert hooked["eval"] < 0.2 * hooked["losses"][0], (hooked["eval"], hooked["losses"][0])
        assert abs(hooked["eval"] - plain["eval"]) <= 0.03 * plain["eval"], (hooked["eval"], plain["eval"])
        # the hook ran: every step's buckets went through the int8 all-reduce, at about a third of fp32's bytes
        st = hooked["stats"]
        assert st["steps"] == steps and st["compressed_buckets"] == st["buckets"] >= steps, st
        assert 0 < st["compression"] < 0.4, st
        assert hooked["losses"] != plain["losses"]          # and it changed the numbers
        assert len(hooked["losses"]) == steps and len(plain["losses"]) == steps
        # resumed in fresh processes from the checkpoint of step k: the same losses and weights, bit for bit
        assert res["losses"] == hooked["losses"][resumed_from_step:], (rank, res["losses"][:3],
                                                                        hooked["losses"][resumed_from_step:][:3])
        for a, b in zip(res["params"], hooked["params"]):
            assert torch.equal(a, b)
        assert res["stats"]["steps"] == steps                 # the counters came back with the residuals
        summary.append("rank %d: eval loss %.6g without the hook, %.6g with int8 (%+.4f%%); resumed at step %d: "
                       "%d losses bit-identical" % (rank, plain["eval"], hooked["eval"],
                                                    100 * (hooked["eval"] / plain["eval"] - 1), resumed_from_step,
                                                    len(res["losses"])))
    print("\n".join(summary))
