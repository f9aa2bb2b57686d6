"""Fused, recompute-friendly layers (drop-in for their torch.nn counterparts)."""
