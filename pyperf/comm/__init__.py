"""Gradient communication: bucketing (GradientBucketer), the two-shot quantized all-reduce, DDP hook states."""
from pyperf.comm.bucketer import Compressor, GradientBucketer, available_compressions, register_compressor

__all__ = ["GradientBucketer", "Compressor", "register_compressor", "available_compressions"]
