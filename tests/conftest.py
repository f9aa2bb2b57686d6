import contextlib
import importlib
import os
import sys
import zlib

import pytest
import torch

# Tests run against the in-place build of this checkout (python setup.py build_ext --inplace), never against some
# other installed pyperf; PYPERF_TEST_ROOT points them at another tree holding a pyperf package (make
# test-cuda-emu's sanitizer build).
ROOT = os.environ.get("PYPERF_TEST_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not sys.path or sys.path[0] != ROOT:
    sys.path.insert(0, ROOT)

HAS_CUDA = torch.cuda.is_available()

EMU_MISSING = ("pyperf._C_emu, the SIMT emulation of the CUDA kernels, is not built here (`make cuda-emu` builds it in "
               "place; `make test-cuda-emu` runs these tests under ASan/UBSan)")


def _load_emu():
    """pyperf._C_emu registers the CUDA kernels, run by the SIMT emulation (csrc/emu), as torch.ops.pyperf_emu.* on
    CPU tensors, with the schemas and C++ autograd of torch.ops.pyperf.*; it gets the same fakes here."""
    try:
        importlib.import_module("pyperf._C_emu")
    except ImportError:
        return False
    from pyperf import ops
    for name, fn in ops.FAKES.items():
        torch.library.register_fake("pyperf_emu::" + name)(fn)
    return True


HAS_EMU = _load_emu()


def stable_seed(*parts):
    """A seed from the test's parameters that is the same in every process (Python's hash() of a str is salted
    per process, so seeds built from it gave every CI run different inputs)."""
    return zlib.crc32(repr(parts).encode()) % 2 ** 31


def devices():
    """The devices a kernel test runs on: "cpu" (the CPU kernels); "emu" (the CUDA kernels under the SIMT
    emulation, on CPU tensors; skipped unless pyperf._C_emu is built); "cuda" where there is a GPU."""
    return ["cpu", "emu"] + (["cuda"] if HAS_CUDA else [])


def gpu_devices():
    """The devices that run the CUDA kernels: the emulation always (skipped when not built), a GPU where there is
    one."""
    return ["emu"] + (["cuda"] if HAS_CUDA else [])


def dev(device):
    """The torch device of a test device: the emulation computes on CPU tensors."""
    return "cpu" if device == "emu" else device


def lib(device):
    """torch.ops.pyperf, or for "emu" its emulated twin torch.ops.pyperf_emu."""
    return torch.ops.pyperf_emu if device == "emu" else torch.ops.pyperf


@contextlib.contextmanager
def kernels(device):
    """pyperf.ops.* (and all pyperf code above them: layers, hooks, bucketer) call the ops of lib(device)."""
    from pyperf import ops
    old = ops._lib
    ops._lib = lib(device)
    try:
        yield
    finally:
        ops._lib = old


@pytest.fixture(autouse=True)
def _emulated_kernels(request):
    """A test on device "emu" runs pyperf's ops through the emulated CUDA kernels, unless it compares the CPU and
    CUDA kernels itself (marked cpu_vs_cuda: it picks the kernels per call with kernels())."""
    params = getattr(request.node, "callspec", None)
    device = params.params.get("device") if params is not None else None
    if device != "emu" or request.node.get_closest_marker("cpu_vs_cuda") is not None:
        yield
        return
    with kernels("emu"):
        yield


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (runs on the GPU machine: scripts/gpu_check.sh)")
    skip_emu = pytest.mark.skip(reason=EMU_MISSING)
    for item in items:
        params = getattr(item, "callspec", None)
        device = str(params.params.get("device", "")) if params is not None else ""
        on_cuda = "cuda" in item.keywords or "cuda" in device
        if on_cuda and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if device == "emu" and not HAS_EMU:
            item.add_marker(skip_emu)


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
