"""Plain-torch reference of every pyperf op: the oracle for the tests and the eager baseline of the benchmarks.
Written for clarity, not speed; each function mirrors the op of the same name in pyperf/ops.py."""
import math  # noqa: F401

import torch  # noqa: F401

# ---- pack ----------------------------------------------------------------------------------------------------


# ---- quant ---------------------------------------------------------------------------------------------------


# ---- norm ----------------------------------------------------------------------------------------------------


# ---- activation ----------------------------------------------------------------------------------------------

