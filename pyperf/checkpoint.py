"""Activation checkpointing per model block, with policies and a memory budget.

    from pyperf.checkpoint import CheckpointedBlock, checkpoint_blocks
    block = CheckpointedBlock(block, policy="selective")
    checkpoint_blocks(model, policy="full")                               # every block of the model
    checkpoint_blocks(model, memory_budget="40%", example_inputs=(idx,))  # measured plan within a budget

Policies: "none" (plain forward), "full" (keep only the block's inputs, recompute the whole block in backward),
"selective" (keep the outputs of matmuls and attention, recompute everything else: norms, activations, dropout,
pyperf's fused ops), a callable `policy(ctx, op, *args, **kwargs) -> CheckpointPolicy | bool` (True = keep), or a
list of OpOverloads to keep. Everything runs on torch's non-reentrant checkpoint (use_reentrant=False), which works
with DDP (each parameter's gradient becomes ready exactly once) and torch.compile; selective policies use torch's
selective-checkpoint contexts, which see every op registered through TORCH_LIBRARY, pyperf's included.
"""
import contextlib
import functools
import inspect
import re
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("none", "full", "selective")

# Outputs "selective" keeps: the ops whose recompute costs FLOPs (matmuls, attention, convolutions). Everything else
# in a transformer block (norms, activations, dropout, residual adds, pyperf's fused ops) is memory-bound and cheap
# to recompute. aten.linear / aten.matmul are CompositeImplicit: under dispatch they arrive as mm/addmm/bmm, so the
# leaves are what count; they are listed anyway for policies that run above autograd (torch.compile's partitioner).
_SAVE_OP_NAMES = (
    "mm.default", "addmm.default", "bmm.default", "baddbmm.default", "linear.default", "matmul.default",
    "_scaled_mm.default", "convolution.default",
    "_scaled_dot_product_flash_attention.default",
    "_scaled_dot_product_flash_attention_for_cpu.default",
    "_scaled_dot_product_efficient_attention.default",
    "_scaled_dot_product_cudnn_attention.default",
    "_scaled_dot_product_fused_attention_overrideable.default",
    "_flash_attention_forward.default",
    "_efficient_attention_forward.default",
)


def _resolve_aten(names):
    ops = []
    for n in names:
        packet, overload = n.split(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload, None)
        if op is not None:           # some only exist in some torch builds
            ops.append(op)
    return frozenset(ops)


SAVE_OPS = _resolve_aten(_SAVE_OP_NAMES)

# torch 2.12 added checkpoint(..., respect_saved_tensors_hooks=True): the outputs a selective policy keeps then go
# through the caller's saved_tensors_hooks (save_on_cpu, SavedTensorMeter). Older torch keeps them outside the
# autograd graph, where no hook sees them: selective checkpointing still computes the same values and gradients,
# but save_on_cpu cannot offload what the policy keeps, and measure_block counts those bytes itself.
SAC_RESPECTS_SAVED_TENSORS_HOOKS = "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters

PolicyLike = Union[str, Callable[..., Any], Sequence[torch._ops.OpOverload]]


def selective_policy(save_ops: Iterable = SAVE_OPS) -> Callable:
    """A selective-checkpoint policy function keeping the outputs of `save_ops` and recomputing everything else."""
    keep = frozenset(save_ops)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    policy.__name__ = "selective"
    return policy


_SELECTIVE = selective_policy()


def _as_policy_fn(fn):
    """Lets custom policies answer with a bool (True = keep the output) as well as a CheckpointPolicy."""

    @functools.wraps(fn)
    def policy(ctx, op, *args, **kwargs):
        r = fn(ctx, op, *args, **kwargs)
        if isinstance(r, CheckpointPolicy):
            return r
        if isinstance(r, bool):
            return CheckpointPolicy.MUST_SAVE if r else CheckpointPolicy.PREFER_RECOMPUTE
        raise TypeError("checkpoint policy %r returned %r for %s; expected a torch.utils.checkpoint.CheckpointPolicy "
                        "or a bool (True = keep the output)" % (getattr(fn, "__name__", fn), r, op))

    return policy


