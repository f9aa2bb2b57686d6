"""pyperf's DDP communication hooks (see docs/hooks.md).

    from pyperf import hooks
    state = hooks.register(ddp_model, "int8", block_size=256)     # allreduce | bf16 | fp16 | int8 | int4 | fp8
    ...
    torch.save(state.state_dict(), f"hook_rank{rank}.pt")           # from EVERY rank
    state.stats                                                     # bytes vs fp32 ring, quantization error, time

Raw hooks with torch's signature hook(state, bucket) -> Future[Tensor], for ddp_model.register_comm_hook:
allreduce_hook, bf16_hook, fp16_hook, quantized_hook (their state: HookState(kind, process_group, params)).
"""
from pyperf.comm.hooks import (KINDS, HookState, HookStats, allreduce_hook, bf16_hook, fp16_hook, hook_for,
                               quantized_hook, register)

__all__ = ["KINDS", "HookState", "HookStats", "allreduce_hook", "bf16_hook", "fp16_hook", "hook_for",
           "quantized_hook", "register"]
