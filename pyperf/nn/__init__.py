"""Fused, recompute-friendly layers (drop-in for their torch.nn counterparts)."""
from pyperf.nn.norm import FusedLayerNorm, FusedRMSNorm, replace_norms  # noqa: F401