def _resolve_policy(policy) -> Tuple[str, Optional[Callable]]:
    """(name, selective policy fn or None). None means: no selective context ("none" and "full")."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError("policy must be one of %s, a callable policy(ctx, op, *args, **kwargs) or a list of "
                             "ops to keep; got %r" % (", ".join(repr(p) for p in POLICIES), policy))
        return policy, (_SELECTIVE if policy == "selective" else None)
    if isinstance(policy, (list, tuple, set, frozenset)):
        bad = [op for op in policy if not isinstance(op, torch._ops.OpOverload)]
        if bad:
            raise TypeError("a policy given as a list must hold OpOverloads such as torch.ops.aten.mm.default; got "
                            "%r" % (bad[0],))
        return "custom", selective_policy(policy)
    if callable(policy):
        return "custom:%s" % getattr(policy, "__name__", type(policy).__name__), _as_policy_fn(policy)
    raise TypeError("policy must be one of %s, a callable or a list of ops; got %s"
                    % (", ".join(repr(p) for p in POLICIES), type(policy).__name__))


_PREFIX = "module."


class CheckpointedBlock(nn.Module):
    """Runs `module` under activation checkpointing with `policy` (see the module docstring).

    state_dict keys are the wrapped module's (no "module." prefix), so checkpoints load with or without the
    wrapper. Outside autograd (no_grad, inference) or with policy "none" the module runs as is.
    """

    def __init__(self, module: nn.Module, policy: PolicyLike = "full", *, preserve_rng_state: bool = True):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError("CheckpointedBlock wraps an nn.Module; got %s" % type(module).__name__)
        if isinstance(module, CheckpointedBlock):
            raise TypeError("module is already a CheckpointedBlock; set its .policy instead of wrapping it twice")
        self.module = module
        self.preserve_rng_state = preserve_rng_state
        self.policy = policy
        self._register_state_dict_hook(_strip_prefix)
        self._register_load_state_dict_pre_hook(_add_prefix)

    @property
    def policy(self):
        return self._policy

    @policy.setter
    def policy(self, policy):
        self._policy_name, self._policy_fn = _resolve_policy(policy)
        self._policy = policy
        # a partial, not a bound method: torch.compile's checkpoint path calls context_fn as a plain function
        self._context_fn = (None if self._policy_fn is None
                            else functools.partial(create_selective_checkpoint_contexts, self._policy_fn))

    @property
    def policy_name(self) -> str:
        return self._policy_name

    def forward(self, *args, **kwargs):
        if self._policy_name == "none" or not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        extra = {}
        if self._policy_fn is not None:
            extra = dict(context_fn=self._context_fn)
            if SAC_RESPECTS_SAVED_TENSORS_HOOKS:
                # what the policy keeps goes through the caller's saved_tensors_hooks (save_on_cpu,
                # SavedTensorMeter) like any other saved tensor
                extra["respect_saved_tensors_hooks"] = True
        try:
            with _count_kept_outputs(self._policy_fn):
                return checkpoint(self.module, *args, use_reentrant=False, preserve_rng_state=self.preserve_rng_state,
                                  **extra, **kwargs)
        except BaseException as e:
            _close_failed_checkpoint(e.__traceback__)
            raise

    def __getattr__(self, name):
        # block.attn keeps working after wrapping: fall through to the wrapped module
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self._modules["module"], name)

    def extra_repr(self):
        return "policy=%s" % self._policy_name


def _strip_prefix(module, state_dict, prefix, local_metadata):
    inner = prefix + _PREFIX
    for k in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + k[len(inner):]] = state_dict.pop(k)
    return state_dict


def _add_prefix(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    inner = prefix + _PREFIX
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + k[len(prefix):]] = state_dict.pop(k)


# ---- measuring ------------------------------------------------------------------------------------------------

class SavedTensorMeter:
    """Counts the bytes autograd keeps for backward while active (a saved_tensors_hooks pair): each storage once,
    parameters and `exclude` tensors not at all. Checkpointed blocks show what they really keep: their inputs
    and, for selective policies, the outputs the policy keeps.

        with SavedTensorMeter(exclude=model.parameters()) as m:
            loss = model(x).sum()
        m.bytes
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._skip = {_storage_key(t) for t in exclude}
        self._seen = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t):
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.layout == torch.strided:
            k = _storage_key(t)
            if k not in self._skip and k not in self._seen:
                self._seen[k] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @property
    def count(self) -> int:
        return len(self._seen)

    def __enter__(self):
        self._hooks.__enter__()
        _ACTIVE_METERS.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE_METERS.remove(self)
        return self._hooks.__exit__(*exc)


