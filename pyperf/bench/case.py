"""One benchmark case: the same work done by pyperf and by the baselines a user would pick instead."""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional


@dataclass
class Case:
    group: str                                   # pack | quant | hooks | layers | checkpoint
    name: str                                    # what and at which size, e.g. "pack+scale gpt2-small fp32"
    setup: Callable[[], Any]                     # builds fresh inputs; may be called several times (rotation)
    impls: Dict[str, Callable[[Any], Any]]       # name -> fn(inputs) doing one call; "pyperf..." names first
    bytes: int = 0                               # bytes one call must move (each input read once, each output
                                                 # written once): GB/s and % of the measured copy bandwidth
    baseline: Optional[str] = None               # the impl speedups are against (default: first non-pyperf)
    extra: Dict[str, Any] = field(default_factory=dict)   # reported as-is (sizes, world size, ...)
    # Optional custom measurement for cases that are not a kernel timing (peak memory, bytes on the wire):
    # measure(impl_name, inputs) -> dict of metrics merged into that impl's record.
    measure: Optional[Callable[[str, Any], Dict[str, Any]]] = None
    rotate: bool = True                          # rotate several input sets so small inputs are not L2-hot

    def baseline_name(self):
        if self.baseline is not None:
            return self.baseline
        for k in self.impls:
            if not k.startswith("pyperf"):
                return k
        return None
