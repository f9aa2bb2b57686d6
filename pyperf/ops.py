"""Typed wrappers over torch.ops.pyperf.*, with a fake (meta) kernel for every op and autograd where an op is
differentiable. The schemas live in csrc/pyperf.cpp; the plain-torch oracle of each op in pyperf/_reference.py.

Sections follow the features (pack, quant, norm, activation), in the same order as csrc/pyperf.cpp.
"""
from typing import List, Optional, Sequence, Tuple  # noqa: F401

import torch

_lib = torch.ops.pyperf

# ---- pack ----------------------------------------------------------------------------------------------------


# ---- quant ---------------------------------------------------------------------------------------------------


# ---- norm ----------------------------------------------------------------------------------------------------


# ---- activation ----------------------------------------------------------------------------------------------