def _unpack(t):
    return t


def _close_failed_checkpoint(tb):
    """When the checkpointed function raises, torch 2.11's checkpoint() leaves its context generator suspended: its
    saved-tensors hooks and, for selective policies, its dispatch mode stay active for as long as the exception's
    traceback keeps that frame alive (a caller that keeps the exception, pytest's report of a failed test), and every
    later op runs under them. Closing the generator runs its exits now, in order. Newer torch closes it itself."""
    checkpoint_file = inspect.getsourcefile(torch.utils.checkpoint)
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename == checkpoint_file:
            for value in list(frame.f_locals.values()):
                if inspect.isgenerator(value) and inspect.getgeneratorstate(value) == inspect.GEN_SUSPENDED:
                    value.close()
        tb = tb.tb_next


# The SavedTensorMeters entered and not yet exited, innermost last.
_ACTIVE_METERS: List[SavedTensorMeter] = []


class _KeptOutputCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Shows `meter` the outputs that `policy_fn` keeps, on torch without respect_saved_tensors_hooks (whose
    selective checkpointing keeps them where no saved_tensors_hooks see them), so that the meter still counts what a
    selective CheckpointedBlock really keeps."""

    def __init__(self, meter, policy_fn):
        super().__init__()
        self.meter = meter
        self.policy_fn = policy_fn
        self.ctx = torch.utils.checkpoint.SelectiveCheckpointContext(is_recompute=False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.policy_fn(self.ctx, func, *args, **kwargs) in (CheckpointPolicy.MUST_SAVE,
                                                                CheckpointPolicy.PREFER_SAVE):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.meter._pack(t)
        return out


def _count_kept_outputs(policy_fn):
    if (SAC_RESPECTS_SAVED_TENSORS_HOOKS or policy_fn is None or not _ACTIVE_METERS
            or torch.compiler.is_compiling()):
        return contextlib.nullcontext()
    return _KeptOutputCounter(_ACTIVE_METERS[-1], policy_fn)


def _storage_key(t):
    return (t.device, t.untyped_storage().data_ptr())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _OpTimer(torch.utils._python_dispatch.TorchDispatchMode):
    """Times every aten/pyperf op of a forward (synchronizing around each on CUDA): the split of forward time
    between the ops a policy keeps and those it recomputes."""

    def __init__(self, device):
        super().__init__()
        self.device = device
        self.calls: List[Tuple[Any, tuple, dict, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _sync(self.device)
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        _sync(self.device)
        self.calls.append((func, args, kwargs, time.perf_counter() - t0))
        return out


def _recompute_fraction(policy_fn, calls) -> float:
    total = sum(c[3] for c in calls)
    if total <= 0:
        return 1.0
    ctx = torch.utils.checkpoint.SelectiveCheckpointContext(is_recompute=False)
    recomputed = 0.0
    for func, args, kwargs, dt in calls:
        p = policy_fn(ctx, func, *args, **kwargs)
        if p not in (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE):
            recomputed += dt
    return recomputed / total


@contextlib.contextmanager
def _fork_rng(device):
    """Probe forwards draw dropout masks; planning must not shift the training run's random stream."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


# ---- planning -------------------------------------------------------------------------------------------------

class BlockStats:
    """What the probe measured for one block: saved bytes and recompute seconds per candidate policy."""

    def __init__(self, name, forward_s, saved, recompute_s):
        self.name = name
        self.forward_s = forward_s
        self.saved: Dict[str, int] = saved
        self.recompute_s: Dict[str, float] = recompute_s

    def __repr__(self):
        return "BlockStats(%s, forward=%.3g ms, saved=%s)" % (self.name, self.forward_s * 1e3, self.saved)


