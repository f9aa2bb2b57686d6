"""Loads pyperf._C (which registers torch.ops.pyperf.*) and turns every way it can be missing or stale into a
message that says what is wrong and the command that fixes it."""
import importlib
import os
import warnings

import torch

_REBUILD = ("rebuild it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
            "in the pyperf source tree, with the torch you run installed first")


class BuildError(ImportError):
    pass


def _source_root():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isdir(os.path.join(root, "csrc")) else None


def load():
    try:
        _C = importlib.import_module("pyperf._C")
    except ImportError as e:
        if "undefined symbol" in str(e):
            raise BuildError("pyperf._C does not match the installed torch %s (%s); %s"
                             % (torch.__version__, e, _REBUILD)) from e
        raise BuildError("pyperf._C, the compiled extension, is missing (%s); %s" % (e, _REBUILD)) from e
    if _C.TORCH_VERSION != torch.__version__:
        raise BuildError("pyperf._C was built against torch %s but torch %s is installed; %s"
                         % (_C.TORCH_VERSION, torch.__version__, _REBUILD))
    _warn_if_sources_newer(_C)
    return _C


def _warn_if_sources_newer(_C):
    root = _source_root()
    so = getattr(_C, "__file__", None)
    if root is None or so is None or not os.path.exists(so):
        return
    built = os.path.getmtime(so)
    newest, newest_path = 0.0, None
    for dirpath, _, files in os.walk(os.path.join(root, "csrc")):
        for f in files:
            if f.endswith((".cpp", ".cu", ".h", ".cuh")):
                p = os.path.join(dirpath, f)
                m = os.path.getmtime(p)
                if m > newest:
                    newest, newest_path = m, p
    if newest > built + 1.0:
        warnings.warn("pyperf._C is older than %s: the compiled ops may be stale; %s"
                      % (os.path.relpath(newest_path, root), _REBUILD), stacklevel=3)
