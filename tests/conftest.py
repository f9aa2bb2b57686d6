import os
import sys
import zlib

import pytest
import torch

# Tests run against the in-place build of this checkout (python setup.py build_ext --inplace), never against some
# other installed pyperf.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HAS_CUDA = torch.cuda.is_available()


def stable_seed(*parts):
    """A seed from the test's parameters that is the same in every process (Python's hash() of a str is salted
    per process, so seeds built from it gave every CI run different inputs)."""
    return zlib.crc32(repr(parts).encode()) % 2 ** 31


def devices():
    """The devices a kernel test runs on: cpu always, cuda where there is a GPU."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (runs on the GPU machine: scripts/gpu_check.sh)")
    for item in items:
        params = getattr(item, "callspec", None)
        on_cuda = "cuda" in item.keywords or (params is not None and "cuda" in str(params.params.get("device", "")))
        if on_cuda and not HAS_CUDA:
            item.add_marker(skip_cuda)


def _global_state():
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    return dict(dispatch_modes=list(_get_current_dispatch_mode_stack()),
                saved_tensors_hooks=torch._C._autograd._top_saved_tensors_default_hooks(False),
                grad_enabled=torch.is_grad_enabled(),
                default_dtype=torch.get_default_dtype(),
                deterministic=torch.are_deterministic_algorithms_enabled(),
                process_group=torch.distributed.is_available() and torch.distributed.is_initialized())


@pytest.fixture(autouse=True)
def _no_leaked_global_state():
    """Each test leaves torch's global state as it found it, even when it fails: a dispatch mode or saved-tensors
    hook left active (torch 2.11's checkpoint did that when the checkpointed function raised), grad mode, the default
    dtype or a process group would change what every later test computes. A leak is undone and reported as an
    error of the test that caused it."""
    before = _global_state()
    yield
    after = _global_state()
    if after == before:
        return
    leaked = sorted(k for k in before if before[k] != after[k])
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack, _pop_mode
    while len(_get_current_dispatch_mode_stack()) > len(before["dispatch_modes"]):
        _pop_mode()
    for _ in range(64):
        if torch._C._autograd._top_saved_tensors_default_hooks(False) == before["saved_tensors_hooks"]:
            break
        torch._C._autograd._pop_saved_tensors_default_hooks()
    torch.set_grad_enabled(before["grad_enabled"])
    torch.set_default_dtype(before["default_dtype"])
    torch.use_deterministic_algorithms(before["deterministic"])
    if after["process_group"] and not before["process_group"]:
        torch.distributed.destroy_process_group()
    pytest.fail("the test left global state changed: %s (undone)" % ", ".join(leaked))