class CheckpointPlan:
    """The outcome of checkpoint_blocks: per block its policy and, when measured, saved bytes and recompute time."""

    def __init__(self, names, policies, stats=None, budget=None):
        self.names: List[str] = list(names)
        self.policies: List[str] = list(policies)
        self.stats: Optional[List[BlockStats]] = stats
        self.budget = budget

    @property
    def saved_bytes(self) -> Optional[int]:
        if self.stats is None:
            return None
        return sum(s.saved[p] for s, p in zip(self.stats, self.policies))

    @property
    def recompute_s(self) -> Optional[float]:
        if self.stats is None:
            return None
        return sum(s.recompute_s[p] for s, p in zip(self.stats, self.policies))

    def __repr__(self):
        head = "CheckpointPlan(%d blocks" % len(self.names)
        if self.stats is not None:
            head += ", saved %.4g MiB, recompute %.3g ms" % (self.saved_bytes / 2**20, self.recompute_s * 1e3)
        if self.budget is not None:
            head += ", budget %.4g MiB" % (self.budget / 2**20)
        rows = ["  %s: %s" % (n, p) for n, p in zip(self.names, self.policies)]
        return head + ")\n" + "\n".join(rows)


def _parse_budget(memory_budget, unchecked_bytes=None):
    if isinstance(memory_budget, str):
        m = re.fullmatch(r"\s*([0-9.]+)\s*%\s*", memory_budget)
        if not m:
            raise ValueError("memory_budget as a string must be a percentage of the unchecked activation bytes, "
                             "such as '40%%'; got %r" % memory_budget)
        frac = float(m.group(1)) / 100.0
        return None if unchecked_bytes is None else frac * unchecked_bytes
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise TypeError("memory_budget must be a number of bytes or a percentage string such as '40%%'; got %s"
                        % type(memory_budget).__name__)
    if not memory_budget >= 0:       # also rejects nan
        raise ValueError("memory_budget must be >= 0 bytes; got %r" % memory_budget)
    return float(memory_budget)


def plan_budget(stats: Sequence[BlockStats], candidates: Sequence[str], budget: float) -> List[str]:
    """Greedy: starting from no checkpointing, repeatedly take the (block, policy) move that frees the most saved
    bytes per extra second of recompute until the blocks' saved bytes fit `budget`. Then, so that a small
    remainder does not cost a whole block's recompute, every prefix of that sequence finished by the single
    cheapest move that reaches the budget is also considered; the plan with the least recompute wins."""
    choice = ["none"] * len(stats)
    total = sum(s.saved["none"] for s in stats)

    def cost(ch):
        return sum(s.recompute_s[p] for s, p in zip(stats, ch))

    def moves(ch):
        for i, s in enumerate(stats):
            for p in candidates:
                freed = s.saved[ch[i]] - s.saved[p]
                if freed > 0:
                    yield i, p, freed, s.recompute_s[p] - s.recompute_s[ch[i]]

    best_plan, best_cost = None, float("inf")
    while True:
        finish = min(((extra, -freed, i, p) for i, p, freed, extra in moves(choice) if total - freed <= budget),
                     default=None)
        if total <= budget:
            finish = None
            if cost(choice) < best_cost:
                best_plan, best_cost = list(choice), cost(choice)
        elif finish is not None:
            extra, _, i, p = finish
            if cost(choice) + extra < best_cost:
                best_plan = list(choice)
                best_plan[i] = p
                best_cost = cost(best_plan)
        if total <= budget:
            break
        step = max(((float("inf") if extra <= 0 else freed / extra, freed, -i, p) for i, p, freed, extra
                    in moves(choice)), default=None)
        if step is None:
            break
        _, freed, i, p = step
        choice[-i] = p
        total -= freed
    if best_plan is None:
        floor = sum(min(s.saved[p] for p in list(candidates) + ["none"]) for s in stats)
        raise ValueError("memory_budget of %d bytes cannot be met: the least the blocks can keep with policies "
                         "%s is %d bytes (measured); raise the budget or allow more policies"
                         % (budget, list(candidates), floor))
    return best_plan


