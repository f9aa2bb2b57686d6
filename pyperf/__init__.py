"""pyperf: fused gradient bucketing, quantized gradient all-reduce and recompute-friendly fused layers for
PyTorch data-parallel training.

    import pyperf
    pyperf.build_info()                 # what was built
    from pyperf import ops, hooks, nn
    from pyperf.comm import GradientBucketer
"""
import torch  # noqa: F401  (torch must be imported before _C: it provides the symbols _C links against)

from pyperf._load import BuildError, load as _load_extension

_C = _load_extension()
__version__ = _C.VERSION

from pyperf import ops  # noqa: E402,F401  (registers fakes and autograd for every op)


def build_info():
    """Versions, the backends and CUDA archs this build has, and the registered ops."""
    # dir(torch.ops.pyperf) lists only ops already looked up; the dispatcher knows every registered one.
    ops_names = sorted({n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
                        if n.startswith("pyperf::")})
    return {
        "pyperf": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "built_against_torch": _C.TORCH_VERSION,
        "backends": ["cpu"] + (["cuda"] if _C.WITH_CUDA else []),
        "cuda_archs": [a for a in _C.CUDA_ARCHS.split(";") if a],
        "cuda_available": torch.cuda.is_available(),
        "ops": ops_names,
        "extension": _C.__file__,
    }


__all__ = ["build_info", "BuildError", "ops", "__version__"]
