"""Fused, recompute-friendly layers (drop-in for their torch.nn counterparts)."""
from pyperf.nn.activation import (  # noqa: F401
    BiasDropoutResidual,
    BiasGeLU,
    GeGLU,
    GeGLUMLP,
    SwiGLU,
    SwiGLUMLP,
)
from pyperf.nn.norm import FusedLayerNorm, FusedRMSNorm, replace_norms  # noqa: F401