def _find_blocks(model: nn.Module, blocks) -> List[Tuple[str, nn.Module]]:
    named = list(model.named_modules())
    if blocks is None:
        lists = [(n, m) for n, m in named if isinstance(m, nn.ModuleList) and len(m) > 0]
        if not lists:
            raise ValueError("checkpoint_blocks found no nn.ModuleList of blocks in %s; pass blocks= (a module "
                             "type, a list of submodule names, or a predicate(name, module))" % type(model).__name__)
        name, lst = max(lists, key=lambda nm: len(nm[1]))
        prefix = name + "." if name else ""
        return [(prefix + str(i), m) for i, m in enumerate(lst)]
    if isinstance(blocks, type) or (isinstance(blocks, tuple) and blocks and all(isinstance(b, type) for b in blocks)):
        pred = lambda n, m: isinstance(m, blocks)  # noqa: E731
    elif callable(blocks):
        pred = blocks
    else:
        wanted = list(blocks)
        mods = dict(named)
        missing = [w for w in wanted if w not in mods]
        if missing:
            raise ValueError("blocks names %s are not submodules of the model" % missing)
        return [(w, mods[w]) for w in wanted]
    out = []
    for n, m in named:
        if n == "" or any(n.startswith(o + ".") for o, _ in out):
            continue                               # the model itself, or inside a block already chosen
        if isinstance(m, CheckpointedBlock):
            if pred(n, m.module):
                out.append((n, m))
            continue
        if n.endswith("." + _PREFIX[:-1]) and isinstance(_parent(model, n), CheckpointedBlock):
            continue
        if pred(n, m):
            out.append((n, m))
    if not out:
        raise ValueError("blocks=%r selected no submodule of the model" % (blocks,))
    return out


def _parent(model, name):
    parent_name, _, _ = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model


def _wrap_in_place(model, name, module, policy) -> CheckpointedBlock:
    if isinstance(module, CheckpointedBlock):
        module.policy = policy
        return module
    if name == "":
        raise ValueError("the model itself cannot be one of its blocks; wrap it with CheckpointedBlock instead")
    wrapper = CheckpointedBlock(module, policy)
    setattr(_parent(model, name), name.rpartition(".")[2], wrapper)
    return wrapper


def _capture_block_inputs(model, wrappers, example_inputs, example_kwargs):
    captured = [None] * len(wrappers)

    def grab(i):
        def hook(mod, args, kwargs):
            def keep(t):
                if isinstance(t, torch.Tensor):
                    return t.detach().requires_grad_(t.requires_grad)
                return t
            captured[i] = (tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()})
        return hook

    handles = [w.register_forward_pre_hook(grab(i), with_kwargs=True) for i, w in enumerate(wrappers)]
    try:
        with torch.enable_grad():
            out = model(*example_inputs, **example_kwargs)
        del out
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, c in enumerate(captured) if c is None]
    if missing:
        raise ValueError("checkpoint_blocks: the probe forward did not call blocks %s; memory_budget can only plan "
                         "blocks the forward runs" % missing)
    return captured


