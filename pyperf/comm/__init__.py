"""Gradient communication: bucketing (GradientBucketer), the two-shot quantized all-reduce, DDP hook states."""
