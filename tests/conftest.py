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