def _device_of(args, kwargs, module):
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor):
            return t.device
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _time_forward(module, args, kwargs, device, reps):
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.enable_grad():
            out = module(*args, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def measure_block(wrapper: CheckpointedBlock, args, kwargs=None, candidates=("selective", "full"),
                  name="", reps=3) -> BlockStats:
    """Saved bytes per policy (one probe forward each under a SavedTensorMeter) and recompute seconds per policy
    (the block's measured forward time times the share of op time the policy recomputes). `candidates` is a list
    of policies or a dict label -> policy; the stats are keyed by label ("none" is always measured)."""
    kwargs = kwargs or {}
    if not isinstance(candidates, dict):
        candidates = _label(candidates)
    inner = wrapper.module
    device = _device_of(args, kwargs, inner)
    exclude = list(inner.parameters()) + list(inner.buffers())
    original = wrapper.policy
    saved = {}
    try:
        with _fork_rng(device):
            for label, p in [("none", "none")] + list(candidates.items()):
                wrapper.policy = p
                with SavedTensorMeter(exclude=exclude) as meter:
                    out = wrapper(*args, **kwargs)
                saved[label] = meter.bytes
                del out
            _time_forward(inner, args, kwargs, device, 1)               # warm-up
            forward_s = _time_forward(inner, args, kwargs, device, reps)
            with _OpTimer(device) as timer, torch.enable_grad():
                out = inner(*args, **kwargs)
            del out
    finally:
        wrapper.policy = original
    recompute = {"none": 0.0}
    for label, p in candidates.items():
        pname, fn = _resolve_policy(p)
        if pname == "none":
            recompute[label] = 0.0
        else:
            recompute[label] = forward_s * (1.0 if fn is None else _recompute_fraction(fn, timer.calls))
    return BlockStats(name, forward_s, saved, recompute)


def _label(candidates) -> Dict[str, Any]:
    out = {}
    for i, c in enumerate(candidates):
        label = _resolve_policy(c)[0]
        out[label if label not in out else "%s#%d" % (label, i)] = c
    return out


def checkpoint_blocks(model: nn.Module, policy: Union[PolicyLike, Sequence[PolicyLike], None] = None,
                      memory_budget: Union[int, float, str, None] = None, *, blocks=None,
                      example_inputs: Union[tuple, None] = None, example_kwargs: Optional[dict] = None,
                      reps: int = 3, sync_plan: bool = True) -> CheckpointPlan:
    """Wraps the model's blocks in place with CheckpointedBlock and returns the CheckpointPlan.

    policy: without memory_budget, the policy of every block (default "full"). With memory_budget, the candidate
        policies (one or a list; default ["selective", "full"]); blocks may also stay unchecked ("none").
    memory_budget: bytes (or a percentage string such as "40%" of the unchecked figure) that the blocks' saved
        activations must fit. Needs example_inputs (args of model.forward) for one probe forward of the model and a
        few of each block; the plan is measured there, not estimated. Raises ValueError when even the cheapest
        candidate on every block does not fit.
    blocks: which submodules are blocks: None (the longest nn.ModuleList), a module type (or tuple of types), a
        list of qualified names, or a predicate(name, module) -> bool.
    sync_plan: when torch.distributed is initialized, use rank 0's plan on every rank (measured timings differ by
        rank; DDP needs no such agreement but identical plans keep ranks' memory and step times alike). Every rank
        must then call checkpoint_blocks.

    Apply it before wrapping the model in DistributedDataParallel or torch.compile.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    is_candidate_list = (isinstance(policy, (list, tuple)) and len(policy) > 0
                         and not any(isinstance(p, torch._ops.OpOverload) for p in policy))
    if memory_budget is None:
        if policy is None:
            policy = "full"
        if is_candidate_list:
            raise ValueError("a list of candidate policies needs memory_budget to choose among them; got %r"
                             % (policy,))
        _resolve_policy(policy)                                         # validate before touching the model
        found = _find_blocks(model, blocks)
        wrappers = [_wrap_in_place(model, n, m, policy) for n, m in found]
        return CheckpointPlan([n for n, _ in found], [w.policy_name for w in wrappers])

    candidates = ["selective", "full"] if policy is None else (list(policy) if is_candidate_list else [policy])
    candidates = _label(candidates)                                   # validates each
    _parse_budget(memory_budget)                                      # type/sign errors before any work
    if example_inputs is None:
        raise ValueError("memory_budget needs example_inputs (a tuple of model.forward args) for the probe forward")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if reps < 1:
        raise ValueError("reps must be >= 1; got %r" % reps)

    found = _find_blocks(model, blocks)
    originals = [m.policy if isinstance(m, CheckpointedBlock) else None for _, m in found]
    wrappers = [_wrap_in_place(model, n, m, "none") for n, m in found]
    try:
        device = _device_of(example_inputs, example_kwargs or {}, model)
        with _fork_rng(device):
            captured = _capture_block_inputs(model, wrappers, example_inputs, example_kwargs or {})
        stats = [measure_block(w, args, kwargs, candidates, name=n, reps=reps)
                 for (n, _), w, (args, kwargs) in zip(found, wrappers, captured)]
        del captured
        budget = _parse_budget(memory_budget, sum(s.saved["none"] for s in stats))
        choice = _agree(plan_budget(stats, list(candidates), budget), sync_plan)
    except BaseException:
        for (n, _), w, p in zip(found, wrappers, originals):     # leave the model as it came
            if p is None:
                setattr(_parent(model, n), n.rpartition(".")[2], w.module)
            else:
                w.policy = p
        raise
    for w, label in zip(wrappers, choice):
        w.policy = "none" if label == "none" else candidates[label]
    return CheckpointPlan([n for n, _ in found], choice, stats, budget)


def _agree(choice, sync_plan):
    import torch.distributed as dist
    if not (sync_plan and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return choice
    box = [choice]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_plan(model: nn.Module) -> CheckpointPlan:
    """The policies of the CheckpointedBlocks inside `model` (without measurements)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, CheckpointedBlock)]
    return CheckpointPlan([n for n, _ in found], [m.policy_name for _, m in found])


__all__ = ["CheckpointedBlock", "checkpoint_blocks", "checkpoint_plan", "CheckpointPlan", "BlockStats",
           "SavedTensorMeter", "selective_policy", "measure_block", "plan_budget", "POLICIES", "SAVE_OPS"]
