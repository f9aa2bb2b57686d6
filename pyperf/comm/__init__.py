"""Gradient communication: bucketing (GradientBucketer), the two-shot quantized all-reduce, DDP hook states,
AllRanks (every rank's state in one checkpointable object)."""
from pyperf.comm.all_ranks import AllRanks
from pyperf.comm.bucketer import Compressor, GradientBucketer, available_compressions, register_compressor

from pyperf.comm.quantized import QuantizedCompressor, quantized_all_reduce  # registers int8/int4/fp8 compression

__all__ = ["AllRanks", "GradientBucketer", "Compressor", "register_compressor", "available_compressions",
           "quantized_all_reduce", "QuantizedCompressor"]
