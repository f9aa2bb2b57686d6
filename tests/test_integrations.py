"""pyperf.integrations without the frameworks: importing pyperf imports none of them, each integration module fails
with a message that says what to install when its framework is missing, and docs/integrations.md has the tested
recipes (tests/test_integrations_{accelerate,lightning,transformers}.py run them)."""
import os
import re
import subprocess
import sys

import pytest

import _integrations as I

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "accelerate", "transformers")


def _python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_importing_pyperf_imports_no_framework():
    r = _python("import sys, pyperf, pyperf.hooks, pyperf.comm, pyperf.integrations, pyperf.nn\n"
                "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (FRAMEWORKS,))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("module,blocked,package", [
    ("lightning", ("lightning", "pytorch_lightning"), "lightning"),
    ("transformers", ("transformers",), "transformers"),
])
def test_missing_framework_says_what_to_install(module, blocked, package):
    # a None entry in sys.modules makes `import name` raise ImportError, as if it were not installed
    r = _python("import sys\n"
                "for m in %r: sys.modules[m] = None\n"
                "try:\n"
                "    import pyperf.integrations.%s\n"
                "except ImportError as e:\n"
                "    print(e)\n" % (blocked, module))
    assert r.returncode == 0, r.stderr
    assert "pyperf.integrations.%s needs %s, which is not installed" % (module, package) in r.stdout, r.stdout
    assert "pip install %s" % package in r.stdout, r.stdout


def test_doc_has_the_tested_recipes():
    text = open(I.DOC).read()
    names = re.findall(r"<!-- tested: (\w+) -->", text)
    assert names == ["accelerate", "lightning", "transformers"], names
    for name in names:
        block = re.search(r"<!-- tested: %s -->\s*```python\n(.*?)```" % name, text, re.S).group(1)
        compile(block, name, "exec")
        assert "def train(" in block


def _body_keeper(rank, W):
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pyperf import hooks
    from pyperf.integrations._keeper import HookKeeper

    def step(ddp, k):
        g = torch.Generator().manual_seed(10 * rank + k)
        ddp.zero_grad()
        ddp(torch.randn(8, 32, generator=g)).square().mean().backward()

    net = I.mlp()
    ddp1 = DDP(net)
    keeper = HookKeeper("Test", "int8", dict(min_numel=0, block_size=64), fresh_hint="drop it")
    st1 = keeper.attach(ddp1)
    for k in range(3):
        step(ddp1, k)
    assert keeper.attach(ddp1) is st1                      # the same wrapper keeps its hook
    saved = keeper.state_dict()                            # collective: every rank's state
    assert float(st1.residual_of(net[0].weight).abs().sum()) > 0
    # a second run of the framework builds a new wrapper: the hook state carries over
    ddp2 = DDP(net)
    st2 = keeper.attach(ddp2)
    assert st2 is not st1 and st2.iter == 3 and torch.equal(st2.residual_of(net[0].weight),
                                                             st1.residual_of(net[0].weight))
    # a checkpoint loaded before the model exists waits for attach()
    other = HookKeeper("Test", "int8", dict(min_numel=0, block_size=64))
    assert other.state_dict() == {}
    other.load(saved)
    assert other.state_dict() is saved                     # not applied yet: saved again as it came
    st3 = other.attach(DDP(net))
    assert st3.iter == 3 and torch.equal(st3.residual_of(net[0].weight), st1.residual_of(net[0].weight))
    # someone else's hook on the wrapper
    ddp4 = DDP(net)
    hooks.register(ddp4, "bf16")
    with pytest.raises(RuntimeError, match="Test: this DDP model already has a pyperf 'bf16' hook"):
        HookKeeper("Test", "int8", {}).attach(ddp4)
    # a state of another world size is refused with the framework's hint
    bad = dict(saved, world_size=4, ranks=saved["ranks"] * 2)
    with pytest.raises(ValueError, match=r"Test: cannot restore the hook state.*of 4 ranks, this run has 2.*"
                                         r"\(drop it\)"):
        keeper.load(bad)


def test_hook_keeper_across_runs_2_ranks():
    from _dist import run_ranks
    run_ranks(_body_keeper, 2)
