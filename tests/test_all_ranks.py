"""state.all_ranks() / pyperf.comm.AllRanks: every rank's hook state in one dict (the same on every rank), written by
one process as the frameworks do, restored per rank bit-identically; clear errors for another world size, another
model, another state type or a single rank's dict."""
import collections
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import run_ranks

HOOK_KW = dict(block_size=64, min_numel=0, stochastic_rounding=True)


def _model(seed=0, width=64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.Tanh(), torch.nn.Linear(width, 8))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)


def _train(rank, steps, start=0, load=None, save_at=None, save_path=None, load_hook=True):
    from pyperf import hooks
    ddp = DDP(_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    st = hooks.register(ddp, "int8", **HOOK_KW)
    if load is not None:
        ck = torch.load(load, weights_only=True)       # plain tensors and builtins: loads with weights_only
        ddp.module.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if load_hook:
            st.all_ranks().load_state_dict(ck["hook"])
    for step in range(start, steps):
        if step == save_at:
            sd = st.all_ranks().state_dict()            # collective: every rank calls it
            if rank == 0:                               # one process writes, as the frameworks do
                torch.save({"model": ddp.module.state_dict(), "opt": opt.state_dict(), "hook": sd}, save_path)
            mine = st.state_dict()
            assert sd["world_size"] == 2 and len(sd["ranks"]) == 2
            for k, v in mine.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(sd["ranks"][rank][k], v), k
                elif k != "stats":
                    assert sd["ranks"][rank][k] == v, k
            # the same dict on every rank: rank 1 checks its copy of rank 0's residual against rank 0's own
            ref = sd["ranks"][0]["residual"].clone()
            dist.broadcast(ref, 0)
            assert torch.equal(ref, sd["ranks"][0]["residual"])
            assert not torch.equal(sd["ranks"][0]["residual"], sd["ranks"][1]["residual"])
            dist.barrier()                              # the file is complete before anyone reads it
        opt.zero_grad()
        (ddp(_batch(rank, step)[0]) - _batch(rank, step)[1]).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in ddp.parameters()], st


def _body_roundtrip(rank, W, path):
    from pyperf import hooks
    from pyperf.comm import AllRanks
    full, st = _train(rank, 6, save_at=3, save_path=path)
    assert st.stats.compressed_buckets > 0
    resumed, _ = _train(rank, 6, start=3, load=path)
    for a, b in zip(full, resumed):
        assert torch.equal(a, b), float((a - b).abs().max())
    # the hook state (residuals, the step counter of the rounding noise) is what makes it bit-identical: resumed
    # without it, the weights differ
    fresh, _ = _train(rank, 6, start=3, load=path, load_hook=False)
    assert not all(torch.equal(a, b) for a, b in zip(full, fresh))
    sd = torch.load(path, weights_only=True)["hook"]
    # a single rank's state is not an all-ranks dict
    with pytest.raises(ValueError, match="expected the dict that AllRanks.state_dict"):
        st.all_ranks().load_state_dict(sd["ranks"][rank])
    # another model (one more hidden unit): the hook state's own check names the first differing parameter
    other = hooks.register(DDP(_model(width=65)), "int8", **HOOK_KW)
    with pytest.raises(ValueError, match=r"another model: 4 parameters.*parameter 0 \(0.weight\): 2048"):
        other.all_ranks().load_state_dict(sd)
    # another kind of state
    with pytest.raises(ValueError, match="holds a HookState, this is a SGD"):
        AllRanks(torch.optim.SGD(_model().parameters(), lr=1)).load_state_dict(sd)
    torch.distributed.barrier()


def _body_four_ranks(rank, W, path):
    from pyperf import hooks
    st = hooks.register(DDP(_model()), "int8", **HOOK_KW)
    sd = torch.load(path, weights_only=True)["hook"]
    with pytest.raises(ValueError, match="holds the HookState of 2 ranks, this run has 4.*resume with 2 ranks"):
        st.all_ranks().load_state_dict(sd)


def test_all_ranks_roundtrip_and_world_size_check(tmp_path):
    path = os.path.join(tmp_path, "ckpt.pt")
    run_ranks(_body_roundtrip, 2, path)
    run_ranks(_body_four_ranks, 4, path)


def test_all_ranks_without_process_group_and_bad_input():
    from pyperf.comm import AllRanks
    opt = torch.optim.SGD(_model().parameters(), lr=0.5)
    sd = AllRanks(opt).state_dict()                     # no process group: a world of one rank
    assert sd["world_size"] == 1 and sd["state_type"] == "SGD" and sd["ranks"][0]["param_groups"][0]["lr"] == 0.5
    other = torch.optim.SGD(_model().parameters(), lr=0.1)
    AllRanks(other).load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 0.5
    with pytest.raises(TypeError, match="state: expected an object with state_dict"):
        AllRanks(object())
    with pytest.raises(ValueError, match="format version 99"):
        AllRanks(other).load_state_dict(dict(sd, version=99))


class _Nested:
    """A state whose state_dict nests tensors in the containers a user's state might use."""

    Pair = collections.namedtuple("Pair", "a b")

    def __init__(self):
        self.loaded = None

    def state_dict(self):
        d = collections.defaultdict(list)
        d["x"].append(torch.ones(2))
        return collections.OrderedDict(t=torch.arange(3), pair=self.Pair(torch.zeros(1), [torch.ones(1), 5]),
                                       d=d, s="s")

    def load_state_dict(self, sd):
        self.loaded = sd


def test_all_ranks_copies_nested_containers():
    from pyperf.comm import AllRanks
    sd = AllRanks(_Nested()).state_dict()["ranks"][0]
    assert isinstance(sd, collections.OrderedDict) and torch.equal(sd["t"], torch.arange(3)) and sd["s"] == "s"
    assert isinstance(sd["pair"], _Nested.Pair) and sd["pair"].b[1] == 5 and torch.equal(sd["pair"].b[0],
                                                                                           torch.ones(1))
    assert type(sd["d"]) is dict and torch.equal(sd["d"]["x"][0], torch.ones(2))
